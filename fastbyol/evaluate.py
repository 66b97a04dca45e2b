"""After pretraining: evaluate a run (kNN and a linear probe on frozen features), export its encoder, plot its curves.

    fastbyol eval RUN_DIR [--data PATH] [--init trained|random]     # table + RUN_DIR/eval.json (or eval-random.json)
    fastbyol export RUN_DIR --out FILE.pt|FILE.safetensors           # torchvision-compatible encoder state_dict
    fastbyol plot RUN_DIR                                            # RUN_DIR/curves.png (needs matplotlib)

The linear probe follows the official linear evaluation where it can on frozen, precomputed features: SGD with
Nesterov momentum 0.9, a cosine schedule, no weight decay; features are standardised with the train split's mean
and std (no augmentation: features are extracted once).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch

from .checkpoint import atomic_write_bytes, atomic_write_json, load_run
from .config import Config
from .errors import FastByolError
from .knn import extract_features, knn_accuracy
from .state import nonfinite_tensors


def encoder_state(ckpt: dict, which: str = "online") -> dict:
    """The encoder's state_dict with torchvision's names (no prefix), from a checkpoint's BYOL state; refused when
    any of its tensors holds a NaN or an Inf."""
    prefix = f"{which}_encoder."
    state = {k[len(prefix):]: v for k, v in ckpt["model"].items() if k.startswith(prefix)}
    if not state:
        raise FastByolError(f"the checkpoint holds no {which} encoder")
    bad = nonfinite_tensors(state)
    if bad:
        raise FastByolError(f"the checkpoint's {which} encoder holds non-finite weights ({bad[0]}"
                            f"{f' and {len(bad) - 1} more' if len(bad) > 1 else ''}): refusing to use it")
    return state


def _build_encoder(cfg: Config, state: dict | None):
    from .models import build_encoder

    encoder = build_encoder(cfg.model.arch, cfg.model.stem, cfg.data.image_size)
    if state is not None:
        encoder.load_state_dict(state)
    return encoder


@torch.enable_grad()
def linear_probe(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                 num_classes: int, epochs: int = 100, lr: float = 0.2, batch_size: int = 256, seed: int = 0,
                 progress: bool = False) -> float:
    """Top-1 (%) of a linear classifier on frozen features: SGD, Nesterov momentum 0.9, cosine lr, no weight decay."""
    from tqdm import tqdm

    mean, std = train_x.mean(0, keepdim=True), train_x.std(0, keepdim=True).clamp_min(1e-6)
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    gen = torch.Generator().manual_seed(seed)
    head = torch.nn.Linear(train_x.shape[1], num_classes).to(train_x.device)
    opt = torch.optim.SGD(head.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=0.0)
    steps_per_epoch = math.ceil(len(train_x) / batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * steps_per_epoch)
    for _ in tqdm(range(epochs), desc="linear probe", unit="epoch", disable=not progress):
        order = torch.randperm(len(train_x), generator=gen).to(train_x.device)
        for i in range(steps_per_epoch):
            idx = order[i * batch_size:(i + 1) * batch_size]
            loss = torch.nn.functional.cross_entropy(head(train_x[idx]), train_y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    with torch.no_grad():
        return 100.0 * (head(test_x).argmax(1) == test_y).float().mean().item()


def evaluate(run_dir: str | Path, data: str | None = None, init: str = "trained", probe_epochs: int = 100,
             probe_lr: float = 0.2, progress: bool = True, log=print) -> dict:
    """kNN and linear-probe top-1 of a run's online encoder (or a random-init one) on the labeled splits."""
    from .data import resolve_dataset

    if init not in ("trained", "random"):
        raise FastByolError(f"--init must be trained or random, got {init!r}")
    if probe_epochs <= 0:
        raise FastByolError(f"--probe-epochs must be > 0, got {probe_epochs}")
    if not (math.isfinite(probe_lr) and probe_lr > 0):
        raise FastByolError(f"--probe-lr must be a finite number > 0, got {probe_lr}")
    cfg, state, ckpt = load_run(run_dir)
    dataset = resolve_dataset(data or cfg.data.data, "auto" if data else cfg.data.data_format, cfg.data.image_size,
                              seed=cfg.run.seed)
    if dataset.train_labels is None or dataset.test_images is None or dataset.test_labels is None:
        raise FastByolError(f"{dataset.name}: evaluation needs labeled train and test splits")
    torch.manual_seed(cfg.run.seed)
    encoder = _build_encoder(cfg, encoder_state(ckpt) if init == "trained" else None)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    encoder = encoder.to(device=device, memory_format=torch.channels_last)
    train_f = extract_features(encoder, dataset.train_images, device=device, progress=progress)
    test_f = extract_features(encoder, dataset.test_images, device=device, progress=progress)
    train_y = torch.as_tensor(dataset.train_labels, device=device)
    test_y = torch.as_tensor(dataset.test_labels, device=device)
    knn_top1 = knn_accuracy(train_f, train_y, test_f, test_y, dataset.num_classes, cfg.run.knn_k,
                            cfg.run.knn_temperature)
    probe = linear_probe(train_f, train_y, test_f, test_y, dataset.num_classes, probe_epochs, probe_lr,
                         seed=cfg.run.seed, progress=progress)
    result = dict(run_dir=str(run_dir), init=init, dataset=dataset.describe(), arch=cfg.model.arch,
                  knn_top1=knn_top1, knn_k=cfg.run.knn_k, linear_top1=probe, probe_epochs=probe_epochs,
                  probe_lr=probe_lr, step=state.step)
    out = Path(run_dir) / ("eval.json" if init == "trained" else "eval-random.json")
    atomic_write_json(out, result)
    log(f"{'encoder':<12}{'kNN top-1':>12}{'linear top-1':>15}")
    log(f"{init:<12}{knn_top1:>11.2f}%{probe:>14.2f}%")
    log(f"eval: {out}")
    return result


def _refuse_run_files(out: Path, run_dir: Path, cfg: Config | None = None) -> None:
    """--out of export and plot never replaces a file the run needs (its checkpoint, config, metrics, summary, ...)
    nor writes into the run's --data folder: one line instead."""
    target = out.resolve()
    run_files = {"checkpoint.pt", "config.json", "metrics.jsonl", "summary.json", "bad_files.json", ".lock"}
    if target.parent == run_dir.resolve() and (target.name in run_files or target.name.startswith(".")):
        raise FastByolError(f"--out {out} is a file of the run {run_dir}: give another name")
    if cfg is not None:
        data = cfg.data.data
    else:  # the run's config.json, when it is readable (plot needs no checkpoint)
        try:
            data = json.loads((run_dir / "config.json").read_text())["data"]["data"]
        except (OSError, ValueError, KeyError, TypeError):
            data = None
    data = data if isinstance(data, str) else None
    if data and Path(data).is_dir() and target.is_relative_to(Path(data).resolve()):
        raise FastByolError(f"--out {out} is inside the run's dataset {data}: write it elsewhere")


def export_encoder(run_dir: str | Path, out: str | Path, which: str = "online") -> Path:
    """Write the encoder as a torchvision-compatible state_dict: .pt (torch.save) or .safetensors."""
    out = Path(out)
    _refuse_run_files(out, Path(run_dir))
    if out.is_dir():
        raise FastByolError(f"--out {out} is a folder: give a file name")
    if out.suffix not in (".pt", ".pth", ".safetensors"):
        raise FastByolError(f"--out {out}: use a .pt, .pth or .safetensors file name")
    if not out.parent.is_dir():
        raise FastByolError(f"--out {out}: the folder {out.parent} does not exist")
    if not os.access(out.parent, os.W_OK):
        raise FastByolError(f"--out {out}: the folder {out.parent} is not writable")
    cfg, _, ckpt = load_run(run_dir)
    _refuse_run_files(out, Path(run_dir), cfg)
    state = {k: v.detach().cpu().contiguous() for k, v in encoder_state(ckpt, which).items()}
    if out.suffix == ".safetensors":
        try:
            from safetensors.torch import save as to_bytes
        except ImportError:
            raise FastByolError("--out *.safetensors needs the safetensors package: pip install safetensors") from None
        atomic_write_bytes(out, lambda f: f.write(to_bytes(state)))  # atomic, its write errors one line
    else:  # .pt, .pth
        atomic_write_bytes(out, lambda f: torch.save(state, f))
    return out


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """PNG curves of loss, lr, tau, kNN top-1 and img/s over steps, from RUN_DIR/metrics.jsonl."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise FastByolError("fastbyol plot needs matplotlib: pip install 'fastbyol[plot]'") from None
    run_dir = Path(run_dir)
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        raise FastByolError(f"{run_dir}: no metrics.jsonl")
    out = Path(out) if out else run_dir / "curves.png"
    formats = plt.figure().canvas.get_supported_filetypes()
    plt.close("all")
    if out.suffix.lstrip(".").lower() not in formats:
        raise FastByolError(f"--out {out}: the file name must end in one of "
                            f"{', '.join('.' + f for f in sorted(formats))}")
    if not out.parent.is_dir():
        raise FastByolError(f"--out {out}: the folder {out.parent} does not exist")
    _refuse_run_files(out, run_dir)
    rows = []
    for n, line in enumerate(metrics.read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise FastByolError(f"{metrics}, line {n}: not a JSON record") from None
        if not isinstance(row, dict) or not isinstance(row.get("step"), int):
            raise FastByolError(f"{metrics}, line {n}: a record needs an integer 'step'")
        rows.append(row)
    panels = [("loss", "BYOL loss"), ("lr", "learning rate"), ("tau", "EMA tau"), ("img_per_s", "images / s")]
    steps = [r for r in rows if all(isinstance(r.get(key), (int, float)) for key, _ in panels)]
    knn = [r for r in rows if isinstance(r.get("knn_top1"), (int, float)) and math.isfinite(r["knn_top1"])
           and r.get("init") != "random"]
    if not steps:
        raise FastByolError(f"{metrics}: no logged steps")
    fig, axes = plt.subplots(1, 5, figsize=(20, 3.6), constrained_layout=True)
    for ax, (key, title) in zip(axes, panels):
        finite = [r for r in steps if math.isfinite(r[key])]  # a NaN or Inf logged (a diverged run) is left out
        ax.plot([r["step"] for r in finite], [r[key] for r in finite], lw=1.2)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    ax = axes[4]
    if knn:
        ax.plot([r["step"] for r in knn], [r["knn_top1"] for r in knn], "o-", lw=1.2)
    ax.set_title("kNN top-1 (%)")
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    fig.suptitle(f"fastbyol run {run_dir.name}")
    try:  # atomic: a full disk or a read-only folder is one line, and the previous PNG stays
        atomic_write_bytes(out, lambda f: fig.savefig(f, format=out.suffix.lstrip(".").lower(), dpi=110))
    finally:
        plt.close(fig)
    return out
