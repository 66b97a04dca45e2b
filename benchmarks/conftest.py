"""pytest-benchmark set-up: the Triton interpreter on CPU-only machines; every timed call ends with a device
synchronize on CUDA, so the figures are device time, not launch time."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def timed(benchmark):
    """benchmark(fn) with a CUDA synchronize closing each timed call."""

    def run(fn, **extra_info):
        benchmark.extra_info.update(extra_info)
        if DEVICE.type == "cuda":
            def synced():
                fn()
                torch.cuda.synchronize()

            return benchmark(synced)
        return benchmark(fn)

    return run
