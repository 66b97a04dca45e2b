"""The run directory as the trainer writes it: its files (`RunFiles`: the lock, config.json, metrics.jsonl, the
checkpoint, summary.json) and the files replaced while training (`BadFiles`).

Rank 0 alone writes; the other ranks get objects that write nothing but take part in the collectives. Nothing in the
folder is followed: the lock and metrics.jsonl are opened with O_NOFOLLOW, temporary files with O_EXCL (mkstemp).
A write that fails for lack of space, a read-only or full quota, or permissions ends as one line naming the file.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

from ..config import Config, Resolved
from ..data.dataset import EncodedSource
from ..errors import FastByolError
from ..system.distributed import broadcast_object, gather_objects
from .checkpoint import RUN_ID_KEY, save_checkpoint
from .disk import (FILE_MODE, RunLock, atomic_write_bytes, atomic_write_json, check_free_space, describe_write_error,
                   remove_stale_temporaries)
from .names import BAD_FILES, CHECKPOINT, CONFIG, LOCK, METRICS, SUMMARY


def write_or_say(path: Path, write) -> None:
    """Run write(); its disk errors become one line naming path."""
    try:
        write()
    except FastByolError:
        raise
    except (OSError, RuntimeError) as e:
        mapped = describe_write_error(e, path)
        if mapped is None:
            raise
        raise mapped from None


def check_out_outside_data(run_dir: Path, data: str | None, data_format: str = "auto") -> None:
    """Refuse a run folder inside an image folder (or a folder of tar shards) given as --data: such a folder reads
    every file below it, so the run's own files would be listed (its checkpoint a "bad image") and change the data of
    its resume. Folders of fixed files (idx, CIFAR, STL10) read only their own files: a run folder beside them is
    harmless."""
    if not data or not Path(data).is_dir():
        return
    if data_format == "auto":
        from ..data import detect_format

        try:
            data_format = detect_format(Path(data))
        except FastByolError:
            data_format = "folder"  # not recognisable: it may become an image folder, so no run inside it
    if data_format in ("idx", "cifar", "stl10", "numpy"):
        return
    out, root = Path(run_dir).resolve(), Path(data).resolve()
    if out == root or root in out.parents:
        raise FastByolError(f"--out {run_dir} is inside --data {data}: the run's files would become part of the "
                            "image folder; choose a folder outside it")


def read_bad_files(run_dir: Path) -> list[str]:
    """The names in run_dir/bad_files.json ([] when absent or unreadable: the pipeline then finds them again)."""
    try:
        names = json.loads((run_dir / BAD_FILES).read_text())
    except (OSError, ValueError, RecursionError):
        return []
    return [n for n in names if isinstance(n, str)] if isinstance(names, list) else []


class BadFiles:
    """The files that passed the checks but that the training pipeline could not decode (--skip-bad-files): found
    by this run or recorded by an earlier one in RUN/bad_files.json (rank 0 reads it), and those the dataset itself
    replaced before (its own `bad` list, counted in its `skipped_files` already).

    On resume the recorded ones are replaced before the pipeline starts; the batches are the same either way (the
    replacement rule depends on the file list alone), this only keeps the count and spares rebuilding the pipeline."""

    def __init__(self, run_dir: Path, source, skip_bad_files: bool, resumed: bool, rank: int, world_size: int):
        self.path = Path(run_dir) / BAD_FILES
        self.encoded = isinstance(source, EncodedSource)
        self.known_before = set(source.bad) if self.encoded else set()
        self.names = set(broadcast_object(read_bad_files(run_dir) if rank == 0 and resumed else [], rank, world_size))
        if self.names and skip_bad_files and self.encoded:
            self.names = {name for name in self.names if source.replace_bad(name)}

    def gather(self, loader, world_size: int, write: bool) -> None:
        """Add every rank's files replaced so far (collective) and record them (rank 0) before a checkpoint, so that
        a resume from it knows them all."""
        for names in gather_objects([name for name, _ in loader.skipped], world_size):
            self.names.update(names)
        if write and self.names:
            write_or_say(self.path, lambda: atomic_write_json(self.path, sorted(self.names)))

    def new_count(self, dataset) -> int:
        """Files replaced while training that the dataset did not count already (kNN skips, earlier runs)."""
        knn_skipped = {name for name, _ in dataset.eval_skipped}
        return len(self.names - knn_skipped - self.known_before)


class RunFiles:
    """The run directory, written by rank 0 only: the lock, config.json, metrics.jsonl, checkpoint.pt and summary.json.
    Other ranks get an instance that writes nothing."""

    def __init__(self, run_dir: Path, writes: bool, log=print):
        self.dir, self.writes, self.log = run_dir, writes, log
        self.lock = self.metrics = None
        self.created = False  # this run made the folder
        self.owned = False  # the folder is this run's (new and empty, or resumed): it may clean up after itself

    def open(self, cfg: Config, plan: Resolved, resume_step: int | None, checkpoint_bytes: int, rank: int,
             run_id: str = "") -> None:
        """Take the lock, check the folder and its free space for a checkpoint, write config.json with the run's id
        (new run) or cut metrics.jsonl back to the checkpoint's step (resume). Collective: every rank raises the
        FastByolError of rank 0 when the folder is not usable."""
        error = None
        if self.writes:
            try:
                self._open(cfg, plan, resume_step, checkpoint_bytes, run_id)
            except FastByolError as e:
                error = str(e)
        error = broadcast_object(error, rank, plan.world_size)
        if error:
            raise FastByolError(error)

    def _open(self, cfg: Config, plan: Resolved, resume_step: int | None, checkpoint_bytes: int,
              run_id: str) -> None:
        if self.dir.exists() and not self.dir.is_dir():
            raise FastByolError(f"--out {self.dir} is a file, not a folder")
        self.created = not self.dir.exists()
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise FastByolError(f"--out {self.dir}: cannot create it ({e.strerror})") from None
        if resume_step is None and any(p.name != LOCK or p.is_symlink() for p in self.dir.iterdir()):
            raise FastByolError(f"--out {self.dir} exists and is not empty: choose another folder")
        self.lock = RunLock(self.dir)
        if resume_step is None:
            if any(p.name != LOCK for p in self.dir.iterdir()):  # filled while the lock was taken
                self.lock.close()
                raise FastByolError(f"--out {self.dir} exists and is not empty: choose another folder")
            self.owned = True
            path = self.dir / CONFIG
            write_or_say(path, lambda: atomic_write_json(path, {RUN_ID_KEY: run_id, **cfg.to_dict(),
                                                                "resolved": plan.to_dict()}))
        else:
            remove_stale_temporaries(self.dir)
            self._truncate_metrics(resume_step)
        check_free_space(self.dir, checkpoint_bytes + (1 << 20))
        path = self.dir / METRICS
        try:  # line-buffered appends; a symbolic link in its place is not followed
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, FILE_MODE)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise FastByolError(f"{path} is a symbolic link: not followed; remove it") from None
            raise describe_write_error(e, path) or FastByolError(f"{path}: cannot write it ({e.strerror})") from None
        self.metrics = os.fdopen(fd, "a", buffering=1)

    def _truncate_metrics(self, step: int) -> None:
        """Drop the records after the checkpoint's step: the resumed run writes them again. Lines that are not
        records (cut by a kill, or edited) are dropped with a warning."""
        path = self.dir / METRICS
        if path.is_symlink():
            raise FastByolError(f"{path} is a symbolic link: not followed; remove it")
        if not path.is_file():
            return
        kept, dropped = [], 0
        for line in path.read_text(errors="replace").splitlines():
            try:
                record = json.loads(line)
            except (json.JSONDecodeError, RecursionError):
                record = None  # a line cut by the kill (or too deeply nested to be a record)
            if not isinstance(record, dict) or not isinstance(record.get("step", 0), (int, float)):
                dropped += bool(line.strip())
                continue
            if record.get("step", 0) <= step and not record.get("final"):
                kept.append(line + "\n")
        if dropped:
            self.log(f"warning: {path}: {dropped} lines that are not metric records dropped")
        write_or_say(path, lambda: atomic_write_bytes(path, lambda f: f.write("".join(kept).encode())))

    def write_metrics(self, record: dict) -> None:
        """One record to metrics.jsonl (a line, flushed)."""
        if self.metrics is not None:
            write_or_say(self.dir / METRICS, lambda: self.metrics.write(json.dumps(record) + "\n"))

    def save(self, ckpt: dict | None) -> None:
        if self.writes and ckpt is not None:
            path = self.dir / CHECKPOINT
            write_or_say(path, lambda: save_checkpoint(path, ckpt))

    def write_summary(self, summary: dict) -> None:
        if self.writes:
            path = self.dir / SUMMARY
            write_or_say(path, lambda: atomic_write_json(path, summary))

    def close(self) -> None:
        if self.metrics is not None:
            try:
                self.metrics.close()
            except OSError:  # the last buffered line could not be written: reported by the write itself
                pass
        self.metrics = None
        if self.lock is not None:
            self.lock.close()
            self.lock = None

    def remove_if_unfinished(self) -> None:
        """A run that stops before its first checkpoint leaves nothing behind."""
        if not (self.writes and self.owned) or (self.dir / CHECKPOINT).exists():
            return
        if self.created:
            shutil.rmtree(self.dir, ignore_errors=True)
        else:  # the folder was there (empty) before: empty it again
            for p in self.dir.iterdir():
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)
