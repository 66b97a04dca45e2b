"""Startup on an ImageNet-sized folder: the time from `fastbyol train` to the log line of its first step.

Builds (once) a labeled tree shaped like ImageNet, 1,000 class folders n00000000..n00000999 with 1,281 training
images each (1,281,000 files) and 50 test images each (50,000), made of hard links to a few dozen photograph-like
JPEGs of ImageNet sizes (fastbyol.data.synthetic, style "imagenet"; ext4 allows 65,000 links per file, and links
cost directory entries, not inodes or data). Then measures, each `--repeat` times:
  1. `dataset`: resolve_dataset() in a fresh process: first scan (no manifest) and with the manifest, its startup
     seconds (listing, checks, index, eval images) and the peak RSS of the process;
  2. `train`: `fastbyol train` (tiny model, 32 px, 1 epoch) from launch to its first step's log line: first run
     (no manifest), with the manifest, and with 2 gloo processes (`torchrun --standalone --nproc_per_node 2`).

  3. `shards`: two-view samples/s of the training pipeline (fastbyol.augment.TwoViewLoader, CPU) reading the same
     2,048 images from the folder and from tar shards written by `fastbyol shards`, alternated, medians;
  4. `knn`: the kNN gain (trained - random-init kNN top-1) of the default `fastbyol train` (fmnist-tiny preset) on
     the embedded Fashion-MNIST as arrays and the same 8,000 + 2,000 images converted to PNG tar shards.

Usage:
    python benchmarks/startup_imagenet.py --root ROOT [--repeat 3] [--only dataset|train|shards|knn]
    python benchmarks/startup_imagenet.py --root ROOT --remove   # delete the tree

Goals, on a 2-core machine: the first step under 20 s the first time (the manifest listed and every file checked:
headers, sizes, and each file's identity, size, mtime, inode and ctime) and under 5 s with the manifest (its
freshness checked: every folder's identity and a sample of 10,000 files'), 2 processes as fast as 1; <= 500 MB RSS
for the dataset description. The printed JSON also holds the CPU model and the load average seen around each run:
a loaded machine's seconds are not a quiet one's. Run the same script of another checkout, with that checkout's
Python, to compare (`--only train`); the two write different manifest versions, so let each run its own "first"
runs before its "manifest" runs (the script does). `--only shards` makes more hard links to the tree's files, which
changes their ctime: the next run rebuilds the manifest. Results: benchmarks/results/<date>/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from fastbyol.system.machine import cpu_model, usable_cores

CLASSES, TRAIN_PER_CLASS, TEST_PER_CLASS, SOURCES = 1000, 1281, 50, 48


def build_tree(root: Path, classes: int = CLASSES, train_per_class: int = TRAIN_PER_CLASS,
               test_per_class: int = TEST_PER_CLASS, sources: int = SOURCES) -> Path:
    """The labeled tree of hard links (written once: `root/.complete` marks it whole)."""
    if (root / ".complete").is_file():
        return root
    from fastbyol.data.synthetic import write_synthetic_jpegs

    src = root.parent / f"{root.name}-sources"
    if not (src / "train" / "class0").is_dir():
        write_synthetic_jpegs(src, n_train=sources, n_test=0, classes=1, style="imagenet")
    jpegs = sorted(str(p) for p in (src / "train" / "class0").glob("*.jpg"))
    t0 = time.perf_counter()
    for split, per_class in (("train", train_per_class), ("test", test_per_class)):
        for c in range(classes):
            wnid = f"n{c:08d}"
            d = root / split / wnid
            d.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                dst = d / f"{wnid}_{i}.JPEG"
                if not dst.exists():
                    os.link(jpegs[(c * 7 + i) % len(jpegs)], dst)
    (root / ".complete").write_text("ok\n")
    print(f"built {root}: {classes * (train_per_class + test_per_class):,} links in {time.perf_counter() - t0:.0f} s",
          flush=True)
    return root


def drop_manifest(root: Path) -> None:
    shutil.rmtree(root / ".fastbyol", ignore_errors=True)


DATASET_PROBE = """
import json, resource, sys, time
t0 = time.perf_counter()
from fastbyol.data import DataRequest, resolve_dataset
ds = resolve_dataset(sys.argv[1], DataRequest(image_size=32))
t1 = time.perf_counter()
ds.wait_eval_images()
t2 = time.perf_counter()
print(json.dumps(dict(resolve_s=t1 - t0, with_eval_s=t2 - t0, startup=ds.startup_seconds, n=ds.num_pretraining,
                      peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)))
"""


def probe_dataset(root: Path) -> dict:
    out = subprocess.run([sys.executable, "-c", DATASET_PROBE, str(root)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


FIRST_STEP = re.compile(r"first step \(")  # the trainer's log line after its first step


def machine() -> dict:
    """The CPU model, its cores and the load average now (the figures' context)."""
    return dict(cpu=cpu_model(), cores=usable_cores(), load=[round(x, 2) for x in os.getloadavg()])


def time_first_step(cmd: list[str], out: Path, timeout: float = 300) -> float:
    """Seconds from launching `cmd` to the first line of its output that logs step 1 (the process is then stopped)."""
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    env = dict(os.environ, PYTHONUNBUFFERED="1")  # print() through a pipe is block-buffered otherwise
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            env=env)
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if FIRST_STEP.search(line):
                return time.perf_counter() - t0
            if time.perf_counter() - t0 > timeout:
                break
        raise RuntimeError("no first-step line; the output ended with:\n" + "".join(lines[-20:]))
    finally:
        os.killpg(proc.pid, 15)
        proc.wait()
        shutil.rmtree(out, ignore_errors=True)


def train_cmd(root: Path, out: Path, nproc: int) -> list[str]:
    args = ["train", "--data", str(root), "--arch", "resnet-tiny", "--stem", "small-s2", "--image-size", "32",
            "--epochs", "1", "--batch-size", "64", "--out", str(out), "--no-progress"]
    if nproc == 1:
        return [sys.executable, "-m", "fastbyol", *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
            "-m", "fastbyol", *args]


def shards_vs_folder(root: Path, repeat: int, n: int = 2048, batch: int = 64, size: int = 96,
                     steps: int = 24) -> dict:
    """Two-view samples/s of TwoViewLoader on the same n images: a folder of hard links and its tar shards."""
    from fastbyol.augment import LoaderSettings, TwoViewLoader
    from fastbyol.data import DataRequest, resolve_dataset
    from fastbyol.data.shards import write_shards

    work = root.parent / f"{root.name}-throughput"
    folder, tars = work / "folder", work / "shards"
    if not (tars / "train-000000.tar").is_file():
        shutil.rmtree(work, ignore_errors=True)
        per_class = n // 16
        for c in range(16):  # 16 classes of the big tree, n // 16 images each
            d = folder / "train" / f"n{c:08d}"
            d.mkdir(parents=True)
            for i in range(per_class):
                os.link(root / "train" / f"n{c:08d}" / f"n{c:08d}_{i}.JPEG", d / f"{i}.JPEG")
        write_shards(folder, tars, max_samples=512, progress=False)
    sources = {"folder": resolve_dataset(str(folder), DataRequest(eval_images=False)).pretraining_source,
               "shards": resolve_dataset(str(tars), DataRequest(eval_images=False)).pretraining_source}
    rates: dict[str, list[float]] = {"folder": [], "shards": []}
    for _ in range(repeat):
        for name, src in sources.items():
            loader = TwoViewLoader(src, LoaderSettings(batch, size, seed=0, num_threads=2))
            it = iter(loader.epoch())
            for _ in range(4):  # warm-up: buffers, the shuffle buffer's first fill
                next(it)
            t0 = time.perf_counter()
            for _ in range(steps):
                next(it)
            rates[name].append(steps * batch / (time.perf_counter() - t0))
            print(f"two-view {size} px, batch {batch}: {name} {rates[name][-1]:.0f} samples/s", flush=True)
            del it, loader
    med = {k: statistics.median(v) for k, v in rates.items()}
    return dict(folder_samples_s=med["folder"], shards_samples_s=med["shards"], ratio=med["shards"] / med["folder"],
                runs=rates)


def knn_gain(work: Path, epochs: int = 16) -> dict:
    """The default run (`epochs` of the fmnist-tiny preset's 16) on the embedded Fashion-MNIST (arrays) and on the same
    images as PNG tar shards."""
    from PIL import Image

    from fastbyol.data import load_embedded
    from fastbyol.data.shards import write_shards

    tars = work / "shards"
    if not (tars / "train-000000.tar").is_file():
        shutil.rmtree(work, ignore_errors=True)
        ds = load_embedded()
        for split, x, y in (("train", ds.train_images, ds.train_labels), ("test", ds.test_images, ds.test_labels)):
            for i, (img, label) in enumerate(zip(x, y)):
                d = work / "png" / split / f"{label:02d}"
                d.mkdir(parents=True, exist_ok=True)
                Image.fromarray(img[..., 0]).save(d / f"{i:05d}.png")  # grey, lossless
        write_shards(work / "png", tars, progress=False)
    out = {}
    for name, data in (("embedded", "embedded"), ("shards", str(tars))):
        run = work / f"run-{name}"
        shutil.rmtree(run, ignore_errors=True)
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "fastbyol", "train", "--data", data, "--out", str(run), "--no-progress",
                        "--epochs", str(epochs)], check=True, stdout=subprocess.DEVNULL)
        summary = json.loads((run / "summary.json").read_text())
        out[name] = dict(knn_trained=summary["knn_top1"], knn_random_init=summary["knn_top1_random_init"],
                         gain=summary["knn_top1"] - summary["knn_top1_random_init"],
                         seconds=time.perf_counter() - t0)
        print(f"kNN {name}: {out[name]}", flush=True)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", type=Path, required=True, help="the folder of the ImageNet-sized tree (made there once)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--only", choices=["dataset", "train", "shards", "knn"], default=None)
    ap.add_argument("--remove", action="store_true", help="delete the tree and its sources")
    ap.add_argument("--knn-epochs", type=int, default=16, help="epochs of each kNN-gain run")
    args = ap.parse_args()
    if args.remove:
        shutil.rmtree(args.root, ignore_errors=True)
        shutil.rmtree(args.root.parent / f"{args.root.name}-sources", ignore_errors=True)
        return 0
    root = build_tree(args.root)
    results: dict = {"machine": machine()}
    if args.only in (None, "dataset"):
        for kind in ("first", "manifest"):
            runs = []
            for _ in range(args.repeat):
                if kind == "first":
                    drop_manifest(root)
                runs.append(probe_dataset(root))
                print(f"dataset {kind}: {runs[-1]}", flush=True)
            results[f"dataset_{kind}"] = dict(median_resolve_s=statistics.median(r["resolve_s"] for r in runs),
                                              median_peak_rss_mb=statistics.median(r["peak_rss_mb"] for r in runs),
                                              runs=runs)
    if args.only in (None, "train"):
        out = Path(os.environ.get("TMPDIR", "/tmp")) / "fastbyol-startup-run"
        for kind, nproc in (("first", 1), ("manifest", 1), ("manifest_2proc", 2)):
            runs, loads = [], []
            for _ in range(args.repeat):
                if kind == "first":
                    drop_manifest(root)
                before = os.getloadavg()[0]
                runs.append(time_first_step(train_cmd(root, out, nproc), out))
                loads.append(round(max(before, os.getloadavg()[0]), 2))
                print(f"train {kind}: {runs[-1]:.1f} s to the first step (load average {loads[-1]})", flush=True)
            results[f"train_{kind}"] = dict(median_s=statistics.median(runs), runs=runs, load=loads)
    if args.only in (None, "shards"):
        results["shards_vs_folder"] = shards_vs_folder(root, args.repeat)
    if args.only in (None, "knn"):
        results["knn_gain"] = knn_gain(Path(os.environ.get("TMPDIR", "/tmp")) / "fastbyol-knn-shards", args.knn_epochs)
    results["machine_after"] = machine()
    print(json.dumps({k: {kk: vv for kk, vv in v.items() if kk != "runs"} for k, v in results.items()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
