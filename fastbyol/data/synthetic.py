"""Synthetic labeled JPEG folders (train/<class>/*.jpg, test/<class>/*.jpg) for tests, smoke runs and benchmarks.

Two styles (Pillow writes the files):
- "fast": a random 8x8 colour grid upsampled (bicubic) to size x size, with a class colour cast; tiny files, quick to
  write and decode: tests and CPU smoke runs.
- "imagenet": photograph-like images for decode benchmarks: sizes drawn around ImageNet's (long side 500 for most,
  landscape or portrait, aspect 4:3 / 3:2 / 1:1 / ...), a luminance field with a 1/f amplitude spectrum (the
  statistics of natural images) crossed by a few occluding blobs (edges, as the dead-leaves model), low-frequency
  chroma and a class colour cast; ~100 KB at quality 90 (measured: 85-105 KB on average for 500x375), which nvJPEG
  and libjpeg-turbo decode at photograph cost, unlike the "fast" style's flat files.

`synthetic_folder()` is what `--data synthetic` reads: a deterministic folder in the cache
(`$FASTBYOL_CACHE/synthetic/...`, see cache.py), written once under a temporary name and renamed into place, reused
by later runs. A run killed while writing it leaves a `*.tmp-PID` folder that the next start removes.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np

from ..errors import FastByolError
from .cache import TMP_MARK, cache_root, file_lock, remove_stale_tmp

STYLES = ("fast", "imagenet")
# ImageNet-like (height, width): 500x375 and 500x333 dominate ImageNet; some smaller and square ones
_IMAGENET_SHAPES = ((375, 500), (500, 375), (333, 500), (500, 333), (400, 500), (500, 400), (375, 375), (281, 500),
                    (300, 400), (500, 500))
_IMAGENET_P = (0.34, 0.16, 0.14, 0.06, 0.06, 0.04, 0.06, 0.04, 0.05, 0.05)


def _pil():
    try:
        from PIL import Image
    except ImportError:
        raise FastByolError("synthetic JPEGs need Pillow: pip install pillow") from None
    return Image


def _field(rng: np.random.Generator, h: int, w: int, alpha: float) -> np.ndarray:
    """(h, w) float64 Gaussian field, zero mean, unit std, amplitude spectrum ~ 1/f^alpha."""
    fy = np.fft.fftfreq(h)[:, None]
    fx = np.fft.rfftfreq(w)[None, :]
    f = np.sqrt(fy * fy + fx * fx)
    f[0, 0] = 1.0
    amp = f ** -alpha
    amp[0, 0] = 0.0
    spec = amp * (rng.standard_normal(amp.shape) + 1j * rng.standard_normal(amp.shape))
    x = np.fft.irfft2(spec, s=(h, w))
    return (x - x.mean()) / (x.std() + 1e-12)


def natural_image(rng: np.random.Generator, h: int, w: int, label: int = 0, classes: int = 1) -> np.ndarray:
    """(h, w, 3) uint8: 1/f luminance, occluding blobs, smooth chroma, a colour cast that depends on the class."""
    lum = _field(rng, h, w, 0.95) * 50.0
    yy, xx = np.mgrid[0:h, 0:w]
    for _ in range(int(rng.integers(3, 8))):  # occluders: sharp edges over the texture
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        ry, rx = rng.uniform(20, h / 2), rng.uniform(20, w / 2)
        inside = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1.0
        lum[inside] = lum[inside] * 0.5 + rng.normal(0.0, 40.0)
    c1, c2 = _field(rng, h, w, 1.6) * 18.0, _field(rng, h, w, 1.6) * 18.0  # opponent chroma, low-frequency
    hue = 2 * np.pi * label / max(classes, 1)
    cast = 30.0 * np.array([np.cos(hue), np.cos(hue - 2.1), np.cos(hue + 2.1)]) + rng.normal(0.0, 8.0, 3)
    rgb = rng.uniform(70, 170) + lum[..., None] + cast + np.stack([c1, -0.5 * c1 - 0.5 * c2, c2], axis=-1)
    return np.clip(rgb, 0, 255).astype(np.uint8)


def _fast_image(rng: np.random.Generator, size: int, k: int):
    Image = _pil()
    coarse = rng.integers(0, 256, (8, 8, 3)).astype(np.float32)
    coarse[..., k % 3] = 255 - 40 * k  # a class-dependent colour cast
    return Image.fromarray(coarse.astype(np.uint8)).resize((size, size), Image.BICUBIC)


def write_synthetic_jpegs(folder: Path, n_train: int = 512, n_test: int = 128, size: int = 256, classes: int = 4,
                          seed: int = 0, quality: int = 90, style: str = "fast") -> Path:
    """Write n_train + n_test JPEGs in folder/{train,test}/class<k>/NNNNNN.jpg (image i has class i % classes).

    style "fast": size x size upsampled noise; "imagenet": photograph-like, ImageNet-like sizes (`size` unused)."""
    if style not in STYLES:
        raise FastByolError(f"synthetic style {style!r} is not one of {STYLES}")
    Image = _pil()
    folder = Path(folder)
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("test", n_test)):
        for i in range(n):
            k = i % classes
            folder_k = folder / split / f"class{k}"
            folder_k.mkdir(parents=True, exist_ok=True)
            if style == "fast":
                img = _fast_image(rng, size, k)
            else:
                h, w = _IMAGENET_SHAPES[rng.choice(len(_IMAGENET_SHAPES), p=_IMAGENET_P)]
                img = Image.fromarray(natural_image(rng, h, w, k, classes))
            img.save(folder_k / f"{i:06d}.jpg", quality=quality)
    return folder


def synthetic_folder(n_train: int = 512, n_test: int = 128, size: int = 256, style: str = "fast",
                     cache_dir: str | os.PathLike | None = None) -> Path:
    """The cached synthetic folder for these settings, written on first use (atomically) and reused afterwards."""
    parent = cache_root(cache_dir) / "synthetic"
    final = parent / f"{style}-{n_train}-{n_test}-{size}-v1"
    if (final / ".complete").is_file():
        return final
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise FastByolError(f"--data synthetic: cannot create {parent} ({e.strerror}); set FASTBYOL_CACHE") from None
    with file_lock(parent / f"{final.name}.lock"):  # concurrent runs (torchrun ranks) write it once
        if (final / ".complete").is_file():
            return final
        remove_stale_tmp(parent)  # folders of killed runs
        tmp = parent / f"{final.name}{TMP_MARK}{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(final, ignore_errors=True)  # an incomplete folder (its marker removed by hand)
        try:
            write_synthetic_jpegs(tmp, n_train, n_test, size, style=style)
            (tmp / ".complete").write_text("written whole\n")
            os.rename(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final
