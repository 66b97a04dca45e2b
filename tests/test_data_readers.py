"""Dataset readers on small files written here in each exact format, their errors, and training from each."""

import json
import pickle

import numpy as np
import pytest

from fastbyol.cli import main
from fastbyol.data import detect_format, resolve_dataset
from fastbyol.data.readers import dataset_from_arrays
from fastbyol.errors import FastByolError


def write_stl10(folder, n_train=6, n_test=4, n_unlabeled=5, rng=np.random.default_rng(0)):
    """STL10 binary: each image 3 planes of 96x96, every plane column-major; labels 1..10."""
    folder.mkdir(parents=True, exist_ok=True)
    sets = {}
    for split, n in (("train", n_train), ("test", n_test), ("unlabeled", n_unlabeled)):
        hwc = rng.integers(0, 256, (n, 96, 96, 3), dtype=np.uint8)
        hwc[:, :10, :, 0] = 255  # a red band at the top: orientation is checked
        hwc[:, :10, :, 1:] = 0
        hwc[:, 10:, :, 0] = rng.integers(0, 100, (n, 86, 96), dtype=np.uint8)
        planes = hwc.transpose(0, 3, 2, 1)  # (N, C, W, H): column-major planes
        planes.tofile(folder / f"{split}_X.bin")
        sets[split] = hwc
        if split != "unlabeled":
            (np.arange(n) % 10 + 1).astype(np.uint8).tofile(folder / f"{split}_y.bin")
    return sets


def write_cifar10(folder, per_batch=7, rng=np.random.default_rng(1)):
    folder.mkdir(parents=True, exist_ok=True)
    images = {}
    for name in ("data_batch_1", "data_batch_2", "test_batch"):
        hwc = rng.integers(0, 256, (per_batch, 32, 32, 3), dtype=np.uint8)
        data = hwc.transpose(0, 3, 1, 2).reshape(per_batch, 3072)  # R plane, G plane, B plane, row-major
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": data, b"labels": list(np.arange(per_batch) % 10)}, f)
        images[name] = hwc
    return images


def test_stl10_layout_and_labels(tmp_path):
    sets = write_stl10(tmp_path / "stl10_binary")
    ds = resolve_dataset(str(tmp_path))
    assert ds.name == "stl10" and ds.train_images.shape == (6, 96, 96, 3)
    np.testing.assert_array_equal(ds.train_images, sets["train"])  # column-major planes undone
    assert (ds.train_images[:, :10, :, 0] == 255).all()  # the band is at the top, not the left
    assert ds.train_labels.tolist() == [0, 1, 2, 3, 4, 5]  # 1..10 -> 0..9
    assert len(ds.pretraining_set) == 11  # unlabeled + train
    (tmp_path / "stl10_binary" / "test_X.bin").write_bytes(b"\0" * 1000)
    with pytest.raises(FastByolError, match="test_X.bin: 1000 bytes"):
        resolve_dataset(str(tmp_path))


def test_cifar10_and_cifar100(tmp_path):
    images = write_cifar10(tmp_path / "c10")
    ds = resolve_dataset(str(tmp_path / "c10"))
    assert ds.name == "cifar10" and ds.train_images.shape == (14, 32, 32, 3) and ds.num_classes == 10
    np.testing.assert_array_equal(ds.test_images, images["test_batch"])
    c100 = tmp_path / "c100"
    c100.mkdir()
    rng = np.random.default_rng(2)
    for name, n in (("train", 9), ("test", 3)):
        with open(c100 / name, "wb") as f:
            pickle.dump({b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                         b"fine_labels": list(range(90, 90 + n))}, f)
    ds = resolve_dataset(str(c100))
    assert ds.name == "cifar100" and ds.num_classes == 100 and len(ds.test_images) == 3


def test_cifar_bad_files(tmp_path):
    write_cifar10(tmp_path)
    with open(tmp_path / "data_batch_2", "wb") as f:
        pickle.dump({b"data": np.zeros((4, 3000), np.uint8), b"labels": [0] * 4}, f)
    with pytest.raises(FastByolError, match="data_batch_2: CIFAR data must be N x 3072"):
        resolve_dataset(str(tmp_path))
    (tmp_path / "data_batch_2").write_bytes((tmp_path / "data_batch_1").read_bytes()[:100])
    with pytest.raises(FastByolError, match="data_batch_2: not a readable CIFAR pickle"):
        resolve_dataset(str(tmp_path))


def test_numpy_sources(tmp_path):
    rng = np.random.default_rng(3)
    x = rng.integers(0, 256, (20, 24, 24, 3), dtype=np.uint8)
    np.save(tmp_path / "unlabeled.npy", x)
    ds = resolve_dataset(str(tmp_path / "unlabeled.npy"))
    assert ds.train_labels is None and ds.train_images.shape == (20, 24, 24, 3)
    np.savez(tmp_path / "labeled.npz", train_images=x, train_labels=np.arange(20) % 4, test_images=x[:5],
             test_labels=np.arange(5) % 4)
    ds = resolve_dataset(str(tmp_path / "labeled.npz"))
    assert ds.num_classes == 4 and len(ds.test_images) == 5
    np.savez(tmp_path / "wrong.npz", pictures=x)
    with pytest.raises(FastByolError, match="wrong.npz: an .npz needs 'train_images'"):
        resolve_dataset(str(tmp_path / "wrong.npz"))
    np.save(tmp_path / "float.npy", x.astype(np.float32))
    with pytest.raises(FastByolError, match="expected uint8"):
        resolve_dataset(str(tmp_path / "float.npy"))
    with pytest.raises(FastByolError, match="labels"):
        dataset_from_arrays(x, np.arange(3))


def test_detection_and_override(tmp_path):
    write_cifar10(tmp_path / "c10")
    assert detect_format(tmp_path / "c10") == "cifar"
    with pytest.raises(FastByolError, match="STL10 needs"):
        resolve_dataset(str(tmp_path / "c10"), data_format="stl10")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("hello")
    with pytest.raises(FastByolError, match="no dataset format recognised"):
        resolve_dataset(str(tmp_path / "junk"))
    with pytest.raises(FastByolError, match="--data-format 'tiff'"):
        resolve_dataset(str(tmp_path / "c10"), data_format="tiff")


@pytest.mark.parametrize("source", ["stl10", "cifar10", "npz"])
def test_every_source_trains(tmp_path, source):
    rng = np.random.default_rng(4)
    if source == "stl10":
        write_stl10(tmp_path / "data", n_train=24, n_test=10, n_unlabeled=24)
    elif source == "cifar10":
        write_cifar10(tmp_path / "data", per_batch=24)
    else:
        (tmp_path / "data").mkdir()
        np.savez(tmp_path / "data" / "x.npz", train_images=rng.integers(0, 256, (40, 20, 20, 3), dtype=np.uint8),
                 train_labels=np.arange(40) % 2, test_images=rng.integers(0, 256, (10, 20, 20, 3), dtype=np.uint8),
                 test_labels=np.arange(10) % 2)
    data = tmp_path / "data" / "x.npz" if source == "npz" else tmp_path / "data"
    out = tmp_path / "run"
    assert main(["train", "--data", str(data), "--epochs", "1", "--batch-size", "16", "--image-size", "16",
                 "--out", str(out), "--no-progress"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] >= 1 and summary["knn_top1"] is not None


class _RunsCode:
    """What a hostile CIFAR pickle holds: an object whose unpickling calls a function (here: writes a file)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_cifar_pickle_that_runs_code_is_refused(tmp_path, capsys):
    write_cifar10(tmp_path)
    marker = tmp_path / "pwned"
    with open(tmp_path / "data_batch_2", "wb") as f:
        pickle.dump({b"data": np.zeros((4, 3072), np.uint8), b"labels": [0] * 4, b"x": _RunsCode(marker)}, f)
    with pytest.raises(FastByolError, match=r"data_batch_2: not loaded: refused to load io.open, which a CIFAR") as e:
        resolve_dataset(str(tmp_path))
    assert "\n" not in str(e.value) and not marker.exists()
    assert main(["train", "--data", str(tmp_path), "--epochs", "1", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "data_batch_2" in err and not marker.exists()
