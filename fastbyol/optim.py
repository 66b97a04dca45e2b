"""LARS as a torch.optim.Optimizer: the step of `fastbyol.reference.lars_update_`, done with foreach ops.

Biases and BN parameters (every 1-D parameter) are excluded from weight decay and from the trust ratio, as in
the official BYOL recipe. The learning rate is set per step by the trainer (`set_lr`, a float or a 0-D tensor on
the parameters' device), from `reference.lr_at`.

`lars_foreach_` does the reference's per-parameter arithmetic as a few multi-tensor kernels over the whole list
(ResNet-50 + BYOL heads: 161 parameters; the per-parameter loop launches about 8 kernels per parameter, the foreach
form a fixed dozen or so per step), with no host sync: the trust ratios stay on the device. Tested equal to the
reference in float64 (tests/test_optim.py).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from .reference import lars_excluded, lars_update_


@torch.no_grad()
def lars_foreach_(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    momentum_buffers: list[torch.Tensor],
    lr: float | torch.Tensor,
    weight_decay: float,
    momentum: float = 0.9,
    trust_coefficient: float = 1e-3,
    excluded: list[bool] | None = None,
) -> None:
    """`reference.lars_update_` with foreach ops: the same u, trust ratio, momentum and update, in place.

    Every tensor must share one device and dtype (the caller falls back to the reference otherwise)."""
    if not params:
        return
    if excluded is None:
        excluded = [lars_excluded(p) for p in params]
    scaled = [i for i, skip in enumerate(excluded) if not skip]
    kept = [i for i, skip in enumerate(excluded) if skip]
    torch._foreach_mul_(momentum_buffers, momentum)
    if scaled:
        ws, gs = [params[i] for i in scaled], [grads[i] for i in scaled]
        us = torch._foreach_add(gs, ws, alpha=weight_decay) if weight_decay else gs  # u = g + wd * w
        w_norms = torch.stack(torch._foreach_norm(ws))
        u_norms = torch.stack(torch._foreach_norm(us))
        trust = torch.where((w_norms > 0) & (u_norms > 0), trust_coefficient * w_norms / u_norms,
                            torch.ones_like(w_norms))
        if weight_decay:  # us are new tensors: scale them in place
            torch._foreach_mul_(us, list(trust.unbind(0)))
        else:  # us are the gradients, which are read only
            us = torch._foreach_mul(us, list(trust.unbind(0)))
        torch._foreach_add_([momentum_buffers[i] for i in scaled], us)
    if kept:  # biases and BN: u = g
        torch._foreach_add_([momentum_buffers[i] for i in kept], [grads[i] for i in kept])
    if isinstance(lr, torch.Tensor):
        torch._foreach_sub_(params, torch._foreach_mul(momentum_buffers, lr))
    else:
        torch._foreach_add_(params, momentum_buffers, alpha=-lr)


class LARS(torch.optim.Optimizer):
    def __init__(
        self,
        params: Iterable[torch.Tensor],
        lr: float,
        weight_decay: float = 1e-6,
        momentum: float = 0.9,
        trust_coefficient: float = 1e-3,
        foreach: bool = True,
    ):
        if not isinstance(lr, torch.Tensor) and lr < 0:
            raise ValueError(f"LARS: lr must be >= 0, got {lr}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"LARS: momentum must be in [0, 1), got {momentum}")
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, trust_coefficient=trust_coefficient)
        super().__init__(params, defaults)
        self.foreach = foreach

    def set_lr(self, lr: float | torch.Tensor) -> None:
        for group in self.param_groups:
            group["lr"] = lr

    @torch.no_grad()
    def step(self, closure=None):  # noqa: D102 (torch.optim signature)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params, grads, bufs, excluded = [], [], [], []
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                params.append(p)
                grads.append(p.grad)
                bufs.append(state["momentum_buffer"])
                excluded.append(lars_excluded(p))
            same_kind = len({(p.device, p.dtype) for p in params + grads + bufs}) <= 1
            update = lars_foreach_ if self.foreach and same_kind else lars_update_
            update(
                params,
                grads,
                bufs,
                lr=group["lr"],
                weight_decay=group["weight_decay"],
                momentum=group["momentum"],
                trust_coefficient=group["trust_coefficient"],
                excluded=excluded,
            )
        return loss
