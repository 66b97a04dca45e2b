"""Where a run's figures go: the deferred log point (`LogPoints`) and the places it reports to (`Reporter`: the
progress bar, metrics.jsonl, and the sinks: TensorBoard here, the text lines of textlog.py, Weights & Biases in
wandb_sink.py; every sink has write(record) and close(), and shows a record's numbers by scalars.py's tags).

    log_points = LogPoints(device, world_size, every=10, total_steps=992, reporter=reporter)
    log_points.add(loss)                             # every step: device work only
    if log_points.due(step):
        log_points.queue(step, epoch, lr, tau, meter.window())   # no sync: the figures travel to the host
    log_points.flush()                               # at a synced point: the queued record is reported

A log point queues the mean loss of its interval (averaged over the ranks: a collective) and the meter's window,
and reports the previous log point's record, whose values have arrived meanwhile: the printed figures lag by one
log interval, and the loop never waits for the device to drain. A non-finite loss stops the run when its record is
reported (`TrainingStopped`), one interval after it happened; checkpoints check their own tensors.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from ..errors import TrainingStopped
from ..system.distributed import DeferredMean
from .scalars import scalar_tags


class TensorBoardSink:
    """The numbers of each metrics record as TensorBoard scalars (train/NAME, knn/..., probe/...), when tensorboard
    is installed and the folder's path is UTF-8 (TensorBoard encodes it so; metrics.jsonl holds the same numbers);
    otherwise nothing."""

    def __init__(self, folder: Path):
        try:
            import tensorboard  # noqa: F401  (torch.utils.tensorboard needs it)
            from torch.utils.tensorboard import SummaryWriter

            str(folder).encode("utf-8")  # a non-UTF-8 run folder name: no events rather than a traceback
        except (ImportError, UnicodeEncodeError):
            self.writer = None
            return
        self.writer = SummaryWriter(log_dir=str(folder))

    def write(self, record: dict) -> None:
        if self.writer is None:
            return
        for tag, value in scalar_tags(record).items():  # the tags W&B gets too (scalars.py)
            self.writer.add_scalar(tag, value, record["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class Reporter:
    """One record at a time to every place a run's figures go: metrics.jsonl (through `write_metrics`, the run
    files'), the sinks (TensorBoard) and the progress bar's postfix. Rank 0 alone gets real sinks."""

    def __init__(self, write_metrics, bar, sinks: list | None = None):
        self.write_metrics, self.bar = write_metrics, bar
        self.sinks = sinks or []

    def record(self, **record) -> None:
        """A metrics record (a log point, a kNN check, the final figures)."""
        self.write_metrics(record)
        for sink in self.sinks:
            sink.write(record)

    def log_point(self, record: dict, rates: dict) -> None:
        """One log point: the bar shows it, the record goes everywhere."""
        mfu = rates["mfu"]
        self.bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.3g}", tau=f"{record['tau']:.4f}",
                             img_s=f"{rates['img_per_s']:.0f}", **({} if mfu is None else {"mfu": f"{100 * mfu:.1f}%"}))
        self.record(**record, img_per_s=rates["img_per_s"], mfu=mfu, data_wait_share=rates["data_wait_share"])

    def close(self) -> None:
        self.bar.close()
        for sink in self.sinks:
            sink.close()


class LogPoints:
    """The deferred log point: the loss summed since the last one (a device tensor), its mean on its way to the host
    (`DeferredMean`), and the record queued at the last log point, reported at the next one or at a synced point."""

    def __init__(self, device: torch.device, world_size: int, every: int, reporter: Reporter,
                 stopped_message):
        self.world_size, self.every, self.reporter = world_size, every, reporter
        self.stopped_message = stopped_message  # () -> the words after "the loss became nan by step N; "
        self.loss_sum = torch.zeros((), device=device)  # since the last log point, device-resident
        self.steps = 0  # steps since the last log point
        self.last_loss = float("nan")  # the mean loss of the last reported log point
        self._mean = DeferredMean(device)
        self._pending: dict | None = None  # the queued record: step, epoch, lr, tau, steps, window

    def add(self, loss: torch.Tensor) -> None:
        """One step's loss (device work only)."""
        self.loss_sum += loss
        self.steps += 1

    def due(self, step: int, total_steps: int) -> bool:
        """Whether `step` (steps taken) is a log point: every `every` steps, and the last step."""
        return step % self.every == 0 or step == total_steps

    def queue(self, step: int, epoch: int, lr: float, tau: float, window) -> None:
        """Report the previous record, then queue this log point's (collective: every rank at every log point)."""
        self.flush()
        self._mean.start(self.loss_sum, self.world_size)
        self._pending = dict(step=step, epoch=epoch, lr=lr, tau=tau, steps=self.steps, window=window)
        self.loss_sum.zero_()
        self.steps = 0

    def flush(self) -> None:
        """Report the queued record, if any (its values have arrived, or this waits for them)."""
        if self._pending is None:
            return
        record, self._pending = self._pending, None
        loss = self._mean.value() / record.pop("steps")
        rates = record.pop("window").rates()
        if not math.isfinite(loss):
            raise TrainingStopped(f"the loss became {loss} by step {record['step']}; " + self.stopped_message())
        self.last_loss = loss
        self.reporter.log_point({"step": record["step"], "epoch": record["epoch"], "loss": loss, "lr": record["lr"],
                                 "tau": record["tau"]}, rates)
