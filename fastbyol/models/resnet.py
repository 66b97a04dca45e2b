"""ResNets with torchvision's parameter names: ResNet-18 to ResNet-200 at the BYOL paper's widths 1x-4x, torchvision's
wide ResNets, and a tiny CPU ResNet.

Width multiplier k (`resnet50x2`): every channel width, the stem included, times k, as the official BYOL code's ResNet
(`byol/utils/networks.py`, `width_multiplier`) does: ResNet-50 (2x) has a 128-channel stem and 4096 features. This is
not torchvision's `wide_resnet50_2`, which keeps the stem and the block outputs and doubles only the inner width of
each bottleneck (`inner_scale=2` here). ResNet-200 is Bottleneck [3, 24, 36, 3] (He et al. 2016, identity mappings).
Parameter counts (tests/test_resnet.py): resnet101 44,549,160 and resnet152 60,192,808 with a 1000-class fc
(torchvision's); resnet50x2 94M, resnet50x4 375M, resnet200x2 250M without (the BYOL paper's Table 1b).
"""

from __future__ import annotations


import torch
import torch.nn as nn

from .names import RESNET_DEPTHS, STEMS, WIDTH_MULTIPLIERS  # noqa: F401  (STEMS, WIDTH_MULTIPLIERS: public here too)


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

    def __init__(self, cin: int, width: int, stride: int = 1, downsample: nn.Module | None = None,
                 inner: int | None = None):
        super().__init__()
        inner = width if inner is None else inner  # torchvision's wide ResNets: inner = 2 * width
        self.conv1 = _conv1x1(cin, inner)
        self.bn1 = nn.BatchNorm2d(inner)
        self.conv2 = _conv3x3(inner, inner, stride)
        self.bn2 = nn.BatchNorm2d(inner)
        self.conv3 = _conv1x1(inner, width * self.expansion)
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
    widths: the stem's and each stage's width (block output / expansion); inner_scale: bottleneck inner width over
    that (2 for torchvision's wide_resnet50_2 / wide_resnet101_2, Bottleneck only).
    """

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        layers: tuple[int, ...],
        widths: tuple[int, ...] = (64, 128, 256, 512),
        stem: str = "imagenet",
        in_channels: int = 3,
        inner_scale: int = 1,
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
                wide = {"inner": width * inner_scale} if inner_scale != 1 else {}
                blocks.append(block(cin, width, s, downsample, **wide))
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


# depth -> (block, blocks per stage): torchvision's table, plus ResNet-200 as in the official BYOL code
DEPTHS: dict[int, tuple[type, tuple[int, ...]]] = {
    18: (BasicBlock, (2, 2, 2, 2)),
    34: (BasicBlock, (3, 4, 6, 3)),
    50: (Bottleneck, (3, 4, 6, 3)),
    101: (Bottleneck, (3, 4, 23, 3)),
    152: (Bottleneck, (3, 8, 36, 3)),
    200: (Bottleneck, (3, 24, 36, 3)),
}
assert tuple(DEPTHS) == RESNET_DEPTHS, "names.RESNET_DEPTHS must list DEPTHS's keys"


def resnet(depth: int, width_multiplier: int = 1, stem: str = "imagenet", inner_scale: int = 1) -> ResNet:
    """ResNet-`depth` with every channel width (stem included) times `width_multiplier` (the BYOL paper's "(2x)")."""
    block, layers = DEPTHS[depth]
    return ResNet(block, layers, tuple(w * width_multiplier for w in (64, 128, 256, 512)), stem=stem,
                  inner_scale=inner_scale)


def resnet_tiny(stem: str = "small-s2") -> ResNet:
    """32 -> 64 -> 128 channels, one block a stage: the CPU-sized encoder of the default preset."""
    return ResNet(BasicBlock, (1, 1, 1), (32, 64, 128), stem=stem)
