"""The BYOL wrapper and its MLP heads, around any encoder.

`BYOL` deep-copies the online encoder + projector into the target, which gets no gradient, keeps its own BN statistics
and runs in train mode. Each view is forwarded separately, so BN statistics are per view, as in the official
implementation. The encoder is any `nn.Module` mapping (B, 3, H, W) to (B, D) features: D is its `num_features` or
`feature_dim` attribute when it has one, else found by one forward (`feature_dim_of`).
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

from ..errors import FastByolError


def feature_dim_of(encoder: nn.Module, image_size: int = 32) -> int:
    """The encoder's feature width: its `num_features` / `feature_dim` attribute, else the width of its output for a
    (2, 3, image_size, image_size) input, run on a meta-device copy (shapes only; the encoder itself, its BN statistics
    and the random state are untouched), or, where an op has no meta kernel, on the module itself in eval mode."""
    for name in ("num_features", "feature_dim"):
        value = getattr(encoder, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    try:
        probe = copy.deepcopy(encoder).to("meta")
        x = torch.empty(2, 3, image_size, image_size, device="meta")
        with torch.no_grad():
            out = probe(x)
    except Exception:  # noqa: BLE001 (an op without a meta kernel: one real forward instead)
        param = next(iter(encoder.parameters()), None)
        x = torch.zeros(2, 3, image_size, image_size, device=param.device if param is not None else "cpu")
        was_training = encoder.training
        encoder.eval()
        try:
            with torch.no_grad():
                out = encoder(x)
        finally:
            encoder.train(was_training)
    check_features(out, x)
    return int(out.shape[1])


class EncoderOutputError(FastByolError, ValueError):
    """An encoder's output is not (batch, features) floating features on its input's device."""


def check_features(out, x: torch.Tensor) -> None:
    """The encoder's output `out` for the input `x` (B, C, H, W) is a (B, D) floating tensor on x's device; else
    EncoderOutputError, one line naming what is wrong. Shapes, dtypes and devices only: no host sync (and static
    under torch.compile)."""
    given = f"a {tuple(x.shape)} input"
    if not isinstance(out, torch.Tensor):
        why = f"a {type(out).__name__}, not a tensor"
    elif out.ndim != 2:
        why = f"shape {tuple(out.shape)} for {given}"
    elif out.shape[0] != x.shape[0]:
        why = f"{out.shape[0]} rows for {given} (a batch of {x.shape[0]})"
    elif not out.is_floating_point():
        why = f"{out.dtype} features"
    elif out.device != x.device:
        why = f"features on {out.device} for an input on {x.device}"
    else:
        return
    raise EncoderOutputError(f"the encoder must return (batch, features) floating features on its input's device; "
                             f"it returned {why}")


def mlp(in_dim: int, hidden_dim: int, out_dim: int, first_bias: bool = True) -> nn.Sequential:
    """Linear -> BN -> ReLU -> Linear: BYOL's projector (2048 -> 4096 -> 256) and predictor (256 -> 4096 -> 256).

    first_bias: a bias in the first Linear (the official haiku MLP has one; lightly's heads do not). BN right after it
    (batch statistics, in train mode for both networks) removes any constant added per feature, so that bias gets a
    zero gradient and changes no output: dropping it changes only what the init draws after it."""
    return nn.Sequential(
        nn.Linear(in_dim, hidden_dim, bias=first_bias),
        nn.BatchNorm1d(hidden_dim),
        nn.ReLU(inplace=True),
        nn.Linear(hidden_dim, out_dim),
    )


class BYOL(nn.Module):
    """Online = encoder -> projector -> predictor; target = EMA copy of encoder -> projector (no grad).

    head_first_bias: biases in the first Linear of projector and predictor (official; see `mlp`); image_size: the
    side of the probe input when the encoder's feature width must be found by a forward."""

    def __init__(self, encoder: nn.Module, proj_hidden: int = 4096, proj_dim: int = 256, pred_hidden: int = 4096,
                 head_first_bias: bool = True, image_size: int = 32):
        super().__init__()
        if not isinstance(encoder, nn.Module):
            raise ValueError(f"BYOL: the encoder must be a torch.nn.Module, got {type(encoder).__name__}")
        for name, width in (("proj_hidden", proj_hidden), ("proj_dim", proj_dim), ("pred_hidden", pred_hidden),
                            ("image_size", image_size)):
            if isinstance(width, bool) or not isinstance(width, int) or width < 1:
                raise ValueError(f"BYOL: {name} must be an integer >= 1, got {width!r}")
        self.online_encoder = encoder
        self.feature_dim = feature_dim_of(encoder, image_size)
        self.online_projector = mlp(self.feature_dim, proj_hidden, proj_dim, head_first_bias)
        self.predictor = mlp(proj_dim, pred_hidden, proj_dim, head_first_bias)
        self.target_encoder = copy.deepcopy(self.online_encoder)
        self.target_projector = copy.deepcopy(self.online_projector)
        for p in self.target_parameters():
            p.requires_grad_(False)

    def online_parameters(self) -> list[nn.Parameter]:
        """Everything the optimizer updates: online encoder, projector and predictor."""
        return [*self.online_encoder.parameters(), *self.online_projector.parameters(), *self.predictor.parameters()]

    def ema_pairs(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(target, online) parameter lists in matching order; buffers (BN statistics) are not averaged."""
        target = [*self.target_encoder.parameters(), *self.target_projector.parameters()]
        online = [*self.online_encoder.parameters(), *self.online_projector.parameters()]
        return target, online

    def target_parameters(self) -> list[torch.Tensor]:
        return self.ema_pairs()[0]

    def forward(self, v1: torch.Tensor, v2: torch.Tensor):
        """(B, C, H, W) views -> predictions p1, p2 and target projections z1, z2, each (B, proj_dim). An encoder
        output that is not (B, D) floating features on the views' device is one line (check_features)."""
        f1, f2 = self.online_encoder(v1), self.online_encoder(v2)
        check_features(f1, v1)
        check_features(f2, v2)
        p1 = self.predictor(self.online_projector(f1))
        p2 = self.predictor(self.online_projector(f2))
        with torch.no_grad():  # target stays in train mode: batch statistics, its own running stats
            z1 = self.target_projector(self.target_encoder(v1))
            z2 = self.target_projector(self.target_encoder(v2))
        return p1, p2, z1, z2


def params_sha256(model: BYOL) -> str:
    """SHA-256 over the online then the target parameters (state_dict order, fp32 little-endian bytes)."""
    import hashlib

    h = hashlib.sha256()
    named = list(model.named_parameters())
    online = [kv for kv in named if not kv[0].startswith("target_")]
    ordered = online + [kv for kv in named if kv[0].startswith("target_")]
    for name, t in ordered:
        h.update(name.encode())
        h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()
