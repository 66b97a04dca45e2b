"""Image folders as people have them (fastbyol/data/manifest.py, folders.py): torchvision's ImageFolder layout
ROOT/<class>/ is labelled, with every 10th image of a class held out as the kNN test split (or --test-data), ImageNet's
train/ + val/ is recognised, and a dataset folder that is not this user's gets its manifest in the cache folder."""

import json
import os
import shutil

import numpy as np
import pytest

pytest.importorskip("PIL")
pytest.importorskip("nvidia.dali")

from fastbyol.cli import main  # noqa: E402
from fastbyol.data import manifest as mf  # noqa: E402
from fastbyol.data import DataRequest, resolve_dataset  # noqa: E402
from fastbyol.data.synthetic import write_synthetic_jpegs  # noqa: E402
from fastbyol.errors import FastByolError  # noqa: E402


def image_folder(root, n=60, classes=3, size=32):
    """ROOT/class<k>/NNNNNN.jpg: torchvision's ImageFolder layout, n images (image i of class i % classes)."""
    made = write_synthetic_jpegs(root.parent / (root.name + "-src"), n_train=n, n_test=0, size=size, classes=classes)
    shutil.move(str(made / "train"), str(root))
    shutil.rmtree(made)
    return root


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTBYOL_CACHE", str(tmp_path / "cache"))


def test_class_folders_are_labelled_with_a_held_out_share(tmp_path):
    root = image_folder(tmp_path / "photos")
    ds = resolve_dataset(str(root), DataRequest(image_size=24))
    assert ds.num_classes == 3 and ds.has_knn
    # 20 images a class, sorted: the 10th and the 20th of each are the test split, the other 54 pretrain
    assert ds.test_images.shape[0] == 6 and ds.train_images.shape[0] == 54 and len(ds.pretrain_files) == 54
    assert sorted(ds.test_labels.tolist()) == [0, 0, 1, 1, 2, 2]
    held = {os.path.basename(p) for p in ds.pretrain_files.files}
    by_class = sorted((root / "class1").iterdir())
    assert by_class[9].name not in held and by_class[19].name not in held and by_class[0].name in held
    assert "every 10th image of a class held out" in ds.describe()
    assert mf.held_out_every(50_000) == 10 and mf.held_out_every(1_281_167) == 129  # ~10,000 held out


def test_a_test_folder_replaces_the_held_out_share(tmp_path):
    root = image_folder(tmp_path / "photos")
    test = image_folder(tmp_path / "photos-test", n=12, classes=2)
    ds = resolve_dataset(str(root), DataRequest(image_size=24))  # a manifest with the share held out, then without
    ds = resolve_dataset(str(root), DataRequest(image_size=24, test_data=str(test)))
    assert len(ds.pretrain_files) == 60 and ds.test_images.shape[0] == 12
    assert sorted(set(ds.test_labels.tolist())) == [0, 1]
    (test / "zebra").mkdir()
    shutil.copy(next((test / "class0").iterdir()), test / "zebra" / "z.jpg")
    with pytest.raises(FastByolError, match="class folders zebra are not classes of the training data"):
        resolve_dataset(str(root), DataRequest(image_size=24, test_data=str(test)))
    with pytest.raises(FastByolError, match="a test folder is for image folders"):
        resolve_dataset("embedded", DataRequest(test_data=str(test)))


def test_train_and_val_is_recognised(tmp_path):
    root = write_synthetic_jpegs(tmp_path / "imagenet", n_train=24, n_test=8, size=32, classes=2)
    (root / "test").rename(root / "val")
    ds = resolve_dataset(str(root), DataRequest(image_size=24))
    assert ds.train_images.shape[0] == 24 and ds.test_images.shape[0] == 8 and ds.has_knn


def test_one_folder_or_loose_images_stay_unlabelled(tmp_path):
    root = image_folder(tmp_path / "one", n=20, classes=1)
    assert resolve_dataset(str(root), DataRequest(image_size=24)).train_labels is None  # one folder: not classes
    shutil.copy(next((root / "class0").iterdir()), root / "loose.jpg")
    (root / "class1").mkdir()
    shutil.copy(next((root / "class0").iterdir()), root / "class1" / "a.jpg")
    # an image in the root: a plain folder
    assert resolve_dataset(str(root), DataRequest(image_size=24)).train_labels is None


def test_class_folders_train_with_labels_and_the_knn_monitor(tmp_path):
    root = image_folder(tmp_path / "photos", n=60)
    out = tmp_path / "run"
    assert main(["train", "--data", str(root), "--epochs", "2", "--batch-size", "16", "--image-size", "24",
                 "--knn-every", "1", "--out", str(out), "--no-progress"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["knn_top1"] is not None and summary["knn_top1_random_init"] is not None
    assert summary["online_probe_top1"] is not None  # the pretraining images are the labelled train split
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("knn_subset" in r for r in records)  # the monitor ran during training
    assert "6 test images" in summary["dataset"]


def test_a_folder_that_is_not_ours_gets_its_manifest_in_the_cache(tmp_path, monkeypatch):
    root = image_folder(tmp_path / "shared", n=20, classes=2)
    monkeypatch.setattr("fastbyol.data.cache.os.geteuid", lambda: os.stat(root).st_uid + 1)  # another user's
    ds = resolve_dataset(str(root), DataRequest(image_size=24))
    assert len(ds.pretrain_files) == 18
    assert not (root / ".fastbyol").exists()
    assert (tmp_path / "cache" / "manifests").is_dir()
    monkeypatch.undo()
    monkeypatch.setenv("FASTBYOL_CACHE", str(tmp_path / "cache"))
    mine = image_folder(tmp_path / "mine", n=20)
    resolve_dataset(str(mine), DataRequest(image_size=24))
    assert (mine / ".fastbyol" / mf.MANIFEST_NAME).is_file()  # this user's folder: beside the data, as before


def test_a_layout_manifest_records_its_layout(tmp_path):
    root = image_folder(tmp_path / "photos", n=20)
    man, _, status = mf.obtain(root)
    assert status == "built" and man.layout == "classes" and man.held_out_every == 10
    header = json.loads(np.load(root / ".fastbyol" / mf.MANIFEST_NAME)["header"].tobytes())
    assert header["version"] == mf.VERSION and header["test_dir"] == "" and header["held_out_every"] == 10


def test_train_with_a_test_folder(tmp_path):
    root = image_folder(tmp_path / "photos", n=48, classes=2)
    test = image_folder(tmp_path / "photos-test", n=8, classes=2)
    out = tmp_path / "run"
    assert main(["train", "--data", str(root), "--test-data", str(test), "--epochs", "1", "--batch-size", "16",
                 "--image-size", "24", "--knn-every", "0", "--out", str(out), "--no-progress"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    config = json.loads((out / "config.json").read_text())
    assert summary["steps"] == 48 // 16 and summary["knn_top1"] is not None  # nothing held out: 48 pretrain
    assert f"test images from {test}" in summary["dataset"] and config["data"]["test_data"] == str(test)
