"""Image folders (JPEG or PNG): listed and checked once into a manifest (manifest.py), read by DALI from a file list.

Layouts:
- labeled: ROOT/train/<class>/** and ROOT/test/<class>/** or, without test/, ROOT/val/<class>/** (ImageNet's)
  (labels from the sorted class-folder names of train/; a test class without a train folder is refused, naming it);
  ROOT/unlabeled/** is added to the pretraining set;
- classes (torchvision's ImageFolder): ROOT/<class>/** with at least two class folders and no image in ROOT itself:
  labelled by folder; every 10th image of each class (sorted; fewer above 100,000 images, about 10,000 in all) is
  held out of pretraining as the kNN test split, or `test_data` (--test-data) names a folder of class folders that
  is the test split instead;
- unlabeled: any other folder: every image below it, recursively, pretrains (no kNN).
Hidden files and folders (a leading dot) are never data; ROOT/.fastbyol holds the manifest.

Every file is checked structurally first (checks.py: JPEG header segments and end marker, PNG chunks and CRCs): a
bad file raises FastByolError naming it, or, with skip_bad_files, is left out and counted. The pretraining source is
a FileList backed by the manifest's DALI file list (each rank's reader reads it: no per-process list of paths).

The kNN monitor needs decoded pixels: the labeled splits are decoded at the view size (shorter side resized, centre
crop), at most `max_eval_images` of each split (a seeded subset beyond that), in a background thread (decode.py).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import FastByolError
from . import manifest as mf
from .cache import own_file
from .checks import IMAGE_SUFFIXES
from .decode import BackgroundDecode, decode_splits, file_item
from .request import DataRequest, Ranks


@dataclass(frozen=True)
class ListFile:
    """A DALI file list written from a manifest: `count` lines "relative/path label", the paths relative to `root`,
    read by DALI itself (no per-process list of paths). labelled: every line's label is its file's class (a labelled
    folder without unlabeled/: the reader's label output can feed the online probe); else a label is 0 where a file
    has none."""

    root: str
    path: str
    count: int
    labelled: bool = False


class FileList:
    """Encoded images the training pipeline decodes, one file per sample: an explicit list of paths (`files`, with
    `labels` or None), or a manifest's DALI file list (`listed`, a ListFile).

    The encoded-source contract (shared with the tar-shard source): `dali_reader(shard_id, num_shards)` inside a DALI
    pipeline definition, `len()`, `labels` (int64 or None), `labelled` and `where` (for error messages)."""

    def __init__(self, files: list[str] | None = None, labels: np.ndarray | None = None, where: str = "", *,
                 listed: ListFile | None = None, skip_bad: bool = False):
        if (files is None) == (listed is None):
            raise ValueError("FileList needs either files or listed (a ListFile)")
        self._files = files
        self.labels = labels  # (N,) int64, or None for unlabeled files
        self.root, self.list_file = (None, None) if listed is None else (listed.root, listed.path)
        self.labelled = labels is not None or (listed is not None and listed.labelled)
        self._count = len(files) if files is not None else int(listed.count)
        if not where:
            where = str(Path(files[0]).parent.parent) if files else (self.root or "(no files)")
        self.where = where  # the folder the files came from, for error messages
        self.skip_bad = skip_bad  # the training pipeline may stand another file in for one it cannot decode
        self.source_list = self.list_file  # the manifest's; list_file becomes this process's own copy once one is bad
        self.bad: list[str] = []  # files replaced so far (as failed_sample names them), in the order found

    def __len__(self) -> int:
        return self._count

    @property
    def files(self) -> list[str]:
        """Absolute paths (read from the list file on first use: the training pipeline never needs them)."""
        if self._files is None:
            with open(self.list_file, "rb") as f:
                lines = f.read().decode("utf-8", "surrogateescape").splitlines()
            self._files = [os.path.join(self.root, ln.rsplit(" ", 1)[0]) for ln in lines]
        return self._files

    def replace_bad(self, *names: str) -> bool:
        """Stand a good file in for each of `names` (files DALI could not decode, as failed_sample names them: the
        root joined with the list's relative path, or an entry of `files`), in this process's own copy of the list:
        every line of a bad file takes the line of the nearest earlier file not known bad (the nearest later one for
        the first lines). The list keeps its length and order, so the reader's positions, epochs, shards and DALI's
        checkpoint stay valid; the manifest's list, and the data, are never written. False (nothing changed) if a
        name is not in the list or no good file would be left. Takes effect in the next pipeline built."""
        new = [n for n in names if n not in self.bad]
        if not new:
            return True
        bad = set(self.bad) | set(new)
        if self.source_list is None:  # an explicit list: substituted in memory (files, labels)
            original = getattr(self, "_original", None) or (list(self._files),
                                                              None if self.labels is None else self.labels.copy())
            if not set(new) <= set(original[0]):
                return False
            pick = stand_ins([f in bad for f in original[0]])
            if pick is None:
                return False
            self._original = original
            self._files = [original[0][j] for j in pick]
            if self.labels is not None:
                self.labels = original[1][np.asarray(pick, dtype=np.int64)]
        else:
            if not self._write_own_list(bad, set(new)):
                return False
            self._files = None  # re-read from the new list when asked
            _record_undecodable(Path(self.source_list).parent, self.root, new)
        self.bad += new
        return True

    def _relative(self, name: str) -> bytes:
        rel = os.path.relpath(name, self.root) if os.path.isabs(name) else name
        return rel.encode("utf-8", "surrogateescape")

    def _write_own_list(self, bad: set[str], new: set[str]) -> bool:
        """Write this process's own file list: the manifest's, every line of a file in `bad` replaced (see
        replace_bad). Two passes over the list (bounded memory); False if a name in `new` is not listed."""
        bad_rel = {self._relative(n) for n in bad}
        with open(self.source_list, "rb") as f:
            flags = [ln.rsplit(b" ", 1)[0] in bad_rel for ln in f]
        with open(self.source_list, "rb") as f:
            present = {ln.rsplit(b" ", 1)[0] for ln in f} & {self._relative(n) for n in new}
        if len(present) != len(new):
            return False
        pick = stand_ins(flags)
        if pick is None:
            return False
        own = getattr(self, "_own_list", None)
        if own is None:
            own = self._own_list = own_file(self, ".list")
        with open(self.source_list, "rb") as f:
            lines = f.readlines() if len(pick) <= 65536 else None
        if lines is None:  # large lists: the lines that stand in, then one streaming pass
            wanted = {j for i, j in enumerate(pick) if j != i}
            with open(self.source_list, "rb") as f:
                stand_in = {j: ln for j, ln in enumerate(f) if j in wanted}
            with open(self.source_list, "rb") as f, open(own, "wb") as out:
                for i, ln in enumerate(f):
                    out.write(ln if pick[i] == i else stand_in[pick[i]])
        else:
            with open(own, "wb") as out:
                out.write(b"".join(lines[j] for j in pick))
        self.list_file = own
        return True

    def dali_reader(self, shard_id: int, num_shards: int, name: str = "reader"):
        """(encoded bytes, int64 label node or None): this shard's part, reshuffled after every epoch; the label
        node where `labels` is set.

        Call inside a DALI pipeline definition; `name` is the reader's name for epoch_size / checkpointing."""
        encoded, raw = self.dali_read(shard_id, num_shards, name, labels=self.labels is not None)
        return encoded, (None if raw is None else self.dali_label(raw))

    def dali_read(self, shard_id: int, num_shards: int, name: str = "reader", labels: bool = False):
        """(encoded bytes, the reader's int32 label output where `labels` and the files are `labelled`, else None):
        the reader alone (fn.readers.file emits a label either way: the reader is the same)."""
        from nvidia.dali import fn

        if self._files is None:
            encoded, label = fn.readers.file(file_root=self.root, file_list=self.list_file, shard_id=shard_id,
                                             num_shards=num_shards, shuffle_after_epoch=True, name=name)
        else:
            values = None if self.labels is None else [int(v) for v in self.labels]
            encoded, label = fn.readers.file(files=self._files, labels=values, shard_id=shard_id,
                                             num_shards=num_shards, shuffle_after_epoch=True, name=name)
        return encoded, (label if labels and self.labelled else None)

    @staticmethod
    def dali_label(raw):
        from nvidia.dali import fn, types

        return fn.cast(raw, dtype=types.INT64)


UNDECODABLE = "undecodable.json"  # beside the manifest: files DALI could not decode ([relpath, *cache.identity])


def _record_undecodable(location: Path, root: str, names: list[str]) -> None:
    """Add files that passed the checks but that DALI could not decode to location/undecodable.json (under its
    lock, whole or untouched), so the next run knows them before it starts (load_image_folder)."""
    from .cache import atomic_write_bytes, file_lock, identity

    try:
        with file_lock(location / "undecodable.lock"):
            entries = _read_undecodable(location)
            known = {e[0] for e in entries}
            for name in names:
                rel = os.path.relpath(name, root)
                if rel in known:
                    continue
                entries.append([rel, *identity(os.stat(os.path.join(root, rel)))])
            atomic_write_bytes(location / UNDECODABLE, json.dumps(entries).encode())
    except OSError:
        pass  # a read-only manifest folder: this run still replaces them; the next one finds them again


def _read_undecodable(location: Path) -> list[list]:
    try:
        entries = json.loads((location / UNDECODABLE).read_text())
    except (OSError, ValueError, RecursionError):
        return []
    return [e for e in entries if isinstance(e, list) and len(e) == 5 and isinstance(e[0], str)
            and all(isinstance(x, int) for x in e[1:])] if isinstance(entries, list) else []


def known_undecodable(location: Path, root: Path) -> list[str]:
    """Relative paths recorded in undecodable.json whose file is unchanged since (cache.identity), of files inside
    `root` (a record naming another path is ignored)."""
    from .cache import identity

    out = []
    for rel, *recorded in _read_undecodable(location):
        if os.path.isabs(rel) or ".." in rel.split("/"):
            continue
        try:
            st = os.stat(root / rel)
        except OSError:
            continue
        if list(identity(st)) == recorded:
            out.append(rel)
    return out


def stand_ins(bad: list[bool]) -> list[int] | None:
    """For each position, the position read there: itself when good, else the nearest earlier good one (the first
    good one for bad positions before it); None when none is good."""
    good = [i for i, b in enumerate(bad) if not b]
    if not good:
        return None
    pick, last = [], good[0]
    for i, b in enumerate(bad):
        if not b:
            last = i
        pick.append(last)
    return pick


def is_image_folder(root: Path) -> bool:
    if (root / "train").is_dir():
        return True
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        if any(os.path.splitext(f)[1].lower() in IMAGE_SUFFIXES for f in filenames):
            return True
    return False


def _eval_subset(man: mf.Manifest, split: int, max_images: int, rng: np.random.Generator) -> np.ndarray:
    idx = man.indices(split)
    if len(idx) > max_images:
        idx = idx[np.sort(rng.choice(len(idx), max_images, replace=False))]
    return idx


def _picked(man: mf.Manifest, pick) -> np.ndarray:
    """The train files `pick` chooses, given their paths relative to the train folder ("/"-separated: train/ of the
    labelled layout, the root of the ImageFolder layout), in manifest order."""
    idx = man.indices(mf.TRAIN)
    relpaths = [man.path(int(i)).replace(os.sep, "/") for i in idx]
    if man.layout == "labeled":
        relpaths = [r.split("/", 1)[1] for r in relpaths]
    return idx[pick(relpaths)]


def _test_folder(classes: list[str], request: DataRequest, ranks: Ranks,
                 rng: np.random.Generator) -> tuple[list, np.ndarray]:
    """(file items, labels) of --test-data (request.test_data): a folder of class folders (ROOT/<class>/, all of it
    the test split), its classes matched to the training classes by name (one it lacks refused), at most the
    request's max_eval_images (seeded)."""
    test_root = Path(request.test_data)
    man, _, _ = mf.obtain(test_root, rank=ranks.rank, world_size=ranks.world_size, barrier=ranks.barrier,
                          cache_dir=request.cache_dir, hold_out=False)
    if man.layout != "classes":
        raise FastByolError(f"--test-data {test_root}: expected class folders (ROOT/<class>/<image>)")
    if man.bad:
        raise FastByolError(f"{man.root / man.bad[0][0]}: {man.bad[0][1]} (in --test-data)")
    index = {c: k for k, c in enumerate(classes)}
    missing = [c for c in man.classes if c not in index]
    if missing:
        raise FastByolError(f"--test-data {test_root}: class folders {', '.join(missing[:5])} are not classes of "
                            "the training data, so kNN could never predict them")
    idx = _eval_subset(man, mf.TRAIN, request.max_eval_images, rng)
    labels = np.asarray([index[man.classes[k]] for k in man.labels[idx].tolist()], np.int64)
    return [file_item(str(man.root / man.path(int(i)))) for i in idx], labels


def load_image_folder(root: Path, request: DataRequest, ranks: Ranks | None = None):
    """An ImageDataset whose pretraining set is a FileList of the folder's manifest (decoded by the training pipeline).

    ranks: who builds the manifest (manifest.obtain; default rank 0 of 1). From the request: the kNN splits are
    decoded here when it decodes_eval_images(ranks), at its image_size, at most max_eval_images of each (a sample
    seeded by its seed), or the train split its train_pick picks; its test_data is a folder of class folders whose
    images are the test split (then an ImageFolder layout holds none out of pretraining)."""
    from .dataset import ImageDataset, PendingSplits, Startup

    root, ranks = Path(root), Ranks() if ranks is None else ranks
    skip_bad_files, test_data = request.skip_bad_files, request.test_data
    man, seconds, status = mf.obtain(root, rank=ranks.rank, world_size=ranks.world_size, barrier=ranks.barrier,
                                     cache_dir=request.cache_dir, hold_out=request.hold_out)
    root = man.root
    if man.bad and not skip_bad_files:
        rel, why = man.bad[0][0], man.bad[0][1]
        more = f"; {len(man.bad) - 1} more bad files" if len(man.bad) > 1 else ""
        raise FastByolError(f"{root / rel}: {why} (--skip-bad-files leaves such files out and counts them{more})")
    if man.test_only_classes:
        names = ", ".join(man.test_only_classes[:5]) + (" ..." if len(man.test_only_classes) > 5 else "")
        raise FastByolError(f"{root / man.test_dir}: class folders {names} have no train/ folder, so kNN could never "
                            "predict them: remove them or add train/<class>")
    n_train, n_test = len(man.indices(mf.TRAIN)), len(man.indices(mf.TEST))
    if man.layout == "labeled":
        if n_train == 0:
            raise FastByolError(f"{root / 'train'}: no images in its class folders")
        if man.test_dir and n_test == 0:
            raise FastByolError(f"{root / man.test_dir}: no images in its class folders")
    elif n_train == 0:
        raise FastByolError(f"{root}: no JPEG or PNG images")
    n_pretrain = int(man.pretrain_mask.sum())
    # files that passed the checks but that DALI could not decode in an earlier run (undecodable.json)
    undecodable = known_undecodable(man.location, root)
    if undecodable and not skip_bad_files:
        raise FastByolError(f"{root / undecodable[0]}: does not decode (found by an earlier run; --skip-bad-files "
                            "replaces such files and counts them)")
    # the list's labels are real classes when no unlabeled/ file is among the pretraining files (online probe)
    labeled = man.layout in ("labeled", "classes")  # train/<class>/, or torchvision's ROOT/<class>/
    list_labelled = labeled and not bool((man.split == mf.UNLABELED).any())
    listed = ListFile(str(root), str(man.location / mf.LIST_NAME), n_pretrain, list_labelled)
    pretrain = FileList(None, None, str(root), listed=listed, skip_bad=skip_bad_files)
    undecodable_names = {str(root / rel) for rel in undecodable}
    if undecodable and not pretrain.replace_bad(*undecodable_names):  # some of them are test files
        for name in undecodable_names:
            pretrain.replace_bad(name)
    rng = np.random.default_rng(request.seed)
    if labeled:
        max_images = request.max_eval_images
        train_idx = _eval_subset(man, mf.TRAIN, max_images, rng)  # drawn either way: the same test sample
        test_idx = _eval_subset(man, mf.TEST, max_images, rng) if n_test else None
        if request.train_pick is not None:
            train_idx = _picked(man, request.train_pick)
    else:  # unlabeled: a few decoded images stand in for shapes and logs
        train_idx, test_idx = np.arange(min(n_pretrain, 64)), None
    if undecodable_names:  # not decoded again (already counted)
        train_idx = np.asarray([i for i in train_idx.tolist()
                                if str(root / man.path(i)) not in undecodable_names], np.int64)
        if test_idx is not None:
            test_idx = np.asarray([i for i in test_idx.tolist() if str(root / man.path(i)) not in undecodable_names],
                                  np.int64)
    root_s = str(root)  # os.path.join, not pathlib: 20,000 paths at every start
    train_items = [file_item(os.path.join(root_s, man.path(i))) for i in train_idx.tolist()]
    test_items = None if test_idx is None else [file_item(os.path.join(root_s, man.path(i))) for i in test_idx.tolist()]
    train_y = man.labels[train_idx].astype(np.int64) if labeled else None
    test_y = None if test_idx is None else man.labels[test_idx].astype(np.int64)
    if test_data:  # the test split from a folder of its own
        if not labeled:
            raise FastByolError(f"--test-data {test_data}: --data {root} has no class folders to match its classes")
        test_items, test_y = _test_folder(man.classes, request, ranks, rng)
        n_test = len(test_items)

    location = man.location  # the job keeps this, not the manifest's arrays

    def job(cancel):
        decoded = decode_splits(train_items, train_y, test_items, test_y, request.image_size, request.decode_threads,
                                skip_bad_files, cancel)
        if status == "fresh":  # files rewritten in place since the manifest (start-up checked only a sample)
            now_bad = mf.verify_files(location, root)
            if now_bad:
                raise FastByolError(f"{root / now_bad[0][0]}: {now_bad[0][1]} (changed since the manifest was "
                                    "written; the next run rescans the folder)")
        return decoded

    origin = str(root) + (f" (class folders; every {man.held_out_every}th image of a class held out as the kNN "
                          "test split)" if man.held_out_every else f"; test images from {test_data}" if test_data
                          else "")
    num_classes, gray = len(man.classes) if labeled else 0, bool(man.gray[man.pretrain_mask].all())
    n_bad = len(man.bad) + len(undecodable)
    del man  # ~60 bytes a file: not kept beyond start-up
    pending = BackgroundDecode(job, request.background) if request.decodes_eval_images(ranks) else None
    splits = PendingSplits(pending, request.image_size, (n_train, n_test), labeled and n_test > 0)
    return ImageDataset(root.name, splits, num_classes, origin, pretraining=pretrain, gray=gray,
                        startup=Startup(n_bad, seconds, status))
