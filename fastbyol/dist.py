"""Data-parallel pieces: process-group set-up from torchrun's environment, and batch norm over all ranks.

On CUDA the official recipe's cross-replica BN is `nn.SyncBatchNorm`; it needs CUDA, so on the CPU (gloo) the same
statistics come from `GlobalBatchNorm`: each rank's sum, sum of squares and count are all-reduced through the
autograd-aware collective, so the backward is the single-process backward of the whole global batch.
`convert_batchnorm(model)` picks the right one for the device.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.nn as nn


def world() -> tuple[int, int, int]:
    """(rank, local_rank, world_size) from torchrun's environment; (0, 0, 1) without it."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


_BN_GROUP = None


def _bn_group():
    """A process group of its own for the BN statistics, so their collectives never interleave with DDP's
    asynchronous gradient all-reduces on the default group."""
    global _BN_GROUP
    if _BN_GROUP is None:
        _BN_GROUP = dist.new_group(backend="gloo")
    return _BN_GROUP


def init_distributed(device_type: str) -> tuple[int, int, bool]:
    """Join the process group torchrun describes (nccl on CUDA, gloo on CPU).

    Returns (rank, world_size, created): created is True when this call made the group (the caller then destroys
    it), False when there is one process or the caller's code had already joined a group."""
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), False
    rank, local_rank, world_size = world()
    if world_size == 1:
        return rank, world_size, False
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    if device_type != "cuda":
        _bn_group()  # made now, by every rank together, not lazily in the first forward
    return rank, world_size, True


def close_distributed() -> None:
    global _BN_GROUP
    if dist.is_initialized():
        dist.destroy_process_group()
    _BN_GROUP = None


def broadcast_object(obj, rank: int, world_size: int):
    """Rank 0's value of a picklable object, on every rank (collective); `obj` itself with one process."""
    if world_size == 1:
        return obj
    box = [obj if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(obj, world_size: int) -> list:
    """Every rank's value of a picklable object, in rank order, on every rank (collective); [obj] with one process."""
    if world_size == 1:
        return [obj]
    out = [None] * world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(world_size: int) -> None:
    """Wait until every rank gets here (collective); nothing with one process."""
    if world_size > 1:
        dist.barrier()


def global_mean(t: torch.Tensor, world_size: int) -> float:
    """sync: a device scalar averaged over the ranks, to the host (collective; call it at log and checkpoint points
    only). `t` itself is left unchanged."""
    if world_size > 1:
        t = t.detach().clone()
        dist.all_reduce(t)
        t /= world_size
    return t.item()


class GlobalBatchNorm(nn.BatchNorm2d):
    """BatchNorm over the union of every rank's batch (for 2-D and 4-D inputs), CPU-friendly.

    Training: per-channel sum, sum of squares and count all-reduced (autograd-aware), biased variance to normalize,
    unbiased to update the running estimate, as nn.BatchNorm does. Evaluation: the running statistics."""

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.ndim not in (2, 4):
            raise ValueError(f"GlobalBatchNorm expects 2-D or 4-D input, got {x.ndim}-D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or not dist.is_initialized() or dist.get_world_size() == 1:
            return super().forward(x)
        import warnings

        import torch.distributed.nn.functional as dist_fn

        dims = [0] if x.ndim == 2 else [0, 2, 3]
        shape = [1, -1] if x.ndim == 2 else [1, -1, 1, 1]
        xf = x.float()
        count = torch.tensor([x.numel() / x.shape[1]], device=x.device, dtype=torch.float32)
        stats = torch.cat([xf.sum(dims), (xf * xf).sum(dims), count])
        with warnings.catch_warnings():  # its deprecation notice names a replacement without autograd support
            warnings.simplefilter("ignore", FutureWarning)
            stats = dist_fn.all_reduce(stats, group=_bn_group())  # sums over ranks; backward all-reduces the grads
        c = x.shape[1]
        n = stats[2 * c]
        mean = stats[:c] / n
        var = (stats[c:2 * c] / n - mean * mean).clamp_min(0.0)
        with torch.no_grad():
            self.num_batches_tracked += 1
            m = self.momentum
            self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
            self.running_var.mul_(1 - m).add_(var.detach() * n / (n - 1).clamp_min(1), alpha=m)
        y = (xf - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)


def convert_batchnorm(module: nn.Module, device_type: str) -> nn.Module:
    """Every BatchNorm1d/2d -> SyncBatchNorm on CUDA, GlobalBatchNorm elsewhere; the parameters and buffers are the
    same objects, so a frozen (target) BN stays frozen."""
    if device_type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)) and not isinstance(module, GlobalBatchNorm):
        new = GlobalBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                              module.track_running_stats)
        if module.affine:  # the same Parameter objects: requires_grad (False in the target) and identity kept
            new.weight, new.bias = module.weight, module.bias
        if module.track_running_stats:
            new.running_mean, new.running_var = module.running_mean, module.running_var
            new.num_batches_tracked = module.num_batches_tracked
        new.train(module.training)
        return new
    for name, child in module.named_children():
        module.add_module(name, convert_batchnorm(child, device_type))
    return module
