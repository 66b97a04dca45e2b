"""Names and limits of the operating system, as input: a path the user gives is checked against the file system's
limits before anything is made from it, names fastbyol makes from the user's (temporary files) stay within them, and an
OS limit met anyway (a name too long, too many open files, the file-size limit, a process limit) is one line naming
what was hit and how to lift it.

Linux limits: NAME_MAX = 255 bytes per path component, PATH_MAX = 4096 bytes per path given to one system call (with its
terminating NUL). Names are bytes: a non-UTF-8 name is a valid name (Python holds it with surrogate escapes), and
fastbyol writes it back as the same bytes.
"""

from __future__ import annotations

import errno
import hashlib
import os
import resource

from ..errors import FastByolError

NAME_MAX = 255  # bytes of one path component
PATH_MAX = 4096  # bytes of a path handed to one system call, its NUL included

LIMIT_ERRORS = {
    errno.ENAMETOOLONG: "a name in it is longer than the file system allows (255 bytes a name, 4095 a path)",
    errno.ELOOP: "too many symbolic links in it",
    errno.EMFILE: "too many open files for this process (ulimit -n): raise the limit",
    errno.ENFILE: "too many open files on this machine",
    errno.EFBIG: "the file size limit is reached (ulimit -f): raise it or free the limit",
    errno.EAGAIN: "a process limit is reached (ulimit -u) or a resource is busy: raise the limit or retry",
    errno.ENOMEM: "out of memory (or the address-space limit, ulimit -v): raise it or choose smaller settings",
}


def check_path(flag: str, path, must_exist: bool = False) -> None:
    """FastByolError naming `flag` and the path when one of its names, or the whole of it, is longer than the file
    system takes (a correct path is left as it is; must_exist: also one line when it does not exist)."""
    raw = os.fsencode(path)
    if b"\0" in raw:
        raise FastByolError(f"{flag} {_show(path)}: a path cannot hold a NUL byte")
    longest = max((len(part) for part in raw.split(b"/")), default=0)
    if longest > NAME_MAX:
        raise FastByolError(f"{flag} {_show(path)}: a name of {longest} bytes in it, more than the file system's "
                            f"{NAME_MAX}")
    full = len(os.fsencode(os.path.abspath(path)))
    if full >= PATH_MAX:
        raise FastByolError(f"{flag} {_show(path)}: {full} bytes as an absolute path, more than the system's "
                            f"{PATH_MAX - 1}")
    if must_exist and not os.path.lexists(path):
        raise FastByolError(f"{flag} {_show(path)}: no such file or folder")


def fit_name(name: str, suffix: str, prefix: str = "", limit: int = NAME_MAX) -> str:
    """prefix + name + suffix, with `name` cut (and a digest of the whole name put at the cut) so that the result's
    bytes stay within `limit`: the temporary sibling of a valid 250-byte name is a valid name too."""
    raw = os.fsencode(name)
    room = limit - len(os.fsencode(prefix + suffix))
    if len(raw) <= room:
        return prefix + name + suffix
    tag = "~" + hashlib.sha1(raw).hexdigest()[:8]
    return prefix + os.fsdecode(raw[:max(0, room - len(tag))]) + tag + suffix


def limit_error(e: BaseException) -> FastByolError | None:
    """One line for an OS limit met anywhere (LIMIT_ERRORS, MemoryError), naming the file when the error has one;
    None for any other error."""
    if isinstance(e, MemoryError):
        return FastByolError(LIMIT_ERRORS[errno.ENOMEM])
    if isinstance(e, RuntimeError):
        return native_memory_error(e)
    if not isinstance(e, OSError) or e.errno not in LIMIT_ERRORS:
        return None
    where = f"{_show(e.filename)}: " if e.filename is not None else ""
    return FastByolError(f"{where}{LIMIT_ERRORS[e.errno]}")


# what a native library says when an allocation, a mapping or a thread's stack was refused (the address-space limit
# meets native code first: torch's allocator, oneDNN, DALI's thread pool, the dynamic loader)
_NATIVE_OUT_OF_MEMORY = ("cannot allocate memory", "can't allocate memory", "could not create a primitive",
                         "std::bad_alloc", "failed to map segment", "resource temporarily unavailable",
                         "out of memory")


def address_space_note() -> str:
    """", the address-space limit (ulimit -v) is N GB: raise it" when that limit is set, else ""."""
    for name, flag in (("RLIMIT_AS", "-v"), ("RLIMIT_DATA", "-d")):
        soft = resource.getrlimit(getattr(resource, name))[0]
        if soft != resource.RLIM_INFINITY:
            return f"; the address-space limit (ulimit {flag}) is {soft / 1e9:.1f} GB: raise it"
    return ""


def native_memory_error(e: BaseException) -> FastByolError | None:
    """One line for a native library's allocation failure (a RuntimeError whose text says so) under an address-space
    limit; None otherwise (without such a limit the same text may be a bug, which keeps its traceback)."""
    note = address_space_note()
    text = str(e).lower()
    if not note or not isinstance(e, RuntimeError) or not any(m in text for m in _NATIVE_OUT_OF_MEMORY):
        return None
    first = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), "")[:160]
    return FastByolError(f"out of memory in a native library ({first}){note}")


def _show(path, limit: int = 160) -> str:
    """A path in a one-line message: at most `limit` characters (a 4,000-character path would be the whole line)."""
    text = os.fsdecode(path) if isinstance(path, bytes) else str(path)
    return text if len(text) <= limit else f"{text[:limit // 2]}...{text[-limit // 2:]} ({len(text)} characters)"
