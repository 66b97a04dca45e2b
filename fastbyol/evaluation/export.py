"""After pretraining: export a run's encoder and plot its curves (the evaluations are fastbyol.evaluation's other
modules).

    fastbyol export RUN_DIR --out FILE.pt|FILE.safetensors           # torchvision-compatible encoder state_dict
    fastbyol plot RUN_DIR                                            # RUN_DIR/curves.png (needs matplotlib)
"""

from __future__ import annotations

import json
import math
import os
from contextlib import nullcontext
from pathlib import Path

import torch

from ..run.checkpoint import load_run
from ..run.disk import atomic_write_bytes
from ..run.outputs import check_output, claim_output
from ..config import Config
from ..errors import FastByolError
from .encoders import export_metadata, loading_hint
from .runs import build_run_encoder, encoder_state
from ..run import names


def _refuse_run_files(out: Path, run_dir: Path, cfg: Config | None = None) -> None:
    """--out of export and plot never replaces a file the run needs (its checkpoint, config, metrics, summary, ...),
    never writes into another run's folder (fastbyol.run.outputs.claim_output, which also locks the run's folder
    while the file is written into it) nor into the run's --data folder: one line instead."""
    target = out.resolve()
    check_output(out, run_dir)  # refused now, before any work
    if cfg is not None:
        data = cfg.data.data
    else:  # the run's config.json, when it is readable (plot needs no checkpoint)
        try:
            data = json.loads((run_dir / names.CONFIG).read_text())["data"]["data"]
        except (OSError, ValueError, KeyError, TypeError, RecursionError):
            data = None
    data = data if isinstance(data, str) else None
    if data and Path(data).is_dir() and target.is_relative_to(Path(data).resolve()):
        raise FastByolError(f"--out {out} is inside the run's dataset {data}: write it elsewhere")


def export_encoder(run_dir: str | Path, out: str | Path, which: str = "online", own=None, log=None) -> Path:
    """Write the encoder as a torchvision-compatible state_dict: .pt (torch.save) or .safetensors (which also records
    the architecture for fastbyol.load_encoder); `log` gets the lines that say how to load it. own:
    models.OwnEncoders, the encoders of the user's own this command may import (`--arch`, `encoder=`) to check the
    checkpoint against; a run naming any other module:factory is refused."""
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
    cfg, _, ckpt = load_run(run_dir, own)
    _refuse_run_files(out, Path(run_dir), cfg)
    state = {k: v.detach().cpu().contiguous() for k, v in encoder_state(ckpt, which).items()}
    if own is not None and own.encoder is not None:  # the encoder given in Python: the tensors must fit it
        build_run_encoder(cfg, state, own, where=str(Path(run_dir) / "config.json"))
    if out.suffix == ".safetensors":
        try:
            from safetensors.torch import save as to_bytes
        except ImportError:
            raise FastByolError("--out *.safetensors needs the safetensors package: pip install safetensors") from None
        meta = export_metadata(cfg.model.arch, cfg.model.stem, cfg.data.image_size)  # fastbyol.load_encoder reads it
        write = lambda f: f.write(to_bytes(state, metadata=meta))  # noqa: E731
    else:  # .pt, .pth
        write = lambda f: torch.save(state, f)  # noqa: E731
    with claim_output(out, Path(run_dir)) or nullcontext():  # its run folder's lock, when it is written into one
        atomic_write_bytes(out, write)  # atomic, its write errors one line
    if log is not None:
        for line in loading_hint(out, cfg.model.arch, cfg.model.stem, cfg.data.image_size):
            log(f"  load it: {line}")
    return out


def _plotted(value):
    """A record's value as the plot reads it: a number as a float (an integer too large for one is inf), anything
    else as it is (the step stays an int)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return value
    try:
        return float(value)
    except OverflowError:
        return math.inf


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """PNG curves of loss, lr, tau, kNN top-1 and img/s over steps, from RUN_DIR/metrics.jsonl."""
    try:
        import matplotlib

        matplotlib.rcdefaults()  # a matplotlibrc in the current folder (a run folder) was read at import: its
        matplotlib.use("Agg")  # settings are dropped, and the backend is ours
        import matplotlib.pyplot as plt
    except ImportError:
        raise FastByolError("fastbyol plot needs matplotlib: pip install 'fastbyol[plot]'") from None
    run_dir = Path(run_dir)
    metrics = run_dir / names.METRICS
    if not metrics.is_file():
        raise FastByolError(f"{run_dir}: no metrics.jsonl")
    out = Path(out) if out else run_dir / names.CURVES
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
        except (json.JSONDecodeError, RecursionError):
            raise FastByolError(f"{metrics}, line {n}: not a JSON record") from None
        step = row.get("step") if isinstance(row, dict) else None
        if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step < 1 << 62:
            raise FastByolError(f"{metrics}, line {n}: a record needs an integer 'step' (0 <= step < 2^62)")
        rows.append({**{k: _plotted(v) for k, v in row.items()}, "step": step})
    panels = [("loss", "BYOL loss"), ("lr", "learning rate"), ("tau", "EMA tau"), ("img_per_s", "images / s")]
    steps = [r for r in rows if all(isinstance(r.get(key), float) for key, _ in panels)]
    knn = [r for r in rows if isinstance(r.get("knn_top1"), float) and math.isfinite(r["knn_top1"])
           and r.get("init") != "random"]
    probe = [r for r in rows if isinstance(r.get("online_probe_top1"), float)
             and math.isfinite(r["online_probe_top1"])]
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
        ax.plot([r["step"] for r in knn], [r["knn_top1"] for r in knn], "o-", lw=1.2, label="kNN")
    if probe:  # the online linear probe, at the same checks
        ax.plot([r["step"] for r in probe], [r["online_probe_top1"] for r in probe], "s--", lw=1.2,
                label="online probe")
        ax.legend(loc="lower right", fontsize=8)
    ax.set_title("kNN / online probe top-1 (%)" if probe else "kNN top-1 (%)")
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    fig.suptitle(f"fastbyol run {run_dir.name}")
    try:  # atomic: a full disk or a read-only folder is one line, and the previous PNG stays
        with claim_output(out, run_dir) or nullcontext():  # the run folder's lock, when the PNG goes into one
            atomic_write_bytes(out, lambda f: fig.savefig(f, format=out.suffix.lstrip(".").lower(), dpi=110))
    finally:
        plt.close(fig)
    return out
