"""The BYOL wrapper and its MLP heads, around any encoder.

`BYOL` deep-copies the online encoder + projector into the target, which gets no gradient, keeps its own BN statistics
and runs in train mode. The encoder is any `nn.Module` mapping (B, 3, H, W) to (B, D) features: D is its
`num_features` or `feature_dim` attribute when it has one, else found by one forward (`feature_dim_of`).

One pass for both views: each network runs once a step on the two views stacked, (2B, 3, H, W), view 1's rows then
view 2's: twice the rows in every convolution and matrix product and half the kernel launches (and, over many ranks,
half the BN collectives) of one pass per view. BN statistics stay per view, as in the official implementation (which
forwards each view separately): every BatchNorm1d/2d becomes a `GlobalBatchNorm` (fastbyol.system.batchnorm), which
BYOL tells, around its forward, that the batch holds two views; each half is then normalised with its own statistics
and the running statistics are updated as the two sequential passes did. `forward_per_view` is those sequential
passes, kept as the reference: the two forwards agree in float64 (outputs, every gradient, running statistics;
tests/test_byol_one_pass.py). An encoder with another batch-statistics layer (a BN subclass, left as it is) cannot
share a pass between views and is forwarded per view. Encoders without batch statistics (ViTs) simply stack.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

from ..errors import FastByolError
from ..system.batchnorm import GlobalBatchNorm, convert_batchnorm, has_other_batchnorm, set_views


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
        self.feature_dim = feature_dim_of(encoder, image_size)
        self.online_encoder = convert_batchnorm(encoder)  # per-view BN (the same parameters and buffers)
        self.online_projector = convert_batchnorm(mlp(self.feature_dim, proj_hidden, proj_dim, head_first_bias))
        self.predictor = convert_batchnorm(mlp(proj_dim, pred_hidden, proj_dim, head_first_bias))
        self.target_encoder = copy.deepcopy(self.online_encoder)
        self.target_projector = copy.deepcopy(self.online_projector)
        for p in self.target_parameters():
            p.requires_grad_(False)
        # the layers told about the two views around a one-pass forward (a plain list: nothing registered twice)
        self._view_layers = [m for m in self.modules() if isinstance(m, GlobalBatchNorm)]
        self.one_pass = not has_other_batchnorm(self)

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

    def online_pass(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Online network: (N, 3, H, W) -> predictions (N, proj_dim) and encoder features (N, feature_dim). An
        encoder output that is not (N, D) floating features on x's device is one line (check_features)."""
        h = self.online_encoder(x)
        check_features(h, x)
        return self.predictor(self.online_projector(h)), h

    def target_pass(self, x: torch.Tensor) -> torch.Tensor:
        """Target network: (N, 3, H, W) -> projections (N, proj_dim); its caller turns gradients off."""
        return self.target_projector(self.target_encoder(x))

    def forward(self, v1: torch.Tensor, v2: torch.Tensor):
        """(B, C, H, W) views -> predictions p1, p2 and target projections z1, z2, each (B, proj_dim), and h1, the
        online encoder's view-1 features (B, feature_dim), detached (the online probe's input)."""
        return self.views_forward(v1, v2, self.online_pass, self.target_pass)

    def views_forward(self, v1: torch.Tensor, v2: torch.Tensor, online, target):
        """`forward` with the two networks given: `online(x) -> (p, h)` and `target(x) -> z`, this model's
        `online_pass` and `target_pass` or the same compiled, or wrapped in DDP (fastbyol.models.networks)."""
        if not self.one_pass:
            return self.forward_per_view(v1, v2, online, target)
        x = torch.cat([v1, v2])  # (2B, C, H, W), view 1 then view 2; channels_last stays channels_last
        set_views(self._view_layers, 2)  # each half its own BN statistics
        try:
            p, h = online(x)
            with torch.no_grad():  # target stays in train mode: batch statistics, its own running stats
                z = target(x)
        finally:
            set_views(self._view_layers, 1)
        p1, p2 = p.chunk(2)
        z1, z2 = z.chunk(2)
        return p1, p2, z1, z2, h[:v1.shape[0]].detach()

    def forward_per_view(self, v1: torch.Tensor, v2: torch.Tensor, online=None, target=None):
        """The reference: each network once per view (four passes), BN statistics per pass; `forward`'s outputs."""
        online, target = online or self.online_pass, target or self.target_pass
        (p1, h1), (p2, _) = online(v1), online(v2)
        with torch.no_grad():
            z1, z2 = target(v1), target(v2)
        return p1, p2, z1, z2, h1.detach()


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
