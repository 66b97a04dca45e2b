"""Where fastbyol keeps what it derives from data (manifests, DALI file lists, tar indexes, synthetic images), and how
it writes them: whole or not at all.

Whose it is: a derived file is trusted only as a record of the files it was made from, and only where this user made
it. `identity(stat)` is what tells a data file's contents apart without reading them: size and mtime (which `cp -p`,
`rsync -t` and `tar x` carry over to a rewritten file) and inode and ctime (which no user can set, and which change when
a file is rewritten or replaced); every cache records it per file and is stale when any part differs. A cache folder
inside the data (ROOT/.fastbyol) is used only when this user owns it (`own_folder`); else the cache folder below is.

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
import re
import shutil
import stat
import tempfile
import weakref
import zipfile
import zlib
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from ..system.paths import fit_name

TMP_MARK = ".tmp-"


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """The cache folder (not created here)."""
    if cache_dir:
        return Path(cache_dir).expanduser()
    if os.environ.get("FASTBYOL_CACHE"):
        return Path(os.environ["FASTBYOL_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "fastbyol"


def identity(st: os.stat_result) -> tuple[int, int, int, int]:
    """(size, mtime_ns, inode, ctime_ns) of a stat result, each an int64 (an inode above 2^63 wraps: only compared for
    equality): see the module's docstring."""
    ino = st.st_ino if st.st_ino < 1 << 63 else st.st_ino - (1 << 64)
    return st.st_size, st.st_mtime_ns, ino, st.st_ctime_ns


def own_folder(folder: Path) -> bool:
    """Whether `folder` is a folder (not a symbolic link to one) that this process's user owns and may write: a
    cache inside the data that it may trust and rewrite."""
    try:
        st = os.lstat(folder)
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid() and os.access(folder, os.W_OK | os.X_OK)


def own_cache_inside(data_root: Path, *sub: str) -> Path | None:
    """DATA_ROOT/.fastbyol[/SUB...] when this user owns every level of it (made here if missing, and only in a data
    folder that is this user's: ours_to_write), else None: a `.fastbyol` of someone else's, or a symbolic link, is
    never written into or trusted, and a folder shared by others (a cluster's /datasets) is never written."""
    folder = Path(data_root) / ".fastbyol"
    for level in (folder, *(folder.joinpath(*sub[:k + 1]) for k in range(len(sub)))):
        if os.path.lexists(level):
            if not own_folder(level):
                return None
        elif level == folder and not ours_to_write(Path(data_root)):
            return None
        elif not (os.access(level.parent, os.W_OK | os.X_OK) and writable_dir(level) and own_folder(level)):
            return None
    return folder.joinpath(*sub)


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
        if not mark or not re.fullmatch(r"[0-9]{1,9}", pid) or _pid_alive(int(pid)):  # '²' passes isdigit
            continue
        try:
            shutil.rmtree(e.path) if e.is_dir(follow_symlinks=False) else os.unlink(e.path)
            removed += 1
        except OSError:
            pass
    return removed


def tmp_name(path: Path) -> Path:
    """The temporary sibling of `path` that this process writes before renaming (its name within NAME_MAX)."""
    return path.with_name(fit_name(path.name, f"{TMP_MARK}{os.getpid()}"))


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
    first builds, the others find the result fresh. Yields the lock's descriptor: a child that writes for the holder
    inherits it (`pass_fds`), so the lock outlives the holder as long as that child lives (a SIGKILLed holder's child
    never writes unlocked; it dies with its parent besides, fastbyol.system.children)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield fd
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


def own_file(owner, suffix: str) -> str:
    """A new private file in CACHE/lists for `owner`'s own list or index, removed when the owner goes or the process
    exits (a killed process's: by the next process that makes one)."""
    folder = cache_root() / "lists"
    folder.mkdir(parents=True, exist_ok=True)
    remove_stale_tmp(folder)  # files of processes that are gone
    fd, own = tempfile.mkstemp(prefix="own-", suffix=f"{suffix}{TMP_MARK}{os.getpid()}", dir=folder)
    os.close(fd)
    weakref.finalize(owner, _unlink, own)
    return own


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
