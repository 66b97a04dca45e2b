"""LARS as a torch.optim.Optimizer around the reference step in `fastbyol.reference.lars_update_`.

Biases and BN parameters (every 1-D parameter) are excluded from weight decay and from the trust ratio, as in
the official BYOL recipe. The learning rate is set per step by the trainer (`set_lr`), from `reference.lr_at`.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from .reference import lars_excluded, lars_update_


class LARS(torch.optim.Optimizer):
    def __init__(
        self,
        params: Iterable[torch.Tensor],
        lr: float,
        weight_decay: float = 1e-6,
        momentum: float = 0.9,
        trust_coefficient: float = 1e-3,
    ):
        if lr < 0:
            raise ValueError(f"LARS: lr must be >= 0, got {lr}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"LARS: momentum must be in [0, 1), got {momentum}")
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, trust_coefficient=trust_coefficient)
        super().__init__(params, defaults)

    def set_lr(self, lr: float) -> None:
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
            lars_update_(
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
