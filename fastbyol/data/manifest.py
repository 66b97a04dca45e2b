"""The manifest of an image folder: listed and checked once, then read by every rank, later run and resume.

A folder of 1.28M JPEGs costs minutes to list and check file by file (stat, open, read both ends), so the first run
does it once, in parallel, and writes the result; every later reader checks only that the tree did not change.

Contents (one `.npz`, uncompressed, written to a temporary name and renamed: whole or absent; a CRC-32 of every
array makes a damaged file fail to load, and it is then rebuilt, never trusted):
  header      JSON: format version, the resolved root, layout ("labeled": train/ with test/ or val/; "classes":
              torchvision's ImageFolder, ROOT/<class>/, with every k-th image of a class held out as the test
              split; "unlabeled"), class names, test-only class names, the test folder, the held-out k, the bad
              files with the reason and their size and mtime, the DALI file list's name and size, and the seconds
              the scan took (listing, checks)
  paths       uint8 blob: the good files' paths relative to the root, "\\n"-separated, in sorted order
  split       (N,) uint8: 0 train, 1 test, 2 unlabeled (the unlabeled layout is all 0)
  labels      (N,) int32: class index, -1 where there is none
  sizes       (N,) int64 bytes;  mtimes (N,) int64 ns;  gray (N,) uint8: 1 where the image has one grey channel
  dirs        uint8 blob: every listed directory, relative ("" is the root);  dir_mtimes (D,) int64 ns
Files the header check passes but cannot prove safe (checks.py's "unproven") are decoded once during the scan, in a
child process (unproven.py): those that fail are bad files; `decoded.json` beside the manifest keeps every result by
size and mtime for the next scan.
Beside it, `pretrain.list`: the pretraining files (train + unlabeled) as DALI's `file_list` ("relpath label" lines),
which each rank's DALI reader reads itself: no process holds a Python list of a million paths.

Freshness (when a manifest is read): its root must be this folder (a manifest of another tree is refused, naming
it); every recorded directory's mtime must be unchanged (catches files and folders added, removed or renamed
anywhere in the tree, since each changes its parent directory's mtime); and the sizes and mtimes of a fixed sample
of up to 10,000 files must match. Any difference rescans. A file rewritten in place outside that sample changes no
directory: `verify_files()` compares every file's size and mtime, and the dataset runs it in the background on rank
0 after the kNN images (a difference there marks the manifest stale for the next run and re-checks the changed
files; one that is now bad stops the run with one line).

Where it lives: `ROOT/.fastbyol/` when the folder is this user's and writable (hidden, so never listed as data) or
that folder is already there, else `CACHE/manifests/<hash of the resolved root>/` (cache.py: `$FASTBYOL_CACHE`,
`~/.cache/fastbyol`): a dataset folder shared by others is never written.
For a read-only folder shared by several nodes, point `$FASTBYOL_CACHE` at a shared folder, or each node's first
process builds its own copy.

Who builds it: rank 0, under an OS lock on `manifest.lock`; with a barrier (torchrun), the other ranks wait at
it and then read; without one, they queue on the lock and find the manifest fresh.

Checks run in `workers` subprocesses (`python -m fastbyol.data.check_worker`), each with `threads`
threads: Python's per-file work (about 25 us: open, fstat, two preads, the JPEG header walk of checks.py) needs
processes to use several cores, and threads keep a cold disk or a network filesystem busy.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import FastByolError
from .cache import (cache_root, file_lock, load_npz_checked, ours_to_write, path_key, remove_stale_tmp,
                    save_npz_checked, tmp_name, writable_dir)
from .checks import check_fd, open_regular

VERSION = 3  # 3: the ImageFolder layout (ROOT/<class>/), val/ as the test split, the held-out share
MANIFEST_NAME = "manifest.npz"
LIST_NAME = "pretrain.list"
TRAIN, TEST, UNLABELED = 0, 1, 2
TEST_FOLDERS = ("test", "val")  # the labelled layout's test split: test/, else val/ (ImageNet's)
HELD_OUT_MAX = 10_000  # the ImageFolder layout holds out about this many images at most (held_out_every)
SAMPLE_CHECK = 10_000  # files whose size and mtime are compared at every start
PARALLEL_MIN_FILES = 20_000  # below this, checks run in this process (a subprocess costs ~0.3 s to start)


def _utf8(s: str) -> bytes:
    return s.encode("utf-8", "surrogateescape")


def _blob(strings: list[str]) -> np.ndarray:
    return np.frombuffer(_utf8("\n".join(strings)), dtype=np.uint8)


def _split_blob(blob: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(starts, ends) of the "\\n"-separated strings in a uint8 blob."""
    cuts = np.flatnonzero(blob == 10)
    starts = np.concatenate([[0], cuts + 1]).astype(np.int64)
    ends = np.concatenate([cuts, [len(blob)]]).astype(np.int64)
    return starts, ends


def _strings(blob: np.ndarray) -> list[str]:
    return blob.tobytes().decode("utf-8", "surrogateescape").split("\n") if len(blob) else []


@dataclass
class Manifest:
    root: Path  # resolved
    layout: str  # "labeled" (train/), "classes" (ROOT/<class>/) or "unlabeled"
    classes: list[str]
    paths: np.ndarray  # uint8 blob of "\n"-separated relative paths
    split: np.ndarray  # (N,) uint8
    labels: np.ndarray  # (N,) int32, -1 = none
    sizes: np.ndarray  # (N,) int64
    mtimes: np.ndarray  # (N,) int64 ns
    gray: np.ndarray  # (N,) uint8: 1 where the image is stored with one grey channel
    dirs: list[str]
    dir_mtimes: np.ndarray  # (D,) int64 ns
    bad: list[list] = field(default_factory=list)  # [relpath, reason, size, mtime_ns]
    test_only_classes: list[str] = field(default_factory=list)
    seconds: dict = field(default_factory=dict)  # listing, checks (of the scan that wrote it)
    location: Path | None = None  # the folder it is stored in
    list_size: int = -1  # bytes of pretrain.list, to notice a damaged or foreign one
    test_dir: str = ""  # the labelled layout's test folder: "test", "val" or "" (none)
    held_out_every: int = 0  # the ImageFolder layout: every k-th image of each class is the test split (0: none)
    _offsets: tuple | None = None

    def __len__(self) -> int:
        return len(self.split)

    def path(self, i: int) -> str:
        """Relative path of file i."""
        if self._offsets is None:
            self._offsets = _split_blob(self.paths)
        s, e = self._offsets[0][i], self._offsets[1][i]
        return self.paths[s:e].tobytes().decode("utf-8", "surrogateescape")

    def indices(self, split: int) -> np.ndarray:
        return np.flatnonzero(self.split == split)

    @property
    def pretrain_mask(self) -> np.ndarray:
        return self.split != TEST

    def header(self) -> dict:
        return dict(version=VERSION, root=str(self.root), layout=self.layout, classes=self.classes,
                    test_only_classes=self.test_only_classes, bad=self.bad, seconds=self.seconds,
                    list_name=LIST_NAME, list_size=self.list_size, n=len(self), test_dir=self.test_dir,
                    held_out_every=self.held_out_every)

    # ------------------------------------------------------------------------------------------------ save / load
    def write_pretrain_list(self, path: Path) -> int:
        """Write DALI's file_list of the pretraining files ("relpath label" lines, label 0 where there is none)
        atomically, 64k lines at a time (bounded memory); its size in bytes."""
        idx = np.flatnonzero(self.pretrain_mask)
        labels = np.maximum(self.labels, 0).tolist()
        if self._offsets is None:
            self._offsets = _split_blob(self.paths)
        starts, ends = self._offsets
        tmp = tmp_name(path)
        try:
            with open(tmp, "wb") as f:
                for lo in range(0, len(idx), 65536):
                    part = idx[lo:lo + 65536]
                    if len(part) and part[-1] - part[0] == len(part) - 1:  # contiguous: one slice of the blob
                        names = self.paths[starts[part[0]]:ends[part[-1]]].tobytes().split(b"\n")
                    else:
                        names = [self.paths[starts[i]:ends[i]].tobytes() for i in part.tolist()]
                    f.write(b"".join(b"%s %d\n" % (n, labels[i]) for n, i in zip(names, part.tolist())))
                f.flush()
                os.fsync(f.fileno())
                size = f.tell()
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return size

    def save(self, folder: Path) -> Path:
        """Write pretrain.list, then the manifest (each atomically; the manifest records the list's size last, so a
        reader never pairs a manifest with a list it did not write)."""
        self.list_size = self.write_pretrain_list(folder / LIST_NAME)
        arrays = dict(header=np.frombuffer(_utf8(json.dumps(self.header())), dtype=np.uint8), paths=self.paths,
                      split=self.split, labels=self.labels, sizes=self.sizes, mtimes=self.mtimes,
                      gray=self.gray, dirs=_blob(self.dirs), dir_mtimes=self.dir_mtimes)
        path = folder / MANIFEST_NAME
        save_npz_checked(path, arrays)
        self.location = folder
        return path

    @classmethod
    def load(cls, folder: Path) -> Manifest:
        """Read a manifest; ValueError (with the reason) when it is damaged or of another format version."""
        path = folder / MANIFEST_NAME
        try:
            z = load_npz_checked(path)
            header = json.loads(z["header"].tobytes().decode("utf-8", "surrogateescape"))
            if header.get("version") != VERSION:
                raise ValueError(f"format version {header.get('version')}, not {VERSION}")
            m = cls(Path(header["root"]), header["layout"], list(header["classes"]), z["paths"], z["split"],
                    z["labels"], z["sizes"], z["mtimes"], z["gray"], _strings(z["dirs"]), z["dir_mtimes"],
                    bad=header["bad"], test_only_classes=header["test_only_classes"],
                    seconds=header["seconds"], location=folder, list_size=int(header["list_size"]),
                    test_dir=str(header["test_dir"]), held_out_every=int(header["held_out_every"]))
        except (OSError, ValueError, KeyError, TypeError, EOFError) as e:
            raise ValueError(f"unreadable manifest ({type(e).__name__}: {e})") from None
        n = int(header["n"])
        if not (len(m.split) == len(m.labels) == len(m.sizes) == len(m.mtimes) == len(m.gray) == n
                and len(m.dirs) == len(m.dir_mtimes) and (n == 0 or int((m.paths == 10).sum()) == n - 1)):
            raise ValueError("inconsistent array lengths")
        return m

    # -------------------------------------------------------------------------------------------------- freshness
    def stale_reason(self, root: Path, sample: int | None = None) -> str | None:
        """None if the tree still matches (directories' mtimes, a sample of files), else what changed."""
        sample = SAMPLE_CHECK if sample is None else sample
        for rel, mtime in zip(self.dirs, self.dir_mtimes.tolist()):
            try:
                st = os.stat(root / rel if rel else root)
            except OSError:
                return f"folder {rel or '.'} is gone"
            if st.st_mtime_ns != mtime:
                return f"folder {rel or '.'} changed"
        listing = self.location / LIST_NAME if self.location else None
        if listing is None or not listing.is_file() or listing.stat().st_size != self.list_size:
            return f"{LIST_NAME} is missing or not the one written with the manifest"
        if len(self) and sample:
            idx = np.random.default_rng(0).choice(len(self), min(sample, len(self)), replace=False)
            changed = self.changed_files(root, idx)
            if changed:
                return f"file {self.path(changed[0])} changed"
        return None

    def changed_files(self, root: Path, idx: np.ndarray | None = None, threads: int = 8) -> list[int]:
        """Indices (among idx, default all) whose size or mtime differs from the manifest, or that are gone."""
        idx = np.arange(len(self)) if idx is None else np.asarray(idx)
        root_s = str(root)

        def run(chunk: np.ndarray) -> list[int]:
            out = []
            for i in chunk.tolist():
                try:
                    st = os.stat(os.path.join(root_s, self.path(i)))
                except OSError:
                    out.append(i)
                    continue
                if st.st_size != self.sizes[i] or st.st_mtime_ns != self.mtimes[i]:
                    out.append(i)
            return out

        chunks = np.array_split(idx, max(1, len(idx) // 4096))
        with ThreadPoolExecutor(threads) as ex:
            return sorted(i for part in ex.map(run, chunks) for i in part)


def verify_files(location: Path, root: Path) -> list[list[str]]:
    """Compare every file's size and mtime with the manifest (the check the start-up sample leaves to later), in a
    subprocess (a million stat calls in a thread would hold the GIL the training loop needs).

    When a file changed, the manifest is removed (the next run rescans) and the changed files are checked again;
    returns [relpath, reason] of those that are now bad."""
    out = subprocess.run([sys.executable, "-m", "fastbyol.data.check_worker", "--verify", str(location)],
                         capture_output=True, check=False)
    if out.returncode != 0:
        return []  # the manifest went away or changed meanwhile: nothing to say about this run's files
    changed = json.loads(out.stdout.decode("utf-8", "surrogateescape"))
    if not changed:
        return []
    with file_lock(location / "manifest.lock"):
        (location / MANIFEST_NAME).unlink(missing_ok=True)
    sizes, mtimes, _, problems, unproven = check_files(str(root), changed)
    problems += _decode_unproven(str(root), changed, sizes, mtimes, unproven, location)
    return [[changed[j], why] for j, why in sorted(problems)]


# ---------------------------------------------------------------------------------------------------- the scan
def _walk(root: str, rel: str, files: list[str], dirs: list[tuple[str, int]], bad: list[list]) -> None:
    """Append the files below root/rel (sorted, component-wise, hidden entries left out) and the directories."""
    path = os.path.join(root, rel) if rel else root
    dirs.append((rel, os.stat(path).st_mtime_ns))
    with os.scandir(path) as it:
        entries = sorted((e.name, e.is_dir(follow_symlinks=False)) for e in it if not e.name.startswith("."))
    for name, is_dir in entries:
        r = f"{rel}/{name}" if rel else name
        if is_dir:
            _walk(root, r, files, dirs, bad)
        elif "\n" in name:  # cannot be a line of DALI's file list
            bad.append([r, "its name holds a newline", -1, -1])
        else:
            files.append(r)


def check_files(root: str, rels: list[str], threads: int = 8) \
        -> tuple[np.ndarray, np.ndarray, np.ndarray, list, list]:
    """(sizes, mtimes, gray, [(index, reason)], [(index, why unproven)]) of files root/rel: stat and the structural
    check of checks.py; the unproven files (which pass) are for _decode_unproven."""
    sizes = np.full(len(rels), -1, np.int64)
    mtimes = np.full(len(rels), -1, np.int64)
    gray = np.zeros(len(rels), np.uint8)

    def run(lo: int, hi: int) -> tuple[list, list]:
        problems, unproven, folder, dfd = [], [], None, None
        try:
            for i in range(lo, hi):
                rel = rels[i]
                d, _, name = rel.rpartition("/")
                try:
                    if d != folder:  # open each folder once: one path component to look up per file, not five
                        if dfd is not None:
                            os.close(dfd)
                            dfd = None
                        folder = d
                        dfd = os.open(os.path.join(root, d), os.O_RDONLY | os.O_DIRECTORY)
                    fd = open_regular(name, dir_fd=dfd)  # a FIFO would block forever
                except OSError as e:
                    problems.append((i, f"unreadable ({e.strerror})"))
                    continue
                try:
                    st = os.fstat(fd)
                    sizes[i], mtimes[i] = st.st_size, st.st_mtime_ns
                    info: dict = {}
                    problem = check_fd(fd, st.st_size, os.path.splitext(name)[1], info=info)
                    gray[i] = info.get("gray", False)
                except OSError as e:
                    problem = f"unreadable ({e.strerror})"
                finally:
                    os.close(fd)
                if problem is not None:
                    problems.append((i, problem))
                elif "unproven" in info:
                    unproven.append((i, info["unproven"]))
        finally:
            if dfd is not None:
                os.close(dfd)
        return problems, unproven

    step = 2048
    with ThreadPoolExecutor(max(1, threads)) as ex:
        parts = list(ex.map(lambda lo: run(lo, min(lo + step, len(rels))), range(0, len(rels), step)))
    return sizes, mtimes, gray, [p for part, _ in parts for p in part], [u for _, part in parts for u in part]


def _decode_unproven(root: str, rels: list[str], sizes, mtimes, unproven: list, location: Path | None) -> list:
    """[(index, reason)] of the unproven files (check_files) that do not decode in the pre-flight decode
    (unproven.py); nothing to do, and no child started, when there are none."""
    if not unproven:
        return []
    from .unproven import prove

    idx = [i for i, _ in unproven]
    reasons = prove(root, [rels[i] for i in idx], [sizes[i] for i in idx], [mtimes[i] for i in idx], location)
    return [(i, f"{why} [pre-flight decode: {unproven_why}]")
            for (i, unproven_why), why in zip(unproven, reasons) if why is not None]


def _check_parallel(root: str, rels: list[str], workers: int, threads: int):
    if workers <= 1 or len(rels) < PARALLEL_MIN_FILES:
        return check_files(root, rels, threads)
    bounds = np.linspace(0, len(rels), workers + 1).astype(int)
    procs = []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        p = subprocess.Popen([sys.executable, "-m", "fastbyol.data.check_worker", root, str(threads)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        procs.append((lo, p))
    # feed every worker first (each reads all its input before working), then collect
    for (lo, p), hi in zip(procs, bounds[1:]):
        p.stdin.write(_utf8("\n".join(rels[lo:hi])))
        p.stdin.close()
    sizes, mtimes, grays, problems, unproven = [], [], [], [], []
    for lo, p in procs:
        n = int(np.frombuffer(p.stdout.read(8), "<i8")[0]) if p.stdout else 0
        s = np.frombuffer(p.stdout.read(8 * n), "<i8").astype(np.int64)
        m = np.frombuffer(p.stdout.read(8 * n), "<i8").astype(np.int64)
        g = np.frombuffer(p.stdout.read(n), np.uint8).copy()
        probs, unpr = json.loads(p.stdout.read().decode("utf-8", "surrogateescape"))
        if p.wait() != 0:
            raise FastByolError(f"{root}: a file-check worker failed (exit {p.returncode})")
        sizes.append(s)
        mtimes.append(m)
        grays.append(g)
        problems += [(lo + i, why) for i, why in probs]
        unproven += [(lo + i, why) for i, why in unpr]
    return np.concatenate(sizes), np.concatenate(mtimes), np.concatenate(grays), problems, unproven


def class_folders(root: Path) -> list[str]:
    """The class folders of a torchvision ImageFolder layout (ROOT/<class>/**, no train/ folder): the sorted
    non-hidden folders of the root, when there are at least two and no image lies in the root itself; else []."""
    from .checks import IMAGE_SUFFIXES

    with os.scandir(root) as it:
        entries = [(e.name, e.is_dir(follow_symlinks=False)) for e in it if not e.name.startswith(".")]
    if any(not d and os.path.splitext(n)[1].lower() in IMAGE_SUFFIXES for n, d in entries):
        return []
    folders = sorted(n for n, d in entries if d)
    return folders if len(folders) >= 2 else []


def held_out_every(n_files: int) -> int:
    """ImageFolder layout: every k-th image of each class (in sorted order) is the kNN test split, held out of
    pretraining: k = 10, or more above 100,000 images, so that about 10,000 are held out (HELD_OUT_MAX)."""
    return max(10, -(-n_files // HELD_OUT_MAX))


def _layout_units(root: Path, dirs: list) -> tuple[str, list[str], list[str], str, list]:
    """(layout, classes, test-only classes, the test folder's name, [(split, label, folder)] to walk)."""
    train_dir = root / "train"
    if not train_dir.is_dir():
        classes = class_folders(root)
        if not classes:
            return "unlabeled", [], [], "", [(TRAIN, -1, "")]
        dirs.append(("", os.stat(root).st_mtime_ns))
        return "classes", classes, [], "", [(TRAIN, k, c) for k, c in enumerate(classes)]
    dirs.append(("", os.stat(root).st_mtime_ns))
    classes = sorted(e.name for e in os.scandir(train_dir) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise FastByolError(f"{train_dir}: no class folders (expected train/<class>/<image>)")
    dirs.append(("train", os.stat(train_dir).st_mtime_ns))
    units = [(TRAIN, k, f"train/{c}") for k, c in enumerate(classes)]
    test_only, test_dir = [], next((n for n in TEST_FOLDERS if (root / n).is_dir()), "")
    if test_dir:  # test/, or ImageNet's val/ where there is no test/
        dirs.append((test_dir, os.stat(root / test_dir).st_mtime_ns))
        test_classes = sorted(e.name for e in os.scandir(root / test_dir) if e.is_dir()
                              and not e.name.startswith("."))
        index = {c: k for k, c in enumerate(classes)}
        test_only = [c for c in test_classes if c not in index]
        units += [(TEST, index.get(c, -1), f"{test_dir}/{c}") for c in test_classes]
    if (root / "unlabeled").is_dir():
        units.append((UNLABELED, -1, "unlabeled"))
    return "labeled", classes, test_only, test_dir, units


def scan(root: Path, workers: int | None = None, threads: int = 8, location: Path | None = None,
         hold_out: bool = True) -> Manifest:
    """List and check the folder: the manifest of it (not saved here). location: the manifest's folder (its
    decoded.json: the pre-flight decodes of unproven files already done). hold_out: an ImageFolder layout's kNN
    test split is held out of it (held_out_every); False when the test images come from elsewhere (--test-data)."""
    root_s = str(root)
    t0 = time.perf_counter()
    files: list[str] = []
    dirs: list[tuple[str, int]] = []
    bad: list[list] = []
    split_counts: list[tuple[int, int, int]] = []  # (split, label, number of files) runs, in file order
    layout, classes, test_only, test_dir, units = _layout_units(root, dirs)
    for split, label, rel in units:
        before = len(files)
        _walk(root_s, rel, files, dirs, bad)
        split_counts.append((split, label, len(files) - before))
    every = held_out_every(len(files)) if layout == "classes" and hold_out else 0
    runs = [np.full(n, s, np.uint8) for s, _, n in split_counts]
    for run in runs if every else []:
        run[every - 1::every] = TEST  # each class's every k-th file, in sorted order
    split = np.concatenate(runs or [np.zeros(0, np.uint8)])
    labels = np.concatenate([np.full(n, k, np.int32) for _, k, n in split_counts] or [np.zeros(0, np.int32)])
    t1 = time.perf_counter()
    workers = workers or min(8, len(os.sched_getaffinity(0)))
    sizes, mtimes, gray, problems, unproven = _check_parallel(root_s, files, workers, threads)
    problems = sorted(problems + _decode_unproven(root_s, files, sizes, mtimes, unproven, location))
    t2 = time.perf_counter()
    keep = np.ones(len(files), bool)
    for i, why in problems:
        keep[i] = False
        bad.append([files[i], why, int(sizes[i]), int(mtimes[i])])
    if problems:
        files = [f for f, k in zip(files, keep.tolist()) if k]
    paths = _blob(files)
    del files  # ~100 MB of str objects for 1.28M files
    return Manifest(root, layout, classes, paths, split[keep], labels[keep], sizes[keep], mtimes[keep],
                    gray[keep], [d for d, _ in dirs], np.array([m for _, m in dirs], np.int64), bad=bad,
                    test_only_classes=test_only, seconds=dict(listing=t1 - t0, checks=t2 - t1), test_dir=test_dir,
                    held_out_every=every)


# ---------------------------------------------------------------------------------------------------- location
def manifest_dir(root: Path, cache_dir: str | os.PathLike | None = None) -> Path:
    """ROOT/.fastbyol where it is already there and writable, or the folder is ours to write (this user's, writable:
    cache.ours_to_write); else CACHE/manifests/<hash of the root> (created)."""
    inside = root / ".fastbyol"
    if inside.is_dir() and os.access(inside, os.W_OK | os.X_OK):
        return inside
    if ours_to_write(root) and writable_dir(inside):
        return inside
    outside = cache_root(cache_dir) / "manifests" / path_key(root)
    if not writable_dir(outside):
        raise FastByolError(f"{root} is read-only and the cache folder {outside} cannot be written: "
                            "set FASTBYOL_CACHE to a writable folder")
    return outside


def obtain(root: Path, *, rank: int = 0, world_size: int = 1, barrier=None, cache_dir=None,
           workers: int | None = None, hold_out: bool = True) -> tuple[Manifest, dict, str]:
    """(manifest, startup seconds, status) for `root`: the manifest built, or read and checked fresh.

    seconds: listing (listing the tree, or reading and checking the manifest), checks (the per-file checks),
    index (writing the manifest and DALI's file list). status: "fresh", "built" or "rebuilt (why)".
    With a barrier and several ranks, rank 0 builds or checks it before the barrier and the others read it after;
    without one, every process takes the folder's lock in turn. A manifest that cannot be read is rebuilt; one
    whose root is another folder is refused (FastByolError naming it). hold_out: scan's (an ImageFolder layout's
    manifest made with the other choice is rebuilt)."""
    root = root.resolve()
    folder = manifest_dir(root, cache_dir)
    if barrier is not None and world_size > 1:
        if rank == 0:
            result = _obtain_locked(root, folder, workers, hold_out)
        barrier()
        if rank != 0:
            result = _obtain_locked(root, folder, workers, hold_out)
        return result
    return _obtain_locked(root, folder, workers, hold_out)


def _obtain_locked(root: Path, folder: Path, workers, hold_out: bool = True) -> tuple[Manifest, dict, str]:
    with file_lock(folder / "manifest.lock"):
        t0 = time.perf_counter()
        man, why = None, None
        if (folder / MANIFEST_NAME).exists():
            try:
                man = Manifest.load(folder)
            except ValueError as e:
                why = str(e)
            else:
                if man.root != root:
                    raise FastByolError(f"{folder / MANIFEST_NAME}: a manifest of {man.root}, not of {root} "
                                        "(copied with the data?): delete it to rescan")
                why = man.stale_reason(root)
                if why is None and man.layout == "classes" and bool(man.held_out_every) != hold_out:
                    why = "the kNN test split is " + ("held out now" if hold_out else "another folder now")
                if why is None:
                    return man, dict(listing=time.perf_counter() - t0, checks=0.0, index=0.0), "fresh"
        remove_stale_tmp(folder)
        man = scan(root, workers, location=folder, hold_out=hold_out)
        t1 = time.perf_counter()
        man.save(folder)
        seconds = dict(man.seconds, index=time.perf_counter() - t1)
        return man, seconds, "built" if why is None else f"rebuilt ({why})"
