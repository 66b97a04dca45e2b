"""Fidelity of the augmentation to the official BYOL recipe (deepmind-research `byol/utils/augmentations.py`), on the
path the loader runs: DALI draws the crops and every random parameter, the torch chain (fastbyol.augment.photometric) applies
the colour ops.

- every per-view probability drawn by DALI, over 4,000 samples, within 3 standard errors; every parameter's range;
  the jitter order uniform over the 24 orders;
- the crop's area and aspect, measured off a coordinate image;
- every op of the chain, with fixed parameters, against a numpy port of the official op (float64 and float32);
- the whole chain (random order, coins, blur, solarize, clip, normalize) against the official ops composed per
  image, and the loader's own views against that composition applied to the loader's own DALI outputs.
"""

import colorsys
import math

import numpy as np
import pytest
import torch

pytest.importorskip("nvidia.dali")

from nvidia.dali import fn, pipeline_def, types  # noqa: E402

from fastbyol.augment import (IMAGENET_MEAN, IMAGENET_STD, VIEW1, VIEW2,  # noqa: E402
                              draw_params, op_random_resized_crop, sample_params)
from fastbyol.augment.photometric import (GRAY_WEIGHTS, ORDERS, PARAM_NAMES, ChainSpec,  # noqa: E402
                                  adjust_brightness, adjust_contrast, adjust_hue, adjust_saturation, blur_taps,
                                  gaussian_blur, grayscale, photometric, solarize)

N = 4000


# ----------------------------------------------------------------------- numpy port of the official ops (HWC, [0, 1])
def official_rgb_to_hsv(r, g, b):
    vv = np.maximum(np.maximum(r, g), b)
    range_ = vv - np.minimum(np.minimum(r, g), b)
    with np.errstate(divide="ignore", invalid="ignore"):
        sat = np.where(vv > 0, range_ / vv, 0.0)
        norm = np.where(range_ != 0, 1.0 / (6.0 * range_), 1e9)
    hr = norm * (g - b)
    hg = norm * (b - r) + 2.0 / 6.0
    hb = norm * (r - g) + 4.0 / 6.0
    hue = np.where(r == vv, hr, np.where(g == vv, hg, hb))
    hue = hue * (range_ > 0)
    hue = hue + (hue < 0)
    return hue, sat, vv


def official_hsv_to_rgb(h, s, v):
    c = s * v
    m = v - c
    dh = (h % 1.0) * 6.0
    fmodu = dh % 2.0
    x = c * (1 - np.abs(fmodu - 1))
    hcat = np.floor(dh).astype(np.int32)
    rr = np.where((hcat == 0) | (hcat == 5), c, np.where((hcat == 1) | (hcat == 4), x, 0)) + m
    gg = np.where((hcat == 1) | (hcat == 2), c, np.where((hcat == 0) | (hcat == 3), x, 0)) + m
    bb = np.where((hcat == 3) | (hcat == 4), c, np.where((hcat == 2) | (hcat == 5), x, 0)) + m
    return rr, gg, bb


def _hsv_op(img, sat=1.0, hue=0.0):
    h, s, v = official_rgb_to_hsv(img[..., 0], img[..., 1], img[..., 2])
    return np.stack(official_hsv_to_rgb((h + hue) % 1.0, np.clip(s * sat, 0.0, 1.0), v), axis=-1)


def np_brightness(img, delta):
    return np.clip(img + delta, 0, 1)


def np_contrast(img, factor):
    mean = img.mean(axis=(0, 1), keepdims=True)
    return np.clip(factor * (img - mean) + mean, 0, 1)


def np_saturation(img, factor):
    return np.clip(_hsv_op(img, sat=factor), 0, 1)


def np_hue(img, delta):
    return np.clip(_hsv_op(img, hue=delta), 0, 1)


def np_grayscale(img):
    return np.repeat(np.tensordot(img, np.array(GRAY_WEIGHTS), axes=(-1, -1))[..., None], 3, axis=-1)


def np_blur(img, sigma, window):
    """Separable, normalized taps, zero padding ('SAME' depthwise convolution), horizontal then vertical."""
    r = window // 2
    x = np.arange(-r, r + 1, dtype=np.float64)
    k = np.exp(-(x**2) / (2.0 * sigma**2))
    k /= k.sum()
    pad = np.pad(img, ((0, 0), (r, r), (0, 0)))
    rows = sum(k[i] * pad[:, i:i + img.shape[1]] for i in range(window))
    pad = np.pad(rows, ((r, r), (0, 0), (0, 0)))
    return sum(k[i] * pad[i:i + img.shape[0]] for i in range(window))


def np_solarize(img, threshold):
    return np.where(img < threshold, img, 1.0 - img)


NP_JITTER = (np_brightness, np_contrast, np_saturation, np_hue)


def np_chain(crop_u8, p, window, threshold, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """The official postprocess of one crop (CHW uint8, as DALI emits it) with parameters p (N_PARAMS,), then
    normalize: (H, W, 3)."""
    q = dict(zip(PARAM_NAMES, np.asarray(p, dtype=np.float64)))
    img = np.asarray(crop_u8).transpose(1, 2, 0).astype(np.float64) / 255.0
    if q["jitter"] > 0.5:
        for op in ORDERS[int(q["order"])]:
            img = NP_JITTER[op](img, q[PARAM_NAMES[1 + op]])
    if q["gray"] > 0.5:
        img = np_grayscale(img)
    img = np.clip(img, 0, 1)
    if q["blur"] > 0.5:
        img = np_blur(img, q["sigma"], window)
    if q["solarize"] > 0.5:
        img = np_solarize(img, threshold)
    img = np.clip(img, 0, 1)
    return (img - np.array(mean)) / np.array(std)


def test_numpy_port_of_the_official_hsv_matches_colorsys():
    rng = np.random.default_rng(3)
    px = rng.uniform(0, 1, (200, 3))
    px[:4] = [[0.5, 0.5, 0.5], [0.7, 0.7, 0.2], [0.2, 0.7, 0.7], [0.0, 0.0, 0.0]]  # gray, ties, black
    h, s, v = official_rgb_to_hsv(px[:, 0], px[:, 1], px[:, 2])
    want = np.array([colorsys.rgb_to_hsv(*p) for p in px])
    np.testing.assert_allclose(np.stack([h, s, v], 1), want, atol=1e-12)
    back = np.stack(official_hsv_to_rgb(h, s, v), 1)
    np.testing.assert_allclose(back, px, atol=1e-12)


# ------------------------------------------------------------------------------------------- DALI's random draws
def _run(graph, batch_size=1, seed=1, **inputs):
    """Outputs of graph(**external inputs) for one batch, as numpy arrays (one per output, stacked)."""

    def constant(v):
        return lambda: [v] * batch_size

    @pipeline_def
    def pipe():
        nodes = {k: fn.external_source(source=constant(v), batch=True, layout="HWC",
                                       dtype=types.FLOAT if v.dtype == np.float32 else types.UINT8)
                 for k, v in inputs.items()}
        out = graph(**nodes)
        return tuple(out) if isinstance(out, (tuple, list)) else (out,)

    p = pipe(batch_size=batch_size, num_threads=1, device_id=None, seed=seed)
    p.build()
    return [np.stack([np.asarray(o[i]) for i in range(len(o))]) for o in p.run()]


@pytest.fixture(scope="module", params=["view1", "view2"])
def drawn(request):
    spec = VIEW1 if request.param == "view1" else VIEW2
    names = ["flip", *PARAM_NAMES]

    def graph(**_):
        q = draw_params(spec)
        return [fn.cast(q[n], dtype=types.FLOAT) for n in names]

    outs = _run(graph, batch_size=N)
    return spec, {n: o.reshape(N) for n, o in zip(names, outs)}


def test_per_view_probabilities_within_3_standard_errors(drawn):
    spec, q = drawn
    for name, p in (("flip", spec.flip_p), ("jitter", spec.jitter_p), ("gray", spec.gray_p), ("blur", spec.blur_p),
                    ("solarize", spec.solarize_p)):
        assert set(np.unique(q[name])) <= {0.0, 1.0}, name
        freq = q[name].mean()
        se = math.sqrt(max(p * (1 - p), 1e-12) / N)
        assert abs(freq - p) <= 3 * se + 1e-9, f"{name}: {freq:.4f} against {p} (3 SE = {3 * se:.4f})"


def test_parameter_ranges(drawn):
    spec, q = drawn
    for name, lo, hi in (("brightness", -spec.brightness, spec.brightness),
                         ("contrast", 1 - spec.contrast, 1 + spec.contrast),
                         ("saturation", 1 - spec.saturation, 1 + spec.saturation), ("hue", -spec.hue, spec.hue),
                         ("sigma", *spec.blur_sigma)):
        v = q[name]
        width = hi - lo
        assert v.min() >= lo - 1e-6 and v.max() <= hi + 1e-6, name
        assert v.min() < lo + 0.01 * width and v.max() > hi - 0.01 * width, f"{name} does not fill its range"
        assert abs(v.mean() - (lo + hi) / 2) < 4 * width / math.sqrt(12 * N), f"{name} is not uniform"


def test_jitter_order_uniform_over_the_24_orders(drawn):
    _, q = drawn
    order = q["order"]
    assert np.array_equal(order, np.round(order)) and order.min() >= 0 and order.max() <= 23
    counts = np.bincount(order.astype(int), minlength=24)
    chi2 = ((counts - N / 24) ** 2 / (N / 24)).sum()
    assert chi2 < 49.7, f"chi-square {chi2:.1f} over 23 degrees of freedom (p < 0.002)"
    b_first = np.mean([ORDERS[int(k)].index(0) < ORDERS[int(k)].index(1) for k in order])
    assert abs(b_first - 0.5) < 3 * math.sqrt(0.25 / N)


def _crop_stats(w, h, side):
    area = w * h / side**2
    aspect = np.log(w / h)
    lo, hi = VIEW1.crop_area
    assert area.min() > lo * 0.85 and area.max() <= hi * 1.02
    assert area.min() < lo * 1.5 and area.max() > hi * 0.9
    a_lo, a_hi = math.log(VIEW1.crop_aspect[0]), math.log(VIEW1.crop_aspect[1])
    assert aspect.min() > a_lo - 0.08 and aspect.max() < a_hi + 0.08
    assert abs(aspect.mean()) < 0.03  # log-uniform: symmetric around 0


def _coordinates(side=256):
    coords = np.zeros((side, side, 3), np.uint8)
    coords[..., 0] = np.arange(side)[None, :]  # R = x
    coords[..., 1] = np.arange(side)[:, None]  # G = y
    return coords


def test_crop_area_and_aspect_on_the_cpu_path(make_loader):
    """The loader's CPU crop (DALI's window sampler, torch's resize), measured off a coordinate image through the
    whole loader with every photometric op and the flip switched off."""
    from fastbyol.augment import ViewSpec

    plain = ViewSpec(flip_p=0.0, jitter_p=0.0, gray_p=0.0, blur_p=0.0, solarize_p=0.0)
    images = np.repeat(_coordinates()[None], 50, axis=0)
    loader = make_loader(images, batch_size=50, image_size=64, seed=2, num_threads=2, view1=plain, view2=plain)
    std, mean = np.array(IMAGENET_STD).reshape(1, 3, 1, 1), np.array(IMAGENET_MEAN).reshape(1, 3, 1, 1)
    outs = []
    while len(outs) < 40:
        for v1, v2 in loader.epoch():
            outs += [(v.numpy() * std + mean) * 255 for v in (v1, v2)]
    out = np.concatenate(outs)  # (4000, 3, 64, 64) source coordinates
    w = (out[:, 0, 32, -1] - out[:, 0, 32, 0]) * 64 / 63 + 1
    h = (out[:, 1, -1, 32] - out[:, 1, 0, 32]) * 64 / 63 + 1
    _crop_stats(w, h, 256)


def test_crop_area_and_aspect():
    """DALI's random_resized_crop (the CUDA path's crop for arrays), off a coordinate image."""
    out = _run(lambda img: op_random_resized_crop(img, VIEW1, 64), batch_size=2000,
               img=_coordinates())[0].astype(float)
    # the crop spans from the first to the last output pixel centre: 63/64 of its width
    w = (out[:, 32, -1, 0] - out[:, 32, 0, 0]) * 64 / 63 + 1
    h = (out[:, -1, 32, 1] - out[:, 0, 32, 1]) * 64 / 63 + 1
    _crop_stats(w, h, 256)


def np_tf_resize_bicubic(img, out_h, out_w):
    """tf.image.resize(img, (out_h, out_w), BICUBIC), antialias=False (TF2's scale_and_translate, 'keyscubic'
    kernel: Keys a = -0.5, half-pixel centres, weights of the taps inside the image renormalized), float64, HWC."""

    def weights(n_in, n_out):
        scale = n_out / n_in
        m = np.zeros((n_out, n_in))
        for i in range(n_out):
            centre = (i + 0.5) / scale
            for j in range(n_in):
                t = abs(centre - (j + 0.5))
                a = -0.5
                m[i, j] = ((a + 2) * t**3 - (a + 3) * t**2 + 1) if t <= 1 else \
                    (a * t**3 - 5 * a * t**2 + 8 * a * t - 4 * a) if t < 2 else 0.0
            m[i] /= m[i].sum()
        return m

    wy, wx = weights(img.shape[0], out_h), weights(img.shape[1], out_w)
    return np.einsum("ij,jkc,lk->ilc", wy, img.astype(np.float64), wx)


def test_cpu_resize_is_the_official_bicubic_when_enlarging():
    """The CPU crop's resize (torch's uint8 bicubic) against the official resize, enlarging as the crops of 8/7-size
    arrays mostly do, on smooth images: within one level (the uint8 rounding). Shrinking, torch antialiases and the
    official does not (augment.py's deviations)."""
    import torch.nn.functional as F

    from fastbyol.augment import crop_resize_flip

    coarse = torch.from_numpy(np.random.default_rng(3).integers(0, 256, (1, 3, 6, 5), dtype=np.uint8)).double()
    smooth = F.interpolate(coarse, size=(41, 37), mode="bilinear").round().to(torch.uint8)[0].permute(1, 2, 0)
    got = crop_resize_flip([smooth.contiguous()], torch.tensor([[0, 0, 41, 37, 0]]), 64)[0]  # (3, 64, 64)
    want = np.clip(np.round(np_tf_resize_bicubic(smooth.numpy(), 64, 64)), 0, 255).transpose(2, 0, 1)
    assert np.abs(got.numpy().astype(float) - want).max() <= 1


# ------------------------------------------------------------------------------------- each op, fixed parameters
@pytest.fixture(scope="module")
def image():
    """(12, 10, 3) in [0, 1], with the pixels that break HSV code: gray, black, white, primaries, two-way ties."""
    rng = np.random.default_rng(11)
    img = rng.uniform(0.0, 1.0, (12, 10, 3))
    special = [[0.5, 0.5, 0.5], [0, 0, 0], [1, 1, 1], [1, 0, 0], [0, 1, 0], [0, 0, 1], [0.8, 0.8, 0.1],
               [0.1, 0.8, 0.8], [0.8, 0.1, 0.8], [0.3, 0.9, 0.3], [1.0, 0.5, 0.0], [0.2, 0.2, 0.9]]
    img[0, :10] = special[:10]
    img[1, :2] = special[10:]
    return img


def _blur(window, sigma):
    def op(x):
        return gaussian_blur(x, blur_taps(torch.full((x.shape[0],), sigma, dtype=x.dtype), window, x.dtype))
    return op


OPS = {
    "brightness": (lambda x: adjust_brightness(x, torch.full((1,), 0.25, dtype=x.dtype)),
                   lambda a: np_brightness(a, 0.25)),
    "brightness-": (lambda x: adjust_brightness(x, torch.full((1,), -0.3, dtype=x.dtype)),
                    lambda a: np_brightness(a, -0.3)),
    "contrast": (lambda x: adjust_contrast(x, torch.full((1,), 1.3, dtype=x.dtype)), lambda a: np_contrast(a, 1.3)),
    "contrast-": (lambda x: adjust_contrast(x, torch.full((1,), 0.6, dtype=x.dtype)), lambda a: np_contrast(a, 0.6)),
    "saturation": (lambda x: adjust_saturation(x, torch.full((1,), 0.8, dtype=x.dtype)),
                   lambda a: np_saturation(a, 0.8)),
    "saturation+": (lambda x: adjust_saturation(x, torch.full((1,), 1.2, dtype=x.dtype)),
                    lambda a: np_saturation(a, 1.2)),
    "hue": (lambda x: adjust_hue(x, torch.full((1,), 0.08, dtype=x.dtype)), lambda a: np_hue(a, 0.08)),
    "hue-": (lambda x: adjust_hue(x, torch.full((1,), -0.1, dtype=x.dtype)), lambda a: np_hue(a, -0.1)),
    "hue-tiny": (lambda x: adjust_hue(x, torch.full((1,), 1e-4, dtype=x.dtype)), lambda a: np_hue(a, 1e-4)),
    "grayscale": (grayscale, np_grayscale),
    "blur": (_blur(5, 1.3), lambda a: np_blur(a, 1.3, 5)),
    "blur-wide": (_blur(23, 2.0), lambda a: np_blur(a, 2.0, 23)),
    "blur-narrow": (_blur(9, 0.1), lambda a: np_blur(a, 0.1, 9)),
    "solarize": (lambda x: solarize(x, 0.5), lambda a: np_solarize(a, 0.5)),
    "solarize-0.3": (lambda x: solarize(x, 0.3), lambda a: np_solarize(a, 0.3)),
}


@pytest.mark.parametrize("dtype, atol", [(torch.float64, 1e-12), (torch.float32, 3e-6)])
@pytest.mark.parametrize("name", list(OPS))
def test_op_matches_the_official_op(image, name, dtype, atol):
    op, reference = OPS[name]
    x = torch.from_numpy(image).permute(2, 0, 1).unsqueeze(0).to(dtype)  # (1, 3, H, W) planar
    got = op(x)[0].permute(1, 2, 0).double().numpy()
    want = reference(image)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=atol, rtol=0, err_msg=name)


def test_ops_read_each_image_its_own_parameter(image):
    x = torch.from_numpy(np.stack([image, image[::-1].copy()])).permute(0, 3, 1, 2)  # (2, 3, H, W) float64
    got = adjust_hue(x, torch.tensor([0.05, -0.07], dtype=torch.float64)).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(got[0], np_hue(image, 0.05), atol=1e-12)
    np.testing.assert_allclose(got[1], np_hue(image[::-1], -0.07), atol=1e-12)


# ----------------------------------------------------------------------------------------------- the whole chain
def _covering_params(spec, n, generator):
    """Random parameters, then every order, with and without each coin, present in the batch."""
    p = sample_params(spec, n, generator)
    p[:, PARAM_NAMES.index("order")] = torch.arange(n) % 24
    for k, name in enumerate(("jitter", "gray", "blur", "solarize")):
        p[:, PARAM_NAMES.index(name)] = ((torch.arange(n) // (k + 1)) % 2).float()
    return p


@pytest.mark.parametrize("spec", [VIEW1, VIEW2], ids=["view1", "view2"])
def test_chain_matches_the_official_ops_composed(spec):
    g = torch.Generator().manual_seed(7)
    size, n = 40, 50  # 50 images: every order, each coin on and off; window 5 at 40 px
    crops = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)
    p = _covering_params(spec, n, g)
    window = spec.blur_window(size)
    got = photometric(crops, p, ChainSpec(blur_window=window, solarize_threshold=spec.solarize_threshold,
                                          mean=IMAGENET_MEAN, std=IMAGENET_STD))
    for i in range(n):
        want = np_chain(crops[i].numpy(), p[i].numpy(), window, spec.solarize_threshold)
        np.testing.assert_allclose(got[i].permute(1, 2, 0).numpy(), want, atol=2e-5, rtol=0, err_msg=f"image {i}")


def test_loader_views_are_the_official_chain_on_its_own_draws(make_loader):
    """The path the trainer uses: DALI's draws, torch's crops and chain; each view with its own spec (blur window,
    solarize threshold) and its own parameters."""
    rng = np.random.default_rng(5)
    images = rng.integers(0, 256, (32, 48, 48, 3), dtype=np.uint8)
    loader = make_loader(images, image_size=40, seed=4, cpu_parallel="threads")
    # one batch as epoch() makes it (the processes' views are these: tests/test_cpu_workers.py): DALI's draws,
    # torch's crops of its windows, the chain
    crops, params = loader.maker.crops(loader.draw())
    v1, v2 = loader.maker.chain(crops, params)
    crops1, crops2 = (c.numpy() for c in crops)
    params1, params2 = (p.numpy() for p in params)
    for views, crops, params, spec in ((v1, crops1, params1, VIEW1), (v2, crops2, params2, VIEW2)):
        for i in range(16):
            want = np_chain(crops[i], params[i], spec.blur_window(40), spec.solarize_threshold)
            np.testing.assert_allclose(views[i].permute(1, 2, 0).numpy(), want, atol=2e-5, rtol=0)
