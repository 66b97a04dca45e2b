"""The BYOL math as plain-PyTorch pure functions: the single source of truth.

Each function here is written once and used three times: as the CPU path, as the test oracle for the Triton
kernels in `fastbyol.kernels`, and as the baseline in `benchmarks/`. Nothing here syncs with the host.

Recipe (deepmind-research `byol/`, the official code):
- loss per pair ||p/|p| - z/|z|||^2 = 2 - 2 cos(p, z), z detached, mean over the batch; the symmetric total is
  loss(p1, z2) + loss(p2, z1), summed, not averaged;
- target <- tau * target + (1 - tau) * online, parameters only (the target keeps its own BN statistics);
- tau_k = 1 - (1 - tau_base) * (cos(pi k / K) + 1) / 2;
- lr = base * batch / 256, linear warmup from 0, cosine decay to 0;
- LARS: weight decay added to the gradient before the trust ratio eta * |w| / |g|, momentum 0.9; 1-D parameters
  (biases, BN) are excluded from both decay and adaptation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

NORM_EPS = 1e-12  # the floor of a row norm, as F.normalize uses: x / max(|x|, eps)


# ----------------------------------------------------------------------------------------------------------- loss
def byol_loss_reference(p: torch.Tensor, z: torch.Tensor, eps: float = NORM_EPS) -> torch.Tensor:
    """Mean over rows of 2 - 2 cos(p_i, z_i); (B, D) inputs, z gets no gradient; fp32 (or fp64) math."""
    if p.ndim != 2 or p.shape != z.shape:
        raise ValueError(f"byol_loss expects two (B, D) tensors of one shape, got {tuple(p.shape)} and "
                         f"{tuple(z.shape)}")
    compute = torch.float64 if p.dtype == torch.float64 else torch.float32
    pf = p.to(compute)
    zf = z.detach().to(compute)
    pn = pf / pf.norm(dim=1, keepdim=True).clamp_min(eps)
    zn = zf / zf.norm(dim=1, keepdim=True).clamp_min(eps)
    return (2.0 - 2.0 * (pn * zn).sum(dim=1)).mean()


def byol_loss_symmetric_reference(
    p1: torch.Tensor, p2: torch.Tensor, z1: torch.Tensor, z2: torch.Tensor, eps: float = NORM_EPS
) -> torch.Tensor:
    """loss(p1, z2) + loss(p2, z1): each view's prediction regresses the other view's target projection."""
    return byol_loss_reference(p1, z2, eps) + byol_loss_reference(p2, z1, eps)


def byol_loss_and_grad_reference(p: torch.Tensor, z: torch.Tensor, eps: float = NORM_EPS):
    """(loss, dloss/dp) of byol_loss_reference in closed form: what the fused kernel computes in one pass.

    dL/dp_i = -(2 / B) (z_i / (n_p n_z) - c_i p_i / n_p^2 [|p_i| > eps]),  n = max(|.|, eps), c_i = cos(p_i, z_i).
    Needs no autograd, so it can serve as a custom op's CPU kernel; tests check it against autograd of
    byol_loss_reference in float64.
    """
    compute = torch.float64 if p.dtype == torch.float64 else torch.float32
    pf, zf = p.detach().to(compute), z.detach().to(compute)
    B = pf.shape[0]
    p_norm = pf.norm(dim=1, keepdim=True)
    n_p, n_z = p_norm.clamp_min(eps), zf.norm(dim=1, keepdim=True).clamp_min(eps)
    cos = (pf * zf).sum(dim=1, keepdim=True) / (n_p * n_z)
    loss = (2.0 - 2.0 * cos).mean()
    coef_p = torch.where(p_norm > eps, cos / (n_p * n_p), torch.zeros_like(cos))
    grad = (-2.0 / B) * (zf / (n_p * n_z) - coef_p * pf)
    return loss, grad.to(p.dtype)


# ------------------------------------------------------------------------------------------------------------ EMA
@torch.no_grad()
def ema_update_reference_(
    target: Sequence[torch.Tensor], online: Sequence[torch.Tensor], tau: float | torch.Tensor
) -> None:
    """target <- tau * target + (1 - tau) * online for each pair, in place; a per-tensor Python loop.

    The naive baseline: one read of each tensor pair and one write of the target, but 2 launches per tensor
    (~320 tensors for ResNet-50 + heads), so the launch overhead dominates on a GPU.
    """
    if len(target) != len(online):
        raise ValueError(f"ema_update_: {len(target)} target tensors but {len(online)} online tensors")
    for t, o in zip(target, online):
        if not t.is_floating_point():
            continue
        # t + (1 - tau) * (o - t) == tau * t + (1 - tau) * o
        t.lerp_(o.to(t.dtype), 1.0 - tau if not torch.is_tensor(tau) else (1.0 - tau).to(t.dtype))


# ------------------------------------------------------------------------------------------------------ schedules
def tau_at(step: int, total_steps: int, tau_base: float) -> float:
    """EMA decay at step k of K: 1 - (1 - tau_base) * (cos(pi k / K) + 1) / 2 (tau_base at 0, 1.0 at K)."""
    if total_steps <= 0:
        return tau_base
    k = min(max(step, 0), total_steps)
    return 1.0 - (1.0 - tau_base) * (math.cos(math.pi * k / total_steps) + 1.0) / 2.0


def scaled_lr(base_lr: float, batch_size: int) -> float:
    """The linear scaling rule of the paper: lr = base * batch / 256."""
    return base_lr * batch_size / 256.0


def lr_at(step: int, total_steps: int, warmup_steps: int, peak_lr: float) -> float:
    """Linear warmup from 0 to peak over warmup_steps, then cosine decay to 0 at total_steps."""
    if step < warmup_steps:
        return peak_lr * step / warmup_steps
    decay_steps = max(total_steps - warmup_steps, 1)
    progress = min(max(step - warmup_steps, 0), decay_steps) / decay_steps
    return peak_lr * 0.5 * (1.0 + math.cos(math.pi * progress))


# ----------------------------------------------------------------------------------------------------------- LARS
def lars_excluded(param: torch.Tensor) -> bool:
    """Biases and BN scales/shifts (every 1-D parameter) get neither weight decay nor the trust ratio."""
    return param.ndim <= 1


@torch.no_grad()
def lars_update_(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    momentum_buffers: Sequence[torch.Tensor],
    lr: float | torch.Tensor,
    weight_decay: float,
    momentum: float = 0.9,
    trust_coefficient: float = 1e-3,
    excluded: Sequence[bool] | None = None,
) -> None:
    """One LARS step, in place, as the official optax chain does it:

        u = g + wd * w                       (not for excluded)
        u = u * eta * |w| / |u|              (not for excluded; 1 when either norm is 0)
        m = momentum * m + u
        w = w - lr * m
    """
    if excluded is None:
        excluded = [lars_excluded(p) for p in params]
    for w, g, m, skip in zip(params, grads, momentum_buffers, excluded):
        u = g.to(torch.float32) if w.dtype != g.dtype else g.clone()
        if not skip:
            u.add_(w, alpha=weight_decay)
            w_norm = w.norm()
            u_norm = u.norm()
            trust = torch.where(
                (w_norm > 0) & (u_norm > 0), trust_coefficient * w_norm / u_norm, torch.ones_like(w_norm)
            )
            u.mul_(trust)
        m.mul_(momentum).add_(u)
        w.sub_(lr * m)
