"""Names and limits of the operating system: long and non-UTF-8 names, paths past the system's limit, a valid long
name whose temporary sibling would be too long, and the resource limits (address space, file size, open files): each
ends in a correct run or one line with exit 2, never a traceback or a native abort."""

import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fastbyol.cli import main
from fastbyol.data.cache import tmp_name
from fastbyol.system.paths import NAME_MAX, check_path, fit_name, limit_error

from .support import one_line, one_step_run, without_log_lines

LONG = "a" * 300  # one name past NAME_MAX


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    return one_step_run(tmp_path_factory.mktemp("runs") / "run")


@pytest.mark.parametrize("argv", [
    ["export", "{run}", "--out", "{tmp}/" + LONG + "/e.pt"],  # the hostile round's example: a 300-byte component
    ["export", "{run}", "--out", "{tmp}/" + LONG + ".pt"],
    ["plot", "{run}", "--out", "{tmp}/" + LONG + ".png"],
    ["eval", "{tmp}/" + LONG],
    ["finetune", "{run}", "--subset", "{tmp}/" + LONG + ".txt"],
    ["train", "--out", "{tmp}/" + LONG, "--epochs", "1"],
    ["train", "--data", "{tmp}/" + LONG, "--epochs", "1", "--out", "{tmp}/run"],
    ["train", "--data", "{tmp}/x-{{000..999}}-" + LONG + ".tar", "--epochs", "1", "--out", "{tmp}/run"],
    ["export", "{run}", "--out", "{tmp}/" + "d/" * 2100 + "e.pt"],  # past PATH_MAX
    ["shards", "{tmp}/" + LONG, "{tmp}/dst"],
])
def test_a_name_or_path_past_the_systems_limit_is_one_line(finished, tmp_path, capsys, argv):
    assert main([a.format(run=finished, tmp=tmp_path) for a in argv]) == 2
    one_line(capsys)
    assert not (tmp_path / "run").exists() and not (tmp_path / "dst").exists()


def test_a_valid_250_byte_export_name_is_written(finished, tmp_path, capsys):
    """Its temporary sibling (.NAME.XXXXXXXX.tmp) would be 264 bytes: it is cut to fit, the export is written."""
    out = tmp_path / ("b" * 247 + ".pt")
    assert main(["export", str(finished), "--out", str(out)]) == 0
    assert set(torch.load(out, weights_only=True)) and not list(tmp_path.glob(".*.tmp"))


def test_non_utf8_names_are_written_and_printed_as_the_bytes_they_are(finished, tmp_path):
    out = os.fsencode(tmp_path) + b"/\xff\xfe-encoder.pt"
    done = subprocess.run([sys.executable, "-m", "fastbyol", "export", str(finished), "--out", os.fsdecode(out)],
                          capture_output=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert os.path.exists(out) and done.stdout.splitlines()[0] == b"encoder: " + out  # then how to load it


@settings(max_examples=200, deadline=None)
@given(st.text(min_size=1, max_size=300).filter(lambda s: "/" not in s and "\0" not in s),
       st.sampled_from([".tmp-12345", ".idx", "-1234abcd.meta.npz", ".", ""]))
def test_every_made_name_fits_the_systems_limit(name, suffix):
    made = fit_name(name, suffix, ".")
    assert len(os.fsencode(made)) <= NAME_MAX and made.endswith(suffix) and made.startswith(".")
    if len(os.fsencode("." + name + suffix)) <= NAME_MAX:
        assert made == "." + name + suffix  # a name that fits is left as it is
    assert len(os.fsencode(tmp_name(Path("/x") / name[:255]).name)) <= NAME_MAX


def test_check_path_and_limit_errors():
    check_path("--out", "/tmp/" + "a" * 255)  # fits
    for bad in ("/tmp/" + "a" * 256, "x/" * 2100, "a\0b"):
        with pytest.raises(Exception) as e:
            check_path("--out", bad)
        assert "\n" not in str(e.value) and "--out" in str(e.value)
    import errno

    for code in (errno.ENAMETOOLONG, errno.EMFILE, errno.EFBIG):
        assert limit_error(OSError(code, os.strerror(code), "/some/file")) is not None
    assert limit_error(OSError(errno.ENOENT, "x")) is None and limit_error(ValueError("x")) is None


def _limited_train(tmp_path, limit, value, *extra) -> subprocess.CompletedProcess:
    """`fastbyol train` on a small image folder with one resource limit set (soft and hard) in the child."""
    from fastbyol.data.synthetic import write_synthetic_jpegs

    data = tmp_path / "data"
    if not data.exists():
        write_synthetic_jpegs(data, n_train=48, n_test=16, size=32, classes=2)

    def limited():
        resource.setrlimit(limit, (value, value))

    env = dict(os.environ, FASTBYOL_CACHE=str(tmp_path / "cache"))
    return subprocess.run([sys.executable, "-m", "fastbyol", "train", "--data", str(data), "--epochs", "1",
                           "--batch-size", "16", "--image-size", "16", "--out", str(tmp_path / "run"), "--no-progress",
                           *extra], capture_output=True, text=True, timeout=300, env=env, preexec_fn=limited)


@pytest.mark.parametrize("gb", [1.0, 1.7, 2.2])
def test_an_address_space_limit_is_one_line_never_an_abort(tmp_path, gb):
    """Under ulimit -v, DALI's threads abort the process when a stack or an arena cannot be mapped (SIGABRT, no
    message): the room is checked before DALI starts, and what fails before that (DALI's libraries that cannot be
    mapped, torch's allocator) is one line too."""
    done = _limited_train(tmp_path, resource.RLIMIT_AS, int(gb * 1e9))
    assert done.returncode in (0, 2), (done.returncode, done.stderr[-2000:])
    if done.returncode == 2:
        assert done.stderr.count("\n") == 1 and "ulimit -v" in done.stderr, done.stderr
        assert not (tmp_path / "run").exists()


def test_the_file_size_limit_is_one_line_and_keeps_no_partial_file(tmp_path):
    done = _limited_train(tmp_path, resource.RLIMIT_FSIZE, 200 * 1024)  # the checkpoint is larger
    assert done.returncode == 2, done.stderr[-2000:]
    err = without_log_lines(done.stderr)  # it trained its steps: their log lines come first
    assert err.count("\n") == 1 and "file size limit" in err and "checkpoint.pt" in err, done.stderr
    assert not list((tmp_path / "run").glob(".*.tmp")) if (tmp_path / "run").exists() else True
