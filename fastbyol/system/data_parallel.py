"""Data parallelism of the BYOL step under torchrun: cross-replica BN, then DDP around the online network alone.

    online = wrap_online(model, device, cfg.distributed)      # on every rank, after the process group is up
    net = fastbyol.models.compile_networks(model, mode, online=online)

What DDP is given, and why:
- The online network only (`fastbyol.models.networks.OnlineNetwork`): the target has no gradients. A network
  compiled whole compiles the DDP module with it, and Dynamo splits the online graph at bucket boundaries, so the
  buckets' all-reduces overlap the backward; one compiled block by block (ResNets) keeps DDP eager around its compiled
  blocks, whose gradients reach DDP's hooks as each block's backward ends.
- `gradient_as_bucket_view=True`, and every online gradient made a zero tensor before DDP is built, so that DDP makes
  each one a view of its all-reduce bucket from the start; `byol_step` then zeroes them in place
  (`zero_grad(set_to_none=False)`) instead of freeing them, and the backward accumulates into the buckets: nothing is
  copied into them, one copy of the gradients in memory, and whatever strides a backward (eager or compiled, CPU or
  GPU) gives a gradient never matter. With gradients freed every step, each new gradient was copied into its bucket,
  and a 1x1 convolution's (channels_last and contiguous at once: the same bytes under two sets of strides) drew DDP's
  "grad strides do not match bucket view strides" warning whenever the backward chose the other set.
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


def wrap_online(model, device: torch.device, settings) -> nn.Module:
    """Cross-replica BN over `settings.bn_group` ranks (0: all), the gradients as DDP's bucket views, and DDP around
    the online network with `settings.bucket_mb` and `settings.grad_reduce` (see the module docstring). Collective:
    every rank calls it, after `init_distributed`, before the first step."""
    from torch.nn.parallel import DistributedDataParallel

    from ..models.networks import OnlineNetwork

    if settings.grad_reduce not in GRAD_REDUCE:
        raise ValueError(f"grad_reduce must be one of {GRAD_REDUCE}, got {settings.grad_reduce!r}")
    convert_batchnorm(model, device.type, settings.bn_group, group_timeout())  # its waits: --dist-timeout
    online = OnlineNetwork(model)
    for param in online.parameters():  # DDP takes these over as its buckets' views (see the module docstring)
        if param.requires_grad and param.grad is None:
            param.grad = torch.zeros_like(param)  # the parameter's own strides
    no_buffer_sync = ({"forward_sync_buffers": False}  # newer torch's name for the same switch
                      if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
                      else {"broadcast_buffers": False})
    ddp = DistributedDataParallel(online, device_ids=[device.index] if device.type == "cuda" else None,
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
