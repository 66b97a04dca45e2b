"""Readers of the binary dataset formats that decode to uint8 arrays: STL10, CIFAR-10/100 pickles, numpy.

Each returns an ImageDataset (uint8 NHWC RGB, labels int64) or raises FastByolError naming the bad file.
- STL10 (`stl10_binary/`): `*_X.bin` = N x 3 x 96 x 96 uint8, each channel stored column-major; `*_y.bin` = N uint8
  labels 1..10. Pretraining uses unlabeled + train (105,000 images); kNN uses train (bank) and test (queries).
- CIFAR-10 (`cifar-10-batches-py/`: data_batch_1..5, test_batch) and CIFAR-100 (`cifar-100-python/`: train, test):
  python pickles with b"data" (N x 3072, R then G then B planes of 32 x 32) and b"labels" / b"fine_labels", loaded
  with an unpickler that admits only numpy arrays and plain types (a pickle that would run code is refused).
- numpy: `.npy` (N, H, W, 3) uint8, unlabeled; `.npz` with train_images[, train_labels, test_images, test_labels]
  (or images[, labels]); or arrays in memory through `dataset_from_arrays`.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

from ..errors import FastByolError
from .dataset import MAX_CLASSES, ImageDataset, Splits

STL10_SIDE = 96
STL10_BYTES = 3 * STL10_SIDE * STL10_SIDE


def _check_images(images: np.ndarray, where: str) -> np.ndarray:
    if images.ndim == 3:  # (N, H, W) gray
        images = np.repeat(images[..., None], 3, axis=3)
    if images.ndim != 4 or images.shape[3] not in (1, 3):
        raise FastByolError(f"{where}: expected (N, H, W, 3) images, got shape {images.shape}")
    if images.shape[3] == 1:
        images = np.repeat(images, 3, axis=3)
    if images.dtype != np.uint8:
        raise FastByolError(f"{where}: expected uint8 pixels, got {images.dtype}")
    if len(images) == 0:
        raise FastByolError(f"{where}: holds no images")
    return np.ascontiguousarray(images)


def _check_labels(labels, n: int, where: str) -> np.ndarray:
    try:
        labels = np.asarray(labels)
    except (ValueError, TypeError) as e:  # ragged or mixed lists
        raise FastByolError(f"{where}: labels are not an array of integers ({e})") from None
    if labels.ndim != 1 or len(labels) != n or not np.issubdtype(labels.dtype, np.integer):
        raise FastByolError(f"{where}: expected {n} integer labels, got {labels.dtype} {labels.shape}")
    if len(labels) and (labels.min() < 0 or labels.max() >= MAX_CLASSES):
        raise FastByolError(f"{where}: labels must lie in 0..{MAX_CLASSES - 1} (the classes fastbyol takes), got "
                            f"{labels.min()}..{labels.max()}")
    return labels.astype(np.int64)


def dataset_from_arrays(train_images: np.ndarray, train_labels=None, test_images=None, test_labels=None,
                        name: str = "arrays", origin: str = "memory"):
    """An ImageDataset from in-memory arrays: (N, H, W[, 3]) uint8 images, optional labels and test split."""
    train_images = _check_images(np.asarray(train_images), f"{origin}: train images")
    if train_labels is not None:
        train_labels = _check_labels(train_labels, len(train_images), f"{origin}: train labels")
    if test_images is not None:
        test_images = _check_images(np.asarray(test_images), f"{origin}: test images")
        if test_images.shape[1:] != train_images.shape[1:]:
            raise FastByolError(f"{origin}: test images {test_images.shape[1:]} differ from train "
                                f"{train_images.shape[1:]}")
    if test_labels is not None:
        if test_images is None:
            raise FastByolError(f"{origin}: test labels without test images")
        test_labels = _check_labels(test_labels, len(test_images), f"{origin}: test labels")
    labeled = train_labels is not None and test_labels is not None
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1 if labeled else 0
    return ImageDataset(name, Splits(train_images, train_labels, test_images, test_labels), num_classes, origin)


# ------------------------------------------------------------------------------------------------------------ STL10
def _stl10_images(path: Path) -> np.ndarray:
    size = path.stat().st_size
    if size == 0 or size % STL10_BYTES:
        raise FastByolError(f"{path}: {size} bytes is not a whole number of 96x96x3 STL10 images "
                            f"({STL10_BYTES} bytes each)")
    raw = np.fromfile(path, dtype=np.uint8).reshape(-1, 3, STL10_SIDE, STL10_SIDE)
    return np.ascontiguousarray(raw.transpose(0, 3, 2, 1))  # column-major planes -> (N, H, W, 3)


def _stl10_labels(path: Path, n: int) -> np.ndarray:
    labels = np.fromfile(path, dtype=np.uint8).astype(np.int64)
    if len(labels) != n or n == 0:
        raise FastByolError(f"{path}: {len(labels)} labels for {n} images")
    if labels.min() < 1 or labels.max() > 10:
        raise FastByolError(f"{path}: STL10 labels must be 1..10")
    return labels - 1


def load_stl10(folder: Path):
    folder = folder / "stl10_binary" if (folder / "stl10_binary").is_dir() else folder
    need = ["train_X.bin", "train_y.bin", "test_X.bin", "test_y.bin"]
    missing = [n for n in need if not (folder / n).is_file()]
    if missing:
        raise FastByolError(f"{folder}: STL10 needs {', '.join(missing)}")
    train_x, test_x = _stl10_images(folder / "train_X.bin"), _stl10_images(folder / "test_X.bin")
    train_y = _stl10_labels(folder / "train_y.bin", len(train_x))
    test_y = _stl10_labels(folder / "test_y.bin", len(test_x))
    pretrain = train_x
    if (folder / "unlabeled_X.bin").is_file():
        pretrain = np.concatenate([_stl10_images(folder / "unlabeled_X.bin"), train_x])
    return ImageDataset("stl10", Splits(train_x, train_y, test_x, test_y), 10, str(folder), pretraining=pretrain)


# ------------------------------------------------------------------------------------------------------------ CIFAR
# What a CIFAR batch may name: numpy's array and scalar reconstructors and types, and the bytes helper of protocol-2
# pickles.
# Anything else (os.system, builtins.eval, a class with a __reduce__) is refused before it is looked up.
_CIFAR_GLOBALS = frozenset({
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
})


class _CifarUnpickler(pickle.Unpickler):
    """Loads only dicts, lists, bytes, numbers and numpy arrays: what the CIFAR format holds."""

    def find_class(self, module: str, name: str):
        if (module, name) not in _CIFAR_GLOBALS:
            raise pickle.UnpicklingError(f"refused to load {module}.{name}, which a CIFAR batch never holds")
        return super().find_class(module, name)


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            obj = _CifarUnpickler(f, encoding="bytes").load()
    except pickle.UnpicklingError as e:
        if "refused" in str(e):
            raise FastByolError(f"{path}: not loaded: {e} (a pickle that runs code?)") from None
        raise FastByolError(f"{path}: not a readable CIFAR pickle (UnpicklingError: {e})") from None
    except Exception as e:  # truncated or not a pickle
        raise FastByolError(f"{path}: not a readable CIFAR pickle ({type(e).__name__}: {e})") from None
    if not isinstance(obj, dict) or b"data" not in obj:
        raise FastByolError(f"{path}: not a CIFAR batch (no b'data' entry)")
    return obj


def _cifar_arrays(path: Path, label_key: bytes) -> tuple[np.ndarray, np.ndarray]:
    batch = _unpickle(path)
    data = np.asarray(batch[b"data"])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise FastByolError(f"{path}: CIFAR data must be N x 3072 uint8, got {data.dtype} {data.shape}")
    if label_key not in batch or len(batch[label_key]) != len(data):
        raise FastByolError(f"{path}: {label_key.decode()} missing or not one per image")
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    labels = _check_labels(batch[label_key], len(data), f"{path}: {label_key.decode()}")
    return np.ascontiguousarray(images), labels


def _check_classes(labels: np.ndarray, num_classes: int, where: str) -> None:
    """Labels of a format with a fixed class count must lie in 0..num_classes - 1 (the kNN vote indexes by them)."""
    if len(labels) and labels.max() >= num_classes:
        raise FastByolError(f"{where}: label {int(labels.max())} is out of range for {num_classes} classes "
                            f"(0..{num_classes - 1})")


def load_cifar(folder: Path):
    """CIFAR-10 (data_batch_*, test_batch) or CIFAR-100 (train, test) pickles in `folder`."""
    if (folder / "data_batch_1").is_file():
        batches = sorted(folder.glob("data_batch_*"))
        parts = [_cifar_arrays(p, b"labels") for p in batches]
        if not (folder / "test_batch").is_file():
            raise FastByolError(f"{folder}: CIFAR-10 needs test_batch")
        test_x, test_y = _cifar_arrays(folder / "test_batch", b"labels")
        train_x = np.concatenate([p[0] for p in parts])
        train_y = np.concatenate([p[1] for p in parts])
        for p, (_, y) in zip(batches, parts):
            _check_classes(y, 10, str(p))
        _check_classes(test_y, 10, str(folder / "test_batch"))
        return ImageDataset("cifar10", Splits(train_x, train_y, test_x, test_y), 10, str(folder))
    if (folder / "train").is_file() and (folder / "test").is_file():
        train_x, train_y = _cifar_arrays(folder / "train", b"fine_labels")
        test_x, test_y = _cifar_arrays(folder / "test", b"fine_labels")
        _check_classes(train_y, 100, str(folder / "train"))
        _check_classes(test_y, 100, str(folder / "test"))
        return ImageDataset("cifar100", Splits(train_x, train_y, test_x, test_y), 100, str(folder))
    raise FastByolError(f"{folder}: no CIFAR-10 (data_batch_1, test_batch) or CIFAR-100 (train, test) files")


# ------------------------------------------------------------------------------------------------------------ numpy
def _npz_member_bytes(obj, key: str, path: Path) -> None:
    """Bound a member before numpy reads it: numpy allocates what the member's header declares before it reads the
    data, and a compressed member may expand to any size. The declared array must fit in the member's uncompressed
    size (the zip's own record, which zipfile enforces), and that in the machine's memory."""
    from ..system.bounds import host_memory_bytes

    try:
        size = obj.zip.getinfo(f"{key}.npy").file_size
        with obj.zip.open(f"{key}.npy") as f:
            version = np.lib.format.read_magic(f)
            header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, _, dtype = header(f)  # the header only (no pickle)
    except Exception:  # noqa: BLE001 (a damaged member or header: numpy's reader names it just after)
        return
    declared = int(np.prod(shape, dtype=object)) * dtype.itemsize
    if declared > size:
        raise FastByolError(f"{path}: member {key!r} declares {shape} {dtype} ({declared} bytes) but holds {size}")
    if size > host_memory_bytes() // 2:
        raise FastByolError(f"{path}: member {key!r} expands to {size} bytes, more than half of this machine's memory")


def _npz_member(obj, key: str, path: Path) -> np.ndarray:
    """One member of an .npz, read now (np.load reads members lazily: a broken or object-dtype member would raise
    outside any check), as a numeric array, its size bounded first (_npz_member_bytes)."""
    _npz_member_bytes(obj, key, path)
    try:
        arr = obj[key]
    except Exception as e:  # object dtype (pickles refused), a damaged zip member, a bad header
        raise FastByolError(f"{path}: member {key!r} is not a readable array ({type(e).__name__}: {e})") from None
    if arr.dtype.kind not in "biuf":
        raise FastByolError(f"{path}: member {key!r} holds {arr.dtype} values, not numbers")
    return arr


def load_numpy(path: Path):
    if not path.is_file():
        raise FastByolError(f"{path}: not a regular file (a .npy or .npz file is read)")
    try:
        obj = np.load(path, allow_pickle=False)
    except Exception as e:
        raise FastByolError(f"{path}: not a readable numpy file ({type(e).__name__}: {e})") from None
    if isinstance(obj, np.ndarray):
        return dataset_from_arrays(obj, name=path.stem, origin=str(path))
    keys = set(obj.files)
    get = lambda k: _npz_member(obj, k, path) if k in keys else None  # noqa: E731
    if "train_images" in keys:
        return dataset_from_arrays(get("train_images"), get("train_labels"), get("test_images"), get("test_labels"),
                                   name=path.stem, origin=str(path))
    if "images" in keys:
        return dataset_from_arrays(get("images"), get("labels"), name=path.stem, origin=str(path))
    raise FastByolError(f"{path}: an .npz needs 'train_images' (or 'images'); it has {sorted(keys)}")
