"""fastbyol beside lightly's BYOL and byol-pytorch on fastbyol's default workload, measured in one run.

    .venv/bin/python benchmarks/parity.py --seeds 0 1 2                        # the three systems: table + JSON
    .venv/bin/python benchmarks/parity.py --systems fastbyol --variants baseline blur-cover --seeds 0 1 2
    .venv/bin/python benchmarks/parity.py --list-variants                      # the ablations it knows

The workload is `make train`'s (the fmnist-tiny preset): the embedded Fashion-MNIST split (8,000 images to pretrain
and as the kNN bank, every 5th of the 10,000 held out: 2,000 queries), fastbyol's resnet-tiny encoder with the small-s2
stem, heads 128 -> 1024 -> 256 and 256 -> 1024 -> 256, batch 128, 16 epochs, LARS lr 2.0 (base 4), warmup 1 epoch,
cosine, weight decay 1e-6, tau 0.99 -> 1, crop area 0.2-1; kNN top-1 with k 200, T 0.1.
- fastbyol: `fastbyol train --seed S --out DIR` (this checkout's .venv), figures from DIR/summary.json; a variant adds
  its flags, or runs the trainer through this file's driver (`--driver`), which swaps one piece of the trainer
  (see VARIANTS) before calling the same command line.
- lightly and byol-pytorch: benchmarks/peers/*.py under the peers' venv (--peer-python; never the project's), on
  the same data, encoder, widths, budget and kNN evaluator (benchmarks/peers/workload.py says what is copied from
  fastbyol and tests/test_bench_parity.py checks each copy).
Runs go one at a time, seed by seed, each system after the other (so a change in the machine's load lands on all of
them alike); img/s is each trainer's steady-state rate counted as fastbyol counts it (first step apart, kNN outside),
wall time the whole command (start-up, training, kNN evaluations; fastbyol also runs its kNN monitor every 4 epochs).
kNN figures do not depend on the load; img/s and wall time do: quote them from one run, with the machine's state.

Held-out splits: when the 60,000 Fashion-MNIST training images are at hand (--heldout DIR with train-images-idx3-
ubyte.gz and train-labels-idx1-ubyte.gz: Debian's dataset-fashion-mnist, or `apt-get download dataset-fashion-mnist
&& dpkg-deb -x dataset-fashion-mnist_*.deb X` then X/usr/share/datasets/fashion-mnist), every trained encoder is
also scored on 3 splits no system pretrained on: the images i with i % 3 == j, 20,000 each, every 5th a query (4,000)
against the other 16,000 as the bank; same kNN (k 200, T 0.1).

Each run's folder (--out-dir/<system>[-<variant>]-s<seed>/) keeps its result.json: a second call with the same
--out-dir reuses finished runs, so a long table can be built in several calls. The table goes to stdout, everything
(per run: kNN, held-out kNN, random-init kNN, img/s, seconds, load average before and after; versions) to
--out-dir/parity.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from fastbyol.system.machine import cpu_model

REPO = Path(__file__).resolve().parents[1]
PEER_PYTHON = os.environ.get("FASTBYOL_PEER_PYTHON", "")  # the peers' venv python, unless --peer-python
PEER_SCRIPTS = {"lightly": ("lightly_byol.py", []), "lightly-blur-off": ("lightly_byol.py", ["--blur-off"]),
                "byol-pytorch": ("byol_pytorch_readme.py", [])}
SYSTEMS = ("fastbyol", *PEER_SCRIPTS)
HELDOUT_DEFAULTS = (Path("/usr/share/datasets/fashion-mnist"), REPO / "runs" / "fashion-mnist")
HELDOUT_SPLITS = 3


@dataclass(frozen=True)
class Variant:
    """One fastbyol configuration of the ablation: command-line flags, and/or driver patches (PATCHES' names) for the
    pieces that have no flag (the trainer's step order)."""

    about: str
    flags: tuple[str, ...] = ()
    patches: tuple[str, ...] = ()


VARIANTS: dict[str, Variant] = {
    "baseline": Variant("fastbyol as configured by default at this commit"),
    "blur-cover": Variant("blur window max(official, 2 ceil(3 sigma_max) + 1): 13 taps at 28 px (official: 3), "
                          "still 23 at 224 px (the trainer's default since this ablation)",
                          flags=("--blur-window", "cover")),
    "blur-official": Variant("the official blur window, 10% of the side: 3 taps at 28 px",
                             flags=("--blur-window", "official")),
    "brightness-mul": Variant("multiplicative brightness x (1 + delta) (torchvision's, lightly's) instead of the "
                              "official additive x + delta", patches=("brightness-mul",)),
    "crop-bilinear": Variant("crops resized bilinear with antialiasing (PIL's, lightly's) instead of bicubic",
                             patches=("crop-bilinear",)),
    "head-no-bias": Variant("no bias in the heads' first Linear (lightly's heads; BN follows it)",
                            patches=("head-no-bias",)),
    "lars-lightly": Variant("LARS trust ratio eta |w| / (|g| + wd |w| + eps) (lightly's) instead of eta |w| / "
                            "|g + wd w|", patches=("lars-lightly",)),
    "target-before": Variant("the target's EMA update before the forward (lightly's example order) instead of after "
                             "the optimizer step", patches=("target-before",)),
}


# ------------------------------------------------------------------------------------------ the driver's patches
# the names of fastbyol.train the patches below replace (tests/test_bench_parity.py saves and restores them)
TRAINER_NAMES = ("byol_step", "BYOL", "build_optimizer")


def _patch_target_before() -> None:
    """byol_step with the EMA of the target moved before the forward, at the step's own tau (lightly's example:
    update_momentum(...) then the forwards, backward, step). The rest of the step is the trainer's own, called with
    tau 1, at which its EMA after the optimizer step leaves the target as it is."""
    from fastbyol import train as T

    step = T.byol_step

    def byol_step_target_first(net, optimizer, ema_pairs, views, lr, tau, n=1, bf16=False):
        T.ema_update_(*ema_pairs, tau)  # lightly: the target moves first
        return step(net, optimizer, ema_pairs, views, lr, 1.0, n, bf16)

    T.byol_step = byol_step_target_first  # TrainStep.__call__ looks byol_step up in fastbyol.train at each call


def _patch_head_no_bias() -> None:
    """The trainer's BYOL made with head_first_bias=False (its build_model reads BYOL from fastbyol.train)."""
    from fastbyol import train as T

    class BYOLNoHeadBias(T.BYOL):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **{**kwargs, "head_first_bias": False})

    T.BYOL = BYOLNoHeadBias


def _patch_lars_lightly() -> None:
    """The trainer's optimizer, its LARS with trust_ratio="lightly"."""
    from fastbyol import train as T
    from fastbyol.optim import LARS

    build = T.build_optimizer

    def build_optimizer(optim_cfg, model):
        optimizer = build(optim_cfg, model)
        if isinstance(optimizer, LARS):
            optimizer.trust_ratio = "lightly"  # read at every step
        return optimizer

    T.build_optimizer = build_optimizer  # _start looks it up at each call


def _patch_brightness_mul() -> None:
    """The CPU chain's brightness op as clip(x (1 + delta)): the factor ~ U[1 - b, 1 + b], torchvision's."""
    from fastbyol.augment import photometric as P

    def adjust_brightness_mul(x, delta):
        return (x * (1.0 + delta.reshape(-1, 1, 1, 1))).clamp_(0.0, 1.0)

    P.JITTER_FNS = (adjust_brightness_mul, *P.JITTER_FNS[1:])  # the chain looks the op up there at each call


def _patch_crop_bilinear() -> None:
    """The CPU loader's crops resized bilinear with antialiasing (torch's, as PIL's resize) instead of bicubic: in the
    driver's process every bicubic F.interpolate (crop_resize_flip's, the only one in training) becomes that."""
    import torch.nn.functional as F

    real = F.interpolate

    def interpolate(x, size=None, scale_factor=None, mode="nearest", align_corners=None, recompute_scale_factor=None,
                    antialias=False):
        if mode == "bicubic":
            mode, antialias = "bilinear", True
        return real(x, size, scale_factor, mode, align_corners, recompute_scale_factor, antialias)

    F.interpolate = interpolate  # crop_resize_flip reads F.interpolate when it runs


PATCHES = {"target-before": _patch_target_before, "head-no-bias": _patch_head_no_bias,
           "lars-lightly": _patch_lars_lightly,
           "brightness-mul": _patch_brightness_mul, "crop-bilinear": _patch_crop_bilinear}


def driver(argv: list[str]) -> int:
    """`parity.py --driver PATCH... -- ARGS`: apply the patches, then run `fastbyol ARGS` in this process."""
    split = argv.index("--")
    for name in argv[:split]:
        if name not in PATCHES:
            raise SystemExit(f"parity.py --driver: unknown patch {name!r}; known: {', '.join(PATCHES)}")
        PATCHES[name]()
    from fastbyol.cli import main

    return main(argv[split + 1:])


# ----------------------------------------------------------------------------------------------------- the runs
def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


SOURCES = ("fastbyol/augment/views.py", "fastbyol/augment/pipelines.py", "fastbyol/augment/crops.py",
           "fastbyol/augment/makers.py", "fastbyol/augment/loader.py", "fastbyol/augment/photometric.py",
           "kernels/photometric.py", "fastbyol/train.py", "fastbyol/models/resnet.py", "fastbyol/optim.py", "fastbyol/config.py")


def provenance() -> dict:
    """The commit, and a digest of each source a fastbyol figure depends on (the working tree may differ from it)."""
    import hashlib

    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    return {"commit": head, "sources_sha256": {f: hashlib.sha256((REPO / f).read_bytes()).hexdigest()[:16]
                                               for f in SOURCES if (REPO / f).exists()}}


def _fastbyol_command(variant: Variant, seed: int, run_dir: Path) -> list[str]:
    exe = REPO / ".venv" / "bin" / "fastbyol"
    args = ["train", "--seed", str(seed), "--out", str(run_dir / "train"), "--no-progress", *variant.flags]
    if variant.patches:
        return [sys.executable, str(Path(__file__).resolve()), "--driver", *variant.patches, "--", *args]
    return [str(exe), *args] if exe.exists() else [sys.executable, "-m", "fastbyol", *args]


def _run(cmd: list[str], log: Path) -> float:
    """Run `cmd` with its output to `log`; the wall seconds, or SystemExit naming the log when it fails."""
    start = time.perf_counter()
    with open(log, "w") as f:
        rc = subprocess.call(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT)
    if rc != 0:
        tail = log.read_text().strip().splitlines()[-3:]
        raise SystemExit(f"parity: {' '.join(cmd[:4])} ... failed (exit {rc}); see {log}:\n" + "\n".join(tail))
    return time.perf_counter() - start


def run_one(system: str, variant_name: str, seed: int, run_dir: Path, peer_python: str) -> dict:
    """Train one system once (or reuse its result.json); returns its record (without held-out figures)."""
    done = run_dir / "result.json"
    if done.exists():
        return json.loads(done.read_text())
    if run_dir.exists():
        shutil.rmtree(run_dir)  # an unfinished attempt
    run_dir.mkdir(parents=True)
    load_before, source = _load(), provenance()
    if system == "fastbyol":
        variant = VARIANTS[variant_name]
        wall = _run(_fastbyol_command(variant, seed, run_dir), run_dir / "log.txt")
        s = json.loads((run_dir / "train" / "summary.json").read_text())
        record = {k: s[k] for k in ("knn_top1", "knn_top1_random_init", "img_per_s", "train_seconds",
                                    "warmup_seconds", "final_loss", "steps", "versions")}
        record.update(encoder=str(run_dir / "train" / "checkpoint.pt"), flags=list(variant.flags),
                      patches=list(variant.patches))
    else:
        script, extra = PEER_SCRIPTS[system]
        encoder = run_dir / "encoder.pt"
        cmd = [peer_python, str(REPO / "benchmarks" / "peers" / script), "--seed", str(seed), "--out",
               str(run_dir / "peer.json"), "--save-encoder", str(encoder), *extra]
        wall = _run(cmd, run_dir / "log.txt")
        record = json.loads((run_dir / "peer.json").read_text())
        record["encoder"] = str(encoder)
    record.update(system=system, variant=variant_name if system == "fastbyol" else "", seed=seed,
                  wall_seconds=wall, load_before=load_before, load_after=_load(), **source)
    done.write_text(json.dumps(record, indent=1) + "\n")
    return record


# ------------------------------------------------------------------------------------------ held-out splits
def load_heldout(folder: Path):
    """The 60,000 Fashion-MNIST training images as (N, 28, 28, 3) uint8 and their labels."""
    import numpy as np

    from fastbyol.data.idx import read_idx

    images = read_idx(folder / "train-images-idx3-ubyte.gz")
    labels = read_idx(folder / "train-labels-idx1-ubyte.gz").astype(np.int64)
    return np.ascontiguousarray(np.repeat(images[..., None], 3, axis=3)), labels


def heldout_splits(n: int, splits: int = HELDOUT_SPLITS):
    """[(bank indices, query indices)]: split j holds the images i % splits == j; every 5th of it is a query."""
    import numpy as np

    out = []
    for j in range(splits):
        idx = np.arange(j, n, splits)
        query = np.arange(len(idx)) % 5 == 0
        out.append((idx[~query], idx[query]))
    return out


def heldout_knn(record: dict, images, labels, k: int = 200, temperature: float = 0.1) -> list[float]:
    """kNN top-1 (%) of a run's trained encoder on each held-out split."""
    import torch

    from fastbyol.evaluation.runs import encoder_state
    from fastbyol.evaluation.features import KnnSettings, extract_features, knn_accuracy
    from fastbyol.models import build_encoder

    state = torch.load(record["encoder"], map_location="cpu", weights_only=True)
    if record["system"] == "fastbyol":
        state = encoder_state(state)
    encoder = build_encoder("resnet-tiny", "small-s2", 28)
    encoder.load_state_dict(state)
    feats = extract_features(encoder, images)
    knn = KnnSettings(k=k, temperature=temperature)
    return [knn_accuracy(feats[bank], labels[bank], feats[query], labels[query], 10, knn)
            for bank, query in heldout_splits(len(images))]


# ------------------------------------------------------------------------------------------------------ the table
def _median(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def summarise(records: list[dict], seeds: list[int]) -> list[dict]:
    """One row per (system, variant): kNN per seed and its mean, held-out mean, random init, img/s, wall time."""
    rows: dict[tuple, dict] = {}
    for r in records:
        key = (r["system"], r["variant"])
        row = rows.setdefault(key, {"system": r["system"], "variant": r["variant"], "knn": {}, "random": {},
                                    "heldout": {}, "img_per_s": [], "wall_seconds": []})
        row["knn"][r["seed"]] = r["knn_top1"]
        row["random"][r["seed"]] = r["knn_top1_random_init"]
        if r.get("heldout_knn"):
            row["heldout"][r["seed"]] = statistics.mean(r["heldout_knn"])
        row["img_per_s"].append(r["img_per_s"])
        row["wall_seconds"].append(r["wall_seconds"])
    out = []
    for row in rows.values():
        knn = [row["knn"][s] for s in seeds if s in row["knn"]]
        held = [row["heldout"][s] for s in seeds if s in row["heldout"]]
        out.append({**row, "knn_mean": statistics.mean(knn) if knn else None,
                    "heldout_mean": statistics.mean(held) if held else None,
                    "img_per_s_median": _median(row["img_per_s"]), "wall_seconds_median": _median(row["wall_seconds"])})
    return out


def speed_ratio(records: list[dict], numerator: str = "fastbyol", denominator: str = "lightly") -> float | None:
    """Median over seeds of fastbyol's img/s over lightly's, each pair measured back to back in this run (the
    baseline variant, or the only fastbyol variant present)."""
    ratios = []
    for seed in sorted({r["seed"] for r in records}):
        num = [r for r in records if r["seed"] == seed and r["system"] == numerator
               and r["variant"] in ("baseline", "")]
        den = [r for r in records if r["seed"] == seed and r["system"] == denominator]
        if num and den:
            ratios.append(num[0]["img_per_s"] / den[0]["img_per_s"])
    return statistics.median(ratios) if ratios else None


def markdown(rows: list[dict], seeds: list[int]) -> str:
    def f(v, fmt="{:.2f}"):
        return "" if v is None else fmt.format(v)

    head = (["system"] + [f"seed {s}" for s in seeds]
            + ["mean", f"held-out ({HELDOUT_SPLITS} splits) mean", "random init", "img/s (median)", "wall s (median)"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        name = r["system"] + (f" ({r['variant']})" if r["variant"] not in ("", "baseline") else "")
        lines.append("| " + " | ".join(
            [name] + [f(r["knn"].get(s)) for s in seeds] + [f(r["knn_mean"]), f(r["heldout_mean"]),
                                                             " / ".join(f(r["random"].get(s)) for s in seeds),
                                                             f(r["img_per_s_median"], "{:.0f}"),
                                                             f(r["wall_seconds_median"], "{:.0f}")]) + " |")
    return "\n".join(lines)


def machine() -> dict:
    return {"cpus": os.cpu_count(), "cpu": cpu_model(), "platform": platform.platform(),
            "date_utc": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M")}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--driver":
        return driver(argv[1:])
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--systems", nargs="+", default=["fastbyol", "lightly", "byol-pytorch"], choices=SYSTEMS)
    ap.add_argument("--variants", nargs="+", default=["baseline"], help="fastbyol variants (--list-variants)")
    ap.add_argument("--out-dir", default="", help="runs and parity.json (default runs/parity-<UTC time>); finished "
                    "runs found there are reused")
    ap.add_argument("--peer-python", default=PEER_PYTHON, help="python of the peers' venv")
    ap.add_argument("--heldout", default="", help="folder with Fashion-MNIST's train-*-ubyte.gz for the held-out "
                    "splits (default: the first of " + ", ".join(map(str, HELDOUT_DEFAULTS)) + " that has them); "
                    "'none' skips them")
    ap.add_argument("--list-variants", action="store_true")
    args = ap.parse_args(argv)
    if args.list_variants:
        for name, v in VARIANTS.items():
            how = " ".join(v.flags) or ("driver: " + ", ".join(v.patches) if v.patches else "defaults")
            print(f"{name:24s} {v.about} [{how}]")
        return 0
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        ap.error(f"unknown variant {unknown[0]!r}; --list-variants shows them")
    if any(s != "fastbyol" for s in args.systems) and not args.peer_python:
        ap.error("--peer-python: give the python of the peers' venv (or set FASTBYOL_PEER_PYTHON; see "
                 "benchmarks/peers/)")
    if any(s != "fastbyol" for s in args.systems) and not Path(args.peer_python).exists():
        ap.error(f"--peer-python {args.peer_python} does not exist (the peers' venv: see benchmarks/peers/)")
    out_dir = Path(args.out_dir or REPO / "runs" / f"parity-{datetime.now(timezone.utc).strftime('%Y%m%d-%H%M%S')}")
    heldout = None
    if args.heldout != "none":
        candidates = [Path(args.heldout)] if args.heldout else list(HELDOUT_DEFAULTS)
        heldout = next((c for c in candidates if (c / "train-images-idx3-ubyte.gz").is_file()), None)
        if args.heldout and heldout is None:
            ap.error(f"--heldout {args.heldout}: no train-images-idx3-ubyte.gz there")

    jobs = [(seed, system, variant) for seed in args.seeds for system in args.systems
            for variant in (args.variants if system == "fastbyol" else [""])]
    records, held_data = [], None
    for i, (seed, system, variant) in enumerate(jobs, 1):
        name = system + (f"-{variant}" if variant else "") + f"-s{seed}"
        print(f"[{i}/{len(jobs)}] {name} ...", file=sys.stderr, flush=True)
        record = run_one(system, variant, seed, out_dir / name, args.peer_python)
        if heldout is not None and "heldout_knn" not in record:
            if held_data is None:
                held_data = load_heldout(heldout)
            record["heldout_knn"] = heldout_knn(record, *held_data)
            (out_dir / name / "result.json").write_text(json.dumps(record, indent=1) + "\n")
        print(f"    kNN {record['knn_top1']:.2f} (random init {record['knn_top1_random_init']:.2f}), "
              f"{record['img_per_s']:.0f} img/s, {record['wall_seconds']:.0f} s wall", file=sys.stderr, flush=True)
        records.append(record)

    rows = summarise(records, args.seeds)
    table = markdown(rows, args.seeds)
    ratio = speed_ratio(records)
    report = {"machine": machine(), "seeds": args.seeds, "heldout": str(heldout) if heldout else None,
              "variants": {v: dataclasses.asdict(VARIANTS[v]) for v in args.variants}, "rows": rows,
              "fastbyol_over_lightly_img_per_s": ratio, "runs": records, "table": table}
    (out_dir / "parity.json").write_text(json.dumps(report, indent=1) + "\n")
    print(table)
    if ratio is not None:
        print(f"\nfastbyol / lightly img/s: {ratio:.2f}x (median over seeds of back-to-back pairs)")
    print(f"\n{out_dir / 'parity.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
