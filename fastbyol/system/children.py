"""The child processes fastbyol starts die with their parent, and Ctrl-C while one runs ends the command.

The file-check, shard-index and pre-flight decode children (`python -m fastbyol.data.check_worker`) and the CPU
augmentation workers (forked) do work for one parent only: when it dies, even by SIGKILL, whatever they would
finish is nobody's, and a child that goes on writing an index after its parent died writes without its lock.

- A started child (`child_command`, `child_env`) calls `die_with_parent()` first: Linux's PR_SET_PDEATHSIG asks the
  kernel for SIGKILL when the parent goes, and a parent already gone before that (the window between fork and the
  call) ends it at once; a watch thread (`watch_parent`) covers platforms without the call.
- A forked worker calls `watch_parent(pid)`: a thread that ends the process within WATCH_S of its parent's death,
  busy or idle (PR_SET_PDEATHSIG fires when the forking *thread* ends, which a loader built off the main thread
  would outlive).
- `ctrl_c_interrupts()`: while the main thread waits for a child, Ctrl-C raises KeyboardInterrupt (the command
  exits 130, the child is killed with it), whatever stop handler `fastbyol train` installed: a child killed by the
  same Ctrl-C must never read as a crash. `stopped_by_signal(status)` says the rest: a child that died by SIGINT
  is an interrupt (KeyboardInterrupt), by a scheduler's SIGTERM or SIGUSR1 a stop (`fastbyol train` exits 75: try
  again), by SIGHUP or SIGQUIT a stop in one line; never a verdict on its input.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from contextlib import contextmanager

from ..errors import FastByolError, Preempted

PARENT_ENV = "FASTBYOL_PARENT_PID"  # set by the parent for its children: the pid they must outlive no more
WATCH_S = 0.1  # seconds between two looks at the parent
_PR_SET_PDEATHSIG = 1
STOPS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGHUP, signal.SIGQUIT)  # a child killed by these was stopped


def child_command(*args: str) -> list[str]:
    """`python -m fastbyol.data.check_worker ARGS` with this interpreter."""
    return [sys.executable, "-m", "fastbyol.data.check_worker", *args]


def child_env() -> dict[str, str]:
    """This process's environment, plus the parent pid its children watch (PARENT_ENV)."""
    return {**os.environ, PARENT_ENV: str(os.getpid())}


def die_with_parent() -> None:
    """In a child started with `child_env()`: be killed when the parent dies (SIGKILL through PR_SET_PDEATHSIG on
    Linux, else a watch thread); exit at once when it is gone already. Nothing without PARENT_ENV."""
    raw = os.environ.get("FASTBYOL_PARENT_PID", "")  # PARENT_ENV
    if not (raw.isdigit() and raw.isascii() and len(raw) < 12):  # '²' is a digit to isdigit(), not to int()
        return
    parent = int(raw)
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        except (OSError, AttributeError):  # no prctl: the watch thread alone
            pass
    if os.getppid() != parent:  # the parent died before the request was in place
        os._exit(1)
    watch_parent(parent)


def watch_parent(parent: int) -> threading.Thread:
    """A daemon thread that ends this process (os._exit, nothing flushed: its work is nobody's now) within WATCH_S
    of the death of `parent` (its pid). Call it in the child."""
    def watch() -> None:
        stop = threading.Event()
        while not stop.wait(WATCH_S):
            if os.getppid() != parent:
                os._exit(1)

    thread = threading.Thread(target=watch, name="fastbyol-watch-parent", daemon=True)
    thread.start()
    return thread


@contextmanager
def ctrl_c_interrupts():
    """While the block waits for a child in the main thread: SIGINT raises KeyboardInterrupt here (Python's default),
    not a stop request at the next log point; the previous handler comes back after. Elsewhere: nothing.

    A stop signal `fastbyol train` already received before the block (a Ctrl-C or a scheduler's SIGTERM while it
    loaded, which also stopped the manifest's prescan child) ends the command here, before the child starts, as the
    same signal during the wait would: the pre-flight work is never done after the user asked to stop."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _stop_if_asked()
    previous = signal.getsignal(signal.SIGINT)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _stop_if_asked() -> None:
    from .signals import stop_signal

    received = stop_signal()
    if received is not None:
        stopped_by_signal(-int(signal.Signals[received]), "the start of this command")


def stopped_by_signal(status: int, what: str) -> None:
    """Raise when a child's exit status says it was stopped rather than broken: KeyboardInterrupt for SIGINT (Ctrl-C
    reaches the whole process group: exit 130), Preempted for a scheduler's SIGTERM or SIGUSR1 (`fastbyol train`
    exits 75, try again), one line for SIGHUP and SIGQUIT. `what` names the child's job."""
    if status == -signal.SIGINT:
        raise KeyboardInterrupt
    if status >= 0 or -status not in {int(s) for s in STOPS}:
        return
    name = signal.Signals(-status).name
    if -status in (signal.SIGTERM, signal.SIGUSR1):
        raise Preempted(f"{what} was stopped by {name}: nothing of it was recorded; "
                        "the same command starts it again")
    raise FastByolError(f"{what} was stopped by {name}: nothing was recorded; run the command again")
