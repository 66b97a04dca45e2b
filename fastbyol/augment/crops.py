"""The CPU crops of the augmentation: each image's random resized crop window (drawn by DALI) cut, resized bicubic
and mirrored by torch in uint8, on the chain's worker threads (torch's uint8 resize is ~10x faster than DALI's CPU
one). Used by the loader's thread path (fastbyol.augment.makers) and by its worker processes
(fastbyol.augment.cpu_workers)."""

from __future__ import annotations

import torch


def crop_resize_flip(images, windows, size: int, channels: int = 3, threads: int | None = None) -> torch.Tensor:
    """(B, 3, size, size) uint8 planar crops: image i's window (y, x, h, w) resized bicubic to size x size, mirrored
    where its flip is 1. images[i] is an (H, W, 3) uint8 tensor (NHWC: an array row or a decoded file); windows
    (B, 5) integers [y, x, h, w, flip] (a tensor or rows). channels 1 (gray input): only the first channel is
    resized, the others are views of it.

    torch's uint8 bicubic (Keys, a = -0.5, as tf.image.resize's) antialiases when it shrinks, which the official
    resize does not: the one place the CPU crop differs from the official one (enlarging, the common case, is
    identical). threads: as photometric (one torch thread per worker)."""
    return crop_resize_flip_many([(images, windows)], size, channels, threads)[0]


def crop_resize_flip_many(jobs: list, size: int, channels: int = 3, threads: int | None = None) -> list:
    """crop_resize_flip for several (images, windows) pairs (both views of a batch), their images spread over the
    same workers at once."""
    import torch.nn.functional as F

    from .photometric import worker_pool

    outs, tasks = [], []
    for images, windows in jobs:
        rows = windows.tolist() if isinstance(windows, torch.Tensor) else list(windows)
        out = torch.empty((len(rows), channels, size, size), dtype=torch.uint8)

        def some(ids: range, images=images, rows=rows, out=out) -> None:
            for i in ids:
                y, x, h, w, flip = rows[i]
                src = images[i][y:y + h, x:x + w, :channels].permute(2, 0, 1).unsqueeze(0)  # (1, C, h, w) NHWC view
                crop = F.interpolate(src, size=(size, size), mode="bicubic", antialias=True)[0]  # (C, size, size)
                out[i].copy_(crop.flip(-1) if flip else crop)

        step = max(1, -(-len(rows) // (4 * (threads or 1))))  # a few tasks per worker
        tasks += [(some, range(a, min(len(rows), a + step))) for a in range(0, len(rows), step)]
        outs.append(out.expand(-1, 3, -1, -1) if channels == 1 else out)
    if threads is None:
        for some, ids in tasks:
            some(ids)
    else:
        for done in [worker_pool(threads).submit(some, ids) for some, ids in tasks]:
            done.result()
    return outs
