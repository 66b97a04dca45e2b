"""The run directory on disk: atomic writes, the checkpoint written and read in one place each, the run's lock, and the
free-space check.

- Atomic: a temporary file in the same folder, fsync, rename, fsync of the folder. A reader sees the previous file or
  the new one, never half of one; a temporary file left by a kill is removed by the next run that takes the lock.
- Safe to load: checkpoints hold plain types and tensors only and are read with `torch.load(weights_only=True)`, so a
  run directory from someone else cannot run code. Files are created mode 0600 (owner only).
- One writer: `RunLock` holds an OS lock (flock) on RUN_DIR/.lock for the run's lifetime; a second run into the same
  folder is refused with one line, and a crashed run leaves no lock behind (the OS drops it with the process).
- Disk full: `check_free_space` before training and before each save; ENOSPC during a write keeps the previous
  checkpoint and becomes one error line naming the path and the bytes needed.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import signal
import tempfile
from pathlib import Path

import torch

from ..system.environment import fault_injection_count
from ..errors import FastByolError
from .names import CHECKPOINT, CONFIG, LOCK

FILE_MODE = 0o600  # run files: owner read/write only (mkstemp's mode; config, metrics and summary the same)
# fault injection for the tests: SIGKILL this process inside its N-th checkpoint write, with the temporary file written
# in full but not yet renamed (tests/test_checkpoint_kills.py); FASTBYOL_TEST_KILL_SIGNAL=TERM,USR1 sends those signals instead,
# the first in the N-th write, the next in the write after it (tests/test_preemption.py); a value that is not a count
# or a signal name is ignored (never a crash on import)
_KILL_IN_CHECKPOINT_WRITE = fault_injection_count("FASTBYOL_TEST_KILL_IN_CHECKPOINT_WRITE")
_KILL_SIGNALS = [getattr(signal, f"SIG{name.strip()}") for name in
                 os.environ.get("FASTBYOL_TEST_KILL_SIGNAL", "KILL").split(",")
                 if isinstance(getattr(signal, f"SIG{name.strip()}", None), signal.Signals)]
_checkpoint_writes = 0


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


WRITE_ERRORS = {errno.ENOSPC: "no space left on the device", errno.EROFS: "the file system is read-only",
                errno.EDQUOT: "the disk quota is exceeded", errno.EACCES: "permission denied",
                errno.EPERM: "operation not permitted"}


def write_error(e: BaseException, path: Path) -> FastByolError | None:
    """One line for a failed write of `path`, when the exception is (or wraps: torch.save turns the OSError into a
    RuntimeError) one of WRITE_ERRORS; else None."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in WRITE_ERRORS:
            return FastByolError(f"{e.filename or path}: {WRITE_ERRORS[e.errno]}")
        if isinstance(e, RuntimeError) and "No space left" in str(e):  # the zip writer's message, no OSError kept
            return FastByolError(f"{path}: {WRITE_ERRORS[errno.ENOSPC]}")
        e = e.__cause__ or e.__context__
    return None


def _no_space(path: Path, need: int | None) -> FastByolError:
    free = shutil.disk_usage(path.parent).free
    wanted = f"{need} bytes needed, " if need else ""
    return FastByolError(f"{path}: no space left on the device ({wanted}{free} free); the previous file is kept")


def atomic_write_bytes(path: Path, write, need: int | None = None, before_rename=None) -> None:
    """Call write(file) on a temporary file next to `path`, then move it over `path` in one rename (mode 0600).

    A full disk, a read-only file system, a quota or a permission (WRITE_ERRORS, also wrapped in another exception
    as torch.save and matplotlib do) becomes one FastByolError naming `path`; the previous file is kept."""
    path = Path(path)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)  # created 0600
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if before_rename is not None:
            before_rename()
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException as e:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        mapped = write_error(e, path) if isinstance(e, Exception) else None
        if mapped is None:
            raise
        if "no space left" in str(mapped):
            raise _no_space(path, need) from None
        raise FastByolError(f"{path}: {str(mapped).split(': ', 1)[-1].rstrip()}; the previous file is kept") from None


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_bytes(path, lambda f: f.write((json.dumps(obj, indent=2, sort_keys=False) + "\n").encode()))


def remove_stale_temporaries(run_dir: Path) -> list[Path]:
    """Delete the temporary files of interrupted atomic writes (`.NAME.*.tmp`); call it holding the run's lock."""
    stale = sorted(Path(run_dir).glob(".*.tmp"))
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def state_bytes(state: dict) -> int:
    """Bytes of the tensors in a (nested) state dict: about the size of its checkpoint."""
    total = 0
    for value in state.values():
        if isinstance(value, dict):
            total += state_bytes(value)
        elif isinstance(value, torch.Tensor):
            total += value.numel() * value.element_size()
    return total


def check_free_space(folder: Path, need: int) -> None:
    """FastByolError unless `folder`'s filesystem has `need` bytes free (the new file is written beside the old)."""
    free = shutil.disk_usage(folder).free
    if free < need:
        raise FastByolError(f"{folder}: {free} bytes free, a checkpoint needs about {need}: free some space or choose "
                            "another --out")


def save_checkpoint(path: Path, ckpt: dict) -> None:
    """Write a checkpoint atomically, after checking the free space for it."""
    path = Path(path)
    need = state_bytes(ckpt) + (1 << 20)  # the tensors plus the pickled plain values (config, states)
    check_free_space(path.parent, need)
    atomic_write_bytes(path, lambda f: torch.save(ckpt, f), need=need, before_rename=_fault_point)


def _fault_point() -> None:
    global _checkpoint_writes
    _checkpoint_writes += 1
    nth = _checkpoint_writes - _KILL_IN_CHECKPOINT_WRITE
    if _KILL_IN_CHECKPOINT_WRITE and 0 <= nth < len(_KILL_SIGNALS):
        os.kill(os.getpid(), _KILL_SIGNALS[nth])


def load_checkpoint(path: Path, map_location="cpu") -> dict:
    """A checkpoint dict (plain types and tensors only), or FastByolError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FastByolError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated zip, or a pickle that asks for anything but plain types and tensors
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise FastByolError(f"checkpoint {path} is corrupt, truncated or not plain data (refused: "
                            f"{type(e).__name__}: {first[:200]})") from None


def load_run(run_dir: str | Path):
    """(config, training state, checkpoint dict) of a run directory, or FastByolError naming what is missing."""
    from ..config import Config
    from .state import TrainState

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FastByolError(f"run directory not found: {run_dir}")
    cfg_path = run_dir / CONFIG
    if not cfg_path.is_file():
        raise FastByolError(f"{run_dir}: no config.json (not a fastbyol run directory)")
    try:
        raw = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FastByolError(f"{cfg_path}: unreadable config ({type(e).__name__}: {e})") from None
    cfg = Config.from_dict(raw, where=str(cfg_path))
    try:
        cfg.validate()
    except FastByolError as e:
        raise FastByolError(f"{cfg_path}: {e}") from None
    ckpt_path = run_dir / CHECKPOINT
    if not ckpt_path.is_file():
        raise FastByolError(f"{run_dir}: no {CHECKPOINT} (the run stopped before its first checkpoint; start it again "
                            "with a new --out)")
    ckpt = load_checkpoint(ckpt_path)
    state = TrainState.from_checkpoint(ckpt, where=str(ckpt_path))
    check_checkpoint_tensors(ckpt, cfg, where=str(ckpt_path))
    return cfg, state, ckpt


def expected_model_state(cfg) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """name -> (shape, dtype) of every tensor of the BYOL state_dict that `cfg` builds, from the model built on the
    meta device (shapes only: no memory, no random numbers drawn)."""
    from ..models import BYOL, build_encoder
    from ..optim import build_optimizer

    with torch.device("meta"):
        model = BYOL(build_encoder(cfg.model.arch, cfg.model.stem, cfg.data.image_size), cfg.model.proj_hidden,
                     cfg.model.proj_dim, cfg.model.pred_hidden, image_size=cfg.data.image_size)
        opt = build_optimizer(cfg.optim, model)
    shapes = {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}
    # the optimizer's parameters in its state_dict's numbering: group after group (the weight-decay and the excluded
    # groups of AdamW, or of LARS with named exclusions), not model.online_parameters()'s order
    shapes["#online"] = [tuple(p.shape) for group in opt.param_groups for p in group["params"]]
    return shapes


def check_checkpoint_tensors(ckpt: dict, cfg, where: str = "checkpoint") -> None:
    """The checkpoint's `model` (names, shapes, dtypes) and `optimizer` (structure, one momentum buffer of its
    parameter's shape) match the architecture of the run's config, before anything is restored from it; else a
    FastByolError naming the first difference. Every consumer (train --resume, eval, export) loads through here."""
    from .state import _short

    def bad(why: str):
        raise FastByolError(f"{where}: does not fit its config.json ({cfg.model.arch}, {cfg.model.stem} stem, "
                            f"{cfg.data.image_size} px): {why}")

    model = ckpt.get("model")
    if not isinstance(model, dict):
        bad(f"its 'model' is a {type(model).__name__}, not a state_dict")
    try:
        expected = expected_model_state(cfg)
    except ValueError:  # an encoder of the user's own (module:factory) that cannot be built here: the consumer that
        return  # builds it (train's encoder=, eval's import) checks the tensors when it loads them
    online = expected.pop("#online")
    for name, value in model.items():
        if not isinstance(name, str) or name not in expected:
            bad(f"unexpected tensor {_short(name)} in 'model'")
        if not isinstance(value, torch.Tensor):
            bad(f"model[{_short(name)}] is a {type(value).__name__}, not a tensor")
        shape, dtype = expected[name]
        if tuple(value.shape) != shape or value.dtype != dtype:
            bad(f"model[{_short(name)}] is {value.dtype} {tuple(value.shape)}, the architecture has {dtype} {shape}")
    missing = [k for k in expected if k not in model]
    if missing:
        bad(f"'model' lacks {missing[0]}" + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
    if "optimizer" in ckpt or ckpt.get("format") == 2:
        _check_optimizer(ckpt.get("optimizer"), online, bad)


def _setting_ok(v) -> bool:
    """An optimizer group's setting: a number, a flag, None, or a tuple of numbers (AdamW's betas)."""
    if v is None or isinstance(v, (int, float)):  # bool is an int
        return True
    return isinstance(v, (tuple, list)) and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)


def _check_optimizer(opt, online: list[tuple[int, ...]], bad) -> None:
    """A LARS or AdamW state_dict: {'state': {index: {name: tensor}}, 'param_groups': [{'params': [...], ...}]}
    over the online parameters, each buffer of its parameter's shape (0-D ones, AdamW's step, of any)."""
    from .state import _short

    if not isinstance(opt, dict) or not isinstance(opt.get("state"), dict) or not isinstance(
            opt.get("param_groups"), list):
        bad("its 'optimizer' is not an optimizer state_dict (state, param_groups)")
    indices = []
    for group in opt["param_groups"]:
        if not isinstance(group, dict) or not isinstance(group.get("params"), list):
            bad("an optimizer param group is not an object with a 'params' list")
        if not all(_setting_ok(v) for k, v in group.items() if k != "params"):
            bad("an optimizer param group holds a setting that is not a number")
        indices += group["params"]
    if sorted(indices) != list(range(len(online))) or not all(isinstance(i, int) for i in indices):
        bad(f"its optimizer covers {len(indices)} parameters, the architecture has {len(online)}")
    for index, entry in opt["state"].items():
        if not isinstance(index, int) or not 0 <= index < len(online) or not isinstance(entry, dict):
            bad(f"optimizer state {_short(index)} is not a parameter's state")
        for key, value in entry.items():
            if not isinstance(value, torch.Tensor) or not value.is_floating_point() or (
                    value.dim() and tuple(value.shape) != online[index]):
                bad(f"optimizer state {index}.{key} does not match its parameter {online[index]}")


class RunLock:
    """An exclusive OS lock on RUN_DIR/.lock, held while the run lives (released by close() or the process's end)."""

    NAME = LOCK

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / self.NAME
        try:  # never through a symbolic link: the PID written below would overwrite its target
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, FILE_MODE)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise FastByolError(f"{self.path} is a symbolic link: not followed; remove it") from None
            raise FastByolError(f"{run_dir}: cannot write there ({e.strerror})") from None
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self.fd, 64, 0).decode(errors="replace").strip() or "?"
            os.close(self.fd)
            raise FastByolError(f"{run_dir} is in use by another fastbyol run (pid {holder}); wait for it, or choose "
                                "another --out") from None
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"{os.getpid()}\n".encode(), 0)

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor releases the flock
            self.fd = None
