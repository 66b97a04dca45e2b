"""`fastbyol train --profile START:STOP`: steps START..STOP-1 recorded with torch.profiler (CPU and CUDA activities,
shapes, memory) into RUN_DIR/profile/steps_START-STOP.pt.trace.json, a Chrome trace that Perfetto
(https://ui.perfetto.dev) and TensorBoard's profiler plugin open; at the end the top operators by self time (device
time on a GPU) are printed with the data-wait share of those steps.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch


class StepProfiler:
    """Call `at(step, waited)` before each step (waited: how long that step's batch kept the host waiting) and
    `close()` after the loop. Does nothing when `steps` is None or on a rank that does not write."""

    def __init__(self, steps: tuple[int, int] | None, folder: Path, device: torch.device, log=print, meter=None):
        self.steps = steps
        self.meter = meter  # paused while the trace is written, so a profiled run's img/s leaves the export out
        self.folder = Path(folder)
        self.device = device
        self.log = log
        self.prof = None
        self.trace: Path | None = None
        self._wait = 0.0
        self._t0 = 0.0

    def at(self, step: int, waited: float) -> None:
        if self.steps is None:
            return
        start, stop = self.steps
        if self.prof is not None and step >= stop:
            if self.meter is not None:
                self.meter.pause()
            self.close()
            if self.meter is not None:
                self.meter.resume()
        elif self.prof is None and start <= step < stop and self.trace is None:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if self.device.type == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self.prof = torch.profiler.profile(activities=activities, record_shapes=True, profile_memory=True,
                                               with_stack=False)
            self.prof.start()
            self._first, self._wait, self._t0 = step, 0.0, time.perf_counter()
        if self.prof is not None:
            self._wait += waited
            self._last = step

    def close(self) -> None:
        """Stop recording (sync), write the trace and print the top operators; no-op when not recording."""
        if self.prof is None:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # sync: the recorded steps' kernels are done
        seconds = time.perf_counter() - self._t0
        self.prof.stop()
        prof, self.prof = self.prof, None
        self.folder.mkdir(parents=True, exist_ok=True)
        self.trace = self.folder / f"steps_{self._first}-{self._last + 1}.pt.trace.json"
        prof.export_chrome_trace(str(self.trace))
        sort_by = "self_cuda_time_total" if self.device.type == "cuda" else "self_cpu_time_total"
        try:
            table = prof.key_averages().table(sort_by=sort_by, row_limit=15)
        except (AttributeError, KeyError, RuntimeError):  # newer torch names device time self_device_time_total
            table = prof.key_averages().table(sort_by="self_device_time_total", row_limit=15)
        self.log(f"profile of steps {self._first}..{self._last}: {self.trace} (open in https://ui.perfetto.dev or "
                 f"TensorBoard); data wait {100 * self._wait / max(seconds, 1e-9):.1f}% of those steps' time")
        self.log(table)
