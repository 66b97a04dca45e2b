"""The one table of encoders: name -> builder. The CLI's `--arch` choices and help, the presets' checks and
`build_encoder` all read `ARCHS`; a new family is one module beside this one and one line in `_families()`.

`--arch module.path:factory` names an encoder of the user's own: a callable (no arguments, or the keyword arguments
`image_size` and/or `stem` where it takes them) returning an `nn.Module` that maps (B, 3, H, W) to (B, D).

Importing such a module runs its code, so only the user may ask for it: `build_encoder` imports what its caller names
(a new run's `--arch`, a Python caller), and an architecture read from a file (a run folder's config.json, for
`train --resume`, `eval`, `finetune`, `export`) is built through `OwnEncoders`, which imports a module:factory only
when this command's user named it too (`--arch module:factory`, repeatable, or `encoder=` in Python).
"""

from __future__ import annotations

import copy
import importlib
import inspect
from dataclasses import dataclass, field
from typing import Callable

import torch.nn as nn

from .names import (ARCH_NAMES, CUSTOM_ARCH, RESNET_DEPTHS, STEMS, VIT_VARIANTS, WIDE_RESNET_DEPTHS,  # noqa: F401
                    WIDTH_MULTIPLIERS, check_own_arch_names, is_custom_arch, resnet_name, vit_name)
from .resnet import resnet, resnet_tiny
from .vit import vit


@dataclass(frozen=True)
class Arch:
    family: str  # resnet | vit
    build: Callable[[str, int], nn.Module]  # (stem, image_size) -> encoder
    summary: str


def _resnet_stem(stem: str, image_size: int) -> str:
    return ("small" if image_size <= 64 else "imagenet") if stem == "auto" else stem


def _paper_resnets() -> dict[str, Arch]:
    archs = {}
    for depth in RESNET_DEPTHS:
        for k in WIDTH_MULTIPLIERS:
            name = resnet_name(depth, k)
            what = f"ResNet-{depth}" + ("" if k == 1 else f" ({k}x): every width, stem included, x{k} (BYOL paper)")
            archs[name] = Arch("resnet", lambda stem, size, d=depth, k=k: resnet(d, k, _resnet_stem(stem, size)), what)
    for depth in WIDE_RESNET_DEPTHS:
        archs[f"wide_resnet{depth}_2"] = Arch(
            "resnet", lambda stem, size, d=depth: resnet(d, 1, _resnet_stem(stem, size), inner_scale=2),
            f"torchvision's wide_resnet{depth}_2: bottleneck inner width x2, stem and block outputs as ResNet-{depth}")
    return archs


def _vits() -> dict[str, Arch]:
    archs = {}
    for size, patch in VIT_VARIANTS:
        archs[vit_name(size, patch)] = Arch(
            "vit", lambda stem, image_size, s=size, p=patch: vit(s, p, image_size),
            f"ViT-{size[0].upper()}/{patch} (timm's vit_{size}_patch{patch} names)"
            + (", for 28-32 px images" if patch == 4 else ""))
    # 4 blocks 128 wide (4 heads of 32) on the 7x7 patches of 28 px: a transformer that trains in minutes on 2 cores
    archs["vit-tiny-cpu"] = Arch("vit", lambda stem, image_size: vit("tiny", 4, image_size, embed_dim=128, depth=4,
                                                                     num_heads=4),
                                 "ViT/4, 128 wide, 4 blocks: the CPU-sized transformer of fmnist-vit-tiny")
    return archs


def _families() -> dict[str, Arch]:
    archs = _paper_resnets()
    archs["resnet-tiny"] = Arch("resnet", lambda stem, size: resnet_tiny(_resnet_stem(stem, size)),
                                "32 -> 64 -> 128 channels, one block a stage: the default preset's CPU encoder")
    archs.update(_vits())
    return archs


ARCHS: dict[str, Arch] = _families()
assert tuple(ARCHS) == ARCH_NAMES, "names.ARCH_NAMES must list the registry's names in its order"


def load_factory(spec: str) -> Callable[..., nn.Module]:
    """The callable named by module.path:factory; ValueError (one line) when it cannot be imported."""
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # noqa: BLE001 (any import failure is the user's module: one line)
        raise ValueError(f"--arch {spec}: cannot import {module_name} ({type(e).__name__}: {e})") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ValueError(f"--arch {spec}: {module_name} has no callable {attr}")
    return factory


def call_factory(factory: Callable[..., nn.Module], stem: str = "auto", image_size: int = 224,
                 where: str = "the encoder factory") -> nn.Module:
    """factory() with `image_size` and `stem` passed where it takes them; it must return an nn.Module."""
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        params = {}
    kwargs = {k: v for k, v in (("image_size", image_size), ("stem", stem)) if k in params}
    try:
        encoder = factory(**kwargs)
    except Exception as e:  # noqa: BLE001 (the user's code: its failure is one line naming it)
        why = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        raise ValueError(f"{where} failed: {type(e).__name__}: {why}") from None
    if not isinstance(encoder, nn.Module):
        raise ValueError(f"{where} returned {type(encoder).__name__}, not a torch.nn.Module")
    return encoder


def build_encoder(arch: str, stem: str = "auto", image_size: int = 224) -> nn.Module:
    """The encoder trunk by name (or module.path:factory); ResNets' stem "auto" picks the small-image stem for inputs
    <= 64 px, torchvision's otherwise (ViTs have no stem choice: their patch embedding is the stem)."""
    if stem not in STEMS:
        raise ValueError(f"unknown stem {stem!r}; choose one of {STEMS}")
    if arch in ARCHS:
        return ARCHS[arch].build(stem, image_size)
    if is_custom_arch(arch):
        return call_factory(load_factory(arch), stem, image_size, where=f"--arch {arch}")
    raise ValueError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHS)}, or module.path:factory")


@dataclass(frozen=True)
class OwnEncoders:
    """The encoders of the user's own that one command may build from a saved config: the module:factory names its
    user gave (`--arch`, repeatable) and an encoder given in Python (`encoder=`: an nn.Module or a callable returning
    one), which stands in for whatever module:factory the config names. Registry names need neither."""

    names: frozenset[str] = field(default_factory=frozenset)
    encoder: object = None

    def __post_init__(self):
        check_own_arch_names(self.names)
        if self.encoder is not None and not (isinstance(self.encoder, nn.Module) or callable(self.encoder)):
            raise ValueError(f"encoder=: expected a torch.nn.Module or a callable returning one, got "
                             f"{type(self.encoder).__name__}")

    def check(self, arch: str, where: str) -> None:
        """ValueError (one line: what `where` names and the flag that allows it) unless `arch` may be built."""
        if arch in ARCHS or not is_custom_arch(arch) or self.encoder is not None or arch in self.names:
            return
        also = f" (this command allows only {', '.join(sorted(self.names))})" if self.names else ""
        raise ValueError(f"{where} names the encoder {arch}, a module of your own, and a run folder never imports "
                         f"code by itself{also}: add --arch {arch} to the command to import it (Python: encoder=)")

    def build(self, arch: str, stem: str, image_size: int, where: str) -> nn.Module:
        """The encoder `arch` names, after `check`: the given encoder (an nn.Module is returned as it is), or the
        registry's or an allowed module:factory; ValueError (one line) otherwise."""
        self.check(arch, where)
        if self.encoder is None or arch in ARCHS:
            return build_encoder(arch, stem, image_size)
        if isinstance(self.encoder, nn.Module):
            return copy.deepcopy(self.encoder)  # the caller's module is left as it was
        return call_factory(self.encoder, stem, image_size, where="encoder=")
