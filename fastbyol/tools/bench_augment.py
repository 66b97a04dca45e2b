"""`fastbyol bench augment`: two-view samples/s of the whole augmentation pipeline (DALI crops + the photometric
chain), and `bench_photometric`: the photometric chain alone, per backend (reference, compiled, triton).

    fastbyol bench augment --size 224 --batch 256 --device gpu --source jpeg --json
    python -c "from fastbyol.tools.bench_augment import bench_photometric as b; print(b(224, 256, 'cuda', 'triton'))"

Sources: `arrays` (random colour uint8 images in memory, fed by external_source), `gray` (the same with R = G = B:
the gray fast path of the Fashion-MNIST preset) or `jpeg` (synthetic JPEGs written to a temporary folder, decoded by
DALI: on the GPU with the mixed decoder). Source images are 8/7 of the view side (256 px for 224), the usual
ImageNet ratio.

How the clock runs (the honest steady state): DALI prefetches (2 batches ahead), so a clock started after the
warm-up would count batches produced before it started. Every batch's arrival time is recorded (on CUDA after a
synchronize), and samples_per_s is the batch size over the median time between consecutive arrivals: a batch that
was already waiting shows up as one near-zero interval and does not move the median, and the median is the period
of the slower of producer and consumer. samples_per_s_mean (timed batches over their total time, which counts the
prefetched batches' head start) is reported beside it.
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass

import numpy as np
import torch

from ..augment import (IMAGENET_MEAN, IMAGENET_STD, VIEW1, VIEW2, LoaderSettings, TwoViewLoader, sample_params,
                       views_from_config)
from ..config import DEFAULT_PRESET, get_preset
from ..errors import FastByolError
from ..augment.photometric import ChainSpec
from ..augment.photometric_backends import BACKENDS, photometric_backend


def synthetic_source(size: int, n_images: int, source: str = "jpeg", seed: int = 0):
    """Benchmark images 8/7 of the view side: a uint8 (N, S, S, 3) array (colour, or gray for source="gray"), or a
    FileList of JPEGs written to a temporary folder."""
    side = max(size, int(round(size * 8 / 7)))
    rng = np.random.default_rng(seed)
    if source in ("arrays", "gray"):
        coarse = rng.integers(0, 256, (n_images, 8, 8, 1 if source == "gray" else 3)).astype(np.uint8)
        img = np.repeat(np.repeat(coarse, side // 8 + 1, 1), side // 8 + 1, 2)[:, :side, :side]
        return np.ascontiguousarray(np.broadcast_to(img, (n_images, side, side, 3)))
    from ..data.folders import FileList
    from ..data.synthetic import synthetic_folder

    root = synthetic_folder(n_train=n_images, n_test=0, size=side)
    return FileList(sorted(str(p) for p in (root / "train").rglob("*.jpg")), None)


def _steady_rate(arrivals: list[float], batch: int) -> tuple[float, float]:
    """(batch / median interval, batches / total time) over consecutive arrival times."""
    gaps = np.diff(arrivals)
    return batch / float(np.median(gaps)), batch * len(gaps) / float(arrivals[-1] - arrivals[0])


@dataclass(frozen=True)
class AugmentBenchSettings:
    """What `fastbyol bench augment` measures: the loader at `size` px, `batch` images a step, on `device` ("cpu" or
    "gpu"), from `source` ("arrays", "gray" or "jpeg": the module docstring), `steps` timed batches after `warmup`
    ones, with `num_threads` DALI and chain threads (None: the CPU count, at most 8), `seed` for the images and the
    draws. The views and the augmentation switches are the preset's, as `fastbyol train --preset PRESET` runs them
    (views_from_config, the preset's AugmentConfig); blur_window, decode and cpu_parallel override them (None: the
    preset's):
    blur_window: the blur window rule (ViewSpec.blur_window, `--blur-window`).
    decode: the GPU JPEG path's decode mode ("roi", one ROI decode per view, or "once", one decode and two GPU crops);
    it changes nothing for arrays or on the CPU. The row reports it and the graph's decoder count.
    cpu_parallel: the CPU array path's workers, "processes" or "threads" (the row reports what ran: JPEG sources and
    the GPU always use threads)."""

    size: int
    batch: int
    device: str = "cpu"
    source: str = "arrays"
    steps: int = 20
    warmup: int = 3
    num_threads: int | None = None
    seed: int = 0
    blur_window: str | None = None
    decode: str | None = None
    cpu_parallel: str | None = None
    preset: str = DEFAULT_PRESET

    def validate(self) -> None:
        """Each bad setting: one FastByolError line naming it."""
        if self.device not in ("cpu", "gpu"):
            raise FastByolError(f"--device must be cpu or gpu, got {self.device!r}")
        if self.source not in ("arrays", "gray", "jpeg"):
            raise FastByolError(f"--source must be arrays, gray or jpeg, got {self.source!r}")
        if self.size < 8 or self.batch < 1 or self.steps < 2:
            raise FastByolError("--size must be >= 8, --batch >= 1 and --steps >= 2")
        if self.device == "gpu" and not torch.cuda.is_available():
            raise FastByolError("--device gpu, but torch sees no CUDA GPU")


def bench_augment(bench: AugmentBenchSettings, data=None) -> dict:
    """Two-view samples/s of TwoViewLoader as `bench` says (see the module docstring for the clock). `data` replaces
    the synthetic images (a uint8 (N, H, W, 3) array or an encoded source), so a benchmark can feed the same images to
    a peer."""
    bench.validate()
    cfg = get_preset(bench.preset)
    for name in ("blur_window", "decode", "cpu_parallel"):
        if getattr(bench, name) is not None:
            setattr(cfg.data if name == "blur_window" else cfg.augment, name, getattr(bench, name))
    cfg.validate()
    size, batch, gpu = bench.size, bench.batch, bench.device == "gpu"
    threads = bench.num_threads or min(8, os.cpu_count() or 1)
    if data is None:
        data = synthetic_source(size, batch * 4, bench.source, bench.seed)
    view1, view2 = views_from_config(cfg)
    settings = LoaderSettings(batch, size, seed=bench.seed, device="cuda" if gpu else "cpu", num_threads=threads,
                              gray_input=bench.source == "gray", views=(view1, view2))
    loader = TwoViewLoader(data, settings, cfg.augment)
    arrivals: list[float] = []
    done, last = 0, bench.warmup + bench.steps
    while done < last:
        for _ in loader.epoch():
            done += 1
            if gpu:
                torch.cuda.synchronize()  # sync: the batch's chain has run, for its arrival time
            if done >= bench.warmup:  # the last warm-up batch's arrival starts the first timed interval
                arrivals.append(time.perf_counter())
            if done == last:
                break
    rate, mean_rate = _steady_rate(arrivals, batch)
    return {"samples_per_s": rate, "samples_per_s_mean": mean_rate, "size": size, "batch": batch,
            "device": bench.device, "source": bench.source, "threads": threads, "steps": bench.steps,
            "seconds": arrivals[-1] - arrivals[0], "operators": loader.operators,
            "photometric": loader.photometric_backend, "blur_window": view1.blur_window_rule,
            "blur_taps": view1.blur_window(size), "decode": loader.decode, "decoders": loader.decoders,
            "cpu_parallel": loader.cpu_parallel, "preset": bench.preset, "crop_area": list(view1.crop_area)}


def bench_photometric(size: int, batch: int, device: str, backend: str, steps: int = 20, threads: int | None = None,
                      seed: int = 0) -> dict:
    """The photometric chain alone on random crops: both views (VIEW1's and VIEW2's parameters) of `batch` images
    per step. ms_per_batch is the median step; images_per_s = batch / that (two-view samples per second).

    backend: "reference" (eager torch, grouped by jitter order), "compiled" (torch.compile of the per-slot form;
    compile_s is its first call, not timed) or "triton" (on the CPU only under TRITON_INTERPRET=1, tiny sizes).
    device: "cpu" or "cuda" (or "gpu"). threads: the reference's CPU worker threads (None: the calling thread)."""
    if backend not in BACKENDS:
        raise FastByolError(f"backend must be one of {BACKENDS}, got {backend!r}")
    device = "cuda" if device in ("cuda", "gpu") else device
    if device == "cuda" and not torch.cuda.is_available():
        raise FastByolError("device cuda, but torch sees no CUDA GPU")
    if backend == "triton" and device == "cpu" and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        raise FastByolError("backend triton on the CPU needs TRITON_INTERPRET=1 in the environment before start")
    if size < 8 or batch < 1 or steps < 1:
        raise FastByolError("size must be >= 8, batch and steps >= 1")
    g = torch.Generator().manual_seed(seed)
    crops = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, generator=g).to(device)  # as DALI's
    params = [sample_params(spec, batch, g, device) for spec in (VIEW1, VIEW2)]
    fn = photometric_backend(backend)
    out_dtype = torch.float16 if device == "cuda" else torch.float32
    chains = [ChainSpec(blur_window=view.blur_window(size), solarize_threshold=view.solarize_threshold,
                        mean=IMAGENET_MEAN, std=IMAGENET_STD, out_dtype=out_dtype) for view in (VIEW1, VIEW2)]
    extra = {"threads": threads} if backend == "reference" and device == "cpu" else {}

    def step():
        for chain, p in zip(chains, params):
            fn(crops, p, chain, **extra)
        if device == "cuda":
            torch.cuda.synchronize()  # sync: the step's kernels have run

    t0 = time.perf_counter()
    step()  # warm-up: compilation (compiled, triton), allocator, caches
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    ms = 1000.0 * statistics.median(times)
    return {"backend": backend, "size": size, "batch": batch, "device": device, "ms_per_batch": ms,
            "images_per_s": batch / (ms / 1000.0), "views": 2, "steps": steps, "first_call_s": compile_s,
            "ms_min": 1000.0 * min(times)}
