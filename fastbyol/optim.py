"""LARS as a torch.optim.Optimizer: the step of `fastbyol.reference.lars_update_`, done with fused foreach ops; AdamW
for ViTs; `build_optimizer`, which picks one and makes its parameter groups.

Biases and BN parameters (every 1-D parameter) are excluded from weight decay and from the trust ratio, as in
the official BYOL recipe; so are the parameters a module names in `no_weight_decay_names` or timm's
`no_weight_decay()` (a ViT's `pos_embed` and `cls_token`), see `excluded_parameters`. A param group may say
`exclude=True/False` for all its parameters; without it the 1-D rule decides.
The learning rate is set per step by the trainer (`set_lr`, a float or a 0-D tensor on
the parameters' device), from `reference.lr_at`.

`lars_foreach_` does the reference's per-parameter arithmetic as a fixed number of kernels, whatever the number of
parameters (ResNet-50 + BYOL heads: 171, 57 of them adapted, 35.0M elements), with no host sync: the trust ratios
stay on the device. Each tensor's trust ratio must multiply that tensor alone, and no foreach op takes one device
scalar per tensor on its fused (multi-tensor) CUDA path: a list of 0-D tensors beside N-D ones fails the fast
route's same-sizes-and-strides check and falls back to one launch per tensor. So the ratios are spread over a
scratch buffer the size of the adapted parameters (one `index_select` through a cached int32 segment index), whose
per-tensor views have each parameter's own sizes and strides: `_foreach_mul_(u, scale)` then stays on the fused
path. Cost: the scratch (8 bytes per adapted element with the index: 280 MB on ResNet-50) and ~12 bytes of traffic
per element; gain: 14 kernel-launching ops per step, where the 0-D form took one more per adapted tensor (57 on
ResNet-50). The arithmetic is the reference's, in its order: the parameters after a step are bit for bit those of
the 0-D form (float32, CPU). tests/test_optim.py counts the launches (the profiler's top-level aten ops, each
foreach call checked against the fast route's conditions) and checks the step against the reference in float64.

Trust-ratio forms (`trust_ratio`): "official" is the optax/BYOL one, eta |w| / |g + wd w|; "lightly" is
lightly.utils.lars's (after the PyTorch LARS of the SwAV/DINO code), eta |w| / (|g| + wd |w| + eps), the denominator
a bound of the official one by the triangle inequality. Both add wd w to the gradient and scale it; with the weight
decay of these recipes (1e-6) the two differ by about wd |w| / |g|. `lars_update_lightly_` is the per-parameter
loop of the second form (the fallback path and the tests' oracle for it).
"""

from __future__ import annotations

import itertools
import operator
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from .reference import lars_excluded, lars_update_

TRUST_RATIOS = ("official", "lightly")  # eta |w| / |g + wd w|, or eta |w| / (|g| + wd |w| + eps)
LIGHTLY_EPS = 1e-8  # lightly.utils.lars.LARS's eps default


@dataclass(frozen=True)
class LarsHyper:
    """LARS's settings besides the learning rate (one param group's)."""

    weight_decay: float = 1e-6  # added to the gradient before the trust ratio
    momentum: float = 0.9
    trust_coefficient: float = 1e-3  # eta
    trust_ratio: str = "official"  # TRUST_RATIOS
    eps: float = LIGHTLY_EPS  # in the "lightly" ratio's denominator only


@torch.no_grad()
def lars_update_lightly_(params, grads, momentum_buffers, lr: float | torch.Tensor, weight_decay: float,
                         momentum: float = 0.9, trust_coefficient: float = 1e-3, excluded=None) -> None:
    """`reference.lars_update_` with lightly's trust ratio, per parameter:

        u = g + wd * w                                       (not for excluded)
        u = u * eta * |w| / (|g| + wd * |w| + eps)           (not for excluded; 1 when |w| or |g| is 0)
        m = momentum * m + u
        w = w - lr * m

    (lightly also leaves the weight decay out where |w| or |g| is 0; here it is added there, as the official form
    does: the two forms differ in the ratio alone.)"""
    if excluded is None:
        excluded = [lars_excluded(p) for p in params]
    for w, g, m, skip in zip(params, grads, momentum_buffers, excluded):
        u = g.to(torch.float32) if w.dtype != g.dtype else g.clone()
        if not skip:
            w_norm, g_norm = w.norm(), u.norm()
            u.add_(w, alpha=weight_decay)
            trust = torch.where((w_norm > 0) & (g_norm > 0),
                                trust_coefficient * w_norm / (g_norm + weight_decay * w_norm + LIGHTLY_EPS),
                                torch.ones_like(w_norm))
            u.mul_(trust)
        m.mul_(momentum).add_(u)
        w.sub_(lr * m)


class LarsWorkspace:
    """Scratch for the trust ratios of one list of adapted tensors (built once per list, reused every step).

    segment: (E,) int32/int64, the list index of each element of the flattened list; scale: (E,) buffer the ratios
    are spread into; views: per tensor, a view of its slice of `scale` with that tensor's sizes and strides."""

    def __init__(self, tensors: list[torch.Tensor]):
        if not tensors:
            raise ValueError("LarsWorkspace needs at least one tensor")
        device, dtype = tensors[0].device, tensors[0].dtype
        numels = [t.numel() for t in tensors]
        total = sum(numels)
        index_dtype = torch.int32 if total < 2**31 else torch.int64
        self.key = self.key_of(tensors)
        self.segment = torch.repeat_interleave(torch.arange(len(tensors), dtype=index_dtype),
                                               torch.tensor(numels)).to(device)
        self.scale = torch.empty(total, device=device, dtype=dtype)
        self.views, offset = [], 0
        for t, n in zip(tensors, numels):
            # dense (contiguous or channels_last) tensors only: the view covers exactly [offset, offset + n)
            self.views.append(self.scale.as_strided(t.shape, t.stride(), offset))
            offset += n

    @staticmethod
    def key_of(tensors: list[torch.Tensor]) -> tuple:
        """What a workspace depends on: device, dtype, and each tensor's sizes and strides."""
        return (tensors[0].device, tensors[0].dtype, tuple((tuple(t.shape), t.stride()) for t in tensors))


def _dense(t: torch.Tensor) -> bool:
    return t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last)


@torch.no_grad()
def lars_foreach_(params: list[torch.Tensor], grads: list[torch.Tensor], momentum_buffers: list[torch.Tensor],
                  lr: float | torch.Tensor, hyper: LarsHyper = LarsHyper(), excluded: list[bool] | None = None,
                  workspace: LarsWorkspace | None = None) -> None:
    """`reference.lars_update_` with fused foreach ops: the same u, trust ratio, momentum and update, in place.

    Every tensor must share one device and dtype (the caller falls back to the reference otherwise). workspace: a
    `LarsWorkspace` of the adapted (not excluded) parameters, reused across steps; None builds one for this call.
    hyper.trust_ratio "lightly": `lars_update_lightly_`'s ratio (hyper.eps only used there)."""
    if hyper.trust_ratio not in TRUST_RATIOS:
        raise ValueError(f"LARS: trust_ratio must be one of {TRUST_RATIOS}, got {hyper.trust_ratio!r}")
    if not params:
        return
    if excluded is None:
        excluded = [lars_excluded(p) for p in params]
    split = _Split(excluded)
    ws = split.scaled(params)
    if ws and (workspace is None or workspace.key != LarsWorkspace.key_of(ws)):
        workspace = LarsWorkspace(ws)
    _lars_fused(params, momentum_buffers, (ws, split.scaled(grads), split.scaled(momentum_buffers)),
                (split.kept(grads), split.kept(momentum_buffers)), workspace, lr, hyper)


class _Split:
    """The adapted and the excluded positions of a parameter list, picked by C-level itemgetters (no Python loop)."""

    def __init__(self, excluded: list[bool]):
        scaled = [i for i, skip in enumerate(excluded) if not skip]
        kept = [i for i, skip in enumerate(excluded) if skip]
        self._scaled = operator.itemgetter(*scaled) if scaled else None
        self._kept = operator.itemgetter(*kept) if kept else None
        self._one_scaled, self._one_kept = len(scaled) == 1, len(kept) == 1

    @staticmethod
    def _pick(getter, one: bool, items: list) -> list:
        if getter is None:
            return []
        picked = getter(items)
        return [picked] if one else list(picked)

    def scaled(self, items: list) -> list:
        return self._pick(self._scaled, self._one_scaled, items)

    def kept(self, items: list) -> list:
        return self._pick(self._kept, self._one_kept, items)


def _lars_fused(params, momentum_buffers, adapted: tuple[list, list, list], excluded: tuple[list, list], workspace,
                lr, hyper: LarsHyper) -> None:
    """The arithmetic of `lars_foreach_` on lists already split into the adapted tensors (weights, gradients, momenta)
    and the excluded ones (gradients, momenta)."""
    ws, gs, ms_scaled = adapted
    gs_kept, ms_kept = excluded
    weight_decay, momentum, trust_coefficient, eps = (hyper.weight_decay, hyper.momentum, hyper.trust_coefficient,
                                                       hyper.eps)
    torch._foreach_mul_(momentum_buffers, momentum)  # m = momentum * m, every tensor
    if ws:
        # u = g + wd * w: a new tensor per gradient (the gradients are read only). It stays: the trust ratio needs
        # |u| of the rounded sum itself for the step to be bit for bit the reference's
        us = torch._foreach_add(gs, ws, alpha=weight_decay) if weight_decay else gs
        if hyper.trust_ratio == "official":
            norms = torch.stack(torch._foreach_norm([*ws, *us])).view(2, len(ws))  # (2, S): |w| then |u| per tensor
            w_norms, u_norms = norms[0], norms[1]
            # (S,) trust ratio eta * |w| / |u|, 1 where either norm is 0 (the reference's arithmetic, in its order)
            trust = torch.where((norms > 0).all(0), trust_coefficient * w_norms / u_norms, 1.0)
        else:  # lightly's: (S,) eta * |w| / (|g| + wd |w| + eps), 1 where |w| or |g| is 0
            norms = torch.stack(torch._foreach_norm([*ws, *gs])).view(2, len(ws))  # (2, S): |w| then |g|
            w_norms, g_norms = norms[0], norms[1]
            trust = torch.where((norms > 0).all(0),
                                trust_coefficient * w_norms / (g_norms + weight_decay * w_norms + eps), 1.0)
        torch.index_select(trust, 0, workspace.segment, out=workspace.scale)  # (E,) each tensor's ratio, spread
        # u = t * u, then m += u: the reference's two roundings, so the step is bit for bit the per-tensor one
        # (one fused _foreach_addcmul_ would save a pass but differs in the last bit on the CPU)
        if weight_decay:  # us are new tensors: scale them in place
            torch._foreach_mul_(us, workspace.views)
        else:  # us are the gradients, which are read only
            us = torch._foreach_mul(us, workspace.views)
        torch._foreach_add_(ms_scaled, us)
    if gs_kept:  # biases and BN: u = g
        torch._foreach_add_(ms_kept, gs_kept)
    if isinstance(lr, torch.Tensor):
        torch._foreach_sub_(params, torch._foreach_mul(momentum_buffers, lr))
    else:
        torch._foreach_add_(params, momentum_buffers, alpha=-lr)


class _GroupLists:
    """One param group's lists, built once: its parameters (all with gradients when built), their momentum buffers,
    the adapted/excluded split and the trust-ratio workspace. Valid while the group's `params` list is the same
    object of the same length and every parameter has had a gradient at each step; `load_state_dict` and
    `add_param_group` drop it. A step then builds no list over the parameters in Python: the gradients are read and
    split by C-level attrgetter/itemgetter calls."""

    def __init__(self, group_params: list, params: list, bufs: list, excluded: list[bool], fused: bool):
        self.group_params, self.length = group_params, len(group_params)
        self.complete = len(params) == len(group_params)  # else rebuilt each step: a gradient may come later
        self.params, self.bufs, self.excluded, self.fused = params, bufs, excluded, fused
        self.grads_of = operator.attrgetter("grad")
        if fused:
            self.split = _Split(excluded)
            self.ws, self.ms_scaled, self.ms_kept = (self.split.scaled(params), self.split.scaled(bufs),
                                                     self.split.kept(bufs))
            self.workspace = LarsWorkspace(self.ws) if self.ws else None

    def valid(self, group_params: list) -> bool:
        return self.complete and group_params is self.group_params and len(group_params) == self.length

    def grads(self) -> list | None:
        """This step's gradients, or None when a parameter has none (the lists are then rebuilt)."""
        grads = list(map(self.grads_of, self.params))
        return grads if all(map(operator.is_not, grads, itertools.repeat(None))) else None


class LARS(torch.optim.Optimizer):
    """LARS (see the module docstring). foreach=False runs the reference per-parameter loop; parameters of mixed
    devices or dtypes, or not dense, fall back to it too. trust_ratio: "official" or "lightly" (TRUST_RATIOS)."""

    def __init__(
        self,
        params: Iterable[torch.Tensor],
        lr: float | torch.Tensor,
        weight_decay: float = 1e-6,
        momentum: float = 0.9,
        trust_coefficient: float = 1e-3,
        foreach: bool = True,
        trust_ratio: str = "official",
    ):
        if not isinstance(lr, torch.Tensor) and lr < 0:
            raise ValueError(f"LARS: lr must be >= 0, got {lr}")
        if trust_ratio not in TRUST_RATIOS:
            raise ValueError(f"LARS: trust_ratio must be one of {TRUST_RATIOS}, got {trust_ratio!r}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"LARS: momentum must be in [0, 1), got {momentum}")
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, trust_coefficient=trust_coefficient)
        super().__init__(params, defaults)
        self.foreach = foreach
        self.trust_ratio = trust_ratio
        self._lists: dict[int, _GroupLists] = {}  # per param group, built once; scratch, never in the state dict

    def load_state_dict(self, state_dict: dict) -> None:  # noqa: D102 (torch.optim signature)
        super().load_state_dict(state_dict)
        self._lists.clear()  # new momentum buffers

    def add_param_group(self, param_group: dict) -> None:  # noqa: D102 (torch.optim signature)
        super().add_param_group(param_group)
        if hasattr(self, "_lists"):
            self._lists.clear()

    def _group_lists(self, group: dict) -> _GroupLists:
        """The group's lists: parameters with a gradient, their momentum buffers (made here on the first step) and
        which are excluded; fused unless foreach is off or the tensors mix devices or dtypes or are not dense."""
        params, bufs = [], []
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            params.append(p)
            bufs.append(state["momentum_buffer"])
        grads = [p.grad for p in params]
        same_kind = len({(t.device, t.dtype) for t in params + grads + bufs}) <= 1
        fused = self.foreach and same_kind and all(_dense(p) for p in params)
        rule = group.get("exclude")  # a group's own say, else the 1-D rule
        excluded = [lars_excluded(p) if rule is None else bool(rule) for p in params]
        return _GroupLists(group["params"], params, bufs, excluded, fused)

    def set_lr(self, lr: float | torch.Tensor) -> None:
        for group in self.param_groups:
            group["lr"] = lr

    @torch.no_grad()
    def step(self, closure=None):  # noqa: D102 (torch.optim signature)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for index, group in enumerate(self.param_groups):
            lists = self._lists.get(index)
            grads = lists.grads() if lists is not None and lists.valid(group["params"]) else None
            if grads is None:
                lists = self._lists[index] = self._group_lists(group)
                grads = [p.grad for p in lists.params]
            if lists.fused:
                if not lists.params:
                    continue
                hyper = LarsHyper(group["weight_decay"], group["momentum"], group["trust_coefficient"],
                                  self.trust_ratio)
                _lars_fused(lists.params, lists.bufs, (lists.ws, lists.split.scaled(grads), lists.ms_scaled),
                            (lists.split.kept(grads), lists.ms_kept), lists.workspace, group["lr"], hyper)
            else:
                loop = lars_update_ if self.trust_ratio == "official" else lars_update_lightly_
                loop(lists.params, grads, lists.bufs, lr=group["lr"], weight_decay=group["weight_decay"],
                     momentum=group["momentum"], trust_coefficient=group["trust_coefficient"],
                     excluded=lists.excluded)
        return loss


class AdamW(torch.optim.AdamW):
    """torch's AdamW with the trainer's `set_lr` (a float each step, from `reference.lr_at`)."""

    def set_lr(self, lr: float) -> None:
        for group in self.param_groups:
            group["lr"] = float(lr)


def _named_exclusions(module: torch.nn.Module) -> set[str]:
    """Full names of the parameters that the module or its submodules exclude by name (`no_weight_decay_names`, or
    timm's `no_weight_decay()` returning names relative to the module that defines it)."""
    names = set()
    for prefix, sub in module.named_modules():
        local = set(getattr(sub, "no_weight_decay_names", ()))
        method = getattr(sub, "no_weight_decay", None)
        if callable(method):
            local |= set(method())
        names |= {f"{prefix}.{n}" if prefix else n for n in local}
    return names


def excluded_parameters(model) -> list[bool]:
    """Per parameter of `model.online_parameters()`, whether it gets neither weight decay nor the LARS trust ratio:
    every 1-D parameter (norms, biases) unless the encoder sets `exclude_1d = False`, and the names the modules list
    (`no_weight_decay_names` / `no_weight_decay()`: a ViT's pos_embed and cls_token)."""
    flags: dict[int, bool] = {}
    for part in (model.online_encoder, model.online_projector, model.predictor):
        one_d = getattr(part, "exclude_1d", True)
        named = _named_exclusions(part)
        for name, p in part.named_parameters():
            flags[id(p)] = (one_d and lars_excluded(p)) or name in named
    return [flags[id(p)] for p in model.online_parameters()]


def build_optimizer(optim_cfg, model) -> torch.optim.Optimizer:
    """The optimizer `optim_cfg.optimizer` names over the model's online parameters, with its exclusions.

    LARS: one group when the exclusions are the 1-D rule (ResNets: the step and checkpoints as before), else an
    adapted group and an `exclude=True` group. AdamW (MoCo v3's ViT recipe; betas 0.9/0.999, eps 1e-8): weight decay
    0 on the excluded group. The lr is set each step by the trainer (`set_lr`)."""
    params = model.online_parameters()
    excluded = excluded_parameters(model)
    kept = [p for p, skip in zip(params, excluded) if not skip]
    skipped = [p for p, skip in zip(params, excluded) if skip]
    if optim_cfg.optimizer == "adamw":
        groups = [g for g in (dict(params=kept), dict(params=skipped, weight_decay=0.0)) if g["params"]]
        return AdamW(groups, lr=0.0, weight_decay=optim_cfg.weight_decay)
    if optim_cfg.optimizer != "lars":
        raise ValueError(f"unknown optimizer {optim_cfg.optimizer!r}; choose lars or adamw")
    hyper = dict(lr=0.0, weight_decay=optim_cfg.weight_decay, momentum=optim_cfg.momentum,
                 trust_coefficient=optim_cfg.trust_coefficient)
    if excluded == [lars_excluded(p) for p in params]:
        return LARS(params, **hyper)
    groups = [g for g in (dict(params=kept, exclude=False), dict(params=skipped, exclude=True)) if g["params"]]
    return LARS(groups, **hyper)
