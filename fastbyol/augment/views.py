"""The two views' augmentation parameters: `ViewSpec` (one view, official `byol/utils/augmentations.py`), `VIEW1` and
`VIEW2` (the official pair), `views_from_config` (the pair a run uses: what the trainer and `fastbyol bench augment`
build) and `sample_params` (the chain's per-image random parameters drawn by torch, for tests and benchmarks of the
chain alone; the loader draws them with DALI, fastbyol.augment.pipelines.draw_params)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict, dataclass

import torch

from ..config import BLUR_WINDOW_DEFAULT, BLUR_WINDOW_RULES, Config
from ..errors import FastByolError
from .photometric import ORDERS, PARAM_NAMES

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ViewSpec:
    """One view's augmentation; probabilities in [0, 1], colour amounts in units of the [0, 1] pixel range."""

    crop_area: tuple[float, float] = (0.08, 1.0)  # fraction of the image area kept by the random crop
    crop_aspect: tuple[float, float] = (3 / 4, 4 / 3)  # width / height, drawn log-uniformly
    flip_p: float = 0.5  # horizontal flip
    jitter_p: float = 0.8  # colour jitter, all four ops together
    brightness: float = 0.4  # additive delta ~ U[-b, b]
    contrast: float = 0.4  # factor ~ U[1 - c, 1 + c] around the image mean
    saturation: float = 0.2  # factor ~ U[1 - s, 1 + s]
    hue: float = 0.1  # delta ~ U[-h, h] of a full turn
    gray_p: float = 0.2  # grayscale
    blur_p: float = 1.0  # Gaussian blur
    blur_sigma: tuple[float, float] = (0.1, 2.0)  # sigma ~ U[lo, hi], in pixels
    blur_kernel_fraction: float = 0.1  # kernel side = 10% of the output side (radius = side // 10 // 2)
    solarize_p: float = 0.0  # solarize
    solarize_threshold: float = 0.5  # pixels >= threshold become 1 - x
    blur_window_rule: str = BLUR_WINDOW_DEFAULT  # "cover" (also >= +-3 sigma_hi) or "official": blur_window

    def validate(self, name: str = "view") -> None:
        for field in ("flip_p", "jitter_p", "gray_p", "blur_p", "solarize_p", "solarize_threshold"):
            v = getattr(self, field)
            if not 0.0 <= v <= 1.0:
                raise FastByolError(f"{name}.{field} must be in [0, 1], got {v}")
        lo, hi = self.crop_area
        if not 0.0 < lo <= hi <= 1.0:
            raise FastByolError(f"{name}.crop_area must satisfy 0 < lo <= hi <= 1, got {self.crop_area}")
        if not 0.0 < self.blur_sigma[0] <= self.blur_sigma[1]:
            raise FastByolError(f"{name}.blur_sigma must satisfy 0 < lo <= hi, got {self.blur_sigma}")
        if self.blur_window_rule not in BLUR_WINDOW_RULES:
            raise FastByolError(f"{name}.blur_window_rule must be one of {', '.join(BLUR_WINDOW_RULES)}, got "
                                f"{self.blur_window_rule!r}")

    def blur_window(self, size: int) -> int:
        """Odd kernel side for an output side `size`.
        official: 10% of the side, as the official code: 23 taps at 224 px, 9 at 96, 3 at 28/32.
        cover: the official window, widened where it would cut the Gaussian of the widest sigma drawn short of
          +-3 sigma: max(official, 2 ceil(3 sigma_hi) + 1), that is 13 taps for sigma_hi = 2 up to 139 px, and the
          official window above (23 at 224 px: the same op there). At 28 px the official 3 taps turn a sigma of 2 px
          into a 3-tap box-like filter; the cover window is the Gaussian blur the recipe names."""
        official = 2 * (int(size * self.blur_kernel_fraction) // 2) + 1
        if self.blur_window_rule == "cover":
            return max(official, 2 * math.ceil(3 * self.blur_sigma[1]) + 1)
        return official

    def to_dict(self) -> dict:
        return asdict(self)


VIEW1 = ViewSpec(blur_p=1.0, solarize_p=0.0)
VIEW2 = ViewSpec(blur_p=0.1, solarize_p=0.2)


def views_from_config(cfg: Config) -> tuple[ViewSpec, ViewSpec]:
    """(view 1, view 2) of a run: the official pair with the run's crop area (--crop-min-area) and blur window rule
    (--blur-window). The one place they are built: the trainer's loader and `fastbyol bench augment` both call it."""
    changes = {"crop_area": (cfg.data.crop_min_area, 1.0), "blur_window_rule": cfg.data.blur_window}
    return dataclasses.replace(VIEW1, **changes), dataclasses.replace(VIEW2, **changes)


def sample_params(spec: ViewSpec, n: int, generator: torch.Generator | None = None,
                  device: str | torch.device = "cpu") -> torch.Tensor:
    """(n, N_PARAMS) float32 parameters with draw_params' distribution, drawn by torch: for tests and benchmarks of
    the photometric chain alone (the loader draws them with DALI)."""

    def u(lo, hi):
        return lo + (hi - lo) * torch.rand(n, generator=generator)

    def coin(p):
        return (torch.rand(n, generator=generator) < p).float()

    cols = dict(jitter=coin(spec.jitter_p), brightness=u(-spec.brightness, spec.brightness),
                contrast=u(1 - spec.contrast, 1 + spec.contrast),
                saturation=u(1 - spec.saturation, 1 + spec.saturation), hue=u(-spec.hue, spec.hue),
                order=torch.randint(0, len(ORDERS), (n,), generator=generator).float(),
                gray=coin(spec.gray_p), blur=coin(spec.blur_p), sigma=u(*spec.blur_sigma),
                solarize=coin(spec.solarize_p))
    return torch.stack([cols[name] for name in PARAM_NAMES], dim=1).to(device)
