"""Image folders (JPEG, PNG), the synthetic JPEG source, and bad files."""

import json
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("PIL")
pytest.importorskip("nvidia.dali")

from PIL import Image  # noqa: E402

from fastbyol.augment import TwoViewLoader  # noqa: E402
from fastbyol.cli import main  # noqa: E402
from fastbyol.data import resolve_dataset  # noqa: E402
from fastbyol.data.folders import check_image_file, write_synthetic_jpegs  # noqa: E402
from fastbyol.errors import FastByolError  # noqa: E402


@pytest.fixture
def folder(tmp_path):
    root = write_synthetic_jpegs(tmp_path / "imgs", n_train=24, n_test=8, size=40, classes=2)
    # one PNG among the JPEGs
    Image.fromarray(np.full((30, 50, 3), 200, np.uint8)).save(root / "train" / "class0" / "extra.png")
    return root


def test_labeled_folder(folder):
    ds = resolve_dataset(str(folder), image_size=24)
    assert ds.num_classes == 2 and ds.train_images.shape == (25, 24, 24, 3)
    assert ds.test_images.shape == (8, 24, 24, 3) and sorted(set(ds.train_labels.tolist())) == [0, 1]
    assert len(ds.pretrain_files.files) == 25
    # decoding is real: the PNG's flat grey survives
    png_index = ds.pretrain_files.files.index(str(folder / "train" / "class0" / "extra.png"))
    assert np.abs(ds.train_images[png_index].astype(int) - 200).max() <= 2


def test_unlabeled_folder_and_views(tmp_path, folder):
    unl = tmp_path / "flat"
    unl.mkdir()
    for i, p in enumerate(sorted((folder / "train").rglob("*.jpg"))[:20]):
        (unl / f"{i}.jpg").write_bytes(p.read_bytes())
    ds = resolve_dataset(str(unl), image_size=24)
    assert ds.train_labels is None and len(ds.pretrain_files.files) == 20
    loader = TwoViewLoader(ds.pretrain_files, batch_size=8, image_size=16, seed=1, num_threads=1)
    batches = list(loader.epoch())
    assert len(batches) == loader.steps_per_epoch == 2  # 20 // 8, the partial batch dropped
    v1, v2 = batches[0]
    assert v1.shape == (8, 3, 16, 16) and v1.is_contiguous(memory_format=__import__("torch").channels_last)
    assert not (v1 == v2).all()


def test_bad_files_named_or_skipped(tmp_path, folder):
    good = next((folder / "train" / "class1").glob("*.jpg"))
    (folder / "train" / "class1" / "cut.jpg").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(FastByolError, match="cut.jpg: truncated JPEG"):
        resolve_dataset(str(folder), image_size=24)
    (folder / "train" / "class1" / "notes.txt").write_text("not a picture")
    ds = resolve_dataset(str(folder), image_size=24, skip_bad_files=True)
    assert ds.skipped_files == 2 and len(ds.pretrain_files.files) == 25
    (folder / "train" / "class1" / "fake.png").write_bytes(b"GIF89a" + bytes(100))
    assert "bad signature" in check_image_file(folder / "train" / "class1" / "fake.png")


def test_empty_folder_and_cli(tmp_path, folder, capsys):
    (tmp_path / "empty_classes" / "train" / "a").mkdir(parents=True)
    with pytest.raises(FastByolError, match="no images"):
        resolve_dataset(str(tmp_path / "empty_classes"))
    out = tmp_path / "run"
    assert main(["train", "--data", str(folder), "--epochs", "1", "--batch-size", "8", "--image-size", "24",
                 "--out", str(out), "--no-progress"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 25 // 8 and summary["knn_top1"] is not None



def test_corrupt_file_inside_stops_cleanly(tmp_path):
    """A file with JPEG start and end markers but garbage inside: the check names it before DALI sees it, the CLI
    prints one error line, exits 2 and leaves no run directory. (A subprocess: the real command line.)"""
    root = write_synthetic_jpegs(tmp_path / "flat", n_train=80, n_test=0, size=32, classes=1)
    (root / "train" / "class0" / "zz_bad.jpg").write_bytes(b"\xff\xd8\xff" + bytes(50) + b"\xff\xd9")
    flat = root / "train" / "class0"  # an unlabeled folder: the bad file is met by the training pipeline
    out = tmp_path / "run"
    res = subprocess.run([sys.executable, "-m", "fastbyol", "train", "--data", str(flat), "--epochs", "2",
                          "--batch-size", "16", "--image-size", "16", "--out", str(out), "--no-progress"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 2, res.stderr[-2000:]
    assert res.stderr.count("\n") == 1 and "zz_bad.jpg: corrupt JPEG" in res.stderr, res.stderr[-2000:]
    assert not out.exists()
