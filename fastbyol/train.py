"""The BYOL training loop: one flat loop with a labelled block per concern; helpers around it.

    fastbyol train [--preset NAME] [--data PATH] [--epochs N] [--batch-size N] [--seed S] [--out DIR] ...

Per step: two DALI views -> online and target forwards (one per view) -> fused symmetric loss -> backward -> LARS
step at lr_at(step) -> EMA of the target at tau_at(step), after the optimizer step (`byol_step`; with --accumulate N,
N micro-batches of forward and backward before the one optimizer step: `fastbyol.accumulate`). Around it:
`ThroughputMeter` (img/s, step time, data wait, MFU), `TrainState` (what a checkpoint holds besides the weights),
`Config.resolve` (the derived values), `rundir` (the run directory: lock, metrics, checkpoint, summary, bad files).

Measured (2-core CPU of this project's machines, torch 2.13 CPU, 2026-11-27): see README.md, "Figures".
"""

from __future__ import annotations

import copy
import math
import os
import sys
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from .version import __version__
from .accumulate import accumulated_step
from .augment import TwoViewLoader, views_from_config
from .system.bounds import check_machine_bounds
from .run.checkpoint import CHECKPOINT, load_run, state_bytes, write_error
from .config import Config, Resolved
from .data import ImageDataset, resolve_dataset
from .system.distributed import DeferredMean, barrier, broadcast_object
from .system.environment import check_environment
from .errors import FastByolError
from .kernels import byol_loss_symmetric, check_backend, ema_update_, kernel_backend
from .evaluation.features import knn_top1
from .evaluation.probe import OnlineProbe, probe_labels
from .run.meter import ThroughputMeter
from .models import BYOL, build_encoder, call_factory, params_sha256
from .optim import LARS, build_optimizer
from .run.perf import device_memory_in_use, flops_per_image, library_versions, peak_flops
from .run.preemption import StopCheck
from .run.profiling import StepProfiler
from .reference import lr_at, tau_at
from .run.files import (BadFiles, Checkpointer, RunFiles, TrainingStopped, check_out_outside_data,  # noqa: F401
                     last_good)
from .run.state import TrainState
from .run.names import PROFILE


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise FastByolError("--device cuda, but torch sees no CUDA GPU")
    return torch.device(name)


class EncoderMaker:
    """Makes the run's encoder after the seed is set: by `--arch` name, or from the `encoder` given to `train` (an
    nn.Module, used as it is the first time and deep-copied from its untrained state for the random-init baseline
    after, or a factory, called each time)."""

    def __init__(self, cfg: Config, encoder=None):
        self.cfg, self.given = cfg, encoder
        self.pristine = copy.deepcopy(encoder).cpu() if isinstance(encoder, torch.nn.Module) else None
        if encoder is not None and self.pristine is None and not callable(encoder):
            raise FastByolError(f"train(encoder=...): expected a torch.nn.Module or a callable returning one, got "
                                f"{type(encoder).__name__}")

    def __call__(self) -> torch.nn.Module:
        m = self.cfg.model
        try:
            if self.given is None:
                return build_encoder(m.arch, m.stem, self.cfg.data.image_size)
            if self.pristine is not None:
                given, self.given = self.given, copy.deepcopy(self.pristine)
                return given
            return call_factory(self.given, m.stem, self.cfg.data.image_size, where="train(encoder=...)")
        except ValueError as e:  # an unknown name, a factory that cannot be imported or returns no module
            raise FastByolError(str(e).splitlines()[0]) from None


def encoder_name(encoder) -> str:
    """module:name of a given encoder's factory (or class), recorded as its arch: `--arch` imports it again where it
    is importable (`fastbyol eval`, `--resume`); from __main__ or a notebook it says what it was, and those commands
    refuse it in one line (resume such a run with `train(cfg, resume=..., encoder=...)`)."""
    target = encoder if not isinstance(encoder, torch.nn.Module) else type(encoder)
    module = getattr(target, "__module__", None) or "__main__"
    name = getattr(target, "__qualname__", "") or getattr(target, "__name__", "")
    if not name.isidentifier():  # a lambda, a nested function (f.<locals>.g), a method
        name = getattr(target, "__name__", "")
    return f"{module}:{name if name.isidentifier() else 'encoder'}"


def build_model(cfg: Config, device: torch.device, make_encoder: EncoderMaker | None = None) -> BYOL:
    encoder = (make_encoder or EncoderMaker(cfg))()
    try:
        model = BYOL(encoder, cfg.model.proj_hidden, cfg.model.proj_dim, cfg.model.pred_hidden,
                     image_size=cfg.data.image_size)
    except ValueError as e:  # an encoder whose output is not (batch, features)
        raise FastByolError(f"--arch {cfg.model.arch}: {str(e).splitlines()[0]}") from None
    return model.to(device=device, memory_format=torch.channels_last)


def byol_step(model, optimizer: LARS, target_params: list, online_params: list, v1: torch.Tensor,
              v2: torch.Tensor, lr: float, tau: float, bf16: bool = False) -> torch.Tensor:
    """One BYOL step; returns the loss as a device tensor (no host sync). bf16: autocast the forward (CUDA).

    model: the BYOL module, or it wrapped in DDP and/or torch.compile (anything returning p1, p2, z1, z2)."""
    optimizer.set_lr(lr)
    with torch.autocast(device_type=v1.device.type, dtype=torch.bfloat16, enabled=bf16):
        p1, p2, z1, z2 = model(v1, v2)
        loss = byol_loss_symmetric(p1, p2, z1, z2)  # bf16 predictions and targets, fp32 accumulation
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    ema_update_(target_params, online_params, tau)  # the target moves after the optimizer step
    return loss.detach()


def evaluate_knn(model: BYOL | torch.nn.Module, dataset: ImageDataset, cfg: Config, device: torch.device,
                 subset: int | None = None) -> float | None:
    """kNN top-1 (%) of an encoder (a BYOL model's online encoder) on the labeled splits; None when there are none.

    subset: at most this many bank images and a quarter as many queries (fixed, evenly spaced): the cheap online
    monitor; None: the full splits."""
    if not dataset.has_knn:
        return None
    bank, queries = slice(None), slice(None)
    if subset is not None:
        bank = np.linspace(0, len(dataset.train_images) - 1, min(subset, len(dataset.train_images))).astype(int)
        n_q = max(1, min(subset // 4, len(dataset.test_images)))
        queries = np.linspace(0, len(dataset.test_images) - 1, n_q).astype(int)
    encoder = model.online_encoder if isinstance(model, BYOL) else model
    return knn_top1(encoder, dataset.train_images[bank], dataset.train_labels[bank], dataset.test_images[queries],
                    dataset.test_labels[queries], dataset.num_classes, cfg.run.knn_k, cfg.run.knn_temperature, device)


class TrainStep:
    """The step the loop calls. Its first call in a process compiles (under torch.compile); under --compile auto a
    compiler failure there prints one warning and the step runs again eagerly (compilation fails before the forward
    runs, so nothing has changed). Later calls go straight to byol_step, or with --accumulate N > 1 to
    accumulated_step (N micro-batches, one optimizer step)."""

    def __init__(self, net, eager_net, optimizer: LARS, model: BYOL, plan: Resolved, may_fall_back: bool, log,
                 probe: OnlineProbe | None = None):
        self.net, self.eager_net, self.optimizer = net, eager_net, optimizer
        self.probe = probe  # the online linear probe: trained on the step's view-1 features after it
        self.target_params, self.online_params = model.ema_pairs()
        self.bf16 = plan.autocast_bf16
        self.accumulate = plan.accumulate
        self.mode = plan.compile_mode
        self.may_fall_back = may_fall_back and self.mode != "off"
        self.log = log

    def __call__(self, v1: torch.Tensor, v2: torch.Tensor, lr: float, tau: float,
                 labels: torch.Tensor | None = None) -> torch.Tensor:
        try:
            if self.accumulate > 1:
                loss = accumulated_step(self.net, self.optimizer, self.target_params, self.online_params, v1, v2,
                                        lr, tau, self.accumulate, self.bf16)
            else:
                loss = byol_step(self.net, self.optimizer, self.target_params, self.online_params, v1, v2, lr,
                                 tau, self.bf16)
        except Exception as e:  # noqa: BLE001 (only a failed compilation at the first step is caught)
            if not (self.may_fall_back and _compile_error(e)):
                raise
            self.log(f"warning: torch.compile failed ({type(e).__name__}: {str(e).splitlines()[0][:200]}); training "
                     "continues without it (--compile off skips the attempt)")
            self.net, self.mode, self.may_fall_back = self.eager_net, "off", False
            return self(v1, v2, lr, tau, labels)
        if self.probe is not None:
            self.probe.step(labels)
        return loss

    def compiled(self) -> None:
        """The first step went through: no fallback after it."""
        self.may_fall_back = False


def _compile_error(e: BaseException) -> bool:
    """Whether an exception comes from torch.compile's machinery (Dynamo, AOTAutograd, Inductor)."""
    try:
        from torch._dynamo.exc import TorchDynamoException
    except ImportError:
        return False
    return isinstance(e, TorchDynamoException) or type(e).__module__.startswith(("torch._inductor", "torch._dynamo"))


def train(cfg: Config, progress: bool = True, log=print, resume: str | Path | None = None,
          encoder=None) -> tuple[Path, dict]:
    """Run BYOL pretraining as `cfg` says; returns (run directory, summary). Bad settings raise FastByolError
    before anything is written.

    Under torchrun (WORLD_SIZE > 1) every process calls this: DDP over the ranks, cfg.data.batch_size is the global
    batch, each rank reads its own shard; rank 0 alone logs and writes the run directory.

    resume: a run directory with a checkpoint.pt; its own config.json is used and training continues exactly where
    the checkpoint was taken (model, optimizer, step, data position and random states of every rank).

    encoder: an encoder of your own instead of cfg.model.arch: an nn.Module mapping (B, 3, H, W) to (B, D), or a
    callable returning one (called after the seed is set; it may take `image_size` and `stem`). D is its
    `num_features` / `feature_dim`, else found by one forward. Give it again to resume such a run."""
    from .system.distributed import close_distributed, init_distributed

    check_environment()  # RANK, WORLD_SIZE, MASTER_PORT, FASTBYOL_CACHE...: one line before anything is read or made
    state, ckpt = None, None
    if resume is not None:
        cfg, state, ckpt = load_run(resume)
        if state.finished:
            raise FastByolError(f"{resume}: the run already finished ({state.step} steps)")
    elif encoder is not None:
        cfg = copy.deepcopy(cfg)
        cfg.model.arch = encoder_name(encoder)  # what config.json says the encoder was
    cfg.validate()
    device = pick_device(cfg.run.device)
    check_backend(device)  # FASTBYOL_KERNELS: one line before anything is created
    rank, world_size, created = init_distributed(device.type)
    old_umask = os.umask(0o077)  # run files readable by their owner only
    try:
        if encoder is None:  # threads, widths, memory, before anything is allocated (an encoder of the caller's own:
            check_machine_bounds(cfg, device, world_size)  # the caller sized it)
        return _train(cfg, state, ckpt, resume, device, rank, world_size, progress, log,
                      EncoderMaker(cfg, encoder))
    except OSError as e:  # outside a checkpoint write (metrics, TensorBoard): one line, not a traceback
        mapped = write_error(e, Path(e.filename or "the run directory"))
        if mapped is None:
            raise
        raise mapped from None
    finally:
        os.umask(old_umask)
        if created:
            close_distributed()


def _train(cfg: Config, state: TrainState | None, ckpt: dict | None, resume, device: torch.device, rank: int,
           world_size: int, progress: bool, log, make_encoder: EncoderMaker) -> tuple[Path, dict]:
    # setup: the data, the plan, the run folder's name, the model, the step, the meter
    is_rank0 = rank == 0
    if not is_rank0:
        log = lambda *a, **k: None  # noqa: E731 (rank 0 alone speaks)
    if device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())  # init_distributed chose LOCAL_RANK's GPU
        torch.backends.cudnn.benchmark = True  # fixed shapes: autotune the convolutions once
    run_dir = Path(resume) if resume is not None else Path(cfg.run.out or _default_run_dir(cfg))
    run_dir = broadcast_object(run_dir, rank, world_size)  # one name (its time stamp) for every rank
    check_out_outside_data(run_dir, cfg.data.data, cfg.data.data_format)
    dataset = resolve_dataset(cfg.data.data, cfg.data.data_format, cfg.data.image_size, cfg.data.skip_bad_files,
                              cfg.run.seed, rank=rank, world_size=world_size, barrier=lambda: barrier(world_size))
    plan = cfg.resolve(device.type, world_size, dataset.num_pretraining, dataset.name)
    if state is not None:
        _check_resumable(state, resume, world_size, dataset.num_pretraining, plan.total_steps)
    state = state or TrainState(world_size=world_size, num_images=dataset.num_pretraining)
    bad = BadFiles(run_dir, dataset.pretraining_source, cfg.data.skip_bad_files, resume is not None, rank,
                   world_size)
    model, loader, optimizer = _build_training(cfg, plan, dataset, device, state, ckpt, rank, make_encoder)
    loader.on_skip = lambda name, why: log(f"skipped {name}: {why} (--skip-bad-files)")
    image_flops = flops_per_image(model, cfg.data.image_size, device)  # on the plain model: no collectives
    probe = _online_probe(cfg, plan, dataset, model, loader, device, log)  # after the FLOP count's copy of the model
    if probe is not None and state.probe:  # a resume: the probe continues where it was
        probe.load_state_dict(state.probe, str(resume))
    net = _distributed(model, device, world_size)
    step_fn = TrainStep(net if plan.compile_mode == "off" else
                        torch.compile(net, mode=None if plan.compile_mode == "default" else plan.compile_mode),
                        net, optimizer, model, plan, may_fall_back=cfg.run.compile == "auto", log=log, probe=probe)
    meter = ThroughputMeter(device, cfg.data.batch_size, image_flops, peak_flops(device), world_size)
    if state.meter:
        meter.load_state_dict(state.meter)
    files = RunFiles(run_dir, writes=is_rank0, log=log)
    try:
        files.open(cfg, plan, None if resume is None else state.step, 2 * state_bytes(model.state_dict()), rank)
        _log_start(log, cfg, plan, dataset, model, run_dir, device, state, resume, image_flops)
        checkpoint = Checkpointer(cfg, state, model, optimizer, loader, meter, bad, run_dir, world_size, is_rank0,
                                  probe)

        # the loop
        last_loss, startup, loss_sum = _loop(cfg, plan, state, loader, meter, step_fn, files, checkpoint, model,
                                             dataset, device, run_dir, progress, is_rank0, world_size, log)

        # the end: the final checkpoint first (a failed evaluation loses nothing), then kNN, the summary, and last the
        # checkpoint marked finished
        files.save(checkpoint(False, loss_sum))  # not yet finished: a resume from it runs the evaluation again
        knn_trained, knn_random = _final_knn(cfg, dataset, model, device, run_dir, is_rank0, world_size, make_encoder)
        probe_top1 = _probe_top1(probe, model, dataset, device) if is_rank0 else None
        state.knn_top1_random_init = knn_random
        summary = _summary(cfg, plan, state, meter, model, dataset, device, step_fn.mode, knn_trained, knn_random,
                           last_loss, resumed=resume is not None)
        summary["startup_seconds"] = {**dataset.startup_seconds, **startup}
        summary["online_probe_top1"] = probe_top1  # None: no probe (--no-online-probe, or no labels)
        if bad.names:  # files that passed the checks but that DALI could not decode, replaced while training
            summary["skipped_files"] += bad.new_count(dataset)
            summary["skipped_while_training"] = sorted(bad.names)
            log(f"skipped {len(bad.names)} files DALI could not decode while training (--skip-bad-files): "
                f"listed in {bad.path}")
        if knn_trained is not None:
            files.write_metrics(step=state.step, epoch=cfg.optim.epochs - 1, knn_top1=knn_trained, final=True,
                                **({} if probe_top1 is None else {"online_probe_top1": probe_top1}))
        if knn_random is not None:
            files.write_metrics(step=0, epoch=-1, knn_top1=knn_random, init="random", final=True)
        files.write_summary(summary)
        # finished only once the summary is there: a stop before this resumes into the evaluation and the summary
        # again, so no run is left finished without its summary.json
        files.save(checkpoint(True, loss_sum))
    except BaseException:  # whatever stopped a new run before its first checkpoint: nothing is left behind
        if resume is None and not isinstance(sys.exc_info()[1], TrainingStopped):
            files.close()
            files.remove_if_unfinished()
        raise
    finally:
        files.close()
        loader.close()  # DALI stopped (what it decoded ahead, printed inside the capture), fd 2 given back
    if knn_trained is not None and knn_random is not None:
        log(f"kNN top-1: trained {knn_trained:.2f}% vs random-init {knn_random:.2f}% "
            f"({knn_trained - knn_random:+.2f} points); {summary['img_per_s']:.0f} img/s over {state.step} steps")
    log(f"summary: {run_dir / 'summary.json'}")
    return run_dir, summary


def _loop(cfg: Config, plan: Resolved, state: TrainState, loader: TwoViewLoader, meter: ThroughputMeter,
          step_fn: TrainStep, files: RunFiles, checkpoint: Checkpointer, model: BYOL, dataset: ImageDataset,
          device: torch.device, run_dir: Path, progress: bool, is_rank0: bool, world_size: int,
          log) -> tuple[float, dict, torch.Tensor]:
    """The training loop, from the state's step to the end; returns (last logged loss, startup seconds, the loss sum
    since the last log point)."""
    from tqdm import tqdm

    from .system.native import CurrentStderr

    # CurrentStderr: the bar writes between batches, while an encoded source's loader holds fd 2 (native.py)
    bar = tqdm(total=plan.total_steps, initial=state.step, disable=not (progress and is_rank0), unit="step",
               dynamic_ncols=True, mininterval=1.0, file=CurrentStderr())
    profiler = StepProfiler(plan.profile_steps if is_rank0 else None, run_dir / PROFILE, device, log, meter)
    loss_sum, steps_since_log, last_loss = torch.zeros((), device=device), 0, float("nan")
    loss_mean, pending = DeferredMean(device), None  # the last log point's loss on its way to the host, its record
    start_epoch, resume_offset = divmod(state.step, plan.steps_per_epoch)
    input_dtype = getattr(torch, plan.input_dtype)
    startup, stop = {}, StopCheck(world_size)
    for epoch in range(start_epoch, cfg.optim.epochs):
        meter.resume()
        for v1, v2, *labels in meter.batches(loader.epoch(resume_offset if epoch == start_epoch else 0)):
            profiler.at(state.step, meter.last_wait)  # --profile START:STOP records these steps
            # (B, 3, S, S) channels_last views, one per augmentation spec
            v1 = v1.to(device=device, dtype=input_dtype, non_blocking=True)
            v2 = v2.to(device=device, dtype=input_dtype, non_blocking=True)
            lr = lr_at(state.step, plan.total_steps, plan.warmup_steps, plan.peak_lr)
            tau = tau_at(state.step, plan.total_steps, cfg.optim.tau_base)
            loss_sum += step_fn(v1, v2, lr, tau, labels[0] if labels else None)
            state.step += 1
            steps_since_log += 1
            if meter.step():  # sync, once: the first step of this process is timed apart (compilation)
                step_fn.compiled()
                startup["first batch"] = first_batch = meter.last_wait
                log(f"first step (compile {step_fn.mode}, warm-up): {meter.warmup_seconds:.1f} s; its batch "
                    f"took {first_batch:.1f} s")
            bar.update(1)

            # log: queue the mean loss and the meter's window of this interval for the host (no sync), then print and
            # write the previous log point's, whose values have arrived meanwhile: the figures lag by one log
            # interval, and a non-finite loss stops the run one interval later (checkpoints check their own)
            if state.step % cfg.run.log_every == 0 or state.step == plan.total_steps:
                if pending is not None:
                    last_loss, pending = _report(pending, loss_mean, bar, files, run_dir), None
                loss_mean.start(loss_sum, world_size)  # collective: every rank at every log point
                pending = dict(window=meter.window(), steps=steps_since_log, step=state.step, epoch=epoch, lr=lr,
                               tau=tau)
                loss_sum.zero_()
                steps_since_log = 0
                if stop.now() and state.step < plan.total_steps:  # a stop signal: every rank stops at this step
                    meter.pause()
                    last_loss, pending = _report(pending, loss_mean, bar, files, run_dir), None
                    files.save(checkpoint(False, loss_sum))
                    raise stop.stopped(state.step, plan.total_steps, run_dir)

            # checkpoint: outside the timed region (sync)
            if cfg.run.ckpt_every_steps and state.step % cfg.run.ckpt_every_steps == 0 \
                    and state.step < plan.total_steps:
                meter.pause()
                if pending is not None:  # written before the checkpoint that a resume would cut metrics back to
                    last_loss, pending = _report(pending, loss_mean, bar, files, run_dir), None
                files.save(checkpoint(False, loss_sum))
                meter.resume()
        meter.pause()
        if pending is not None:  # the epoch's last log point, consumed at this synced point
            last_loss, pending = _report(pending, loss_mean, bar, files, run_dir), None
        state.peak_device_bytes = max(state.peak_device_bytes, device_memory_in_use(device) or 0.0)  # DALI's too

        # the online kNN monitor on a fixed subset, outside the timed region, rank 0 while the others wait
        if cfg.run.knn_every and (epoch + 1) % cfg.run.knn_every == 0 and epoch + 1 < cfg.optim.epochs:
            knn_now = evaluate_knn(model, dataset, cfg, device, subset=cfg.run.knn_subset) if is_rank0 else None
            barrier(world_size)
            if knn_now is not None:
                bar.set_postfix(loss=f"{last_loss:.4f}", knn=f"{knn_now:.1f}")
                probe_now = _probe_top1(step_fn.probe, model, dataset, device, cfg.run.knn_subset)
                files.write_metrics(step=state.step, epoch=epoch, knn_top1=knn_now, knn_subset=cfg.run.knn_subset,
                                    **({} if probe_now is None else {"online_probe_top1": probe_now}))
    bar.close()
    profiler.close()
    return last_loss, startup, loss_sum


def _report(record: dict, loss_mean: DeferredMean, bar, files: RunFiles, run_dir: Path) -> float:
    """Print and write one log point's record, queued a log point earlier; returns its mean loss (stops the run when
    it is not finite)."""
    loss = loss_mean.value() / record.pop("steps")
    rates = record.pop("window").rates()
    if not math.isfinite(loss):
        raise TrainingStopped(f"the loss became {loss} by step {record['step']}; " + last_good(run_dir))
    mfu = rates["mfu"]
    bar.set_postfix(loss=f"{loss:.4f}", lr=f"{record['lr']:.3g}", tau=f"{record['tau']:.4f}",
                    img_s=f"{rates['img_per_s']:.0f}", **({} if mfu is None else {"mfu": f"{100 * mfu:.1f}%"}))
    files.write_metrics(step=record["step"], epoch=record["epoch"], loss=loss, lr=record["lr"], tau=record["tau"],
                        img_per_s=rates["img_per_s"], mfu=mfu, data_wait_share=rates["data_wait_share"])
    return loss


def _final_knn(cfg: Config, dataset: ImageDataset, model: BYOL, device: torch.device, run_dir: Path, is_rank0: bool,
               world_size: int, make_encoder: EncoderMaker) -> tuple[float | None, float | None]:
    """kNN of the trained encoder and of the random-init one (rebuilt from the seed), rank 0 while the others wait.
    The run is saved already: a failure here is one line saying so, and `--resume` runs the evaluation again."""
    try:
        knn_trained = evaluate_knn(model, dataset, cfg, device) if is_rank0 else None
        knn_random = _random_init_knn(cfg, dataset, device, make_encoder) if is_rank0 else None
    except Exception as e:  # noqa: BLE001 (any failure: the trained run is kept, the error is one line)
        why = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise TrainingStopped(f"the final evaluation failed ({why}); the trained run is kept in {run_dir / CHECKPOINT}"
                              f": `fastbyol train --resume {run_dir}` evaluates it again") from None
    barrier(world_size)
    return knn_trained, knn_random


# ----------------------------------------------------------------------------------------------------------- helpers
def _build_training(cfg: Config, plan: Resolved, dataset: ImageDataset, device: torch.device, state: TrainState,
                    ckpt: dict | None, rank: int, make_encoder: EncoderMaker) -> tuple[BYOL, TwoViewLoader, LARS]:
    """The model, this rank's loader and the optimizer, from the seed, or from the checkpoint when resuming."""
    torch.manual_seed(cfg.run.seed)
    np.random.seed(cfg.run.seed)
    model = build_model(cfg, device, make_encoder)
    view1, view2 = views_from_config(cfg)
    source = dataset.pretraining_source
    # the online probe's labels: array sources (gathered by the rows DALI's source names), labelled folders and
    # shards (the reader's labels, the graph's last output), on either device; the draws stay the same either way
    labels = probe_labels(dataset) if cfg.run.online_probe and plan.accumulate == 1 else None  # (_online_probe)
    loader = TwoViewLoader(source, plan.local_batch, cfg.data.image_size, seed=cfg.run.seed, labels=labels,
                           device=device.type, num_threads=cfg.data.num_threads, view1=view1, view2=view2,
                           gray_input=dataset.gray, shard_id=rank, num_shards=plan.world_size,
                           checkpoint=state.data_states[rank] if state.data_states else None, augment=cfg.augment)
    optimizer = build_optimizer(cfg.optim, model)  # LARS or AdamW, with the decay / trust-ratio exclusions
    if ckpt is not None:
        try:
            model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
            torch.set_rng_state(state.torch_rngs[rank])
        except (RuntimeError, ValueError, KeyError, IndexError) as e:
            raise FastByolError(f"the checkpoint does not fit its config.json ({cfg.model.arch}, {cfg.model.stem} "
                                f"stem, {cfg.data.image_size} px): {str(e).strip().splitlines()[0][:200]}") from None
    return model, loader, optimizer


def _online_probe(cfg: Config, plan: Resolved, dataset: ImageDataset, model: BYOL, loader: TwoViewLoader,
                  device: torch.device, log) -> OnlineProbe | None:
    """The online linear probe (fastbyol.evaluation.probe) where it is on, the pretraining images have labels and the
    loader hands them over (arrays, labelled folders and shards), one forward a step (no --accumulate)."""
    if not cfg.run.online_probe:
        return None
    why = ("the pretraining images have no labels" if probe_labels(dataset) is None else
           "it reads one forward a step, and --accumulate splits the step" if plan.accumulate > 1 else
           loader.labels_note or "the loader hands over no labels" if not loader.with_labels else None)
    if why is not None:
        log(f"online probe: off ({why}; --no-online-probe silences this)")
        return None
    return OnlineProbe(model.online_encoder, model.feature_dim, dataset.num_classes, device, cfg.run.seed)


def _probe_top1(probe: OnlineProbe | None, model: BYOL, dataset: ImageDataset, device: torch.device,
                subset: int | None = None) -> float | None:
    """The online probe's test top-1 (%): the kNN check's queries (a quarter of `subset`, evenly spaced) or the
    whole test split."""
    if probe is None:
        return None
    queries = slice(None)
    if subset is not None:
        n_q = max(1, min(subset // 4, len(dataset.test_images)))
        queries = np.linspace(0, len(dataset.test_images) - 1, n_q).astype(int)
    return probe.accuracy(model.online_encoder, dataset.test_images[queries], dataset.test_labels[queries], device)


def _default_run_dir(cfg: Config) -> Path:
    return Path("runs") / f"{cfg.preset}-{datetime.now(timezone.utc).strftime('%Y%m%d-%H%M%S')}"


def _check_resumable(state: TrainState, resume, world_size: int, num_images: int, total_steps: int) -> None:
    if state.step > total_steps:
        raise FastByolError(f"{resume}: its checkpoint is at step {state.step}, past the run's {total_steps} steps "
                            "(a damaged checkpoint or a changed config.json)")
    if state.world_size != world_size:
        raise FastByolError(f"{resume}: the run was checkpointed with {state.world_size} processes; resume it with as "
                            f"many (got {world_size})")
    if state.num_images and state.num_images != num_images:
        raise FastByolError(f"{resume}: the run trained on {state.num_images} images, the dataset now has "
                            f"{num_images}; its schedule would change: resume over the same data, or start a new run")


def _distributed(model: BYOL, device: torch.device, world_size: int):
    """The network the step runs: the model itself, or under torchrun DDP with cross-replica BN (GlobalBatchNorm, one
    functional all-reduce on NCCL and gloo: no graph break under torch.compile). The BN buffers are equal on every
    rank by construction, so DDP does not broadcast them; the gradient buckets are views with each parameter's own
    (channels_last) strides."""
    if world_size == 1:
        return model
    import inspect

    from torch.nn.parallel import DistributedDataParallel

    from .system.distributed import convert_batchnorm

    convert_batchnorm(model, device.type)
    no_buffer_sync = ({"forward_sync_buffers": False}  # newer torch's name for the same switch
                      if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
                      else {"broadcast_buffers": False})
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                   gradient_as_bucket_view=True, **no_buffer_sync)


def _log_start(log, cfg: Config, plan: Resolved, dataset: ImageDataset, model: BYOL, run_dir: Path,
               device: torch.device, state: TrainState, resume, image_flops: float = 0.0) -> None:
    log(f"fastbyol {__version__}: {dataset.describe()}")
    if dataset.startup_seconds:
        log("startup: " + ", ".join(f"{k} {v:.1f} s" for k, v in dataset.startup_seconds.items())
            + (f" (manifest {dataset.manifest})" if dataset.manifest else ""))
    if dataset.skipped_files:
        log(f"skipped {dataset.skipped_files} bad files (--skip-bad-files)")
    log(f"run directory {run_dir}; device {device}" + (f" x {plan.world_size} processes" if plan.world_size > 1 else "")
        + f"; kernels {kernel_backend(device)}; compile {plan.compile_mode}; "
        f"{sum(p.numel() for p in model.online_parameters()) / 1e6:.2f}M online parameters ({cfg.model.arch}, "
        f"{cfg.optim.optimizer}); {image_flops / 1e9:.3g} GFLOP an image"
        + ("" if resume is None else f"; resumed at step {state.step}"))
    log(f"resolved: {plan.local_batch} images a step per process, {plan.steps_per_epoch} steps an epoch, "
        f"{plan.total_steps} steps ({plan.warmup_steps} warmup), peak lr {plan.peak_lr:g}, views {plan.input_dtype}"
        + (f", {plan.accumulate} micro-batches of {plan.micro_batch} a step" if plan.accumulate > 1 else "")
        + (", bf16 autocast" if plan.autocast_bf16 else ""))


def _random_init_knn(cfg: Config, dataset: ImageDataset, device: torch.device,
                     make_encoder: EncoderMaker) -> float | None:
    """kNN top-1 of the random-init encoder: rebuilt from the seed exactly as the model's encoder was (the encoder is
    the first thing drawn after seeding), so the figure is the one before training, computed off the critical path."""
    if not dataset.has_knn:
        return None
    torch.manual_seed(cfg.run.seed)
    encoder = make_encoder().to(device=device, memory_format=torch.channels_last)
    return evaluate_knn(encoder, dataset, cfg, device)


def _summary(cfg: Config, plan: Resolved, state: TrainState, meter: ThroughputMeter, model: BYOL,
             dataset: ImageDataset, device: torch.device, mode: str, knn_trained, knn_random, final_loss: float,
             resumed: bool) -> dict:
    rates = meter.summary()
    return dict(
        knn_top1=knn_trained,
        knn_top1_random_init=knn_random,
        knn_gain=None if knn_trained is None or knn_random is None else knn_trained - knn_random,
        img_per_s=rates["img_per_s"],  # steady state: the first step of each process is left out (warmup_seconds)
        train_seconds=rates["train_seconds"],
        warmup_seconds=rates["warmup_seconds"],
        step_ms=rates["step_ms"],
        data_wait_share=rates["data_wait_share"],  # of the training time, waiting for batches
        flops_per_image=meter.flops_per_image,
        mfu=rates["mfu"],
        peak_memory_gb=torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None,  # torch's
        peak_device_memory_gb=state.peak_device_bytes / 1e9 if device.type == "cuda" else None,  # all, at log points
        final_loss=final_loss,
        epochs=cfg.optim.epochs,
        steps=state.step,
        batch_size=cfg.data.batch_size,
        world_size=plan.world_size,
        compile=mode,
        dataset=dataset.describe(),
        skipped_files=dataset.skipped_files,
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} "
                                                                                  "threads)",
        kernels=kernel_backend(device),
        versions=library_versions(),
        params_sha256=params_sha256(model),
        preset=cfg.preset,
        seed=cfg.run.seed,
        resumed=resumed,
    )


class _CallableModule(type(sys)):
    """`fastbyol.train(cfg, ...)` calls `train` (the package reaches this module by that name); the module itself stays
    as it is, so `import fastbyol.train` and its names work unchanged."""

    def __call__(self, *args, **kwargs):
        return train(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
