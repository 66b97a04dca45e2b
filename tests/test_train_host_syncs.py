"""The whole training loop, counted for host syncs on the CPU: a TorchDispatchMode sees every op of the main thread
(the loader's worker threads and processes are not the device queue) during a tiny real run of
`fastbyol.train.train`, and each op that would make the host wait for a device is attributed to the step interval
it falls in. Between log points: zero. At a log point: one (the previous log point's loss, read from the host copy
that `DeferredMean` queued; on a GPU a read of memory already there, behind an event long passed). A `.item()`
put back into the step is caught. The same with `--accumulate 4` (4 micro-batches an optimizer step): accumulation
adds no sync; and on a labelled image folder, where the online probe's labels come from DALI's reader.

On a CPU-only machine there is no device queue, so every read of a tensor's value into Python counts as a sync, as
it would on a GPU: `_local_scalar_dense` (behind .item(), float(), bool(), int()), `is_nonzero`, `equal`,
`.tolist()` (no aten op: counted by wrapping it), data-dependent shapes (`nonzero`, `masked_select`, `unique`,
...), and copies from a non-CPU tensor to the CPU. `.numpy()` is not counted: a zero-copy view that a device tensor
refuses, so it can only follow one of the copies counted here (the CPU loader uses it on its own host buffers, which
are the data of its worker processes, not results of the device).
"""

import threading

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fastbyol.run.meter as meter_module
import fastbyol.train as train_module
from fastbyol.config import get_preset

from .faults import FaultyEncoder
from .support import small_idx_dataset as _small_idx_dataset

aten = torch.ops.aten
SYNC_OPS = {aten._local_scalar_dense.default, aten.is_nonzero.default, aten.equal.default, aten.nonzero.default,
            aten.masked_select.default, aten._unique2.default, aten.unique_dim.default,
            aten.unique_consecutive.default, aten.repeat_interleave.Tensor}
LOG_EVERY, BATCH, IMAGES = 3, 16, 300  # 18 steps, log points at 3, 6, 9, 12, 15 (steady) and 18 (the end)


def _to_cpu_from_device(func, args, kwargs) -> bool:
    """A copy into host memory from a tensor on another device (`.cpu()`, `.to("cpu")`, `copy_` into a CPU tensor)."""
    if func in (aten._to_copy.default, aten.to.device, aten.to.dtype_layout):
        src, dst = args[0], kwargs.get("device") or (args[1] if len(args) > 1 else None)
        return isinstance(src, torch.Tensor) and src.device.type != "cpu" and torch.device(dst or src.device).type \
            == "cpu"
    if func is aten.copy_.default:
        return args[0].device.type == "cpu" and args[1].device.type != "cpu"
    return False


class SyncCounter(TorchDispatchMode):
    """Records (completed steps, op name) for every host-syncing op of the main thread."""

    def __init__(self):
        super().__init__()
        self.steps = 0  # meter.step() calls so far: the interval an op falls in
        self.syncs: list[tuple[int, str]] = []

    paused = False  # while the CPU files loader makes a batch (below)

    def note(self, name: str) -> None:
        if threading.current_thread() is threading.main_thread() and not self.paused:
            self.syncs.append((self.steps, name))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in SYNC_OPS or _to_cpu_from_device(func, args, kwargs):
            self.note(str(func))
        return func(*args, **kwargs)


def _count_run(tmp_path, monkeypatch, accumulate: int = 1, data: str = "arrays",
               encoder=None) -> tuple[dict[int, list[str]], int]:
    """Run the real loop on a tiny dataset under the counter (arrays, or a labelled image folder: the online probe
    on, its labels from DALI's reader); per interval k (after step k, up to and including step k + 1's meter.step),
    the syncs seen; and the number of steps."""
    counter = SyncCounter()
    step_of_meter = meter_module.ThroughputMeter.step

    def counted_step(self):
        out = step_of_meter(self)
        counter.steps += 1
        return out

    monkeypatch.setattr(meter_module.ThroughputMeter, "step", counted_step)
    tolist = torch.Tensor.tolist  # a value read that dispatches no aten op

    def counted_tolist(self, *a, **k):
        counter.note("Tensor.tolist")
        return tolist(self, *a, **k)

    monkeypatch.setattr(torch.Tensor, "tolist", counted_tolist)
    if data == "folder":
        from fastbyol.augment.loader import TwoViewLoader
        from fastbyol.data.synthetic import write_synthetic_jpegs

        # the CPU files loader reads DALI's host windows into Python (.tolist) to crop with torch on the main
        # thread: host buffers, no device queue (on CUDA, DALI crops); not counted, the probe's labels included
        epoch = TwoViewLoader.epoch

        def uncounted_epoch(self, *a, **k):
            batches = epoch(self, *a, **k)
            while True:
                counter.paused = True
                try:
                    batch = next(batches)
                except StopIteration:
                    return
                finally:
                    counter.paused = False
                yield batch

        monkeypatch.setattr(TwoViewLoader, "epoch", uncounted_epoch)
        monkeypatch.setenv("FASTBYOL_CACHE", str(tmp_path / "cache"))
        data = write_synthetic_jpegs(tmp_path / "data", n_train=IMAGES, n_test=50, size=28, classes=4)
    else:
        data = _small_idx_dataset(tmp_path / "data", n_train=IMAGES, n_test=50)
    cfg = get_preset("fmnist-tiny")
    cfg.data.data, cfg.data.batch_size, cfg.optim.epochs, cfg.optim.accumulate = str(data), BATCH, 1, accumulate
    cfg.run.out, cfg.run.log_every, cfg.run.ckpt_every_steps, cfg.run.device = str(tmp_path / "run"), LOG_EVERY, 0, \
        "cpu"
    with counter:
        _, summary = train_module.train(cfg, progress=False, log=lambda *a, **k: None, encoder=encoder)
    assert summary["online_probe_top1"] is not None or accumulate > 1  # the probe's step ran in every step
    per_interval: dict[int, list[str]] = {}
    for step, name in counter.syncs:
        per_interval.setdefault(step, []).append(name)
    return per_interval, summary["steps"]


def _steady(per_interval: dict, steps: int) -> tuple[dict, dict]:
    """(between log points, at log points) over the steady intervals: after the first step (warm-up) and before
    the last (the epoch end and the final evaluation, which may sync)."""
    between = {k: per_interval.get(k, []) for k in range(1, steps) if k % LOG_EVERY}
    at = {k: per_interval.get(k, []) for k in range(1, steps) if k % LOG_EVERY == 0}
    return between, at


@pytest.mark.parametrize("accumulate, data", [(1, "arrays"), (4, "arrays"), (1, "folder")])
def test_the_loop_never_syncs_between_log_points(tmp_path, monkeypatch, accumulate, data):
    per_interval, steps = _count_run(tmp_path, monkeypatch, accumulate, data)
    assert steps == IMAGES // BATCH
    between, at = _steady(per_interval, steps)
    assert all(not names for names in between.values()), between
    # the first log point has nothing to read yet; every later one reads the previous log point's loss, once
    assert at[LOG_EVERY] == [] and all(at[k] == ["aten._local_scalar_dense.default"] for k in at if k > LOG_EVERY), at
    assert len(at) == 5


@pytest.mark.parametrize("accumulate", [1, pytest.param(4, marks=pytest.mark.slow)])
def test_an_item_put_back_into_the_step_is_counted(tmp_path, monkeypatch, accumulate):
    """An encoder that reads a value in each training forward (a sync inside the step): counted in every interval,
    at least once per micro-batch, and nothing else."""
    per_interval, steps = _count_run(tmp_path, monkeypatch, accumulate, encoder=FaultyEncoder("item"))
    between, _ = _steady(per_interval, steps)
    assert between and all(len(names) >= accumulate and set(names) == {"aten._local_scalar_dense.default"}
                           for names in between.values()), between
