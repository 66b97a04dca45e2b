"""CUDA-only paths, skipped without a GPU: the GPU augmentation pipeline (arrays and the mixed JPEG decoder) and a
short training run on CUDA. GPU round A (issue 8) runs them; they cannot run on the CPU machines."""

import json

import numpy as np
import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

dali = pytest.importorskip("nvidia.dali")


def test_gpu_views_from_arrays():
    from fastbyol.augment import TwoViewLoader

    images = np.random.default_rng(0).integers(0, 256, (64, 40, 40, 3), dtype=np.uint8)
    loader = TwoViewLoader(images, batch_size=32, image_size=32, device="cuda", num_threads=2)
    v1, v2 = next(iter(loader.epoch()))
    assert v1.is_cuda and v1.shape == (32, 3, 32, 32) and v1.dtype == torch.float16
    assert v1.is_contiguous(memory_format=torch.channels_last) and not torch.equal(v1, v2)
    assert v1.data_ptr() == loader.last_outputs[0].as_tensor().data_ptr()


def test_gpu_views_from_jpeg_with_crop_during_decode(tmp_path):
    pytest.importorskip("PIL")
    from fastbyol.augment import TwoViewLoader
    from fastbyol.data.folders import FileList, write_synthetic_jpegs

    root = write_synthetic_jpegs(tmp_path / "j", n_train=64, n_test=0, size=96, classes=2)
    files = FileList(sorted(str(p) for p in (root / "train").rglob("*.jpg")), None)
    loader = TwoViewLoader(files, batch_size=32, image_size=64, device="cuda", num_threads=2)
    batches = list(loader.epoch())
    assert len(batches) == 2 and batches[0][0].is_cuda and batches[0][0].shape == (32, 3, 64, 64)


def test_training_on_cuda(tmp_path):
    from fastbyol.cli import main

    out = tmp_path / "run"
    assert main(["train", "--epochs", "1", "--batch-size", "256", "--out", str(out), "--no-progress"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["kernels"] == "triton" and "cpu" not in summary["device"]
