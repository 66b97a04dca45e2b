"""pytest-benchmark of the two-view DALI pipeline: one batch through both views, from arrays and from JPEG, at 96 and
224 px. CPU mode here (batch 32, DALI on the CPU); on CUDA batch 256 with the GPU decoder and GPU augmentation."""

import numpy as np
import pytest
import torch

from fastbyol.augment import TwoViewLoader

from .conftest import DEVICE

BATCH = 256 if DEVICE.type == "cuda" else 32


def _loader(size, source):
    side = int(round(size * 8 / 7))
    if source == "arrays":
        rng = np.random.default_rng(0)
        data = rng.integers(0, 256, (BATCH * 4, side, side, 3), dtype=np.uint8)
    else:
        pytest.importorskip("PIL")
        from fastbyol.data.folders import FileList, synthetic_folder

        root = synthetic_folder(n_train=BATCH * 4, n_test=0, size=side)
        data = FileList(sorted(str(p) for p in (root / "train").rglob("*.jpg")), None)
    return TwoViewLoader(data, BATCH, size, device="cuda" if DEVICE.type == "cuda" else "cpu", num_threads=2)


@pytest.mark.parametrize("source", ["arrays", "jpeg"])
@pytest.mark.parametrize("size", [96, 224])
def test_two_view_batch(benchmark, size, source):
    loader = _loader(size, source)
    batches = iter(())

    def next_batch():
        nonlocal batches
        try:
            v1, _ = next(batches)
        except StopIteration:
            batches = loader.epoch()
            v1, _ = next(batches)
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()
        return v1

    next_batch()
    benchmark.extra_info.update(size=size, source=source, batch=BATCH)
    benchmark.pedantic(next_batch, rounds=8, iterations=1, warmup_rounds=1)
