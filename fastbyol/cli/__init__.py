"""The `fastbyol` command (also `python -m fastbyol`).

    fastbyol train [--preset NAME] [--data PATH] [--epochs N] [--batch-size N] [--seed S] [--out DIR] ...
    fastbyol train --resume RUN_DIR
    fastbyol train --out RUN_DIR --auto-resume ...   # re-runnable: starts, continues or refuses RUN_DIR
    fastbyol eval RUN_DIR [--protocol features|paper] | finetune RUN_DIR --fraction F | export RUN_DIR --out FILE
    fastbyol plot RUN_DIR | bench augment | presets

`train`'s flags are generated from the config dataclasses (`fastbyol.config`): one flag per setting, its help and
rule written once there. Errors in the user's input print one line (`fastbyol: error: ...`) and exit with status 2,
without a traceback unless --debug is given. A run stopped by SIGTERM, SIGUSR1 or SIGINT (checkpoint written) exits
with status 75 (fastbyol.run.preemption.EXIT_PREEMPTED).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from ..config import (BLUR_WINDOW_RULES, CPU_PARALLEL_MODES, DECODE_MODES, DEFAULT_PRESET, PRESETS, SECTIONS, Config,
                      allowed_values, config_from_file, config_yaml, field_kind, flag_name, get_preset)
from .arguments import OneLineParser, integer, number
from .help import DefaultsHelpFormatter
from ..errors import FastByolError

ARG_TYPES = {int: integer, float: number}  # a setting's type -> how its flag reads it (cli.arguments)
EXIT_PREEMPTED_DOC = 75  # fastbyol.run.preemption.EXIT_PREEMPTED (not imported here: it loads torch)


def _train_flags() -> list[tuple[str, dataclasses.Field]]:
    """(section, field) of every setting, in declaration order; flags must be unique across sections."""
    flags = [(section, f) for section, klass in SECTIONS.items() for f in dataclasses.fields(klass)]
    names = [f.name for _, f in flags]
    assert len(names) == len(set(names)), "config field names must be unique: they become the flags"
    return flags


def add_settings(parser: argparse.ArgumentParser) -> None:
    """--preset, --config and one flag per setting (train's, and plan's: the same settings)."""
    parser.add_argument("--preset", default=None, help=f"one of: {', '.join(PRESETS)} (default: {DEFAULT_PRESET}, or "
                                                       "the config file's)")
    parser.add_argument("--config", default=None, metavar="FILE",
                        help="a YAML file of settings (as --print-config writes them, or a run's config.json as a "
                             "template): its preset's values, then the file's, then the flags given here")
    defaults = get_preset(DEFAULT_PRESET)
    for section, f in _train_flags():
        value = getattr(getattr(defaults, section), f.name)
        kind, allowed = field_kind(f), allowed_values(f)
        text = f.metadata["help"] + (f" ({' | '.join(allowed)})" if allowed else "")
        if kind is bool:  # on by default: --name and --no-name; off by default: --name
            parser.add_argument(flag_name(f.name), dest=f"{section}.{f.name}", default=None, help=text,
                                action=argparse.BooleanOptionalAction if value else "store_true")
            continue
        if (section, f.name) == ("model", "arch"):  # repeatable: with --resume each allows a module:factory
            parser.add_argument("--arch", dest="model.arch", action="append", default=None, metavar="ARCH",
                                help=f"{text} [{DEFAULT_PRESET}: {value!r}]; with --resume: allows the run's encoder "
                                     "of your own, module:factory, to be imported (repeatable)")
            continue
        parser.add_argument(flag_name(f.name), dest=f"{section}.{f.name}", type=ARG_TYPES.get(kind, kind),
                            default=None, metavar=f.name.upper(), help=f"{text} [{DEFAULT_PRESET}: {value!r}]")
def _add_train_parser(sub) -> None:
    train = sub.add_parser("train", help="BYOL pretraining",
                           description="BYOL pretraining; preset values are the defaults, then a --config file's, "
                                       "and any flag overrides them.",
                           epilog=f"exit status: 0 finished, 2 bad input or settings (one line), {EXIT_PREEMPTED_DOC} "
                                  "stopped by SIGTERM, SIGUSR1 or SIGINT at a log point with a checkpoint written "
                                  "(the stop line says the command that continues it)")
    add_settings(train)
    train.add_argument("--print-config", action="store_true",
                       help="print the resolved settings as a config file (YAML) and exit without training")
    train.add_argument("--resume", default=None, metavar="RUN_DIR",
                       help="continue an interrupted run exactly from its last checkpoint (its own config is used: "
                            "no settings may be given with it)")
    train.add_argument("--auto-resume", action="store_true",
                       help="make the command re-runnable (by a scheduler, torchrun --max-restarts, or by hand): a "
                            "missing or empty --out starts the run, one holding a checkpoint of a run with the same "
                            "settings continues it exactly, other settings are refused (exit 2), a finished run is "
                            "left alone (exit 0). SIGTERM, SIGUSR1 and SIGINT stop every process at the next log "
                            f"point with a checkpoint and exit {EXIT_PREEMPTED_DOC} (run the command again to "
                            "continue); needs --out or --name")
    train.add_argument("--no-progress", action="store_true",
                       help="no progress bar: one text line a log point (also when stderr is not a terminal)")
    train.add_argument("--debug", action="store_true", help="show tracebacks")


def _add_other_parsers(sub) -> None:
    bench = sub.add_parser("bench", help="measure one part of the system")
    bench_sub = bench.add_subparsers(dest="bench_target", metavar="TARGET")
    bench_sub.required = True
    gc = bench_sub.add_parser("gpu-compile", help="every Triton kernel compiled for sm_80/90/100 without a GPU")
    gc.add_argument("--out", required=True, help="JSON report to write ({\"rows\": [...]})")
    gc.add_argument("--no-scratch", action="store_true", help="only the installed Triton, not the GPU machine's")
    aug = bench_sub.add_parser("augment", help="two-view samples/s of the augmentation pipeline",
                               formatter_class=DefaultsHelpFormatter)
    aug.add_argument("--size", type=integer, default=224, help="view side, px")
    aug.add_argument("--batch", type=integer, default=256, help="images per batch")
    aug.add_argument("--device", default="cpu", choices=["cpu", "gpu"], help="where DALI runs")
    aug.add_argument("--source", default="arrays", choices=["arrays", "gray", "jpeg"],
                     help="uint8 colour arrays in memory, the same gray (R = G = B: the Fashion-MNIST fast path), or "
                          "synthetic JPEG files decoded by DALI")
    aug.add_argument("--preset", default=DEFAULT_PRESET, choices=list(PRESETS),
                     help="measure this preset's views and augmentation settings, as fastbyol train runs them")
    aug.add_argument("--decode", default=None, choices=list(DECODE_MODES),
                     help="GPU JPEG decode: one region-of-interest decode per view, or one whole decode + two crops "
                          "(default: the preset's, fastbyol train --decode)")
    aug.add_argument("--blur-window", default=None, choices=list(BLUR_WINDOW_RULES),
                     help="blur window rule (default: the preset's, fastbyol train --blur-window)")
    aug.add_argument("--steps", type=integer, default=20, help="timed batches (after 3 warm-up batches)")
    aug.add_argument("--threads", type=integer, default=None,
                     help="DALI threads and CPU pixel workers (default: min(8, cores))")
    aug.add_argument("--cpu-parallel", default=None, choices=list(CPU_PARALLEL_MODES),
                     help="CPU, arrays: the crops and chain in worker processes or threads (default: the preset's, "
                          "fastbyol train --cpu-parallel)")
    aug.add_argument("--json", action="store_true", help="print one JSON object")
    aug.add_argument("--debug", action="store_true", help="show tracebacks")

    _add_eval_parsers(sub)

    ex = sub.add_parser("export", help="write the encoder as a torchvision-compatible state_dict",
                        formatter_class=DefaultsHelpFormatter)
    ex.add_argument("run_dir", help="a run directory written by fastbyol train")
    ex.add_argument("--out", required=True, help="FILE.pt, FILE.pth, or FILE.safetensors (needs safetensors)")
    ex.add_argument("--which", default="online", choices=["online", "target"], help="which encoder")
    _add_own_arch(ex)
    ex.add_argument("--debug", action="store_true", help="show tracebacks")

    pl = sub.add_parser("plot", help="PNG curves of loss, lr, tau, kNN and img/s (needs matplotlib)")
    pl.add_argument("run_dir", help="a run directory written by fastbyol train")
    pl.add_argument("--out", default=None, help="PNG file (default: RUN_DIR/curves.png)")
    pl.add_argument("--debug", action="store_true", help="show tracebacks")

    try:
        from ..data.shards import add_shards_command
    except ImportError:
        pass
    else:
        add_shards_command(sub)

    presets = sub.add_parser("presets", help="list the presets with their key settings")
    presets.add_argument("--markdown", action="store_true", help="as the markdown table of docs/cli.md")
    presets.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)
    _add_plan_parser(sub)


def _add_plan_parser(sub) -> None:
    plan = sub.add_parser("plan", help="per-GPU batch, --accumulate, memory and time of a run on a given machine",
                          description="Plan a training run: for a preset (or train's settings) and a machine, the "
                                      "batch per GPU, the --accumulate that fits, the memory estimate and the time per "
                                      "epoch and to the end, from the trainer's FLOP count and memory bound; the time "
                                      "is an estimate at an assumed MFU until --img-per-s gives a measured rate.")
    plan.add_argument("--gpus", type=int, default=1, help="GPUs of the run (processes under torchrun) (default: 1)")
    plan.add_argument("--gpu", default=None, metavar="KIND",
                      help="H100, H200, A100, L40S or A10 (default: H100; or give --tflops and --memory-gb)")
    plan.add_argument("--tflops", type=float, default=None, help="a GPU's dense bf16 TFLOP/s (with --memory-gb)")
    plan.add_argument("--memory-gb", type=float, default=None, help="a GPU's memory, GB (with --tflops)")
    plan.add_argument("--mfu", type=float, default=None,
                      help="model FLOP utilisation the estimate assumes, in (0, 1] (default: 0.10)")
    plan.add_argument("--img-per-s", type=float, default=None,
                      help="a measured BYOL rate a GPU (summary.json's img_per_s / world_size) instead of the estimate")
    plan.add_argument("--images", type=int, default=None,
                      help="pretraining images (default: known for imagenet, imagenet100, stl10_binary, "
                           "cifar-10-batches-py, embedded, fashion-mnist)")
    plan.add_argument("--table", action="store_true", help="the docs' table: the main presets on 1, 8 and 64 GPUs")
    add_settings(plan)
    plan.add_argument("--debug", action="store_true", help="show tracebacks")


OWN_ARCH_HELP = ("allow the run's encoder of your own, module.path:factory, to be imported (repeatable: one flag per "
                 "module); a run folder never imports code by itself, and registry encoders need no --arch")


def _add_own_arch(parser) -> None:
    parser.add_argument("--arch", action="append", default=[], metavar="MODULE:FACTORY", help=OWN_ARCH_HELP)


def _own_encoders(names: list[str]):
    """models.OwnEncoders of the --arch flags given (each must be module.path:factory); one line otherwise."""
    from ..models import OwnEncoders

    try:
        return OwnEncoders(frozenset(names))
    except ValueError as e:
        raise FastByolError(str(e)) from None


def _add_eval_parsers(sub) -> None:
    paper = ("paper: the BYOL paper's ImageNet linear protocol (appendix; official byol/configs/eval.py): frozen "
             "encoder in eval mode, a linear classifier on random resized crops + flips of the train split drawn per "
             "image per epoch, tested on the centre crop (resize to 256/224 of the image size, crop); SGD Nesterov "
             "momentum 0.9, no weight decay, cosine lr, 80 epochs, batch 1024, lr = base x batch/256 with base "
             "from {0.4, 0.3, 0.2, 0.1, 0.05} chosen on a held-out part of the train split (paper: 10,009 images); "
             "batch and held-out part scaled to the data. features: kNN + a linear probe on frozen features "
             "extracted once (fast, no augmentation)")
    ev = sub.add_parser("eval", help="kNN and linear evaluation of a run's encoder on the labeled splits",
                        formatter_class=DefaultsHelpFormatter)
    ev.add_argument("run_dir", help="a run directory written by fastbyol train")
    ev.add_argument("--protocol", default="features", choices=["features", "paper"], help=paper)
    ev.add_argument("--data", default=None, help="dataset to evaluate on (default: the run's own)")
    ev.add_argument("--init", default="trained", choices=["trained", "random"],
                    help="the run's trained encoder, or a random-init one of the same architecture (the baseline)")
    ev.add_argument("--probe-epochs", type=integer, default=100, help="features: epochs of the linear probe")
    ev.add_argument("--probe-lr", type=number, default=0.2, help="features: peak lr of the linear probe (cosine to 0)")
    ev.add_argument("--epochs", type=integer, default=80, help="paper: epochs of the linear classifier")
    ev.add_argument("--batch-size", type=integer, default=None,
                    help="paper: batch (default: 1024, at most an eighth of the train split, a power of two)")
    ev.add_argument("--no-progress", action="store_true", help="no progress bars")
    _add_own_arch(ev)
    ev.add_argument("--debug", action="store_true", help="show tracebacks")

    ft = sub.add_parser("finetune", help="fine-tune the encoder + a linear head on a labelled subset (semi-supervised)",
                        formatter_class=DefaultsHelpFormatter,
                        description="Semi-supervised evaluation (BYOL paper, Table 2: 1% and 10% of the labels): "
                                    "the whole encoder and a linear head trained on a class-balanced, seeded subset "
                                    "of the labelled train split, top-1 on the test split's centre crops. Settings: "
                                    "the official evaluation code's fine-tuning mode (SGD Nesterov momentum 0.9, no "
                                    "weight decay, lr 0.2 x batch/256 cosine to 0, 80 epochs, batch 1024 scaled to "
                                    "the subset), random resized crops + flips. Writes RUN_DIR/finetune-FRACTION.json "
                                    "(-random for --init random).")
    ft.add_argument("run_dir", help="a run directory written by fastbyol train")
    ft.add_argument("--fraction", type=number, default=None, help="share of the labels, in (0, 1]: 0.01, 0.1, 1.0")
    ft.add_argument("--subset", default=None, metavar="FILE",
                    help="instead of --fraction: the images to train on, one a line: 0-based indices into the "
                         "labelled train split, or (image folders) file names, each a path relative to the train "
                         "folder or a bare name unique in it (the paper's ImageNet subset lists)")
    ft.add_argument("--init", default="trained", choices=["trained", "random"],
                    help="the run's trained encoder, or a random-init one (supervised from scratch: the baseline)")
    ft.add_argument("--epochs", type=integer, default=80, help="epochs over the subset")
    ft.add_argument("--lr", type=number, default=0.2, help="base lr (lr = base x batch / 256, cosine to 0)")
    ft.add_argument("--batch-size", type=integer, default=None,
                    help="batch (default: 1024, at most an eighth of the subset, a power of two)")
    ft.add_argument("--data", default=None, help="dataset (default: the run's own)")
    ft.add_argument("--no-progress", action="store_true", help="no progress bars")
    _add_own_arch(ft)
    ft.add_argument("--debug", action="store_true", help="show tracebacks")


def _build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="fastbyol", description="Fast, correct BYOL pretraining.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    _add_train_parser(sub)
    _add_other_parsers(sub)
    return parser


def _given_settings(args: argparse.Namespace) -> list[tuple[str, str, object]]:
    """(section, field, value) of every train flag given on the command line (--arch, which may be repeated: its
    last value)."""
    given = [(s, f.name, getattr(args, f"{s}.{f.name}")) for s, f in _train_flags()
             if getattr(args, f"{s}.{f.name}") is not None]
    return [(s, name, value[-1] if isinstance(value, list) else value) for s, name, value in given]


def _train_own_arch_names(args: argparse.Namespace, resume: bool) -> list[str]:
    """The encoders of the user's own that `train` may import from a run's config.json: the module:factory values
    of --arch (with --resume every --arch must be one: one line otherwise; on a new run its last --arch is the run's
    own choice). Checked without torch, so that a bad one is said before anything starts."""
    from ..models.names import check_own_arch_names, is_custom_arch

    names = getattr(args, "model.arch") or []
    if resume:
        try:
            check_own_arch_names(names)
        except ValueError as e:
            raise FastByolError(str(e)) from None
        return names
    return [n for n in names if is_custom_arch(n)]


def config_from_args(args: argparse.Namespace) -> Config:
    """The preset's settings, then the --config file's, then the flags given; --data recorded as an absolute path
    (so eval, finetune and --resume find it from any folder)."""
    from ..data import absolute_data_spec

    cfg = config_from_file(args.config, args.preset) if args.config else get_preset(args.preset or DEFAULT_PRESET)
    for section, name, value in _given_settings(args):
        setattr(getattr(cfg, section), name, value)
    cfg.data.data = absolute_data_spec(cfg.data.data)
    cfg.data.test_data = absolute_data_spec(cfg.data.test_data)
    return cfg


def _print_presets() -> None:
    for name, (cfg, summary) in PRESETS.items():
        d, m, o = cfg.data, cfg.model, cfg.optim
        print(f"{name:18s} {summary}")
        print(f"{'':18s} data={d.data} size={d.image_size}px batch={d.batch_size} arch={m.arch} epochs={o.epochs} "
              f"base_lr={o.base_lr} tau_base={o.tau_base} wd={o.weight_decay}")


def preset_table() -> str:
    """The presets as the markdown table of docs/cli.md (`fastbyol presets --markdown`; tests/test_docs.py fails when
    the page's copy drifts from it)."""
    rows = ["| preset | data | arch | px | batch | epochs | base lr | tau | weight decay | what |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for name, (cfg, summary) in PRESETS.items():
        d, m, o = cfg.data, cfg.model, cfg.optim
        rows.append(f"| `{name}`{' (default)' if name == DEFAULT_PRESET else ''} | `{d.data}` | `{m.arch}` | "
                    f"{d.image_size} | {d.batch_size} | {o.epochs} | {o.base_lr:g} | {o.tau_base:g} | "
                    f"{o.weight_decay:g} | {summary} |")
    return "\n".join(rows)


def _run_plan(args: argparse.Namespace) -> int:
    from ..tools.plan import DEFAULT_MFU, launch_command, machine, plan_run, plan_table

    if args.table:
        print(plan_table())
        return 0
    cfg = config_from_args(args)
    given = _given_settings(args)
    p = plan_run(cfg, machine(args.gpus, args.gpu, args.tflops, args.memory_gb), args.images,
                 DEFAULT_MFU if args.mfu is None else args.mfu, args.img_per_s,
                 accumulate_given=any(name == "accumulate" for _, name, _ in given))
    for line in p.lines():
        print(line)
    settings = (["--preset", args.preset] if args.preset else []) + (["--config", args.config] if args.config else [])
    if not any(name == "data" for _, name, _ in given) and cfg.data.data not in ("embedded", "fashion-mnist"):
        settings += ["--data", "PATH"]  # the preset's data is a name: where it is, the user knows
    for _, name, value in given:
        settings += ([flag_name(name) if value else "--no-" + flag_name(name)[2:]] if isinstance(value, bool) else
                     [flag_name(name), str(value)])
    print(f"  command  {launch_command(p, settings)}")
    return 0


def _find_own_encoder_here(arch: str) -> None:
    """`--arch module:factory` named on the command line: its module is imported from sys.path, and the current
    folder is searched too, last (the `fastbyol` script's sys.path starts at its own folder; `python -m fastbyol`
    puts the current folder first), so a module beside the command needs no PYTHONPATH."""
    import os

    from ..models.names import is_custom_arch

    if is_custom_arch(arch) and os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.append(os.getcwd())


def _run_train(args: argparse.Namespace) -> int:
    import signal

    from ..system.signals import STOP_SIGNALS, install_stop_handlers, restore_signal_handlers, stop_signal

    install_stop_handlers()  # before torch loads: a stop signal from here on ends with a checkpoint, or nothing
    try:
        return _train_command(args)
    finally:
        stopped = stop_signal() is not None
        restore_signal_handlers()
        if stopped:  # on the way out with the stop's exit status: a late signal (a scheduler's second SIGTERM) must
            for sig in STOP_SIGNALS:  # not turn that into a death by signal
                signal.signal(sig, signal.SIG_IGN)


def _train_command(args: argparse.Namespace) -> int:
    from ..run.preemption import EXIT_PREEMPTED, AlreadyFinished, auto_resume_decision
    from ..errors import Preempted

    from ..system.environment import check_environment

    rank = check_environment()[0]  # RANK, WORLD_SIZE, ...: one line naming a bad variable, before anything else
    rank0 = rank == 0  # under torchrun: rank 0 speaks
    resume, cfg = args.resume, Config()
    own_names = _train_own_arch_names(args, resume is not None)
    if resume is not None:
        given = [g for g in _given_settings(args) if g[1] != "arch"] + [
            ("", name, None) for name in ("preset", "config") if getattr(args, name) is not None]
        if given or args.auto_resume:
            flags = ", ".join([flag_name(name) for _, name, _ in given] + ["--auto-resume"] * args.auto_resume)
            raise FastByolError(f"--resume continues a run with its own config.json; it takes no settings (got "
                                f"{flags}): start a new run to change them")
    else:
        cfg = config_from_args(args)
        cfg.validate()
        _find_own_encoder_here(cfg.model.arch)
        if args.auto_resume:
            try:
                resume = auto_resume_decision(cfg, rank,
                                              log=print if rank0 else lambda *a: None)
            except AlreadyFinished as e:
                if rank0:
                    print(f"fastbyol: {e}: nothing to do")
                return 0
        if resume is None and rank0:
            print("config: " + str(cfg.to_dict()))
    prescan = _start_prescan(cfg) if resume is None and rank0 else None  # before anything imports torch
    try:
        own = _own_encoders(own_names)
        from ..train import train  # torch, DALI, the kernels: seconds, while the prescan lists and checks

        train(cfg, progress=not args.no_progress, resume=resume, own=own)
    except Preempted as e:
        print(f"fastbyol: {e}", file=sys.stderr)
        return EXIT_PREEMPTED
    finally:
        if prescan is not None:
            from ..data.manifest import end_prescan

            end_prescan(prescan)
    return 0


def _start_prescan(cfg: Config):
    """When --data names an image folder, its manifest built (or checked) in a child while the trainer loads
    (fastbyol.data.manifest.start_prescan); None for any other data, or one not recognised at a glance."""
    from pathlib import Path

    from ..data import detect_format
    from ..data.manifest import start_prescan

    spec, data_format = cfg.data.data, cfg.data.data_format
    if spec in ("embedded", "fashion-mnist", "synthetic") or data_format not in ("auto", "folder"):
        return None
    path = Path(spec).expanduser()
    try:
        if not path.is_dir() or data_format == "auto" and detect_format(path) != "folder":
            return None
    except (OSError, FastByolError):
        return None
    return start_prescan(path)


def _run_bench(args: argparse.Namespace) -> int:
    import json

    if args.bench_target == "gpu-compile":
        from ..tools.gpu_compile import main as gpu_compile

        return gpu_compile(["--out", args.out, *(["--no-scratch"] if args.no_scratch else [])])
    from ..tools.bench_augment import AugmentBenchSettings, bench_augment

    if args.threads is not None and args.threads < 1:
        raise FastByolError(f"--threads must be >= 1, got {args.threads}")
    r = bench_augment(AugmentBenchSettings(args.size, args.batch, args.device, args.source, args.steps,
                                           num_threads=args.threads, blur_window=args.blur_window,
                                           cpu_parallel=args.cpu_parallel, decode=args.decode, preset=args.preset))
    if args.json:
        print(json.dumps(r))
    else:
        print(f"augment {r['source']} -> {r['size']} px, batch {r['batch']}, {r['device']} "
              f"({r['threads']} {'worker processes' if r['cpu_parallel'] == 'processes' else 'threads'}, blur "
              f"{r['blur_taps']} taps, {r['operators']} DALI operators): "
              f"{r['samples_per_s']:.0f} two-view samples/s")
    return 0


PATH_ARGS = {"train": (("--data", "data.data"), ("--out", "run.out"), ("--resume", "resume")),
             "eval": (("RUN_DIR", "run_dir"), ("--data", "data")),
             "finetune": (("RUN_DIR", "run_dir"), ("--data", "data"), ("--subset", "subset")),
             "export": (("RUN_DIR", "run_dir"), ("--out", "out")), "plot": (("RUN_DIR", "run_dir"), ("--out", "out")),
             "shards": (("SRC", "src"), ("DST", "dst"))}


def _check_paths(args: argparse.Namespace) -> None:
    """Every path the command line names, against the file system's limits (system.paths.check_path)."""
    from ..system.paths import check_path

    for flag, dest in PATH_ARGS.get(args.command, ()):
        value = getattr(args, dest, None)
        if value:
            check_path(flag, value)


def _dispatch(args: argparse.Namespace) -> int:
    _check_paths(args)
    if args.command == "presets":
        if args.markdown:
            print(preset_table())
        else:
            _print_presets()
        return 0
    if args.command == "plan":
        return _run_plan(args)
    if args.command == "eval":
        from ..evaluation.commands import EvalSettings, evaluate

        settings = EvalSettings(probe_epochs=args.probe_epochs, probe_lr=args.probe_lr, epochs=args.epochs,
                                batch_size=args.batch_size)
        evaluate(args.run_dir, args.data, args.init, args.protocol, settings, progress=not args.no_progress,
                 own=_own_encoders(args.arch))
        return 0
    if args.command == "finetune":
        from ..evaluation.commands import EvalSettings, finetune_run

        if (args.fraction is None) == (args.subset is None):
            raise FastByolError("give one of --fraction (0.01 = 1% of the labels) or --subset FILE")
        settings = EvalSettings(epochs=args.epochs, lr=args.lr, batch_size=args.batch_size)
        finetune_run(args.run_dir, args.fraction if args.subset is None else args.subset, args.init, args.data,
                     settings, progress=not args.no_progress, own=_own_encoders(args.arch))
        return 0
    if args.command == "export":
        from ..evaluation.export import export_encoder

        lines = []
        print(f"encoder: {export_encoder(args.run_dir, args.out, args.which, _own_encoders(args.arch), lines.append)}")
        print("\n".join(lines))
        return 0
    if args.command == "plot":
        from ..evaluation.export import plot_run

        print(f"curves: {plot_run(args.run_dir, args.out)}")
        return 0
    if args.command == "bench":
        return _run_bench(args)
    if args.command == "shards":
        from ..data.shards import run_shards

        return run_shards(args)
    if args.print_config:
        if args.resume is not None:
            raise FastByolError("--print-config prints the settings of a new run; a run's own are in "
                                f"{args.resume}/config.json")
        cfg = config_from_args(args)
        cfg.validate()
        print(config_yaml(cfg), end="")
        return 0
    return _run_train(args)


def main(argv: list[str] | None = None) -> int:
    """The command line: its result, or one line and exit status 2 for bad input or an OS limit met (a name too
    long, too many open files, the file-size, process, memory or address-space limit), 130 for Ctrl-C."""
    for stream in (sys.stdout, sys.stderr):  # a non-UTF-8 file name is printed back as the bytes it is
        if hasattr(stream, "reconfigure") and getattr(stream, "errors", "") == "strict":
            stream.reconfigure(errors="surrogateescape")
    parser = _build_parser()
    args = parser.parse_args(argv)
    try:
        return _dispatch(args)
    except FastByolError as e:
        if args.debug:
            raise
        print(f"fastbyol: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fastbyol: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 (a lost torchrun peer or an OS limit met: one line; else as it is)
        from ..system.paths import limit_error

        distributed = sys.modules.get("fastbyol.system.distributed")  # loaded when a process group was made
        mapped = None if args.debug else (distributed.explain(e) if distributed is not None else None) or \
            (limit_error(e) if isinstance(e, (OSError, RuntimeError, MemoryError)) else None)
        if mapped is None:
            raise
        print(f"fastbyol: error: {mapped}", file=sys.stderr)
        return 2
