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


def init_distributed(device_type: str) -> tuple[int, int]:
    """Join the process group torchrun describes (nccl on CUDA, gloo on CPU); returns (rank, world_size)."""
    rank, local_rank, world_size = world()
    if world_size > 1 and not dist.is_initialized():
        if device_type == "cuda":
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    return rank, world_size


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
        import torch.distributed.nn.functional as dist_fn

        dims = [0] if x.ndim == 2 else [0, 2, 3]
        shape = [1, -1] if x.ndim == 2 else [1, -1, 1, 1]
        xf = x.float()
        count = torch.tensor([x.numel() / x.shape[1]], device=x.device, dtype=torch.float32)
        stats = torch.cat([xf.sum(dims), (xf * xf).sum(dims), count])
        stats = dist_fn.all_reduce(stats)  # sums over ranks; its backward all-reduces the gradients
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
    """Every BatchNorm1d/2d -> SyncBatchNorm on CUDA, GlobalBatchNorm elsewhere; weights and statistics kept."""
    if device_type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)) and not isinstance(module, GlobalBatchNorm):
        new = GlobalBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                              module.track_running_stats)
        new.load_state_dict(module.state_dict())
        return new
    for name, child in module.named_children():
        module.add_module(name, convert_batchnorm(child, device_type))
    return module
