"""Settings a machine can hold: plain upper bounds and a memory estimate, checked before anything is allocated.

`check_machine_bounds(cfg, device, world_size)` refuses, in one line naming the setting, what would abort, hang or
ask the allocator for more than the machine has: DALI threads far beyond the cores (`--num-threads 100000` aborts
inside DALI), widths and sizes past any real model, and a run whose weights, optimizer state and saved activations
(estimated from the architecture built on the meta device: shapes only, no memory, no random numbers) exceed the
memory of the device it trains on. The estimate is a lower bound (no allocator slack, no workspace, no DALI
buffers), so a refused run could never have trained there; one that passes may still be tight. The activations are
those of one micro-batch (`--accumulate`); where they are what does not fit, the refusal names the `--accumulate`
that would (`fitting_accumulate`, which `fastbyol plan` uses too).
"""

from __future__ import annotations

import os

from ..errors import FastByolError

MAX_WIDTH = 1 << 20  # projector / predictor widths: 256x the official 4096
MAX_IMAGE_SIZE = 1 << 13  # view side, px
MAX_BATCH = 1 << 24  # images per step over all processes
GB = 1e9


def max_threads() -> int:
    """The most DALI worker threads a run may ask for: 8 per core this process may use, at least 64."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return max(64, 8 * cores)


def machine_memory_bytes(device) -> int:
    """The memory a run on `device` (a torch.device) can have at most: the GPU's total, or host_memory_bytes()."""
    if device.type == "cuda":
        import torch

        return torch.cuda.mem_get_info(device)[1]
    return host_memory_bytes()


def host_memory_bytes() -> int:
    """The host's RAM, or its cgroup limit where lower (no torch import: the data readers bound sizes with it)."""
    total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    for limit_file in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(limit_file) as f:
                text = f.read().strip()
        except OSError:
            continue
        if text.isdigit():
            total = min(total, int(text))
    return total


def check_address_space(num_threads: int, batch_size: int, image_size: int) -> None:
    """Under an address-space limit (ulimit -v), a FastByolError when what is left of it cannot hold a training
    pipeline: DALI's worker threads abort the process (SIGABRT, no message) when a thread's stack or its malloc arena
    cannot be mapped, so the room is checked before DALI starts. Measured on a 2-core CPU: building and running the
    pipeline grew the address space by 0.8 GB (2 threads, 16 px) to 1.8 GB (4 threads, 96 px); the estimate is 0.5 GB
    + 0.35 GB a thread + the views (float32, both, 4 copies)."""
    import resource

    limit = resource.getrlimit(resource.RLIMIT_AS)[0]
    if limit == resource.RLIM_INFINITY:
        return
    try:
        with open("/proc/self/status") as f:
            used = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
    except (OSError, StopIteration, ValueError):
        return
    need = int(0.5e9 + 0.35e9 * max(1, num_threads) + 4 * 2 * batch_size * image_size * image_size * 3 * 4)
    if limit - used < need:
        left = max(0, limit - used) / GB
        raise FastByolError(f"the address-space limit (ulimit -v) is {limit / GB:.1f} GB, {left:.1f} GB of it left; "
                            f"the training pipeline ({num_threads} threads, batch {batch_size} at {image_size} px) "
                            f"needs about {need / GB:.1f} GB of it: raise the limit")


def check_plain_bounds(cfg) -> None:
    limits = [("num_threads", cfg.data.num_threads, max_threads(), "8 per CPU core, at least 64"),
              ("image_size", cfg.data.image_size, MAX_IMAGE_SIZE, "px"),
              ("batch_size", cfg.data.batch_size, MAX_BATCH, "images"),
              ("proj_hidden", cfg.model.proj_hidden, MAX_WIDTH, "units"),
              ("proj_dim", cfg.model.proj_dim, MAX_WIDTH, "units"),
              ("pred_hidden", cfg.model.pred_hidden, MAX_WIDTH, "units")]
    for name, value, limit, unit in limits:
        if value > limit:
            raise FastByolError(f"--{name.replace('_', '-')} {value} is more than this machine can hold (at most "
                                f"{limit}: {unit})")


def training_bytes(cfg, local_batch: int, activation_bytes: int = 4) -> dict[str, int]:
    """Lower-bound bytes of one process's training, by part: 'encoder' and 'heads' (fp32 weights, gradients and
    LARS momentum of the online network, weights of the target), 'activations' (the online forward's layer
    outputs kept for the backward, both views, at `activation_bytes` per element)."""
    import torch

    from ..models import BYOL, build_encoder

    with torch.device("meta"):
        model = BYOL(build_encoder(cfg.model.arch, cfg.model.stem, cfg.data.image_size), cfg.model.proj_hidden,
                     cfg.model.proj_dim, cfg.model.pred_hidden, image_size=cfg.data.image_size)
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    encoder = 4 * 4 * count(model.online_encoder)  # online weights, grads, momentum + the target's weights
    heads = 4 * (4 * count(model.online_projector) + 3 * count(model.predictor))
    outputs = []  # numel of every leaf module's output, for a batch of 2

    def hook(_module, inputs, out):  # an in-place layer (ReLU) returns its input: no new tensor
        if isinstance(out, torch.Tensor) and not any(out is i for i in inputs):
            outputs.append(out.numel())

    handles = [m.register_forward_hook(hook) for m in model.modules() if not list(m.children())]
    try:
        x = torch.empty(2, 3, cfg.data.image_size, cfg.data.image_size, device="meta")
        with torch.no_grad():
            model.predictor(model.online_projector(model.online_encoder(x)))
    finally:
        for h in handles:
            h.remove()
    activations = sum(outputs) // 2 * local_batch * 2 * activation_bytes  # per image, x images, x 2 views
    return {"encoder": encoder, "heads": heads, "activations": activations}


def fitting_accumulate(parts: dict[str, int], micro_batch: int, local_batch: int, have: float) -> int | None:
    """The fewest micro-batches a step of `local_batch` images per process can be cut into (N divides it, at least 2
    images each) so that the estimate fits `have` bytes, given `parts` (training_bytes) at `micro_batch` images:
    the activations scale with the micro-batch, the weights do not. None when not even 2 images fit."""
    fixed, per_image = parts["encoder"] + parts["heads"], parts["activations"] / max(1, micro_batch)
    for n in range(1, local_batch // 2 + 1):
        if local_batch % n == 0 and fixed + per_image * (local_batch // n) <= have:
            return n
    return None


def check_machine_bounds(cfg, device, world_size: int) -> None:
    """FastByolError naming the setting when the run cannot fit this machine (see the module docstring); when the
    activations are what does not fit, it names the --accumulate that would."""
    check_plain_bounds(cfg)
    from ..models import is_custom_arch

    if is_custom_arch(cfg.model.arch):  # a module:factory of the user's own: theirs to size (and to build: a
        return  # factory may not run on the meta device); the trainer names a factory that fails in one line
    local_batch = max(1, cfg.data.batch_size // max(1, world_size))
    accumulate = max(1, cfg.optim.accumulate)
    micro_batch = max(1, local_batch // accumulate)  # what one forward and backward holds (--accumulate)
    parts = training_bytes(cfg, micro_batch, activation_bytes=2 if device.type == "cuda" else 4)
    need, have = sum(parts.values()), machine_memory_bytes(device)
    if need <= have:
        return
    biggest = max(parts, key=parts.get)
    fix = "choose smaller settings"
    if biggest == "heads":
        name = max(("proj_hidden", "pred_hidden", "proj_dim"), key=lambda n: getattr(cfg.model, n))
        what = f"--{name.replace('_', '-')} {getattr(cfg.model, name)}"
    elif biggest == "encoder":
        what = f"--arch {cfg.model.arch}"
    else:
        what = f"--batch-size {cfg.data.batch_size} at --image-size {cfg.data.image_size}" + (
            f" with --accumulate {accumulate}" if accumulate > 1 else "")
        n = fitting_accumulate(parts, micro_batch, local_batch, have)
        if n is not None:  # the documented way to a big batch on a small machine (docs/accumulation.md)
            fix = (f"--accumulate {n} fits (micro-batches of {local_batch // n} images; `fastbyol plan` shows the "
                   f"split), or choose smaller settings")
    where = "GPU" if device.type == "cuda" else "RAM"
    raise FastByolError(f"{what} needs at least {need / GB:.1f} GB for training ({biggest} {parts[biggest] / GB:.1f} "
                        f"GB), more than the {have / GB:.1f} GB of {where} here: {fix}")
