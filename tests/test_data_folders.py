"""Image folders (JPEG, PNG), the synthetic JPEG source, and bad files."""

import json
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("PIL")
pytest.importorskip("nvidia.dali")

from PIL import Image  # noqa: E402

from fastbyol.cli import main  # noqa: E402
from fastbyol.data import DataRequest, Ranks, resolve_dataset  # noqa: E402
from fastbyol.data.checks import check_image_file  # noqa: E402
from fastbyol.data.synthetic import write_synthetic_jpegs  # noqa: E402
from fastbyol.errors import FastByolError  # noqa: E402


@pytest.fixture
def folder(tmp_path):
    root = write_synthetic_jpegs(tmp_path / "imgs", n_train=24, n_test=8, size=40, classes=2)
    # one PNG among the JPEGs
    Image.fromarray(np.full((30, 50, 3), 200, np.uint8)).save(root / "train" / "class0" / "extra.png")
    return root


def test_labeled_folder(folder):
    ds = resolve_dataset(str(folder), DataRequest(image_size=24))
    assert ds.num_classes == 2 and ds.train_images.shape == (25, 24, 24, 3)
    assert ds.test_images.shape == (8, 24, 24, 3) and sorted(set(ds.train_labels.tolist())) == [0, 1]
    assert len(ds.pretrain_files.files) == 25
    # decoding is real: the PNG's flat grey survives
    png_index = ds.pretrain_files.files.index(str(folder / "train" / "class0" / "extra.png"))
    assert np.abs(ds.train_images[png_index].astype(int) - 200).max() <= 2


def test_the_request_and_the_rank_decide_who_decodes_the_knn_images(folder, monkeypatch):
    """eval_images=None decodes on rank 0 only; True decodes anywhere; without ranks, $RANK and $WORLD_SIZE decide.
    The format is a keyword: a string where the request goes is refused, not read as settings."""
    request = DataRequest(image_size=24)
    other = resolve_dataset(str(folder), request, Ranks(1, 2))  # no barrier: the folder's lock in turn
    assert other.has_knn and other.eval_images_ready() and other.train_images is None
    assert "25 train (25 encoded images for pretraining) / 8 test images, 24x24" in other.describe()
    forced = resolve_dataset(str(folder), DataRequest(image_size=24, eval_images=True), Ranks(1, 2))
    assert forced.train_images.shape == (25, 24, 24, 3)
    for name, value in (("RANK", "1"), ("WORLD_SIZE", "2"), ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29500")):
        monkeypatch.setenv(name, value)  # what torchrun sets (nothing connects here)
    assert Ranks.from_environment() == Ranks(1, 2)
    assert resolve_dataset(str(folder), request).train_images is None  # rank 1 of $WORLD_SIZE
    with pytest.raises(TypeError, match="data_format"):
        resolve_dataset(str(folder), "folder")


def test_unlabeled_folder_and_views(make_loader, tmp_path, folder):
    unl = tmp_path / "flat"
    unl.mkdir()
    for i, p in enumerate(sorted((folder / "train").rglob("*.jpg"))[:20]):
        (unl / f"{i}.jpg").write_bytes(p.read_bytes())
    ds = resolve_dataset(str(unl), DataRequest(image_size=24))
    assert ds.train_labels is None and len(ds.pretrain_files.files) == 20
    loader = make_loader(ds.pretrain_files, batch_size=8, seed=1)
    batches = list(loader.epoch())
    assert len(batches) == loader.steps_per_epoch == 2  # 20 // 8, the partial batch dropped
    v1, v2 = batches[0]
    assert v1.shape == (8, 3, 16, 16) and v1.is_contiguous(memory_format=__import__("torch").channels_last)
    assert not (v1 == v2).all()


def test_bad_files_named_or_skipped(tmp_path, folder):
    good = next((folder / "train" / "class1").glob("*.jpg"))
    (folder / "train" / "class1" / "cut.jpg").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(FastByolError, match="cut.jpg: truncated JPEG"):
        resolve_dataset(str(folder), DataRequest(image_size=24))
    (folder / "train" / "class1" / "notes.txt").write_text("not a picture")
    ds = resolve_dataset(str(folder), DataRequest(image_size=24, skip_bad_files=True))
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


def test_test_classes_missing_from_train_are_refused(folder):
    (folder / "test" / "zebra").mkdir()
    (folder / "test" / "zebra" / "z.jpg").write_bytes(next((folder / "test" / "class0").glob("*.jpg")).read_bytes())
    with pytest.raises(FastByolError, match=r"test: class folders zebra have no train/ folder"):
        resolve_dataset(str(folder), DataRequest(image_size=24))


@pytest.mark.parametrize("spec", ["", "  "])
def test_empty_data_is_refused(spec, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the old behaviour scanned the current directory
    with pytest.raises(FastByolError, match="--data is empty"):
        resolve_dataset(spec)


def test_synthetic_folder_is_cached_and_killed_writes_are_cleaned(tmp_path):
    from fastbyol.data.synthetic import synthetic_folder

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    parent = tmp_path / "synthetic"
    leftover = parent / f"fast-16-4-32-v1.tmp-{dead.stdout.strip()}"  # what a killed run leaves
    (leftover / "train").mkdir(parents=True)
    root = synthetic_folder(16, 4, 32, cache_dir=tmp_path)
    assert root == parent / "fast-16-4-32-v1" and not leftover.exists()
    assert len(list(root.rglob("*.jpg"))) == 20
    stamp = (root / "train" / "class0" / "000000.jpg").stat().st_mtime_ns
    assert synthetic_folder(16, 4, 32, cache_dir=tmp_path) == root  # reused, not rewritten
    assert (root / "train" / "class0" / "000000.jpg").stat().st_mtime_ns == stamp
    ds = resolve_dataset("synthetic", DataRequest(image_size=16, cache_dir=tmp_path, eval_images=False))
    assert ds.num_pretraining == 512 and "fast-512-128-256-v1" in ds.origin


def test_imagenet_like_synthetic_jpegs(tmp_path):
    root = write_synthetic_jpegs(tmp_path / "inet", n_train=8, n_test=0, classes=2, style="imagenet")
    files = sorted(root.rglob("*.jpg"))
    sizes = [Image.open(p).size for p in files]
    kb = np.mean([p.stat().st_size for p in files]) / 1e3
    assert len(set(sizes)) > 1 and all(280 <= min(s) and max(s) <= 500 for s in sizes)
    assert 50 < kb < 160, kb  # ~100 KB at quality 90, like ImageNet's photographs
    x = np.asarray(Image.open(files[0]), dtype=np.float64).mean(axis=2)
    # natural-image statistics: neighbours correlate strongly, unlike noise
    assert np.corrcoef(x[:, 1:].ravel(), x[:, :-1].ravel())[0, 1] > 0.8
    with pytest.raises(FastByolError, match="style"):
        write_synthetic_jpegs(tmp_path / "x", n_train=1, style="cartoon")


def test_describe_and_counts_do_not_wait_for_the_knn_images(folder):
    import threading

    from fastbyol.data.dataset import ImageDataset, PendingSplits, Startup
    from fastbyol.data.decode import BackgroundDecode

    release = threading.Event()
    x = np.zeros((3, 8, 8, 3), np.uint8)
    pending = BackgroundDecode(lambda cancel: (release.wait(30), (x, np.arange(3), x, np.arange(3), []))[1])
    ds = ImageDataset("d", PendingSplits(pending, 8, (100, 20), True), 3, "here",
                      startup=Startup(seconds={"listing": 1.0}))
    assert "100 train / 20 test images, 8x8" in ds.describe() and ds.has_knn and not ds.eval_images_ready()
    assert "eval images" not in ds.startup_seconds
    release.set()
    assert ds.wait_eval_images() >= 0 and ds.train_images.shape == (3, 8, 8, 3)
    assert ds.eval_images_ready() and ds.startup_seconds["eval images"] >= 0


def test_eval_images_equal_the_one_by_one_reference(folder):
    """The batched background decode gives each file the pixels it gets decoded alone."""
    from fastbyol.data.decode import decode_files

    ds = resolve_dataset(str(folder), DataRequest(image_size=24))
    files = sorted(str(p) for p in (folder / "test").rglob("*.jpg"))
    alone = np.stack([decode_files([f], 24)[0] for f in files])
    np.testing.assert_array_equal(ds.test_images, alone)
