"""Throughput of one whole BYOL training step: ours (channels_last, bf16 autocast on CUDA, fused ops, cuDNN
autotuning, optional torch.compile) against a plain PyTorch step, same model and batch. Used by `benchmarks/`, the
GPU report and the GPU plan (benchmarks/gpu_plan.md); `benchmarks/peer_step.py` measures the peers' steps beside it.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import torch

from .bench_augment import synthetic_source
from ..errors import FastByolError


def plain_byol_step(model, optimizer, v1: torch.Tensor, v2: torch.Tensor, tau: float) -> torch.Tensor:
    """The straightforward PyTorch BYOL step we measure against: eager F.normalize + MSE loss, a per-parameter EMA
    loop in Python (NCHW inputs and model are the caller's choice)."""
    import torch.nn.functional as F

    def regression(p, z):
        return (2 - 2 * (F.normalize(p, dim=1) * F.normalize(z.detach(), dim=1)).sum(dim=1)).mean()

    p1, p2, z1, z2 = model(v1, v2)
    loss = regression(p1, z2) + regression(p2, z1)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    with torch.no_grad():
        target, online = model.ema_pairs()
        for t, o in zip(target, online):
            t.mul_(tau).add_(o, alpha=1 - tau)
    return loss.detach()


@dataclass(frozen=True)
class StepCase:
    """What one row of the step benchmark measures: the model and batch, and how the step runs and is fed.

    variant: 'fastbyol' (channels_last model and views, bf16 autocast on CUDA, cuDNN autotuning for the fixed
    shapes, the fused loss and single-launch EMA, LARS, and torch.compile of the forward in mode `compile` ('off' or
    a torch.compile mode), as the trainer runs it) or 'plain' (NCHW, fp32, eager F.normalize + MSE loss,
    per-parameter EMA loop, the same LARS, cuDNN's default (no autotuning), as a plain script runs it).
    compile_backend: torch.compile's backend ('inductor'; 'eager' traces the graph without generating code: the GPU
    plan's CPU dry run). source: 'synthetic' (views already on the device: the step alone) or 'dali' (the trainer's
    DALI pipeline over synthetic JPEGs, decoded and augmented on the GPU: the step fed as in training)."""

    arch: str
    size: int
    batch: int
    variant: str = "fastbyol"
    proj_hidden: int = 4096
    stem: str = "auto"
    compile: str = "off"
    compile_backend: str = "inductor"
    source: str = "synthetic"

    def check(self) -> None:
        """One line for a case the benchmark cannot run."""
        if self.variant not in ("fastbyol", "plain"):
            raise FastByolError(f"variant must be fastbyol or plain, got {self.variant!r}")
        if self.source not in ("synthetic", "dali"):
            raise FastByolError(f"source must be synthetic or dali, got {self.source!r}")
        if self.variant == "plain" and self.compile != "off":
            raise FastByolError("the plain step is never compiled")


def bench_step(case: StepCase, steps: int = 10, warmup: int = 3, device: str | None = None) -> dict:
    """BYOL img/s (and MFU on a GPU) of the training step `case` describes: `warmup` steps (compilation included)
    timed apart as warmup_seconds, then `steps` timed steps. On CUDA, peak_memory_gb is the peak allocated by torch
    during warm-up and timed steps (the model, optimizer state and activations; DALI's own buffers are not torch's)."""
    case.check()
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cudnn_benchmark = case.variant == "fastbyol" and dev.type == "cuda"
    previous = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = cudnn_benchmark  # for this row only (restored below)
    try:
        return _measure(case, steps, warmup, dev)
    finally:
        torch.backends.cudnn.benchmark = previous


def _measure(case: StepCase, steps: int, warmup: int, dev: torch.device) -> dict:
    arch, size, batch, variant, compile = case.arch, case.size, case.batch, case.variant, case.compile
    cudnn_benchmark = torch.backends.cudnn.benchmark
    from ..augment import LoaderSettings, TwoViewLoader
    from ..models import BYOL, build_encoder
    from ..optim import LARS
    from ..run.perf import flops_per_image, mfu, peak_flops
    from ..train import byol_step

    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    torch.manual_seed(0)
    model = BYOL(build_encoder(arch, case.stem, size), case.proj_hidden, 256, case.proj_hidden).to(dev)
    fmt = torch.channels_last if variant == "fastbyol" else torch.contiguous_format
    model = model.to(memory_format=fmt)
    flops = flops_per_image(model, size, dev)
    optimizer = LARS(model.online_parameters(), lr=0.1, weight_decay=1e-6)
    target, online = model.ema_pairs()
    bf16 = variant == "fastbyol" and dev.type == "cuda"
    # the trainer's views: fp16 on CUDA (bf16 autocast takes them as they are), fp32 on CPU
    view_dtype = torch.float16 if bf16 else torch.float32
    if case.source == "synthetic":
        gen = torch.Generator(device=dev).manual_seed(0)
        views = [torch.randn(batch, 3, size, size, device=dev, generator=gen).to(view_dtype).contiguous(
            memory_format=fmt) for _ in range(2)]

        def batches():
            while True:
                yield views
    else:
        loader = TwoViewLoader(synthetic_source(size, batch * 4, "jpeg"),
                               LoaderSettings(batch, size, device="cuda" if dev.type == "cuda" else "cpu",
                                              num_threads=min(8, os.cpu_count() or 1)))

        def batches():
            while True:
                for v1, v2 in loader.epoch():
                    yield (v1.to(view_dtype).contiguous(memory_format=fmt),
                           v2.to(view_dtype).contiguous(memory_format=fmt))
    net = model if compile == "off" else torch.compile(model, mode=None if compile == "default" else compile,
                                                       backend=case.compile_backend)

    def one_step(v1, v2):
        if variant == "fastbyol":
            return byol_step(net, optimizer, (target, online), (v1, v2), 0.1, 0.996, bf16=bf16)
        return plain_byol_step(model, optimizer, v1, v2, 0.996)

    stream = batches()
    t0 = time.perf_counter()
    for _ in range(warmup):
        loss = one_step(*next(stream))
    loss.item()  # sync
    warmup_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = one_step(*next(stream))
    loss.item()  # sync: the last step is done
    seconds = time.perf_counter() - t0
    img_s = steps * batch / seconds
    peak = peak_flops(dev)
    return {"arch": arch, "size": size, "batch": batch, "variant": variant, "compile": compile, "source": case.source,
            "device": str(dev), "img_per_s": img_s, "step_ms": 1000 * seconds / steps, "flops_per_image": flops,
            "mfu": mfu(img_s, flops, peak), "warmup_seconds": warmup_seconds, "steps": steps,
            "compile_backend": case.compile_backend if compile != "off" else None, "cudnn_benchmark": cudnn_benchmark,
            "peak_memory_gb": torch.cuda.max_memory_allocated(dev) / 1e9 if dev.type == "cuda" else None}
