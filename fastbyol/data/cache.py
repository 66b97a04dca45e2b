"""Where fastbyol keeps what it derives from data (manifests, DALI file lists, tar indexes, synthetic images), and how
it writes them: whole or not at all.

The cache folder is, in order: the `cache_dir` argument, `$FASTBYOL_CACHE`, `$XDG_CACHE_HOME/fastbyol`,
`~/.cache/fastbyol`. Everything is written to a temporary name in the destination folder and renamed into place
(`os.replace` is atomic on POSIX), so a killed process leaves at most a `*.tmp-PID` file, which the next writer of
the same folder removes when that process is gone.
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import os
import shutil
import zipfile
import zlib
from contextlib import contextmanager
from pathlib import Path

import numpy as np

TMP_MARK = ".tmp-"


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """The cache folder (not created here)."""
    if cache_dir:
        return Path(cache_dir).expanduser()
    if os.environ.get("FASTBYOL_CACHE"):
        return Path(os.environ["FASTBYOL_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "fastbyol"


def path_key(path: Path) -> str:
    """A short stable name for a resolved path: the cache sub-folder of a read-only dataset."""
    return hashlib.sha1(os.fsencode(str(path))).hexdigest()[:16]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def remove_stale_tmp(folder: Path) -> int:
    """Remove `*.tmp-PID` files and folders in `folder` whose process is gone; the number removed."""
    removed = 0
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return 0
    for e in entries:
        head, mark, pid = e.name.rpartition(TMP_MARK)
        if not mark or not pid.isdigit() or _pid_alive(int(pid)):
            continue
        try:
            shutil.rmtree(e.path) if e.is_dir(follow_symlinks=False) else os.unlink(e.path)
            removed += 1
        except OSError:
            pass
    return removed


def tmp_name(path: Path) -> Path:
    """The temporary sibling of `path` that this process writes before renaming."""
    return path.with_name(f"{path.name}{TMP_MARK}{os.getpid()}")


def atomic_write(path: Path, write) -> None:
    """`write(f)` into a temporary sibling of `path`, then fsync and rename: `path` is whole or untouched."""
    tmp = tmp_name(path)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path, data: bytes | memoryview) -> None:
    """Write `data` to `path` whole (temporary file, fsync, rename) or not at all."""
    atomic_write(path, lambda f: f.write(data))


@contextmanager
def file_lock(path: Path):
    """An exclusive OS lock on `path` (created if missing), held for the `with` block; released if the process dies.

    Processes that build the same derived file (every rank of a torchrun job without a barrier) take it in turn: the
    first builds, the others find the result fresh."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def writable_dir(folder: Path) -> bool:
    """Whether `folder` exists (or can be created) and this process may create files in it."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return os.access(folder, os.W_OK | os.X_OK)


def ours_to_write(folder: Path) -> bool:
    """Whether fastbyol may keep its derived files inside a data folder: the folder belongs to this user and is
    writable. A folder shared by others (a cluster's /datasets, owned by another user even where it is
    group-writable) gets them in the cache folder instead."""
    try:
        owner = os.stat(folder).st_uid
    except OSError:
        return False
    return owner == os.geteuid() and os.access(folder, os.W_OK | os.X_OK)


def _crc(arrays: dict) -> int:
    crc = 0
    for k in sorted(arrays):
        crc = zlib.crc32(k.encode(), crc)
        crc = zlib.crc32(np.ascontiguousarray(arrays[k]).view(np.uint8).reshape(-1).data, crc)
    return crc


def save_npz_checked(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """An uncompressed .npz with a CRC-32 of every array ("_crc"), written atomically (fsync, rename).

    numpy reads a member without reaching its end, so the zip's own CRCs are never checked: this one is."""
    atomic_write(path, lambda f: np.savez(f, _crc=np.array([_crc(arrays)], np.uint32), **arrays))


def load_npz_checked(path: Path) -> dict[str, np.ndarray]:
    """Every array of a save_npz_checked file; ValueError when it is unreadable or its CRC does not match."""
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, io.UnsupportedOperation) as e:
        raise ValueError(f"unreadable ({type(e).__name__}: {e})") from None
    crc = arrays.pop("_crc", None)
    if crc is None or crc.shape != (1,) or int(crc[0]) != _crc(arrays):
        raise ValueError("checksum mismatch (damaged)")
    return arrays
