"""The run directory as the trainer sees it: its files (`RunFiles`), the files replaced while training (`BadFiles`)
and the checkpoint taken at a save point (`Checkpointer`).

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

import torch

from ..version import __version__
from .checkpoint import (CHECKPOINT, FILE_MODE, WRITE_ERRORS, RunLock, atomic_write_bytes,  # noqa: F401
                         atomic_write_json, check_free_space, remove_stale_temporaries, save_checkpoint, write_error)
from ..config import Config, Resolved
from ..data.dataset import EncodedSource
from ..system.distributed import broadcast_object, gather_objects, global_mean
from ..errors import FastByolError
from .names import BAD_FILES, CONFIG, METRICS, SUMMARY, TENSORBOARD



class TrainingStopped(FastByolError):
    """The run stopped on purpose (non-finite loss or weights): its directory and last good checkpoint stay."""


class Preempted(TrainingStopped):
    """The run stopped on a signal at a log point, its checkpoint written (fastbyol.run.preemption): the CLI exits with
    EXIT_PREEMPTED."""


def _mapped(path: Path, write) -> None:
    """Run write(); its disk errors become one line naming path."""
    try:
        write()
    except FastByolError:
        raise
    except (OSError, RuntimeError) as e:
        mapped = write_error(e, path)
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
    except (OSError, ValueError):
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
            _mapped(self.path, lambda: atomic_write_json(self.path, sorted(self.names)))

    def new_count(self, dataset) -> int:
        """Files replaced while training that the dataset did not count already (kNN skips, earlier runs)."""
        knn_skipped = {name for name, _ in dataset.eval_skipped}
        return len(self.names - knn_skipped - self.known_before)


def _finite_flag(tensors: list[torch.Tensor]) -> torch.Tensor:
    """1.0 if every tensor is finite else 0.0, as a 0-D device tensor: one norm per tensor (foreach), one reduction."""
    tensors = [t for t in tensors if t.is_floating_point()]
    return torch.isfinite(torch.stack(torch._foreach_norm(tensors)).float()).all().float()


def last_good(run_dir: Path) -> str:
    if (run_dir / CHECKPOINT).exists():
        return f"the last good checkpoint is kept in {run_dir / CHECKPOINT} (lower --base-lr?)"
    return "no checkpoint was written before it: start again with a new --out (lower --base-lr?)"


class Checkpointer:
    """The checkpoint at a save point: every rank's data position and RNG state (collective), the checkpoint dict on
    rank 0. Refused (the run stops, the previous checkpoint stays) unless the weights, the BN statistics, the
    momentum and the recent losses are finite (export and eval refuse any non-finite tensor)."""

    def __init__(self, cfg: Config, state, model, optimizer, loader, meter, bad: BadFiles, run_dir: Path,
                 world_size: int, is_rank0: bool, probe=None):
        self.cfg, self.state, self.model, self.optimizer = cfg, state, model, optimizer
        self.probe = probe  # the online probe (its state travels in the checkpoint), or None
        self.loader, self.meter, self.bad, self.run_dir = loader, meter, bad, run_dir
        self.world_size, self.is_rank0 = world_size, is_rank0

    def __call__(self, finished: bool, loss_sum: torch.Tensor) -> dict | None:
        state, world_size = self.state, self.world_size
        state.data_states = gather_objects(self.loader.state(), world_size)
        self.bad.gather(self.loader, world_size, write=self.is_rank0)
        state.torch_rngs = gather_objects(torch.get_rng_state(), world_size)
        state.meter, state.finished = self.meter.state_dict(), finished
        state.probe = {} if self.probe is None else self.probe.state_dict()
        momentum = [s["momentum_buffer"] for s in self.optimizer.state.values() if "momentum_buffer" in s]
        flag = _finite_flag([*self.model.parameters(), *self.model.buffers(), *momentum, loss_sum])  # BN stats too
        if global_mean(flag, world_size) < 1.0:  # sync: at the save point; every rank takes the same decision
            raise TrainingStopped(f"the weights or the loss became non-finite by step {state.step}; "
                                  + last_good(self.run_dir))
        if not self.is_rank0:
            return None
        return state.to_checkpoint(self.model.state_dict(), self.optimizer.state_dict(), self.cfg.to_dict(),
                                   __version__)


class RunFiles:
    """The run directory, written by rank 0 only: the lock, config.json, metrics.jsonl (+ TensorBoard), checkpoint.pt
    and summary.json. Other ranks get an instance that writes nothing."""

    def __init__(self, run_dir: Path, writes: bool, log=print):
        self.dir, self.writes, self.log = run_dir, writes, log
        self.lock = self.metrics = self.board = None
        self.created = False  # this run made the folder
        self.owned = False  # the folder is this run's (new and empty, or resumed): it may clean up after itself

    def open(self, cfg: Config, plan: Resolved, resume_step: int | None, checkpoint_bytes: int, rank: int) -> None:
        """Take the lock, check the folder and its free space for a checkpoint, write config.json (new run) or cut
        metrics.jsonl back to the checkpoint's step (resume). Collective: every rank raises the FastByolError of
        rank 0 when the folder is not usable."""
        error = None
        if self.writes:
            try:
                self._open(cfg, plan, resume_step, checkpoint_bytes)
            except FastByolError as e:
                error = str(e)
        error = broadcast_object(error, rank, plan.world_size)
        if error:
            raise FastByolError(error)

    def _open(self, cfg: Config, plan: Resolved, resume_step: int | None, checkpoint_bytes: int) -> None:
        if self.dir.exists() and not self.dir.is_dir():
            raise FastByolError(f"--out {self.dir} is a file, not a folder")
        self.created = not self.dir.exists()
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise FastByolError(f"--out {self.dir}: cannot create it ({e.strerror})") from None
        if resume_step is None and any(p.name != RunLock.NAME or p.is_symlink() for p in self.dir.iterdir()):
            raise FastByolError(f"--out {self.dir} exists and is not empty: choose another folder")
        self.lock = RunLock(self.dir)
        if resume_step is None:
            if any(p.name != RunLock.NAME for p in self.dir.iterdir()):  # filled while the lock was taken
                self.lock.close()
                raise FastByolError(f"--out {self.dir} exists and is not empty: choose another folder")
            self.owned = True
            path = self.dir / CONFIG
            _mapped(path, lambda: atomic_write_json(path, {**cfg.to_dict(), "resolved": plan.to_dict()}))
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
            raise write_error(e, path) or FastByolError(f"{path}: cannot write it ({e.strerror})") from None
        self.metrics = os.fdopen(fd, "a", buffering=1)
        try:
            import tensorboard  # noqa: F401  (torch.utils.tensorboard needs it)
            from torch.utils.tensorboard import SummaryWriter

            self.board = SummaryWriter(log_dir=str(self.dir / TENSORBOARD))
        except ImportError:
            self.board = None

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
            except json.JSONDecodeError:
                record = None  # a line cut by the kill
            if not isinstance(record, dict) or not isinstance(record.get("step", 0), (int, float)):
                dropped += bool(line.strip())
                continue
            if record.get("step", 0) <= step and not record.get("final"):
                kept.append(line + "\n")
        if dropped:
            self.log(f"warning: {path}: {dropped} lines that are not metric records dropped")
        _mapped(path, lambda: atomic_write_bytes(path, lambda f: f.write("".join(kept).encode())))

    def write_metrics(self, **record) -> None:
        """One record to metrics.jsonl, and its numbers to TensorBoard (when installed): train/NAME, knn/..."""
        if self.metrics is None:
            return
        _mapped(self.dir / METRICS, lambda: self.metrics.write(json.dumps(record) + "\n"))
        if self.board is None:
            return
        for name, value in record.items():
            if name in ("step", "epoch", "knn_subset") or not isinstance(value, (int, float)) \
                    or isinstance(value, bool):
                continue
            if name == "knn_top1":
                tag = ("knn/top1_random_init" if record.get("init") == "random" else
                       "knn/top1_subset" if "knn_subset" in record else "knn/top1")
            elif name == "online_probe_top1":
                tag = "probe/top1" if record.get("final") else "probe/top1_subset"
            else:
                tag = f"train/{name}"
            self.board.add_scalar(tag, value, record["step"])

    def save(self, ckpt: dict | None) -> None:
        if self.writes and ckpt is not None:
            path = self.dir / CHECKPOINT
            _mapped(path, lambda: save_checkpoint(path, ckpt))

    def write_summary(self, summary: dict) -> None:
        if self.writes:
            path = self.dir / SUMMARY
            _mapped(path, lambda: atomic_write_json(path, summary))

    def close(self) -> None:
        for f in (self.metrics, self.board):
            if f is not None:
                try:
                    f.close()
                except OSError:  # the last buffered line could not be written: reported by the write itself
                    pass
        self.metrics = self.board = None
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
