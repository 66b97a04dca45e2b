"""The throughput meter on a scripted clock: warm-up set apart, paused regions left out, windows and run totals, MFU
over every process, and its state surviving a checkpoint."""

import pytest
import torch

import fastbyol.run.meter as meter_module
from fastbyol.run.meter import ThroughputMeter
from fastbyol.run.perf import mfu


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


@pytest.fixture
def clock(monkeypatch):
    c = Clock()
    monkeypatch.setattr(meter_module.time, "perf_counter", c)
    return c


def _batches(clock, waits):
    """A loader whose i-th batch keeps the host waiting waits[i] seconds."""
    for w in waits:
        clock.now += w
        yield w


def test_warmup_pause_window_and_totals(clock):
    m = ThroughputMeter(torch.device("cpu"), batch_images=64, flops_per_image=1e9, peak=1e12, world_size=2)
    m.resume()
    first = []
    for w in m.batches(_batches(clock, [0.5, 0.1, 0.1, 0.3])):
        clock.now += 1.0  # the step
        first.append(m.step())
    assert first == [True, False, False, False]  # the first step ends the warm-up
    assert m.warmup_seconds == pytest.approx(1.5)  # its wait and its step
    m.pause()
    clock.now += 50.0  # a checkpoint or a kNN check: not timed
    m.resume()
    for w in m.batches(_batches(clock, [0.2])):
        clock.now += 1.0
        m.step()
    win = m.window().rates()
    # 4 timed steps: waits 0.1 + 0.1 + 0.3 + 0.2 = 0.7 s, steps 4 s, 4.7 s in all
    assert win["img_per_s"] == pytest.approx(4 * 64 / 4.7)
    assert win["step_ms"] == pytest.approx(1000 * 4.7 / 4)
    assert win["data_wait_share"] == pytest.approx(0.7 / 4.7)
    assert win["mfu"] == pytest.approx(mfu(4 * 64 / 4.7, 1e9, 1e12, 2)) == pytest.approx(4 * 64 / 4.7 * 1e9 / 2e12)
    for w in m.batches(_batches(clock, [0.0])):
        clock.now += 2.0
        m.step()
    assert m.window().rates()["step_ms"] == pytest.approx(2000.0)  # the window restarted
    m.pause()
    total = m.summary()
    assert total["timed_steps"] == 5 and total["train_seconds"] == pytest.approx(6.7)
    assert total["img_per_s"] == pytest.approx(5 * 64 / 6.7) and total["warmup_seconds"] == pytest.approx(1.5)


def test_state_round_trip_continues_the_totals(clock):
    m = ThroughputMeter(torch.device("cpu"), 32, 1.0, None)
    m.resume()
    for w in m.batches(_batches(clock, [0.0, 0.0, 0.1])):
        clock.now += 1.0
        m.step()
    m.pause()
    resumed = ThroughputMeter(torch.device("cpu"), 32, 1.0, None)
    resumed.load_state_dict(m.state_dict())
    resumed.resume()
    for w in resumed.batches(_batches(clock, [0.0, 0.0])):
        clock.now += 3.0
        resumed.step()  # this process's first step is its own warm-up
    resumed.pause()
    s = resumed.summary()
    assert s["timed_steps"] == 3 and s["train_seconds"] == pytest.approx(2.1 + 3.0)
    assert s["warmup_seconds"] == pytest.approx(1.0 + 3.0) and s["mfu"] is None


def test_mfu_counts_every_process():
    assert mfu(1000.0, 65e9, 989e12, 1) == pytest.approx(1000 * 65e9 / 989e12)
    assert mfu(1000.0, 65e9, 989e12, 8) == pytest.approx(1000 * 65e9 / (8 * 989e12))
    assert mfu(1000.0, 65e9, None, 8) is None


def test_every_region_end_waits_for_the_device(clock, monkeypatch):
    """pause() and the first step sync the device before reading the clock (queued kernels would otherwise be left
    out of the time); a step in the steady state and a log window do not (its end is a point in the queue)."""
    syncs = []
    monkeypatch.setattr(meter_module, "device_sync", lambda device: syncs.append(clock.now))
    m = ThroughputMeter(torch.device("cpu"), batch_images=8, flops_per_image=1.0, peak=None)
    m.resume()
    assert m.step() and len(syncs) == 1  # the first step: warm-up ends
    m.step()
    m.step()
    assert len(syncs) == 1  # no sync per step
    window = m.window()
    assert len(syncs) == 1
    window.rates()
    assert len(syncs) == 1  # on the CPU the end has passed when the call returns: nothing to wait for
    m.pause()
    assert len(syncs) == 2
    m.pause()  # no region open: nothing to wait for
    m.window()
    assert len(syncs) == 2


def test_window_read_later_keeps_its_own_figures(clock):
    """A window's rates read a log point later (as the trainer does) are its own: the next window's steps and
    seconds are not in them, and a pause in between leaves them alone."""
    m = ThroughputMeter(torch.device("cpu"), batch_images=10, flops_per_image=1.0, peak=None)
    m.resume()
    m.step()  # warm-up
    for _ in range(3):
        clock.now += 1.0
        m.step()
    first = m.window()
    for _ in range(2):
        clock.now += 4.0
        m.step()
    m.pause()
    clock.now += 100.0
    m.resume()
    clock.now += 2.0
    m.step()
    second = m.window()
    assert first.rates()["step_ms"] == pytest.approx(1000.0) and first.rates()["img_per_s"] == pytest.approx(10.0)
    assert second.rates()["step_ms"] == pytest.approx(10000.0 / 3)  # 4 + 4 + 2 s, the paused 100 s left out
