"""`fastbyol plan`: what a training run will take on a given machine, before it starts: the batch per GPU, the
`--accumulate` that fits, the memory, and the time per epoch and to the end.

    fastbyol plan --preset imagenet-resnet50 --gpus 8                     # 8 H100s (the default kind)
    fastbyol plan --preset imagenet-resnet50-100ep --gpus 1 --gpu A100
    fastbyol plan --config run.yaml --gpus 64 --tflops 989 --memory-gb 80  # a GPU by its figures
    fastbyol plan --preset imagenet100-resnet18 --gpus 1 --img-per-s 1400  # a measured rate instead of the estimate
    fastbyol plan --table                                                   # the docs' table (docs/planning.md)

Every figure comes from the trainer's own numbers: the FLOPs of one BYOL image counted by torch on the architecture
built on the meta device (`fastbyol.run.perf.flops_per_image`, the count the trainer's MFU uses) and the memory
lower bound that `fastbyol train` checks before it allocates (`fastbyol.system.bounds`). The time is an estimate at
an assumed model FLOP utilisation (`--mfu`, default 10%: plain PyTorch reaches about 7% on ResNet-50 on an H100, the
best published ResNet-50 training, MLPerf's, about 17.5%) until a rate measured on that GPU is given (`--img-per-s`,
from a run's summary.json or `fastbyol bench`): no GPU rate of the BYOL step has been measured in this repository yet.
The micro-batch is the largest whose lower bound fits in 75% of the GPU's memory (the rest: the allocator's slack,
cuDNN's workspaces, DALI's buffers).
"""

from __future__ import annotations

import functools
import math
import shlex
from dataclasses import dataclass, field

from ..config import Config, get_preset
from ..errors import FastByolError
from ..run.perf import PEAK_BF16_FLOPS

# dense bf16 peak (perf.PEAK_BF16_FLOPS, the table MFU is quoted against) and memory of the GPUs a plan names, bytes
GPU_MEMORY = {"H100": 80e9, "H200": 141e9, "A100": 80e9, "L40S": 48e9, "A10": 24e9}
GPUS = {kind: (PEAK_BF16_FLOPS[kind], memory) for kind, memory in GPU_MEMORY.items()}
DEFAULT_GPU = "H100"
DEFAULT_MFU = 0.10  # between plain PyTorch's ~7% and MLPerf's ~17.5% ResNet-50 on an H100 (see the docstring)
USABLE_MEMORY = 0.75  # of a GPU's memory for the estimated lower bound
GPUS_PER_NODE = 8
# pretraining images of the data names the presets use, and what they are (--images overrides)
KNOWN_IMAGES = {
    "imagenet": (1_281_167, "ImageNet-1k's train split"),
    "imagenet100": (126_689, "ImageNet-100's train split (CMC's 100 classes)"),
    "stl10_binary": (105_000, "STL10's unlabeled + train images"),
    "cifar-10-batches-py": (50_000, "CIFAR-10's train split"),
    "embedded": (8_000, "the embedded Fashion-MNIST's pretraining images"),
    "fashion-mnist": (60_000, "Fashion-MNIST's train split"),
}
TABLE_PRESETS = ("imagenet-resnet50", "imagenet-resnet50-300ep", "imagenet-resnet50-100ep", "imagenet-vit-small",
                 "imagenet100-resnet18")
TABLE_GPUS = (1, 8, 64)


@dataclass(frozen=True)
class Machine:
    gpus: int  # GPUs of the run (processes under torchrun)
    kind: str  # a name (H100) or "custom"
    peak_flops: float  # dense bf16 FLOP/s of one GPU
    memory: float  # bytes of one GPU


@dataclass
class RunPlan:
    """What `plan_run` works out; `lines()` prints it."""

    cfg: Config
    machine: Machine
    images: int
    images_what: str
    local_batch: int  # images a step per GPU
    accumulate: int
    parts: dict  # lower-bound bytes a GPU: encoder, heads, activations (of one micro-batch)
    flops_per_image: float
    img_per_s: float  # all GPUs together
    measured: bool  # img_per_s was given (measured), not estimated
    mfu: float
    steps_per_epoch: int
    notes: list = field(default_factory=list)

    @property
    def micro_batch(self) -> int:
        return self.local_batch // self.accumulate

    @property
    def epoch_seconds(self) -> float:
        return self.steps_per_epoch * self.cfg.data.batch_size / self.img_per_s

    @property
    def total_seconds(self) -> float:
        return self.epoch_seconds * self.cfg.optim.epochs

    @property
    def memory_need(self) -> float:
        return float(sum(self.parts.values()))

    def lines(self) -> list[str]:
        return plan_lines(self)


def machine(gpus: int = 1, kind: str | None = None, tflops: float | None = None,
            memory_gb: float | None = None) -> Machine:
    """The machine a plan is for: a GPU kind from the table, or one given by its bf16 TFLOP/s and memory (GB)."""
    if gpus < 1:
        raise FastByolError(f"--gpus must be >= 1, got {gpus}")
    if (tflops is None) != (memory_gb is None):
        raise FastByolError("give both --tflops and --memory-gb (a GPU by its figures), or --gpu KIND")
    if tflops is not None:
        if kind is not None:
            raise FastByolError("give --gpu KIND or --tflops and --memory-gb, not both")
        if not (math.isfinite(tflops) and tflops > 0 and math.isfinite(memory_gb) and memory_gb > 0):
            raise FastByolError(f"--tflops and --memory-gb must be finite numbers > 0, got {tflops} and {memory_gb}")
        return Machine(gpus, "custom", tflops * 1e12, memory_gb * 1e9)
    kind = kind or DEFAULT_GPU
    if kind not in GPUS:
        raise FastByolError(f"--gpu must be one of {', '.join(GPUS)} (or give --tflops and --memory-gb), got {kind!r}")
    return Machine(gpus, kind, *GPUS[kind])


def known_images(cfg: Config) -> tuple[int, str] | None:
    """(images, what they are) for a data name the table knows, by --data's last path part ('imagenet' of
    /data/imagenet); None otherwise."""
    from ..run.naming import data_label

    return KNOWN_IMAGES.get(data_label(cfg.data.data)) or KNOWN_IMAGES.get(cfg.data.data)


def _model_figures(cfg: Config, local_batch: int) -> tuple[dict, float]:
    """(training_bytes at `local_batch` images, FLOPs of one BYOL image): the architecture built on the meta device,
    once per architecture (the activations scale with the batch)."""
    from ..models import is_custom_arch

    if is_custom_arch(cfg.model.arch):
        raise FastByolError(f"--arch {cfg.model.arch}: fastbyol plan sizes the encoders of --arch's list; an encoder "
                            "of your own is not imported to be sized")
    m = cfg.model
    encoder, heads, per_image, flops = _per_image(m.arch, m.stem, cfg.data.image_size, m.proj_hidden, m.proj_dim,
                                                  m.pred_hidden)
    return dict(encoder=encoder, heads=heads, activations=per_image * local_batch), flops


@functools.lru_cache(maxsize=None)
def _per_image(arch: str, stem: str, image_size: int, proj_hidden: int, proj_dim: int, pred_hidden: int):
    """(encoder bytes, heads bytes, activation bytes an image, FLOPs an image) of one architecture."""
    import torch

    from ..models import BYOL, build_encoder
    from ..run.perf import flops_per_image
    from ..system.bounds import training_bytes

    cfg = get_preset("fmnist-tiny")
    cfg.model.arch, cfg.model.stem, cfg.data.image_size = arch, stem, image_size
    cfg.model.proj_hidden, cfg.model.proj_dim, cfg.model.pred_hidden = proj_hidden, proj_dim, pred_hidden
    parts = training_bytes(cfg, 1, activation_bytes=2)  # bf16 autocast on a GPU
    with torch.device("meta"):
        model = BYOL(build_encoder(arch, stem, image_size), proj_hidden, proj_dim, pred_hidden, image_size=image_size)
    return parts["encoder"], parts["heads"], parts["activations"], flops_per_image(model, image_size)


def plan_run(cfg: Config, where: Machine, images: int | None = None, mfu: float = DEFAULT_MFU,
             img_per_s: float | None = None, accumulate_given: bool = False) -> RunPlan:
    """The plan of `cfg` on `where`: `images` pretraining images (default: the table's for its data), the
    --accumulate that fits unless `accumulate_given` (then cfg's, checked), the time at `mfu` or at a measured
    `img_per_s` per GPU."""
    cfg.validate()
    if not (math.isfinite(mfu) and 0 < mfu <= 1):
        raise FastByolError(f"--mfu must be in (0, 1], got {mfu}")
    if img_per_s is not None and not (math.isfinite(img_per_s) and img_per_s > 0):
        raise FastByolError(f"--img-per-s must be a finite number > 0, got {img_per_s}")
    known = known_images(cfg)
    if images is None and known is None:
        raise FastByolError(f"--images N: the number of pretraining images of --data {cfg.data.data} (known without "
                            f"it: {', '.join(KNOWN_IMAGES)})")
    images, what = (images, "given") if images is not None else known
    batch, gpus = cfg.data.batch_size, where.gpus
    if batch % gpus:
        raise FastByolError(f"--batch-size {batch} (the global batch) does not divide over {gpus} GPUs")
    local = batch // gpus
    parts, image_flops = _model_figures(cfg, local)
    notes = []
    if accumulate_given:
        accumulate = cfg.optim.accumulate
    else:
        from ..system.bounds import fitting_accumulate

        accumulate = fitting_accumulate(parts, local, local, USABLE_MEMORY * where.memory)
        if accumulate is None:
            notes.append(f"even 2 images a micro-batch exceed {USABLE_MEMORY:.0%} of the GPU's memory: choose "
                         "smaller settings")
            accumulate = local // 2
        cfg.optim.accumulate = accumulate
    resolved = cfg.resolve("cuda", gpus, images)  # the trainer's checks: divisibility, batch <= images
    scale = resolved.micro_batch / local
    parts = dict(parts, activations=int(parts["activations"] * scale))
    measured = img_per_s is not None
    rate = img_per_s * gpus if measured else gpus * where.peak_flops * mfu / image_flops
    if accumulate_given and sum(parts.values()) > USABLE_MEMORY * where.memory:
        notes.append(f"--accumulate {accumulate} leaves the estimate above {USABLE_MEMORY:.0%} of the GPU's memory")
    if resolved.micro_batch <= 64 and not measured:
        notes.append(f"{resolved.micro_batch} images a micro-batch is small: MLPerf's ResNet-50 kept ~66% of its "
                     "8-GPU rate per GPU at 50 images a GPU; expect less than this estimate")
    return RunPlan(cfg, where, images, what, local, accumulate, parts, image_flops, rate, measured, mfu,
                   resolved.steps_per_epoch, notes)


def size(n: float) -> str:
    """46.5 GB, 820 MB."""
    return f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.0f} MB"


def duration(seconds: float) -> str:
    """3 d 4 h, 5 h 07 min, 12 min 30 s, 45 s, 0.4 s."""
    if seconds < 10:
        return f"{seconds:.1f} s"
    s = int(round(seconds))
    if s >= 86400:
        return f"{s // 86400} d {s % 86400 // 3600} h"
    if s >= 3600:
        return f"{s // 3600} h {s % 3600 // 60:02d} min"
    if s >= 60:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s} s"


def plan_lines(p: RunPlan) -> list[str]:
    m, cfg, gb = p.machine, p.cfg, 1e9
    gpu = f"{m.gpus} x {m.kind}" if m.kind != "custom" else f"{m.gpus} GPUs"
    how = (f"measured {p.img_per_s / m.gpus:,.0f} img/s a GPU (given)" if p.measured else
           f"ESTIMATE at an assumed {p.mfu:.0%} MFU (--mfu; no GPU rate of the BYOL step measured yet: --img-per-s "
           f"gives one)")
    split = f"{cfg.data.batch_size} global = {m.gpus} GPU{'s' if m.gpus > 1 else ''} x {p.local_batch}"
    parts = ", ".join(f"{k} {size(v)}" for k, v in p.parts.items())
    lines = [
        f"plan: {cfg.preset} ({cfg.model.arch}, {cfg.data.image_size} px, {cfg.optim.epochs} epochs) on {gpu} "
        f"({m.peak_flops / 1e12:.0f} bf16 TFLOP/s, {m.memory / gb:.0f} GB each)",
        f"  data     {p.images:,} images ({p.images_what}); {p.steps_per_epoch:,} steps an epoch",
        f"  batch    {split}; --accumulate {p.accumulate} (micro-batches of {p.micro_batch})",
        f"  memory   >= {size(p.memory_need)} a GPU ({parts}; a lower bound) of {size(USABLE_MEMORY * m.memory)} "
        f"usable ({USABLE_MEMORY:.0%})",
        f"  compute  {p.flops_per_image / 1e9:.1f} GFLOP an image (the trainer's count): {p.img_per_s:,.0f} img/s "
        f"on {m.gpus} GPU{'s' if m.gpus > 1 else ''}",
        f"  time     {duration(p.epoch_seconds)} an epoch, {duration(p.total_seconds)} for {cfg.optim.epochs} "
        f"epochs: {how}",
    ]
    lines += [f"  note     {n}" for n in p.notes]
    return lines


def launch_command(p: RunPlan, settings: list[str]) -> str:
    """The command line that trains the plan: fastbyol train, or torchrun on one node or several."""
    args = " ".join(a if a == "PATH" else shlex.quote(a) for a in settings)
    args += f" --accumulate {p.accumulate}" if p.accumulate > 1 and "--accumulate" not in settings else ""
    gpus = p.machine.gpus
    if gpus == 1:
        return f"fastbyol train {args}"
    if gpus <= GPUS_PER_NODE:
        return f"torchrun --standalone --nproc_per_node {gpus} -m fastbyol train {args}"
    nodes, per_node = (gpus // GPUS_PER_NODE, GPUS_PER_NODE) if gpus % GPUS_PER_NODE == 0 else (gpus, 1)
    return (f"torchrun --nnodes {nodes} --nproc_per_node {per_node} --rdzv_backend c10d --rdzv_endpoint HEAD:29500 "
            f"-m fastbyol train {args}   # on every node")


def plan_table(presets=TABLE_PRESETS, gpu_counts=TABLE_GPUS, kind: str = DEFAULT_GPU) -> str:
    """The markdown table of docs/planning.md: each preset on 1, 8 and 64 GPUs of `kind` (tests/test_docs.py fails
    when the page's copy drifts from this)."""
    rows = ["| preset | GPUs | per GPU | --accumulate | memory a GPU (lower bound) | an epoch | the run |",
            "|---|---|---|---|---|---|---|"]
    for name in presets:
        for gpus in gpu_counts:
            p = plan_run(get_preset(name), machine(gpus, kind))
            rows.append(f"| `{name}` | {gpus} | {p.local_batch} | {p.accumulate} | {size(p.memory_need)} | "
                        f"{duration(p.epoch_seconds)} | {duration(p.total_seconds)} |")
    return "\n".join(rows)
