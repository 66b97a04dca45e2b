"""Fidelity of the DALI augmentation to the official BYOL recipe (shared DESIGN.md's table), on the CPU.

- every per-view probability, over 4,000 samples, within 3 standard errors;
- every random parameter's range (and the crop's area and aspect, measured off a coordinate image);
- every op, with one fixed parameter set, against a numpy reference of the official op (colorsys for HSV).
"""

import colorsys
import math

import numpy as np
import pytest

pytest.importorskip("nvidia.dali")

from nvidia.dali import fn, pipeline_def, types  # noqa: E402

from fastbyol.augment import (GRAY_WEIGHTS, VIEW1, VIEW2, draw_params, op_blur, op_brightness,  # noqa: E402
                              op_contrast, op_grayscale, op_hue, op_random_resized_crop, op_saturation,
                              op_solarize)

N = 4000


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
    names = ["flip", "jitter", "brightness", "contrast", "saturation", "hue", "order_keys", "gray", "blur", "sigma",
             "solarize"]

    def graph(**_):
        q = draw_params(spec)
        return [fn.cast(q[n], dtype=types.FLOAT) for n in names]

    outs = _run(graph, batch_size=N)
    return spec, {n: o.reshape(N, -1).squeeze(-1) if o.reshape(N, -1).shape[1] == 1 else o.reshape(N, -1)
                  for n, o in zip(names, outs)}


def test_per_view_probabilities_within_3_standard_errors(drawn):
    spec, q = drawn
    for name, p in (("flip", spec.flip_p), ("jitter", spec.jitter_p), ("gray", spec.gray_p), ("blur", spec.blur_p),
                    ("solarize", spec.solarize_p)):
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
    # the jitter order: each of the 4! orders equally likely; brightness before contrast half the time
    keys = q["order_keys"]
    b_first = (keys[:, 0] < keys[:, 1]).mean()
    assert abs(b_first - 0.5) < 3 * math.sqrt(0.25 / N)
    orders = np.argsort(keys, axis=1) @ np.array([64, 16, 4, 1])
    assert len(np.unique(orders)) == 24


def test_crop_area_and_aspect():
    side = 256
    coords = np.zeros((side, side, 3), np.uint8)
    coords[..., 0] = np.arange(side)[None, :]  # R = x
    coords[..., 1] = np.arange(side)[:, None]  # G = y
    out = _run(lambda img: op_random_resized_crop(img, VIEW1, 64), batch_size=2000, img=coords)[0].astype(float)
    # the crop spans from the first to the last output pixel centre: 63/64 of its width
    w = (out[:, 32, -1, 0] - out[:, 32, 0, 0]) * 64 / 63 + 1
    h = (out[:, -1, 32, 1] - out[:, 0, 32, 1]) * 64 / 63 + 1
    area = w * h / side**2
    aspect = np.log(w / h)
    lo, hi = VIEW1.crop_area
    assert area.min() > lo * 0.85 and area.max() <= hi * 1.02
    assert area.min() < lo * 1.5 and area.max() > hi * 0.9
    a_lo, a_hi = math.log(VIEW1.crop_aspect[0]), math.log(VIEW1.crop_aspect[1])
    assert aspect.min() > a_lo - 0.08 and aspect.max() < a_hi + 0.08
    assert abs(aspect.mean()) < 0.03  # log-uniform: symmetric around 0


@pytest.fixture(scope="module")
def image():
    rng = np.random.default_rng(11)
    return rng.uniform(0.0, 1.0, (12, 10, 3)).astype(np.float32)


def _hsv_reference(img, sat=1.0, hue=0.0):
    out = np.empty_like(img, dtype=np.float64)
    for i in range(img.shape[0]):
        for j in range(img.shape[1]):
            h, s, v = colorsys.rgb_to_hsv(*img[i, j].astype(np.float64))
            out[i, j] = colorsys.hsv_to_rgb((h + hue) % 1.0, min(max(s * sat, 0.0), 1.0), v)
    return out


def _blur_reference(img, sigma, window):
    r = window // 2
    x = np.arange(-r, r + 1)
    k = np.exp(-(x**2) / (2 * sigma**2))
    k /= k.sum()
    pad = np.pad(img.astype(np.float64), ((r, r), (r, r), (0, 0)), mode="reflect")  # reflect 101
    rows = sum(k[i] * pad[i:i + img.shape[0], :, :] for i in range(window))
    return sum(k[i] * rows[:, i:i + img.shape[1], :] for i in range(window))


OPS = {
    "brightness": (lambda x: op_brightness(x, 0.25), lambda a: np.clip(a + 0.25, 0, 1)),
    "brightness-": (lambda x: op_brightness(x, -0.3), lambda a: np.clip(a - 0.3, 0, 1)),
    "contrast": (lambda x: op_contrast(x, 1.3),
                 lambda a: np.clip((a - a.mean((0, 1))) * 1.3 + a.mean((0, 1)), 0, 1)),
    "saturation": (lambda x: op_saturation(x, 0.8), lambda a: _hsv_reference(a, sat=0.8)),
    "saturation+": (lambda x: op_saturation(x, 1.2), lambda a: _hsv_reference(a, sat=1.2)),
    "hue": (lambda x: op_hue(x, 0.08), lambda a: _hsv_reference(a, hue=0.08)),
    "hue-": (lambda x: op_hue(x, -0.1), lambda a: _hsv_reference(a, hue=-0.1)),
    "grayscale": (op_grayscale, lambda a: np.repeat((a @ np.array(GRAY_WEIGHTS))[..., None], 3, axis=2)),
    "blur": (lambda x: op_blur(x, 1.3, 5), lambda a: _blur_reference(a, 1.3, 5)),
    "solarize": (lambda x: op_solarize(x, 0.5), lambda a: np.where(a < 0.5, a, 1 - a)),
}


@pytest.mark.parametrize("name", list(OPS))
def test_op_matches_numpy_reference(image, name):
    graph, reference = OPS[name]
    got = _run(lambda img: graph(img), img=image)[0][0]
    want = reference(image)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=0, err_msg=name)
