"""The manifest of an image folder: built once, read fresh, rescanned when the tree changes, rebuilt when damaged,
refused when it belongs to another tree; where it lives; who builds it; the DALI file list it writes."""

import hashlib
import os
import shutil
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

pytest.importorskip("PIL")

from fastbyol.data import manifest as mf  # noqa: E402
from fastbyol.data import DataRequest, resolve_dataset  # noqa: E402
from fastbyol.data.synthetic import write_synthetic_jpegs  # noqa: E402
from fastbyol.errors import FastByolError  # noqa: E402


@pytest.fixture
def tree(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTBYOL_CACHE", str(tmp_path / "cache"))
    root = write_synthetic_jpegs(tmp_path / "data", n_train=30, n_test=9, size=24, classes=3)
    os.makedirs(root / "unlabeled" / "deep")
    shutil.copy(next((root / "train" / "class0").glob("*.jpg")), root / "unlabeled" / "deep" / "u 1.jpg")
    return root


def expected_files(root):
    """The plain reference: every non-hidden file below train/, test/, unlabeled/, sorted by path components."""
    out = []
    for split in ("train", "test", "unlabeled"):
        out += sorted((p for p in (root / split).rglob("*") if p.is_file()), key=lambda p: p.parts)
    return [str(p.relative_to(root)) for p in out]


def test_built_then_fresh(tree, monkeypatch):
    man, seconds, status = mf.obtain(tree)
    assert status == "built" and set(seconds) == {"listing", "checks", "index"}
    assert (tree / ".fastbyol" / "manifest.npz").is_file() and (tree / ".fastbyol" / "pretrain.list").is_file()
    assert [man.path(i) for i in range(len(man))] == expected_files(tree)
    assert man.classes == ["class0", "class1", "class2"]
    k = [man.path(i) for i in range(len(man))].index("train/class2/000002.jpg")
    assert man.labels[k] == 2 and man.split[k] == mf.TRAIN
    assert man.sizes[k] == (tree / "train/class2/000002.jpg").stat().st_size

    def no_scan(*a, **k):
        raise AssertionError("a fresh manifest must not be rescanned")

    monkeypatch.setattr(mf, "scan", no_scan)
    again, _, status = mf.obtain(tree)
    assert status == "fresh"
    assert np.array_equal(again.paths, man.paths) and np.array_equal(again.labels, man.labels)


@pytest.mark.parametrize("change", ["add", "remove", "rename", "modify", "new_class"])
def test_changed_tree_is_rescanned(tree, change):
    mf.obtain(tree)
    victim = tree / "train" / "class1" / "000001.jpg"
    time.sleep(0.01)  # distinct mtimes on filesystems with coarse timestamps
    if change == "add":
        shutil.copy(victim, tree / "test" / "class0" / "new.jpg")
    elif change == "remove":
        victim.unlink()
    elif change == "rename":
        victim.rename(victim.with_name("zz.jpg"))
    elif change == "modify":  # in place: no directory changes, the sample check sees it
        victim.write_bytes(victim.read_bytes())
        os.utime(victim, ns=(time.time_ns(), time.time_ns() + 10**9))
    else:
        (tree / "train" / "class9").mkdir()
        shutil.copy(victim, tree / "train" / "class9" / "x.jpg")
    man, _, status = mf.obtain(tree)
    assert status.startswith("rebuilt"), status
    assert [man.path(i) for i in range(len(man))] == expected_files(tree)


def test_in_place_change_outside_the_sample_is_found_in_the_background(tree, monkeypatch):
    mf.obtain(tree)
    monkeypatch.setattr(mf, "SAMPLE_CHECK", 0)  # start-up samples no file: only the background check can see it
    victim = tree / "unlabeled" / "deep" / "u 1.jpg"  # pretrains, not among the kNN images
    victim.write_bytes(victim.read_bytes()[:200])  # now truncated, same folder mtime
    ds = resolve_dataset(str(tree), DataRequest(image_size=16))
    assert ds.manifest == "fresh"
    with pytest.raises(FastByolError, match="u 1.jpg: truncated JPEG .*changed since the manifest"):
        ds.wait_eval_images()
    assert not (tree / ".fastbyol" / "manifest.npz").exists()  # the next run rescans


@pytest.mark.parametrize("damage", ["truncate", "flip", "garbage", "list"])
def test_damaged_manifest_is_rebuilt(tree, damage):
    mf.obtain(tree)
    path = tree / ".fastbyol" / "manifest.npz"
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "flip":
        data[len(data) // 2] ^= 0xFF  # inside an array: the zip CRC catches it
        path.write_bytes(bytes(data))
    elif damage == "garbage":
        path.write_bytes(os.urandom(500))
    else:
        (tree / ".fastbyol" / "pretrain.list").write_text("train/class0/000000.jpg 0\n")
    man, _, status = mf.obtain(tree)
    assert status.startswith("rebuilt"), status
    assert [man.path(i) for i in range(len(man))] == expected_files(tree)


def test_manifest_of_another_tree_is_refused(tree, tmp_path):
    other = write_synthetic_jpegs(tmp_path / "other", n_train=6, n_test=0, size=24, classes=2)
    mf.obtain(other)
    mf.obtain(tree)
    shutil.copy(other / ".fastbyol" / "manifest.npz", tree / ".fastbyol" / "manifest.npz")
    with pytest.raises(FastByolError, match=r"manifest.npz: a manifest of .*other, not of .*data"):
        resolve_dataset(str(tree), DataRequest(image_size=16))


def test_read_only_folder_uses_the_cache(tree, tmp_path, monkeypatch):
    real_access = os.access
    monkeypatch.setattr(mf.os, "access", lambda p, mode: False if str(p).startswith(str(tree)) else
                        real_access(p, mode))
    man, _, status = mf.obtain(tree, cache_dir=tmp_path / "mycache")
    assert status == "built" and not (tree / ".fastbyol").exists()
    assert man.location.parent == tmp_path / "mycache" / "manifests"
    assert mf.obtain(tree, cache_dir=tmp_path / "mycache")[2] == "fresh"


def test_parallel_checks_equal_the_serial_ones(tree, monkeypatch):
    bad = tree / "train" / "class1" / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0" + np.random.default_rng(1).bytes(300) + b"\xff\xd9")
    serial = mf.scan(tree, workers=1)
    monkeypatch.setattr(mf, "PARALLEL_MIN_FILES", 1)
    parallel = mf.scan(tree, workers=3)  # three check_worker subprocesses
    for a in ("paths", "split", "labels", "sizes", "mtimes", "inodes", "ctimes", "dir_ids"):
        assert np.array_equal(getattr(serial, a), getattr(parallel, a)), a
    assert serial.bad == parallel.bad and serial.bad[0][0] == "train/class1/bad.jpg"


def test_barrier_rank0_builds_others_read(tree):
    barrier = threading.Barrier(2)
    results = {}

    def rank(r):
        results[r] = mf.obtain(tree, rank=r, world_size=2, barrier=barrier.wait)[2]

    threads = [threading.Thread(target=rank, args=(r,)) for r in (1, 0)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert results == {0: "built", 1: "fresh"}


def test_processes_without_barrier_build_once(tree):
    code = ("import sys; from pathlib import Path; from fastbyol.data import manifest as mf; "
            "print(mf.obtain(Path(sys.argv[1]))[2])")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tree)], stdout=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = sorted(p.communicate(timeout=300)[0].strip() for p in procs)
    assert outs == ["built", "fresh"]


def test_file_list_feeds_each_rank_its_part(tree):
    """The manifest's DALI file list: two ranks' readers cover every pretraining file once per epoch."""
    pytest.importorskip("nvidia.dali")
    from nvidia.dali import pipeline_def

    ds = resolve_dataset(str(tree), DataRequest(image_size=16, eval_images=False))
    src = ds.pretraining_source
    assert len(src) == 31 and src.labels is None and src.where == str(tree)
    seen = []
    for shard in (0, 1):
        @pipeline_def
        def pipe():
            encoded, label = src.dali_reader(shard, 2)
            assert label is None
            return encoded

        p = pipe(batch_size=1, num_threads=1, device_id=None, seed=0)
        p.build()
        for _ in range(p.epoch_size("reader") // 2 + shard * (p.epoch_size("reader") % 2)):
            (e,) = p.run()
            seen.append(hashlib.md5(np.array(e[0]).tobytes()).hexdigest())
    want = [hashlib.md5((tree / rel).read_bytes()).hexdigest() for rel in expected_files(tree)
            if not rel.startswith("test/")]
    assert sorted(seen) == sorted(want)
    assert sorted(src.files) == sorted(str(tree / r) for r in expected_files(tree) if not r.startswith("test/"))


def test_the_prescan_builds_the_manifest_while_the_trainer_loads(tree, tmp_path, monkeypatch, capsys):
    """`fastbyol train` on an image folder lists and checks it in a child while it imports torch and DALI; the
    trainer reads what the child wrote (and says so) or, when the child checked a fresh one, does not check it
    again; a run that stops early leaves no child behind."""
    import os

    from fastbyol.cli import main

    from .support import child_pids

    monkeypatch.setenv("FASTBYOL_CACHE", str(tmp_path / "cache"))
    child = mf.start_prescan(tree)
    assert child.wait(timeout=300) == 0
    man, seconds, status = mf.obtain(tree)
    assert status == "built while fastbyol loaded" and seconds["checks"] >= 0 and len(man) == 40
    assert mf.obtain(tree)[2] == "fresh"  # its mark is for one reading only
    child = mf.start_prescan(tree)  # fresh: the child checks it, and this process trusts that check once
    assert child.wait(timeout=300) == 0
    stamps = [p for p in (tree / ".fastbyol").iterdir() if p.name.startswith("verified")]
    assert len(stamps) == 1
    monkeypatch.setattr(mf.Manifest, "stale_reason", lambda *a, **k: "not to be called")
    assert mf.obtain(tree)[2] == "fresh" and not stamps[0].exists()
    monkeypatch.undo()
    monkeypatch.setenv("FASTBYOL_CACHE", str(tmp_path / "cache"))
    args = ["train", "--data", str(tree), "--epochs", "1", "--batch-size", "8", "--image-size", "16", "--no-progress",
            "--knn-every", "0"]
    (tree / "train" / "class0" / "new.jpg").write_bytes((tree / "train" / "class0" / "000000.jpg").read_bytes())
    assert main([*args, "--out", str(tmp_path / "run")]) == 0  # the child or this process rescans: the same run
    out = capsys.readouterr().out
    assert "(manifest built while fastbyol loaded)" in out or "(manifest rebuilt (folder train/class0 changed))" in out
    assert not [p for p in (tree / ".fastbyol").iterdir() if p.name.startswith("verified")]
    before = set(child_pids(os.getpid()))  # what other tests left running in this process (a resource tracker)
    assert main([*args, "--out", str(tree / "inside")]) == 2  # refused after the child started: it is stopped
    assert set(child_pids(os.getpid())) <= before


@pytest.mark.parametrize("blocks", [False, True])
def test_checks_keep_one_thread_unless_the_files_block(blocks):
    """Files in the page cache are checked in the calling thread (threads only fight for the interpreter's lock, at
    several times the CPU a file); a first chunk that blocked on I/O (here: a sleep per item, a voluntary context
    switch like a cold disk's read) sends the rest over the thread pool. Same results, in order, either way."""
    ran_in = []

    def run(lo, hi):
        ran_in.append(threading.get_ident())
        if blocks:
            for _ in range(lo, hi):
                time.sleep(0.0005)
        return list(range(lo, hi))

    bounds = list(range(0, 64, 8)) + [64]
    parts = mf.over_threads(run, bounds, threads=4)
    assert [i for part in parts for i in part] == list(range(64))
    others = {t for t in ran_in if t != threading.get_ident()}
    assert bool(others) == blocks
    assert mf.over_threads(run, [0], threads=4) == []
