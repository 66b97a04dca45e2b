"""In the training pipeline: a file that passes the structural checks but that DALI cannot decode is
replaced and counted under --skip-bad-files (the run goes on, and a resume stays exact), or named in one line.

The bad file: a progressive JPEG whose first scan asks for DC coefficients 0..5 (tests/test_data_decode.py's
recipe): its headers pass checks.py, DALI's CPU decoder refuses it with an error (not a crash) on the calling thread
and on its workers alike (tried here in batches of 8 and 64 with 2 threads).
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("PIL")
pytest.importorskip("nvidia.dali")

from fastbyol.data import DataRequest, resolve_dataset  # noqa: E402
from fastbyol.data.checks import check_image_file  # noqa: E402
from fastbyol.data.folders import FileList, ListFile  # noqa: E402

from .support import good_jpegs  # noqa: E402
from .test_data_decode import bad_scan_jpeg as _bad_scan_jpeg  # noqa: E402

BAD = "000020x.jpg"  # sorts among the good files (000000.jpg ...)
QUIET = DataRequest(image_size=16, eval_images=False)  # no kNN images: these tests read the pretraining source
SKIPPING = DataRequest(image_size=16, skip_bad_files=True, eval_images=False)


def bad_scan_jpeg(seed: int = 1) -> bytes:
    """test_data_decode's file that passes the structural checks and fails only in DALI's decoder."""
    return _bad_scan_jpeg(np.random.default_rng(seed))


@pytest.fixture(scope="module")
def good_files(tmp_path_factory):
    return good_jpegs(tmp_path_factory, 40)


@pytest.fixture
def folder(good_files, tmp_path):
    return _make_folder(good_files, tmp_path / "imgs")


def _make_folder(good_files, root):
    """A fresh unlabeled folder (its own manifest): 40 good 32 px JPEGs and one that only DALI's decoder rejects."""
    (root / "all").mkdir(parents=True)
    for p in good_files:
        os.link(p, root / "all" / p.name)
    (root / "all" / BAD).write_bytes(bad_scan_jpeg())
    assert check_image_file(root / "all" / BAD) is None  # passes the structural checks
    return root


def _env(folder):
    return {**os.environ, "FASTBYOL_CACHE": os.environ["FASTBYOL_CACHE"], "PYTHONPATH": os.getcwd()}


KW = dict(batch_size=8, num_threads=2)  # the loaders' settings here, beside make_loader's defaults


def _views(loader, epochs: int) -> list:
    return [(v1.clone(), v2.clone()) for _ in range(epochs) for v1, v2 in loader.epoch()]


def test_loader_replaces_the_file_and_yields_the_batches_of_the_substituted_list(make_loader, folder):
    """The recovered stream (decode error -> list rewritten -> pipeline rebuilt from the checkpoint before the batch)
    equals, batch for batch, the stream of a loader built from the start over the substituted list (the reference);
    the manifest's list is left as it was."""

    src = resolve_dataset(str(folder), SKIPPING).pretraining_source
    manifest_list = open(src.source_list, "rb").read()
    loader = make_loader(src, **KW)
    got = _views(loader, 2)
    bad = str(folder / "all" / BAD)
    assert [name for name, _ in loader.skipped] == [bad] and src.bad == [bad]
    assert open(src.source_list, "rb").read() == manifest_list and src.list_file != src.source_list
    lines = open(src.list_file, "rb").read().splitlines()
    k = manifest_list.splitlines().index(f"all/{BAD} 0".encode())
    assert len(lines) == len(manifest_list.splitlines()) == 41 and lines[k] == lines[k - 1]  # its predecessor

    ref_src = FileList(None, None, src.where, listed=ListFile(src.root, src.source_list, len(src)), skip_bad=True)
    assert ref_src.replace_bad(bad)
    ref = make_loader(ref_src, **KW)
    want = _views(ref, 2)
    assert ref.skipped == [] and len(got) == len(want) == 10
    for (a1, a2), (b1, b2) in zip(got, want):
        assert torch.equal(a1, b1) and torch.equal(a2, b2)


def test_replace_bad_rules():
    files = [f"/d/{c}.jpg" for c in "abcde"]
    fl = FileList(list(files), np.arange(5, dtype=np.int64), skip_bad=True)
    assert not fl.replace_bad("/d/zz.jpg") and fl.files == files  # unknown: nothing changes (the caller raises)
    assert fl.replace_bad("/d/a.jpg", "/d/c.jpg")
    assert fl.files == ["/d/b.jpg", "/d/b.jpg", "/d/b.jpg", "/d/d.jpg", "/d/e.jpg"]  # first: the next good one
    assert fl.labels.tolist() == [1, 1, 1, 3, 4]
    assert fl.replace_bad("/d/b.jpg") and fl.files == ["/d/d.jpg"] * 4 + ["/d/e.jpg"]
    assert not fl.replace_bad("/d/d.jpg", "/d/e.jpg")  # nothing good would be left
    assert fl.bad == ["/d/a.jpg", "/d/c.jpg", "/d/b.jpg"]


def _train(folder, out, *extra, timeout=600):
    cmd = [sys.executable, "-m", "fastbyol", "train", "--data", str(folder), "--epochs", "2", "--batch-size", "8",
           "--image-size", "16", "--no-progress", "--out", str(out), "--seed", "5", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_env(folder))


# Trains as `fastbyol train` does, but SIGKILLs itself at the start of step argv[1] (a deterministic kill: the
# checkpoints before it are on disk, nothing after it is).
KILL_AT = """
import os, signal, sys
import fastbyol.train as t
from fastbyol.cli import main
at, real, n = int(sys.argv[1]), t.byol_step, [0]
def step(*a, **k):
    n[0] += 1
    if n[0] == at:
        os.kill(os.getpid(), signal.SIGKILL)
    return real(*a, **k)
t.byol_step = step
sys.exit(main(sys.argv[2:]))
"""


def test_train_skips_counts_and_resumes_exactly(folder, good_files, tmp_path):
    full = tmp_path / "full"
    res = _train(folder, full, "--skip-bad-files")
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((full / "summary.json").read_text())
    bad = str(folder / "all" / BAD)
    assert summary["skipped_files"] == 1 and summary["skipped_while_training"] == [bad]
    assert json.loads((full / "bad_files.json").read_text()) == [bad]
    assert f"skipped {bad}: does not decode" in res.stdout

    # the same files in a fresh folder (the first run recorded the file beside its own manifest), killed at step 8
    # (of 10; checkpoints every 3 steps: it resumes from step 6), after the file was met
    other = _make_folder(good_files, tmp_path / "other")
    bad = str(other / "all" / BAD)
    killed = tmp_path / "killed"
    cmd = [sys.executable, "-c", KILL_AT, "8", "train", "--data", str(other), "--epochs", "2", "--batch-size", "8",
           "--image-size", "16", "--no-progress", "--out", str(killed), "--seed", "5", "--skip-bad-files",
           "--ckpt-every-steps", "3"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=_env(folder))
    assert res.returncode == -9, res.stderr[-3000:]
    assert not (killed / "summary.json").exists()
    assert json.loads((killed / "bad_files.json").read_text()) == [bad]  # met before a checkpoint: the resume knows
    res = subprocess.run([sys.executable, "-m", "fastbyol", "train", "--resume", str(killed), "--no-progress"],
                         capture_output=True, text=True, timeout=600, env=_env(folder))
    assert res.returncode == 0, res.stderr[-3000:]
    resumed = json.loads((killed / "summary.json").read_text())
    assert resumed["resumed"] and resumed["steps"] == summary["steps"] == 10
    assert resumed["params_sha256"] == summary["params_sha256"]
    assert resumed["skipped_files"] == 1


def test_without_the_flag_one_line_names_the_file(folder, tmp_path):
    res = _train(folder, tmp_path / "strict")
    assert res.returncode == 2, res.stderr[-3000:]
    ours = [ln for ln in res.stderr.splitlines() if ln.startswith("fastbyol: error:")]
    assert len(ours) == 1 and str(folder / "all" / BAD) in ours[0] and "does not decode" in ours[0]
    assert "Traceback" not in res.stderr


def test_the_next_run_knows_the_file(make_loader, folder, tmp_path):
    """A file found undecodable is recorded beside the manifest (undecodable.json, with its size and mtime): the
    next run replaces it before the pipeline starts (counted once, no rebuild) or, without the flag, names it at
    start; rewritten, it is checked again."""

    src = resolve_dataset(str(folder), SKIPPING).pretraining_source
    first = _views(make_loader(src, **KW), 1)
    ds = resolve_dataset(str(folder), SKIPPING)
    bad = str(folder / "all" / BAD)
    assert ds.skipped_files == 1 and ds.pretraining_source.bad == [bad]
    loader = make_loader(ds.pretraining_source, **KW)
    again = _views(loader, 1)
    assert loader.skipped == [] and all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
                                        for a, b in zip(first, again))
    from fastbyol.errors import FastByolError

    with pytest.raises(FastByolError, match=f"{BAD}: does not decode \\(found by an earlier run"):
        resolve_dataset(str(folder), QUIET)
    (folder / "all" / BAD).write_bytes(bad_scan_jpeg(2))  # rewritten: no longer the file that was recorded
    os.utime(folder / "all" / BAD, ns=(1, 1))
    assert resolve_dataset(str(folder), SKIPPING).skipped_files == 0


def test_tar_shards_replace_the_sample_in_their_own_index(make_loader, good_files, tmp_path):
    """Shards: the sample is named shard.tar:offset:member and replaced in this process's own copy of its shard's
    index; the batches equal a loader built over the substituted index from the start."""
    from fastbyol.data.shards import ShardSource, write_shards

    src_dir = tmp_path / "src"
    (src_dir / "train" / "c").mkdir(parents=True)
    for p in good_files:
        os.link(p, src_dir / "train" / "c" / p.name)
    (src_dir / "train" / "c" / BAD).write_bytes(bad_scan_jpeg())
    write_shards(src_dir, tmp_path / "sh", max_samples=20, progress=False)
    src = resolve_dataset(str(tmp_path / "sh"), SKIPPING).pretraining_source
    shared = [open(p, "rb").read() for p in src.source_index]
    loader = make_loader(src, **KW)
    got = _views(loader, 2)
    assert len(loader.skipped) == 1 and ".tar:" in loader.skipped[0][0] and src.bad == [loader.skipped[0][0]]
    assert [open(p, "rb").read() for p in src.source_index] == shared
    ref_src = ShardSource(list(src.paths), list(src.source_index), len(src), src.where, labels=src.labels)
    assert ref_src.replace_bad(*src.bad) and not ref_src.replace_bad("/nowhere.tar:0:x.jpg")
    want = _views(make_loader(ref_src, **KW), 2)
    assert len(got) == len(want) == 10
    for (a1, a2), (b1, b2) in zip(got, want):
        assert torch.equal(a1, b1) and torch.equal(a2, b2)


def _with_victim(good_files, root):
    """A folder of good files and BAD, a copy of a good one: (folder, BAD's path)."""
    folder = _make_folder(good_files, root)
    victim = folder / "all" / BAD
    victim.write_bytes((folder / "all" / good_files[0].name).read_bytes())
    return folder, victim


def _overwrite_keeping_size_and_mtime(victim) -> None:
    """BAD overwritten with a JPEG start, random bytes and an end marker, its size and mtime kept (as cp -p, rsync -t
    or tar x keep them): DALI's batch fails with "nvImageCodec failure", which names no file, and nvImageCodec prints
    "[jpeg_parser] Invalid marker" from its own thread while DALI works ahead, outside any run() call."""
    st = victim.stat()
    data = victim.read_bytes()
    victim.write_bytes(b"\xff\xd8\xff\xe0" + np.random.default_rng(3).bytes(len(data) - 6) + b"\xff\xd9")
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_a_file_overwritten_with_its_size_and_mtime_kept_is_named_at_startup(good_files, tmp_path):
    """The manifest knows each file by its identity (size, mtime, inode, ctime): a file rewritten in place since the
    manifest was written, its size and mtime set back, makes the next run check it again, and name it."""
    folder, victim = _with_victim(good_files, tmp_path / "imgs")
    resolve_dataset(str(folder), QUIET)  # the manifest: every file passes
    _overwrite_keeping_size_and_mtime(victim)
    res = _train(folder, tmp_path / "strict")
    assert res.returncode == 2, res.stderr[-3000:]
    assert res.stderr.startswith(f"fastbyol: error: {victim}: ") and res.stderr.count("\n") == 1, res.stderr[-3000:]
    assert not (tmp_path / "strict").exists()


def test_a_batch_failure_that_names_no_file_is_traced_to_the_file(make_loader, good_files, tmp_path):
    """A file that changes after the checks, while the run holds its file list: the batch DALI cannot decode, whose
    error names no file, is read again from the checkpoint before it and the file is named, DALI's native line
    folded into ours."""
    from fastbyol.errors import FastByolError

    folder, victim = _with_victim(good_files, tmp_path / "imgs")
    src = resolve_dataset(str(folder), QUIET).pretraining_source
    _overwrite_keeping_size_and_mtime(victim)
    with pytest.raises(FastByolError) as e:
        _views(make_loader(src, **KW), 2)
    line = str(e.value)
    assert line.startswith(f"{victim}: ") and "\n" not in line
    assert "changed since the pre-flight check" in line and "[native: [ERROR] [jpeg_parser]" in line


def test_a_batch_failure_that_names_no_file_is_skipped_as_that_file(make_loader, good_files, tmp_path, capfd):

    folder, victim = _with_victim(good_files, tmp_path / "imgs")
    src = resolve_dataset(str(folder), SKIPPING).pretraining_source
    _overwrite_keeping_size_and_mtime(victim)  # after the checks, while the run holds its file list
    loader = make_loader(src, **KW)
    assert len(_views(loader, 2)) == 10
    assert [name for name, _ in loader.skipped] == [str(victim)] and src.bad == [str(victim)]
    assert "jpeg_parser" not in capfd.readouterr().err


def test_the_capture_spans_epochs_until_the_loader_closes(make_loader, folder, capfd):
    """DALI decodes the next epoch's first batches ahead, right after an epoch's last one: fd 2 stays captured
    between epochs (what a bad file prints then is folded into its error, not printed), and close() stops DALI and
    gives fd 2 back."""

    src = resolve_dataset(str(folder), SKIPPING).pretraining_source
    loader = make_loader(src, **KW)
    assert len(_views(loader, 1)) == 5
    os.write(2, b"native, between epochs\n")
    assert len(_views(loader, 1)) == 5
    loader.close()
    os.write(2, b"after close\n")
    err = capfd.readouterr().err
    assert "between epochs" not in err and "after close" in err
    loader.close()  # a second close does nothing


def test_a_file_gone_since_the_manifest_is_named(make_loader, good_files, tmp_path):
    """DALI's reader says "File mapping failed: PATH": named as unreadable, not as the folder."""
    from fastbyol.errors import FastByolError

    folder = _make_folder(good_files, tmp_path / "imgs")
    (folder / "all" / BAD).write_bytes((folder / "all" / good_files[0].name).read_bytes())
    src = resolve_dataset(str(folder), QUIET).pretraining_source
    (folder / "all" / BAD).unlink()  # after the checks, before training reads it
    with pytest.raises(FastByolError, match=f"^{folder / 'all' / BAD}: cannot be read"):
        _views(make_loader(src, **KW), 2)
