"""The `fastbyol` command (also `python -m fastbyol`).

    fastbyol train [--preset NAME] [--data PATH] [--epochs N] [--batch-size N] [--seed S] [--out DIR] ...
    fastbyol presets

Errors in the user's input print one line (`fastbyol: error: ...`) and exit with status 2, without a traceback
unless --debug is given.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

from .config import DEFAULT_PRESET, PRESETS, Config, get_preset
from .errors import FastByolError

# command-line flags generated from the config fields: (section, field) -> help
_TRAIN_FLAGS = {
    ("data", "data"): "dataset: 'embedded', 'fashion-mnist', a dataset folder or a .npy/.npz file",
    ("data", "data_format"): "auto | idx | stl10 | cifar | numpy | folder (auto: recognised from the files)",
    ("optim", "epochs"): "passes over the training images",
    ("data", "batch_size"): "images per step over all ranks (two views each)",
    ("run", "seed"): "random seed (weights, shuffling, augmentation)",
    ("run", "out"): "run directory (default: runs/<preset>-<UTC time>)",
    ("data", "image_size"): "side of each augmented view, px",
    ("data", "num_threads"): "DALI worker threads",
    ("data", "skip_bad_files"): "leave out and count truncated or non-image files instead of stopping",
    ("data", "crop_min_area"): "smallest random-resized-crop area, fraction of the image (official 0.08)",
    ("model", "arch"): "encoder: resnet18 | resnet34 | resnet50 | resnet-tiny",
    ("model", "stem"): "auto | imagenet | small | small-s2",
    ("optim", "base_lr"): "LARS lr = base_lr * batch_size / 256",
    ("optim", "warmup_epochs"): "epochs of linear lr warmup",
    ("optim", "weight_decay"): "LARS weight decay (not on biases and BN)",
    ("optim", "tau_base"): "EMA decay at step 0 (cosine to 1)",
    ("run", "device"): "auto | cpu | cuda",
    ("run", "compile"): "torch.compile of the forward: auto (default on CUDA, off on CPU) | off | default | "
                        "reduce-overhead | max-autotune | max-autotune-no-cudagraphs",
    ("run", "log_every"): "steps between loss reads",
    ("run", "ckpt_every_steps"): "steps between checkpoints for --resume (0: only the final one)",
    ("run", "knn_k"): "kNN neighbours",
    ("run", "knn_every"): "epochs between online kNN checks on a subset (0: none)",
    ("run", "knn_subset"): "memory-bank images of the online kNN check",
}


def _flag(field: str) -> str:
    return "--" + field.replace("_", "-")


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastbyol", description="Fast, correct BYOL pretraining.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    train = sub.add_parser("train", help="BYOL pretraining", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                           description="BYOL pretraining; preset values are the defaults, any flag overrides them.")
    train.add_argument("--preset", default=DEFAULT_PRESET, help=f"one of: {', '.join(PRESETS)}")
    defaults = get_preset(DEFAULT_PRESET)
    for (section, field), text in _TRAIN_FLAGS.items():
        value = getattr(getattr(defaults, section), field)
        if isinstance(value, bool):
            train.add_argument(_flag(field), dest=f"{section}.{field}", action="store_true", default=None,
                               help=text)
            continue
        train.add_argument(_flag(field), dest=f"{section}.{field}", type=type(value), default=None,
                           help=f"{text} (preset {DEFAULT_PRESET}: {value!r})")
    train.add_argument("--resume", default=None, metavar="RUN_DIR",
                       help="continue an interrupted run exactly from its last checkpoint (its own config is used)")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    train.add_argument("--debug", action="store_true", help="show tracebacks")

    bench = sub.add_parser("bench", help="measure one part of the system")
    bench_sub = bench.add_subparsers(dest="bench_target", metavar="TARGET")
    bench_sub.required = True
    aug = bench_sub.add_parser("augment", help="two-view samples/s of the DALI augmentation pipeline",
                               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    aug.add_argument("--size", type=int, default=224, help="view side, px")
    aug.add_argument("--batch", type=int, default=256, help="images per batch")
    aug.add_argument("--device", default="cpu", choices=["cpu", "gpu"], help="where DALI runs")
    aug.add_argument("--source", default="arrays", choices=["arrays", "jpeg"],
                     help="uint8 arrays in memory, or synthetic JPEG files decoded by DALI")
    aug.add_argument("--steps", type=int, default=20, help="timed batches (after 3 warm-up batches)")
    aug.add_argument("--threads", type=int, default=None, help="DALI threads (default: min(8, cores))")
    aug.add_argument("--json", action="store_true", help="print one JSON object")
    aug.add_argument("--debug", action="store_true", help="show tracebacks")

    ev = sub.add_parser("eval", help="kNN and linear probe of a run's encoder on the labeled splits",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ev.add_argument("run_dir", help="a run directory written by fastbyol train")
    ev.add_argument("--data", default=None, help="dataset to evaluate on (default: the run's own)")
    ev.add_argument("--init", default="trained", choices=["trained", "random"],
                    help="the run's trained encoder, or a random-init one of the same architecture (the baseline)")
    ev.add_argument("--probe-epochs", type=int, default=100, help="epochs of the linear probe")
    ev.add_argument("--probe-lr", type=float, default=0.2, help="peak lr of the linear probe (cosine to 0)")
    ev.add_argument("--no-progress", action="store_true", help="no progress bars")
    ev.add_argument("--debug", action="store_true", help="show tracebacks")

    ex = sub.add_parser("export", help="write the encoder as a torchvision-compatible state_dict",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ex.add_argument("run_dir", help="a run directory written by fastbyol train")
    ex.add_argument("--out", required=True, help="FILE.pt, FILE.pth, or FILE.safetensors (needs safetensors)")
    ex.add_argument("--which", default="online", choices=["online", "target"], help="which encoder")
    ex.add_argument("--debug", action="store_true", help="show tracebacks")

    pl = sub.add_parser("plot", help="PNG curves of loss, lr, tau, kNN and img/s (needs matplotlib)")
    pl.add_argument("run_dir", help="a run directory written by fastbyol train")
    pl.add_argument("--out", default=None, help="PNG file (default: RUN_DIR/curves.png)")
    pl.add_argument("--debug", action="store_true", help="show tracebacks")

    presets = sub.add_parser("presets", help="list the presets with their key settings")
    presets.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)
    return parser


def config_from_args(args: argparse.Namespace) -> Config:
    cfg = get_preset(args.preset)
    for (section, field), _ in _TRAIN_FLAGS.items():
        value = getattr(args, f"{section}.{field}")
        if value is not None:
            setattr(getattr(cfg, section), field, value)
    return cfg


def _print_presets() -> None:
    for name, (cfg, summary) in PRESETS.items():
        d, m, o = cfg.data, cfg.model, cfg.optim
        print(f"{name:18s} {summary}")
        print(f"{'':18s} data={d.data} size={d.image_size}px batch={d.batch_size} arch={m.arch} epochs={o.epochs} "
              f"base_lr={o.base_lr} tau_base={o.tau_base} wd={o.weight_decay}")


def main(argv: list[str] | None = None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "presets":
            _print_presets()
            return 0
        if args.command == "eval":
            from .evaluate import evaluate

            evaluate(args.run_dir, args.data, args.init, args.probe_epochs, args.probe_lr,
                     progress=not args.no_progress)
            return 0
        if args.command == "export":
            from .evaluate import export_encoder

            print(f"encoder: {export_encoder(args.run_dir, args.out, args.which)}")
            return 0
        if args.command == "plot":
            from .evaluate import plot_run

            print(f"curves: {plot_run(args.run_dir, args.out)}")
            return 0
        if args.command == "bench":
            import json

            from .augment_bench import bench_augment

            r = bench_augment(args.size, args.batch, args.device, args.source, args.steps, num_threads=args.threads)
            if args.json:
                print(json.dumps(r))
            else:
                print(f"augment {r['source']} -> {r['size']} px, batch {r['batch']}, {r['device']} "
                      f"({r['threads']} threads): {r['samples_per_s']:.0f} two-view samples/s")
            return 0
        if args.command == "train":
            from .train import train

            cfg = config_from_args(args)
            if args.resume is None and os.environ.get("RANK", "0") == "0":  # under torchrun: rank 0 speaks
                print("config: " + str(dataclasses.asdict(cfg)))
            train(cfg, progress=not args.no_progress, resume=args.resume)
            return 0
    except FastByolError as e:
        if args.debug:
            raise
        print(f"fastbyol: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fastbyol: interrupted", file=sys.stderr)
        return 130
    return 0
