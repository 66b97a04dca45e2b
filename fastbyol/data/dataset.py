"""ImageDataset: what a data source gives the trainer, built in one call from a few grouped parts: its kNN splits
(`Splits`, arrays in memory, from the array readers; or `PendingSplits`, the background decode of an encoded source
and what is known without it), the pretraining set where it is more than the train split, and a `Startup` report.

- the pretraining source: `pretraining_source` is an `EncodedSource` (FileList of a folder, ShardSource of tar
  shards: `dali_reader(shard_id, num_shards)`, `len()`, `labels`, `labelled`, `where`, `bad`, `replace_bad`) or a uint8
  (N, H, W, 3) array;
- the kNN monitor's labeled splits: `train_images`/`train_labels` (memory bank) and `test_images`/`test_labels`
  (queries), uint8 NHWC at `image_size`. For encoded sources they decode in a background thread
  (decode.BackgroundDecode): reading `train_images`, `test_images` or their labels waits for it; `has_knn`,
  `describe()`, `num_pretraining` and `eval_images_ready()` never wait; `wait_eval_images()` waits and returns the
  seconds waited. A file that fails to decode there raises FastByolError naming it when waited on (or is skipped
  and counted in `skipped_files` under --skip-bad-files).
- `startup_seconds`: what building it cost, {"listing", "checks", "index", "eval images"} in seconds ("eval images"
  once the background decode is done, measured in its thread); `manifest` says whether a manifest was read fresh,
  built or rebuilt (and why).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np

from ..errors import FastByolError

# Class labels read from any file lie in 0..MAX_CLASSES - 1: the online probe's head and the kNN vote are sized by
# the class count (a label of 10^12 in a shard once asked for a 512 TB head). 65,536 holds every public dataset's
# classes but the largest landmark sets; each reader names the file (and member) of a label beyond it.
MAX_CLASSES = 1 << 16


@runtime_checkable
class EncodedSource(Protocol):
    """The contract of an encoded pretraining source (FileList of a folder, ShardSource of tar shards): what the
    loader and the trainer may rely on, instead of probing for attributes. Under --skip-bad-files the pipeline asks
    `replace_bad` to stand another file in for one it could not decode; `bad` lists those replaced so far."""

    labels: np.ndarray | None  # (N,) int64, or None for unlabeled files
    labelled: bool  # every pretraining file has a class label its DALI reader can emit (labels=True)
    where: str  # the folder or shards the files came from, for error messages
    skip_bad: bool  # the training pipeline may stand another file in for one it cannot decode
    bad: list[str]  # files replaced so far, as the pipeline names them, in the order found

    def __len__(self) -> int: ...

    def dali_reader(self, shard_id: int, num_shards: int, name: str = "reader"):
        """The DALI reader of this rank's shard, inside a pipeline definition: (encoded images, labels or None)."""
        ...

    def dali_read(self, shard_id: int, num_shards: int, name: str = "reader", labels: bool = False):
        """The reader alone (no other operator): (encoded images, its raw label output where labels and the source
        is `labelled`, else None). The training graph makes the int64 labels with dali_label(raw) after all its
        other operators, so they keep the names (and a data checkpoint) of the graph without labels."""
        ...

    def dali_label(self, raw):
        """The int64 label of each sample from dali_read's raw label output (inside a pipeline definition)."""
        ...

    def replace_bad(self, *names: str) -> bool:
        """Replace these files in the pretraining list; False when one cannot be replaced (then nothing changes)."""
        ...


@dataclass(frozen=True)
class Splits:
    """The kNN monitor's labelled splits in memory: uint8 (N, H, W, 3) images and int64 labels (the array readers).
    Labels and the test split are None where the source has none."""

    train_images: np.ndarray
    train_labels: np.ndarray | None = None
    test_images: np.ndarray | None = None
    test_labels: np.ndarray | None = None


@dataclass(frozen=True)
class PendingSplits:
    """The kNN splits of an encoded source (folder, shards), decoded in the background.

    decode: a decode.BackgroundDecode whose result is (train_images, train_labels, test_images, test_labels,
    skipped), or None where this process decodes none (not rank 0). Known without decoding: image_size, the side
    they decode at; counts, the (labelled train, test) sizes of the whole splits (describe()); has_labels, whether
    both splits are labelled (has_knn)."""

    decode: object | None
    image_size: int
    counts: tuple[int, int]
    has_labels: bool


@dataclass(frozen=True)
class Startup:
    """What building a dataset found and cost: skipped_files, the bad files left out under --skip-bad-files;
    seconds, {"listing", "checks", "index"}; manifest, "fresh", "built" or "rebuilt (...)" for manifest-backed
    folders, else None."""

    skipped_files: int = 0
    seconds: dict = field(default_factory=dict)
    manifest: str | None = None


class ImageDataset:
    """A dataset, every field given to the constructor: its kNN splits (arrays, or a pending decode), and what
    pretrains where that is more than the labelled train split."""

    def __init__(self, name: str, splits: Splits | PendingSplits, num_classes: int, origin: str, *,
                 pretraining: np.ndarray | EncodedSource | None = None, gray: bool = False,
                 startup: Startup | None = None):
        """pretraining: a uint8 (N, H, W, 3) array when pretraining uses more than the labelled train split (STL10's
        unlabeled images), or the encoded source the training pipeline decodes (FileList, ShardSource); None: the
        train split's images. gray: every image has R = G = B (Fashion-MNIST, MNIST)."""
        self.name = name
        if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) \
                or not 0 <= num_classes <= MAX_CLASSES:  # each reader names the file first; this is the last guard
            raise FastByolError(f"{origin}: {num_classes} classes, more than fastbyol takes (at most {MAX_CLASSES})")
        self.num_classes = int(num_classes)
        self.origin = origin  # where it was read from, for the logs
        self._later = splits if isinstance(splits, PendingSplits) else None  # known without decoding
        self._eval = None if self._later is None else self._later.decode
        self._arrays = Splits(None) if self._later is not None else splits
        self.pretrain_images = pretraining if isinstance(pretraining, np.ndarray) else None
        self.pretrain_files = None if pretraining is None or isinstance(pretraining, np.ndarray) else pretraining
        self.gray = gray
        startup = Startup() if startup is None else startup
        self._skipped = startup.skipped_files  # bad files left out at startup under --skip-bad-files
        self._startup = dict(startup.seconds)
        self.manifest = startup.manifest  # "fresh", "built", "rebuilt (...)" for manifest-backed folders, else None

    # -------------------------------------------------------------------------------- the kNN splits (may wait)
    def _pending(self) -> tuple:
        return self._eval.result()

    @property
    def eval_skipped(self) -> list[tuple[str, str]]:
        """[(name, reason)] of the files the kNN images' decode skipped, once it has finished ([] before, or when
        there is none or it failed)."""
        pending = self._eval
        if pending is None or not pending.ready() or pending.failed:
            return []
        return list(pending.result()[4])

    @property
    def train_images(self) -> np.ndarray | None:
        return self._pending()[0] if self._eval is not None else self._arrays.train_images

    @property
    def train_labels(self) -> np.ndarray | None:
        return self._pending()[1] if self._eval is not None else self._arrays.train_labels

    @property
    def test_images(self) -> np.ndarray | None:
        return self._pending()[2] if self._eval is not None else self._arrays.test_images

    @property
    def test_labels(self) -> np.ndarray | None:
        return self._pending()[3] if self._eval is not None else self._arrays.test_labels

    def eval_images_ready(self) -> bool:
        """True when the kNN images can be read without waiting."""
        return self._eval is None or self._eval.ready()

    def wait_eval_images(self) -> float:
        """Wait for the kNN images (raising the decode's FastByolError, if any); the seconds waited."""
        t0 = time.perf_counter()
        if self._eval is not None:
            self._eval.result()
        return time.perf_counter() - t0

    # ------------------------------------------------------------------------------------------- never wait
    @property
    def has_knn(self) -> bool:
        """Whether the kNN monitor can run: labeled train and test splits (known without decoding)."""
        if self._later is not None:
            return self._later.has_labels
        arrays = self._arrays
        return arrays.train_labels is not None and arrays.test_images is not None and arrays.test_labels is not None

    @property
    def skipped_files(self) -> int:
        extra = len(self._eval.result()[4]) if self._eval is not None and self._eval.ready() and \
            not self._eval.failed else 0
        return self._skipped + extra

    @property
    def startup_seconds(self) -> dict:
        """{"listing", "checks", "index", "eval images"} seconds (the last once the background decode is done)."""
        out = dict(self._startup)
        if self._eval is not None and self._eval.ready():
            out["eval images"] = self._eval.seconds
        return out

    @property
    def pretraining_source(self):
        """What the two-view loader reads: an encoded source (FileList, ShardSource), or a uint8 NHWC array."""
        return self.pretrain_files if self.pretrain_files is not None else self.pretraining_set

    @property
    def num_pretraining(self) -> int:
        return len(self.pretrain_files) if self.pretrain_files is not None else len(self.pretraining_set)

    @property
    def pretraining_set(self) -> np.ndarray:
        return self._arrays.train_images if self.pretrain_images is None else self.pretrain_images

    @property
    def image_size(self) -> int:
        """Side of the decoded kNN images."""
        return int(self._later.image_size if self._later is not None else self._arrays.train_images.shape[1])

    def describe(self) -> str:
        arrays = self._arrays
        if self._later is not None:
            n_train, n_test = self._later.counts
        else:
            n_train = len(arrays.train_images)
            n_test = 0 if arrays.test_images is None else len(arrays.test_images)
        if arrays.train_images is not None:
            h, w = arrays.train_images.shape[1:3]
        else:
            h = w = self.image_size
        if self.pretrain_files is not None:
            extra = f" ({len(self.pretrain_files)} encoded images for pretraining)"
        elif self.pretrain_images is not None:
            extra = f" ({len(self.pretrain_images)} for pretraining)"
        else:
            extra = ""
        return f"{self.name}: {n_train} train{extra} / {n_test} test images, {h}x{w}, from {self.origin}"
