"""CUDA-only paths, skipped without a GPU: the GPU augmentation pipeline (arrays and the mixed JPEG decoder, its
views against the CPU reference chain, DALI's buffers held while the chain reads them) and a short training run on
CUDA, and both decode modes of the JPEG path (one ROI decode per view, or one decode and two GPU crops), and the
online probe's labels from arrays and an image folder. The GPU
plan runs them; they cannot run on the CPU machines. (The chain's backends on CUDA, which need no DALI:
tests/test_photometric.py.)"""

import json

import numpy as np
import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

dali = pytest.importorskip("nvidia.dali")


def _chain(spec, size):
    from fastbyol.augment import IMAGENET_MEAN, IMAGENET_STD
    from fastbyol.augment.photometric import ChainSpec

    return ChainSpec(blur_window=spec.blur_window(size), solarize_threshold=spec.solarize_threshold,
                     mean=IMAGENET_MEAN, std=IMAGENET_STD)


def test_gpu_views_from_arrays(make_loader):
    from fastbyol.config import AugmentConfig

    images = np.random.default_rng(0).integers(0, 256, (64, 40, 40, 3), dtype=np.uint8)
    loader = make_loader(images, batch_size=32, image_size=32, device="cuda", num_threads=2)
    assert loader.photometric_backend == AugmentConfig().cuda_photometric
    out = loader.draw()
    v1, v2 = loader.maker.chain(*loader.maker.crops(out))
    assert v1.is_cuda and v1.shape == (32, 3, 32, 32) and v1.dtype == torch.float16
    assert v1.is_contiguous(memory_format=torch.channels_last) and not torch.equal(v1, v2)
    assert v1.data_ptr() not in {o.as_tensor().data_ptr() for o in out.values()}  # torch-owned output
    v1, v2 = next(iter(loader.epoch()))
    assert v1.is_cuda and v1.shape == (32, 3, 32, 32) and v1.dtype == torch.float16


def test_gpu_loader_views_are_the_reference_chain_on_its_own_draws(make_loader):
    """The CUDA path end to end: DALI's GPU crops and its parameters (moved to the GPU in the graph) through the
    loader's chain equal the CPU reference on copies of the same inputs (fp16 outputs: 2e-3)."""
    from fastbyol.augment import VIEW1, VIEW2
    from fastbyol.augment.photometric import photometric

    images = np.random.default_rng(1).integers(0, 256, (64, 72, 72, 3), dtype=np.uint8)
    loader = make_loader(images, batch_size=32, image_size=64, device="cuda", num_threads=2)
    crops, params = loader.maker.crops(loader.draw())
    v1, v2 = loader.maker.chain(crops, params)
    t = [crops[0], params[0], crops[1], params[1]]
    assert all(x.is_cuda for x in t)  # crops and parameters both on the GPU
    for view, crops, params, spec in ((v1, t[0], t[1], VIEW1), (v2, t[2], t[3], VIEW2)):
        want = photometric(crops.cpu(), params.cpu(), _chain(spec, 64))
        torch.testing.assert_close(view.float().cpu(), want, atol=2e-3, rtol=0)


def test_gpu_dali_buffers_live_until_the_chain_has_read_them(make_loader):
    """For the chain's inputs: with a long kernel queued first, the chain of every batch runs
    late, after the loop has moved on and dropped DALI's outputs; the views must still equal those of a run that
    synchronized after every batch (same seed)."""

    images = np.random.default_rng(3).integers(0, 256, (256, 40, 40, 3), dtype=np.uint8)

    def views(slow: bool):
        loader = make_loader(images, batch_size=32, image_size=32, seed=7, device="cuda", num_threads=2)
        out = []
        if slow:
            torch.cuda._sleep(int(2e9))  # ~1 s of GPU time queued before the first chain
        for v1, v2 in loader.epoch():
            out.append((v1, v2))
            if not slow:
                torch.cuda.synchronize()
        torch.cuda.synchronize()
        return [(a.clone(), b.clone()) for a, b in out]

    safe, late = views(False), views(True)
    assert len(safe) == len(late) == 8
    for (a1, a2), (b1, b2) in zip(safe, late):
        assert torch.equal(a1, b1) and torch.equal(a2, b2)


def test_gpu_views_from_jpeg_with_crop_during_decode(make_loader, tmp_path):
    pytest.importorskip("PIL")
    from fastbyol.data.folders import FileList
    from fastbyol.data.synthetic import write_synthetic_jpegs

    root = write_synthetic_jpegs(tmp_path / "j", n_train=64, n_test=0, size=96, classes=2)
    files = sorted(str(p) for p in (root / "train").rglob("*.jpg"))
    labels = np.array([int("class1" in f) for f in files], dtype=np.int64)
    loader = make_loader(FileList(files, labels), batch_size=32, image_size=64, device="cuda", num_threads=2)
    batches = list(loader.epoch())
    assert len(batches) == 2 and all(len(b) == 2 for b in batches)  # the two views (labels stay with the source)
    assert batches[0][0].is_cuda and batches[0][0].shape == (32, 3, 64, 64)


@pytest.fixture(scope="module")
def imagenet_like(tmp_path_factory):
    """48 photograph-like JPEGs of ImageNet-like, varied sizes (~500x375), labeled by class."""
    pytest.importorskip("PIL")
    from fastbyol.data.folders import FileList
    from fastbyol.data.synthetic import write_synthetic_jpegs

    root = write_synthetic_jpegs(tmp_path_factory.mktemp("j"), n_train=48, n_test=0, classes=2, style="imagenet")
    files = sorted(str(p) for p in (root / "train").rglob("*.jpg"))
    return FileList(files, np.array([int("class1" in f) for f in files], dtype=np.int64))


@pytest.mark.parametrize("decode", ["roi", "once"])
def test_gpu_decode_modes_give_the_views_and_decode_as_said(make_loader, imagenet_like, decode):
    """Both decode modes of the mixed decoder on varied-size JPEGs: (B, 3, S, S) fp16
    channels_last views on the GPU, per-sample crops; "roi" has two decoders in its graph (one per view), "once" one
    (each file decoded once, both views cropped from it)."""

    loader = make_loader(imagenet_like, batch_size=16, image_size=64, device="cuda", num_threads=2, decode=decode)
    assert loader.decoders == (2 if decode == "roi" else 1)
    crops = loader.maker.crops(loader.draw())[0][0]  # (16, 3, 64, 64) uint8 on the GPU, batch 1's view-1 crops
    assert crops.is_cuda and crops.dtype == torch.uint8 and len({c.cpu().numpy().tobytes() for c in crops}) == 16
    batches = list(loader.epoch(first_step=1))
    assert len(batches) == 2
    v1, v2 = batches[0]
    assert v1.is_cuda and v1.shape == (16, 3, 64, 64) and v1.dtype == torch.float16
    assert v1.is_contiguous(memory_format=torch.channels_last) and not torch.equal(v1, v2)


def test_gpu_once_mode_resumes_exactly_from_its_checkpoint(make_loader, imagenet_like):
    """DALI's checkpoint after batch 1 of the once mode restores batch 2 exactly (the reader, the GPU crops' windows,
    every parameter)."""

    kw = dict(batch_size=16, image_size=64, device="cuda", num_threads=2, seed=5, decode="once")
    loader = make_loader(imagenet_like, **kw)
    it = loader.epoch()
    next(it)
    state = loader.state()
    want = next(it)
    got = next(make_loader(imagenet_like, checkpoint=state, **kw).epoch(first_step=1))
    for a, b in zip(want, got):
        assert torch.equal(a, b)


def test_training_on_cuda(tmp_path):
    from fastbyol.cli import main

    out = tmp_path / "run"
    assert main(["train", "--epochs", "1", "--batch-size", "256", "--out", str(out), "--no-progress"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["kernels"] == "triton" and "cpu" not in summary["device"]
    # the device-wide peak (every allocator: DALI's pools too) holds at least torch's own peak
    assert summary["peak_memory_gb"] > 0 and summary["peak_device_memory_gb"] >= summary["peak_memory_gb"]


def test_gpu_files_loader_hands_over_the_readers_labels(make_loader, tmp_path, monkeypatch):
    """The online probe's labels on the CUDA files path: the reader's labels as the graph's last output, on the
    GPU (int64), one epoch holding every file's class once; the views bit for bit those of the graph without them
    (the CPU path checks each batch's labels against its decoded files: tests/test_online_probe_files.py)."""
    from fastbyol.data import DataRequest, resolve_dataset
    from fastbyol.data.synthetic import write_synthetic_jpegs

    monkeypatch.setenv("FASTBYOL_CACHE", str(tmp_path / "cache"))
    root = write_synthetic_jpegs(tmp_path / "j", n_train=48, n_test=12, size=48, classes=3)
    source = resolve_dataset(str(root), DataRequest(image_size=32, eval_images=False)).pretraining_source
    kw = dict(batch_size=8, image_size=32, device="cuda", num_threads=2, seed=3)
    plain, labelled = make_loader(source, **kw), make_loader(source, reader_labels=True, **kw)
    seen = []
    for (a1, a2), (b1, b2, labels) in zip(plain.epoch(), labelled.epoch()):
        assert torch.equal(a1, b1) and torch.equal(a2, b2)
        assert labels.is_cuda and labels.dtype == torch.int64 and labels.shape == (8,)
        seen.append(labels.cpu())
    assert torch.bincount(torch.cat(seen), minlength=3).tolist() == [16, 16, 16]  # every file once


def test_gpu_arrays_loader_hands_over_the_rows_labels(make_loader):
    """The online probe's labels on the CUDA arrays path: the source's rows as a second output
    (pipelines.array_source), the labels gathered by them on the GPU; the views bit for bit those without them."""

    images = np.random.default_rng(0).integers(0, 256, (48, 24, 24, 3), dtype=np.uint8)
    classes = np.arange(48, dtype=np.int64) % 3
    kw = dict(batch_size=8, image_size=16, device="cuda", num_threads=1, seed=3)
    plain, labelled = make_loader(images, **kw), make_loader(images, labels=classes, **kw)
    seen = []
    for (a1, a2), (b1, b2, labels) in zip(plain.epoch(), labelled.epoch()):
        assert torch.equal(a1, b1) and torch.equal(a2, b2)
        assert labels.is_cuda and labels.dtype == torch.int64 and labels.shape == (8,)
        seen.append(labels.cpu())
    assert torch.bincount(torch.cat(seen), minlength=3).tolist() == [16, 16, 16]  # every row once


def test_training_on_cuda_folder_runs_the_online_probe(tmp_path, monkeypatch):
    from fastbyol.cli import main
    from fastbyol.data.synthetic import write_synthetic_jpegs

    monkeypatch.setenv("FASTBYOL_CACHE", str(tmp_path / "cache"))
    root = write_synthetic_jpegs(tmp_path / "j", n_train=256, n_test=64, size=48, classes=4)
    out = tmp_path / "run"
    assert main(["train", "--data", str(root), "--image-size", "32", "--epochs", "2", "--batch-size", "64",
                 "--knn-every", "1", "--out", str(out), "--no-progress"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert 0.0 <= summary["online_probe_top1"] <= 100.0
    assert [r.get("final", False) for r in rows if "online_probe_top1" in r] == [False, True]


def test_dali_outputs_are_bound_to_torch_current_stream(make_loader):
    """pipe.run gets torch's current stream (the outputs are made ready there; without it run() blocks the host)."""

    from .support import PassThroughPipeline

    images = np.random.default_rng(0).integers(0, 256, (32, 24, 24, 3), dtype=np.uint8)
    seen = []

    class Spy(PassThroughPipeline):
        def run(self, stream=None):
            seen.append(stream)
            return super().run(stream)

    loader = make_loader(images, batch_size=16, image_size=16, device="cuda", num_threads=1, make_pipeline=Spy)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        next(iter(loader.epoch()))
    assert seen and seen[0] == stream


def test_gpu_loader_reuses_the_triton_chains_scratch(make_loader):
    """The Triton chain's partial sums, scratch and tmp: made at the first batch, reused by both views and every
    later batch (the GPU view maker's ScratchBuffers); the views stay fresh tensors."""

    images = np.random.default_rng(1).integers(0, 256, (96, 40, 40, 3), dtype=np.uint8)
    loader = make_loader(images, batch_size=32, image_size=32, device="cuda", num_threads=2,
                           cuda_photometric="triton")
    batches = list(loader.epoch())
    assert len(batches) == 3 and loader.maker.buffers.allocations == 3
    assert len({v.data_ptr() for b in batches for v in b}) == 6
