"""Data sources: each yields uint8 NHWC RGB arrays with labeled train/test splits where the source has them.

`resolve_dataset(spec)` understands:
- "embedded": the Fashion-MNIST test split shipped inside the package (10,000 images), split deterministically
  into 8,000 images for pretraining and the kNN memory bank and 2,000 held out for the kNN test;
- "fashion-mnist": the full 60,000/10,000 split from Debian's `dataset-fashion-mnist` when its files are in
  /usr/share/datasets/fashion-mnist, the embedded copy otherwise;
- a folder holding the four Fashion-MNIST/MNIST idx files (train-/t10k-, images-idx3/labels-idx1, .gz or not).
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from ..errors import FastByolError
from .idx import read_idx

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                         "Ankle boot")


@dataclass
class ImageDataset:
    name: str
    train_images: np.ndarray  # (N, H, W, 3) uint8: pretraining set and kNN memory bank
    train_labels: np.ndarray | None  # (N,) int64
    test_images: np.ndarray | None  # (M, H, W, 3) uint8: kNN queries
    test_labels: np.ndarray | None  # (M,) int64
    num_classes: int
    origin: str  # where it was read from, for the logs
    pretrain_images: np.ndarray | None = None  # when pretraining uses more than the labeled train split (STL10)
    pretrain_files: object = None  # folders.FileList: encoded files the training pipeline decodes
    skipped_files: int = 0  # bad files left out under --skip-bad-files
    gray: bool = False  # every image has R = G = B (Fashion-MNIST, MNIST)

    @property
    def pretraining_source(self):
        """What the two-view loader reads: a FileList of encoded images, or a uint8 NHWC array."""
        return self.pretrain_files if self.pretrain_files is not None else self.pretraining_set

    @property
    def num_pretraining(self) -> int:
        return len(self.pretrain_files.files) if self.pretrain_files is not None else len(self.pretraining_set)

    @property
    def pretraining_set(self) -> np.ndarray:
        return self.train_images if self.pretrain_images is None else self.pretrain_images

    @property
    def image_size(self) -> int:
        return int(self.train_images.shape[1])

    def describe(self) -> str:
        n_test = 0 if self.test_images is None else len(self.test_images)
        h, w = self.train_images.shape[1:3]
        extra = "" if self.pretrain_images is None else f" ({len(self.pretrain_images)} for pretraining)"
        return (f"{self.name}: {len(self.train_images)} train{extra} / {n_test} test images, {h}x{w}, "
                f"from {self.origin}")


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
    if labels.ndim != 1 or len(labels) != len(images):
        raise FastByolError(f"{lbl_path}: {labels.shape[0]} labels for {len(images)} images in {img_path}")
    if len(images) == 0:
        raise FastByolError(f"{img_path}: the file holds no images")


def load_embedded() -> ImageDataset:
    folder = embedded_dir()
    img_path, lbl_path = folder / "t10k-images-idx3-ubyte.gz", folder / "t10k-labels-idx1-ubyte.gz"
    images, labels = read_idx(img_path), read_idx(lbl_path).astype(np.int64)
    _check_pair(images, labels, img_path, lbl_path)
    test_mask = np.arange(len(images)) % 5 == 0  # every 5th image held out: 8,000 / 2,000, classes balanced
    rgb = _gray_to_rgb(images)
    return ImageDataset("fashion-mnist-embedded", rgb[~test_mask], labels[~test_mask], rgb[test_mask],
                        labels[test_mask], 10, f"{folder} (Fashion-MNIST test split, MIT licence)", gray=True)


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
        images, labels = read_idx(ip), read_idx(lp).astype(np.int64)
        _check_pair(images, labels, ip, lp)
        out[split] = (_gray_to_rgb(images), labels)
    num_classes = int(max(out["train"][1].max(), out["t10k"][1].max())) + 1
    return ImageDataset(name, out["train"][0], out["train"][1], out["t10k"][0], out["t10k"][1], num_classes,
                        str(folder), gray=True)


FORMATS = ("auto", "idx", "stl10", "cifar", "numpy", "folder")


def detect_format(path: Path) -> str:
    """The dataset format of a path, from the files it holds; FastByolError when none fits."""
    if path.is_file():
        if path.suffix in (".npy", ".npz"):
            return "numpy"
        raise FastByolError(f"--data {path}: a single file must be .npy or .npz")
    if not any(path.iterdir()):
        raise FastByolError(f"--data {path}: the folder is empty")
    if (path / "stl10_binary").is_dir() or (path / "train_X.bin").is_file():
        return "stl10"
    if (path / "data_batch_1").is_file() or ((path / "train").is_file() and (path / "test").is_file()):
        return "cifar"
    if any(path.glob("*-idx3-ubyte*")):
        return "idx"
    from .folders import is_image_folder

    if is_image_folder(path):
        return "folder"
    for sub in ("cifar-10-batches-py", "cifar-100-python"):
        if (path / sub).is_dir():
            raise FastByolError(f"--data {path}: point --data at {path / sub}")
    raise FastByolError(f"--data {path}: no dataset format recognised (idx, STL10 binary, CIFAR pickles, "
                        ".npy/.npz, JPEG/PNG folders); --data-format names one")


def resolve_dataset(spec: str, data_format: str = "auto", image_size: int = 32, skip_bad_files: bool = False,
                    seed: int = 0) -> ImageDataset:
    """Turn `--data` (and `--data-format`) into a dataset, or raise FastByolError naming what is wrong.

    image_size is the side at which image folders are decoded for the kNN monitor."""
    from .folders import load_image_folder, synthetic_folder
    from .readers import load_cifar, load_numpy, load_stl10

    if data_format not in FORMATS:
        raise FastByolError(f"--data-format {data_format!r} is not one of {FORMATS}")
    if spec == "embedded":
        return load_embedded()
    if spec == "synthetic":  # random JPEGs in a temporary folder: benchmarks and smoke runs
        return load_image_folder(synthetic_folder(), image_size, seed=seed)
    if spec == "fashion-mnist":
        if _find_idx(DEBIAN_FASHION_MNIST, "train-images-idx3-ubyte") is not None:
            return load_idx_folder(DEBIAN_FASHION_MNIST)
        return load_embedded()
    path = Path(spec).expanduser()
    if not path.exists():
        raise FastByolError(f"--data {spec}: no such file or folder (or use 'embedded' or 'fashion-mnist')")
    fmt = detect_format(path) if data_format == "auto" else data_format
    loaders = {"idx": lambda: load_idx_folder(path, name=path.name or "idx"), "stl10": lambda: load_stl10(path),
               "cifar": lambda: load_cifar(path), "numpy": lambda: load_numpy(path),
               "folder": lambda: load_image_folder(path, image_size, skip_bad_files, seed=seed)}
    return loaders[fmt]()
