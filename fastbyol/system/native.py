"""Native libraries print nothing of their own: what libpng, libjpeg, DALI or OpenCV write to file descriptor 2
during a call is captured and folded into fastbyol's one line (or dropped when the call succeeds).

    with native_stderr() as captured:
        pipe.run()
    captured.text  # what native code wrote meanwhile ("" if nothing)

fd 2 is pointed at a temporary file for the call; Python's own `sys.stderr` keeps writing to the terminal meanwhile
(it is swapped for a writer on a duplicate of the original descriptor), so a progress bar or an error line of
another thread is never swallowed. Captures may overlap (the kNN decode thread and the training loop): the first
one redirects, the last one restores, each reads what was written during its own window.

A pipeline that works ahead (DALI decodes the next batch on its own threads between two run() calls) prints outside
any call: `NativeWindow` is a capture that stays open across calls, from the first `take()` until `close()`, and hands
out what was written since the last take.
"""

from __future__ import annotations

import io
import os
import re
import sys
import tempfile
import threading
from contextlib import contextmanager

_lock = threading.Lock()
_active = {"depth": 0, "file": None, "saved_fd": None, "saved_stderr": None, "ours": None}
MAX_TEXT = 2000  # characters of a capture kept for a message
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")  # terminal colour codes (nvImageCodec colours its "[ERROR]")


class Captured:
    text: str = ""

    def first_line(self) -> str:
        """The first non-empty captured line, or ''."""
        return next((ln.strip() for ln in _ANSI.sub("", self.text).splitlines() if ln.strip()), "")


def _enter():
    with _lock:
        if _active["depth"] == 0:
            try:
                sys.stderr.flush()
            except (ValueError, OSError):  # a closed or broken stream: nothing of ours to flush
                pass
            tmp = tempfile.TemporaryFile(mode="w+b")
            saved = os.dup(2)
            os.dup2(tmp.fileno(), 2)
            _active.update(file=tmp, saved_fd=saved, saved_stderr=sys.stderr)
            sys.stderr = io.TextIOWrapper(os.fdopen(os.dup(saved), "wb", buffering=0), write_through=True,
                                          errors="backslashreplace")
            _active["ours"] = sys.stderr
            _active["handlers"] = _retarget_handlers(_active["saved_stderr"], sys.stderr)
        _active["depth"] += 1
        return _active["file"], os.lseek(_active["file"].fileno(), 0, os.SEEK_END)


def _retarget_handlers(old, new) -> list:
    """logging's stream handlers made before the capture on the stream sys.stderr was then (the default) write to
    fd 2, which the capture holds: pointed at `new` (the terminal) until it ends, so a caller's log lines are not
    swallowed. The handlers moved."""
    logging = sys.modules.get("logging")
    if logging is None:
        return []
    loggers = [logging.getLogger(), *(lg for lg in list(logging.Logger.manager.loggerDict.values())
                                      if isinstance(lg, logging.Logger))]
    moved = []
    for logger in loggers:
        for handler in list(logger.handlers):
            if isinstance(handler, logging.StreamHandler) and getattr(handler, "stream", None) is old:
                handler.stream = new
                moved.append(handler)
    return moved


def _read(tmp, start: int) -> tuple[str, int]:
    """(what was written to the capture file from `start` on, at most 4 x MAX_TEXT bytes of it; its end)."""
    end = os.lseek(tmp.fileno(), 0, os.SEEK_END)
    return os.pread(tmp.fileno(), min(end - start, 4 * MAX_TEXT), start).decode(errors="replace"), end


def _leave(tmp, start: int) -> str:
    with _lock:
        text, _ = _read(tmp, start)
        _active["depth"] -= 1
        if _active["depth"] == 0:
            os.dup2(_active["saved_fd"], 2)
            os.close(_active["saved_fd"])
            ours = _active["ours"]
            if sys.stderr is ours:  # else someone swapped sys.stderr meanwhile (a test harness): theirs stays
                sys.stderr = _active["saved_stderr"]
            for handler in _active.pop("handlers", ()):
                if handler.stream is ours:
                    handler.stream = _active["saved_stderr"]
            # not closed here: whoever still holds it (a harness that saved sys.stderr in the window) may write to
            # it; it closes its descriptor when the last reference goes
            del ours
            tmp.close()
            _active.update(file=None, saved_fd=None, saved_stderr=None, ours=None)
        return text[:MAX_TEXT]


@contextmanager
def native_stderr():
    """Capture what native code writes to fd 2 inside the block into the yielded Captured's `text`."""
    captured = Captured()
    tmp, start = _enter()
    try:
        yield captured
    finally:
        captured.text = _leave(tmp, start)


def fold(reason: str, captured: Captured) -> str:
    """`reason`, with the first line native code printed meanwhile appended (one line in all)."""
    line = captured.first_line()
    return f"{reason} [native: {line[:200]}]" if line and line not in reason else reason


class NativeWindow:
    """A capture of fd 2 that stays open across calls (see the module's docstring): take() opens it if needed and
    returns what native code wrote since the previous take (as a Captured), close() ends it. Text no one takes is
    dropped, as a successful call's is."""

    def __init__(self):
        self._tmp = None
        self._start = 0

    def take(self) -> Captured:
        captured = Captured()
        if self._tmp is None:
            self._tmp, self._start = _enter()
            return captured
        with _lock:
            text, self._start = _read(self._tmp, self._start)
        captured.text = text[:MAX_TEXT]
        return captured

    def close(self) -> None:
        if self._tmp is not None:
            tmp, self._tmp = self._tmp, None
            _leave(tmp, self._start)


class CurrentStderr:
    """A stream that writes to whatever `sys.stderr` is at each call: for writers made once and kept (a progress
    bar), so that inside a capture they still reach the terminal (the object sys.stderr was when they were made
    writes to fd 2, which a capture holds)."""

    def __getattr__(self, name):
        return getattr(sys.stderr, name)

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()
