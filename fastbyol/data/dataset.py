"""ImageDataset: what a data source gives the trainer, built in one call.

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


class ImageDataset:
    """A dataset, every field given to the constructor (arrays, or a pending decode for the kNN splits)."""

    def __init__(self, name: str, train_images, train_labels: np.ndarray | None, test_images,
                 test_labels: np.ndarray | None, num_classes: int, origin: str,
                 pretrain_images: np.ndarray | None = None, pretrain_files=None, skipped_files: int = 0,
                 gray: bool = False, *, eval_decode=None, image_size: int | None = None,
                 counts: tuple[int, int] | None = None, startup_seconds: dict | None = None,
                 manifest: str | None = None, has_labels: bool | None = None):
        """train_images/test_images: uint8 (N, H, W, 3) arrays, or None when eval_decode (a BackgroundDecode whose
        result is (train_images, train_labels, test_images, test_labels, skipped)) will provide them.
        counts: (labeled train, test) sizes of the whole splits, for describe() (default: the arrays' lengths)."""
        self.name = name
        self._train_images, self._train_labels = train_images, train_labels
        self._test_images, self._test_labels = test_images, test_labels
        if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) \
                or not 0 <= num_classes <= MAX_CLASSES:  # each reader names the file first; this is the last guard
            raise FastByolError(f"{origin}: {num_classes} classes, more than fastbyol takes (at most {MAX_CLASSES})")
        self.num_classes = int(num_classes)
        self.origin = origin  # where it was read from, for the logs
        self.pretrain_images = pretrain_images  # when pretraining uses more than the labeled split (STL10)
        self.pretrain_files = pretrain_files  # an encoded source the training pipeline decodes
        self._skipped = skipped_files  # bad files left out at startup under --skip-bad-files
        self.gray = gray  # every image has R = G = B (Fashion-MNIST, MNIST)
        self._eval = eval_decode
        self._image_size = image_size
        self._counts = counts
        self._startup = dict(startup_seconds or {})
        self.manifest = manifest  # "fresh", "built", "rebuilt (...)" for manifest-backed folders, else None
        self._has_labels = has_labels

    # -------------------------------------------------------------------------------- the kNN splits (may wait)
    def _pending(self) -> tuple:
        if self._eval is None:
            raise FastByolError(f"{self.name}: no kNN images here (they are decoded on rank 0 only)")
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
    def train_images(self) -> np.ndarray:
        return self._pending()[0] if self._train_images is None and self._eval is not None else self._train_images

    @property
    def train_labels(self) -> np.ndarray | None:
        return self._pending()[1] if self._eval is not None else self._train_labels

    @property
    def test_images(self) -> np.ndarray | None:
        return self._pending()[2] if self._eval is not None else self._test_images

    @property
    def test_labels(self) -> np.ndarray | None:
        return self._pending()[3] if self._eval is not None else self._test_labels

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
        if self._has_labels is not None:
            return self._has_labels
        return self._train_labels is not None and self._test_images is not None and self._test_labels is not None

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
        return self._train_images if self.pretrain_images is None else self.pretrain_images

    @property
    def image_size(self) -> int:
        """Side of the decoded kNN images."""
        return int(self._image_size if self._image_size is not None else self._train_images.shape[1])

    def describe(self) -> str:
        if self._counts is not None:
            n_train, n_test = self._counts
        else:
            n_train = len(self._train_images)
            n_test = 0 if self._test_images is None else len(self._test_images)
        if self._train_images is not None:
            h, w = self._train_images.shape[1:3]
        else:
            h = w = self.image_size
        if self.pretrain_files is not None:
            extra = f" ({len(self.pretrain_files)} encoded images for pretraining)"
        elif self.pretrain_images is not None:
            extra = f" ({len(self.pretrain_images)} for pretraining)"
        else:
            extra = ""
        return f"{self.name}: {n_train} train{extra} / {n_test} test images, {h}x{w}, from {self.origin}"
