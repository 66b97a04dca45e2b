"""Data sources: each gives an ImageDataset (dataset.py): a pretraining source (encoded images DALI decodes, or uint8
NHWC RGB arrays) and labeled train/test splits for the kNN monitor where the source has them.

`resolve_dataset(spec, DataRequest(...), Ranks(...))` (request.py: the settings it is read with, and this process
in its job; both optional) understands:
- "embedded": the Fashion-MNIST test split shipped inside the package (10,000 images), split deterministically
  into 8,000 images for pretraining and the kNN memory bank and 2,000 held out for the kNN test;
- "fashion-mnist": the full 60,000/10,000 split from Debian's `dataset-fashion-mnist` when its files are in
  /usr/share/datasets/fashion-mnist, the embedded copy otherwise;
- a folder holding the four Fashion-MNIST/MNIST idx files (train-/t10k-, images-idx3/labels-idx1, .gz or not);
- STL10 binaries, CIFAR-10/100 pickles, .npy/.npz (readers.py);
- a folder of JPEG/PNG images, labeled (train/<class>/ with test/<class>/ or val/<class>/; or class folders
  ROOT/<class>/, torchvision's ImageFolder, with a held-out share) or not (folders.py, with a manifest);
- WebDataset tar shards: 'DIR/train-{000000..000146}.tar', a folder of .tar files, or one .tar (shards.py);
- "synthetic": a cached folder of synthetic JPEGs (synthetic.py), for benchmarks and smoke runs.
"""

from __future__ import annotations

import os
from dataclasses import replace
from importlib import resources
from pathlib import Path

import numpy as np

from ..errors import FastByolError
from .dataset import MAX_CLASSES, ImageDataset, Splits
from .idx import read_idx
from .request import DataRequest, Ranks

__all__ = ["ImageDataset", "DataRequest", "Ranks", "FORMATS", "absolute_data_spec", "detect_format",
           "resolve_dataset", "load_embedded", "load_idx_folder"]

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                         "Ankle boot")


def embedded_dir() -> Path:
    return Path(str(resources.files("fastbyol.data") / "fashion_mnist"))


def _gray_to_rgb(images: np.ndarray) -> np.ndarray:
    """(N, H, W) uint8 -> (N, H, W, 3): the augmentation pipeline and the encoders are RGB."""
    return np.ascontiguousarray(np.repeat(images[..., None], 3, axis=3))


def _find_idx(folder: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def _check_pair(images: np.ndarray, labels: np.ndarray, img_path: Path, lbl_path: Path) -> None:
    if images.ndim != 3:
        raise FastByolError(f"{img_path}: expected (N, H, W) images, got shape {images.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise FastByolError(f"{lbl_path}: labels must be integers, got {labels.dtype}")
    if labels.ndim != 1 or len(labels) != len(images):
        raise FastByolError(f"{lbl_path}: {labels.shape[0]} labels for {len(images)} images in {img_path}")
    if len(images) == 0:
        raise FastByolError(f"{img_path}: the file holds no images")
    if labels.min() < 0 or labels.max() >= MAX_CLASSES:  # the kNN vote and the probe are sized by the classes
        raise FastByolError(f"{lbl_path}: labels must lie in 0..{MAX_CLASSES - 1}, got "
                            f"{int(labels.min())}..{int(labels.max())}")


def load_embedded() -> ImageDataset:
    folder = embedded_dir()
    img_path, lbl_path = folder / "t10k-images-idx3-ubyte.gz", folder / "t10k-labels-idx1-ubyte.gz"
    images, labels = read_idx(img_path), read_idx(lbl_path)
    _check_pair(images, labels, img_path, lbl_path)
    labels = labels.astype(np.int64)
    test_mask = np.arange(len(images)) % 5 == 0  # every 5th image held out: 8,000 / 2,000, classes balanced
    rgb = _gray_to_rgb(images)
    return ImageDataset("fashion-mnist-embedded",
                        Splits(rgb[~test_mask], labels[~test_mask], rgb[test_mask], labels[test_mask]), 10,
                        f"{folder} (Fashion-MNIST test split, MIT licence)", gray=True)


def load_idx_folder(folder: Path, name: str = "fashion-mnist") -> ImageDataset:
    """The train-/t10k- idx files of (Fashion-)MNIST in one folder."""
    paths = {}
    for split, kind in (("train", "images-idx3"), ("train", "labels-idx1"), ("t10k", "images-idx3"),
                        ("t10k", "labels-idx1")):
        p = _find_idx(folder, f"{split}-{kind}-ubyte")
        if p is None:
            raise FastByolError(f"{folder}: missing {split}-{kind}-ubyte[.gz] (an idx dataset needs all four files)")
        paths[(split, kind)] = p
    out = {}
    for split in ("train", "t10k"):
        ip, lp = paths[(split, "images-idx3")], paths[(split, "labels-idx1")]
        images, labels = read_idx(ip), read_idx(lp)
        _check_pair(images, labels, ip, lp)
        labels = labels.astype(np.int64)
        out[split] = (_gray_to_rgb(images), labels)
    num_classes = int(max(out["train"][1].max(), out["t10k"][1].max())) + 1
    return ImageDataset(name, Splits(*out["train"], *out["t10k"]), num_classes, str(folder), gray=True)


FORMATS = ("auto", "idx", "stl10", "cifar", "numpy", "folder", "shards")


def detect_format(path: Path) -> str:
    """The dataset format of a path, from the files it holds; FastByolError when none fits."""
    if path.is_file():
        if path.suffix in (".npy", ".npz"):
            return "numpy"
        if path.suffix == ".tar":
            return "shards"
        raise FastByolError(f"--data {path}: a single file must be .npy, .npz or .tar")
    if not any(e for e in path.iterdir() if not e.name.startswith(".")):
        raise FastByolError(f"--data {path}: the folder is empty")
    if (path / "stl10_binary").is_dir() or (path / "train_X.bin").is_file():
        return "stl10"
    if (path / "data_batch_1").is_file() or ((path / "train").is_file() and (path / "test").is_file()):
        return "cifar"
    if any(path.glob("*-idx3-ubyte*")):
        return "idx"
    from .folders import is_image_folder

    if any(path.glob("*.tar")) and not (path / "train").is_dir():
        return "shards"
    if is_image_folder(path):
        return "folder"
    for sub in ("cifar-10-batches-py", "cifar-100-python"):
        if (path / sub).is_dir():
            raise FastByolError(f"--data {path}: point --data at {path / sub}")
    raise FastByolError(f"--data {path}: no dataset format recognised (idx, STL10 binary, CIFAR pickles, "
                        ".npy/.npz, JPEG/PNG folders, .tar shards); --data-format names one")


NAMED_DATASETS = ("embedded", "fashion-mnist", "synthetic")  # --data values that are names, not paths


def absolute_data_spec(spec: str) -> str:
    """--data as a run records it: a path (a file, a folder, a shard pattern such as 'shards/train-{000..009}.tar')
    made absolute, so the run's evaluations and resume find it from any folder; a dataset name, and a relative path
    that names nothing here (its error comes later, as typed), stay as they are."""
    if spec in NAMED_DATASETS or not spec.strip() or os.path.isabs(spec):
        return spec
    path = Path(spec).expanduser()
    if path.exists() or ("{" in spec and path.parent.is_dir()):
        return os.path.abspath(path)
    return spec


class NoFileNames(FastByolError):
    """resolve_dataset's train_pick on a dataset whose images have no file names (not an image folder)."""


def resolve_dataset(spec: str, request: DataRequest | None = None, ranks: Ranks | None = None,
                    data_format: str = "auto") -> ImageDataset:
    """Turn `--data` (and `--data-format`) into a dataset, or raise FastByolError naming what is wrong.

    request: the settings it is read with (DataRequest(): 32 px kNN images, bad files refused, seed 0, ...).
    ranks: this process in a torchrun job (default: Ranks.from_environment(), $RANK and $WORLD_SIZE, else 0 of 1,
    without a barrier). A request's train_pick on data other than an image folder raises NoFileNames; its test_data
    there is refused."""
    from .folders import load_image_folder
    from .readers import load_cifar, load_numpy, load_stl10
    from .shards import load_shards

    request = DataRequest() if request is None else request
    if not isinstance(request, DataRequest):
        raise TypeError(f"resolve_dataset: request must be a DataRequest, got {type(request).__name__} "
                        "(the format is the keyword data_format)")
    if data_format not in FORMATS:
        raise FastByolError(f"--data-format {data_format!r} is not one of {FORMATS}")
    if not spec or not spec.strip():
        raise FastByolError("--data is empty: name a dataset folder or file, 'embedded', 'fashion-mnist' or "
                            "'synthetic'")
    ranks = Ranks.from_environment() if ranks is None else ranks
    fmt = _format_of(spec, data_format)
    if request.test_data and fmt != "folder":
        raise FastByolError(f"--test-data {request.test_data}: a test folder is for image folders; --data {spec} has "
                            "its own test split or none")
    if request.train_pick is not None and fmt != "folder":
        raise NoFileNames(f"--data {spec}: not an image folder")
    if spec == "embedded":
        return load_embedded()
    if spec == "synthetic":  # a cached folder of synthetic JPEGs: benchmarks and smoke runs (every file is good)
        from .synthetic import synthetic_folder

        return load_image_folder(synthetic_folder(cache_dir=request.cache_dir),
                                 replace(request, skip_bad_files=False, test_data=""), ranks)
    if spec == "fashion-mnist":
        if _find_idx(DEBIAN_FASHION_MNIST, "train-images-idx3-ubyte") is not None:
            return load_idx_folder(DEBIAN_FASHION_MNIST)
        return load_embedded()
    if fmt == "shards":
        return load_shards(spec, request, ranks)
    path = Path(spec).expanduser()
    loaders = {"idx": lambda: load_idx_folder(path, name=path.name or "idx"), "stl10": lambda: load_stl10(path),
               "cifar": lambda: load_cifar(path), "numpy": lambda: load_numpy(path),
               "folder": lambda: load_image_folder(path, request, ranks)}
    return loaders[fmt]()


def _format_of(spec: str, data_format: str) -> str:
    """The format --data names: "embedded", "fashion-mnist" (arrays), "folder" (also "synthetic"), "shards", or a
    file format (detect_format); FastByolError for a path that is missing or not a file or folder."""
    from .shards import is_shard_spec

    if spec in ("embedded", "fashion-mnist"):
        return spec
    if spec == "synthetic":
        return "folder"
    if data_format == "shards" or (data_format == "auto" and is_shard_spec(spec)):
        return "shards"
    path = Path(spec).expanduser()
    if not path.exists():
        raise FastByolError(f"--data {spec}: no such file or folder (or use 'embedded' or 'fashion-mnist')")
    if not path.is_dir() and not path.is_file():  # a FIFO, a device, a socket: never opened (it could block)
        raise FastByolError(f"--data {spec}: not a regular file or a folder")
    return detect_format(path) if data_format == "auto" else data_format
