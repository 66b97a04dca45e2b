"""Gradient accumulation: one optimizer step from N micro-batches per process (`fastbyol train --accumulate N`).

    fastbyol train --preset imagenet-resnet50 --accumulate 8    # batch 4096 on few GPUs: 8 micro-batches a step

The loader delivers each process its share of the global batch as without accumulation (the views are drawn per
image, so `--accumulate 1` and N train on the same images with the same augmentations); `accumulated_step` cuts the
two (B, 3, S, S) views into N slices along the batch (views of the loader's tensors, no copy) and runs one forward and
one backward per slice. The loss of a slice is the mean over its B/N images; scaled by 1/N before its backward, the
summed gradient is the mean over the process's B images, and DDP's average over the processes makes it the mean over
the global batch: the gradient of one big batch. DDP all-reduces the gradients only in the last backward
(`no_sync` around the others). Then one LARS step at lr_at(step) and one EMA update at tau_at(step): the schedules,
log points and checkpoints count optimizer steps, so a checkpoint always falls between two optimizer steps and a
resume is exact.

BatchNorm normalises each micro-batch with its own statistics (and updates its running statistics once per
micro-batch): a step equals the big-batch step exactly only for a model without batch statistics, which is what
tests/test_accumulate.py compares (BN in eval mode, float64).

Memory: the activations kept for the backward, the bulk of a training step's memory, scale with the micro-batch; the
views of the whole per-process batch stay on the device (2 x B x 3 x S x S fp16 values), which is small beside them.
"""

from __future__ import annotations

import contextlib

import torch

from .kernels import byol_loss_symmetric, ema_update_
from .optim import LARS


def micro_batches(v1: torch.Tensor, v2: torch.Tensor, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The two views cut into n equal slices along the batch: n pairs of (B/n, 3, S, S) views of the same memory (a
    channels_last batch gives channels_last slices). B must divide by n (Config.resolve checks it)."""
    return list(zip(v1.chunk(n), v2.chunk(n), strict=True))


def _no_sync(net):
    """DDP's no_sync for a network that is DDP (or torch.compile of DDP); nothing to hold back otherwise."""
    from torch.nn.parallel import DistributedDataParallel

    inner = getattr(net, "_orig_mod", net)  # torch.compile's wrapper keeps the module it compiled here
    return inner.no_sync() if isinstance(inner, DistributedDataParallel) else contextlib.nullcontext()


def accumulated_step(model, optimizer: LARS, target_params: list, online_params: list, v1: torch.Tensor,
                     v2: torch.Tensor, lr: float, tau: float, accumulate: int, bf16: bool = False) -> torch.Tensor:
    """One BYOL optimizer step from `accumulate` micro-batches of the views; returns the mean of their losses as a
    device tensor (no host sync): the loss of the whole batch for a model without batch statistics.

    model: the BYOL module, or it wrapped in DDP and/or torch.compile (anything returning p1, p2, z1, z2)."""
    optimizer.set_lr(lr)
    optimizer.zero_grad(set_to_none=True)
    loss_sum = None
    parts = micro_batches(v1, v2, accumulate)
    for i, (m1, m2) in enumerate(parts):
        # DDP: the gradient all-reduce only in the last backward; the others add into the local gradients
        with _no_sync(model) if i < len(parts) - 1 else contextlib.nullcontext():
            with torch.autocast(device_type=v1.device.type, dtype=torch.bfloat16, enabled=bf16):
                p1, p2, z1, z2 = model(m1, m2)  # BN: this micro-batch's statistics
                loss = byol_loss_symmetric(p1, p2, z1, z2)  # the mean over this micro-batch's images
            (loss / accumulate).backward()  # summed over the micro-batches: the mean over the whole batch
        loss_sum = loss.detach() if loss_sum is None else loss_sum + loss.detach()
    optimizer.step()
    ema_update_(target_params, online_params, tau)  # once per optimizer step, after it
    return loss_sum / accumulate
