"""Image folders (JPEG or PNG), decoded by DALI, and a synthetic JPEG source for benchmarks.

Layouts:
- labeled: ROOT/train/<class>/* and ROOT/test/<class>/* (labels from the sorted class-folder names);
  ROOT/unlabeled/** is added to the pretraining set when present;
- unlabeled: any folder without class subfolders: every image below it, recursively, pretrains (no kNN).

Before anything runs, every file is checked cheaply (JPEG: starts with FF D8 FF and has the FF D9 end marker;
PNG: the signature and the IEND chunk at the end): a truncated or non-image file raises FastByolError naming it,
or, with skip_bad_files, is left out and counted. A file that passes these checks but is corrupt inside makes the
DALI decoder fail: that error is re-raised naming the folder.

The kNN monitor needs decoded pixels: the labeled splits are decoded once at the training view size (shorter side
resized, centre crop), at most `max_eval_images` of each split (a seeded subset beyond that).
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import FastByolError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@dataclass
class FileList:
    """Encoded images the training pipeline decodes: one file per sample.

    The encoded-source contract (shared with the tar-shard source): `dali_reader(shard_id, num_shards)` inside a DALI
    pipeline definition, `len()`, `labels` (int64 or None) and `where` (for error messages)."""

    files: list[str]
    labels: np.ndarray | None  # (N,) int64, or None for unlabeled files
    where: str = ""  # the folder the files came from, for error messages

    def __post_init__(self):
        if not self.where:
            self.where = str(Path(self.files[0]).parent.parent) if self.files else "(no files)"

    def __len__(self) -> int:
        return len(self.files)

    def dali_reader(self, shard_id: int, num_shards: int, name: str = "reader"):
        """(encoded bytes, int64 label node or None): this shard's part, reshuffled after every epoch.

        Call inside a DALI pipeline definition; `name` is the reader's name for epoch_size / checkpointing."""
        from nvidia.dali import fn, types

        labels = None if self.labels is None else [int(v) for v in self.labels]
        encoded, label = fn.readers.file(files=self.files, labels=labels, shard_id=shard_id, num_shards=num_shards,
                                         shuffle_after_epoch=True, name=name)
        return encoded, (None if self.labels is None else fn.cast(label, dtype=types.INT64))


def check_image_file(path: Path) -> str | None:
    """None if the file looks like a whole JPEG or PNG, else the reason it does not."""
    try:
        size = path.stat().st_size
        if size < 16:
            return f"{size} bytes: too short to be an image"
        with open(path, "rb") as f:
            head = f.read(8)
            f.seek(max(0, size - 1024))
            tail = f.read()
    except OSError as e:
        return f"unreadable ({e.strerror})"
    suffix = path.suffix.lower()
    if head[:3] == b"\xff\xd8\xff":
        return None if b"\xff\xd9" in tail else "truncated JPEG (no end-of-image marker)"
    if head == _PNG_SIGNATURE:
        return None if b"IEND" in tail[-16:] else "truncated PNG (no IEND chunk)"
    if suffix in IMAGE_SUFFIXES:
        return f"not a {suffix[1:].upper()} file (bad signature)"
    return "not an image file (only JPEG and PNG are read)"


def _scan(files: list[Path], skip_bad_files: bool, counter: dict) -> list[Path]:
    good = []
    for p in files:
        problem = check_image_file(p)
        if problem is None:
            good.append(p)
        elif skip_bad_files:
            counter["skipped"] = counter.get("skipped", 0) + 1
        else:
            raise FastByolError(f"{p}: {problem} (--skip-bad-files leaves such files out and counts them)")
    return good


def _all_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))


def _labeled_split(root: Path, classes: list[str], skip_bad_files: bool, counter: dict) -> FileList:
    files, labels = [], []
    for k, name in enumerate(classes):
        folder = root / name
        if not folder.is_dir():
            continue
        good = _scan(_all_files(folder), skip_bad_files, counter)
        files += [str(p) for p in good]
        labels += [k] * len(good)
    if not files:
        raise FastByolError(f"{root}: no images in its class folders")
    return FileList(files, np.asarray(labels, dtype=np.int64))


def is_image_folder(root: Path) -> bool:
    if (root / "train").is_dir():
        return True
    return any(p.suffix.lower() in IMAGE_SUFFIXES for p in root.rglob("*") if p.is_file())


def load_image_folder(root: Path, image_size: int, skip_bad_files: bool = False, max_eval_images: int = 10000,
                      seed: int = 0):
    """An ImageDataset whose pretraining set is a FileList (decoded by the training pipeline)."""
    from . import ImageDataset

    counter: dict = {}
    train_dir, test_dir = root / "train", root / "test"
    if train_dir.is_dir():
        classes = sorted(p.name for p in train_dir.iterdir() if p.is_dir())
        if not classes:
            raise FastByolError(f"{train_dir}: no class folders (expected train/<class>/<image>)")
        train = _labeled_split(train_dir, classes, skip_bad_files, counter)
        test = _labeled_split(test_dir, classes, skip_bad_files, counter) if test_dir.is_dir() else None
        pretrain = list(train.files)
        if (root / "unlabeled").is_dir():
            pretrain += [str(p) for p in _scan(_all_files(root / "unlabeled"), skip_bad_files, counter)]
        name, num_classes = root.name, len(classes)
    else:
        files = _scan(_all_files(root), skip_bad_files, counter)
        if not files:
            raise FastByolError(f"{root}: no JPEG or PNG images")
        train, test, pretrain, name, num_classes = None, None, [str(p) for p in files], root.name, 0
    rng = np.random.default_rng(seed)

    def decoded(split: FileList | None):
        if split is None:
            return None, None
        idx = np.arange(len(split.files))
        if len(idx) > max_eval_images:
            idx = np.sort(rng.choice(len(idx), max_eval_images, replace=False))
        images = decode_files([split.files[i] for i in idx], image_size)
        return images, split.labels[idx]

    train_x, train_y = decoded(train)
    test_x, test_y = decoded(test)
    if train_x is None:  # unlabeled: a few decoded images stand in for shapes and logs
        train_x = decode_files(pretrain[: min(len(pretrain), 64)], image_size)
    ds = ImageDataset(name, train_x, train_y, test_x, test_y, num_classes, str(root))
    ds.pretrain_files = FileList(pretrain, None)
    ds.skipped_files = counter.get("skipped", 0)
    return ds


def decode_files(files: list[str], size: int, batch_size: int = 64, num_threads: int = 2) -> np.ndarray:
    """(N, size, size, 3) uint8: shorter side resized to `size` (bicubic), centre crop; DALI on the CPU."""
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def
    def eval_pipe():
        jpegs, _ = fn.readers.file(files=files, name="reader", pad_last_batch=True)
        images = fn.decoders.image(jpegs, device="cpu", output_type=types.RGB)
        images = fn.resize(images, resize_shorter=size, interp_type=types.INTERP_CUBIC)
        return fn.crop(images, crop=(size, size), out_of_bounds_policy="pad")

    pipe = eval_pipe(batch_size=batch_size, num_threads=num_threads, device_id=None, seed=0)
    pipe.build()
    out = []
    try:
        while sum(len(o) for o in out) < len(files):
            (batch,) = pipe.run()
            out.append(np.stack([np.asarray(batch[i]) for i in range(len(batch))]))
    except RuntimeError as e:
        raise FastByolError(f"DALI could not decode an image under {Path(files[0]).parent.parent}: "
                            f"{str(e).splitlines()[0]}") from None
    return np.concatenate(out)[: len(files)]


def write_synthetic_jpegs(folder: Path, n_train: int = 512, n_test: int = 128, size: int = 256, classes: int = 4,
                          seed: int = 0, quality: int = 90) -> Path:
    """Random smooth colour JPEGs in train/<class>/ and test/<class>/, for benchmarks and tests (needs Pillow)."""
    try:
        from PIL import Image
    except ImportError:
        raise FastByolError("the synthetic JPEG source needs Pillow: pip install pillow") from None
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("test", n_test)):
        for i in range(n):
            k = i % classes
            folder_k = folder / split / f"class{k}"
            folder_k.mkdir(parents=True, exist_ok=True)
            coarse = rng.integers(0, 256, (8, 8, 3)).astype(np.float32)
            coarse[..., k % 3] = 255 - 40 * k  # a class-dependent colour cast
            img = Image.fromarray(coarse.astype(np.uint8)).resize((size, size), Image.BICUBIC)
            img.save(folder_k / f"{i:06d}.jpg", quality=quality)
    return folder


def synthetic_folder(n_train: int = 512, n_test: int = 128, size: int = 256) -> Path:
    """A temporary folder of synthetic JPEGs (removed when the process exits)."""
    import atexit
    import shutil

    root = Path(tempfile.mkdtemp(prefix="fastbyol-synthetic-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    return write_synthetic_jpegs(root, n_train, n_test, size)
