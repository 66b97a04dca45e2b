"""The two-view loader on the CPU (DALI with device_id=None, the torch chain): shapes, layout, dtype, per-image
randomness, the spec, the DALI graph's size, exact resume, labels and encoded-file sources."""

import dataclasses

import numpy as np
import pytest
import torch

pytest.importorskip("nvidia.dali")

from fastbyol.augment import VIEW1, VIEW2, LoaderSettings, TwoViewLoader, ViewSpec  # noqa: E402
from fastbyol.augment.photometric import PARAM_NAMES  # noqa: E402
from fastbyol.errors import FastByolError  # noqa: E402


def _images(n=64, size=32):
    rng = np.random.default_rng(1)
    base = rng.integers(0, 256, (1, size, size, 3), dtype=np.uint8)
    return np.repeat(base, n, axis=0)  # the same picture n times: any difference comes from the augmentation


def test_official_view_parameters():
    assert VIEW1.blur_p == 1.0 and VIEW1.solarize_p == 0.0
    assert VIEW2.blur_p == 0.1 and VIEW2.solarize_p == 0.2
    for v in (VIEW1, VIEW2):
        assert v.crop_area == (0.08, 1.0) and v.crop_aspect == (3 / 4, 4 / 3)
        assert (v.flip_p, v.jitter_p, v.gray_p) == (0.5, 0.8, 0.2)
        assert (v.brightness, v.contrast, v.saturation, v.hue) == (0.4, 0.4, 0.2, 0.1)
        assert v.blur_sigma == (0.1, 2.0) and v.solarize_threshold == 0.5
    official = dataclasses.replace(VIEW1, blur_window_rule="official")
    assert official.blur_window(224) == 23 and official.blur_window(96) == 9 and official.blur_window(28) == 3


def test_blur_window_rules():
    """official: 10% of the side; cover: at least +-3 sigma_hi (13 taps for sigma 2), the official window above.
    ViewSpec's default rule is the trainer's (--blur-window's default), so a spec built without one is the run's."""
    from fastbyol.config import DataConfig

    assert VIEW1.blur_window_rule == VIEW2.blur_window_rule == DataConfig().blur_window == "cover"
    cover, official = (dataclasses.replace(VIEW1, blur_window_rule=r) for r in ("cover", "official"))
    assert [cover.blur_window(s) for s in (8, 28, 32, 96, 129, 139, 140, 224)] == [13, 13, 13, 13, 13, 13, 15, 23]
    assert [official.blur_window(s) for s in (8, 28, 96, 139, 140, 224)] == [1, 3, 9, 13, 15, 23]
    assert dataclasses.replace(cover, blur_sigma=(0.1, 1.0)).blur_window(28) == 7  # 2 ceil(3 sigma_hi) + 1
    for s in range(140, 400):  # where the official window is at least the cover, the two are the same op
        assert cover.blur_window(s) == official.blur_window(s)
    with pytest.raises(FastByolError, match="blur_window_rule must be one of official, cover"):
        dataclasses.replace(VIEW1, blur_window_rule="wide").validate("view1")


def test_two_views_shapes_layout_and_per_image_randomness(make_loader):
    loader = make_loader(_images(), batch_size=32, image_size=24, seed=3)
    batches = list(loader.epoch())
    assert len(batches) == loader.steps_per_epoch == 2
    v1, v2 = batches[0]
    assert v1.shape == v2.shape == (32, 3, 24, 24)
    assert v1.dtype == torch.float32  # the CPU trainer's dtype (fp16 on CUDA)
    assert v1.is_contiguous(memory_format=torch.channels_last)
    # the two views of one image differ
    assert all(not torch.equal(v1[i], v2[i]) for i in range(32))
    # every image draws its own parameters: no two samples of one view share their pixels
    flat = v1.reshape(32, -1).float()
    dist = torch.cdist(flat, flat)
    assert (dist + torch.eye(32) * 1e9).min() > 0
    # normalized: roughly centred, not raw 0..255
    assert v1.float().abs().max() < 10


def test_epochs_continue_and_shuffle(make_loader):
    loader = make_loader(_images(40))
    e1, e2 = list(loader.epoch()), list(loader.epoch())
    assert len(e1) == len(e2) == 2  # 40 // 16: the last partial batch is dropped
    assert not torch.equal(e1[0][0], e2[0][0])


def test_bad_settings(make_loader):
    with pytest.raises(FastByolError, match="batch size 100"):
        make_loader(_images(10), batch_size=100)
    with pytest.raises(FastByolError, match="view1.flip_p"):
        make_loader(_images(10), batch_size=4, view1=ViewSpec(flip_p=2.0))
    with pytest.raises(FastByolError, match="uint8"):
        make_loader(np.zeros((10, 8, 8, 3), np.float32), batch_size=4, image_size=8)


@pytest.mark.parametrize("cpu_parallel", ["threads", "processes"])
def test_views_are_fresh_tensors_that_outlive_later_batches(make_loader, cpu_parallel):
    loader = make_loader(_images(32), image_size=20, cpu_parallel=cpu_parallel)
    if cpu_parallel == "threads":  # one batch by hand, as epoch() makes it: DALI's outputs, torch's crops, the chain
        out = loader.draw()
        crops, params = loader.maker.crops(out)
        v1, v2 = loader.maker.chain(crops, params)
        dali = {name: torch.from_dlpack(o.as_tensor()) for name, o in out.items()}
        assert tuple(dali["window1"].shape) == (16, 5) and tuple(params[0].shape) == (16, len(PARAM_NAMES))
        assert tuple(crops[0].shape) == (16, 3, 20, 20) and crops[0].dtype == torch.uint8  # torch's planar crops
        assert v1.data_ptr() not in {d.data_ptr() for d in dali.values()}  # the chain's output, not DALI's memory
    else:  # the workers' shared buffers are reused: a batch is a copy
        v1, v2 = next(iter(loader.epoch()))
        buffers = {o.data_ptr() for slot in loader.maker.workers.outs for o in slot}
        assert v1.data_ptr() not in buffers and v2.data_ptr() not in buffers
    assert v1.stride() == (20 * 20 * 3, 1, 20 * 3, 3)  # NHWC memory seen as NCHW: channels_last strides
    held = v1.clone()
    list(loader.epoch())  # later batches do not overwrite a view still held
    assert torch.equal(v1, held)


def test_crops_follow_dalis_windows_and_flips():
    """crop_resize_flip against a float64 resize of the same window (torch's antialiased bicubic, rounded) on smooth
    images, the mirror where the flip is 1, each image an (H, W, 3) row of an array. (The uint8 kernel rounds and
    clamps between its two passes: on pixel noise, where a pass overshoots [0, 255], it moves further from the float
    resize; tests/test_augment_fidelity.py measures that against the official resize.)"""
    import torch.nn.functional as F

    from fastbyol.augment import crop_resize_flip

    coarse = torch.from_numpy(np.random.default_rng(2).integers(0, 256, (3, 3, 5, 5), dtype=np.uint8)).double()
    smooth = F.interpolate(coarse, size=(40, 36), mode="bilinear").round().to(torch.uint8)  # no pixel-level edges
    images = smooth.permute(0, 2, 3, 1).contiguous()  # (3, 40, 36, 3) NHWC rows
    windows = torch.tensor([[0, 0, 40, 36, 0], [5, 7, 20, 13, 1], [31, 2, 9, 30, 0]])
    got = crop_resize_flip([images[i] for i in range(3)], windows, 24, threads=2)
    assert got.shape == (3, 3, 24, 24) and got.dtype == torch.uint8
    for i, (y, x, h, w, flip) in enumerate(windows.tolist()):
        src = images[i, y:y + h, x:x + w].permute(2, 0, 1)[None].double()
        want = F.interpolate(src, size=(24, 24), mode="bicubic", antialias=True)[0].round().clamp(0, 255)
        want = want.flip(-1) if flip else want
        assert (got[i].double() - want).abs().max() <= 1  # uint8 rounding (of the final and the middle pass)
    gray = crop_resize_flip([images[i] for i in range(3)], windows, 24, channels=1)
    assert torch.equal(gray[:, 0], got[:, 0]) and torch.equal(gray[:, 1], gray[:, 0])


def test_the_dali_graph_stays_small(make_loader):
    """Only reading, cropping, flipping and drawing parameters remain in DALI (the colour chain built there was
    ~1,600 operators): a regression that moves per-pixel work back into the graph shows up here."""
    loader = make_loader(_images(32), image_size=20)
    assert 10 < loader.operators <= 60


def test_same_seed_same_views_and_shards_differ(make_loader):
    a = make_loader(_images(64), seed=5)
    b = make_loader(_images(64), seed=5)
    torch.testing.assert_close(next(iter(a.epoch()))[0], next(iter(b.epoch()))[0], rtol=0, atol=0)
    s0 = make_loader(_images(64), seed=5, shard_id=0, num_shards=2)
    s1 = make_loader(_images(64), seed=5, shard_id=1, num_shards=2)
    assert s0.steps_per_epoch == s1.steps_per_epoch == 2
    assert not torch.equal(next(iter(s0.epoch()))[0], next(iter(s1.epoch()))[0])  # seed + rank


@pytest.mark.parametrize("taken", [1, 3])  # 3: the saved position sits at an epoch boundary (64 // 16 = 4 steps)
def test_position_saved_and_restored_exactly(make_loader, taken):
    def batches(loader, n):
        out = []
        while len(out) < n:
            for v1, v2 in loader.epoch():
                out.append((v1.clone(), v2.clone()))
                if len(out) == n:
                    break
        return out

    a = make_loader(_images(64), seed=9)
    first = batches(a, taken)
    state = a.state()
    expected = batches(a, 3)
    b = make_loader(_images(64), seed=9, checkpoint=state)
    resumed = batches(b, 3)
    for (e1, e2), (r1, r2) in zip(expected, resumed):
        assert torch.equal(e1, r1) and torch.equal(e2, r2)
    assert not torch.equal(first[0][0], expected[0][0])


def test_each_row_once_an_epoch_and_its_views_are_its_pixels(make_loader):
    """The array source emits each row once an epoch (this shard's part of a fresh permutation), and the views are
    that row's pixels: every row's red channel holds its index, read back from the whole-image crop."""
    rng = np.random.default_rng(4)
    images = rng.integers(0, 256, (48, 16, 16, 3), dtype=np.uint8)
    images[..., 0] = (np.arange(48) * 5)[:, None, None]  # the row's index, written in the red channel
    loader = make_loader(images, seed=2, cpu_parallel="threads",
                         view1=ViewSpec(crop_area=(1.0, 1.0), jitter_p=0.0, gray_p=0.0, blur_p=0.0))
    for _ in range(2):  # two epochs, each a different order
        seen = []
        for _ in range(loader.steps_per_epoch):
            out = loader.draw()
            index = torch.from_dlpack(out["pixels"].as_tensor()).reshape(-1)  # (16,) int64 rows
            v1, _ = loader.maker.chain(*loader.maker.crops(out))
            red = v1[:, 0].float() * 0.229 + 0.485  # undo the normalization of the red channel
            torch.testing.assert_close(red.mean(dim=(1, 2)), index.float() * 5 / 255, atol=0.01, rtol=0)
            seen += index.tolist()
        assert sorted(seen) == list(range(48))
        with pytest.raises(StopIteration):  # the epoch's end; the next draw starts the next epoch
            loader.draw()


def test_encoded_source_with_the_reader_contract(make_loader, tmp_path):
    """An EncodedSource (fastbyol.data.dataset's protocol) feeds the loader: here a FileList of JPEGs (its labels,
    when it has them, are the kNN monitor's business: the loader yields the two views only, unless reader_labels).
    Anything else is an array to the loader, refused unless it is one."""
    from fastbyol.data.dataset import EncodedSource
    pytest.importorskip("PIL")
    from fastbyol.data.folders import FileList
    from fastbyol.data.synthetic import write_synthetic_jpegs

    root = write_synthetic_jpegs(tmp_path / "j", n_train=24, n_test=0, size=32, classes=3)
    files = sorted(str(p) for p in (root / "train").rglob("*.jpg"))
    labels = np.array([int(f.split("class")[-1].split("/")[0]) for f in files], dtype=np.int64)
    source = FileList(files, labels)
    assert isinstance(source, EncodedSource)
    loader = make_loader(source, batch_size=8, seed=1)
    assert loader.steps_per_epoch == 3
    batches = list(loader.epoch())
    assert len(batches) == 3
    for v1, v2 in batches:
        assert v1.shape == v2.shape == (8, 3, 16, 16) and not torch.equal(v1, v2)


def test_bad_image_array_is_one_clear_error(make_loader):
    with pytest.raises(FastByolError, match="images must be uint8 .* got list"):
        make_loader([[0]], batch_size=1, image_size=8)


def test_views_from_config_are_the_runs_views():
    """The trainer and `bench augment` build the views with views_from_config: the official pair with the run's crop
    area and blur window rule (fmnist-tiny: crop_min_area 0.2, the cover window)."""
    from fastbyol.augment import views_from_config
    from fastbyol.config import get_preset

    cfg = get_preset("fmnist-tiny")
    cfg.data.blur_window = "official"
    v1, v2 = views_from_config(cfg)
    assert v1 == dataclasses.replace(VIEW1, crop_area=(0.2, 1.0), blur_window_rule="official")
    assert v2 == dataclasses.replace(VIEW2, crop_area=(0.2, 1.0), blur_window_rule="official")
    assert views_from_config(get_preset("imagenet-resnet50")) == (VIEW1, VIEW2)  # 0.08 and cover: the defaults


def test_augment_settings_reach_the_loader_and_are_checked(make_loader):
    """The loader takes the run's AugmentConfig; a bad value is one FastByolError naming the field. chunk_pixels
    changes how the chain is cut, not the views."""
    from fastbyol.augment.makers import CpuViews
    from fastbyol.config import AugmentConfig

    a = make_loader(_images(32), seed=4, cpu_parallel="threads")
    b = make_loader(_images(32), seed=4, cpu_parallel="threads", chunk_pixels=16 * 16 * 3)
    assert a.cpu_parallel == b.cpu_parallel == "threads" and isinstance(a.maker, CpuViews)
    assert b.maker.chains[0].chunk_pixels == 768 and a.maker.chains[0].chunk_pixels == 1 << 17
    for x, y in zip(next(iter(a.epoch())), next(iter(b.epoch()))):
        assert torch.equal(x, y)
    with pytest.raises(FastByolError, match="chunk_pixels must be >= 1, got 0"):
        make_loader(_images(32), chunk_pixels=0)
    with pytest.raises(FastByolError, match="cpu_parallel must be one of processes, threads"):
        TwoViewLoader(_images(32), LoaderSettings(16, 16), AugmentConfig(cpu_parallel="fibers"))


def test_array_labels_ride_along_without_changing_the_draws(make_loader):
    """labels= (the online probe's): each batch also carries the labels of the rows DALI's source named; the views
    and the draws stay those of a loader without labels. reader_labels is for labelled encoded files only."""
    with_labels = make_loader(_images(32), seed=4, labels=np.arange(32, dtype=np.int64) + 100)
    assert with_labels.with_labels
    rows = make_loader(_images(32), seed=4).draw()["pixels"]  # the first batch's row indices (the same seed)
    v1, v2, labels = next(iter(with_labels.epoch()))
    plain = next(iter(make_loader(_images(32), seed=4).epoch()))
    assert torch.equal(v1, plain[0]) and torch.equal(v2, plain[1])
    want = [100 + int(r) for r in np.asarray(rows.as_tensor()).reshape(-1)]
    assert labels.dtype == torch.int64 and labels.tolist() == want
    with pytest.raises(FastByolError, match="labels= for image arrays is one label per image"):
        make_loader(_images(32), labels=np.zeros(31, np.int64))
    with pytest.raises(FastByolError, match="reader_labels=True is for encoded files"):
        make_loader(_images(32), reader_labels=True)


def test_the_loader_builds_its_pipeline_through_the_factory_it_is_given(make_loader):
    """make_pipeline is the loader's seam for tests: it builds every pipeline the loader runs, at the checkpoint
    given (the first one, and each rebuild, here the processes path's give-back after an early stop)."""
    from fastbyol.augment import DaliPipeline, Pipeline
    from fastbyol.augment.pipelines import DaliGraph

    from .support import PassThroughPipeline

    built = []

    class Recorded(PassThroughPipeline):
        def __init__(self, graph, checkpoint):
            built.append((graph, checkpoint))
            super().__init__(graph, checkpoint)

    a = make_loader(_images(64), num_threads=2, cpu_parallel="processes", make_pipeline=Recorded)
    (graph, checkpoint), = built
    assert isinstance(graph, DaliGraph) and graph.batch_size == 16 and checkpoint is None
    assert isinstance(Recorded(graph, None), Pipeline) and isinstance(DaliPipeline(graph, None), Pipeline)
    built.clear()
    for _ in a.epoch():
        break  # the workers hold the next batch: it is given back, the pipeline rebuilt before it was drawn
    state = a.state()
    assert [c for _, c in built] == [state]
    b = make_loader(_images(64), checkpoint=state, make_pipeline=Recorded)
    assert built[-1][1] == state and b.steps_per_epoch == 4


def test_a_checkpoint_that_is_not_this_graphs_is_refused_in_one_line(make_loader):
    """DALI restores a checkpoint only into the graph that saved it (a graph with other operators:
    tests/test_online_probe_files.py); a damaged or foreign one is one FastByolError."""
    state = make_loader(_images(32)).state()
    assert isinstance(make_loader(_images(32), checkpoint=state).state(), type(state))  # its own: fine
    for junk in (b"junk", state[: len(state) // 2]):
        with pytest.raises(FastByolError, match=r"^the checkpoint's data position cannot be restored into this data "
                                                r"pipeline \(damaged, or saved for other data or settings\): .+"):
            make_loader(_images(32), checkpoint=junk)
