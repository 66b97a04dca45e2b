"""Plain text lines for logs that are files: a cluster's job log, `> train.log 2>&1`, `nohup`. A progress bar written
to a file is a stream of carriage returns; these are one readable line a log point, on stderr:

    step 120/992 (12%) epoch 2/16 loss 0.4321 lr 0.112 tau 0.9912 805 img/s data wait 3% eta 2 min 31 s

`text_lines_wanted(progress, stream)`: when the stream is not a terminal, or the bar is off (`--no-progress`). The ETA
is the remaining steps at the rate since the first log point (the first one holds the compilation, so it has none).
`TextLog` is a sink of the run's reporting, like TensorBoard's and W&B's (`write(record)`, `close()`).
"""

from __future__ import annotations

import sys
import time


def text_lines_wanted(progress: bool, stream=None) -> bool:
    """Text lines instead of (or without) a progress bar: the bar is off, or stderr is not a terminal."""
    stream = sys.stderr if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    return not progress or not (callable(isatty) and isatty())


def eta_text(seconds: float) -> str:
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600} h {s % 3600 // 60:02d} min"
    return f"{s // 60} min {s % 60:02d} s" if s >= 60 else f"{s} s"


class TextLog:
    """One line a log point, a sink of the run's reporting: `write(record)` with each record metrics.jsonl gets; the
    log points' (those with a loss: step, epoch, loss, lr, tau, img_per_s, data_wait_share, mfu) become a line."""

    def __init__(self, total_steps: int, epochs: int, write=None, clock=time.monotonic):
        self.total_steps, self.epochs = total_steps, epochs
        self.out = write or (lambda line: print(line, file=sys.stderr, flush=True))
        self.clock = clock
        self.first = None  # (step, time) of the first log point seen

    def line(self, record: dict) -> str:
        step, now = int(record["step"]), self.clock()
        parts = [f"step {step}/{self.total_steps} ({100 * step / max(1, self.total_steps):.0f}%)",
                 f"epoch {int(record.get('epoch', 0)) + 1}/{self.epochs}"]
        for key, fmt in (("loss", "loss {:.4f}"), ("lr", "lr {:.3g}"), ("tau", "tau {:.4f}"),
                         ("img_per_s", "{:,.0f} img/s"), ("mfu", "mfu {:.1%}"),
                         ("data_wait_share", "data wait {:.0%}")):
            if isinstance(record.get(key), (int, float)):
                parts.append(fmt.format(record[key]))
        if self.first is None:
            self.first = (step, now)
        elif step > self.first[0]:
            per_step = (now - self.first[1]) / (step - self.first[0])
            parts.append(f"eta {eta_text(per_step * (self.total_steps - step))}")
        return " ".join(parts)

    def write(self, record: dict) -> None:
        if isinstance(record.get("loss"), (int, float)):  # a log point (not a kNN check or a final figure)
            self.out(self.line(record))

    def close(self) -> None:
        pass
