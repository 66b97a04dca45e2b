"""Batch norm for BYOL's one-pass step and over many ranks: `GlobalBatchNorm`, the process groups its statistics are
summed over, and `convert_batchnorm`, which swaps it into a model.

Two jobs, one layer:
- Per view. BYOL's statistics are per view (the official code forwards each view separately). To run each network
  once on both views stacked (2B rows: twice the rows in every convolution and matrix product, half the launches),
  a layer told `views = 2` normalises each half of its batch with that half's statistics and updates its running
  statistics once per half, in order, exactly as two sequential passes do.
- Over the ranks. The official recipe's BN is cross-replica. `nn.SyncBatchNorm` needs CUDA and breaks a
  torch.compile graph at every BN layer (c10d calls Dynamo cannot trace); here every rank's per-view, per-channel
  sums go into one functional all-reduce that Dynamo traces into the graph (no break), and the backward, through the
  same collective, is the single-process backward of the global batch.

What a rank sends, per layer and step: for each view, (sum of x, sum of x^2) per channel and the count, in float64:
a (views, 2C + 1) tensor whose size does not depend on the number of ranks (a table with a row per rank did, and
grew with the cluster). The sums are formed from each rank's own two-pass statistics (torch.var_mean: no
sum-of-squares cancellation inside a rank) and combined in float64, where the cancellation of sum(x^2) - N mean^2
costs (|mean| / std)^2 x 1e-16: 1e-10 of the variance at |mean| = 1000 std. A shift taken from the running mean would
do better, but nothing computed in the forward may depend on a buffer mutated in the same graph: torch 2.13's
AOTAutograd was seen to give wrong input gradients then (the backward recomputed from the mutated buffer).

Each layer's collective runs on a process group of its own (`bn_process_group`), NCCL on CUDA and gloo on the CPU,
so it never queues behind DDP's gradient buckets on the default group; a group may also be a block of consecutive
ranks (`group_size`, e.g. the GPUs of one node: `fastbyol train --bn-group`).
"""

from __future__ import annotations

from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn as nn

_GROUPS: dict[tuple[str, int], object] = {}  # (backend, group size) -> this rank's group


def bn_process_group(device_type: str, group_size: int = 0, timeout: timedelta | None = None):
    """This rank's process group for BN statistics: all ranks (group_size 0 or the world size), or the block of
    `group_size` consecutive ranks it belongs to; NCCL on CUDA, gloo on the CPU, never the default group; each
    collective bounded by `timeout` (the trainer's --dist-timeout; None: torch's default for the backend).
    Collective the first time for a size: every rank must call it, in the same order (the trainer converts its
    model on every rank before the first step)."""
    world = dist.get_world_size()
    size = group_size or world
    if size < 1 or world % size:
        raise ValueError(f"a BN group of {size} ranks does not divide the {world} processes")
    backend = "nccl" if device_type == "cuda" else "gloo"
    key = (backend, size)
    if key not in _GROUPS:
        if size == world:
            _GROUPS[key] = dist.new_group(backend=backend, timeout=timeout)
        else:  # every rank makes every block (new_group is collective), and keeps its own
            rank = dist.get_rank()
            for start in range(0, world, size):
                group = dist.new_group(ranks=list(range(start, start + size)), backend=backend, timeout=timeout)
                if start <= rank < start + size:
                    _GROUPS[key] = group
    return _GROUPS[key]


def forget_bn_groups() -> None:
    """Drop the BN groups (destroyed with the default group: `fastbyol.system.distributed.close_distributed`)."""
    _GROUPS.clear()


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
    """BatchNorm (2-D and 4-D inputs) with per-view statistics (`views`) and statistics over a process group
    (`group_name`), traceable by torch.compile, on CUDA (NCCL) and on the CPU (gloo).

    Training: the batch is `views` equal blocks of rows (view 1, then view 2, ...); each is normalised with its own
    statistics, taken over that view's rows on every rank of the group; the running statistics are updated once per
    view, in order, as `views` sequential calls would (num_batches_tracked counts views). Biased variance to
    normalize, unbiased for the running estimate, as nn.BatchNorm; statistics in float32 (float64 for float64
    inputs), combined across ranks in float64. Without a group, each view goes through nn.BatchNorm itself.
    Evaluation: plain BN on the running statistics, whatever `views` says.

    group_name, group_size: the process group the statistics are summed over (set by `convert_batchnorm`; None = this
    process alone); views: how many views the batch holds (BYOL sets it around its one-pass forward, 1 otherwise)."""

    group_name: str | None = None
    group_size: int = 1
    views: int = 1

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.ndim not in (2, 4):
            raise ValueError(f"GlobalBatchNorm expects 2-D or 4-D input, got {x.ndim}-D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or (self.group_name is None and self.views == 1):
            return super().forward(x)
        self._check_input_dim(x)
        if x.shape[0] % self.views:
            raise ValueError(f"a batch of {x.shape[0]} rows does not split into {self.views} views")
        if self.group_name is None and not torch.compiler.is_compiling():
            # eager, one process: each view through nn.BatchNorm's own kernels, in order (the sequential passes'
            # arithmetic); compiled, the view-wise form below: one reduction and one normalisation for all views,
            # where a graph of per-view batch norms and a concatenation would generate twice the kernels
            return torch.cat([super(GlobalBatchNorm, self).forward(part) for part in x.chunk(self.views)])
        return self._views_forward(x)

    def _views_forward(self, x: torch.Tensor) -> torch.Tensor:
        v, c = self.views, x.shape[1]
        xf = x.to(torch.promote_types(x.dtype, torch.float32))  # bf16/fp16 activations: fp32 statistics
        xv = xf.view(v, x.shape[0] // v, *x.shape[1:])  # (V, b, C[, H, W]): view after view, no copy
        dims = [1] if x.ndim == 2 else [1, 3, 4]
        var, mean = torch.var_mean(xv, dim=dims, correction=0)  # (V, C) each, this rank's, two-pass
        n = xv[0].numel() // c  # rows x pixels of one view on this rank
        if self.group_name is not None:
            mean, var, n = self._over_group(mean, var, n)  # (V, C), (V, C) float64, (V, 1)
        if self.track_running_stats:
            self._update_running(mean, var * n / ((n - 1).clamp_min(1.0) if self.group_name else max(n - 1, 1)))
        shape = [v, 1, c] + [1] * (x.ndim - 2)  # broadcast over (V, b, C[, H, W])
        y = (xv - mean.to(xf.dtype).view(shape)) * torch.rsqrt(var.to(xf.dtype).view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape[1:]) + self.bias.view(shape[1:])
        return y.reshape(x.shape).to(x.dtype)

    def _over_group(self, mean: torch.Tensor, var: torch.Tensor, n_local: int):
        """Per-view mean and biased variance over the group, from this rank's (V, C) two-pass statistics over
        n_local values per channel: one all-reduce of (sum x, sum x^2, count) per view in float64."""
        v, c = mean.shape
        wide = torch.float64
        mean_w = mean.to(wide)
        count = torch.full((v, 1), float(n_local), dtype=wide, device=mean.device)
        # (V, 2C + 1); the all-reduce's backward sums the gradients over the group
        sums = torch.cat([mean_w * n_local, (var.to(wide) + mean_w * mean_w) * n_local, count], dim=1)
        total = _AllReduceSum.apply(sums, self.group_name)
        n = total[:, 2 * c:]  # (V, 1)
        mean = total[:, :c] / n  # (V, C)
        return mean, (total[:, c:2 * c] / n - mean * mean).clamp_min(0.0), n

    @torch.no_grad()
    def _update_running(self, mean: torch.Tensor, unbiased: torch.Tensor) -> None:
        """The running statistics after one update per view, in view order, as `views` sequential nn.BatchNorm calls
        leave them, written once per buffer: with momentum m, r <- (1 - m)^V r + sum_i m (1 - m)^(V-1-i) s_i;
        momentum None (the cumulative average): r <- (n r + sum_i s_i) / (n + V), n the updates so far."""
        v, dtype = self.views, self.running_mean.dtype
        mean, unbiased = mean.to(dtype), unbiased.to(dtype)  # (V, C)
        if self.momentum is not None:
            m = self.momentum
            # Python floats, not a tensor made from them: that would be a blocking host-to-device copy on CUDA in
            # every eager step (a compiled graph folds it, an eager stem or head would not)
            weights = [m * (1 - m) ** (v - 1 - i) for i in range(v)]
            keep = (1 - m) ** v
            self.running_mean.mul_(keep).add_(sum(w * mean[i] for i, w in enumerate(weights)))
            self.running_var.mul_(keep).add_(sum(w * unbiased[i] for i, w in enumerate(weights)))
        else:
            n = self.num_batches_tracked.to(dtype)
            self.running_mean.mul_(n).add_(mean.sum(0)).div_(n + v)
            self.running_var.mul_(n).add_(unbiased.sum(0)).div_(n + v)
        self.num_batches_tracked.add_(v)


CONVERTIBLE = (nn.BatchNorm1d, nn.BatchNorm2d)  # exactly these types: a subclass may do more in its forward


def convert_batchnorm(module: nn.Module, device_type: str | None = None, group_size: int = 0,
                      timeout: timedelta | None = None) -> nn.Module:
    """Every BatchNorm1d/2d of `module` -> GlobalBatchNorm; the parameters and buffers are the same objects, so a
    frozen (target) BN stays frozen, and a GlobalBatchNorm already there is kept (the same object).

    device_type given and a process group up: the statistics are summed over `bn_process_group(device_type,
    group_size, timeout)` (collective: call it on every rank together); otherwise each process keeps its own
    statistics.
    Subclasses of the BN types (timm's BatchNormAct2d, for example) are left as they are."""
    group = (None, 1)
    if device_type is not None and dist.is_initialized():
        pg = bn_process_group(device_type, group_size, timeout)
        group = (pg.group_name, dist.get_world_size(pg))
    return _convert(module, group)


def _convert(module: nn.Module, group: tuple[str | None, int]) -> nn.Module:
    if type(module) in CONVERTIBLE:
        new = GlobalBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                              module.track_running_stats, device="meta")
        if module.affine:  # the same Parameter objects: requires_grad (False in the target) and identity kept
            new.weight, new.bias = module.weight, module.bias
        if module.track_running_stats:
            new.running_mean, new.running_var = module.running_mean, module.running_var
            new.num_batches_tracked = module.num_batches_tracked
        new.group_name, new.group_size = group
        new.train(module.training)
        return new
    if isinstance(module, GlobalBatchNorm):
        module.group_name, module.group_size = group
        return module
    for name, child in module.named_children():
        module.add_module(name, _convert(child, group))
    return module


def has_other_batchnorm(module: nn.Module) -> bool:
    """Whether `module` holds a batch-statistics layer that is not a GlobalBatchNorm (a BN subclass left as it is):
    such a network cannot share one pass between views (BYOL then forwards each view on its own)."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) and not isinstance(m, GlobalBatchNorm)
               for m in module.modules())


def set_views(layers: list[GlobalBatchNorm], views: int) -> None:
    """Tell BN layers how many views each batch holds (BYOL's one-pass forward: 2 around it, 1 after)."""
    for layer in layers:
        layer.views = views
