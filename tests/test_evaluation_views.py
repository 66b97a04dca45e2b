"""The supervised protocols' views (fastbyol.evaluation.views): DALI draws each image's crop and flip anew per image
and per epoch, within the official ranges; the test split's centre crop is the centre S x S of the image resized to
256/224 of S."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fastbyol.evaluation.views import CROP_AREA, TrainViews, centre_crop

pytest.importorskip("nvidia.dali")


def _images(n=64, side=28, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, side, side, 3), dtype=np.uint8)


def _epoch_windows(views):
    """{image index: (5,) window} of one epoch, and the views of its first batch."""
    windows, first = {}, None
    for idx, crops in views.epoch():
        first = (idx, crops) if first is None else first
        for i, row in zip(idx.tolist(), views.last_windows.tolist()):
            windows[i] = tuple(row)
    return windows, first


def test_crops_are_drawn_per_image_and_per_epoch():
    views = TrainViews(_images(), batch_size=16, size=28, seed=3)
    e1, (idx, crops) = _epoch_windows(views)
    e2, _ = _epoch_windows(views)
    assert len(e1) == len(e2) == 64 and crops.shape == (16, 3, 28, 28) and crops.dtype == torch.uint8
    assert len(set(e1.values())) > 48  # per image: nearly every image of an epoch has its own window
    same = sum(e1[i] == e2[i] for i in e1)
    assert same < 8  # per epoch: an image's window is drawn again (equal by chance only)
    flips = np.array([w[4] for w in list(e1.values()) + list(e2.values())])
    assert 0.3 < flips.mean() < 0.7  # horizontal flip with p 0.5
    for y, x, h, w, _ in e1.values():  # inside the image, area in the official range (rounding: one pixel)
        assert 0 <= y and 0 <= x and y + h <= 28 and x + w <= 28
        assert CROP_AREA[0] * 784 * 0.8 <= h * w <= 784


def test_views_are_the_windows_cut_resized_and_flipped():
    images = _images(16)
    views = TrainViews(images, batch_size=16, size=20, seed=0)
    idx, crops = next(iter(views.epoch()))
    for k in range(4):
        y, x, h, w, flip = views.last_windows[k].tolist()
        src = torch.from_numpy(images[idx[k]])[y:y + h, x:x + w].permute(2, 0, 1)[None]
        want = F.interpolate(src, size=(20, 20), mode="bicubic", antialias=True)[0]
        torch.testing.assert_close(crops[k], want.flip(-1) if flip else want, atol=0, rtol=0)


def test_same_seed_same_views_other_seed_other_views():
    a, _ = _epoch_windows(TrainViews(_images(), 16, 28, seed=5))
    b, _ = _epoch_windows(TrainViews(_images(), 16, 28, seed=5))
    c, _ = _epoch_windows(TrainViews(_images(), 16, 28, seed=6))
    assert a == b and a != c


@pytest.mark.parametrize("side,size,resized", [(28, 28, 32), (96, 96, 110), (40, 24, 27)])
def test_centre_crop_size_and_content(side, size, resized):
    images = _images(3, side)
    out = centre_crop(images, size)
    assert out.shape == (3, 3, size, size) and out.dtype == torch.uint8
    full = F.interpolate(torch.from_numpy(images).permute(0, 3, 1, 2), size=(resized, resized), mode="bicubic",
                         antialias=True)
    off = (resized - size) // 2
    torch.testing.assert_close(out, full[:, :, off:off + size, off:off + size], atol=0, rtol=0)


def test_centre_crop_of_a_wide_image_keeps_its_centre():
    images = np.zeros((1, 28, 56, 3), np.uint8)
    images[:, :, 26:30] = 255  # a bright vertical bar in the middle
    out = centre_crop(images, 28)
    assert out.shape == (1, 3, 28, 28)
    cols = out[0, 0].float().mean(0)
    assert cols[12:16].mean() > 200 and cols[:4].mean() < 5 and cols[-4:].mean() < 5
