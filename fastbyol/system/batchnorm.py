"""Batch norm over all ranks: `GlobalBatchNorm`, the process group its statistics are summed over, and
`convert_batchnorm`, which swaps it into a model.

The official recipe's BN is cross-replica. `nn.SyncBatchNorm` needs CUDA and breaks a torch.compile graph at every
BN layer (c10d calls Dynamo cannot trace), so `GlobalBatchNorm` does it for CUDA (NCCL) and the CPU (gloo) alike:
each rank's per-channel mean, sum of squared deviations and count are exchanged by one functional all-reduce that
Dynamo traces, so a compiled model has no graph break (tests/test_dist_batchnorm.py counts them with
torch._dynamo.explain under gloo), and the backward is the single-process backward of the whole global batch.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn

_BN_GROUP = None


def cpu_bn_group():
    """A gloo process group of its own for the BN statistics on the CPU (see `_bn_group`); collective the first
    time (every rank together: `fastbyol.system.distributed.init_distributed` makes it)."""
    global _BN_GROUP
    if _BN_GROUP is None:
        _BN_GROUP = dist.new_group(backend="gloo")
    return _BN_GROUP


def forget_bn_group() -> None:
    """Drop the BN group (its process groups were destroyed with the default one)."""
    global _BN_GROUP
    _BN_GROUP = None


class _AllReduceSum(torch.autograd.Function):
    """Sum over the ranks of a process group, with the functional collective (`_c10d_functional.all_reduce`), which
    Dynamo traces into the graph; SyncBatchNorm's and `torch.distributed.nn`'s c10d calls break the graph instead.
    Backward: the incoming gradients summed over the ranks (d/ds_r of sum_r' L_r')."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group_name: str) -> torch.Tensor:
        ctx.group_name = group_name
        # wait_tensor: on CUDA the current stream waits for NCCL's (no host sync); on the CPU the host waits for gloo
        return torch.ops._c10d_functional.wait_tensor(torch.ops._c10d_functional.all_reduce(x, "sum", group_name))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        summed = torch.ops._c10d_functional.all_reduce(grad.contiguous(), "sum", ctx.group_name)
        return torch.ops._c10d_functional.wait_tensor(summed), None


class GlobalBatchNorm(nn.BatchNorm2d):
    """BatchNorm over the union of every rank's batch (2-D and 4-D inputs), traceable by torch.compile, on CUDA
    (NCCL) and on the CPU (gloo).

    Training: each rank's per-channel (mean, M2 = sum of squared deviations, count), from torch.var_mean (two-pass /
    Welford: no sum-of-squares cancellation when |mean| >> std), goes into its row of a (world, 2C + 1) table; one
    autograd-aware functional all-reduce sums the table, so every rank holds every row, and the rows combine by
    Chan's formula, as SyncBatchNorm combines its gathered statistics. The backward is the single-process backward
    of the global batch. Biased variance to normalize, unbiased for the running estimate, as nn.BatchNorm does;
    statistics in float32 (float64 for float64 inputs). Evaluation, or no group: plain BN.

    Nothing computed in the forward depends on the running buffers, which are updated in place: torch 2.13's
    AOTAutograd was seen to give wrong input gradients when a value used in the backward is derived from a buffer
    mutated later in the same graph (the running mean as a shift for the sums; tests/test_dist_batchnorm.py).

    group_name, rank, world_size: the process group the statistics are summed over and this process's place in it,
    set by `convert_batchnorm`; group_name None = plain BN."""

    group_name: str | None = None
    rank: int = 0
    world_size: int = 1

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.ndim not in (2, 4):
            raise ValueError(f"GlobalBatchNorm expects 2-D or 4-D input, got {x.ndim}-D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.group_name is None:
            return super().forward(x)
        self._check_input_dim(x)
        c = x.shape[1]
        dims = [0] if x.ndim == 2 else [0, 2, 3]
        shape = [1, c] if x.ndim == 2 else [1, c, 1, 1]
        xf = x.to(torch.promote_types(x.dtype, torch.float32))  # bf16/fp16 activations: fp32 statistics
        var_local, mean_local = torch.var_mean(xf, dim=dims, correction=0)  # (C,) each
        n_local = torch.full((1,), x.numel() // c, device=x.device, dtype=xf.dtype)
        mine = (torch.arange(self.world_size, device=x.device) == self.rank).to(xf.dtype)  # (world,) one-hot
        row = torch.cat([mean_local, var_local * n_local, n_local])  # (2C + 1,) mean, M2, count
        # (world, 2C + 1): every rank's row, after one all-reduce (its backward sums the gradients over the ranks)
        table = _AllReduceSum.apply(mine[:, None] * row[None, :], self.group_name)
        means, m2s, counts = table[:, :c], table[:, c:2 * c], table[:, 2 * c:]  # (world, C), (world, C), (world, 1)
        n = counts.sum()
        mean = (counts * means).sum(0) / n
        var = (m2s + counts * (means - mean) ** 2).sum(0) / n  # biased: what normalizes
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                # momentum None: the cumulative average, as nn.BatchNorm
                factor = (self.momentum if self.momentum is not None
                          else 1.0 / self.num_batches_tracked.to(self.running_mean.dtype))
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), factor)
                unbiased = var * n / (n - 1).clamp_min(1.0)
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), factor)
        y = (xf - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)


def _bn_group(device_type: str) -> tuple[str, int, int]:
    """(group name, rank in it, its size) of the group the BN statistics are summed over: the default (NCCL) group
    on CUDA, as SyncBatchNorm; on the CPU a gloo group of its own (made by every rank together in
    `init_distributed`), so its collectives never interleave with DDP's asynchronous gradient all-reduces."""
    group = dist.group.WORLD if device_type == "cuda" else cpu_bn_group()
    return group.group_name, dist.get_rank(group), dist.get_world_size(group)


def convert_batchnorm(module: nn.Module, device_type: str) -> nn.Module:
    """Every BatchNorm1d/2d -> GlobalBatchNorm summing its statistics over all ranks (call after the process group
    is made, on every rank); the parameters and buffers are the same objects, so a frozen (target) BN stays frozen.
    Without a process group the converted layers are plain BN."""
    return _convert(module, _bn_group(device_type) if dist.is_initialized() else (None, 0, 1))


def _convert(module: nn.Module, group: tuple[str | None, int, int]) -> nn.Module:
    if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)) and not isinstance(module, GlobalBatchNorm):
        new = GlobalBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                              module.track_running_stats)
        if module.affine:  # the same Parameter objects: requires_grad (False in the target) and identity kept
            new.weight, new.bias = module.weight, module.bias
        if module.track_running_stats:
            new.running_mean, new.running_var = module.running_mean, module.running_var
            new.num_batches_tracked = module.num_batches_tracked
        new.group_name, new.rank, new.world_size = group
        new.train(module.training)
        return new
    if isinstance(module, GlobalBatchNorm):
        module.group_name, module.rank, module.world_size = group
        return module
    for name, child in module.named_children():
        module.add_module(name, _convert(child, group))
    return module
