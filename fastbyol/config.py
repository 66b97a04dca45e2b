"""Configuration: one dataclass per concern (units in comments), named presets, resolved config saved per run.

    fastbyol presets              # list them
    fastbyol train --preset NAME  # any field can then be overridden from the command line
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field

from .errors import FastByolError


COMPILE_MODES = ("auto", "off", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass
class DataConfig:
    data: str = "embedded"  # 'embedded', 'fashion-mnist', a dataset folder or a .npy/.npz file
    data_format: str = "auto"  # auto | idx | stl10 | cifar | numpy | folder
    image_size: int = 28  # px, side of each augmented view
    batch_size: int = 128  # images a step over all ranks; each image gives two views
    num_threads: int = 2  # DALI worker threads
    skip_bad_files: bool = False  # leave out (and count) truncated or non-image files instead of stopping
    crop_min_area: float = 0.08  # smallest random-resized-crop area, fraction of the image (official 0.08)


@dataclass
class ModelConfig:
    arch: str = "resnet-tiny"  # resnet18 | resnet34 | resnet50 | resnet-tiny
    stem: str = "small-s2"  # auto (small if image_size <= 64) | imagenet | small | small-s2
    proj_hidden: int = 1024  # projector hidden width (official: 4096)
    proj_dim: int = 256  # projection / prediction width
    pred_hidden: int = 1024  # predictor hidden width (official: 4096)


@dataclass
class OptimConfig:
    epochs: int = 16  # passes over the training images
    base_lr: float = 4.0  # LARS lr = base_lr * batch_size / 256
    warmup_epochs: float = 1.0  # linear warmup from 0, then cosine to 0
    weight_decay: float = 1e-6  # applied before the trust ratio; not to biases and BN
    momentum: float = 0.9
    trust_coefficient: float = 1e-3  # LARS eta
    tau_base: float = 0.99  # EMA decay at step 0, cosine to 1 at the last step


@dataclass
class RunConfig:
    seed: int = 0
    out: str = ""  # run directory; default runs/<preset>-<UTC time>
    device: str = "auto"  # auto | cpu | cuda
    compile: str = "auto"  # torch.compile of the online/target forward: auto (default mode on CUDA, off on CPU) |
    # off | default | reduce-overhead (CUDA graphs) | max-autotune | max-autotune-no-cudagraphs
    log_every: int = 10  # steps between loss reads (host syncs)
    ckpt_every_steps: int = 0  # steps between checkpoints for --resume (0: only the final one)
    knn_every: int = 4  # epochs between online kNN checks on a subset (0: only the final full evaluation)
    knn_subset: int = 4000  # images of the memory bank in the online check (queries: a quarter as many)
    knn_k: int = 200  # neighbours of the kNN monitor
    knn_temperature: float = 0.1


@dataclass
class Config:
    preset: str = "fmnist-tiny"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict:
        return asdict(self)

    def validate(self) -> None:
        """Raise FastByolError naming the first bad setting."""
        checks = [
            (self.data.batch_size > 0, f"--batch-size must be > 0, got {self.data.batch_size}"),
            (self.optim.epochs > 0, f"--epochs must be > 0, got {self.optim.epochs}"),
            (self.data.image_size >= 8, f"--image-size must be >= 8, got {self.data.image_size}"),
            (self.data.num_threads > 0, f"--num-threads must be > 0, got {self.data.num_threads}"),
            (0.0 < self.data.crop_min_area <= 1.0, f"--crop-min-area must be in (0, 1], got {self.data.crop_min_area}"),
            (self.optim.base_lr > 0, f"--base-lr must be > 0, got {self.optim.base_lr}"),
            (self.optim.warmup_epochs >= 0, f"--warmup-epochs must be >= 0, got {self.optim.warmup_epochs}"),
            (0.0 <= self.optim.tau_base <= 1.0, f"--tau-base must be in [0, 1], got {self.optim.tau_base}"),
            (self.run.log_every > 0, f"--log-every must be > 0, got {self.run.log_every}"),
            (self.run.ckpt_every_steps >= 0, f"--ckpt-every-steps must be >= 0, got {self.run.ckpt_every_steps}"),
            (self.run.knn_k > 0, f"--knn-k must be > 0, got {self.run.knn_k}"),
            (self.run.knn_every >= 0, f"--knn-every must be >= 0, got {self.run.knn_every}"),
            (self.run.knn_subset > 0, f"--knn-subset must be > 0, got {self.run.knn_subset}"),
            (self.run.device in ("auto", "cpu", "cuda"), f"--device must be auto, cpu or cuda, got {self.run.device}"),
            (self.run.compile in COMPILE_MODES, f"--compile must be one of {', '.join(COMPILE_MODES)}, "
                                                f"got {self.run.compile}"),
        ]
        for ok, message in checks:
            if not ok:
                raise FastByolError(message)


def _preset(name: str, data: dict, model: dict, optim: dict, summary: str) -> tuple[Config, str]:
    return Config(preset=name, data=DataConfig(**data), model=ModelConfig(**model),
                  optim=OptimConfig(**optim)), summary


PRESETS: dict[str, tuple[Config, str]] = dict(
    [
        ("fmnist-tiny", _preset("fmnist-tiny", dict(crop_min_area=0.2), {}, {},
                                "default: embedded Fashion-MNIST, tiny ResNet, 28 px, batch 128, 16 epochs; "
                                "~4 min on 2 CPU cores")),
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
    ]
)
DEFAULT_PRESET = "fmnist-tiny"


def get_preset(name: str) -> Config:
    if name not in PRESETS:
        raise FastByolError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return copy.deepcopy(PRESETS[name][0])  # a copy the caller may modify
