"""The idx reader, the embedded Fashion-MNIST and the Debian split, and errors on bad data."""

import gzip

import numpy as np
import pytest

from fastbyol.data import DEBIAN_FASHION_MNIST, load_embedded, resolve_dataset
from fastbyol.data.idx import read_idx
from fastbyol.errors import FastByolError

from .support import write_idx


@pytest.mark.parametrize("gz", [False, True])
def test_idx_round_trip(tmp_path, gz):
    a = np.random.randint(0, 256, (7, 5, 3), dtype=np.uint8)
    p = tmp_path / ("x.idx.gz" if gz else "x.idx")
    write_idx(p, a, gz)
    np.testing.assert_array_equal(read_idx(p), a)


def test_idx_errors_name_the_file(tmp_path):
    a = np.random.randint(0, 256, (4, 6, 6), dtype=np.uint8)
    good = tmp_path / "good.idx"
    write_idx(good, a)
    truncated = tmp_path / "truncated.idx"
    truncated.write_bytes(good.read_bytes()[:-10])
    with pytest.raises(FastByolError, match="truncated.idx"):
        read_idx(truncated)
    bad_magic = tmp_path / "picture.png"
    bad_magic.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(40))
    with pytest.raises(FastByolError, match="picture.png"):
        read_idx(bad_magic)
    bad_gz = tmp_path / "broken.gz"
    bad_gz.write_bytes(gzip.compress(good.read_bytes())[:-20])
    with pytest.raises(FastByolError, match="broken.gz"):
        read_idx(bad_gz)
    with pytest.raises(FastByolError, match="missing.idx"):
        read_idx(tmp_path / "missing.idx")


def test_embedded_fashion_mnist():
    ds = load_embedded()
    assert ds.train_images.shape == (8000, 28, 28, 3) and ds.test_images.shape == (2000, 28, 28, 3)
    assert ds.train_images.dtype == np.uint8
    assert set(np.unique(ds.train_labels)) == set(range(10))
    counts = np.bincount(ds.test_labels, minlength=10)
    assert counts.min() > 150  # every class is represented in the held-out part
    assert ds.train_images.std() > 50  # real pictures, not zeros
    # gray pictures: three equal channels
    assert np.array_equal(ds.train_images[..., 0], ds.train_images[..., 2])


def test_fashion_mnist_uses_debian_split_when_present():
    if not (DEBIAN_FASHION_MNIST / "train-images-idx3-ubyte.gz").exists():
        ds = resolve_dataset("fashion-mnist")
        assert len(ds.train_images) == 8000  # falls back to the embedded copy
        pytest.skip("Debian's dataset-fashion-mnist is not installed; checked the fallback only")
    ds = resolve_dataset("fashion-mnist")
    assert ds.train_images.shape == (60000, 28, 28, 3) and ds.test_images.shape == (10000, 28, 28, 3)


def test_idx_folder_and_bad_paths(tmp_path):
    for split, n in (("train", 12), ("t10k", 5)):
        write_idx(tmp_path / f"{split}-images-idx3-ubyte", np.random.randint(0, 256, (n, 28, 28)))
        write_idx(tmp_path / f"{split}-labels-idx1-ubyte", np.arange(n) % 3)
    ds = resolve_dataset(str(tmp_path))
    assert ds.train_images.shape == (12, 28, 28, 3) and ds.num_classes == 3
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(FastByolError, match="t10k-labels-idx1"):
        resolve_dataset(str(tmp_path))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FastByolError, match="empty"):
        resolve_dataset(str(empty))
    with pytest.raises(FastByolError, match="no such file"):
        resolve_dataset(str(tmp_path / "nope"))
