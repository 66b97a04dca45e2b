"""What a caller asks of a data source, as two frozen objects built once and passed down to every loader.

- `DataRequest`: the settings beside `--data`/`--data-format` (the kNN images' side, --skip-bad-files, the seed of
  their sample, --test-data, a picked train split, the cache folder, whether and how this process decodes the kNN
  images). The trainer builds one from its config, an evaluation from the run's, a Python user from the defaults.
- `Ranks`: this process in its job (rank, world size) and the barrier all ranks enter, which decide who builds a
  folder's manifest or a shard set's index while the others wait.

resolve_dataset (data/__init__.py) gives both to the loader of the format (folders.load_image_folder,
shards.load_shards); the array formats read none of them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class Ranks:
    """This process in a torchrun job: `rank` of `world_size`, and `barrier`, a callable every rank enters (the
    manifest or shard index is then built by rank 0 before it and read by the others after; without one, the
    processes take a file lock in turn)."""

    rank: int = 0
    world_size: int = 1
    barrier: Callable[[], None] | None = None

    @classmethod
    def from_environment(cls, barrier: Callable[[], None] | None = None) -> Ranks:
        """$RANK and $WORLD_SIZE (torchrun's, each checked), else rank 0 of 1."""
        from ..system.environment import torchrun_world

        rank, _, world_size = torchrun_world()
        return cls(rank, world_size, barrier)


@dataclass(frozen=True)
class DataRequest:
    """The settings every data source is read with (each loader reads those it has a use for).

    image_size: the side at which encoded images (folders, shards) are decoded for the kNN monitor.
    skip_bad_files: leave out and count a file that fails its check or decode, instead of stopping at it.
    seed: of the kNN images' sample when a split holds more than max_eval_images (at most that many of each split
    are decoded).
    test_data (--test-data): a folder of class folders, the kNN test split of an image folder (then an ImageFolder
    layout holds none of its images out of pretraining).
    train_pick: for an image folder, pick(relpaths) -> positions of the train split's images to decode as its
    labelled train split, instead of a seeded sample (relpaths: the train split's files relative to its root, "/"
    separated; fastbyol finetune --subset with file names); resolve_dataset raises NoFileNames for other data.
    cache_dir: where derived files go when the data folder is not this user's to write (default $FASTBYOL_CACHE,
    ~/.cache/fastbyol).
    eval_images: decode the kNN images in this process (None: on rank 0 only); background: in a background thread
    (False: before the loader returns), with decode_threads threads."""

    image_size: int = 32
    skip_bad_files: bool = False
    seed: int = 0
    test_data: str = ""
    train_pick: Callable | None = None
    cache_dir: str | os.PathLike | None = None
    eval_images: bool | None = None
    max_eval_images: int = 10000
    background: bool = True
    decode_threads: int = 2

    def decodes_eval_images(self, ranks: Ranks) -> bool:
        """Whether this process decodes the kNN images: eval_images, or (None) whether it is rank 0."""
        return ranks.rank == 0 if self.eval_images is None else self.eval_images

    @property
    def hold_out(self) -> bool:
        """Whether an ImageFolder layout holds a share of its images out as the kNN test split (no --test-data)."""
        return not self.test_data
