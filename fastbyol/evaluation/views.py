"""The views of the supervised protocols (paper linear evaluation, fine-tuning): training crops drawn by DALI, per
image and per epoch, and the centre crop of the test split.

Training: a random resized crop (area [0.08, 1], log-uniform aspect [3/4, 4/3], the official LINEAR_TRAIN
preprocessing) and a horizontal flip with p 0.5, resized to the image size. DALI's random ops (the crop window
sampler of fn.random_resized_crop, fn.random.coin_flip) draw every window and flip per sample at every iteration
(device_id=None: DALI's CPU operators, the same on every machine), from a seeded pipeline whose source shuffles
the images each epoch; torch cuts, resizes (bicubic) and mirrors them with the trainer's own crop op
(fastbyol.augment.crop_resize_flip).

Test: the centre crop scaled to the image size as 224 is to 256 (ImageNet's resize-256-crop-224): the image is
resized to round(S * 256 / 224) and its centre S x S kept (28 -> 32 -> 28 px). The official code crops the centre
224/256 of the shorter side and resizes it to 224: the same field of view.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..augment import IMAGENET_MEAN, IMAGENET_STD, crop_resize_flip

CROP_AREA = (0.08, 1.0)
CROP_ASPECT = (3 / 4, 4 / 3)
CENTRE_RATIO = 256 / 224


class _ShuffledIndices:
    """DALI external_source callback: a seeded permutation of range(n) per epoch, in full batches (the last partial
    batch is dropped, a different remainder each epoch)."""

    def __init__(self, n: int, batch_size: int, seed: int):
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.steps = n // batch_size

    def __call__(self, info):
        if info.iteration >= self.steps:
            raise StopIteration
        perm = np.random.default_rng([self.seed, info.epoch_idx]).permutation(self.n)
        idx = perm[info.iteration * self.batch_size:(info.iteration + 1) * self.batch_size]
        return [np.array([i], dtype=np.int64) for i in idx]


def _windows_pipeline(n: int, height: int, width: int, batch_size: int, seed: int, num_threads: int):
    """DALI pipeline: (index of each sample, its (5,) int32 window [y, x, h, w, flip])."""
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(enable_conditionals=False)
    def linear_train_windows():
        index = fn.external_source(source=_ShuffledIndices(n, batch_size, seed), batch=True, batch_info=True,
                                   dtype=types.INT64)
        shape = fn.constant(idata=[height, width], dtype=types.INT64)
        anchor, size = fn.random_crop_generator(shape, random_area=list(CROP_AREA),
                                                random_aspect_ratio=list(CROP_ASPECT))
        flip = fn.random.coin_flip(probability=0.5, dtype=types.INT32)
        window = fn.cat(fn.cast(anchor, dtype=types.INT32), fn.cast(size, dtype=types.INT32),
                        fn.reshape(flip, shape=[1]), axis=0)
        return index, window

    pipe = linear_train_windows(batch_size=batch_size, num_threads=num_threads, device_id=None, seed=seed,
                                prefetch_queue_depth=2, exec_dynamic=True)
    pipe.build()
    return pipe


def normalise(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """(B, 3, S, S) uint8 -> float32 on `device`, ImageNet-normalised, channels_last (as the kNN features)."""
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1) * 255
    x = x.to(device, non_blocking=True).float()
    return ((x - mean) / std).contiguous(memory_format=torch.channels_last)


class TrainViews:
    """Epochs of (indices (B,) int64, views (B, 3, S, S) uint8) of `images` (N, H, W, 3) uint8: each image's crop
    and flip drawn anew each epoch. `last_windows`: the (B, 5) windows of the last batch (for tests)."""

    def __init__(self, images: np.ndarray, batch_size: int, size: int, seed: int = 0, num_threads: int = 2):
        if batch_size > len(images):
            batch_size = len(images)
        self.images = torch.from_numpy(np.ascontiguousarray(images))
        self.size = size
        self.steps_per_epoch = len(images) // batch_size
        self._pipe = _windows_pipeline(len(images), images.shape[1], images.shape[2], batch_size, seed, num_threads)
        self.last_windows = None

    def epoch(self):
        for _ in range(self.steps_per_epoch):
            index, window = self._pipe.run()
            idx = torch.from_dlpack(index.as_tensor()).reshape(-1).clone()
            self.last_windows = torch.from_dlpack(window.as_tensor()).clone()
            rows = [self.images[k] for k in idx.tolist()]
            yield idx, crop_resize_flip(rows, self.last_windows, self.size)
        self._pipe.reset()


def centre_crop(images: np.ndarray, size: int) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, size, size) uint8: resized (bicubic) to round(size * 256 / 224) on the shorter
    side, then the centre size x size."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)  # (N, 3, H, W)
    h, w = x.shape[2:]
    side = round(size * CENTRE_RATIO)
    new_h, new_w = (side, round(w * side / h)) if h <= w else (round(h * side / w), side)
    x = F.interpolate(x, size=(new_h, new_w), mode="bicubic", antialias=True)  # uint8 in, uint8 out
    top, left = (new_h - size) // 2, (new_w - size) // 2
    return x[:, :, top:top + size, left:left + size].contiguous()
