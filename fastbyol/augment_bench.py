"""`fastbyol bench augment`: two-view samples/s of the DALI augmentation pipeline alone.

    fastbyol bench augment --size 224 --batch 256 --device gpu --source jpeg --json

Sources: `arrays` (random colour uint8 images in memory, fed by external_source) or `jpeg` (synthetic JPEGs written
to a temporary folder, decoded by DALI: on the GPU with the mixed decoder). Source images are 8/7 of the view side
(256 px for 224), the usual ImageNet ratio. Warm-up batches are not timed; on CUDA the clock stops after a
synchronize.
"""

from __future__ import annotations

import os
import time

import numpy as np
import torch

from .augment import TwoViewLoader
from .errors import FastByolError


def synthetic_source(size: int, n_images: int, source: str = "jpeg", seed: int = 0):
    """Benchmark images 8/7 of the view side: a uint8 (N, S, S, 3) array, or a FileList of JPEGs written to a
    temporary folder."""
    side = max(size, int(round(size * 8 / 7)))
    rng = np.random.default_rng(seed)
    if source == "arrays":
        coarse = rng.integers(0, 256, (n_images, 8, 8, 3)).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(np.repeat(coarse, side // 8 + 1, 1), side // 8 + 1, 2)[:, :side, :side])
    from .data.folders import FileList, synthetic_folder

    root = synthetic_folder(n_train=n_images, n_test=0, size=side)
    return FileList(sorted(str(p) for p in (root / "train").rglob("*.jpg")), None)


def bench_augment(size: int, batch: int, device: str = "cpu", source: str = "arrays", steps: int = 20,
                  warmup: int = 3, num_threads: int | None = None, seed: int = 0) -> dict:
    if device not in ("cpu", "gpu"):
        raise FastByolError(f"--device must be cpu or gpu, got {device!r}")
    if source not in ("arrays", "jpeg"):
        raise FastByolError(f"--source must be arrays or jpeg, got {source!r}")
    if size < 8 or batch < 1 or steps < 1:
        raise FastByolError("--size must be >= 8, --batch and --steps >= 1")
    if device == "gpu" and not torch.cuda.is_available():
        raise FastByolError("--device gpu, but torch sees no CUDA GPU")
    threads = num_threads or min(8, os.cpu_count() or 1)
    data = synthetic_source(size, batch * 4, source, seed)
    loader = TwoViewLoader(data, batch, size, seed=seed, device="cuda" if device == "gpu" else "cpu",
                           num_threads=threads)
    done, t0 = 0, None
    while done < warmup + steps:
        for v1, v2 in loader.epoch():
            done += 1
            if done == warmup:
                if device == "gpu":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
            if done == warmup + steps:
                break
    if device == "gpu":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    return {"samples_per_s": steps * batch / seconds, "size": size, "batch": batch, "device": device,
            "source": source, "threads": threads, "steps": steps, "seconds": seconds}
