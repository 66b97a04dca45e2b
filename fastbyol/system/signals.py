"""The stop signals of a command: SIGTERM and SIGUSR1 (a scheduler's preemption) and SIGINT (Ctrl-C) recorded as a
stop request instead of ending the process where it stands.

`fastbyol train` installs the handlers before torch loads; the trainer asks `stop_signal()` at its log points and
stops there with a checkpoint (fastbyol.run.preemption), and a wait for a child process asks it before it starts
(fastbyol.system.children.ctrl_c_interrupts): a stop that arrived while the command loaded ends it before the
pre-flight work, not after. The record lives here, in the process's room, so both can read it.
"""

from __future__ import annotations

import os
import signal

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)

_received: list[str] = []  # names of the stop signals this process got, in order
_previous: dict[int, object] = {}


def _on_signal(signum, frame) -> None:
    name = signal.Signals(signum).name
    if not _received and os.environ.get("RANK", "0") == "0":  # os.write: print is not reentrant in a handler
        os.write(2, f"fastbyol: {name}: stopping at the next log point with a checkpoint\n".encode())
    _received.append(name)  # later ones change nothing: the stop is under way, its checkpoint is atomic


def install_stop_handlers() -> None:
    """Turn SIGTERM, SIGUSR1 and SIGINT into a stop request (main thread only; call once per process)."""
    _received.clear()
    for sig in STOP_SIGNALS:
        _previous.setdefault(sig, signal.getsignal(sig))
        signal.signal(sig, _on_signal)


def restore_signal_handlers() -> None:
    for sig, handler in _previous.items():
        signal.signal(sig, handler)
    _previous.clear()


def stop_signal() -> str | None:
    """The first stop signal this process got, or None."""
    return _received[0] if _received else None


def clear_stop_signals() -> None:
    """Forget the stop signals received (a test that sent one to itself)."""
    _received.clear()
