"""Files on disk, written so that nothing is ever half-written and no two writers meet: atomic writes, the folder
lock, the free-space check, and one line for a failed write.

- Atomic: a temporary file in the same folder, fsync, rename, fsync of the folder. A reader sees the previous file or
  the new one, never half of one; a temporary file left by a kill is removed by the next writer that takes the lock.
  Files are created mode 0600 (owner only).
- One writer: `FolderLock` (a run's: `RunLock`) holds an OS lock (flock) on FOLDER/.lock for the writer's lifetime; a
  second writer into the same folder is refused with one line naming the first one's pid, and a crashed writer
  leaves no lock behind (the OS drops it with the process).
- Disk full: `check_free_space` before a large write; ENOSPC during a write keeps the previous file and becomes one
  error line naming the path and the bytes needed (`describe_write_error` maps the errors a write can meet).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import tempfile
from pathlib import Path

from ..errors import FastByolError
from ..system.paths import NAME_MAX, fit_name
from .names import LOCK

FILE_MODE = 0o600  # run files: owner read/write only (mkstemp's mode; config, metrics and summary the same)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


WRITE_ERRORS = {errno.ENOSPC: "no space left on the device", errno.EROFS: "the file system is read-only",
                errno.EDQUOT: "the disk quota is exceeded", errno.EACCES: "permission denied",
                errno.EPERM: "operation not permitted", errno.EFBIG: "the file size limit is reached (ulimit -f)",
                errno.ENAMETOOLONG: "a name in the path is longer than the file system allows"}


def describe_write_error(e: BaseException, path: Path) -> FastByolError | None:
    """One line for a failed write of `path`, when the exception is (or wraps: torch.save turns the OSError into a
    RuntimeError) one of WRITE_ERRORS; else None."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in WRITE_ERRORS:
            return FastByolError(f"{e.filename or path}: {WRITE_ERRORS[e.errno]}")
        if isinstance(e, RuntimeError) and "No space left" in str(e):  # the zip writer's message, no OSError kept
            return FastByolError(f"{path}: {WRITE_ERRORS[errno.ENOSPC]}")
        e = e.__cause__ or e.__context__
    return None


def _no_space(path: Path, need: int | None) -> FastByolError:
    free = shutil.disk_usage(path.parent).free
    wanted = f"{need} bytes needed, " if need else ""
    return FastByolError(f"{path}: no space left on the device ({wanted}{free} free); the previous file is kept")


def atomic_write_bytes(path: Path, write, need: int | None = None, before_rename=None) -> None:
    """Call write(file) on a temporary file next to `path`, then move it over `path` in one rename (mode 0600).

    A full disk, a read-only file system, a quota or a permission (WRITE_ERRORS, also wrapped in another exception
    as torch.save and matplotlib do) becomes one FastByolError naming `path`; the previous file is kept."""
    path = Path(path)
    tmp = None
    try:
        # created 0600; its name within NAME_MAX (mkstemp adds 8 characters and the suffix to the prefix)
        fd, tmp = tempfile.mkstemp(prefix=fit_name(path.name, ".", ".", NAME_MAX - 12), suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if before_rename is not None:
            before_rename()
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException as e:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        mapped = describe_write_error(e, path) if isinstance(e, Exception) else None
        if mapped is None:
            raise
        if "no space left" in str(mapped):
            raise _no_space(path, need) from None
        raise FastByolError(f"{path}: {str(mapped).split(': ', 1)[-1].rstrip()}; the previous file is kept") from None


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_bytes(path, lambda f: f.write((json.dumps(obj, indent=2, sort_keys=False) + "\n").encode()))


def remove_stale_temporaries(run_dir: Path) -> list[Path]:
    """Delete the temporary files of interrupted atomic writes (`.NAME.*.tmp`); call it holding the run's lock."""
    stale = sorted(Path(run_dir).glob(".*.tmp"))
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def check_free_space(folder: Path, need: int) -> None:
    """FastByolError unless `folder`'s filesystem has `need` bytes free (the new file is written beside the old)."""
    free = shutil.disk_usage(folder).free
    if free < need:
        raise FastByolError(f"{folder}: {free} bytes free, a checkpoint needs about {need}: free some space or choose "
                            "another --out")


class FolderLock:
    """An exclusive OS lock on FOLDER/.lock, taken without waiting (a held one is one line naming its pid), held
    until close() or the process's end. `busy` completes the refusal: what the holder is and what to do. Every
    command that writes a folder takes it (fastbyol.run.outputs says which)."""

    NAME = LOCK

    def __init__(self, folder: Path, busy: str = "in use by another fastbyol command (pid {pid}); wait for it to "
                                                 "finish"):
        self.path = Path(folder) / self.NAME
        try:  # never through a symbolic link: the PID written below would overwrite its target
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, FILE_MODE)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise FastByolError(f"{self.path} is a symbolic link: not followed; remove it") from None
            raise FastByolError(f"{folder}: cannot write there ({e.strerror})") from None
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self.fd, 64, 0).decode(errors="replace").strip() or "?"
            os.close(self.fd)
            self.fd = None
            raise FastByolError(f"{folder} is {busy.format(pid=holder)}") from None
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"{os.getpid()}\n".encode(), 0)

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor releases the flock
            self.fd = None

    def __enter__(self) -> FolderLock:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class RunLock(FolderLock):
    """The run folder's lock, held while the run lives (released by close() or the process's end)."""

    def __init__(self, run_dir: Path):
        super().__init__(run_dir, "in use by another fastbyol run (pid {pid}); wait for it, or choose another --out")
