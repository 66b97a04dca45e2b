"""pytest-benchmark of the augmentation: one two-view batch of the whole pipeline (DALI crops + the photometric
chain), from arrays and from JPEG, at 96 and 224 px; and the photometric chain alone per backend. CPU mode here (batch
32, DALI on the CPU, the torch reference on 2 worker threads); on CUDA batch 256, the GPU decoder, every backend."""

import numpy as np
import pytest
import torch

from fastbyol.augment import IMAGENET_MEAN, IMAGENET_STD, VIEW1, LoaderSettings, TwoViewLoader, sample_params
from fastbyol.augment.photometric import ChainSpec
from fastbyol.augment.photometric_backends import photometric_backend

from .conftest import DEVICE

BATCH = 256 if DEVICE.type == "cuda" else 32
BACKENDS = ["reference", "compiled", "triton"] if DEVICE.type == "cuda" else ["reference"]


def _loader(size, source):
    side = round(size * 8 / 7)
    if source == "arrays":
        rng = np.random.default_rng(0)
        data = rng.integers(0, 256, (BATCH * 4, side, side, 3), dtype=np.uint8)
    else:
        pytest.importorskip("PIL")
        from fastbyol.data.folders import FileList
        from fastbyol.data.synthetic import synthetic_folder

        root = synthetic_folder(n_train=BATCH * 4, n_test=0, size=side)
        data = FileList(sorted(str(p) for p in (root / "train").rglob("*.jpg")), None)
    return TwoViewLoader(data, LoaderSettings(BATCH, size, device="cuda" if DEVICE.type == "cuda" else "cpu",
                                              num_threads=2))


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
    benchmark.extra_info.update(size=size, source=source, batch=BATCH, operators=loader.operators)
    benchmark.pedantic(next_batch, rounds=8, iterations=1, warmup_rounds=1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("size", [96, 224])
def test_photometric_chain(timed, size, backend):
    """One view (VIEW1: blur on every image) of BATCH random crops."""
    g = torch.Generator().manual_seed(0)
    crops = torch.randint(0, 256, (BATCH, 3, size, size), dtype=torch.uint8, generator=g).to(DEVICE)
    params = sample_params(VIEW1, BATCH, g, DEVICE)
    chain = photometric_backend(backend)
    spec = ChainSpec(blur_window=VIEW1.blur_window(size), solarize_threshold=0.5, mean=IMAGENET_MEAN,
                     std=IMAGENET_STD, out_dtype=torch.float16 if DEVICE.type == "cuda" else torch.float32)
    kwargs = dict(threads=2) if DEVICE.type == "cpu" else {}
    chain(crops, params, spec, **kwargs)  # warm-up (compilation)
    timed(lambda: chain(crops, params, spec, **kwargs), size=size, backend=backend, batch=BATCH)
