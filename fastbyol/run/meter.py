"""One throughput meter for the training loop (moco-v3's meters, gpt-fast's device_sync): img/s, step time, the share
of time spent waiting for data, and MFU, for the current log window and for the whole run.

    meter = ThroughputMeter(device, batch_images, flops_per_image, peak, world_size)
    meter.resume()                                 # a timed region starts (an epoch, or after a checkpoint)
    for v1, v2 in meter.batches(loader.epoch()):   # records how long each batch kept the host waiting
        ...step...
        meter.step()                               # counts the step's images (every process's)
        window = meter.window()                    # at a log point: no sync, the window's end is queued
        ...a log point later: window.rates()       # waits on that end (long passed), then the figures
    meter.pause()                                  # sync: the region ends when the device has finished its work
    meter.summary()

The first step of each process (compilation, autotuning, allocator warm-up) is timed apart as `warmup_seconds` and
left out of every rate. Every region end syncs the device, so queued steps never land in untimed time. A log window
does not: its ends are points in the device's queue (a timing CUDA event; the host clock on the CPU, where the work
is done when the call returns), and its seconds are the device's time between them, read once the later end has
passed, which the trainer does one log point later (so the printed figures lag by one log interval). The state
(`state_dict`) goes into checkpoints, so a resumed run reports rates over all its timed steps.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator

import torch

from .perf import device_sync, mfu


def _mark(device: torch.device):
    """A point in the device's queue: a recorded timing event on CUDA, the host clock elsewhere (work done already)."""
    if device.type == "cuda":
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event
    return time.perf_counter()


def _seconds_between(start, end) -> float:
    """Device seconds from one `_mark` to a later one; on CUDA waits for `end` (sync on that event only)."""
    if isinstance(end, float):
        return end - start
    end.synchronize()  # sync: on an event queued a log interval ago, passed in a steady loop
    return start.elapsed_time(end) / 1000


class Window:
    """One log window, closed without a sync: `rates()` reads its figures (waiting for its end, if still queued)."""

    def __init__(self, meter: ThroughputMeter, start, end, steps: int, seconds: float, wait: float):
        self._meter, self._start, self._end = meter, start, end
        self._steps, self._seconds, self._wait = steps, seconds, wait

    def rates(self) -> dict:
        seconds = self._seconds
        if self._start is not None and self._end is not None:
            seconds += _seconds_between(self._start, self._end)
            self._start = self._end = None  # read once
            self._seconds = seconds
        return self._meter._rates(self._steps, seconds, self._wait)


class ThroughputMeter:
    def __init__(self, device: torch.device, batch_images: int, flops_per_image: float, peak: float | None,
                 world_size: int = 1):
        """batch_images: images one step consumes over all processes (the global batch)."""
        self.device = device
        self.batch_images = batch_images
        self.flops_per_image = flops_per_image
        self.peak = peak
        self.world_size = world_size
        # run totals (timed steps only) and the open log window
        self.steps = 0
        self.seconds = 0.0
        self.wait_seconds = 0.0
        self.warmup_seconds = 0.0
        self._window = [0, 0.0, 0.0]  # steps, seconds of its closed pieces (regions paused since), wait seconds
        self._window_mark = None  # `_mark` where the open window's open piece started; None while paused
        self._started: float | None = None  # perf_counter of the open region, None while paused
        self._warming_up = True  # this process has not finished its first step yet
        self._waited = 0.0  # the last batch's wait
        self.first_batch_wait: float | None = None  # this process's first batch's wait, once its first step ran

    # ------------------------------------------------------------------------------------------------- regions
    def resume(self) -> None:
        """Open a timed region (no-op when one is open)."""
        if self._started is None:
            self._started = time.perf_counter()
            self._window_mark = _mark(self.device)

    def pause(self) -> None:
        """sync: close the region once the device is done, adding its time to the window and the run."""
        if self._started is None:
            return
        end = _mark(self.device)
        device_sync(self.device)
        elapsed = time.perf_counter() - self._started
        self._started = None
        self.seconds += elapsed
        if self._window_mark is not None:
            self._window[1] += _seconds_between(self._window_mark, end)
        self._window_mark = None

    def batches(self, iterable: Iterable) -> Iterator:
        """Yield from `iterable`, noting how long the host waited for each item (the data wait)."""
        it = iter(iterable)
        while True:
            asked = time.perf_counter()
            try:
                item = next(it)
            except StopIteration:
                return
            self._waited = time.perf_counter() - asked
            yield item

    def step(self) -> bool:
        """One step has been queued. The first of the process ends the warm-up: sync, its time is set apart, and
        True is returned (False for every other step)."""
        if self._warming_up:
            device_sync(self.device)  # sync: the first step of this process, once
            now = time.perf_counter()
            self.warmup_seconds += now - (self._started if self._started is not None else now)
            self._started = now
            self._window_mark = _mark(self.device)
            self._warming_up = False
            self.first_batch_wait = self._waited
            return True
        self.steps += 1
        self.wait_seconds += self._waited
        self._window[0] += 1
        self._window[2] += self._waited
        return False

    @property
    def last_wait(self) -> float:
        """Seconds the host waited for the latest batch."""
        return self._waited

    # ------------------------------------------------------------------------------------------------- figures
    def _rates(self, steps: int, seconds: float, wait: float) -> dict:
        images = steps * self.batch_images
        img_s = images / seconds if seconds > 0 else 0.0
        return {"img_per_s": img_s, "step_ms": 1000 * seconds / steps if steps else 0.0,
                "data_wait_share": wait / seconds if seconds > 0 else 0.0,
                "mfu": mfu(img_s, self.flops_per_image, self.peak, self.world_size)}

    def window(self) -> Window:
        """The window since the last window() (timed steps only), closed with no sync: its `rates()` come when its
        end has passed on the device. The window restarts; the open region stays open."""
        start = end = None
        if self._window_mark is not None:
            start, end = self._window_mark, _mark(self.device)
            self._window_mark = end
        steps, seconds, wait = self._window
        self._window = [0, 0.0, 0.0]
        return Window(self, start, end, steps, seconds, wait)

    def summary(self) -> dict:
        """Run totals: img/s, step ms, data-wait share and MFU over every timed step, plus the seconds."""
        return {**self._rates(self.steps, self.seconds, self.wait_seconds), "train_seconds": self.seconds,
                "warmup_seconds": self.warmup_seconds, "timed_steps": self.steps}

    # ---------------------------------------------------------------------------------------------- checkpoint
    def state_dict(self) -> dict:
        return {"steps": self.steps, "seconds": self.seconds, "wait_seconds": self.wait_seconds,
                "warmup_seconds": self.warmup_seconds}

    def load_state_dict(self, state: dict) -> None:
        self.steps = int(state["steps"])
        self.seconds = float(state["seconds"])
        self.wait_seconds = float(state["wait_seconds"])
        self.warmup_seconds = float(state["warmup_seconds"])
