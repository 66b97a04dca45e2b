"""The GPU plan's runner (benchmarks/gpu_plan.md): one of the four device calls, its items in priority order, every
figure written to OUT/callN.json the moment it is measured, so a call stopped at its time limit keeps what it did.

    bash benchmarks/gpu_run.sh N                                  # what a device call runs (N = 1..4)
    python benchmarks/gpu_plan.py --call N --out DIR [--budget S] [ITEM ...]
    python benchmarks/gpu_plan.py --merge STATE_OR_OUT_DIR... --out DIR   # afterwards: one report (gpu_report format)
    python benchmarks/gpu_plan.py --list                          # the calls and their items

Each item has a time estimate; an item starts only when the call's budget still holds it, else it is recorded as
skipped, and call 3 first reruns whatever calls 1 and 2 skipped or failed (its "second look" slot). Items named on the
command line replace the call's list. Without CUDA every item runs at tiny sizes (compiled rows through Dynamo with
the 'eager' backend, tests collected, not run): the CPU dry run of tests/test_gpu_plan.py, so the plan cannot rot.

Results: OUT/callN.json {"call", "meta", "items": [{name, status: ok|failed|skipped, seconds, result|error|reason}],
"report": gpu_report sections}, also kept in the state folder (PLAN_STATE, default runs/gpu-plan, ignored by git),
which survives between calls on a GPU host still held with the compiler caches and the peers' wheels.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

BUDGET = {1: 200, 2: 130, 3: 110, 4: 200}  # seconds of work per call (the device call's timeout_s adds 30)
JPEGS_GPU, JPEGS_TINY = (4096, 512), (48, 16)  # (train, test) ImageNet-like JPEGs for call 4


class Plan:
    """What an item sees: the device, tiny or not, where to write, and the clock."""

    def __init__(self, call: int, out: Path, state: Path, budget: float, tiny: bool):
        self.call, self.out, self.state, self.tiny = call, out, state, tiny
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.deadline = time.perf_counter() + budget
        self.compile_backend = "eager" if tiny else "inductor"
        self.record: dict = {}  # this call's results so far (run_call fills it)

    def left(self) -> float:
        return self.deadline - time.perf_counter()

    def previous(self, call: int) -> dict | None:
        path = self.state / f"call{call}.json"
        return json.loads(path.read_text()) if path.exists() else None


# ---------------------------------------------------------------------------------------------------------- items
# Each item: fn(plan) -> (report section, value) or a plain result dict; est: seconds on the H200 (tiny: est_tiny),
# guesses from the H100 kernel-test log and the sizes (a compiled ResNet-50 BYOL step: 60-120 s cold), to be
# replaced by what the first run measures (each item's `seconds` in callN.json).
ITEMS: dict[str, dict] = {}


def item(name: str, est: float, est_tiny: float = 3.0, needs_dali: bool = False):
    def register(fn):
        ITEMS[name] = {"fn": fn, "est": est, "est_tiny": est_tiny, "needs_dali": needs_dali}
        return fn
    return register


def _free(plan: Plan) -> None:
    """Between rows: the last row's compiled graphs and cached CUDA blocks go."""
    torch._dynamo.reset()
    gc.collect()
    if plan.device.type == "cuda":
        torch.cuda.empty_cache()


@item("env", 3, 1)
def env(plan: Plan):
    from gpu_report import git_commit

    from fastbyol.run.perf import library_versions, peak_flops

    info = {"device": torch.cuda.get_device_name() if plan.device.type == "cuda" else f"cpu ({os.cpu_count()} cores)",
            "versions": library_versions(), "commit": git_commit(), "tiny": plan.tiny,
            "peak_bf16_flops": peak_flops(plan.device)}
    if plan.device.type == "cuda":
        props = torch.cuda.get_device_properties(0)
        info.update(sm_count=props.multi_processor_count, memory_gb=props.total_memory / 1e9,
                    cudnn=torch.backends.cudnn.version())
        query = "--query-gpu=name,driver_version,clocks.sm,clocks.max.sm,power.limit,temperature.gpu"
        text, _ = _run(["nvidia-smi", query, "--format=csv,noheader"], 20)
        info["nvidia_smi"] = text.strip()
    return "env", info


@item("ceilings", 6, 1)
def ceilings(plan: Plan):
    from gpu_report import ceilings as measure

    return "ceilings", measure(plan.device, plan.tiny)


STEP_CASES = {  # the GPU rows: bf16 autocast, channels_last, BYOL heads 4096 wide
    "resnet50": dict(arch="resnet50", size=224, batch=256, proj_hidden=4096, stem="auto", steps=10, warmup=3),
    "resnet18": dict(arch="resnet18", size=32, batch=512, proj_hidden=4096, stem="auto", steps=20, warmup=3),
    # ViT-S/16 (22M, SDPA attention) and the paper's ResNet-50 (2x) (94M, ~4x ResNet-50's FLOPs) at 224 px
    "vit_small_patch16": dict(arch="vit_small_patch16", size=224, batch=256, proj_hidden=4096, stem="auto", steps=10,
                              warmup=3),
    "resnet50x2": dict(arch="resnet50x2", size=224, batch=128, proj_hidden=4096, stem="auto", steps=6, warmup=2),
}


def _step(plan: Plan, arch: str, variant: str, compile: str = "off"):
    from fastbyol.tools.bench_step import StepCase, bench_step

    if plan.tiny:  # the ViT row keeps a (tiny) ViT, so the dry run goes through the transformer path
        tiny_arch = "vit-tiny-cpu" if arch.startswith("vit") else "resnet-tiny"
        case = dict(arch=tiny_arch, size=16, batch=8, proj_hidden=64, stem="small-s2", steps=2, warmup=1)
    else:
        case = STEP_CASES[arch]
    try:
        row = bench_step(StepCase(case["arch"], case["size"], case["batch"], variant, proj_hidden=case["proj_hidden"],
                                  stem=case["stem"], compile=compile, compile_backend=plan.compile_backend),
                         steps=case["steps"], warmup=case["warmup"], device=str(plan.device))
    finally:
        _free(plan)
    return "step", row


def _peer(plan: Plan, peer: str):
    from peer_step import peer_step

    try:
        if plan.tiny:
            row = peer_step(peer, "resnet18", 32, 8, steps=2, warmup=1, device=str(plan.device))
        else:
            row = peer_step(peer, "resnet50", 224, 256, steps=10, warmup=3, device=str(plan.device))
    finally:
        _free(plan)
    if "error" in row and not plan.tiny:
        raise RuntimeError(row["error"])  # on the GPU a missing peer is a failure of the plan (wheels not carried)
    return "step", row


item("step-r50-eager", 12, 4)(lambda plan: _step(plan, "resnet50", "fastbyol"))
item("step-r50-plain", 12, 4)(lambda plan: _step(plan, "resnet50", "plain"))
item("peer-byol-pytorch", 12, 2)(lambda plan: _peer(plan, "byol-pytorch"))
item("peer-lightly", 12, 2)(lambda plan: _peer(plan, "lightly"))
item("peer-byol-pytorch-own-augment", 12, 2)(lambda plan: _peer(plan, "byol-pytorch-own-augment"))
item("step-r50-compiled", 80, 6)(lambda plan: _step(plan, "resnet50", "fastbyol", "default"))
item("step-r18-eager", 8, 4)(lambda plan: _step(plan, "resnet18", "fastbyol"))
item("step-r18-plain", 8, 4)(lambda plan: _step(plan, "resnet18", "plain"))
item("step-r18-compiled", 35, 6)(lambda plan: _step(plan, "resnet18", "fastbyol", "default"))
item("step-r18-reduce-overhead", 30, 6)(lambda plan: _step(plan, "resnet18", "fastbyol", "reduce-overhead"))
item("step-r50-reduce-overhead", 60, 6)(lambda plan: _step(plan, "resnet50", "fastbyol", "reduce-overhead"))
item("step-vits16-eager", 12, 4)(lambda plan: _step(plan, "vit_small_patch16", "fastbyol"))
item("step-r50x2-eager", 15, 4)(lambda plan: _step(plan, "resnet50x2", "fastbyol"))


def _run(cmd: list[str], timeout: float) -> tuple[str, int]:
    """(stdout + stderr, return code; 124 when stopped at `timeout` seconds, 127 when not found) of a subprocess in
    the repository."""
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=max(timeout, 5))
        return res.stdout + res.stderr, res.returncode
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        return out, 124
    except FileNotFoundError as e:
        return str(e), 127


def _pytest(plan: Plan, name: str, args: list[str], timeout: float) -> dict:
    """pytest in a subprocess (its own time limit); on the CPU only collected: the selection still exists."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args]
    cmd += ["--collect-only"] if plan.tiny else ["--durations=5"]
    t0 = time.perf_counter()
    text, rc = _run(cmd, timeout)
    with open(plan.out / f"call{plan.call}-tests.log", "a") as log:
        log.write(f"$ {' '.join(cmd)}\n{text}\n(rc {rc}, {time.perf_counter() - t0:.0f} s)\n\n")
    lines = [line for line in text.splitlines() if line.strip()]
    summary = lines[-1] if lines else ""
    result = {"command": " ".join(cmd[3:]), "rc": rc, "summary": summary, "seconds": time.perf_counter() - t0}
    if rc not in (0, 5) or (plan.tiny and "error" in summary.lower()):  # 5: nothing selected
        raise RuntimeError(f"{name}: pytest rc {rc}: {summary}" + ("" if rc != 124 else " (time limit)"))
    return result


@item("tests-cuda", 40, 12)
def tests_cuda(plan: Plan):
    """The kernels (fused loss, single-launch EMA, compiled step) and LARS on this device, then every CUDA-only test
    (the no-sync steady-state step, cross-replica BN on NCCL; DALI's tests skip until call 4 brings DALI)."""
    limit = plan.left() - 5
    first = _pytest(plan, "kernels", ["tests/test_kernels.py", "tests/test_optim.py"], limit * 0.7)
    second = _pytest(plan, "gpu-marked", ["-m", "gpu", "tests"], plan.left() - 5)
    return {"kernels": first, "gpu_marked": second}


@item("lars", 10, 4)
def lars(plan: Plan):
    from gpu_report import lars_section

    return "lars", lars_section(plan.device, plan.tiny)


def _loss(plan: Plan, dtype: torch.dtype):
    import gpu_report

    gpu_report.COMPILE_BACKEND = plan.compile_backend
    try:
        sizes = (64,) if plan.tiny else (256, 4096)
        dtypes = (torch.float32,) if plan.tiny else (dtype,)
        return "loss", gpu_report.loss_section(plan.device, plan.tiny, batch_sizes=sizes, dtypes=dtypes)
    finally:
        gpu_report.COMPILE_BACKEND = "inductor"
        _free(plan)


item("loss-styles", 30, 8)(lambda plan: _loss(plan, torch.bfloat16))  # custom_op vs triton_op in a compiled graph
item("loss-fp32", 30, 8)(lambda plan: _loss(plan, torch.float32))


@item("ema", 10, 3)
def ema(plan: Plan):
    from gpu_report import ceilings as measure
    from gpu_report import ema_section

    done = plan.previous(1) or {}
    copy_gbps = (done.get("report", {}).get("ceilings") or measure(plan.device, plan.tiny))["copy_GBps"]
    return "ema", ema_section(plan.device, plan.tiny, copy_gbps)


def _photometric(plan: Plan, size: int, backend: str):
    import fastbyol.tools.bench_augment as ab

    if plan.tiny and backend != "reference":
        return "photometric", {"size": size, "backend": backend, "skipped": "tiny CPU run: the GPU measures it"}
    batch = 256 if size == 224 else 512
    if plan.tiny:
        size, batch = min(size, 32), 4
    try:
        row = ab.bench_photometric(size, batch, "cuda" if plan.device.type == "cuda" else "cpu", backend,
                                   steps=3 if plan.tiny else 20)
    finally:
        _free(plan)
    return "photometric", row


for _size in (224, 32):
    for _backend, _est in (("reference", 8), ("triton", 10), ("compiled", 30)):
        item(f"photometric-{_size}-{_backend}", _est, 3)(
            lambda plan, s=_size, v=_backend: _photometric(plan, s, v))


def _photometric_blur(plan: Plan, rows: int, warps: int):
    """The Triton chain at 224 px with another spill-free blur launch (fastbyol bench gpu-compile lists them)."""
    from fastbyol.kernels.photometric import set_blur_launch

    set_blur_launch(rows, warps)
    try:
        name, row = _photometric(plan, 224, "triton")
    finally:
        set_blur_launch()
    return name, {**row, "backend": f"triton-rows{rows}-w{warps}"} if isinstance(row, dict) else row


item("photometric-224-triton-rows1", 10, 3)(lambda plan: _photometric_blur(plan, 1, 4))
item("photometric-224-triton-rows2-w8", 10, 3)(lambda plan: _photometric_blur(plan, 2, 8))


@item("dali", 2, 1)
def dali(plan: Plan):
    """DALI must import now (gpu_run.sh unpacked the four parts, or it was installed): fail loudly otherwise."""
    status_file = plan.state / "dali-unpack.txt"
    unpack = status_file.read_text().strip() if status_file.exists() else "no unpack record"
    try:
        import nvidia.dali as d
    except ImportError as e:
        raise RuntimeError(f"DALI DOES NOT IMPORT ({e}); unpack: {unpack}") from None
    return {"version": d.__version__, "unpack": unpack}


def _jpeg_folder(plan: Plan) -> Path:
    folder = plan.state / ("jpegs-tiny" if plan.tiny else "jpegs")
    if not (folder / ".complete").exists():
        write_jpegs(folder, *(JPEGS_TINY if plan.tiny else JPEGS_GPU))
    return folder


@item("tests-dali", 45, 10, needs_dali=True)
def tests_dali(plan: Plan):
    """Every CUDA-only test again, now with DALI: the GPU pipeline, its stream binding (DALI buffers freed only after
    the step that reads them), the GPU training run."""
    return {"gpu_marked": _pytest(plan, "gpu-marked", ["-m", "gpu", "tests"], min(plan.left() - 5, 90))}


def _augment_jpeg(plan: Plan, decode: str):
    """`fastbyol bench augment --device gpu --source jpeg` on the ImageNet-like JPEGs (not the small synthetic ones),
    224 px, batch 256, in one decode mode of the GPU path: "roi" (one region-of-interest decode
    per view: each file entropy-decoded twice) or "once" (one whole-image decode, both views cropped from it on the
    GPU). The two items run back to back on the same files; the faster mode becomes the default of
    `fastbyol train --decode` (fastbyol.config.AugmentConfig.decode). On the CPU (the dry run) the mode changes
    nothing: both rows run the CPU path."""
    from fastbyol.tools.bench_augment import AugmentBenchSettings, bench_augment
    from fastbyol.data.folders import FileList

    files = sorted(str(p) for p in (_jpeg_folder(plan) / "train").rglob("*.jpg"))
    gpu = plan.device.type == "cuda"
    try:
        bench = AugmentBenchSettings(224 if gpu else 32, 256 if gpu else 8, "gpu" if gpu else "cpu", "jpeg",
                                     steps=15 if gpu else 3, decode=decode)
        row = bench_augment(bench, data=FileList(files, None))
    finally:
        _free(plan)
    # the report's table shows `images`, not `decode`: name the mode there, so the two rows read apart
    row["images"] = (f"{len(files)} ImageNet-like JPEGs (fastbyol.data.synthetic, style imagenet); decode {decode}, "
                     f"{row['decoders']} decoder(s) in the graph")
    return "augment", row


# est: ~18 batches of 256 (4,608 decodes, 2 views each) at >= 1,000 samples/s is < 5 s; the rest is the loader's
# start (nvJPEG and hardware-decoder set-up, the first batches, the chain's Triton kernels from call 3's cache)
item("augment-jpeg-224-roi", 12, 6, needs_dali=True)(lambda plan: _augment_jpeg(plan, "roi"))
item("augment-jpeg-224-once", 12, 6, needs_dali=True)(lambda plan: _augment_jpeg(plan, "once"))


@item("augment-arrays-32", 8, 4, needs_dali=True)
def augment_arrays(plan: Plan):
    from fastbyol.tools.bench_augment import AugmentBenchSettings, bench_augment

    gpu = plan.device.type == "cuda"
    return "augment", bench_augment(AugmentBenchSettings(32, 512 if gpu else 8, "gpu" if gpu else "cpu", "arrays",
                                                         steps=20 if gpu else 3))


@item("train-r50", 90, 25, needs_dali=True)
def train_r50(plan: Plan):
    """`fastbyol train`, ResNet-50 at 224 px, batch 256, on the ImageNet-like JPEGs, for about two minutes: epochs
    chosen from the rate calls 1 and 4 measured; summary.json to OUT."""
    folder = _jpeg_folder(plan)
    n_train = JPEGS_TINY[0] if plan.tiny else JPEGS_GPU[0]
    run_dir = plan.state / "train-r50"
    shutil.rmtree(run_dir, ignore_errors=True)
    if plan.tiny:
        args = ["--preset", "fmnist-tiny", "--image-size", "32", "--batch-size", "16", "--epochs", "1",
                "--device", "cpu", "--num-threads", "2"]
        epochs = 1
    else:
        rate = _expected_rate(plan)
        # around the timed part: start-up, the final kNN, and compilation (~100 s without call 1's cache)
        cold = not any((plan.state / "inductor-cache").glob("*"))
        seconds = max(20.0, min(120.0, plan.left() - (115 if cold else 50)))
        epochs = int(max(2, min(100, round(seconds * rate / n_train))))
        args = ["--preset", "imagenet-resnet50", "--batch-size", "256", "--epochs", str(epochs),
                "--warmup-epochs", "1", "--num-threads", "8"]
    cmd = [sys.executable, "-m", "fastbyol", "train", *args, "--data", str(folder), "--knn-every", "0",
           "--log-every", "10", "--out", str(run_dir), "--no-progress"]
    t0 = time.perf_counter()
    text, rc = _run(cmd, plan.left() - 3)
    (plan.out / f"call{plan.call}-train.log").write_text(f"$ {' '.join(cmd)}\n{text}\n(rc {rc})\n")
    summary_path = run_dir / "summary.json"
    if rc != 0 or not summary_path.exists():
        tail = " | ".join(text.strip().splitlines()[-3:])
        raise RuntimeError(f"fastbyol train rc {rc}{' (time limit)' if rc == 124 else ''}: {tail[-400:]}")
    shutil.copy(summary_path, plan.out / f"call{plan.call}-train-summary.json")
    summary = json.loads(summary_path.read_text())
    summary.pop("versions", None)
    return "train", {"command": " ".join(cmd[2:]), "epochs": epochs, "wall_seconds": time.perf_counter() - t0,
                     "images": n_train, **summary}


def _expected_rate(plan: Plan) -> float:
    """BYOL img/s the training run should reach: the slower of call 1's compiled step and call 4's JPEG pipeline in
    the decode mode the trainer uses by default (AugmentConfig.decode) (2000 when neither was measured)."""
    from fastbyol.config import AugmentConfig

    DECODE = AugmentConfig().decode

    rates = []
    for call in (1, 3, plan.call):
        for row in ((plan.previous(call) or {}).get("report", {}).get("step") or []):
            if row.get("arch") == "resnet50" and row.get("variant") == "fastbyol" and "img_per_s" in row:
                rates.append(row["img_per_s"])
    for row in plan.record.get("report", {}).get("augment") or []:
        if row.get("size") == 224 and row.get("decode", DECODE) == DECODE and "samples_per_s" in row:
            rates.append(row["samples_per_s"])
    return min(rates) if rates else 2000.0


CALLS = {
    1: ["env", "ceilings", "step-r50-eager", "step-r50-plain", "peer-byol-pytorch", "peer-lightly",
        "peer-byol-pytorch-own-augment", "step-r50-compiled", "tests-cuda"],
    2: ["env", "lars", "loss-styles", "step-r18-eager", "step-r18-plain", "step-r18-compiled",
        "step-r18-reduce-overhead", "step-r50-reduce-overhead"],
    3: ["env", "ema", "photometric-224-triton", "photometric-224-triton-rows1", "photometric-224-triton-rows2-w8",
        "photometric-224-reference", "photometric-32-reference",
        "photometric-32-triton", "photometric-224-compiled", "photometric-32-compiled", "loss-fp32"],
    4: ["env", "dali", "augment-jpeg-224-roi", "augment-jpeg-224-once", "augment-arrays-32", "tests-dali",
        "step-vits16-eager", "step-r50x2-eager", "train-r50"],  # backbone rows here: call 1 keeps the headline
}


# ------------------------------------------------------------------------------------------------- the call runner
def write_jpegs(folder: Path, n_train: int, n_test: int, workers: int | None = None) -> Path:
    """ImageNet-like labeled JPEGs (fastbyol.data.synthetic, style imagenet: ~100 KB, ~500x375) in
    folder/{train,test}/class<k>/, written by a process pool (one image takes ~50 ms of one core); '.complete' last."""
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    workers = workers or max(1, min(14, (os.cpu_count() or 2) - 2))
    shards = [(tmp / f"shard{w}", len(range(w, n_train, workers)), len(range(w, n_test, workers)), w)
              for w in range(workers)]
    with ProcessPoolExecutor(workers) as pool:
        list(pool.map(_write_shard, shards))
    for shard, _, _, w in shards:  # merge: train/class<k>/w<W>-<i>.jpg
        for path in shard.rglob("*.jpg"):
            dest = tmp / path.relative_to(shard).parent / f"w{w}-{path.name}"
            dest.parent.mkdir(parents=True, exist_ok=True)
            path.rename(dest)
        shutil.rmtree(shard)
    (tmp / ".complete").write_text(f"{n_train} train + {n_test} test\n")
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder


def _write_shard(args) -> None:
    from fastbyol.data.synthetic import write_synthetic_jpegs

    shard, n_train, n_test, seed = args
    write_synthetic_jpegs(shard, n_train, n_test, style="imagenet", seed=seed)


def _atomic_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str) + "\n")
    os.replace(tmp, path)


def second_look(plan: Plan) -> list[str]:
    """Call 3's slot: the items of calls 1 and 2 that did not end 'ok' (skipped for time, failed), in order."""
    again = []
    for call in (1, 2):
        done = plan.previous(call)
        statuses = {r["name"]: r["status"] for r in (done or {}).get("items", [])}
        again += [name for name in CALLS[call] if name != "env" and statuses.get(name) != "ok"]
    return again


def run_call(call: int, out: Path, state: Path, budget: float | None = None, names: list[str] | None = None) -> int:
    """Run call `call`'s items (or `names`); returns the number of failed items."""
    out.mkdir(parents=True, exist_ok=True)
    state.mkdir(parents=True, exist_ok=True)
    tiny = not torch.cuda.is_available()
    plan = Plan(call, out, state, budget if budget is not None else (600.0 if tiny else BUDGET[call]), tiny)
    if names:
        order = names
    else:
        order = CALLS[call] if call != 3 else ["env", *second_look(plan), *CALLS[3][1:]]
    unknown = [n for n in order if n not in ITEMS]
    if unknown:
        raise SystemExit(f"unknown items {unknown}; choose from {sorted(ITEMS)}")
    record = plan.record = {"call": call, "items": [], "report": {},
                            "meta": {"started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
                                     "budget_s": round(plan.left()), "tiny": tiny, "order": order}}
    path = out / f"call{call}.json"
    dali_ok = None
    for name in dict.fromkeys(order):  # each item once
        spec = ITEMS[name]
        est = spec["est_tiny"] if tiny else spec["est"]
        entry = {"name": name}
        if spec["needs_dali"] and dali_ok is None:
            from fastbyol.augment import dali_available

            dali_ok = dali_available()
        if spec["needs_dali"] and not dali_ok:
            entry.update(status="skipped", reason="DALI not importable")
        elif plan.left() < est:
            entry.update(status="skipped", reason=f"time: {plan.left():.0f} s left, item needs ~{est:.0f} s")
        else:
            print(f"== {name} ({plan.left():.0f} s left)", flush=True)
            t0 = time.perf_counter()
            try:
                value = spec["fn"](plan)
                entry["status"] = "ok"
                if isinstance(value, tuple):  # (report section, value): lists of rows or one dict
                    section, value = value
                    if section in ("env", "ceilings", "train"):
                        record["report"][section] = value
                    else:
                        record["report"].setdefault(section, []).extend(value if isinstance(value, list) else [value])
                entry["result"] = value
            except Exception as e:  # noqa: BLE001 (one failed item must not lose the others)
                entry.update(status="failed", error=f"{type(e).__name__}: {str(e)[:600]}")
            entry["seconds"] = round(time.perf_counter() - t0, 1)
        print(f"   {name}: {entry['status']} {entry.get('reason') or entry.get('error') or ''}"
              f"{_headline(entry.get('result'))}", flush=True)
        record["items"].append(entry)
        _atomic_json(path, record)
        shutil.copy(path, state / path.name)
    failed = [e["name"] for e in record["items"] if e["status"] == "failed"]
    print(f"call {call}: {len(record['items'])} items, failed {failed or 'none'}, "
          f"skipped {[e['name'] for e in record['items'] if e['status'] == 'skipped'] or 'none'}", flush=True)
    return len(failed)


def _headline(result) -> str:
    rows = result if isinstance(result, list) else [result]
    parts = []
    for r in rows:
        if isinstance(r, dict) and r.get("img_per_s"):
            mfu = "" if r.get("mfu") is None else f", MFU {100 * r['mfu']:.1f}%"
            parts.append(f" {r['img_per_s']:.0f} img/s{mfu}")
        elif isinstance(r, dict) and r.get("samples_per_s"):
            parts.append(f" {r['samples_per_s']:.0f} samples/s")
    return ";".join(parts)


# ------------------------------------------------------------------------------------------------------ the merge
def merge(folders: list[Path]) -> dict:
    """One report in gpu_report's format from the calls' JSON files (the newest of each call): env and ceilings of
    the first call that has them, every row of every section, and each item's status under 'plan'."""
    calls: dict[int, dict] = {}
    for folder in folders:
        for path in sorted(Path(folder).glob("call[1-4].json")):
            data = json.loads(path.read_text())
            calls[data["call"]] = data
    if not calls:
        raise SystemExit(f"no call[1-4].json under {', '.join(map(str, folders))}")
    report: dict = {"plan": [], "sections": []}
    for call in sorted(calls):
        data = calls[call]
        report["plan"] += [{"call": call, **{k: e.get(k) for k in ("name", "status", "seconds", "reason", "error")}}
                           for e in data["items"]]
        for section, value in data["report"].items():
            if isinstance(value, list):
                # a rerun (call 3's second look) replaces the earlier row of the same identity
                rows = report.setdefault(section, [])
                for row in value:
                    rows[:] = [r for r in rows if _identity(r) != _identity(row)] + [row]
            else:
                report.setdefault(section, value)
    env = report.pop("env", {})
    tiny = env.get("tiny", True)
    report.update(device=env.get("device", "unknown"), commit=env.get("commit", "unknown"),
                  versions=env.get("versions", {}), tiny=tiny, peak_bf16_flops=env.get("peak_bf16_flops"), env=env,
                  date=min(c["meta"]["started"] for c in calls.values()), kernel_backend="reference" if tiny else "triton")
    report["sections"] = [s for s in ("loss", "ema", "lars", "augment", "step", "photometric", "train") if s in report]
    return report


def _identity(row: dict) -> tuple:
    return tuple(row.get(k) for k in ("arch", "size", "batch", "variant", "compile", "source", "B", "dtype", "device",
                                      "decode"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--call", type=int, choices=sorted(CALLS), help="which call of the plan to run")
    ap.add_argument("--out", help="output folder ($OUT on the GPU host)")
    ap.add_argument("--budget", type=float, default=None, help="seconds of work (default: the call's, 600 on a CPU)")
    ap.add_argument("--merge", nargs="+", metavar="DIR", help="merge the calls' JSON files of these folders")
    ap.add_argument("--list", action="store_true", help="print the calls and their items")
    ap.add_argument("--write-jpegs", action="store_true", help="write call 4's ImageNet-like JPEGs and exit")
    ap.add_argument("items", nargs="*", help="run these items instead of the call's list")
    args = ap.parse_args(argv)
    if args.list:
        for call, names in CALLS.items():
            print(f"call {call} (budget {BUDGET[call]} s): " + ", ".join(
                f"{n} ~{ITEMS[n]['est']:.0f}s" for n in names) + (" (+ second look first)" if call == 3 else ""))
        return 0
    state = Path(os.environ.get("PLAN_STATE", ROOT / "runs" / "gpu-plan"))
    if args.write_jpegs:
        print(f"JPEGs: {_jpeg_folder(Plan(4, state, state, 0.0, not torch.cuda.is_available()))}")
        return 0
    if not args.out:
        ap.error("--out is required")
    if args.merge:
        import gpu_report

        report = merge([Path(f) for f in args.merge])
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        _atomic_json(out / "report.json", report)
        (out / "report.md").write_text(gpu_report.markdown(report))
        print(f"{out / 'report.json'}: {len(report['plan'])} items, sections {report['sections']}")
        return 0
    if args.call is None:
        ap.error("--call, --merge or --list")
    return 1 if run_call(args.call, Path(args.out), state, args.budget, args.items) else 0


if __name__ == "__main__":
    sys.exit(main())
