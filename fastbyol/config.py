"""Configuration: one dataclass per concern (units in the help), named presets, one path from flags and files to a
checked, resolved run description.

    fastbyol presets              # list them
    fastbyol train --preset NAME  # any field can then be overridden from the command line

Each setting is declared once, with its help text and its rule (`setting(...)`): the command-line flags and their help
are generated from these fields (`fastbyol.cli`), `Config.validate()` checks every field against its rule,
`Config.from_dict` reads a saved config.json back (refusing unknown keys and wrong types), and `Config.resolve()`
computes the values that follow from the settings and the run (local batch, steps, peak lr, compile mode, dtypes),
which the trainer logs once and saves beside the config.
"""

from __future__ import annotations

import copy
import math
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

from .errors import FastByolError

COMPILE_MODES = ("auto", "off", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
BLUR_WINDOW_RULES = ("official", "cover")  # ViewSpec.blur_window says what each means
BLUR_WINDOW_DEFAULT = "cover"  # --blur-window's default and ViewSpec's
DEVICES = ("auto", "cpu", "cuda")
# The augmentation switches' choices (AugmentConfig; fastbyol.augment says what each does)
PHOTOMETRIC_BACKENDS = ("reference", "compiled", "triton")  # the chain on CUDA: eager torch, torch.compile, Triton
DECODE_MODES = ("roi", "once")  # CUDA JPEG path: one ROI decode per view, or one whole decode and two GPU crops
CPU_PARALLEL_MODES = ("processes", "threads")  # CPU array path: the crops and chain in forked processes or threads
OPTIMIZERS = ("lars", "adamw")


def setting(default: Any, help: str, rule: str | None = None, check: Callable[[Any], bool] | None = None,
            choices: tuple | None = None, choices_from: str | None = None):
    """A config field: its default, its help text (one per setting: the flag's help too) and its rule.

    rule + check: a predicate the value must satisfy and the words that say it ("must be > 0"); choices: the allowed
    values; choices_from: 'archs', 'stems' or 'formats', the allowed values as the module that owns them lists them."""
    meta = {"help": help, "rule": rule, "check": check, "choices": choices, "choices_from": choices_from}
    return field(default=default, metadata=meta)


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def _positive(v) -> bool:
    return _finite(v) and v > 0


def _nonnegative(v) -> bool:
    return _finite(v) and v >= 0


def _folder_name(v) -> bool:
    return isinstance(v, str) and re.fullmatch(r"[\w.+-]+", v) is not None and not v.startswith(".")


def _custom_arch(f, value) -> bool:
    """An --arch of the form module.path:factory (an encoder of the user's own)."""
    if f.metadata.get("choices_from") != "archs" or not isinstance(value, str):
        return False
    from .models.names import is_custom_arch

    return is_custom_arch(value)


def allowed_values(f) -> tuple | None:
    """The values a field may take, or None when it is not a choice; names owned by another module (architectures,
    stems, data formats) are imported from it, so they are listed in one place."""
    meta = f.metadata
    if meta.get("choices"):
        return meta["choices"]
    source = meta.get("choices_from")
    if source is None:
        return None
    if source == "archs":
        from .models.names import ARCH_NAMES

        return ARCH_NAMES
    if source == "stems":
        from .models.names import STEMS

        return STEMS
    from .data import FORMATS

    return tuple(FORMATS)


@dataclass
class DataConfig:
    data: str = setting("embedded", "dataset: 'embedded', 'fashion-mnist', 'synthetic', a dataset folder (image "
                        "folders: train/<class>/ with test/ or val/, class folders ROOT/<class>/ as torchvision's "
                        "ImageFolder reads them, or any folder of images; CIFAR/STL10/MNIST files), a .npy/.npz file, "
                        "or tar shards (a folder of .tar files, or a pattern such as "
                        "'shards/train-{000000..000099}.tar'; made by `fastbyol shards`); recorded as an absolute path",
                        "must not be empty",
                        lambda v: bool(str(v).strip()))
    data_format: str = setting("auto", "dataset format (auto: recognised from the files)", choices_from="formats")
    test_data: str = setting("", "kNN test split of an image folder: a folder of class folders (ROOT/<class>/), "
                             "instead of its test/ or val/ folder or (class folders ROOT/<class>/) every 10th image "
                             "held out")
    image_size: int = setting(28, "side of each augmented view, px", "must be >= 8", lambda v: v >= 8)
    batch_size: int = setting(128, "images per step over all processes (two views each)", "must be >= 2 (BatchNorm "
                              "needs two samples)", lambda v: v >= 2)
    num_threads: int = setting(2, "DALI worker threads", "must be > 0", lambda v: v > 0)
    skip_bad_files: bool = setting(False, "leave out and count unreadable images instead of stopping")
    crop_min_area: float = setting(0.08, "smallest random-resized-crop area, fraction of the image (official 0.08)",
                                   "must be in (0, 1]", lambda v: _finite(v) and 0.0 < v <= 1.0)
    blur_window: str = setting(BLUR_WINDOW_DEFAULT, "Gaussian blur window: cover (the official window, widened to "
                               "+-3 sigma of the widest sigma where it is narrower: 13 taps up to 139 px, the official window above) "
                               "or official (10%% of the view side: 3 taps at 28 px, 9 at 96, 23 at 224)",
                               choices=BLUR_WINDOW_RULES)


@dataclass
class ModelConfig:
    arch: str = setting("resnet-tiny", "encoder: a name below (ResNets: resnetD for depth D in 18..200, resnetDxK for the "
                        "BYOL paper's width K in 2..4, torchvision's wide_resnet50_2/101_2; ViTs with timm's names), "
                        "or module.path:factory, a callable returning your own torch.nn.Module (see docs/backbones.md)",
                        choices_from="archs")
    stem: str = setting("small-s2", "encoder stem: auto (small if image_size <= 64), imagenet (7x7/2 + max-pool), small "
                        "(3x3/1), small-s2 (3x3/2)", choices_from="stems")
    proj_hidden: int = setting(1024, "projector hidden width (official 4096)", "must be > 0", lambda v: v > 0)
    proj_dim: int = setting(256, "projection and prediction width", "must be > 0", lambda v: v > 0)
    pred_hidden: int = setting(1024, "predictor hidden width (official 4096)", "must be > 0", lambda v: v > 0)


@dataclass
class OptimConfig:
    epochs: int = setting(16, "passes over the training images", "must be > 0", lambda v: v > 0)
    optimizer: str = setting("lars", "lars (the BYOL paper's: momentum, trust ratio) or adamw (the MoCo v3 ViT recipe: "
                             "AdamW, betas 0.9/0.999, base lr 1.5e-4, weight decay 0.1, 40 warmup epochs, cosine: "
                             "preset imagenet-vit-small); norms, biases, pos_embed and cls_token get no weight decay "
                             "(nor the LARS trust ratio)", choices=OPTIMIZERS)
    base_lr: float = setting(4.0, "lr = base_lr * batch_size / 256 (LARS or AdamW)", "must be a finite number > 0",
                             _positive)
    accumulate: int = setting(1, "micro-batches per optimizer step per process (gradient accumulation): each process "
                              "splits its share of --batch-size into N equal micro-batches, one forward and backward "
                              "each, then one LARS step and one EMA update; --batch-size stays the batch of one "
                              "optimizer step (lr, steps and checkpoints count optimizer steps). BatchNorm normalises "
                              "each micro-batch with its own statistics, as accumulating set-ups do (solo-learn's "
                              "accumulate_grad_batches): a step equals the big-batch step exactly only for a model "
                              "without batch statistics", "must be >= 1", lambda v: v >= 1)
    warmup_epochs: float = setting(1.0, "epochs of linear lr warmup from 0, then cosine to 0",
                                   "must be a finite number >= 0", _nonnegative)
    weight_decay: float = setting(1e-6, "weight decay (LARS: added before the trust ratio; AdamW: decoupled); not on "
                                  "norms, biases, pos_embed, cls_token",
                                  "must be a finite number >= 0", _nonnegative)
    momentum: float = setting(0.9, "LARS momentum (AdamW: unused)", "must be in [0, 1)", lambda v: _finite(v) and 0.0 <= v < 1.0)
    trust_coefficient: float = setting(1e-3, "LARS trust coefficient eta (AdamW: unused)", "must be a finite number > 0", _positive)
    tau_base: float = setting(0.99, "EMA decay at step 0, cosine to 1 at the last step", "must be in [0, 1]",
                              lambda v: _finite(v) and 0.0 <= v <= 1.0)


@dataclass
class RunConfig:
    seed: int = setting(0, "random seed (weights, shuffling, augmentation)", "must be in [0, 2**32)",
                        lambda v: 0 <= v < 2**32)
    out: str = setting("", "run directory (default: runs/NAME, --name's)")
    name: str = setting("", "the run's name: its folder is runs/NAME unless --out names one (default: the data, the "
                        "preset and the UTC time, e.g. embedded-fmnist-tiny-20261204-093015); also the W&B run name",
                        "must be a folder name (letters, digits, '.', '_', '+', '-'; not starting with '.')",
                        lambda v: v == "" or _folder_name(v))
    device: str = setting("auto", "where to train (auto: cuda when torch sees a GPU)", choices=DEVICES)
    compile: str = setting("auto", "torch.compile of the online/target forward (auto: default on CUDA, off on the "
                           "CPU; reduce-overhead = CUDA graphs)", choices=COMPILE_MODES)
    log_every: int = setting(10, "steps between log points (read without a host sync: each shows the one before)",
                             "must be > 0", lambda v: v > 0)
    ckpt_every_steps: int = setting(0, "steps between checkpoints for --resume (0: only the final one)",
                                    "must be >= 0", lambda v: v >= 0)
    knn_every: int = setting(4, "epochs between online kNN checks on a subset (0: only the final evaluation)",
                             "must be >= 0", lambda v: v >= 0)
    knn_subset: int = setting(4000, "memory-bank images of the online kNN check (queries: a quarter as many)",
                              "must be > 0", lambda v: v > 0)
    knn_k: int = setting(200, "kNN neighbours", "must be > 0", lambda v: v > 0)
    online_probe: bool = setting(True, "train a linear probe on the detached online features of view 1 during "
                                 "pretraining (its own optimizer; BYOL's training is unchanged) and log its test top-1 "
                                 "at each kNN check; needs labelled pretraining images, off otherwise "
                                 "(--no-online-probe: off)")
    knn_temperature: float = setting(0.1, "kNN vote temperature", "must be a finite number > 0", _positive)
    wandb: str = setting("", "Weights & Biases project: the scalars TensorBoard gets go there too (needs pip install "
                         "'fastbyol[wandb]'; WANDB_MODE=offline writes them under RUN_DIR/wandb/ without a network)",
                         "must be a W&B project name (letters, digits, '.', '_', '-')",
                         lambda v: v == "" or re.fullmatch(r"[\w.-]+", v) is not None)
    profile: str = setting("", "START:STOP: record steps START..STOP-1 with torch.profiler into RUN_DIR/profile/",
                           "must be START:STOP with 0 <= START < STOP", lambda v: v == "" or _profile_steps(v) is not None)
    dist_timeout: float = setting(600.0, "under torchrun, seconds any wait on another process may last: each "
                                  "collective, a barrier's wait for a process that shows no sign of life, and (twice "
                                  "this) the rendezvous; a peer that never starts, dies or stops answering ends every "
                                  "process in one line (docs/reliability.md)", "must be a finite number > 0",
                                  _positive)


@dataclass
class AugmentConfig:
    """How the augmentation runs: none of these changes what the views are drawn from (the recipe is ViewSpec's and
    DataConfig's), only where and how the work is done. fastbyol.augment's loader and pipelines say what each does;
    the defaults stand until the GPU plan (benchmarks/gpu_plan.md) has timed the alternatives."""

    cuda_photometric: str = setting("triton", "CUDA: the photometric chain's backend: Triton kernels (triton), "
                                    "torch.compile of the per-slot form (compiled) or eager torch (reference); the "
                                    "CPU always runs the reference", choices=PHOTOMETRIC_BACKENDS)
    decode: str = setting("roi", "CUDA, encoded files: one region-of-interest decode per view (roi) or one whole "
                          "decode and both views cropped from it on the GPU (once); the CPU decodes once either way",
                          choices=DECODE_MODES)
    hw_decoder_load: float = setting(0.9, "CUDA, encoded files: share of each batch given to the GPU's hardware JPEG "
                                     "engines (the rest: nvJPEG's CUDA path, Huffman on DALI's CPU threads)",
                                     "must be in [0, 1]", lambda v: _finite(v) and 0.0 <= v <= 1.0)
    preallocate_side: int = setting(512, "CUDA, encoded files: the hardware decoder preallocates for images of this "
                                    "side, px (~batch x side^2 x 3 bytes; a larger file only grows the buffer)",
                                    "must be >= 1", lambda v: v >= 1)
    chunk_pixels: int = setting(1 << 17, "CPU: pixels per chunk of the photometric chain (images per chunk = "
                                "max(1, chunk_pixels // side^2), small enough to stay in cache); the views do not "
                                "depend on it", "must be >= 1", lambda v: v >= 1)
    cpu_parallel: str = setting("processes", "CPU, array sources: the crops and chain in forked worker processes or "
                                "in threads (the same views, bit for bit; encoded files always use threads)",
                                choices=CPU_PARALLEL_MODES)


@dataclass
class DistributedConfig:
    """Several processes (torchrun): options for large clusters, all off by default (the recipe's settings);
    fastbyol.system.data_parallel says when each pays and what it changes."""

    bn_group: int = setting(0, "cross-replica BN statistics over blocks of this many consecutive ranks (e.g. 8: the "
                            "GPUs of one node; 0: all ranks, the paper's); a recipe change: statistics over fewer "
                            "images", "must be >= 0", lambda v: v >= 0)
    grad_reduce: str = setting("fp32", "gradient all-reduce precision: fp32 (the recipe's) or bf16 (DDP's compression "
                               "hook: half the bytes, gradients rounded to bf16)", choices=("fp32", "bf16"))
    bucket_mb: float = setting(0.0, "DDP gradient bucket size, MB (fewer, larger all-reduces vs earlier overlap; 0: "
                               "DDP's default, 25 MB buckets after a first one of 1 MB)", "must be a finite number >= 0",
                               _nonnegative)


SECTIONS = {"data": DataConfig, "model": ModelConfig, "optim": OptimConfig, "run": RunConfig,
            "augment": AugmentConfig, "distributed": DistributedConfig}
# sections added after runs were already written: a config.json without one is a run from an earlier fastbyol, whose
# behaviour is the section's defaults (all off), so it resumes, evaluates and exports as it trained
LATER_SECTIONS = ("distributed",)


def _profile_steps(text: str) -> tuple[int, int] | None:
    """'START:STOP' -> (start, stop) with 0 <= start < stop, else None."""
    parts = text.split(":")
    if len(parts) != 2 or not all(re.fullmatch(r"[0-9]{1,18}", p.strip()) for p in parts):  # ASCII digits only
        return None
    start, stop = int(parts[0]), int(parts[1])
    return (start, stop) if start < stop else None


def flag_name(name: str) -> str:
    """The command-line flag of a field: batch_size -> --batch-size."""
    return "--" + name.replace("_", "-")


def _type_ok(value, kind: type) -> bool:
    if kind is bool:
        return isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, kind)


_KINDS = {"str": str, "int": int, "float": float, "bool": bool}


def field_kind(f) -> type:
    """The Python type of a config field (its annotation is a string under `from __future__ import annotations`)."""
    return _KINDS[f.type] if isinstance(f.type, str) else f.type


def validate_section(values, name=flag_name) -> None:
    """Check one section's fields against their rules; the FastByolError names the bad setting as name(field)
    (its flag by default)."""
    for f in fields(values):
        value, meta = getattr(values, f.name), f.metadata
        flag = name(f.name)
        if not _type_ok(value, field_kind(f)):
            raise FastByolError(f"{flag} must be {field_kind(f).__name__}, got {value!r}")
        allowed = allowed_values(f)
        if allowed is not None and value not in allowed and not _custom_arch(f, value):
            extra = ", or module.path:factory" if meta.get("choices_from") == "archs" else ""
            raise FastByolError(f"{flag} must be one of {', '.join(allowed)}{extra}; got {value!r}")
        check = meta.get("check")
        if check is not None and not check(value):
            raise FastByolError(f"{flag} {meta['rule']}, got {value!r}")


@dataclass(frozen=True)
class Resolved:
    """What follows from the settings and the run: computed once by Config.resolve, logged, saved with the run."""

    device: str  # cpu | cuda
    world_size: int  # processes (torchrun)
    local_batch: int  # images per step per process
    accumulate: int  # micro-batches per optimizer step per process (--accumulate)
    micro_batch: int  # images per forward and backward per process: local_batch / accumulate
    steps_per_epoch: int  # full batches per process per epoch (the last partial batch is dropped)
    total_steps: int
    warmup_steps: int
    peak_lr: float  # base_lr * global batch / 256
    compile_mode: str  # off or a torch.compile mode
    autocast_bf16: bool  # the forward under bf16 autocast (CUDA)
    input_dtype: str  # the views as the network takes them: float16 on CUDA (autocast), float32 on the CPU
    profile_steps: tuple[int, int] | None  # [start, stop) of the torch.profiler window

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Config:
    preset: str = "fmnist-tiny"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict, where: str = "config") -> Config:
        """The inverse of to_dict, for a saved config.json: a missing section or setting, unknown keys and wrong
        types are refused with a FastByolError naming them (a config.json is all of to_dict, as `fastbyol train`
        writes it). Extra top-level keys ('resolved') are ignored."""
        if not isinstance(raw, dict) or not isinstance(raw.get("preset", ""), str):
            raise FastByolError(f"{where}: not a fastbyol config (expected an object with a string 'preset')")
        cfg = cls(preset=raw.get("preset", cls.preset))
        for section, klass in SECTIONS.items():
            if section not in raw and section in LATER_SECTIONS:
                continue
            if section not in raw:
                raise FastByolError(f"{where}: no '{section}' section (not a config written by fastbyol train)")
            values = raw[section]
            if not isinstance(values, dict):
                raise FastByolError(f"{where}: '{section}' must be an object, got {type(values).__name__}")
            known = {f.name: f for f in fields(klass)}
            unknown = sorted(set(values) - set(known))
            if unknown:
                raise FastByolError(f"{where}: unknown setting {section}.{unknown[0]}")
            missing = [name for name in known if name not in values]
            if missing:
                raise FastByolError(f"{where}: no setting {section}.{missing[0]} (not a config written by this "
                                    "fastbyol train)")
            target = getattr(cfg, section)
            for name, value in values.items():
                kind = field_kind(known[name])
                if not _type_ok(value, kind):
                    raise FastByolError(f"{where}: {section}.{name} must be {kind.__name__}, got {value!r}")
                setattr(target, name, float(value) if kind is float else value)
        return cfg

    def validate(self) -> None:
        """Check every field against its rule; raise FastByolError naming the first bad setting (as its flag)."""
        for section in SECTIONS:
            validate_section(getattr(self, section))

    def resolve(self, device_type: str, world_size: int, num_images: int, dataset_name: str = "the dataset") -> Resolved:
        """The derived values of a run on `world_size` processes over `num_images` pretraining images, or a
        FastByolError when the settings cannot make one (a batch that does not divide, or is larger than a shard)."""
        self.validate()
        batch = self.data.batch_size
        if batch % world_size:
            raise FastByolError(f"--batch-size {batch} (the global batch) does not divide over {world_size} processes")
        local_batch, accumulate = batch // world_size, self.optim.accumulate
        if world_size > 1 and world_size % (self.distributed.bn_group or world_size):  # one process: nothing to group
            raise FastByolError(f"--bn-group {self.distributed.bn_group} does not divide the {world_size} processes")
        if local_batch < 2:
            raise FastByolError(f"--batch-size {batch} over {world_size} processes leaves {local_batch} image per "
                                "process; BatchNorm needs at least 2")
        if local_batch % accumulate:
            raise FastByolError(f"--batch-size {batch} does not divide into {world_size} process"
                                f"{'es' if world_size > 1 else ''} x {accumulate} "
                                f"micro-batches (--accumulate {accumulate})")
        if local_batch // accumulate < 2:
            raise FastByolError(f"--batch-size {batch} over {world_size} processes x {accumulate} micro-batches "
                                f"(--accumulate {accumulate}) leaves {local_batch // accumulate} image per "
                                "micro-batch; BatchNorm needs at least 2")
        if batch > num_images:
            raise FastByolError(f"--batch-size {batch} is larger than the {num_images} training images of "
                                f"{dataset_name}")
        steps_per_epoch = (num_images // world_size) // local_batch
        mode = self.run.compile
        if mode == "auto":
            mode = "default" if device_type == "cuda" else "off"
        bf16 = device_type == "cuda"
        return Resolved(
            device=device_type, world_size=world_size, local_batch=local_batch, accumulate=accumulate,
            micro_batch=local_batch // accumulate, steps_per_epoch=steps_per_epoch,
            total_steps=self.optim.epochs * steps_per_epoch,
            warmup_steps=int(round(self.optim.warmup_epochs * steps_per_epoch)),
            peak_lr=self.optim.base_lr * batch / 256.0, compile_mode=mode, autocast_bf16=bf16,
            input_dtype="float16" if bf16 else "float32",
            profile_steps=_profile_steps(self.run.profile) if self.run.profile else None)


def _preset(name: str, data: dict, model: dict, optim: dict, summary: str) -> tuple[Config, str]:
    return Config(preset=name, data=DataConfig(**data), model=ModelConfig(**model),
                  optim=OptimConfig(**optim)), summary


PRESETS: dict[str, tuple[Config, str]] = dict(
    [
        ("fmnist-tiny", _preset("fmnist-tiny", dict(crop_min_area=0.2), {}, {},
                                "default: embedded Fashion-MNIST, tiny ResNet, 28 px, batch 128, 16 epochs; "
                                "about 3 min on 2 CPU cores (2 min 46 s measured)")),
        ("fmnist-vit-tiny", _preset(
            "fmnist-vit-tiny", dict(crop_min_area=0.2),
            dict(arch="vit-tiny-cpu", stem="auto"),
            dict(optimizer="adamw", epochs=5, base_lr=2e-3, warmup_epochs=0.5, weight_decay=0.05, tau_base=0.99),
            "embedded Fashion-MNIST, a 4-block ViT on 4 px patches (vit-tiny-cpu), 28 px, batch 128, AdamW, 5 "
            "epochs (the kNN figure: docs/backbones.md)")),
        ("stl10-resnet18", _preset(
            "stl10-resnet18",
            dict(data="stl10_binary", image_size=96, batch_size=256, num_threads=4),
            dict(arch="resnet18", stem="auto", proj_hidden=4096, pred_hidden=4096),
            dict(epochs=100, base_lr=0.45, warmup_epochs=10, weight_decay=1e-6, tau_base=0.99),
            "the original notebook: STL10 (unlabeled + train), ResNet-18, 96 px, batch 256, 100 epochs")),
        ("cifar10-resnet18", _preset(
            "cifar10-resnet18",
            dict(data="cifar-10-batches-py", image_size=32, batch_size=512, num_threads=4),
            dict(arch="resnet18", stem="small", proj_hidden=4096, pred_hidden=4096),
            dict(epochs=300, base_lr=0.3, warmup_epochs=10, weight_decay=1e-6, tau_base=0.99),
            "CIFAR-10, ResNet-18 with the small-image stem, 32 px, batch 512, 300 epochs")),
        ("imagenet-resnet50", _preset(
            "imagenet-resnet50",
            dict(data="imagenet", image_size=224, batch_size=4096, num_threads=8),
            dict(arch="resnet50", stem="imagenet", proj_hidden=4096, pred_hidden=4096),
            dict(epochs=1000, base_lr=0.2, warmup_epochs=10, weight_decay=1.5e-6, tau_base=0.996),
            "the official recipe: ImageNet, ResNet-50, 224 px, batch 4096, 1000 epochs, base lr 0.2, tau 0.996")),
        *[(f"imagenet-resnet50-{epochs}ep", _preset(
            f"imagenet-resnet50-{epochs}ep",
            dict(data="imagenet", image_size=224, batch_size=4096, num_threads=8),
            dict(arch="resnet50", stem="imagenet", proj_hidden=4096, pred_hidden=4096),
            dict(epochs=epochs, base_lr=lr, warmup_epochs=10, weight_decay=1e-6, tau_base=0.99),
            f"the official recipe at {epochs} epochs: ImageNet, ResNet-50, 224 px, batch 4096, base lr {lr}, tau "
            "0.99, weight decay 1e-6 (the official code's values for that length)")) for epochs, lr in ((300, 0.3),
                                                                                                      (100, 0.45))],
        ("imagenet100-resnet18", _preset(
            "imagenet100-resnet18",
            dict(data="imagenet100", image_size=224, batch_size=256, num_threads=8),
            dict(arch="resnet18", stem="imagenet", proj_hidden=4096, pred_hidden=4096),
            dict(epochs=400, base_lr=0.3, warmup_epochs=10, weight_decay=1e-6, tau_base=0.99),
            "ImageNet-100 (100 classes, 126,689 images), ResNet-18, 224 px, batch 256, 400 epochs (solo-learn's "
            "benchmark); the official code's 300-epoch optimizer: base lr 0.3, tau 0.99, weight decay 1e-6")),
        *[(f"imagenet-{arch}", _preset(
            f"imagenet-{arch}",
            dict(data="imagenet", image_size=224, batch_size=4096, num_threads=8),
            dict(arch=arch, stem="imagenet", proj_hidden=4096, pred_hidden=4096),
            dict(epochs=1000, base_lr=0.2, warmup_epochs=10, weight_decay=1.5e-6, tau_base=0.996),
            f"the BYOL paper's {what}: the ResNet-50 recipe unchanged (batch 4096, 1000 epochs, LARS base lr 0.2, "
            "tau 0.996)")) for arch, what in (("resnet50x2", "ResNet-50 (2x), 94M"),
                                               ("resnet200x2", "ResNet-200 (2x), 250M"))],
        ("imagenet-vit-small", _preset(
            "imagenet-vit-small",
            dict(data="imagenet", image_size=224, batch_size=4096, num_threads=8),
            dict(arch="vit_small_patch16", stem="auto", proj_hidden=4096, pred_hidden=4096),
            dict(optimizer="adamw", epochs=300, base_lr=1.5e-4, warmup_epochs=40, weight_decay=0.1, tau_base=0.99),
            "MoCo v3's ViT recipe with BYOL's loss: ImageNet, ViT-S/16, 224 px, batch 4096, 300 epochs, AdamW "
            "lr 1.5e-4 x batch/256, wd 0.1, 40 warmup epochs, cosine, tau 0.99")),
    ]
)
DEFAULT_PRESET = "fmnist-tiny"


def get_preset(name: str) -> Config:
    if name not in PRESETS:
        raise FastByolError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return copy.deepcopy(PRESETS[name][0])  # a copy the caller may modify


# ------------------------------------------------------------------------------------------------------ config files
# field name -> its section: a config file may give a setting flat (batch_size: 256) or in its section (data: ...)
FIELD_SECTIONS = {f.name: section for section, klass in SECTIONS.items() for f in fields(klass)}
CONFIG_FILE_HEADER = "# fastbyol train settings: `fastbyol train --config FILE` starts from them, flags override them\n"


def read_config_file(path: str | Path) -> dict:
    """The mapping a YAML file holds (JSON is YAML too: a run's config.json reads as it is); FastByolError naming the
    file, and the line for a syntax error, otherwise. yaml is imported here only: `fastbyol --help` does not load it."""
    import yaml

    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as e:
        why = e.strerror if isinstance(e, OSError) else "not UTF-8 text"
        raise FastByolError(f"--config {path}: cannot read it ({why})") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f", line {mark.line + 1}" if mark is not None else ""
        raise FastByolError(f"{path}{where}: not valid YAML ({getattr(e, 'problem', None) or type(e).__name__})") \
            from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise FastByolError(f"{path}: expected settings as a mapping (key: value), got {type(raw).__name__}")
    return raw


def _unknown(where: str, key: str, known) -> FastByolError:
    import difflib

    close = difflib.get_close_matches(str(key), list(known), n=1)
    return FastByolError(f"{where}: unknown setting {key!r}" + (f" (did you mean {close[0]}?)" if close else ""))


def _set_from_file(cfg: Config, section: str, name, value, where: str) -> None:
    """One setting of a config file, type-checked: a float may be written as YAML 1.1 reads '1e-6' (a string)."""
    known = {f.name: f for f in fields(SECTIONS[section])}
    if name not in known:
        raise _unknown(where, f"{section}.{name}", [f"{section}.{n}" for n in known])
    kind = field_kind(known[name])
    if kind is float and isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            pass
    if not _type_ok(value, kind):
        raise FastByolError(f"{where}: {section}.{name} must be {kind.__name__}, got {value!r}")
    setattr(getattr(cfg, section), name, float(value) if kind is float else value)


def config_from_file(path: str | Path, preset: str | None = None) -> Config:
    """The settings of a config file over its preset's (`preset` given on the command line wins over the file's):
    sections as config.json has them (data: {batch_size: 256}) or flat keys (batch_size: 256). A run's config.json is
    a template: its `resolved` values are recomputed and its folder (out, name) is not reused. Unknown keys, wrong
    types and values outside a setting's rule are one FastByolError naming the file and the key."""
    raw, where = read_config_file(path), str(path)
    name = preset if preset is not None else raw.get("preset", DEFAULT_PRESET)
    if not isinstance(name, str) or name not in PRESETS:
        raise FastByolError(f"{where}: preset {name!r} is not one of {', '.join(PRESETS)}")
    cfg = get_preset(name)
    template = "resolved" in raw  # a run's config.json
    for key, value in raw.items():
        if key in ("preset", "resolved") or template and key == "run_id":  # a new run gets its own id
            continue
        if key in SECTIONS:
            if not isinstance(value, dict):
                raise FastByolError(f"{where}: '{key}' must be a mapping of its settings, got {value!r}")
            for field_name, v in value.items():
                _set_from_file(cfg, key, field_name, v, where)
        elif key in FIELD_SECTIONS:
            _set_from_file(cfg, FIELD_SECTIONS[key], key, value, where)
        else:
            raise _unknown(where, key, [*SECTIONS, *FIELD_SECTIONS, "preset"])
    if template:
        cfg.run.out = cfg.run.name = ""
    for section in SECTIONS:
        validate_section(getattr(cfg, section), name=lambda n, s=section: f"{where}: {s}.{n}")
    return cfg


def config_yaml(cfg: Config) -> str:
    """The settings as a config file (`--print-config`): every setting in its section, so `--config` of it gives the
    same Config."""
    import yaml

    raw = cfg.to_dict()
    for section, klass in SECTIONS.items():  # a float setting given as an int (a preset's 10) prints as 10.0
        for f in fields(klass):
            if field_kind(f) is float:
                raw[section][f.name] = float(raw[section][f.name])
    return CONFIG_FILE_HEADER + yaml.safe_dump(raw, sort_keys=False, default_flow_style=False)


def require_config(cfg, where: str = "train(cfg)") -> Config:
    """`cfg` when it is a Config (with sections of their own types: a Config whose `data` was replaced by a dict is
    no config); else one line saying what it is and how to make one."""
    if not isinstance(cfg, Config):
        raise FastByolError(f"{where}: expected a fastbyol.config.Config (get_preset(NAME), or Config()), got "
                            f"{type(cfg).__name__}")
    for section, klass in SECTIONS.items():
        if not isinstance(getattr(cfg, section, None), klass):
            raise FastByolError(f"{where}: its '{section}' is a {type(getattr(cfg, section, None)).__name__}, not a "
                                f"{klass.__name__}")
    return cfg
