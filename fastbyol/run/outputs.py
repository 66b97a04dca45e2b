"""Who may write where: the lock every command takes before it writes a folder, and the run files nobody else writes.

    with FolderLock(dst, "fastbyol shards"):       # or one line: in use by another command (pid N)
        ...
    lock = claim_output(out, run_dir)              # export/plot/bench --out: None, or the run folder's lock

- One writer per folder. A command that writes into a folder (`fastbyol shards DST`; a run folder: train, the eval
  and finetune results, an export or a plot written into it) first takes the folder's lock (fastbyol.run.disk's
  FolderLock: flock on FOLDER/.lock, taken without waiting); a second writer is refused in one line naming the first
  one's pid. The OS drops the lock with its process, so a kill never leaves a folder locked. The run's own lock
  (RunLock) is this lock: a run and a command about it, or two of either, never write the folder at once.
- No command writes over another run's files. A folder holds a run when it holds a checkpoint or a fastbyol
  config.json (`holds_run`). An output inside such a folder is refused unless the command is about that run, and
  then it is never one of the run's own files (names.RUN_FILES, tensorboard/, profile/, hidden names);
  `fastbyol shards` never writes into a run.
- Caches (manifests, shard indexes, decoded.json) are built under a lock of their own that their readers wait for
  (every rank needs the result: fastbyol.data.cache.file_lock), by its holder or a child that inherits it.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import FastByolError
from .disk import FolderLock
from .names import CHECKPOINT, CONFIG, PROFILE, RUN_FILES, TENSORBOARD

CONFIG_SECTIONS = ("data", "model", "optim", "run")  # what makes a config.json fastbyol's


def holds_run(folder: Path) -> bool:
    """Whether `folder` holds a fastbyol run: a checkpoint, or a config.json with the config's sections."""
    folder = Path(folder)
    if (folder / CHECKPOINT).is_file():
        return True
    try:
        with open(folder / CONFIG, "rb") as f:
            raw = json.loads(f.read(1 << 20))
    except (OSError, ValueError):
        return False
    return isinstance(raw, dict) and all(section in raw for section in CONFIG_SECTIONS)


def run_around(path: Path) -> Path | None:
    """The nearest folder that holds a run among `path` (resolved) and the folders above it; None if none does."""
    path = Path(path).resolve()
    for folder in (path, *path.parents):
        if folder.is_dir() and holds_run(folder):
            return folder
    return None


def refuse_inside_run(folder: Path, flag: str = "", itself: bool = True) -> None:
    """One line when `folder` is (unless not `itself`: a run's own folder), or is inside, a run's folder (for a
    command that writes a folder of its own)."""
    run = run_around(folder if itself else Path(folder).resolve().parent)
    if run is not None:
        raise FastByolError(f"{flag + ' ' if flag else ''}{folder} is inside {run}, the folder of a fastbyol run: "
                            "choose a folder outside it")


def check_output(out: Path, run_dir: Path | None = None, flag: str = "--out") -> Path | None:
    """The run folder the file `out` would be written into (it must be `run_dir`, the run the command is about), or
    None when it is inside no run; one line when it is inside another run, or names one of the run's own files (or
    its tensorboard/, profile/, or a hidden name)."""
    target = Path(out).resolve()
    run = run_around(target)
    if run is None:
        return None
    if run_dir is None or run != Path(run_dir).resolve():
        raise FastByolError(f"{flag} {out} is inside {run}, another fastbyol run's folder: write it elsewhere")
    parts = target.relative_to(run).parts
    if not parts or parts[0] in RUN_FILES or parts[0] in (TENSORBOARD, PROFILE) or parts[0].startswith("."):
        raise FastByolError(f"{flag} {out} is a file of the run {run}: give another name")
    return run


def claim_output(out: Path, run_dir: Path | None = None, flag: str = "--out") -> FolderLock | None:
    """check_output, then the lock of the run folder `out` goes into (hold it while writing), or None."""
    run = check_output(out, run_dir, flag)
    return None if run is None else FolderLock(run)
