"""Writers cannot collide (fastbyol/run/outputs.py): every command that writes a folder, or a file into a run folder,
takes that folder's lock or refuses in one line, and no command writes over another run's files.

- Two `fastbyol shards` commands into one folder: the second, started while the first works (held in its pre-flight
  decode by FASTBYOL_TEST_DECODE_HANG), is refused naming the first one's pid; the first, SIGKILLed there, leaves
  no shard, no decoder child and no lock behind; the next command writes its own source's shards alone.
- `train --out`, `export`, `plot`, `bench gpu-compile` and `shards` never write into another run's folder, and
  never over a run's own files (Hypothesis over the names and depths of the target); nothing of the other run
  changes.
- `eval`, `finetune`, `export` and `plot` into a run folder whose lock another process holds (a training run) are
  refused in one line; once it is free they write.
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

hypothesis = pytest.importorskip("hypothesis")
pytest.importorskip("PIL")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from fastbyol.cli import main  # noqa: E402
from fastbyol.errors import FastByolError  # noqa: E402
from fastbyol.run import names  # noqa: E402
from fastbyol.run.disk import RunLock  # noqa: E402
from fastbyol.run.outputs import check_output  # noqa: E402

from .support import child_pids, one_line, one_step_run  # noqa: E402

ENV = dict(os.environ, OMP_NUM_THREADS="1")


def _state(pid: int) -> str:
    """The process's state letter (Z: a zombie, its parent gone too), or '' when it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return ""


def _image_folder(root: Path, n: int, extra: dict[str, bytes] | None = None) -> Path:
    from fastbyol.data.synthetic import write_synthetic_jpegs

    write_synthetic_jpegs(root, n_train=n, n_test=0, size=32, classes=2)
    for name, data in (extra or {}).items():
        (root / "train" / "class0" / name).write_bytes(data)
    return root


def _samples(folder: Path) -> int:
    import tarfile

    return sum(len([m for m in tarfile.open(t).getnames() if m.endswith(".jpg")]) for t in folder.glob("*.tar"))


# ------------------------------------------------------------------------------------------ two shards commands
@pytest.mark.skipif(sys.platform != "linux", reason="finds the decode child through /proc")
def test_a_second_shards_command_into_the_same_folder_is_refused(tmp_path):
    from .test_data_unproven import without_huffman_tables

    first_src = _image_folder(tmp_path / "a", 24, {"hang.jpg": without_huffman_tables(False)})
    second_src = _image_folder(tmp_path / "b", 10)
    dst = tmp_path / "dst"
    shards = [sys.executable, "-m", "fastbyol", "shards"]
    first = subprocess.Popen([*shards, str(first_src), str(dst), "--no-progress"], env=dict(
        ENV, FASTBYOL_TEST_DECODE_HANG="hang.jpg"), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline, child = time.monotonic() + 120, None
        while child is None and time.monotonic() < deadline and first.poll() is None:
            child = next((c for c in child_pids(first.pid) if b"--decode" in Path(f"/proc/{c}/cmdline").read_bytes()),
                         None)
            time.sleep(0.05)
        assert child is not None, first.communicate()[1][-2000:]
        second = subprocess.run([*shards, str(second_src), str(dst), "--no-progress"], env=ENV, capture_output=True,
                                text=True, timeout=120)
        assert second.returncode == 2 and second.stderr.count("\n") == 1, second.stderr
        assert f"is in use by another fastbyol shards command (pid {first.pid})" in second.stderr
        assert not list(dst.glob("*.tar"))
        os.kill(first.pid, signal.SIGKILL)  # the first one dies in its pre-flight decode
        first.wait(timeout=30)
        time.sleep(1.0)
        assert _state(child) in ("", "Z"), f"the decode child {child} still runs: {_state(child)}"
    finally:
        if first.poll() is None:
            first.kill()
    assert not list(dst.glob("*.tar"))  # nothing half-written
    third = subprocess.run([*shards, str(second_src), str(dst), "--no-progress"], env=ENV, capture_output=True,
                           text=True, timeout=120)
    assert third.returncode == 0, third.stderr
    assert _samples(dst) == 10  # the second source's shards alone


# -------------------------------------------------------------------------------------- another run's files
@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    return one_step_run(root / "a"), one_step_run(root / "b")


def _snapshot(run: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(run.iterdir()) if p.is_file()}


def test_no_command_writes_over_another_runs_files(runs, tmp_path, capsys):
    a, b = runs
    before = _snapshot(b)
    (tmp_path / "src").mkdir()
    cases = [
        (["export", str(a), "--out", str(b / names.CHECKPOINT)], "another fastbyol run's folder"),
        (["export", str(a), "--out", str(b / "sub" / "encoder.pt")], "another fastbyol run's folder"),
        (["export", str(a), "--out", str(a / names.CHECKPOINT)], "is a file of the run"),
        (["export", str(a), "--out", str(a / names.TENSORBOARD / "x.pt")], "is a file of the run"),
        (["plot", str(a), "--out", str(b / names.CURVES)], "another fastbyol run's folder"),
        (["plot", str(a), "--out", str(a / ".curves.png")], "is a file of the run"),
        (["bench", "gpu-compile", "--out", str(b / names.SUMMARY)], "another fastbyol run's folder"),
        (["shards", str(tmp_path / "src"), str(b)], "the folder of a fastbyol run"),
        (["shards", str(tmp_path / "src"), str(b / "wds")], "the folder of a fastbyol run"),
        (["train", "--data", "synthetic", "--no-progress", "--out", str(b / "sub")], "the folder of a fastbyol run"),
    ]
    for argv, needle in cases:
        assert main(argv) == 2, argv
        one_line(capsys, needle)
    assert _snapshot(b) == before and not (b / "sub").exists() and not (b / "wds").exists()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.sampled_from(["x", "y.pt", ".hidden", "sub", *sorted(names.RUN_FILES), names.TENSORBOARD,
                                 names.PROFILE]), min_size=1, max_size=3), st.booleans())
def test_where_an_output_may_go(runs, parts, own):
    a, b = runs
    run = a if own else b
    target = run.joinpath(*parts)
    if not own:
        with pytest.raises(FastByolError, match="another fastbyol run's folder"):
            check_output(target, a)
    elif parts[0] in names.RUN_FILES or parts[0] in (names.TENSORBOARD, names.PROFILE) or parts[0].startswith("."):
        with pytest.raises(FastByolError, match="is a file of the run"):
            check_output(target, a)
    else:
        assert check_output(target, a) == a.resolve()
    assert check_output(a.parent / "elsewhere" / parts[-1], a) is None  # outside every run: no lock needed


# ------------------------------------------------------------------------------------------ a run folder in use
def test_commands_writing_into_a_run_in_use_are_refused(runs, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    a, _ = runs
    lock = RunLock(a)  # what a training run holds for its lifetime
    try:
        for argv in (["eval", str(a)], ["finetune", str(a), "--fraction", "0.1"],
                     ["export", str(a), "--out", str(a / "encoder.pt")], ["plot", str(a)]):
            assert main(argv) == 2, argv
            one_line(capsys, f"{a} is in use by ", f"(pid {os.getpid()})")
        assert not (a / "encoder.pt").exists() and not (a / names.CURVES).exists()
    finally:
        lock.close()
    assert main(["plot", str(a)]) == 0 and (a / names.CURVES).is_file()
    assert main(["export", str(a), "--out", str(a / "encoder.pt")]) == 0 and (a / "encoder.pt").is_file()
