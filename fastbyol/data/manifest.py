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
  sizes       (N,) int64 bytes;  mtimes, ctimes (N,) int64 ns;  inodes (N,) int64: each file's identity
              (cache.identity: a file rewritten with its size and mtime kept still changes its ctime)
  gray        (N,) uint8: 1 where the image has one grey channel
  dirs        uint8 blob: every listed directory, relative ("" is the root);  dir_ids (D, 3) int64: its mtime,
              inode and ctime
Files the header check passes but cannot prove safe (checks.py's "unproven") are decoded once during the scan, in a
child process (unproven.py): those that fail are bad files; `decoded.json` beside the manifest keeps every result by
identity for the next scan.
Beside it, `pretrain.list`: the pretraining files (train + unlabeled) as DALI's `file_list` ("relpath label" lines),
which each rank's DALI reader reads itself: no process holds a Python list of a million paths.

Freshness (when a manifest is read): its root must be this folder (a manifest of another tree is refused, naming
it); every recorded directory's mtime, inode and ctime must be unchanged (catches files and folders added, removed or
renamed anywhere in the tree, since each changes its parent directory's mtime and ctime); and the identity (size,
mtime, inode, ctime) of a fixed sample of up to 10,000 files must match. Any difference rescans. A file rewritten in
place outside that sample changes no directory: `verify_files()` compares every file's identity, and the dataset runs
it in the background on rank 0 after the kNN images (a difference there marks the manifest stale for the next run
and re-checks the changed files; one that is now bad stops the run with one line). A manifest copied with the data
(`cp -r`, `rsync`) has other inodes and ctimes than the copy: it is rebuilt, never trusted.

Where it lives: `ROOT/.fastbyol/` when this user owns the folder or can make it (hidden, so never listed as data),
else `CACHE/manifests/<hash of the resolved root>/` (cache.py: `--cache-dir`/`$FASTBYOL_CACHE`/`~/.cache/fastbyol`):
a dataset folder shared by others is never written.
For a read-only folder shared by several nodes, point `$FASTBYOL_CACHE` at a shared folder, or each node's first
process builds its own copy.

Who builds it: rank 0, under an OS lock on `manifest.lock`; with a barrier (torchrun), the other ranks wait at
it and then read; without one, they queue on the lock and find the manifest fresh.

Checks run in `workers` subprocesses (`python -m fastbyol.data.check_worker`): Python's per-file work (about 17 us:
open, fstat, two preads, the JPEG header walk of checks.py) needs processes to use several cores. Each worker checks
its first chunk of files in one thread and keeps to one thread while the files come from memory (the page cache):
there, threads only contend for the interpreter's lock, at 3-4 times the CPU a file. When that chunk blocked on
reads (a cold disk, a network filesystem: the thread's voluntary context switches), the rest goes over `threads`
threads, whose waits overlap. The start-up sample's identity check (`changed_files`) does the same.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np

from ..errors import FastByolError
from ..system.children import child_command, child_env, ctrl_c_interrupts, stopped_by_signal
from .dataset import MAX_CLASSES
from .cache import (TMP_MARK, cache_root, file_lock, identity, load_npz_checked, own_cache_inside, path_key,
                    remove_stale_tmp, save_npz_checked, tmp_name, writable_dir)
from .checks import check_fd, open_regular_stat

VERSION = 4  # the layouts (train/, ROOT/<class>/ with a held-out share, val/ as test/), file and folder identities
MANIFEST_NAME = "manifest.npz"
LIST_NAME = "pretrain.list"
TRAIN, TEST, UNLABELED = 0, 1, 2
TEST_FOLDERS = ("test", "val")  # the labelled layout's test split: test/, else val/ (ImageNet's)
HELD_OUT_MAX = 10_000  # the ImageFolder layout holds out about this many images at most (held_out_every)
SAMPLE_CHECK = 10_000  # files whose size and mtime are compared at every start
PARALLEL_MIN_FILES = 20_000  # below this, checks run in this process (a subprocess costs ~0.3 s to start)


# what a relative path inside the root never holds, in a "\n"-framed blob: an absolute path, a ".." component, an
# empty component (which would make the next one absolute to some readers), a NUL
_ESCAPES = (b"\n/", b"\n../", b"/../", b"/..\n", b"\n..\n", b"//", b"/\n", b"\n\n", b"\0")


def path_bytes(s: str) -> bytes:
    """A path as bytes that decode back to the same str (UTF-8, undecodable bytes kept by surrogateescape)."""
    return s.encode("utf-8", "surrogateescape")


def _blob(strings: list[str]) -> np.ndarray:
    return np.frombuffer(path_bytes("\n".join(strings)), dtype=np.uint8)


def _split_blob(blob: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(starts, ends) of the "\\n"-separated strings in a uint8 blob."""
    cuts = np.flatnonzero(blob == 10)
    starts = np.concatenate([[0], cuts + 1]).astype(np.int64)
    ends = np.concatenate([cuts, [len(blob)]]).astype(np.int64)
    return starts, ends


def blob_strings(blob: np.ndarray) -> list[str]:
    """The "\\n"-separated strings of a uint8 blob (the inverse of _blob)."""
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
    inodes: np.ndarray  # (N,) int64 (cache.identity)
    ctimes: np.ndarray  # (N,) int64 ns
    gray: np.ndarray  # (N,) uint8: 1 where the image is stored with one grey channel
    dirs: list[str]
    dir_ids: np.ndarray  # (D, 3) int64: mtime ns, inode, ctime ns
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
        arrays = dict(header=np.frombuffer(path_bytes(json.dumps(self.header())), dtype=np.uint8), paths=self.paths,
                      split=self.split, labels=self.labels, sizes=self.sizes, mtimes=self.mtimes, inodes=self.inodes,
                      ctimes=self.ctimes, gray=self.gray, dirs=_blob(self.dirs), dir_ids=self.dir_ids)
        path = folder / MANIFEST_NAME
        save_npz_checked(path, arrays)
        self.location = folder
        return path

    @classmethod
    def load(cls, folder: Path) -> Manifest:
        """Read a manifest; ValueError (with the reason) when it is damaged, of another format version, or holds what
        no scan writes (a path outside the root, a label past its classes): a cache is checked, never trusted."""
        path = folder / MANIFEST_NAME
        try:
            z = load_npz_checked(path)
            header = json.loads(z["header"].tobytes().decode("utf-8", "surrogateescape"))
            if header.get("version") != VERSION:
                raise ValueError(f"format version {header.get('version')}, not {VERSION}")
            m = cls(Path(header["root"]), header["layout"], list(header["classes"]), z["paths"], z["split"],
                    z["labels"], z["sizes"], z["mtimes"], z["inodes"], z["ctimes"], z["gray"],
                    blob_strings(z["dirs"]), z["dir_ids"], bad=header["bad"],
                    test_only_classes=header["test_only_classes"], seconds=header["seconds"], location=folder,
                    list_size=int(header["list_size"]), test_dir=str(header["test_dir"]),
                    held_out_every=int(header["held_out_every"]))
            n = header["n"]
            problem = m._problem(n)
        except (OSError, ValueError, KeyError, TypeError, EOFError, AttributeError, RecursionError) as e:
            raise ValueError(f"unreadable manifest ({type(e).__name__}: {e})") from None
        if problem is not None:
            raise ValueError(problem)
        return m

    def _problem(self, n) -> str | None:
        """What no scan writes, or None: arrays of other lengths or kinds, labels outside -1..classes - 1, splits other
        than train/test/unlabeled, and paths that leave the root (absolute, a '..' component, an empty one)."""
        from .dataset import MAX_CLASSES

        arrays = (self.split, self.labels, self.sizes, self.mtimes, self.inodes, self.ctimes, self.gray)
        if not isinstance(n, int) or isinstance(n, bool) or any(a.ndim != 1 or len(a) != n for a in arrays) \
                or any(a.dtype.kind not in "iu" for a in arrays) or self.paths.dtype != np.uint8:
            return "inconsistent array lengths"
        if self.dir_ids.shape != (len(self.dirs), 3) or self.layout not in ("labeled", "classes", "unlabeled") \
                or not all(isinstance(c, str) for c in self.classes) or len(self.classes) > MAX_CLASSES:
            return "inconsistent folder records or classes"
        if n and (int(self.labels.min()) < -1 or int(self.labels.max()) >= len(self.classes)
                  or int(self.split.max()) > UNLABELED or int(self.gray.max()) > 1):
            return "labels or splits out of range"
        if n and self._escapes():
            return "a path that leaves the dataset's folder"
        return None

    def _escapes(self) -> bool:
        """Whether a path is absolute, empty or has a '..' component (what no scan writes), or the blob does not hold
        n paths: a few passes over the bytes, at every start."""
        starts, ends = self._offsets = _split_blob(self.paths)
        if len(starts) != len(self.split) or (ends <= starts).any() or (self.paths[starts] == ord("/")).any():
            return True
        raw = self.paths.tobytes()
        at = raw.find(b"..")
        while at >= 0:  # rare in real names: each found one is checked for being a whole component
            if (at == 0 or raw[at - 1] in b"/\n") and (at + 2 == len(raw) or raw[at + 2] in b"/\n"):
                return True
            at = raw.find(b"..", at + 1)
        return b"\0" in raw

    # -------------------------------------------------------------------------------------------------- freshness
    def stale_reason(self, root: Path, sample: int | None = None) -> str | None:
        """None if the tree still matches (directories' mtimes, inodes and ctimes, the identity of a sample of files),
        else what changed."""
        sample = SAMPLE_CHECK if sample is None else sample
        for rel, ids in zip(self.dirs, self.dir_ids.tolist()):
            try:
                st = os.stat(root / rel if rel else root)
            except OSError:
                return f"folder {rel or '.'} is gone"
            if list(_dir_id(st)) != ids:
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
        """Indices (among idx, default all) whose identity (size, mtime, inode, ctime) differs from the manifest's, or
        that are gone."""
        idx = np.arange(len(self)) if idx is None else np.asarray(idx)
        root_s = str(root)
        arrays = (self.sizes, self.mtimes, self.inodes, self.ctimes)

        def run(lo: int, hi: int) -> list[int]:
            out, chunk = [], idx[lo:hi]
            recorded = list(zip(*(a[chunk].tolist() for a in arrays)))  # this chunk's identities, as tuples
            for i, ids in zip(chunk.tolist(), recorded):
                try:
                    st = os.stat(os.path.join(root_s, self.path(i)))
                except OSError:
                    out.append(i)
                    continue
                if identity(st) != ids:
                    out.append(i)
            return out

        return sorted(i for part in over_threads(run, list(range(0, len(idx), 2048)) + [len(idx)], threads)
                      for i in part)


def over_threads(run, bounds: list[int], threads: int) -> list:
    """[run(lo, hi) for each range of `bounds`], the first range timed in this thread: the rest stays in this thread
    when it did not wait on I/O (at most one blocking wait in 16 calls: files in the page cache), else goes over
    `threads` threads (a cold disk, a network filesystem). See the module's docstring."""
    ranges = list(zip(bounds[:-1], bounds[1:]))
    if not ranges:
        return []
    before = _blocking_waits()
    first = run(*ranges[0])
    waits = _blocking_waits() - before
    rest = ranges[1:]
    if threads <= 1 or not rest or waits * 16 <= ranges[0][1] - ranges[0][0]:
        return [first, *(run(lo, hi) for lo, hi in rest)]
    with ThreadPoolExecutor(threads) as ex:
        return [first, *ex.map(lambda r: run(*r), rest)]


def _blocking_waits() -> int:
    """This thread's voluntary context switches so far (Linux, macOS: per-thread usage; elsewhere the process's)."""
    import resource

    return resource.getrusage(getattr(resource, "RUSAGE_THREAD", resource.RUSAGE_SELF)).ru_nvcsw


def _dir_id(st: os.stat_result) -> tuple[int, int, int]:
    """A folder's (mtime, inode, ctime): what changes when an entry is added, removed or renamed in it (its mtime can
    be set back by hand, its ctime cannot) or when it is replaced."""
    _, mtime, ino, ctime = identity(st)
    return mtime, ino, ctime


def verify_files(location: Path, root: Path) -> list[list[str]]:
    """Compare every file's identity with the manifest's (the check the start-up sample leaves to later), in a
    subprocess (a million stat calls in a thread would hold the GIL the training loop needs).

    When a file changed, the manifest is removed (the next run rescans) and the changed files are checked again;
    returns [relpath, reason] of those that are now bad."""
    out = subprocess.run(child_command("--verify", str(location)), capture_output=True, check=False,
                         env=child_env())
    if out.returncode != 0:
        return []  # the manifest went away or changed meanwhile: nothing to say about this run's files
    changed = json.loads(out.stdout.decode("utf-8", "surrogateescape"))
    if not changed:
        return []
    with file_lock(location / "manifest.lock"):  # decoded.json beside the manifest is written under its lock too
        (location / MANIFEST_NAME).unlink(missing_ok=True)
        checked = check_files(str(root), changed)
        problems = checked.problems + _decode_unproven(str(root), changed, checked, location)
    return [[changed[j], why] for j, why in sorted(problems)]


# ---------------------------------------------------------------------------------------------------- the scan
def _walk(root: str, rel: str, files: list[str], dirs: list[tuple[str, tuple]], bad: list[list]) -> None:
    """Append the files below root/rel (sorted, component-wise, hidden entries left out) and the directories."""
    path = os.path.join(root, rel) if rel else root
    dirs.append((rel, _dir_id(os.stat(path))))
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


class Checked(NamedTuple):
    """check_files' result for N files."""

    ids: np.ndarray  # (N, 4) int64: cache.identity (size, mtime, inode, ctime) when opened; -1 where unreadable
    gray: np.ndarray  # (N,) uint8
    problems: list  # [(index, reason)] of the files that are bad
    unproven: list  # [(index, why)] of the files that pass unproven (for _decode_unproven)


def check_files(root: str, rels: list[str], threads: int = 8) -> Checked:
    """Identity and the structural check of checks.py of files root/rel (each opened once, its folder once per run
    of files in it); the unproven files (which pass) are for _decode_unproven."""
    ids = np.full((len(rels), 4), -1, np.int64)
    gray = np.zeros(len(rels), np.uint8)

    def run(lo: int, hi: int) -> tuple[list, list]:
        problems, unproven, folder, dfd = [], [], None, None
        opened, identities = [], []  # written into `ids` once per chunk: a numpy row write per file costs a us
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
                    fd, st = open_regular_stat(name, dir_fd=dfd)  # a FIFO would block forever
                except OSError as e:
                    problems.append((i, f"unreadable ({e.strerror})"))
                    continue
                try:
                    opened.append(i)
                    identities.append(identity(st))
                    info: dict = {}
                    problem = check_fd(fd, st.st_size, name[name.rfind("."):] if "." in name else "", info=info)
                    if info.get("gray"):
                        gray[i] = 1
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
            if opened:
                ids[opened] = identities
        return problems, unproven

    parts = over_threads(run, list(range(0, len(rels), 2048)) + [len(rels)], threads)
    return Checked(ids, gray, [p for part, _ in parts for p in part], [u for _, part in parts for u in part])


def _decode_unproven(root: str, rels: list[str], checked: Checked, location: Path | None) -> list:
    """[(index, reason)] of the unproven files (check_files) that do not decode in the pre-flight decode
    (unproven.py); nothing to do, and no child started, when there are none."""
    if not checked.unproven:
        return []
    from .unproven import prove

    idx = [i for i, _ in checked.unproven]
    reasons = prove(root, [rels[i] for i in idx], checked.ids[idx], location)
    return [(i, f"{why} [pre-flight decode: {unproven_why}]")
            for (i, unproven_why), why in zip(checked.unproven, reasons) if why is not None]


def _run_checkers(root: str, rels: list[str], bounds, threads: int, procs: list) -> list[bytes]:
    """Start one file-check worker per range of `bounds` (appended to `procs` as (first index, process)), feed each
    its paths, and return what each wrote (its exit status in the process)."""
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        p = subprocess.Popen(child_command(root, str(threads)), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             env=child_env())
        procs.append((lo, p))
    # feed every worker first (each reads all its input before working), then collect
    for (lo, p), hi in zip(procs, bounds[1:]):
        p.stdin.write(path_bytes("\n".join(rels[lo:hi])))
        p.stdin.close()
    outs = [p.stdout.read() for _, p in procs]
    for _, p in procs:
        p.wait()
    return outs


def _check_parallel(root: str, rels: list[str], workers: int, threads: int) -> Checked:
    if workers <= 1 or len(rels) < PARALLEL_MIN_FILES:
        return check_files(root, rels, threads)
    bounds = np.linspace(0, len(rels), workers + 1).astype(int)
    procs = []
    with ctrl_c_interrupts():
        try:
            outs = _run_checkers(root, rels, bounds, threads, procs)
        finally:  # an interrupt or a failed worker: the others are not left running
            for _, p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
    ids, grays, problems, unproven = [], [], [], []
    for (lo, p), out in zip(procs, outs):
        stopped_by_signal(p.returncode, f"{root}: a file-check worker")
        if p.returncode != 0 or len(out) < 8:
            raise FastByolError(f"{root}: a file-check worker failed (exit {p.returncode})")
        n = int(np.frombuffer(out[:8], "<i8")[0])
        ids.append(np.frombuffer(out[8:8 + 32 * n], "<i8").astype(np.int64).reshape(n, 4))
        grays.append(np.frombuffer(out[8 + 32 * n:8 + 33 * n], np.uint8).copy())
        probs, unpr = json.loads(out[8 + 33 * n:].decode("utf-8", "surrogateescape"))
        problems += [(lo + i, why) for i, why in probs]
        unproven += [(lo + i, why) for i, why in unpr]
    return Checked(np.concatenate(ids), np.concatenate(grays), problems, unproven)


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


def _check_class_count(folder: Path, classes: list[str]) -> None:
    if len(classes) > MAX_CLASSES:
        raise FastByolError(f"{folder}: {len(classes)} class folders, more than fastbyol takes (at most "
                            f"{MAX_CLASSES})")


def _layout_units(root: Path, dirs: list) -> tuple[str, list[str], list[str], str, list]:
    """(layout, classes, test-only classes, the test folder's name, [(split, label, folder)] to walk)."""
    train_dir = root / "train"
    if not train_dir.is_dir():
        classes = class_folders(root)
        if not classes:
            return "unlabeled", [], [], "", [(TRAIN, -1, "")]
        _check_class_count(root, classes)
        dirs.append(("", _dir_id(os.stat(root))))
        return "classes", classes, [], "", [(TRAIN, k, c) for k, c in enumerate(classes)]
    dirs.append(("", _dir_id(os.stat(root))))
    classes = sorted(e.name for e in os.scandir(train_dir) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise FastByolError(f"{train_dir}: no class folders (expected train/<class>/<image>)")
    _check_class_count(train_dir, classes)
    dirs.append(("train", _dir_id(os.stat(train_dir))))
    units = [(TRAIN, k, f"train/{c}") for k, c in enumerate(classes)]
    test_only, test_dir = [], next((n for n in TEST_FOLDERS if (root / n).is_dir()), "")
    if test_dir:  # test/, or ImageNet's val/ where there is no test/
        dirs.append((test_dir, _dir_id(os.stat(root / test_dir))))
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
    dirs: list[tuple[str, tuple]] = []
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
    checked = _check_parallel(root_s, files, workers, threads)
    problems = sorted(checked.problems + _decode_unproven(root_s, files, checked, location))
    t2 = time.perf_counter()
    keep = np.ones(len(files), bool)
    ids = checked.ids
    for i, why in problems:
        keep[i] = False
        bad.append([files[i], why, int(ids[i, 0]), int(ids[i, 1])])
    if problems:
        files = [f for f, k in zip(files, keep.tolist()) if k]
    paths = _blob(files)
    del files  # ~100 MB of str objects for 1.28M files
    ids = ids[keep]
    return Manifest(root, layout, classes, paths, split[keep], labels[keep], ids[:, 0].copy(), ids[:, 1].copy(),
                    ids[:, 2].copy(), ids[:, 3].copy(), checked.gray[keep], [d for d, _ in dirs],
                    np.array([list(i) for _, i in dirs], np.int64).reshape(-1, 3), bad=bad,
                    test_only_classes=test_only, seconds=dict(listing=t1 - t0, checks=t2 - t1), test_dir=test_dir,
                    held_out_every=every)


# ---------------------------------------------------------------------------------------------------- location
def manifest_dir(root: Path, cache_dir: str | os.PathLike | None = None) -> Path:
    """ROOT/.fastbyol if this user owns it or can make it (cache.own_cache_inside), else CACHE/manifests/<hash of
    the root> (created)."""
    inside = own_cache_inside(root)
    if inside is not None:
        return inside
    outside = cache_root(cache_dir) / "manifests" / path_key(root)
    if not writable_dir(outside):
        raise FastByolError(f"{root} is read-only and the cache folder {outside} cannot be written: "
                            "set FASTBYOL_CACHE to a writable folder")
    return outside


_PRESCANS: dict[str, str] = {}  # resolved folder -> the token of the prescan this process started for it


def end_prescan(child: subprocess.Popen) -> None:
    """Stop the prescan (done long before, unless the run stopped before it read its data) and remove the stamp it
    may have left for a process that checked the manifest itself."""
    child.terminate()
    child.wait()
    token = child.args[-1]
    for root, mine in list(_PRESCANS.items()):
        if mine == token:
            del _PRESCANS[root]
    try:
        folder = manifest_dir(Path(child.args[-2]).resolve())
        (folder / _stamp_name(token)).unlink(missing_ok=True)
    except (OSError, FastByolError):
        pass


def start_prescan(root: Path) -> subprocess.Popen:
    """Start building (or checking) the manifest of the image folder `root` in a child process (`check_worker
    --manifest`), so that the listing and the per-file checks run while the trainer's process loads torch and DALI
    (three seconds of one core on a 2-core machine); `obtain` then waits for the child on the manifest's lock and
    reads what it wrote (or trusts the child's check of a fresh one). The child's failures are silent: `obtain` meets
    them itself and says them in one line. end_prescan stops it."""
    token = f"{os.getpid()}-{secrets.token_hex(8)}"  # this run's: what the child writes for it, nobody else
    child = subprocess.Popen(child_command("--manifest", str(root), token), stdin=subprocess.DEVNULL,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=child_env())
    _PRESCANS[str(Path(root).resolve())] = token
    return child


def obtain(root: Path, *, rank: int = 0, world_size: int = 1, barrier=None, cache_dir=None,
           workers: int | None = None, hold_out: bool = True, built_for: str | None = None
           ) -> tuple[Manifest, dict, str]:
    """(manifest, startup seconds, status) for `root`: the manifest built, or read and checked fresh.

    seconds: listing (listing the tree, or reading and checking the manifest), checks (the per-file checks),
    index (writing the manifest and DALI's file list). status: "fresh", "built" or "rebuilt (why)".
    With a barrier and several ranks, rank 0 builds or checks it before the barrier and the others read it after;
    without one, every process takes the folder's lock in turn. A manifest that cannot be read is rebuilt; one
    whose root is another folder is refused (FastByolError naming it). hold_out: scan's (an ImageFolder layout's
    manifest made with the other choice is rebuilt). built_for: the token of the prescan building it (start_prescan;
    recorded with its seconds or in a stamp: the process that started it reads the manifest as built for it, or
    checked fresh, without checking it again)."""
    root = root.resolve()
    folder = manifest_dir(root, cache_dir)
    if barrier is not None and world_size > 1:
        if rank == 0:
            result = _obtain_locked(root, folder, workers, hold_out)
        barrier()
        if rank != 0:
            result = _obtain_locked(root, folder, workers, hold_out)
        return result
    return _obtain_locked(root, folder, workers, hold_out, built_for)


def _obtain_locked(root: Path, folder: Path, workers, hold_out: bool = True,
                   built_for: str | None = None) -> tuple[Manifest, dict, str]:
    asked = time.perf_counter()
    with ExitStack() as held:
        with ctrl_c_interrupts():  # the wait may be for this process's prescan child: Ctrl-C ends the command
            held.enter_context(file_lock(folder / "manifest.lock"))
        t0 = time.perf_counter()
        waited = t0 - asked  # another process (the prescan) held the lock meanwhile
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
                token = _PRESCANS.pop(str(root), None)  # the prescan this process started for this folder
                mine = token is not None and man.seconds.get("for") == token  # it built the manifest for this run
                why = None if mine or _verified_for(folder, token) else man.stale_reason(root)
                if why is None and man.layout == "classes" and bool(man.held_out_every) != hold_out:
                    why = "the kNN test split is " + ("held out now" if hold_out else "another folder now")
                if why is None and mine:
                    seconds = {k: v for k, v in man.seconds.items() if k != "for"}
                    return man, dict(seconds, index=0.0, waited=waited), "built while fastbyol loaded"
                if why is None:
                    if built_for is not None:  # the prescan: the process it runs for need not check again
                        _stamp_verified(folder, built_for)
                    return man, dict(listing=time.perf_counter() - t0, checks=0.0, index=0.0), "fresh"
        remove_stale_tmp(folder)
        man = scan(root, workers, location=folder, hold_out=hold_out)
        if built_for is not None:
            man.seconds["for"] = built_for
        t1 = time.perf_counter()
        man.save(folder)
        seconds = dict(man.seconds, index=time.perf_counter() - t1)
        return man, seconds, "built" if why is None else f"rebuilt ({why})"


def _stamp_name(token: str) -> str:
    pid = token.partition("-")[0]
    return f"verified-{token}{TMP_MARK}{pid}"  # a leftover goes with its process (cache.remove_stale_tmp)


def _stamp_verified(folder: Path, token: str) -> None:
    """Record, for the prescan `token`, that the manifest as it is now (its inode, size, mtime) was checked fresh."""
    try:
        st = os.stat(folder / MANIFEST_NAME)
        (folder / _stamp_name(token)).write_text(f"{st.st_ino} {st.st_size} {st.st_mtime_ns}")
    except OSError:
        pass


def _verified_for(folder: Path, token: str | None) -> bool:
    """Whether the prescan `token` (started by this process) checked this very manifest fresh moments ago (its
    stamp, which is used once and removed)."""
    if token is None or not re.fullmatch(r"[0-9]+-[0-9a-f]{16}", token):
        return False
    stamp = folder / _stamp_name(token)
    try:
        recorded = stamp.read_text()
        stamp.unlink()
        st = os.stat(folder / MANIFEST_NAME)
    except OSError:
        return False
    return recorded == f"{st.st_ino} {st.st_size} {st.st_mtime_ns}"
