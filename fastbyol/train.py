"""The BYOL training loop: one flat, readable step; helpers around it.

    fastbyol train [--preset NAME] [--data PATH] [--epochs N] [--batch-size N] [--seed S] [--out DIR]

Per step: two DALI views -> online and target forwards (one per view) -> fused symmetric loss -> backward ->
LARS step at lr_at(step) -> EMA of the target at tau_at(step), after the optimizer step. The run directory gets
config.json at the start, then checkpoint.pt, metrics.jsonl and summary.json.

Measured (2-core CPU of this project's machines, torch 2.13 CPU, 2026-11-27): see README.md, "Figures".
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import shutil
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from . import __version__
from .augment import VIEW1, VIEW2, TwoViewLoader
from .checkpoint import atomic_write_json, save_checkpoint
from .config import Config
from .data import ImageDataset, resolve_dataset
from .errors import FastByolError
from .kernels import byol_loss_symmetric, ema_update_, kernel_path
from .knn import knn_top1
from .models import BYOL, build_encoder, params_sha256
from .optim import LARS
from .perf import flops_per_image, library_versions, peak_flops
from .reference import lr_at, scaled_lr, tau_at


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise FastByolError("--device cuda, but torch sees no CUDA GPU")
    return torch.device(name)


def _default_run_dir(cfg: Config) -> Path:
    return Path("runs") / f"{cfg.preset}-{datetime.now(timezone.utc).strftime('%Y%m%d-%H%M%S')}"


def build_model(cfg: Config, device: torch.device) -> BYOL:
    encoder = build_encoder(cfg.model.arch, cfg.model.stem, cfg.data.image_size)
    model = BYOL(encoder, cfg.model.proj_hidden, cfg.model.proj_dim, cfg.model.pred_hidden)
    return model.to(device=device, memory_format=torch.channels_last)


def evaluate_knn(model: BYOL, dataset: ImageDataset, cfg: Config, device: torch.device,
                 subset: int | None = None) -> float | None:
    """kNN top-1 (%) of the online encoder on the dataset's labeled splits; None when it has none.

    subset: at most this many bank images and a quarter as many queries (fixed, evenly spaced): the cheap online
    monitor; None: the full splits."""
    if dataset.train_labels is None or dataset.test_images is None or dataset.test_labels is None:
        return None
    bank, queries = slice(None), slice(None)
    if subset is not None:
        bank = np.linspace(0, len(dataset.train_images) - 1, min(subset, len(dataset.train_images))).astype(int)
        n_q = max(1, min(subset // 4, len(dataset.test_images)))
        queries = np.linspace(0, len(dataset.test_images) - 1, n_q).astype(int)
    return knn_top1(model.online_encoder, dataset.train_images[bank], dataset.train_labels[bank],
                    dataset.test_images[queries], dataset.test_labels[queries], dataset.num_classes, cfg.run.knn_k,
                    cfg.run.knn_temperature, device)


class TrainingStopped(FastByolError):
    """The run stopped on purpose (NaN or Inf loss): its directory and last good checkpoint stay."""


@contextlib.contextmanager
def _removed_on_error(run_dir: Path, enabled: bool):
    """Remove a new run's directory if bad data stops it before its first checkpoint: nothing half-written."""
    try:
        yield
    except TrainingStopped:
        raise
    except FastByolError:
        if enabled and not (run_dir / "checkpoint.pt").exists():
            shutil.rmtree(run_dir, ignore_errors=True)
        raise


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


def _broadcast(obj, rank: int, world_size: int):
    """rank 0's value of a picklable object, on every rank (itself with one process)."""
    if world_size == 1:
        return obj
    import torch.distributed as dist

    box = [obj if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _gather(obj, world_size: int) -> list:
    """Every rank's value of a picklable object, in rank order (collective)."""
    if world_size == 1:
        return [obj]
    import torch.distributed as dist

    out = [None] * world_size
    dist.all_gather_object(out, obj)
    return out


def _tensorboard_writer(folder: Path):
    """A TensorBoard SummaryWriter when the tensorboard package is installed, else None (metrics.jsonl always)."""
    try:
        import tensorboard  # noqa: F401  (torch.utils.tensorboard needs it)
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(log_dir=str(folder))


def _compile_error(e: BaseException) -> bool:
    """Whether an exception comes from torch.compile's machinery (Dynamo, AOTAutograd, Inductor)."""
    try:
        from torch._dynamo.exc import TorchDynamoException
    except ImportError:
        return False
    return isinstance(e, TorchDynamoException) or type(e).__module__.startswith(("torch._inductor", "torch._dynamo"))


def compile_mode(cfg: Config, device: torch.device) -> str:
    """The torch.compile mode the run uses: 'off' or a torch.compile mode name."""
    mode = cfg.run.compile
    if mode == "auto":
        return "default" if device.type == "cuda" else "off"
    return mode


def train(cfg: Config, progress: bool = True, log=print, resume: str | Path | None = None) -> tuple[Path, dict]:
    """Run BYOL pretraining as `cfg` says; returns (run directory, summary). Bad settings raise FastByolError
    before anything is written.

    Under torchrun (WORLD_SIZE > 1) every process calls this: DDP over the ranks, cfg.data.batch_size is the global
    batch, each rank reads its own shard; rank 0 alone logs and writes the run directory.

    resume: a run directory with a checkpoint.pt; its own config.json is used and training continues exactly where
    the checkpoint was taken (model, optimizer, step, data position and random states of every rank)."""
    from .dist import close_distributed, init_distributed

    state = None
    if resume is not None:
        from .evaluate import load_run

        cfg, state = load_run(resume)
        if state.get("finished"):
            raise FastByolError(f"{resume}: the run already finished ({state['step']} steps)")
    cfg.validate()
    device = pick_device(cfg.run.device)
    rank, world_size, created = init_distributed(device.type)
    try:
        return _train(cfg, state, resume, device, rank, world_size, progress, log)
    finally:
        if created:
            close_distributed()


def _train(cfg: Config, state: dict | None, resume, device: torch.device, rank: int, world_size: int,
           progress: bool, log) -> tuple[Path, dict]:
    if device.type == "cuda" and world_size > 1:
        device = torch.device("cuda", torch.cuda.current_device())  # init_distributed chose LOCAL_RANK's GPU
    if cfg.data.batch_size % world_size:
        raise FastByolError(f"--batch-size {cfg.data.batch_size} (the global batch) does not divide over "
                            f"{world_size} processes")
    if state is not None and state.get("world_size", 1) != world_size:
        raise FastByolError(f"{resume}: the run was checkpointed with {state.get('world_size', 1)} processes; resume "
                            f"it with as many (got {world_size})")
    lead = rank == 0
    if not lead:
        log = lambda *a, **k: None  # noqa: E731 (rank 0 alone speaks)
    local_batch = cfg.data.batch_size // world_size
    dataset = resolve_dataset(cfg.data.data, cfg.data.data_format, cfg.data.image_size, cfg.data.skip_bad_files,
                              cfg.run.seed)
    if cfg.data.batch_size > dataset.num_pretraining:
        raise FastByolError(f"--batch-size {cfg.data.batch_size} is larger than the {dataset.num_pretraining} "
                            f"training images of {dataset.name}")
    error = None
    if resume is not None:
        run_dir = Path(resume)
    else:
        run_dir = Path(cfg.run.out) if cfg.run.out else _default_run_dir(cfg)
        if lead and run_dir.exists() and any(run_dir.iterdir()):
            error = f"--out {run_dir} exists and is not empty: choose another folder"
    run_dir, error = _broadcast((run_dir, error), rank, world_size)  # one name (its time stamp) for every rank
    if error:
        raise FastByolError(error)

    torch.manual_seed(cfg.run.seed)
    np.random.seed(cfg.run.seed)
    model = build_model(cfg, device)
    image_flops = flops_per_image(model, cfg.data.image_size, device)  # on the plain model: no collectives
    crop = (cfg.data.crop_min_area, 1.0)
    data_state = None if state is None else state["data_states"][rank]
    loader = TwoViewLoader(dataset.pretraining_source, local_batch, cfg.data.image_size, seed=cfg.run.seed,
                           device="cuda" if device.type == "cuda" else "cpu", num_threads=cfg.data.num_threads,
                           view1=dataclasses.replace(VIEW1, crop_area=crop),
                           view2=dataclasses.replace(VIEW2, crop_area=crop), gray_input=dataset.gray,
                           shard_id=rank, num_shards=world_size, checkpoint=data_state)
    optimizer = LARS(model.online_parameters(), lr=0.0, weight_decay=cfg.optim.weight_decay,
                     momentum=cfg.optim.momentum, trust_coefficient=cfg.optim.trust_coefficient)
    step, train_seconds, images_seen, timed_images = 0, 0.0, 0, 0
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step, train_seconds, images_seen = state["step"], state["train_seconds"], state["images_seen"]
        timed_images = state.get("timed_images", images_seen)
        torch.set_rng_state(state["torch_rngs"][rank])
    net = model
    if world_size > 1:
        from torch.nn.parallel import DistributedDataParallel

        from .dist import convert_batchnorm

        # cross-replica BN as the official recipe (SyncBatchNorm on CUDA, GlobalBatchNorm on gloo); the BN buffers
        # are equal on every rank by construction, so DDP does not broadcast them; the gradient buckets are views
        # with each parameter's own (channels_last) strides
        convert_batchnorm(model, device.type)
        import inspect

        no_buffer_sync = ({"forward_sync_buffers": False}  # newer torch's name for the same switch
                          if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
                          else {"broadcast_buffers": False})
        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                      gradient_as_bucket_view=True, **no_buffer_sync)
    mode = compile_mode(cfg, device)
    eager_net = net
    if mode != "off":
        net = torch.compile(net, mode=None if mode == "default" else mode)

    with _removed_on_error(run_dir, enabled=resume is None and lead):
        if lead:
            run_dir.mkdir(parents=True, exist_ok=True)
            if resume is None:
                atomic_write_json(run_dir / "config.json", cfg.to_dict())
        log(f"fastbyol {__version__}: {dataset.describe()}")
        if dataset.skipped_files:
            log(f"skipped {dataset.skipped_files} bad files (--skip-bad-files)")
        log(f"run directory {run_dir}; device {device}" + (f" x {world_size} processes" if world_size > 1 else "")
            + f"; kernels {kernel_path(device)}; compile {mode}; "
            f"{sum(p.numel() for p in model.online_parameters()) / 1e6:.2f}M online parameters"
            + ("" if state is None else f"; resumed at step {step}"))

        metrics_file = open(run_dir / "metrics.jsonl", "a", buffering=1) if lead else None  # line-buffered
        board = _tensorboard_writer(run_dir / "tensorboard") if lead else None

        def write_metrics(**record) -> None:
            """One record to metrics.jsonl, and its numbers to TensorBoard (when installed) as train/NAME."""
            if metrics_file is not None:
                metrics_file.write(json.dumps(record) + "\n")
            if board is not None:
                for name, value in record.items():
                    if name in ("step", "epoch", "knn_subset") or not isinstance(value, (int, float)):
                        continue
                    if name == "knn_top1":
                        tag = ("knn/top1_random_init" if record.get("init") == "random" else
                               "knn/top1_subset" if "knn_subset" in record else "knn/top1")
                    else:
                        tag = f"train/{name}"
                    board.add_scalar(tag, value, record["step"])

        def lead_knn(subset=None):
            """kNN on rank 0 (BN in eval mode: no collectives) while the other ranks wait."""
            value = evaluate_knn(model, dataset, cfg, device, subset=subset) if lead else None
            if world_size > 1:
                import torch.distributed as dist

                dist.barrier()
            return value

        if state is None:
            knn_random = lead_knn()
            if knn_random is not None:
                log(f"kNN top-1 of the random-init encoder: {knn_random:.2f}%")
                write_metrics(step=0, epoch=-1, knn_top1=knn_random, init="random")
        else:
            knn_random = state.get("knn_top1_random_init")

        peak = peak_flops(device)
        wait_seconds = 0.0 if state is None else state.get("wait_seconds", 0.0)
        warmup_seconds = 0.0
        steps_per_epoch = loader.steps_per_epoch
        total_steps = cfg.optim.epochs * steps_per_epoch
        warmup_steps = int(round(cfg.optim.warmup_epochs * steps_per_epoch))
        peak_lr = scaled_lr(cfg.optim.base_lr, cfg.data.batch_size)  # scaled by the global batch
        target_params, online_params = model.ema_pairs()
        bf16 = device.type == "cuda"  # CUDA: bf16 autocast, the fp16 views go in as they are; CPU: fp32 math
        input_dtype = None if bf16 else torch.float32

        def global_mean(t: torch.Tensor) -> float:
            """sync: a device scalar averaged over ranks, to the host (log and checkpoint points only)."""
            if world_size > 1:
                import torch.distributed as dist

                t = t.clone()
                dist.all_reduce(t)
                t /= world_size
            return t.item()

        def save(finished: bool) -> None:
            data_states = _gather(loader.state(), world_size)  # collective: every rank's stream position
            rngs = _gather(torch.get_rng_state(), world_size)
            if lead:
                save_checkpoint(run_dir / "checkpoint.pt", dict(
                    model=model.state_dict(), optimizer=optimizer.state_dict(), step=step, data_states=data_states,
                    torch_rngs=rngs, world_size=world_size, train_seconds=train_seconds, images_seen=images_seen,
                    timed_images=timed_images, wait_seconds=wait_seconds, knn_top1_random_init=knn_random,
                    finished=finished, config=cfg.to_dict(), fastbyol_version=__version__))

        from tqdm import tqdm

        bar = tqdm(total=total_steps, initial=step, disable=not (progress and lead), unit="step", dynamic_ncols=True,
                   mininterval=1.0, file=sys.stderr)
        loss_sum = torch.zeros((), device=device)
        steps_since_log, last_loss = 0, float("nan")
        t_log, images_at_log = time.perf_counter(), images_seen
        start_epoch, first_step = divmod(step, steps_per_epoch)
        first_in_process = True
        for epoch in range(start_epoch, cfg.optim.epochs):
            t_epoch = t_asked = time.perf_counter()
            for v1, v2 in loader.epoch(first_step if epoch == start_epoch else 0):
                waited = time.perf_counter() - t_asked  # the host waited this long for the batch
                # (B, 3, S, S) channels_last views, one per augmentation spec
                v1 = v1.to(device=device, dtype=input_dtype, non_blocking=True)
                v2 = v2.to(device=device, dtype=input_dtype, non_blocking=True)
                lr = lr_at(step, total_steps, warmup_steps, peak_lr)
                tau = tau_at(step, total_steps, cfg.optim.tau_base)
                try:
                    loss_sum += byol_step(net, optimizer, target_params, online_params, v1, v2, lr, tau, bf16)
                except Exception as e:  # noqa: BLE001 (only a failed compilation under --compile auto is caught)
                    if not (first_in_process and mode != "off" and cfg.run.compile == "auto" and _compile_error(e)):
                        raise
                    # compilation fails before the forward runs: nothing has changed, the step runs again eagerly
                    log(f"warning: torch.compile failed ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                        "training continues without it (--compile off skips the attempt)")
                    net, mode = eager_net, "off"
                    loss_sum += byol_step(net, optimizer, target_params, online_params, v1, v2, lr, tau, bf16)
                step += 1
                steps_since_log += 1
                images_seen += v1.shape[0] * world_size
                if first_in_process:
                    # sync: the first step of this process (compilation, autotuning, allocator warm-up) is timed
                    # apart and left out of img/s, step_ms and the data-wait share
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)
                    first_in_process = False
                    warmup_seconds = time.perf_counter() - t_epoch
                    t_epoch = t_log = time.perf_counter()
                    images_at_log = images_seen
                    log(f"first step (compile {mode}, warm-up): {warmup_seconds:.1f} s")
                else:
                    wait_seconds += waited
                    timed_images += v1.shape[0] * world_size
                bar.update(1)
                if step % cfg.run.log_every == 0 or step == total_steps:
                    # sync: the mean loss since the last log point to the host, every log_every steps
                    last_loss = global_mean(loss_sum) / steps_since_log
                    loss_sum.zero_()
                    steps_since_log = 0
                    now = time.perf_counter()
                    img_s = (images_seen - images_at_log) / max(now - t_log, 1e-9)
                    t_log, images_at_log = now, images_seen
                    if not math.isfinite(last_loss):
                        raise TrainingStopped(f"the loss became {last_loss} by step {step}; the last good checkpoint "
                                              f"is kept in {run_dir} (lower --base-lr?)")
                    mfu = None if peak is None else img_s * image_flops / peak
                    bar.set_postfix(loss=f"{last_loss:.4f}", lr=f"{lr:.3g}", tau=f"{tau:.4f}", img_s=f"{img_s:.0f}",
                                    **({} if mfu is None else {"mfu": f"{100 * mfu:.1f}%"}))
                    write_metrics(step=step, epoch=epoch, loss=last_loss, lr=lr, tau=tau, img_per_s=img_s, mfu=mfu)
                if cfg.run.ckpt_every_steps and step % cfg.run.ckpt_every_steps == 0 and step < total_steps:
                    # sync: the loss and the parameters to the host, every ckpt_every_steps
                    if not math.isfinite(global_mean(loss_sum)):
                        raise TrainingStopped(f"the loss became non-finite by step {step}; the last good "
                                              f"checkpoint is kept in {run_dir}")
                    t_save = time.perf_counter()
                    train_seconds += t_save - t_epoch
                    save(finished=False)
                    t_epoch = time.perf_counter()  # the checkpoint's own time stays out of img/s
                    t_log += t_epoch - t_save
                t_asked = time.perf_counter()
            train_seconds += time.perf_counter() - t_epoch
            if cfg.run.knn_every and (epoch + 1) % cfg.run.knn_every == 0 and epoch + 1 < cfg.optim.epochs:
                # the online monitor, outside the timed region: kNN on a fixed subset of the labeled splits
                knn_now = lead_knn(subset=cfg.run.knn_subset)
                if knn_now is not None:
                    bar.set_postfix(loss=f"{last_loss:.4f}", knn=f"{knn_now:.1f}")
                    write_metrics(step=step, epoch=epoch, knn_top1=knn_now, knn_subset=cfg.run.knn_subset)
                t_log, images_at_log = time.perf_counter(), images_seen  # the check's time stays out of img/s
        bar.close()

        knn_trained = lead_knn()
        if knn_trained is not None:
            write_metrics(step=step, epoch=cfg.optim.epochs - 1, knn_top1=knn_trained)
        if metrics_file is not None:
            metrics_file.close()
        if board is not None:
            board.close()
        save(finished=True)
        img_s = timed_images / max(train_seconds, 1e-9)
        timed_steps = max(timed_images // cfg.data.batch_size, 1)
        summary = dict(
            knn_top1=knn_trained,
            knn_top1_random_init=knn_random,
            knn_gain=None if knn_trained is None or knn_random is None else knn_trained - knn_random,
            img_per_s=img_s,  # steady state: the first step of each process is left out (warmup_seconds)
            train_seconds=train_seconds,
            warmup_seconds=warmup_seconds,
            step_ms=1000 * train_seconds / timed_steps,
            data_wait_share=wait_seconds / max(train_seconds, 1e-9),  # of the training time, waiting for batches
            flops_per_image=image_flops,
            mfu=None if peak is None else img_s * image_flops / peak / world_size,
            peak_memory_gb=torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None,
            final_loss=last_loss,
            epochs=cfg.optim.epochs,
            steps=step,
            batch_size=cfg.data.batch_size,
            world_size=world_size,
            compile=mode,
            dataset=dataset.describe(),
            skipped_files=dataset.skipped_files,
            device=torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} "
                                                                                      "threads)",
            kernels=kernel_path(device),
            versions=library_versions(),
            params_sha256=params_sha256(model),
            preset=cfg.preset,
            seed=cfg.run.seed,
            resumed=state is not None,
        )
        if lead:
            atomic_write_json(run_dir / "summary.json", summary)
        if knn_trained is not None and knn_random is not None:
            log(f"kNN top-1: trained {knn_trained:.2f}% vs random-init {knn_random:.2f}% "
                f"({knn_trained - knn_random:+.2f} points); {summary['img_per_s']:.0f} img/s over {step} steps")
        log(f"summary: {run_dir / 'summary.json'}")
    return run_dir, summary
