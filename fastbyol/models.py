"""Encoders (ResNet-18/34/50 with torchvision's parameter names, plus a tiny CPU ResNet), MLP heads, and BYOL.

One factory (`build_encoder`) makes the encoder; `BYOL` deep-copies the online encoder + projector into the
target, which gets no gradient, keeps its own BN statistics and runs in train mode. Each view is forwarded
separately, so BN statistics are per view, as in the official implementation.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn as nn

STEMS = ("auto", "imagenet", "small", "small-s2")


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=1, bias=False)


def _conv1x1(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, width: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = _conv3x3(cin, width, stride)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(width, width)
        self.bn2 = nn.BatchNorm2d(width)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    expansion = 4  # torchvision's v1.5: the stride sits on the 3x3 conv

    def __init__(self, cin: int, width: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = _conv1x1(cin, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = _conv3x3(width, width, stride)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = _conv1x1(width, width * self.expansion)
        self.bn3 = nn.BatchNorm2d(width * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """torchvision-compatible ResNet trunk without `fc`: (B, 3, H, W) -> (B, feature_dim).

    stem: "imagenet" = 7x7/2 conv + 3x3/2 max-pool (torchvision); "small" = 3x3/1 conv, no max-pool (inputs
    <= 64 px, CIFAR-style); "small-s2" = 3x3/2 conv, no max-pool (the cheap CPU stem of the tiny preset).
    """

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        layers: tuple[int, ...],
        widths: tuple[int, ...] = (64, 128, 256, 512),
        stem: str = "imagenet",
        in_channels: int = 3,
    ):
        super().__init__()
        if stem not in STEMS[1:]:
            raise ValueError(f"unknown stem {stem!r}; choose one of {STEMS[1:]}")
        w0 = widths[0]
        if stem == "imagenet":
            self.conv1 = nn.Conv2d(in_channels, w0, kernel_size=7, stride=2, padding=3, bias=False)
        else:
            self.conv1 = nn.Conv2d(in_channels, w0, kernel_size=3, stride=2 if stem == "small-s2" else 1,
                                   padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(w0)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1) if stem == "imagenet" else nn.Identity()
        cin = w0
        for i, (n, width) in enumerate(zip(layers, widths)):
            stride = 1 if i == 0 else 2
            blocks = []
            for j in range(n):
                downsample = None
                s = stride if j == 0 else 1
                if s != 1 or cin != width * block.expansion:
                    downsample = nn.Sequential(_conv1x1(cin, width * block.expansion, s),
                                               nn.BatchNorm2d(width * block.expansion))
                blocks.append(block(cin, width, s, downsample))
                cin = width * block.expansion
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
        self.num_stages = len(layers)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.feature_dim = cin
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for i in range(self.num_stages):
            x = getattr(self, f"layer{i + 1}")(x)
        return torch.flatten(self.avgpool(x), 1)  # (B, feature_dim)


@dataclass(frozen=True)
class ArchSpec:
    block: type
    layers: tuple[int, ...]
    widths: tuple[int, ...] = (64, 128, 256, 512)


ARCHS: dict[str, ArchSpec] = {
    "resnet18": ArchSpec(BasicBlock, (2, 2, 2, 2)),
    "resnet34": ArchSpec(BasicBlock, (3, 4, 6, 3)),
    "resnet50": ArchSpec(Bottleneck, (3, 4, 6, 3)),
    # 32 -> 64 -> 128 channels, one block a stage: the CPU-sized encoder of the default preset
    "resnet-tiny": ArchSpec(BasicBlock, (1, 1, 1), (32, 64, 128)),
}


def build_encoder(arch: str, stem: str = "auto", image_size: int = 224) -> ResNet:
    """The encoder trunk; stem "auto" picks the small-image stem for inputs <= 64 px, torchvision's otherwise."""
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose one of {sorted(ARCHS)}")
    if stem not in STEMS:
        raise ValueError(f"unknown stem {stem!r}; choose one of {STEMS}")
    if stem == "auto":
        stem = "small" if image_size <= 64 else "imagenet"
    spec = ARCHS[arch]
    return ResNet(spec.block, spec.layers, spec.widths, stem=stem)


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

    head_first_bias: biases in the first Linear of projector and predictor (official; see `mlp`)."""

    def __init__(self, encoder: ResNet, proj_hidden: int = 4096, proj_dim: int = 256, pred_hidden: int = 4096,
                 head_first_bias: bool = True):
        super().__init__()
        self.online_encoder = encoder
        self.online_projector = mlp(encoder.feature_dim, proj_hidden, proj_dim, head_first_bias)
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
        """(B, C, H, W) views -> predictions p1, p2 and target projections z1, z2, each (B, proj_dim)."""
        p1 = self.predictor(self.online_projector(self.online_encoder(v1)))
        p2 = self.predictor(self.online_projector(self.online_encoder(v2)))
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
