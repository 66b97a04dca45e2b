"""The GPU JPEG path's decode modes, run on the CPU: `fastbyol.augment.decode_views` builds the
graph the CUDA loader runs with the "mixed" decoders; here the same graph runs with the "cpu" decoders and
device_id=None. "roi": one region-of-interest decode per view; "once": one whole-image decode, both views cropped
from it (fn.random_resized_crop). Checked: the outputs' shape, dtype and layout; per-sample crops; the crop's area
and aspect distribution in both modes (the same checks as tests/test_augment_fidelity.py's crop tests, on a lossless
coordinate image) and the two modes' area distributions against each other; exact resume from DALI's checkpoint; the
decoder count; bad values. The "mixed" variant: tests/test_gpu_paths.py (CUDA only)."""

import math

import numpy as np
import pytest
import torch

pytest.importorskip("nvidia.dali")
Image = pytest.importorskip("PIL.Image")

from fastbyol.augment import (  # noqa: E402
    VIEW1,
    VIEW2,
    LoaderSettings,
    TwoViewLoader,
    ViewSpec,
    decode_views,
    decoder_ops,
)
from fastbyol.config import DECODE_MODES, AugmentConfig  # noqa: E402
from fastbyol.errors import FastByolError  # noqa: E402
from tests.test_augment_fidelity import _coordinates, _crop_stats  # noqa: E402

PLAIN = ViewSpec(flip_p=0.0, jitter_p=0.0, gray_p=0.0, blur_p=0.0, solarize_p=0.0)


def _pipe(files, decode, size, batch, views=(VIEW1, VIEW2), seed=3, checkpoint=None):
    """A CPU pipeline of decode_views on `files` (read in order, no shuffle): outputs crops1, params1, crops2,
    params2."""
    from nvidia.dali import fn, pipeline_def

    @pipeline_def(enable_conditionals=False)
    def graph():
        encoded, _ = fn.readers.file(files=files, name="reader")
        outs = []
        for crop, params in decode_views(encoded, views, size, decode, device="cpu"):
            outs += [crop, params]
        return tuple(outs)

    pipe = graph(batch_size=batch, num_threads=2, device_id=None, seed=seed, exec_dynamic=True,
                 enable_checkpointing=True, checkpoint=checkpoint)
    pipe.build()
    return pipe


def _arrays(outputs) -> list[np.ndarray]:
    return [np.asarray(o.as_tensor()) for o in outputs]


@pytest.fixture(scope="module")
def jpegs(tmp_path_factory):
    """Six smooth JPEGs of different sizes (~photo-like: upsampled noise), as the GPU path's inputs."""
    import torch.nn.functional as F

    folder = tmp_path_factory.mktemp("jpegs")
    rng = np.random.default_rng(0)
    files = []
    for i, (h, w) in enumerate([(75, 100), (100, 75), (90, 90), (64, 120), (120, 64), (80, 110)]):
        coarse = torch.from_numpy(rng.integers(0, 256, (1, 3, 6, 6)).astype(np.float32))
        img = F.interpolate(coarse, size=(h, w), mode="bilinear")[0].permute(1, 2, 0).round().byte().numpy()
        path = folder / f"{i}.jpg"
        Image.fromarray(img).save(path, quality=90)
        files.append(str(path))
    return files


@pytest.fixture(scope="module")
def coordinate_png(tmp_path_factory):
    """The 256 x 256 coordinate image (R = x, G = y) of test_fidelity, lossless (PNG), so each crop's window can be
    read back exactly off its corners."""
    path = tmp_path_factory.mktemp("coords") / "coords.png"
    Image.fromarray(_coordinates()).save(path)
    return str(path)


@pytest.mark.parametrize("decode", DECODE_MODES)
def test_views_have_the_chains_shape_dtype_and_layout(jpegs, decode):
    pipe = _pipe(jpegs * 2, decode, 32, 12)
    outputs = pipe.run()
    crops1, params1, crops2, params2 = _arrays(outputs)
    for crops, params in ((crops1, params1), (crops2, params2)):
        assert crops.shape == (12, 3, 32, 32) and crops.dtype == np.uint8  # planar, as the chain reads them
        assert params.shape == (12, 10) and params.dtype == np.float32
    assert outputs[0].layout() == "CHW" and outputs[2].layout() == "CHW"
    assert not np.array_equal(crops1, crops2)


@pytest.mark.parametrize("decode", DECODE_MODES)
def test_every_sample_draws_its_own_crop(jpegs, decode):
    """One file read 16 times: every sample's crop differs (a crop per sample, not per batch or per file), in each
    view."""
    pipe = _pipe([jpegs[0]] * 16, decode, 24, 16, views=(PLAIN, PLAIN))
    crops1, _, crops2, _ = _arrays(pipe.run())
    for crops in (crops1, crops2):
        flat = crops.reshape(16, -1)
        assert len({row.tobytes() for row in flat}) == 16


def _measured_windows(files, decode, n_batches=4, batch=250):
    """(w, h) of each crop in pixels of the 256 px coordinate image, read off the crop's first and last pixel
    centres (the crop spans 63/64 of its window between them), both views, plain specs (no flip)."""
    pipe = _pipe(files * batch, decode, 64, batch, views=(PLAIN, PLAIN), seed=5)
    ws, hs = [], []
    for _ in range(n_batches):
        crops1, _, crops2, _ = _arrays(pipe.run())
        for out in (crops1.astype(float), crops2.astype(float)):  # (B, 3, 64, 64): R = x, G = y
            ws.append((out[:, 0, 32, -1] - out[:, 0, 32, 0]) * 64 / 63 + 1)
            hs.append((out[:, 1, -1, 32] - out[:, 1, 0, 32]) * 64 / 63 + 1)
    return np.concatenate(ws), np.concatenate(hs)


def test_crop_area_and_aspect_match_the_spec_in_both_modes(coordinate_png):
    """2,000 crops a mode: area within the spec's range and filling it, log-aspect within its range and symmetric
    (test_augment_fidelity's checks); and the once mode's area and log-aspect distributions equal the roi mode's (two-sample
    Kolmogorov-Smirnov, p < 0.001 rejects): the same window sampler in both."""
    stats = {}
    for decode in DECODE_MODES:
        w, h = _measured_windows([coordinate_png], decode)
        _crop_stats(w, h, 256)
        stats[decode] = (w * h / 256**2, np.log(w / h))
    for k, name in enumerate(("area", "log-aspect")):
        a, b = np.sort(stats["roi"][k]), np.sort(stats["once"][k])
        grid = np.concatenate([a, b])
        d = np.abs(np.searchsorted(a, grid, side="right") / len(a) - np.searchsorted(b, grid, side="right") / len(b))
        limit = 1.95 * math.sqrt((len(a) + len(b)) / (len(a) * len(b)))
        assert d.max() < limit, f"{name}: KS D {d.max():.3f} >= {limit:.3f}"


def test_once_crops_are_a_resize_of_the_whole_decoded_image(coordinate_png):
    """The once mode crops from the whole image: a window covering all of it (area and aspect fixed at 1) is the
    whole coordinate image resized, corner to corner."""
    whole = ViewSpec(crop_area=(1.0, 1.0), crop_aspect=(1.0, 1.0), flip_p=0.0, jitter_p=0.0, gray_p=0.0, blur_p=0.0)
    crops1, _, _, _ = _arrays(_pipe([coordinate_png] * 2, "once", 64, 2, views=(whole, whole)).run())
    x, y = crops1[0, 0].astype(float), crops1[0, 1].astype(float)  # (64, 64) each
    centres = (np.arange(64) + 0.5) * 4 - 0.5  # output pixel centres in input pixels (256 / 64 = 4)
    assert np.abs(x[32] - centres).max() <= 1.0 and np.abs(y[:, 32] - centres).max() <= 1.0


@pytest.mark.parametrize("decode", DECODE_MODES)
def test_exact_resume_from_dalis_checkpoint(jpegs, decode):
    """Batches 3-4 of a pipeline restored from the checkpoint taken after batch 2 equal those of the uninterrupted
    pipeline: crops and every parameter (DALI's checkpoint holds the readers' position and every random state:
    the crop windows' and the chain's)."""
    files = jpegs * 3
    pipe = _pipe(files, decode, 24, 4, seed=11)
    for _ in range(2):
        pipe.run()
    state = pipe.checkpoint()
    want = [_arrays(pipe.run()) for _ in range(2)]
    resumed = _pipe(files, decode, 24, 4, seed=11, checkpoint=state)
    got = [_arrays(resumed.run()) for _ in range(2)]
    for a, b in zip(want, got):
        for x, y in zip(a, b):
            np.testing.assert_array_equal(x, y)
    fresh = _arrays(_pipe(files, decode, 24, 4, seed=11).run())  # and the check can fail: batch 1 differs
    assert not all(np.array_equal(x, y) for x, y in zip(fresh, want[0]))


def test_once_decodes_each_file_once(jpegs):
    counts = {decode: decoder_ops(_pipe(jpegs, decode, 24, 6)) for decode in DECODE_MODES}
    assert counts == {"roi": 2, "once": 1}


def test_a_bad_decode_mode_is_one_clear_error(jpegs):
    images = np.zeros((8, 16, 16, 3), np.uint8)
    with pytest.raises(FastByolError, match="decode must be one of roi, once; got 'twice'"):
        TwoViewLoader(images, LoaderSettings(4, 16), AugmentConfig(decode="twice"))
    with pytest.raises(FastByolError, match="decode must be one of"):
        _pipe(jpegs, "ROI", 24, 6)
    from fastbyol.tools.bench_augment import AugmentBenchSettings, bench_augment

    with pytest.raises(FastByolError, match="decode must be one of"):
        bench_augment(AugmentBenchSettings(16, 4, "cpu", "arrays", decode=""))


def test_the_cpu_loader_takes_either_mode_and_the_default_is_roi(make_loader, jpegs):
    """On the CPU the loader always decodes once (torch crops both views): the mode is accepted and changes
    nothing."""
    from fastbyol.data.folders import FileList

    assert AugmentConfig().decode == "roi"
    views = {}
    for decode in DECODE_MODES:
        loader = make_loader(FileList(jpegs, None), batch_size=3, seed=1, decode=decode)
        assert loader.decode == decode and loader.decoders == 1
        views[decode] = next(iter(loader.epoch()))
    for a, b in zip(views["roi"], views["once"]):
        assert a.shape == (3, 3, 16, 16) and torch.equal(a, b)
