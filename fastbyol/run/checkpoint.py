"""The checkpoint, written and read in one place each, and checked before anything is restored from it.

- Safe to load: checkpoints hold plain types and tensors only and are read with `torch.load(weights_only=True)`, and an
  encoder of the user's own that config.json names (module:factory) is imported only when this command's user names
  it too (`models.OwnEncoders`), so a run directory from someone else cannot run code; its tensors are checked against
  the architecture of the run's config (names, shapes, dtypes, the optimizer's structure) before they are loaded.
- Whose it is: config.json holds the run's id (`RUN_ID_KEY`, drawn at random when the run is created) and every
  checkpoint carries it in its training state; `load_run` refuses a checkpoint whose id is not its config.json's (a
  checkpoint copied from another run), and bounds config.json's numbers as `train` bounds its flags.
- Written atomically (fastbyol.run.disk) after a free-space check; the tests' fault injection kills the process
  inside the N-th write, with the temporary file written in full but not yet renamed.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
from pathlib import Path

import torch

from ..errors import FastByolError, TrainingStopped
from ..system.distributed import gather_objects, global_mean
from ..system.environment import fault_injection_count
from ..version import __version__
from .disk import atomic_write_bytes, check_free_space
from .names import CHECKPOINT, CONFIG
from .state import TrainState, short_repr

# fault injection for the tests: SIGKILL this process inside its N-th checkpoint write, with the temporary file written
# in full but not yet renamed (tests/test_checkpoint_kills.py); FASTBYOL_TEST_KILL_SIGNAL=TERM,USR1 sends those signals
# instead, the first in the N-th write, the next in the write after it (tests/test_preemption.py);
# FASTBYOL_TEST_KILL_FRESH_ONLY=1: only in a process whose first write found no checkpoint (it started the run: a
# restarted or resumed process is spared, so a torchrun --max-restarts job is killed once); a value that is not a
# count or a signal name is ignored (never a crash on import)
_KILL_IN_CHECKPOINT_WRITE = fault_injection_count("FASTBYOL_TEST_KILL_IN_CHECKPOINT_WRITE")
_KILL_FRESH_ONLY = fault_injection_count("FASTBYOL_TEST_KILL_FRESH_ONLY") > 0
_started_fresh: bool | None = None  # whether this process's first checkpoint write found no checkpoint
_KILL_SIGNALS = [getattr(signal, f"SIG{name.strip()}") for name in
                 os.environ.get("FASTBYOL_TEST_KILL_SIGNAL", "KILL").split(",")
                 if isinstance(getattr(signal, f"SIG{name.strip()}", None), signal.Signals)]
_checkpoint_writes = 0
RUN_ID_KEY = "run_id"  # config.json's top-level key of the run's id; TrainState.run_id in every checkpoint
RUN_ID = re.compile(r"[0-9a-f]{32}")  # new_run_id()'s form


def last_good(run_dir: Path) -> str:
    """What is left of a run that stopped: its last good checkpoint, or nothing to resume from."""
    if (Path(run_dir) / CHECKPOINT).exists():
        return f"the last good checkpoint is kept in {Path(run_dir) / CHECKPOINT} (lower --base-lr?)"
    return "no checkpoint was written before it: start again with a new --out (lower --base-lr?)"


def state_bytes(state: dict) -> int:
    """Bytes of the tensors in a (nested) state dict: about the size of its checkpoint."""
    total = 0
    for value in state.values():
        if isinstance(value, dict):
            total += state_bytes(value)
        elif isinstance(value, torch.Tensor):
            total += value.numel() * value.element_size()
    return total


def save_checkpoint(path: Path, ckpt: dict) -> None:
    """Write a checkpoint atomically, after checking the free space for it."""
    path = Path(path)
    need = state_bytes(ckpt) + (1 << 20)  # the tensors plus the pickled plain values (config, states)
    check_free_space(path.parent, need)
    global _started_fresh
    if _started_fresh is None:
        _started_fresh = not path.exists()
    atomic_write_bytes(path, lambda f: torch.save(ckpt, f), need=need, before_rename=_fault_point)


def _fault_point() -> None:
    global _checkpoint_writes
    _checkpoint_writes += 1
    nth = _checkpoint_writes - _KILL_IN_CHECKPOINT_WRITE
    if _KILL_IN_CHECKPOINT_WRITE and 0 <= nth < len(_KILL_SIGNALS) and (_started_fresh or not _KILL_FRESH_ONLY):
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


def new_run_id() -> str:
    """A new run's id: 128 random bits as 32 hex digits (config.json's RUN_ID_KEY, and every checkpoint's state)."""
    return secrets.token_hex(16)


def check_run_identity(raw_config: dict, state: TrainState, where: str) -> None:
    """The checkpoint's run id (its training state's) is config.json's, else a FastByolError naming both; a run made
    before run ids existed has none in either, and passes."""
    saved = raw_config.get(RUN_ID_KEY, "")
    if not isinstance(saved, str) or saved and not RUN_ID.fullmatch(saved):
        raise FastByolError(f"{where}/{CONFIG}: its {RUN_ID_KEY} is not a run id (32 hex digits)")
    if saved != state.run_id:
        theirs = f"run {state.run_id}" if state.run_id else "a run without an id"
        raise FastByolError(f"{where}/{CHECKPOINT} belongs to {theirs}, not to this folder's {CONFIG} (run "
                            f"{saved or 'without an id'}): a checkpoint copied from another run is never resumed, "
                            "evaluated or exported with this config")


def load_run(run_dir: str | Path, own=None):
    """(config, training state, checkpoint dict) of a run directory, or FastByolError naming what is missing.

    own: the encoders of the user's own this command may build (models.OwnEncoders: `--arch module:factory` given
    on its command line, or `encoder=` in Python); a config.json naming any other module:factory is refused in one
    line before anything is imported."""
    from ..config import Config
    from ..models import OwnEncoders
    from ..system.bounds import check_plain_bounds

    own = own if own is not None else OwnEncoders()
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FastByolError(f"run directory not found: {run_dir}")
    cfg_path = run_dir / CONFIG
    if not cfg_path.is_file():
        raise FastByolError(f"{run_dir}: no config.json (not a fastbyol run directory)")
    try:
        raw = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise FastByolError(f"{cfg_path}: unreadable config ({type(e).__name__}: {str(e)[:200]})") from None
    cfg = Config.from_dict(raw, where=str(cfg_path))
    try:
        cfg.validate()
        check_plain_bounds(cfg)
    except FastByolError as e:
        raise FastByolError(f"{cfg_path}: {e}") from None
    ckpt_path = run_dir / CHECKPOINT
    if not ckpt_path.is_file():
        raise FastByolError(f"{run_dir}: no {CHECKPOINT} (the run stopped before its first checkpoint; start it again "
                            "with a new --out)")
    try:  # before anything could build the encoder
        own.check(cfg.model.arch, str(cfg_path))
    except ValueError as e:
        raise FastByolError(str(e)) from None
    ckpt = load_checkpoint(ckpt_path)
    state = TrainState.from_checkpoint(ckpt, where=str(ckpt_path))
    check_run_identity(raw, state, str(run_dir))
    check_checkpoint_tensors(ckpt, cfg, where=str(ckpt_path), own=own)
    return cfg, state, ckpt


def expected_model_state(cfg, own=None) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """name -> (shape, dtype) of every tensor of the BYOL state_dict that `cfg` builds, from the model built on the
    meta device (shapes only: no memory, no random numbers drawn). own: models.OwnEncoders (load_run's); an encoder
    of the user's own that it does not allow is a ValueError, nothing imported."""
    from ..models import BYOL, OwnEncoders
    from ..optim import build_optimizer

    own = own if own is not None else OwnEncoders()
    with torch.device("meta"):
        encoder = own.build(cfg.model.arch, cfg.model.stem, cfg.data.image_size, where=CONFIG)
        model = BYOL(encoder, cfg.model.proj_hidden, cfg.model.proj_dim, cfg.model.pred_hidden,
                     image_size=cfg.data.image_size)
        opt = build_optimizer(cfg.optim, model)
    shapes = {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}
    # the optimizer's parameters in its state_dict's numbering: group after group (the weight-decay and the excluded
    # groups of AdamW, or of LARS with named exclusions), not model.online_parameters()'s order
    shapes["#online"] = [tuple(p.shape) for group in opt.param_groups for p in group["params"]]
    return shapes


def check_checkpoint_tensors(ckpt: dict, cfg, where: str = "checkpoint", own=None) -> None:
    """The checkpoint's `model` (names, shapes, dtypes) and `optimizer` (structure, one momentum buffer of its
    parameter's shape) match the architecture of the run's config, before anything is restored from it; else a
    FastByolError naming the first difference. Every consumer (train --resume, eval, export) loads through here."""
    def bad(why: str):
        raise FastByolError(f"{where}: does not fit its config.json ({cfg.model.arch}, {cfg.model.stem} stem, "
                            f"{cfg.data.image_size} px): {why}")

    from ..models import is_custom_arch

    model = ckpt.get("model")
    if not isinstance(model, dict):
        bad(f"its 'model' is a {type(model).__name__}, not a state_dict")
    if is_custom_arch(cfg.model.arch) and own is not None and own.encoder is not None:
        return  # the encoder given in Python is checked when its consumer loads the tensors into it (strict)
    try:
        expected = expected_model_state(cfg, own)
    except ValueError:  # an encoder of the user's own (module:factory) that cannot be built here: the consumer that
        return  # builds it (train's encoder=, eval's import) checks the tensors when it loads them
    online = expected.pop("#online")
    for name, value in model.items():
        if not isinstance(name, str) or name not in expected:
            bad(f"unexpected tensor {short_repr(name)} in 'model'")
        if not isinstance(value, torch.Tensor):
            bad(f"model[{short_repr(name)}] is a {type(value).__name__}, not a tensor")
        shape, dtype = expected[name]
        if tuple(value.shape) != shape or value.dtype != dtype:
            bad(f"model[{short_repr(name)}] is {value.dtype} {tuple(value.shape)}, the architecture has {dtype} "
                f"{shape}")
    missing = [k for k in expected if k not in model]
    if missing:
        bad(f"'model' lacks {missing[0]}" + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
    _check_optimizer(ckpt.get("optimizer"), online, bad)


def _setting_ok(v) -> bool:
    """An optimizer group's setting: a number, a flag, None, or a tuple of numbers (AdamW's betas)."""
    if v is None or isinstance(v, (int, float)):  # bool is an int
        return True
    return isinstance(v, (tuple, list)) and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)


def _check_optimizer(opt, online: list[tuple[int, ...]], bad) -> None:
    """A LARS or AdamW state_dict: {'state': {index: {name: tensor}}, 'param_groups': [{'params': [...], ...}]}
    over the online parameters, each buffer of its parameter's shape (0-D ones, AdamW's step, of any)."""
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
            bad(f"optimizer state {short_repr(index)} is not a parameter's state")
        for key, value in entry.items():
            if not isinstance(value, torch.Tensor) or not value.is_floating_point() or (
                    value.dim() and tuple(value.shape) != online[index]):
                bad(f"optimizer state {index}.{key} does not match its parameter {online[index]}")


def finite_flag(tensors: list[torch.Tensor]) -> torch.Tensor:
    """1.0 if every floating tensor is finite else 0.0, as a 0-D device tensor: one norm per tensor (foreach), one
    reduction, no host sync."""
    tensors = [t for t in tensors if t.is_floating_point()]
    return torch.isfinite(torch.stack(torch._foreach_norm(tensors)).float()).all().float()


class Checkpoints:
    """Takes the run's checkpoint at a save point and writes it: every rank's data position and RNG state
    (collective), the files replaced so far, the meter and the online probe, then the checkpoint dict, written by
    rank 0 through the run files. Refused (the run stops, the previous checkpoint stays) unless the weights, the BN
    statistics, the momentum and the recent losses are finite (export and eval refuse any non-finite tensor).

    run: the trainer's `Run` (cfg, state, model, optimizer, loader, meter, bad, probe, log_points, files, rank,
    world_size); every rank calls `save` at the same step."""

    def __init__(self, run):
        self.run = run

    def save(self, finished: bool = False) -> None:
        """finished: the final checkpoint, written after summary.json: nothing left to resume."""
        run, state = self.run, self.run.state
        state.data_states = gather_objects(run.loader.state(), run.world_size)
        run.bad.gather(run.loader, run.world_size, write=run.is_rank0)
        state.torch_rngs = gather_objects(torch.get_rng_state(), run.world_size)
        state.meter, state.finished = run.meter.state_dict(), finished
        state.probe = {} if run.probe is None else run.probe.state_dict()
        momentum = [s["momentum_buffer"] for s in run.optimizer.state.values() if "momentum_buffer" in s]
        flag = finite_flag([*run.model.parameters(), *run.model.buffers(), *momentum,  # BN statistics too
                            run.log_points.loss_sum])
        if global_mean(flag, run.world_size) < 1.0:  # sync: at the save point; every rank takes the same decision
            raise TrainingStopped(f"the weights or the loss became non-finite by step {state.step}; "
                                  + last_good(run.files.dir))
        if run.is_rank0:
            run.files.save(state.to_checkpoint(run.model.state_dict(), run.optimizer.state_dict(), run.cfg.to_dict(),
                                               __version__))
