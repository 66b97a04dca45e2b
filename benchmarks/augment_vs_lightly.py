"""fastbyol's two-view augmentation against lightly's BYOLTransform: same images, sizes, batch and cores, same run.

    .venv/bin/python benchmarks/augment_vs_lightly.py --sizes 96 224 --batch 64 --repeats 3
    .venv/bin/python benchmarks/augment_vs_lightly.py --json          # one JSON object at the end

Each repeat runs, per size, fastbyol (`TwoViewLoader` on the images: DALI crops + the torch photometric chain, 2
DALI threads, 2 pixel worker processes) and lightly (`BYOLTransform(BYOLView1Transform,
BYOLView2Transform)` on PIL images through a torch DataLoader with 2 workers, persistent) one after the other, each in
a fresh process; the images are one uint8 array (random 8x8 colour blocks upsampled to 8/7 of the view side, as
`bench augment --source arrays`) saved once and read by both. lightly runs in its own venv (--peer-python; it never
enters the project's environment). Both are timed the same way: per-batch arrival times after 3 warm-up batches;
samples/s = batches x batch / their total time (the figure the ratio uses), and batch / the median interval beside it.
The printed ratio is the median over repeats of fastbyol / lightly within one repeat (the two ran back to back).
Beside it, the CPU time each spent per sample over the same batches (every thread, and lightly's worker
processes): on a shared machine the wall-clock ratio moves with the neighbours' load, the CPU-time ratio much less.

Measured on this project's 2-core CPU machine, 2026-11-28, batch 64, colour arrays, medians of 3 back-to-back pairs
(`--sizes 96 224 --repeats 3`):
    worker processes (commit b2242bd, the default): 96 px 1305 vs 678 samples/s (2.15x; CPU time per sample 2.00x),
        224 px 373 vs 177 (2.11x; 1.96x)  (benchmarks/results/2026-11-28-augment-cpu/)
    worker threads (commit 739c0e4, load average ~1): 96 px 1192 vs 795 (1.48x; 1.90x), 224 px 392 vs 205 (1.91x;
        1.99x): the threads kept ~1.5 of the 2 cores busy (the chain's small ops hold the GIL), lightly's ~1.96
(`--cpu-parallel threads` measures the thread path again.)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

PEER_PYTHON = os.environ.get("FASTBYOL_PEER_PYTHON", "")  # the peers' venv python, unless --peer-python


def _rates(arrivals: list[float], batch: int, cpu_seconds: float) -> dict:
    """Wall-clock rates over consecutive arrivals, and the CPU time the timed batches took (all threads and worker
    processes): cpu_ms_per_sample does not depend on what else runs on the machine."""
    gaps = np.diff(arrivals)
    samples = batch * len(gaps)
    return {"samples_per_s": samples / float(arrivals[-1] - arrivals[0]),
            "samples_per_s_median": batch / float(np.median(gaps)), "timed_batches": len(gaps),
            "cpu_ms_per_sample": 1000.0 * cpu_seconds / samples}


def _cpu_seconds(pids: list[int]) -> float:
    """CPU time (user + system) of this process and of the processes `pids` (Linux /proc)."""
    total = time.process_time()
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime
    return total


def run_fastbyol(images: np.ndarray, size: int, batch: int, steps: int, threads: int,
                 cpu_parallel: str = "processes") -> dict:
    """TwoViewLoader on `images` (DALI threads and pixel workers: `threads`; the workers are processes or threads
    as cpu_parallel says), timed as run_lightly; its CPU time counts the worker processes."""
    from fastbyol.augment import LoaderSettings, TwoViewLoader, views_from_config
    from fastbyol.augment.makers import ProcessViews
    from fastbyol.config import DEFAULT_PRESET, AugmentConfig, get_preset

    view1, view2 = views_from_config(get_preset(DEFAULT_PRESET))  # as fastbyol train augments by default
    loader = TwoViewLoader(images, LoaderSettings(batch, size, seed=0, num_threads=threads, views=(view1, view2)),
                           AugmentConfig(cpu_parallel=cpu_parallel))
    pids = [p.pid for p in loader.maker.workers.procs] if isinstance(loader.maker, ProcessViews) else []
    arrivals, done, cpu0 = [], 0, 0.0
    while done < 3 + steps:
        for v1, _ in loader.epoch():
            assert v1.shape == (batch, 3, size, size)
            done += 1
            if done >= 3:
                arrivals.append(time.perf_counter())
                cpu0 = cpu0 or _cpu_seconds(pids)
            if done == 3 + steps:
                break
    return {"who": "fastbyol", "size": size, "batch": batch, "threads": threads, "operators": loader.operators,
            "blur_taps": view1.blur_window(size), "cpu_parallel": loader.cpu_parallel,
            **_rates(arrivals, batch, _cpu_seconds(pids) - cpu0)}


def run_lightly(images: np.ndarray, size: int, batch: int, steps: int, workers: int) -> dict:
    """lightly's BYOLTransform through a DataLoader (as lightly's BYOL example feeds it), timed like fastbyol."""
    import torch
    from lightly.transforms.byol_transform import BYOLTransform, BYOLView1Transform, BYOLView2Transform
    from PIL import Image

    pil = [Image.fromarray(a) for a in images]
    transform = BYOLTransform(view_1_transform=BYOLView1Transform(input_size=size),
                              view_2_transform=BYOLView2Transform(input_size=size))

    class Views(torch.utils.data.Dataset):
        def __len__(self):
            return len(pil)

        def __getitem__(self, i):
            return transform(pil[i])

    loader = torch.utils.data.DataLoader(Views(), batch_size=batch, num_workers=workers, shuffle=True,
                                         drop_last=True, persistent_workers=True)
    arrivals, done, cpu0, pids = [], 0, 0.0, []
    while done < 3 + steps:
        for views in loader:
            assert views[0].shape == (batch, 3, size, size)
            done += 1
            if done >= 3:
                arrivals.append(time.perf_counter())
                pids = pids or [w.pid for w in loader._iterator._workers]  # the persistent worker processes
                cpu0 = cpu0 or _cpu_seconds(pids)
            if done == 3 + steps:
                break
    return {"who": "lightly", "size": size, "batch": batch, "workers": workers,
            **_rates(arrivals, batch, _cpu_seconds(pids) - cpu0)}


def _child(role: str, images_path: str, size: int, batch: int, steps: int, cores: int, python: str,
           cpu_parallel: str = "processes") -> dict:
    cmd = [python, os.path.abspath(__file__), "--role", role, "--images", images_path, "--sizes", str(size),
           "--batch", str(batch), "--steps", str(steps), "--cores", str(cores), "--cpu-parallel", cpu_parallel]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{role} at {size} px failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[96, 224], help="view sides, px")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=24, help="timed batches per measurement (after 3 warm-up)")
    ap.add_argument("--repeats", type=int, default=3, help="back-to-back pairs per size; the median ratio is printed")
    ap.add_argument("--cores", type=int, default=2,
                    help="DALI threads and pixel workers (fastbyol), DataLoader workers (lightly)")
    ap.add_argument("--images", default=None, help="uint8 (N, H, W, 3) .npy (default: generated per size)")
    ap.add_argument("--peer-python", default=PEER_PYTHON, help="python of the venv that has lightly")
    ap.add_argument("--role", choices=["fastbyol", "lightly"], default=None, help=argparse.SUPPRESS)
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--cpu-parallel", choices=["processes", "threads"], default="processes",
                    help="how fastbyol's loader spreads its pixel work (TwoViewLoader cpu_parallel)")
    args = ap.parse_args(argv)

    if args.role is not None:  # one measurement, in this fresh process
        images = np.load(args.images)
        if args.role == "fastbyol":
            row = run_fastbyol(images, args.sizes[0], args.batch, args.steps, args.cores, args.cpu_parallel)
        else:
            row = run_lightly(images, args.sizes[0], args.batch, args.steps, args.cores)
        print(json.dumps(row))
        return 0

    if not args.peer_python:
        raise SystemExit("--peer-python: give the python of a separate venv with lightly and torchvision (or set "
                         "FASTBYOL_PEER_PYTHON)")
    if not os.path.exists(args.peer_python):
        raise SystemExit(f"--peer-python {args.peer_python} does not exist (a venv with lightly and torchvision)")
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from fastbyol.tools.bench_augment import synthetic_source

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        paths = {}
        for size in args.sizes:
            paths[size] = os.path.join(tmp, f"images-{size}.npy")
            np.save(paths[size], synthetic_source(size, 512, "arrays") if args.images is None else np.load(args.images))
        for repeat in range(args.repeats):
            for size in args.sizes:
                ours = _child("fastbyol", paths[size], size, args.batch, args.steps, args.cores, sys.executable,
                              args.cpu_parallel)
                peer = _child("lightly", paths[size], size, args.batch, args.steps, args.cores, args.peer_python)
                rows.append({"repeat": repeat, "size": size, "fastbyol": ours, "lightly": peer,
                             "ratio": ours["samples_per_s"] / peer["samples_per_s"],
                             "cpu_ratio": peer["cpu_ms_per_sample"] / ours["cpu_ms_per_sample"]})
                if not args.json:
                    print(f"repeat {repeat} {size:>4} px: fastbyol {ours['samples_per_s']:7.1f}  lightly "
                          f"{peer['samples_per_s']:7.1f} two-view samples/s, ratio {rows[-1]['ratio']:.2f}; "
                          f"CPU ms/sample {ours['cpu_ms_per_sample']:.2f} vs {peer['cpu_ms_per_sample']:.2f}, "
                          f"ratio {rows[-1]['cpu_ratio']:.2f}", flush=True)
    summary = {}
    for size in args.sizes:
        mine = [r for r in rows if r["size"] == size]
        summary[size] = {"fastbyol_samples_per_s": statistics.median(r["fastbyol"]["samples_per_s"] for r in mine),
                         "lightly_samples_per_s": statistics.median(r["lightly"]["samples_per_s"] for r in mine),
                         "ratio": statistics.median(r["ratio"] for r in mine),
                         "cpu_ratio": statistics.median(r["cpu_ratio"] for r in mine),
                         "operators": mine[0]["fastbyol"]["operators"]}
    if args.json:
        print(json.dumps({"batch": args.batch, "cores": args.cores, "summary": summary, "rows": rows}))
    else:
        for size, s in summary.items():
            print(f"{size:>4} px, batch {args.batch}, {args.cores} cores: fastbyol {s['fastbyol_samples_per_s']:.0f}, "
                  f"lightly {s['lightly_samples_per_s']:.0f} two-view samples/s (medians of {args.repeats}); "
                  f"ratio {s['ratio']:.2f}x (median of per-repeat ratios); CPU time per sample: lightly / "
                  f"fastbyol = {s['cpu_ratio']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
