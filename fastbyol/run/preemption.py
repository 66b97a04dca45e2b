"""Preemption and automatic restart, beside the run directory: the stop signals, the loop's "stop now?" question,
and the decision `--auto-resume` takes about an `--out` folder.

    fastbyol train --out RUN --auto-resume ...      # the same command starts, continues, or refuses RUN

- Signals: SIGTERM, SIGUSR1 and SIGINT (`install_stop_handlers`) only set a flag. The loop asks `StopCheck.now()` at
  its log points, which every rank reaches at the same step; with several processes the flag goes through one
  all-reduce (MAX) of a 1-element host tensor over the bookkeeping's gloo group (fastbyol.system.distributed, bounded
  by --dist-timeout): host memory only, no device sync, no more often than the log points. When any rank saw a
  signal, every rank stops at that log point, the checkpoint is written (atomically: a second signal during it is
  ignored, and even SIGKILL leaves the previous file), and the process exits with EXIT_PREEMPTED (75, EX_TEMPFAIL:
  "try again"), which a scheduler tells from a failure (1) and from a refusal of the settings (2).
- `--auto-resume` (`auto_resume_decision`): an empty or missing folder starts a new run; a folder whose
  config.json has the same settings and a checkpoint is continued exactly; one with the same settings and no
  checkpoint yet (a new run killed before its first checkpoint: SIGKILL leaves its config.json and metrics) is
  cleared of those files, under the run's lock, and started again; other settings (any section: the augmentation
  settings change the views) or another device than the one `--device auto` gave the run are refused in one line
  naming them; a finished run is reported and left alone (exit 0).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from ..config import SECTIONS, Config, flag_name
from ..errors import FastByolError
from ..system.signals import stop_signal
from .names import BEFORE_FIRST_CHECKPOINT, CHECKPOINT, CONFIG, LOCK, SUMMARY

# torch (and the modules that load it) is imported where it is used: the CLI installs the handlers before torch loads
EXIT_PREEMPTED = 75  # sysexits EX_TEMPFAIL: stopped on a signal with a checkpoint written; run the command again


class StopCheck:
    """The loop's question at a log point: did a stop signal reach any rank? Every rank calls `now()` at the same
    log points (with several processes it is a collective)."""

    def __init__(self, world_size: int):
        import torch

        from ..system.distributed import control_group

        self.world_size = world_size
        self.group = None
        if world_size > 1 and torch.distributed.is_initialized():  # host tensors, apart from NCCL's stream: the
            # bookkeeping's gloo group (its collectives bounded by --dist-timeout), or a gloo group of its own
            self.group = control_group() or torch.distributed.new_group(backend="gloo")
        self._flag = torch.zeros(1, dtype=torch.int32)  # host memory: no device is involved

    def now(self) -> bool:
        import torch

        local = stop_signal() is not None
        if self.group is None:
            return local
        self._flag.fill_(int(local))
        torch.distributed.all_reduce(self._flag, op=torch.distributed.ReduceOp.MAX, group=self.group)
        return bool(self._flag.numpy()[0])  # a host tensor: no device sync

    def stopped(self, step: int, total_steps: int, run_dir: Path):
        """The exception that ends the run after the stop checkpoint (`Preempted`), naming the command that continues
        this run (from its config.json: whether the command named its folder)."""
        from ..errors import Preempted
        from .naming import continue_command

        try:
            run = json.loads((Path(run_dir) / CONFIG).read_text())["run"]
            out, name = str(run.get("out") or ""), str(run.get("name") or "")
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            out, name = "", ""
        return Preempted(f"stopped by {stop_signal() or 'a signal on another process'} at step {step} of "
                         f"{total_steps}, checkpoint written to {Path(run_dir) / CHECKPOINT}; "
                         + continue_command(Path(run_dir), out, name))


# ------------------------------------------------------------------------------------------------ the restart decision
def _setting_differences(saved: Config, wanted: Config, run_dir: Path | None = None) -> list[str]:
    """'--flag X (the run: Y)' for each setting that differs, in every section (the augmentation's too: they change
    the views, and a resume would silently keep the run's), the output folder and name left out (it is the same
    folder), --data and --test-data compared as absolute paths (a run records them so); and the device 'auto'
    resolves to here, when the run resolved it to another (other views, other kernels)."""
    from ..data import absolute_data_spec

    diffs = [] if saved.preset == wanted.preset else [f"--preset {wanted.preset} (the run: {saved.preset})"]
    for section in SECTIONS:
        a, b = dict(getattr(saved, section).__dict__), dict(getattr(wanted, section).__dict__)
        if section == "data":
            for key in ("data", "test_data"):
                a[key], b[key] = absolute_data_spec(a[key]), absolute_data_spec(b[key])
        diffs += [f"{flag_name(name)} {b[name]!r} (the run: {a[name]!r})" for name in a
                  if name not in ("out", "name") and a[name] != b[name]]
    if run_dir is not None and not diffs:
        ran_on, here = _resolved(run_dir).get("device"), _device_here(wanted.run.device)
        if isinstance(ran_on, str) and ran_on != here:
            diffs.append(f"the device {here} (the run: {ran_on})")
    return diffs


def _device_here(device: str) -> str:
    """The device type a run with --device `device` gets on this machine (fastbyol.train.pick_device)."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _saved_config(run_dir: Path) -> Config:
    path = run_dir / CONFIG
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise FastByolError(f"{path}: unreadable config ({type(e).__name__}); --auto-resume cannot tell whose run "
                            "this is: choose another --out") from None
    return Config.from_dict(raw, where=str(path))


def auto_resume_decision(cfg: Config, rank: int = 0, log=print) -> Path | None:
    """What `--auto-resume` does with cfg.run.out: the run directory to resume, None to start a new run there, or
    FastByolError (settings differ, or the folder is not a fastbyol run). Finished runs raise `AlreadyFinished`.
    Rank 0 alone clears a new run's leftovers (or refuses the folder: the group then fails as one); the other ranks
    start a new run where there is no checkpoint, and otherwise take rank 0's decision from the same files (nothing
    writes a checkpoint before every rank has joined the process group)."""
    from .naming import chosen_run_dir

    run_dir = chosen_run_dir(cfg.run.out, cfg.run.name)
    if run_dir is None:
        raise FastByolError("--auto-resume needs --out or --name (the folder the same command finds again)")
    if not run_dir.is_dir() or not any(p.name != LOCK for p in run_dir.iterdir()):
        return None  # missing or empty: a new run (RunFiles.open refuses a file in its place)
    if rank != 0 and not (run_dir / CHECKPOINT).is_file():
        return None  # rank 0 clears, starts or refuses this folder; reading it meanwhile would race with it
    if not (run_dir / CONFIG).is_file():
        raise FastByolError(f"--out {run_dir} exists, is not empty and holds no fastbyol run (no config.json): "
                            "choose another folder")
    diffs = _setting_differences(_saved_config(run_dir), cfg, run_dir)
    if diffs:
        raise FastByolError(f"--auto-resume: {run_dir} holds a run with other settings: " + ", ".join(diffs))
    if not (run_dir / CHECKPOINT).is_file():
        _clear_unstarted(run_dir)
        log(f"restarting {run_dir}: it stopped before its first checkpoint")
        return None
    from .checkpoint import check_run_identity, load_checkpoint
    from .state import TrainState

    # the checkpoint's state checked, and its run's id against config.json's: another run's checkpoint copied in is
    # neither resumed nor reported finished
    state = TrainState.from_checkpoint(load_checkpoint(run_dir / CHECKPOINT), where=str(run_dir / CHECKPOINT))
    check_run_identity(json.loads((run_dir / CONFIG).read_text()), state, str(run_dir))
    total = _total_steps(run_dir)
    if state.finished:
        missing = "" if (run_dir / SUMMARY).is_file() else (
            f"; its summary.json is missing (removed since): `fastbyol eval {run_dir}` evaluates it")
        raise AlreadyFinished(f"{run_dir}: the run already finished ({state.step} of {total} steps){missing}")
    log(f"resuming {run_dir} at step {state.step} of {total}")
    return run_dir


class AlreadyFinished(FastByolError):
    """--auto-resume found the run finished: nothing to do (the CLI exits 0)."""


def _resolved(run_dir: Path) -> dict:
    """The run's resolved values (config.json's "resolved"), {} when unreadable."""
    try:
        resolved = json.loads((run_dir / CONFIG).read_text())["resolved"]
    except (OSError, ValueError, KeyError, TypeError, RecursionError):
        return {}
    return resolved if isinstance(resolved, dict) else {}


def _total_steps(run_dir: Path):
    return _resolved(run_dir).get("total_steps", "?")


def _clear_unstarted(run_dir: Path) -> None:
    """Remove what a new run writes before its first checkpoint, holding its lock (a live run holds it: refused),
    and only when nothing else is in the folder."""
    from .disk import RunLock

    lock = RunLock(run_dir)
    try:
        others = [p.name for p in run_dir.iterdir() if p.name not in BEFORE_FIRST_CHECKPOINT
                  and not (p.name.startswith(".") and p.name.endswith(".tmp"))]
        if others:
            raise FastByolError(f"--out {run_dir} holds a run without a checkpoint and other files ({others[0]}): "
                                "choose another folder")
        for p in run_dir.iterdir():
            if p.name == LOCK:
                continue
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
    finally:
        lock.close()
