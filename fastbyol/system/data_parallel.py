"""Data parallelism of the BYOL step under torchrun: cross-replica BN, then DDP around the online network alone.

    online = wrap_online(model, device, cfg.distributed)      # on every rank, after the process group is up
    net = fastbyol.models.compile_networks(model, mode, online=online)

What DDP is given, and why:
- The online network only (`fastbyol.models.networks.OnlineNetwork`): the target has no gradients. A network
  compiled whole compiles the DDP module with it, and Dynamo splits the online graph at bucket boundaries, so the
  buckets' all-reduces overlap the backward; one compiled block by block (ResNets) keeps DDP eager around its compiled
  blocks, whose gradients reach DDP's hooks as each block's backward ends.
- `gradient_as_bucket_view=True`: the gradients are views into the all-reduce buckets (no copy into them, one copy
  of the gradients in memory). A view takes its parameter's strides, so every weight must have the strides its
  gradient is produced with. A 1x1 convolution's weight (Cout, Cin, 1, 1) is channels_last and contiguous at once;
  `.to(memory_format=torch.channels_last)` gives it strides (Cin, 1, Cin, Cin) while a compiled backward may return
  its gradient as (Cin, 1, 1, 1): the same memory order, other strides, and DDP then copies the gradient into the
  bucket instead of writing it there. `one_layout_for_pointwise_convs` gives those weights (online and target, for
  the EMA) the (Cin, 1, 1, 1) strides: the same bytes, no copy, nothing else changes.
- The BN buffers are equal on every rank by construction (identical updates from the all-reduced statistics), so DDP
  does not broadcast them (`broadcast_buffers=False`).
- `bucket_cap_mb` (`--bucket-mb`; 0, the default, leaves DDP's own: 25 MB buckets after a first one of 1 MB, which
  starts the all-reduce early in the backward; a size given applies to every bucket): larger buckets mean fewer
  all-reduces (fewer latencies) but a later first one (less overlap); worth raising when the gradient all-reduce is
  latency-bound (many nodes), lowering for overlap on few GPUs.
- `--grad-reduce bf16`: DDP's bf16 compression hook (gradients cast to bf16 for the all-reduce, the mean cast back to
  fp32): half the bytes on the wire, for bandwidth-bound all-reduces (ViTs, ResNet-200 2x, from ~64 GPUs). It changes
  the recipe: every gradient is rounded to bf16's 8-bit mantissa before LARS; fp32 (the default) is the recipe's.

Cross-replica BN over blocks of consecutive ranks (`--bn-group N`, e.g. 8 = the GPUs of one node) keeps the BN
collectives inside a node (NVLink) at large scale; it changes the recipe (statistics over N x the per-GPU batch instead
of the global batch; the paper's are over all devices), so the default is all ranks.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn as nn

from .batchnorm import convert_batchnorm
from .distributed import group_timeout

GRAD_REDUCE = ("fp32", "bf16")


def one_layout_for_pointwise_convs(module: nn.Module) -> int:
    """Give every 4-D parameter with a 1x1 kernel the strides (Cin, 1, 1, 1), contiguous and channels_last at once
    (same memory order, no copy); returns how many were changed."""
    changed = 0
    for param in module.parameters():
        if param.ndim == 4 and param.shape[2:] == (1, 1):
            flat = param.data.view(-1).view(param.shape)  # (Cin, 1, 1, 1) strides over the same memory
            if flat.stride() != param.stride():
                param.data = flat
                changed += 1
    return changed


def wrap_online(model, device: torch.device, settings) -> nn.Module:
    """Cross-replica BN over `settings.bn_group` ranks (0: all), the 1x1 weights' layout, and DDP around the online
    network with `settings.bucket_mb` and `settings.grad_reduce` (see the module docstring). Collective: every rank
    calls it, after `init_distributed`, before the first step."""
    from torch.nn.parallel import DistributedDataParallel

    from ..models.networks import OnlineNetwork

    if settings.grad_reduce not in GRAD_REDUCE:
        raise ValueError(f"grad_reduce must be one of {GRAD_REDUCE}, got {settings.grad_reduce!r}")
    convert_batchnorm(model, device.type, settings.bn_group, group_timeout())  # its waits: --dist-timeout
    one_layout_for_pointwise_convs(model)
    no_buffer_sync = ({"forward_sync_buffers": False}  # newer torch's name for the same switch
                      if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
                      else {"broadcast_buffers": False})
    ddp = DistributedDataParallel(OnlineNetwork(model), device_ids=[device.index] if device.type == "cuda" else None,
                                  gradient_as_bucket_view=True, bucket_cap_mb=settings.bucket_mb or None,
                                  **no_buffer_sync)
    if settings.grad_reduce == "bf16":
        ddp.register_comm_hook(None, bf16_gradient_hook)
    return ddp


def bf16_gradient_hook(process_group, bucket):
    """DDP communication hook: the bucket cast to bf16 and divided by the group size, all-reduced, and the mean cast
    back into the fp32 bucket. The arithmetic of torch's `default_hooks.bf16_compress_hook`, which DDP accepts on
    NCCL only; this one runs on gloo too, so the CPU tests check what the GPUs run."""
    import torch.distributed as dist

    group = process_group if process_group is not None else dist.group.WORLD
    buffer = bucket.buffer()
    compressed = buffer.to(torch.bfloat16).div_(group.size())

    def decompress(fut):
        buffer.copy_(fut.value()[0])
        return buffer

    return dist.all_reduce(compressed, group=group, async_op=True).get_future().then(decompress)
