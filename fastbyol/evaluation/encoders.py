"""A trained encoder as a torch module, for your own code: `fastbyol.load_encoder(path)` from a run folder or from an
export, and the line `fastbyol export` prints on how to load its file into torchvision or timm.

    import fastbyol
    encoder = fastbyol.load_encoder("runs/embedded-fmnist-tiny-20261204-093015")     # a run: its online encoder
    encoder = fastbyol.load_encoder("encoder.safetensors")                           # an export that names its arch
    encoder = fastbyol.load_encoder("encoder.pt", arch="resnet50")                   # a .pt export: name the arch
    features = encoder(images)                                                       # (B, 3, H, W) -> (B, D)

What is imported: a registry name needs nothing; an encoder of your own (`module:factory`) is imported only when
you name it here (`arch=`, a string or the callable itself), never because a run folder's config.json says so.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import FastByolError
from ..models.names import is_custom_arch
from ..run.names import CHECKPOINT, CONFIG

EXPORT_SUFFIXES = (".pt", ".pth", ".safetensors")
METADATA = ("arch", "stem", "image_size")  # what a .safetensors export records of its encoder (as fastbyol_KEY)
TORCHVISION_RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "wide_resnet50_2",
                       "wide_resnet101_2")
TIMM_VITS = ("vit_tiny_patch16", "vit_small_patch16", "vit_base_patch16")


def _run_description(run_dir: Path, which: str):
    """(arch, stem, image_size, encoder state) of a run folder; the checkpoint is checked by load_run where the
    architecture is a registry name (an encoder of the user's own is not built to check it: that would import it)."""
    from ..config import Config
    from ..run.checkpoint import load_checkpoint, load_run
    from .runs import encoder_state

    try:
        raw = json.loads((run_dir / CONFIG).read_text())
    except (OSError, ValueError) as e:
        raise FastByolError(f"{run_dir}: no readable {CONFIG} ({type(e).__name__}): not a fastbyol run") from None
    cfg = Config.from_dict(raw, where=str(run_dir / CONFIG))
    if is_custom_arch(cfg.model.arch):
        ckpt = load_checkpoint(run_dir / CHECKPOINT)
    else:
        cfg, _, ckpt = load_run(run_dir)
    return cfg.model.arch, cfg.model.stem, cfg.data.image_size, encoder_state(ckpt, which)


def _export_description(path: Path):
    """(arch, stem, image_size, state) of an export: a .safetensors file names its encoder, a .pt/.pth file does not
    (arch etc. None)."""
    if path.suffix == ".safetensors":
        try:
            from safetensors import safe_open
            from safetensors.torch import load_file
        except ImportError:
            raise FastByolError(f"{path}: reading .safetensors needs the safetensors package") from None
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
            state = load_file(str(path))
        except Exception as e:  # noqa: BLE001 (a damaged or foreign file: one line)
            raise FastByolError(f"{path}: not a readable safetensors file ({type(e).__name__})") from None
        size = meta.get("fastbyol_image_size")
        return (meta.get("fastbyol_arch"), meta.get("fastbyol_stem"), int(size) if size and size.isdigit() else None,
                state)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 (weights_only refuses anything but plain data: one line)
        raise FastByolError(f"{path}: not a plain state_dict ({type(e).__name__})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise FastByolError(f"{path}: not a state_dict of tensors")
    return None, None, None, state


def load_encoder(path: str | Path, arch=None, *, which: str = "online", stem: str | None = None,
                 image_size: int | None = None) -> torch.nn.Module:
    """The encoder of a run folder (its checkpoint's online encoder, or `which="target"`) or of an export
    (`fastbyol export`: .pt, .pth, .safetensors), with its trained weights, in eval mode, on the CPU.

    arch: a name of --arch's list, "module:factory", or a callable returning the module. A run of a listed
    architecture and a .safetensors export know theirs; a .pt/.pth export needs it (with `stem` and `image_size`
    where they change the network: ResNets' stem, ViTs' position embedding), and so does a run of an encoder of your
    own. Every tensor of the file must fit the module (strict loading)."""
    from ..models import build_encoder, call_factory

    path = Path(path)
    if path.is_dir():
        known = _run_description(path, which)
    elif path.is_file() and path.suffix in EXPORT_SUFFIXES:
        known = _export_description(path)
    else:
        raise FastByolError(f"{path}: neither a run folder nor an export ({', '.join(EXPORT_SUFFIXES)})")
    known_arch, known_stem, known_size, state = known
    stem, image_size = stem or known_stem or "auto", image_size or known_size or 224
    if arch is None:
        if known_arch is None:
            raise FastByolError(f"{path}: a .pt/.pth export does not name its encoder: give arch= (the run's --arch) "
                                "and its stem and image_size where they are not the defaults")
        if is_custom_arch(known_arch):
            raise FastByolError(f"{path}: its encoder is {known_arch}, an encoder of your own: pass arch= (that "
                                "factory, or its name) to import it; a folder's name for it is not imported")
        arch = known_arch
    try:
        encoder = (build_encoder(arch, stem, image_size) if isinstance(arch, str) else
                   call_factory(arch, stem, image_size, where="load_encoder(arch=...)"))
        encoder.load_state_dict(state)
    except (ValueError, RuntimeError) as e:
        raise FastByolError(f"{path}: the weights do not fit {arch if isinstance(arch, str) else 'arch='} "
                            f"({str(e).strip().splitlines()[0][:200]})") from None
    return encoder.eval()


def export_metadata(arch: str, stem: str, image_size: int) -> dict[str, str]:
    """What a .safetensors export records of its encoder (strings: safetensors' metadata)."""
    return {f"fastbyol_{k}": str(v) for k, v in zip(METADATA, (arch, stem, image_size))}


def loading_hint(path: Path, arch: str, stem: str, image_size: int) -> list[str]:
    """How to load an export: torchvision's or timm's constructor where the encoder is one of theirs, and
    fastbyol.load_encoder always."""
    load = (f'safetensors.torch.load_file("{path}")' if path.suffix == ".safetensors" else
            f'torch.load("{path}")')
    lines = []
    resolved_stem = ("small" if image_size <= 64 else "imagenet") if stem == "auto" else stem
    if arch in TORCHVISION_RESNETS and resolved_stem == "imagenet":
        lines.append(f"torchvision.models.{arch}().load_state_dict({load}, strict=False)  # only fc is missing")
    elif arch in TIMM_VITS:
        size = "" if image_size == 224 else f", img_size={image_size}"
        lines.append(f'timm.create_model("{arch}_224", num_classes=0{size}).load_state_dict({load}, strict=False)  '
                     "# only the head is missing")
    extra = "" if path.suffix == ".safetensors" else f', arch="{arch}", stem="{stem}", image_size={image_size}'
    lines.append(f'fastbyol.load_encoder("{path}"{extra})')
    return lines
