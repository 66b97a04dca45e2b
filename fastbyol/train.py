"""The BYOL trainer: `train(cfg)` builds the run, runs one flat loop over its steps, evaluates and writes the summary.

    fastbyol train [--preset NAME] [--data PATH] [--epochs N] [--batch-size N] [--seed S] [--out DIR] ...

A step (`byol_step`): two DALI views -> the online and target networks, each once on both views stacked
(fastbyol.models.networks: compiled per network, DDP around the online network under torchrun) -> the fused
symmetric loss -> backward -> one LARS (or AdamW) step at lr_at(step) -> the EMA of the target at tau_at(step), after
the optimizer step; the online probe trains on the step's view-1 features, one of the networks' outputs. With
`--accumulate N` the same step runs N micro-batches of forward and backward before its one optimizer step.

The loop takes one object, the `Run`: the model and the step, the loader, the optimizer, the meter, the run files,
the log points, the checkpoints and the stop check, each a component with one small interface (fastbyol.run,
fastbyol.augment, fastbyol.evaluation). It asks them at its step boundaries: a log point every `--log-every` steps
(no host sync: the figures arrive one log point later), a checkpoint every `--ckpt-every-steps`, a stop check at each
log point (a signal stops every rank at the same step), the kNN monitor every `--knn-every` epochs.
"""

from __future__ import annotations

import contextlib
import copy
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .augment import LoaderSettings, TwoViewLoader, views_from_config
from .config import Config, Resolved, require_config
from .data import DataRequest, ImageDataset, Ranks, absolute_data_spec, resolve_dataset
from .errors import FastByolError, TrainingStopped
from .evaluation.monitor import evaluate_knn, probe_top1, random_init_knn
from .evaluation.probe import OnlineProbe, probe_labels, probe_reads_labels
from .kernels import byol_loss_symmetric, check_backend, ema_update_, kernel_backend, op_form
from .models import BYOL, OwnEncoders, build_encoder, call_factory, params_sha256
from .models.networks import StepNetworks, compile_networks
from .optim import build_optimizer
from .reference import lr_at, tau_at
from .run.checkpoint import Checkpoints, last_good, load_run, new_run_id, state_bytes
from .run.disk import describe_write_error
from .run.files import BadFiles, RunFiles, check_out_outside_data
from .run.meter import ThroughputMeter
from .run.naming import run_dir_for
from .run.names import CHECKPOINT, PROFILE, SUMMARY, TENSORBOARD
from .run.outputs import refuse_inside_run
from .run.perf import device_memory_in_use, flops_per_image, library_versions, peak_flops
from .run.preemption import StopCheck
from .run.profiling import StepProfiler
from .run.reporting import LogPoints, Reporter, TensorBoardSink
from .run.textlog import TextLog, text_lines_wanted
from .run.state import TrainState
from .system.agreement import agree, dataset_facts, settings_facts
from .system.bounds import check_machine_bounds
from .system.data_parallel import wrap_online
from .system.distributed import barrier, broadcast_object, close_distributed, explain, init_distributed
from .system.environment import check_environment
from .version import __version__


# ------------------------------------------------------------------------------------------------------- the model
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


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise FastByolError("--device cuda, but torch sees no CUDA GPU")
    return torch.device(name)


# -------------------------------------------------------------------------------------------------------- the step
def _ddp_of(net):
    """The DDP module of the step's networks (DDP around the online network), or a network that is DDP (or
    torch.compile of DDP); None without one."""
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(net, StepNetworks):
        return net.ddp()
    inner = getattr(net, "_orig_mod", net)  # torch.compile's wrapper keeps the module it compiled here
    return inner if isinstance(inner, DistributedDataParallel) else None


def _no_sync(net):
    """DDP's no_sync around all but the last micro-batch's backward; nothing to hold back without DDP."""
    ddp = _ddp_of(net)
    return ddp.no_sync() if ddp is not None else contextlib.nullcontext()


def micro_batches(v1: torch.Tensor, v2: torch.Tensor, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The two views cut into n equal slices along the batch: n pairs of (B/n, 3, S, S) views of the same memory (a
    channels_last batch gives channels_last slices); the views themselves when n is 1. B must divide by n
    (Config.resolve checks it)."""
    if n == 1:
        return [(v1, v2)]
    return list(zip(v1.chunk(n), v2.chunk(n), strict=True))


def byol_step(net, optimizer, ema_pairs: tuple[list, list], views: tuple[torch.Tensor, torch.Tensor], lr: float,
              tau: float, n: int = 1, bf16: bool = False) -> torch.Tensor:
    """One BYOL optimizer step; returns the loss as a device tensor (no host sync).

    net: the step's networks (fastbyol.models.networks.StepNetworks), the BYOL module, or it wrapped in DDP and/or
    torch.compile (anything returning p1, p2, z1, z2 first);
    ema_pairs: (target, online) parameter lists (BYOL.ema_pairs); views: the two (B, 3, S, S) channels_last views;
    bf16: autocast the forward (CUDA).

    n > 1 micro-batches (gradient accumulation, --accumulate N): the views are cut into N slices along the batch
    (views of the same memory, no copy), one forward and backward each. A slice's loss is the mean over its B/N
    images; scaled by 1/N before its backward, the summed gradient is the mean over the B images, and DDP's average
    over the processes makes it the mean over the global batch: the gradient of one big batch. DDP all-reduces the
    gradients only in the last backward (`no_sync` around the others). BatchNorm normalises each micro-batch with
    its own statistics, so a step equals the big-batch step exactly only for a model without batch statistics.
    The returned loss is the mean of the slices' losses. Then one optimizer step and one EMA update: schedules, log
    points and checkpoints count optimizer steps."""
    optimizer.set_lr(lr)
    # under DDP the gradients are its buckets' views (wrap_online): zeroed in place, the backward adds into them
    optimizer.zero_grad(set_to_none=_ddp_of(net) is None)
    v1, v2 = views
    parts = micro_batches(v1, v2, n)
    loss_sum = None
    for i, (m1, m2) in enumerate(parts):
        with _no_sync(net) if i < len(parts) - 1 else contextlib.nullcontext():
            with torch.autocast(device_type=v1.device.type, dtype=torch.bfloat16, enabled=bf16):
                p1, p2, z1, z2 = net(m1, m2)[:4]  # BN: this micro-batch's statistics
                loss = byol_loss_symmetric(p1, p2, z1, z2)  # bf16 predictions and targets, fp32 accumulation
            (loss / n if n > 1 else loss).backward()
        loss_sum = loss.detach() if loss_sum is None else loss_sum + loss.detach()
    optimizer.step()
    ema_update_(*ema_pairs, tau)  # the target moves after the optimizer step
    return loss_sum / n if n > 1 else loss_sum


def _compile_error(e: BaseException) -> bool:
    """Whether an exception comes from torch.compile's machinery (Dynamo, AOTAutograd, Inductor)."""
    try:
        from torch._dynamo.exc import TorchDynamoException
    except ImportError:
        return False
    return isinstance(e, TorchDynamoException) or type(e).__module__.startswith(("torch._inductor", "torch._dynamo"))


class TrainStep:
    """The step the loop calls: `byol_step` on the run's networks, then the online probe's step on the view-1
    features they returned. Its first call in a process compiles (the online and target networks, each on its own:
    `compile_networks`); under --compile auto a compiler failure there prints one warning and the step runs again
    eagerly from the state before it (the buffers a partly run forward updated are put back).

    online: DDP around the model's online network (`fastbyol.system.data_parallel.wrap_online`, several processes),
    or None (one process)."""

    def __init__(self, model: BYOL, online, optimizer, resolved: Resolved, may_fall_back: bool, log):
        self.model, self.online, self.optimizer, self.log = model, online, optimizer, log
        self.ema_pairs = model.ema_pairs()
        self.micro_batches, self.bf16 = resolved.accumulate, resolved.autocast_bf16
        self.mode = resolved.compile_mode
        self.net = compile_networks(model, self.mode, online=online)
        self.may_fall_back = may_fall_back and self.mode != "off"
        # the buffers before the first step, for a fallback: a network compiled block by block runs its stem eagerly
        # (BN statistics updated) before a block's compilation can fail
        self._buffers = {n: b.clone() for n, b in model.named_buffers()} if self.may_fall_back else None
        self.probe: OnlineProbe | None = None  # trained on the step's view-1 features after it

    def __call__(self, v1: torch.Tensor, v2: torch.Tensor, lr: float, tau: float,
                 labels: torch.Tensor | None = None) -> torch.Tensor:
        try:
            loss = byol_step(self.net, self.optimizer, self.ema_pairs, (v1, v2), lr, tau, self.micro_batches,
                             self.bf16)
        except Exception as e:  # noqa: BLE001 (only a failed compilation at the first step is caught)
            if not (self.may_fall_back and _compile_error(e)):
                raise
            self.log(f"warning: torch.compile failed ({type(e).__name__}: {str(e).splitlines()[0][:200]}); training "
                     "continues without it (--compile off skips the attempt)")
            self._fall_back()
            return self(v1, v2, lr, tau, labels)
        if self.probe is not None:
            self.probe.step(self.net.features, labels)  # h1, the online encoder's view-1 features, detached
        return loss

    def _fall_back(self) -> None:
        """Eager from now on, from the state before the failed step: the buffers as they were, the networks
        uncompiled (a compiled block's forward removed); the parameters had not changed (no optimizer step)."""
        with torch.no_grad():
            for name, buffer in self.model.named_buffers():
                buffer.copy_(self._buffers[name])
        self.net = compile_networks(self.model, "off", online=self.online)
        self.mode, self.may_fall_back, self._buffers = "off", False, None

    def first_step_passed(self) -> None:
        """The first step went through: no fallback after it."""
        self.may_fall_back, self._buffers = False, None


# --------------------------------------------------------------------------------------------------------- the run
@dataclass
class Launch:
    """What `train` was asked to do and where: the settings (the run's own config.json on a resume), the device and
    this process's place among the ranks."""

    cfg: Config
    device: torch.device
    rank: int
    world_size: int
    make_encoder: EncoderMaker
    progress: bool = True
    log: Callable = print
    resume: Path | None = None  # the run directory of a resume
    state: TrainState | None = None  # a resume's training state and checkpoint
    ckpt: dict | None = None


@dataclass
class Run:
    """Everything the loop needs, built once (`_start`): the settings and what follows from them, the data, the
    model and its step, and the components the loop asks at its step boundaries."""

    launch: Launch
    resolved: Resolved
    run_dir: Path
    dataset: ImageDataset
    state: TrainState
    model: BYOL
    optimizer: torch.optim.Optimizer
    loader: TwoViewLoader
    step: TrainStep
    meter: ThroughputMeter
    bad: BadFiles
    files: RunFiles
    image_flops: float
    stop: StopCheck = field(init=False)
    reporter: Reporter = field(init=False)
    log_points: LogPoints = field(init=False)
    checkpoints: Checkpoints = field(init=False)
    profiler: StepProfiler = field(init=False)

    @property
    def cfg(self) -> Config:
        return self.launch.cfg

    @property
    def device(self) -> torch.device:
        return self.launch.device

    @property
    def rank(self) -> int:
        return self.launch.rank

    @property
    def world_size(self) -> int:
        return self.launch.world_size

    @property
    def is_rank0(self) -> bool:
        return self.launch.rank == 0

    @property
    def log(self) -> Callable:
        return self.launch.log

    @property
    def probe(self) -> OnlineProbe | None:
        return self.step.probe

    def open(self) -> None:
        """Take the run directory (collective) and start the components that write into it."""
        from tqdm import tqdm

        from .system.native import CurrentStderr

        state, resolved = self.state, self.resolved
        self.files.open(self.cfg, resolved, None if self.launch.resume is None else state.step,
                        2 * state_bytes(self.model.state_dict()), self.rank, state.run_id)
        _log_start(self)
        # CurrentStderr: the bar writes between batches, while an encoded source's loader holds fd 2 (native.py); where
        # stderr is a file (a job's log) or the bar is off, one text line a log point instead (textlog.py)
        text = text_lines_wanted(self.launch.progress)
        bar = tqdm(total=resolved.total_steps, initial=state.step, unit="step", dynamic_ncols=True, mininterval=1.0,
                   disable=text or not self.is_rank0, file=CurrentStderr())
        self.reporter = Reporter(self.files.write_metrics, bar, self._sinks(text) if self.is_rank0 else [])
        self.log_points = LogPoints(self.device, self.world_size, self.cfg.run.log_every, self.reporter,
                                    lambda: last_good(self.run_dir))
        self.checkpoints = Checkpoints(self)
        self.stop = StopCheck(self.world_size)
        self.profiler = StepProfiler(resolved.profile_steps if self.is_rank0 else None, self.run_dir / PROFILE,
                                     self.device, self.log, self.meter)

    def _sinks(self, text: bool) -> list:
        """Where rank 0's records go besides metrics.jsonl: TensorBoard, the text lines, Weights & Biases (--wandb)."""
        sinks = [TensorBoardSink(self.run_dir / TENSORBOARD)]
        if text:
            sinks.append(TextLog(self.resolved.total_steps, self.cfg.optim.epochs))
        if self.cfg.run.wandb:
            from .run.wandb_sink import WandbSink

            sinks.append(WandbSink(self.cfg.run.wandb, self.run_dir, self.run_dir.name,
                                   {**self.cfg.to_dict(), "resolved": self.resolved.to_dict()}))
        return sinks

    def close(self) -> None:
        """Stop writing (metrics, TensorBoard, the lock) and stop the loader (DALI stopped, fd 2 given back)."""
        if hasattr(self, "reporter"):
            self.reporter.close()
        self.files.close()
        self.loader.close()


def train(cfg: Config, progress: bool = True, log=print, resume: str | Path | None = None,
          encoder=None, own: OwnEncoders | None = None) -> tuple[Path, dict]:
    """Run BYOL pretraining as `cfg` says; returns (run directory, summary). Bad settings raise FastByolError
    before anything is written.

    Under torchrun (WORLD_SIZE > 1) every process calls this: DDP over the ranks, cfg.data.batch_size is the global
    batch, each rank reads its own shard; rank 0 alone logs and writes the run directory.

    resume: a run directory with a checkpoint.pt; its own config.json is used and training continues exactly where
    the checkpoint was taken (model, optimizer, step, data position and random states of every rank).

    encoder: an encoder of your own instead of cfg.model.arch: an nn.Module mapping (B, 3, H, W) to (B, D), or a
    callable returning one (called after the seed is set; it may take `image_size` and `stem`). D is its
    `num_features` / `feature_dim`, else found by one forward. Give it again to resume such a run.

    own: on a resume, the encoders of the user's own that the run's config.json may name and this call may import
    (models.OwnEncoders: `--arch module:factory` on the command line); a run folder never imports one by itself
    (an `encoder` given here stands in for the one it names)."""
    check_environment()  # RANK, WORLD_SIZE, MASTER_PORT, FASTBYOL_CACHE...: one line before anything is read or made
    state, ckpt = None, None
    if resume is not None and not isinstance(resume, (str, os.PathLike)):
        raise FastByolError(f"train(resume=...): expected a run directory (str or Path), got {type(resume).__name__}")
    if resume is None or cfg is not None:  # a resume uses the run's own config.json: cfg may be None there
        require_config(cfg)
    if resume is not None:
        try:
            own = OwnEncoders(own.names if own is not None else frozenset(), encoder)
        except ValueError as e:  # an encoder= that is neither a module nor a callable
            raise FastByolError(f"train(encoder=...): {e}") from None
        cfg, state, ckpt = load_run(resume, own)
        if state.finished:
            raise FastByolError(f"{resume}: the run already finished ({state.step} steps)")
    else:  # a new run records its data as absolute paths: its evaluations and resume find them from any folder
        cfg = copy.deepcopy(cfg)
        cfg.data.data, cfg.data.test_data = absolute_data_spec(cfg.data.data), absolute_data_spec(cfg.data.test_data)
        if encoder is not None:
            cfg.model.arch = encoder_name(encoder)  # what config.json says the encoder was
    cfg.validate()
    device = pick_device(cfg.run.device)
    check_backend(device)  # FASTBYOL_KERNELS: one line before anything is created
    rank, world_size, created = init_distributed(device.type, cfg.run.dist_timeout)  # every wait: --dist-timeout
    old_umask = os.umask(0o077)  # run files readable by their owner only
    try:
        # collective: every rank was started with these settings (one line naming the first difference)
        agree({**settings_facts(cfg, resume, 0 if state is None else state.step),
               "the kernels": f"{kernel_backend(device)} ({op_form()})"}, rank, world_size)  # FASTBYOL_KERNELS...
        if encoder is None:  # threads, widths, memory, before anything is allocated (an encoder of the caller's own:
            check_machine_bounds(cfg, device, world_size)  # the caller sized it)
        launch = Launch(cfg, device, rank, world_size, EncoderMaker(cfg, encoder), progress,
                        log if rank == 0 else _silent, None if resume is None else Path(resume), state, ckpt)
        return _train(launch)
    except OSError as e:  # outside a checkpoint write (metrics, TensorBoard): one line, not a traceback
        mapped = describe_write_error(e, Path(e.filename or "the run directory"))
        if mapped is None:
            raise
        raise mapped from None
    except Exception as e:  # a peer lost, a collective timed out (gloo, NCCL, DDP): one line on every rank
        mapped = explain(e) if created else None
        if mapped is None:
            raise
        raise mapped from None
    finally:
        os.umask(old_umask)
        if created:
            close_distributed()


def _silent(*args, **kwargs) -> None:
    """The log of every rank but 0: rank 0 alone speaks."""


def _train(launch: Launch) -> tuple[Path, dict]:
    run = _start(launch)
    try:
        run.open()
        _loop(run)
        summary = _finish(run)
    except BaseException:  # whatever stopped a new run before its first checkpoint: nothing is left behind
        if launch.resume is None and not isinstance(sys.exc_info()[1], TrainingStopped):
            run.close()
            run.files.remove_if_unfinished()
        raise
    finally:
        run.close()
    if summary["knn_top1"] is not None and summary["knn_top1_random_init"] is not None:
        trained, random = summary["knn_top1"], summary["knn_top1_random_init"]
        run.log(f"kNN top-1: trained {trained:.2f}% vs random-init {random:.2f}% ({trained - random:+.2f} points); "
                f"{summary['img_per_s']:.0f} img/s over {run.state.step} steps")
    run.log(f"summary: {run.run_dir / SUMMARY}")
    return run.run_dir, summary


def _start(launch: Launch) -> Run:
    """The run's data, model, loader, optimizer, step and meter, from the seed, or from the checkpoint on a resume."""
    cfg, device, rank, world_size = launch.cfg, launch.device, launch.rank, launch.world_size
    if device.type == "cuda":
        device = launch.device = torch.device("cuda", torch.cuda.current_device())  # LOCAL_RANK's GPU
        torch.backends.cudnn.benchmark = True  # fixed shapes: autotune the convolutions once
    run_dir = launch.resume or run_dir_for(cfg)  # --out, runs/NAME, or runs/DATA-PRESET-UTCTIME (naming.py)
    run_dir = broadcast_object(run_dir, rank, world_size)  # one name (its time stamp) for every rank
    check_out_outside_data(run_dir, cfg.data.data, cfg.data.data_format)
    if launch.resume is None:  # a new run never goes inside another run's folder (whose clean-up would take it)
        refuse_inside_run(run_dir, "--out", itself=False)
    request = DataRequest(image_size=cfg.data.image_size, skip_bad_files=cfg.data.skip_bad_files, seed=cfg.run.seed,
                          test_data=cfg.data.test_data)
    dataset = resolve_dataset(cfg.data.data, request, Ranks(rank, world_size, lambda: barrier(world_size)),
                              data_format=cfg.data.data_format)
    resolved = cfg.resolve(device.type, world_size, dataset.num_pretraining, dataset.name)
    if world_size > 1:  # collective: the same data and plan on every rank (the fingerprint reads the file list)
        agree(dataset_facts(dataset, resolved), rank, world_size)
    state = launch.state
    if state is not None:
        state.check_resumable(launch.resume, world_size, dataset.num_pretraining, resolved.total_steps)
    if state is None:  # a new run: its id, the same on every rank, goes into config.json and every checkpoint
        state = TrainState(world_size=world_size, num_images=dataset.num_pretraining,
                           run_id=broadcast_object(new_run_id(), rank, world_size))
    bad = BadFiles(run_dir, dataset.pretraining_source, cfg.data.skip_bad_files, launch.resume is not None, rank,
                   world_size)

    torch.manual_seed(cfg.run.seed)
    np.random.seed(cfg.run.seed)
    model = build_model(cfg, device, launch.make_encoder)
    loader = _loader(launch, resolved, dataset, state)
    optimizer = build_optimizer(cfg.optim, model)  # LARS or AdamW, with the decay / trust-ratio exclusions
    if launch.ckpt is not None:
        _restore(launch, model, optimizer, state)
    loader.on_skip = lambda name, why: launch.log(f"skipped {name}: {why} (--skip-bad-files)")
    image_flops = flops_per_image(model, cfg.data.image_size)  # on the plain model: no collectives
    online = wrap_online(model, device, cfg.distributed) if world_size > 1 else None  # BN over ranks, DDP
    step = TrainStep(model, online, optimizer, resolved, may_fall_back=cfg.run.compile == "auto", log=launch.log)
    step.probe = _online_probe(launch, resolved, dataset, model)  # after the FLOP count's copy of the model
    if step.probe is not None and state.probe:  # a resume: the probe continues where it was
        step.probe.load_state_dict(state.probe, str(launch.resume))
    meter = ThroughputMeter(device, cfg.data.batch_size, image_flops, peak_flops(device), world_size)
    if state.meter:
        meter.load_state_dict(state.meter)
    files = RunFiles(run_dir, writes=rank == 0, log=launch.log)
    return Run(launch, resolved, run_dir, dataset, state, model, optimizer, loader, step, meter, bad, files,
               image_flops)


def loader_labels(cfg: Config, resolved: Resolved, dataset: ImageDataset) -> tuple[np.ndarray | None, bool]:
    """What the loader is asked to hand over for the online probe: (an array source's labels, gathered by the rows
    DALI's source names: TwoViewLoader's labels=; whether labelled folders and shards hand over their reader's
    labels, the graph's last output: reader_labels=), on either device; (None, False) where the probe is off, the
    images have no labels, or --accumulate splits the step (the probe reads one forward a step). The draws are the
    same either way."""
    if not (cfg.run.online_probe and resolved.accumulate == 1):
        return None, False
    return probe_labels(dataset), probe_reads_labels(dataset)


def _loader(launch: Launch, resolved: Resolved, dataset: ImageDataset, state: TrainState) -> TwoViewLoader:
    """This rank's two-view loader, at the checkpoint's data position on a resume."""
    cfg, rank = launch.cfg, launch.rank
    labels, reader_labels = loader_labels(cfg, resolved, dataset)
    settings = LoaderSettings(resolved.local_batch, cfg.data.image_size, seed=cfg.run.seed, device=launch.device.type,
                              num_threads=cfg.data.num_threads, shard_id=rank, num_shards=resolved.world_size,
                              gray_input=dataset.gray, views=views_from_config(cfg))
    return TwoViewLoader(dataset.pretraining_source, settings, cfg.augment,
                         state.data_states[rank] if state.data_states else None, labels=labels,
                         reader_labels=reader_labels)


def _restore(launch: Launch, model: BYOL, optimizer, state: TrainState) -> None:
    """The checkpoint's weights, optimizer state and this rank's torch RNG state, or one line when they do not fit."""
    cfg = launch.cfg
    try:
        model.load_state_dict(launch.ckpt["model"])
        optimizer.load_state_dict(launch.ckpt["optimizer"])
        torch.set_rng_state(state.torch_rngs[launch.rank])
    except (RuntimeError, ValueError, KeyError, IndexError) as e:
        raise FastByolError(f"the checkpoint does not fit its config.json ({cfg.model.arch}, {cfg.model.stem} "
                            f"stem, {cfg.data.image_size} px): {str(e).strip().splitlines()[0][:200]}") from None


def _online_probe(launch: Launch, resolved: Resolved, dataset: ImageDataset, model: BYOL) -> OnlineProbe | None:
    """The online linear probe (fastbyol.evaluation.probe) where it is on, the pretraining images have labels the
    loader hands over (arrays, labelled folders and shards), one forward a step (no --accumulate)."""
    cfg = launch.cfg
    if not cfg.run.online_probe:
        return None
    labelled = probe_labels(dataset) is not None or probe_reads_labels(dataset)
    why = ("the pretraining images have no labels" if not labelled else
           "it reads one forward a step, and --accumulate splits the step" if resolved.accumulate > 1 else None)
    if why is not None:
        launch.log(f"online probe: off ({why}; --no-online-probe silences this)")
        return None
    return OnlineProbe(model.feature_dim, dataset.num_classes, launch.device, cfg.run.seed)


# -------------------------------------------------------------------------------------------------------- the loop
def _loop(run: Run) -> None:
    """The training loop, from the state's step to the end."""
    cfg, resolved, state, meter = run.cfg, run.resolved, run.state, run.meter
    start_epoch, resume_offset = divmod(state.step, resolved.steps_per_epoch)
    input_dtype = getattr(torch, resolved.input_dtype)
    for epoch in range(start_epoch, cfg.optim.epochs):
        meter.resume()
        for v1, v2, *labels in meter.batches(run.loader.epoch(resume_offset if epoch == start_epoch else 0)):
            run.profiler.at(state.step, meter.last_wait)  # --profile START:STOP records these steps
            # (B, 3, S, S) channels_last views, one per augmentation spec
            v1 = v1.to(device=run.device, dtype=input_dtype, non_blocking=True)
            v2 = v2.to(device=run.device, dtype=input_dtype, non_blocking=True)
            lr = lr_at(state.step, resolved.total_steps, resolved.warmup_steps, resolved.peak_lr)
            tau = tau_at(state.step, resolved.total_steps, cfg.optim.tau_base)
            run.log_points.add(run.step(v1, v2, lr, tau, labels[0] if labels else None))
            state.step += 1
            if meter.step():  # sync, once: the first step of this process is timed apart (compilation)
                run.step.first_step_passed()
                run.log(f"first step (compile {run.step.mode}, warm-up): {meter.warmup_seconds:.1f} s; its batch "
                        f"took {meter.last_wait:.1f} s")
            run.reporter.bar.update(1)

            # log point: queue this interval's mean loss and the meter's window (no sync), report the previous one
            if run.log_points.due(state.step, resolved.total_steps):
                run.log_points.queue(state.step, epoch, lr, tau, meter.window())  # collective
                if run.stop.now() and state.step < resolved.total_steps:  # a stop signal: every rank stops here
                    meter.pause()
                    run.log_points.flush()
                    run.checkpoints.save()
                    raise run.stop.stopped(state.step, resolved.total_steps, run.run_dir)

            # checkpoint: outside the timed region (sync); the queued log point is written before it, so a resume
            # that cuts metrics.jsonl back to the checkpoint's step keeps it
            if cfg.run.ckpt_every_steps and state.step % cfg.run.ckpt_every_steps == 0 \
                    and state.step < resolved.total_steps:
                meter.pause()
                run.log_points.flush()
                run.checkpoints.save()
                meter.resume()
        meter.pause()
        run.log_points.flush()  # the epoch's last log point, consumed at this synced point
        state.peak_device_bytes = max(state.peak_device_bytes, device_memory_in_use(run.device) or 0.0)  # DALI's too
        if cfg.run.knn_every and (epoch + 1) % cfg.run.knn_every == 0 and epoch + 1 < cfg.optim.epochs:
            _knn_check(run, epoch)
    run.reporter.bar.close()
    run.profiler.close()


def _knn_check(run: Run, epoch: int) -> None:
    """The online kNN monitor (and the online probe) on a fixed subset, outside the timed region, rank 0 while the
    others wait."""
    subset = run.cfg.run.knn_subset
    knn_now = evaluate_knn(run.model, run.dataset, run.cfg, run.device, subset=subset) if run.is_rank0 else None
    barrier(run.world_size)
    if knn_now is None:
        return
    run.reporter.bar.set_postfix(loss=f"{run.log_points.last_loss:.4f}", knn=f"{knn_now:.1f}")
    probe_now = probe_top1(run.probe, run.model, run.dataset, run.device, subset)
    run.reporter.record(step=run.state.step, epoch=epoch, knn_top1=knn_now, knn_subset=subset,
                        **({} if probe_now is None else {"online_probe_top1": probe_now}))


# ------------------------------------------------------------------------------------------------------- the end
def _finish(run: Run) -> dict:
    """The final checkpoint first (a failed evaluation loses nothing), then kNN of the trained and the random-init
    encoder, the summary, and last the checkpoint marked finished: a stop before it resumes into the evaluation and
    the summary again, so no run is left finished without its summary.json."""
    run.checkpoints.save()  # not yet finished: a resume from it runs the evaluation again
    knn_trained, knn_random = _final_knn(run)
    probe_final = probe_top1(run.probe, run.model, run.dataset, run.device) if run.is_rank0 else None
    run.state.knn_top1_random_init = knn_random
    summary = _summary(run, knn_trained, knn_random)
    summary["online_probe_top1"] = probe_final  # None: no probe (--no-online-probe, or no labels)
    if run.bad.names:  # files that passed the checks but that DALI could not decode, replaced while training
        summary["skipped_files"] += run.bad.new_count(run.dataset)
        summary["skipped_while_training"] = sorted(run.bad.names)
        run.log(f"skipped {len(run.bad.names)} files DALI could not decode while training (--skip-bad-files): "
                f"listed in {run.bad.path}")
    if knn_trained is not None:
        run.reporter.record(step=run.state.step, epoch=run.cfg.optim.epochs - 1, knn_top1=knn_trained, final=True,
                            **({} if probe_final is None else {"online_probe_top1": probe_final}))
    if knn_random is not None:
        run.reporter.record(step=0, epoch=-1, knn_top1=knn_random, init="random", final=True)
    run.files.write_summary(summary)
    run.checkpoints.save(finished=True)
    return summary


def _final_knn(run: Run) -> tuple[float | None, float | None]:
    """kNN of the trained encoder and of the random-init one (rebuilt from the seed), rank 0 while the others wait.
    The run is saved already: a failure here is one line saying so, and `--resume` runs the evaluation again."""
    try:
        knn_trained = evaluate_knn(run.model, run.dataset, run.cfg, run.device) if run.is_rank0 else None
        knn_random = (random_init_knn(run.launch.make_encoder, run.dataset, run.cfg, run.device)
                      if run.is_rank0 else None)
    except Exception as e:  # noqa: BLE001 (any failure: the trained run is kept, the error is one line)
        why = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise TrainingStopped(f"the final evaluation failed ({why}); the trained run is kept in "
                              f"{run.run_dir / CHECKPOINT}: `fastbyol train --resume {run.run_dir}` evaluates it "
                              "again") from None
    barrier(run.world_size)
    return knn_trained, knn_random


def _log_start(run: Run) -> None:
    cfg, resolved, dataset, state = run.cfg, run.resolved, run.dataset, run.state
    run.log(f"fastbyol {__version__}: {dataset.describe()}")
    if dataset.startup_seconds:
        run.log("startup: " + ", ".join(f"{k} {v:.1f} s" for k, v in dataset.startup_seconds.items())
                + (f" (manifest {dataset.manifest})" if dataset.manifest else ""))
    if dataset.skipped_files:
        run.log(f"skipped {dataset.skipped_files} bad files (--skip-bad-files)")
    online = sum(p.numel() for p in run.model.online_parameters())
    run.log(f"run directory {run.run_dir}; device {run.device}"
            + (f" x {resolved.world_size} processes" if resolved.world_size > 1 else "")
            + f"; kernels {kernel_backend(run.device)}; compile {resolved.compile_mode}; {online / 1e6:.2f}M online "
            f"parameters ({cfg.model.arch}, {cfg.optim.optimizer}); {run.image_flops / 1e9:.3g} GFLOP an image"
            + ("" if run.launch.resume is None else f"; resumed at step {state.step}"))
    run.log(f"resolved: {resolved.local_batch} images a step per process, {resolved.steps_per_epoch} steps an epoch, "
            f"{resolved.total_steps} steps ({resolved.warmup_steps} warmup), peak lr {resolved.peak_lr:g}, views "
            f"{resolved.input_dtype}"
            + (f", {resolved.accumulate} micro-batches of {resolved.micro_batch} a step"
               if resolved.accumulate > 1 else "")
            + (", bf16 autocast" if resolved.autocast_bf16 else ""))


def _summary(run: Run, knn_trained: float | None, knn_random: float | None) -> dict:
    rates, device = run.meter.summary(), run.device
    return dict(
        knn_top1=knn_trained,
        knn_top1_random_init=knn_random,
        knn_gain=None if knn_trained is None or knn_random is None else knn_trained - knn_random,
        img_per_s=rates["img_per_s"],  # steady state: the first step of each process is left out (warmup_seconds)
        train_seconds=rates["train_seconds"],
        warmup_seconds=rates["warmup_seconds"],
        step_ms=rates["step_ms"],
        data_wait_share=rates["data_wait_share"],  # of the training time, waiting for batches
        flops_per_image=run.meter.flops_per_image,
        mfu=rates["mfu"],
        peak_memory_gb=torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None,  # torch's
        peak_device_memory_gb=run.state.peak_device_bytes / 1e9 if device.type == "cuda" else None,  # all allocators
        final_loss=run.log_points.last_loss,
        epochs=run.cfg.optim.epochs,
        steps=run.state.step,
        batch_size=run.cfg.data.batch_size,
        world_size=run.resolved.world_size,
        compile=run.step.mode,
        dataset=run.dataset.describe(),
        skipped_files=run.dataset.skipped_files,
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} "
                                                                                  "threads)",
        kernels=kernel_backend(device),
        versions=library_versions(),
        params_sha256=params_sha256(run.model),
        preset=run.cfg.preset,
        seed=run.cfg.run.seed,
        resumed=run.launch.resume is not None,
        startup_seconds={**run.dataset.startup_seconds, **({} if run.meter.first_batch_wait is None else
                                                           {"first batch": run.meter.first_batch_wait})},
    )


class _CallableModule(type(sys)):
    """`fastbyol.train(cfg, ...)` calls `train` (the package reaches this module by that name); the module itself stays
    as it is, so `import fastbyol.train` and its names work unchanged."""

    def __call__(self, *args, **kwargs):
        return train(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
