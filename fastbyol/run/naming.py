"""Where a run's folder is and what it is called, and the command that continues a stopped run: plain functions of
the settings, no torch (the CLI asks them before anything loads).

    --out DIR     the folder itself
    --name NAME   runs/NAME
    neither       runs/DATA-PRESET-UTCTIME, e.g. runs/embedded-fmnist-tiny-20261204-093015 (the data first: runs of
                  one preset on different data are told apart by their names)
"""

from __future__ import annotations

import re
import shlex
from datetime import datetime, timezone
from pathlib import Path

RUNS = Path("runs")  # where named and default runs go, relative to the working folder


def data_label(spec: str) -> str:
    """A short name of --data for folder names: a dataset name as it is ('embedded'), a file's stem ('images' of
    images.npy), a folder's name ('imagenet'), a shard pattern's folder ('shards' of shards/train-{0..9}.tar)."""
    text = spec.strip().rstrip("/") or "data"
    path = Path(text)
    if "{" in path.name or path.suffix == ".tar":
        path = path.parent if path.parent.name else path
    label = path.stem if path.suffix in (".npy", ".npz", ".tar") else path.name
    label = re.sub(r"[^\w.+-]+", "-", label).strip("-.") or "data"
    return label[:40]


def default_run_name(data: str, preset: str, now: datetime | None = None) -> str:
    """DATA-PRESET-UTCTIME: the name of a run given neither --out nor --name."""
    now = now or datetime.now(timezone.utc)
    return f"{data_label(data)}-{preset}-{now.strftime('%Y%m%d-%H%M%S')}"


def chosen_run_dir(out: str, name: str) -> Path | None:
    """The folder --out or --name names (--out wins), or None: the trainer then makes the default name (once, on rank
    0, and hands it to the other ranks: one time stamp for all)."""
    if out:
        return Path(out)
    return RUNS / name if name else None


def run_dir_for(cfg, now: datetime | None = None) -> Path:
    """The folder of a new run of `cfg` (a fastbyol.config.Config): --out, runs/NAME, or runs/DATA-PRESET-UTCTIME.
    Under torchrun rank 0 asks and hands the answer to the other ranks (one time stamp for all)."""
    return chosen_run_dir(cfg.run.out, cfg.run.name) or RUNS / default_run_name(cfg.data.data, cfg.preset, now)


def continue_command(run_dir: Path, out: str, name: str) -> str:
    """What continues a stopped run, for the stop message: `--resume` always works; the same command only when it
    names its folder (--out or --name) and has --auto-resume (without them each command starts a new run)."""
    resume = f"`fastbyol train --resume {shlex.quote(str(run_dir))}`"
    if out or name:
        return f"{resume}, or the same command with --auto-resume, continues it"
    return f"{resume} continues it (the same command would start a new run: it names no --out or --name)"
