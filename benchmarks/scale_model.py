"""A scaling model of BYOL pretraining on 1-256 H100s at the paper's global batch of 4096: img/s per GPU and scaling
efficiency, before (four passes a step, the BN table, BN on DDP's communicator) and after (one pass a step, a fixed BN
payload, BN on its own communicator), for ResNet-50, ResNet-200 (2x) and ViT-B/16.

    python benchmarks/scale_model.py [--json] [--measured FILE ...] [--out FILE]

What it takes, and from where:
- The collectives a step and their bytes, by a counting rule checked against the profiler: for each design, the BN
  layers of the online network (encoder, projector, predictor) and of the target (encoder, projector) and their
  channels, found by instantiating each model (on the meta device: no memory), and the online parameters (the
  gradient all-reduce). Before: one collective per BN layer per view in each forward (online and target) and in the
  online backward, each a (world, 2C + 1) fp32 table; after: one per layer for both views in each forward and in the
  backward, each (2, 2C + 1) float64. The rule is first applied to the measured model (resnet-tiny, the default preset)
  and compared with `benchmarks/step_collectives.py`'s profiler counts at 2 and 4 gloo processes (--measured).
- Compute: FLOPs per image counted by torch (fastbyol.run.perf.flops_per_image) at the anchor's efficiency, 17.5 %
  of the H100's 989 TFLOP/s (MLPerf v3.0's ResNet-50, the best published ResNet-50 training efficiency: ~2,630 BYOL
  img/s for ResNet-50), the same for every model, plus a floor per kernel launch (KERNEL_FLOOR_US, what a kernel
  costs however small its batch: launch, ramp-up and tail), which is what shrinking per-GPU batches run into. The
  launches a step are counted by instantiating too, one kernel per layer (convolution, linear, norm) and pass
  forward and two backward, which overestimates Inductor's fused graphs (ResNet-50's four-pass forward was 322
  kernels for 444 layer-passes, docs/inductor.md); the one-pass step has half the passes, so half the launches.
  On fewer than 16 GPUs the 4096 images come as micro-batches of 256 (gradient accumulation): compute and BN
  collectives per micro-batch, the gradient all-reduce once.
- Interconnect (stated, from published figures): inside a node of 8 GPUs NVLink 4, 360 GB/s of NCCL bus bandwidth;
  between nodes one 400 Gb/s InfiniBand NIC a GPU, 45 GB/s of bus bandwidth; a collective's latency 10 us inside a
  node, 20 us + 4 us per doubling of the nodes across them (NCCL's tree for small messages). An all-reduce of S
  bytes on G GPUs: latency + 2 (G - 1) / G x S / bandwidth.
- Overlap: BN's collectives are on the critical path (each layer waits for its statistics). DDP's gradient buckets
  (25 MB) overlap the online backward (half the step's compute) when BN has its own communicator (after); before,
  BN's backward all-reduces queue with the buckets on DDP's communicator, and the buckets are counted as exposed.

Efficiency is img/s per GPU over the one-GPU rate at batch 256. The table and its discussion: docs/performance.md.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

GLOBAL_BATCH = 4096
GPUS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
PEAK_FLOPS = 989e12  # H100 SXM dense bf16
ANCHOR_MFU = 0.175  # MLPerf v3.0 ResNet-50 on H100 (~7,006 supervised img/s a GPU)
MICRO_BATCH = 256  # the largest batch a GPU runs in one pass (ResNet-50 BYOL at 224 px fits an H100 at 256)
KERNEL_FLOOR_US = 5.0  # a kernel's cost however small its batch (launch, ramp-up, tail; see the docstring)
GPUS_PER_NODE = 8
NVLINK_BUS_GBPS, IB_BUS_GBPS = 360.0, 45.0
LATENCY_INTRA_US, LATENCY_INTER_US, LATENCY_PER_DOUBLING_US = 10.0, 20.0, 4.0
BUCKET_BYTES = 25 * 2**20
MODELS = {"resnet50": "imagenet", "resnet200x2": "imagenet", "vit_base_patch16": "auto"}


def census(arch: str, stem: str, image_size: int = 224, proj_hidden: int = 4096, proj_dim: int = 256) -> dict:
    """What a step communicates and computes, found by instantiating the BYOL model on the meta device: BN channels of
    the online and target networks, online parameters, FLOPs per image."""
    import torch

    from fastbyol.models import BYOL, build_encoder
    from fastbyol.run.perf import flops_per_image

    with torch.device("meta"):
        model = BYOL(build_encoder(arch, stem, image_size), proj_hidden, proj_dim, proj_hidden,
                     image_size=image_size)
    bn = torch.nn.modules.batchnorm._BatchNorm
    online_parts = (model.online_encoder, model.online_projector, model.predictor)
    target_parts = (model.target_encoder, model.target_projector)
    online = [m.num_features for part in online_parts for m in part.modules() if isinstance(m, bn)]
    target = [m.num_features for part in target_parts for m in part.modules() if isinstance(m, bn)]
    layer = (torch.nn.Conv2d, torch.nn.Linear, bn, torch.nn.LayerNorm)
    return {"arch": arch, "online_bn": online, "target_bn": target,
            "online_layers": sum(isinstance(m, layer) for part in online_parts for m in part.modules()),
            "target_layers": sum(isinstance(m, layer) for part in target_parts for m in part.modules()),
            "online_params": sum(p.numel() for p in model.online_parameters()),
            "flops_per_image": flops_per_image(model, image_size)}


def bn_collectives(c: dict, design: str, world: int) -> tuple[int, list[int]]:
    """(collectives a step, bytes of each) of the cross-replica BN in one pass of the step (one micro-batch)."""
    if design == "before":  # each view its own pass: online forward, target forward, online backward; the table
        layers = 2 * c["online_bn"] + 2 * c["target_bn"] + 2 * c["online_bn"]
        return len(layers), [world * (2 * ch + 1) * 4 for ch in layers]
    layers = c["online_bn"] + c["target_bn"] + c["online_bn"]  # both views in each collective, float64 sums
    return len(layers), [2 * (2 * ch + 1) * 8 for ch in layers]


def check_rule(measured: list[dict]) -> list[dict]:
    """The counting rule against the profiler's counts of the default preset's model (resnet-tiny, 28 px)."""
    if not measured:
        return []
    c = census("resnet-tiny", "small-s2", 28, 1024, 256)
    checks = []
    for run in measured:
        design = run.get("label")
        for row in run["rows"]:
            count, sizes = bn_collectives(c, design, row["procs"])
            got = row["per_step"].get("batchnorm", {"count": 0, "bytes": 0})
            checks.append({"design": design, "procs": row["procs"], "rule_count": count, "measured_count": got[
                "count"], "rule_bytes": sum(sizes), "measured_bytes": got["bytes"],
                "agrees": count == got["count"] and sum(sizes) == got["bytes"]})
    return checks


def latency_s(gpus: int) -> float:
    if gpus <= GPUS_PER_NODE:
        return LATENCY_INTRA_US * 1e-6
    return (LATENCY_INTER_US + LATENCY_PER_DOUBLING_US * math.log2(gpus / GPUS_PER_NODE)) * 1e-6


def all_reduce_s(nbytes: float, gpus: int) -> float:
    """One all-reduce of `nbytes` on `gpus` GPUs (ring bandwidth term + latency); 0 on one GPU."""
    if gpus == 1:
        return 0.0
    bus = (NVLINK_BUS_GBPS if gpus <= GPUS_PER_NODE else IB_BUS_GBPS) * 1e9
    return latency_s(gpus) + 2 * (gpus - 1) / gpus * nbytes / bus


def step_time(c: dict, design: str, gpus: int, grad_bytes_per_param: int = 4, bn_group: int = 0) -> dict:
    """Seconds of one step on `gpus` GPUs at the global batch: compute, BN, exposed gradient all-reduce.
    grad_bytes_per_param 2: `--grad-reduce bf16`; bn_group: `--bn-group` (BN collectives inside blocks of ranks)."""
    batch = GLOBAL_BATCH // gpus
    micro = min(batch, MICRO_BATCH)
    passes = batch // micro
    compute = passes * compute_s(c, design, micro)
    bn_gpus = min(gpus, bn_group or gpus)
    count, sizes = bn_collectives(c, design, bn_gpus)
    bn = passes * sum(all_reduce_s(s, bn_gpus) for s in sizes) if bn_gpus > 1 else 0.0
    grad_bytes = c["online_params"] * grad_bytes_per_param
    buckets = max(1, math.ceil(grad_bytes / BUCKET_BYTES))
    grad = sum(all_reduce_s(grad_bytes / buckets, gpus) for _ in range(buckets))
    if design == "after" or not c["online_bn"]:  # DDP's overlap with the last micro-batch's backward
        backward = 0.5 * compute / passes
        grad = max(grad - backward, grad / buckets) if gpus > 1 else 0.0
    return {"batch_per_gpu": batch, "compute_s": compute, "bn_s": bn, "grad_s": grad,
            "bn_collectives": passes * count if gpus > 1 else 0, "step_s": compute + bn + grad}


def launches(c: dict, design: str) -> int:
    """Kernels a pass of the step launches: one a layer and pass forward, two backward (see the docstring)."""
    views = 2 if design == "before" else 1  # passes per network: one per view, or both views in one
    return views * (c["online_layers"] + c["target_layers"] + 2 * c["online_layers"])


def compute_s(c: dict, design: str, batch: int) -> float:
    """Seconds of computation of one pass of `batch` images (two views each) on one GPU."""
    return batch * c["flops_per_image"] / (PEAK_FLOPS * ANCHOR_MFU) + launches(c, design) * KERNEL_FLOOR_US * 1e-6


def table(censuses: list[dict]) -> list[dict]:
    rows = []
    for c in censuses:
        for design in ("before", "after"):
            one_gpu = MICRO_BATCH / compute_s(c, design, MICRO_BATCH)  # img/s at batch 256 on one GPU
            for gpus in GPUS:
                t = step_time(c, design, gpus)
                rate = t["batch_per_gpu"] / t["step_s"]
                rows.append({"model": c["arch"], "design": design, "gpus": gpus,
                             "batch_per_gpu": t["batch_per_gpu"], "img_s_per_gpu": round(rate, 1),
                             "efficiency": round(rate / one_gpu, 3), "bn_collectives": t["bn_collectives"],
                             "bn_ms": round(1e3 * t["bn_s"], 2), "grad_exposed_ms": round(1e3 * t["grad_s"], 2),
                             "compute_ms": round(1e3 * t["compute_s"], 2)})
    return rows


OPTIONS = {"after, --grad-reduce bf16": dict(grad_bytes_per_param=2), "after, --bn-group 8": dict(bn_group=8),
           "after, both": dict(grad_bytes_per_param=2, bn_group=8)}


def options_markdown(censuses: list[dict]) -> str:
    """The large-cluster options (after): efficiency at 16-256 GPUs, to read against the 'after' rows."""
    gpus = [g for g in GPUS if g >= 16]
    lines = ["| model | options | " + " | ".join(f"{g} GPU" for g in gpus) + " |", "|---|---|" + "---|" * len(gpus)]
    for c in censuses:
        one_gpu = MICRO_BATCH / compute_s(c, "after", MICRO_BATCH)
        for name, kw in OPTIONS.items():
            cells = []
            for g in gpus:
                t = step_time(c, "after", g, **kw)
                cells.append(f"{100 * t['batch_per_gpu'] / t['step_s'] / one_gpu:.0f} %")
            lines.append(f"| {c['arch']} | {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown(rows: list[dict]) -> str:
    lines = ["| model | design | " + " | ".join(f"{g} GPU" for g in GPUS) + " |",
             "|---|---|" + "---|" * len(GPUS)]
    for model in dict.fromkeys(r["model"] for r in rows):
        for design in ("before", "after"):
            cells = [r for r in rows if r["model"] == model and r["design"] == design]
            lines.append(f"| {model} | {design} | " + " | ".join(
                f"{r['img_s_per_gpu']:,.0f} ({100 * r['efficiency']:.0f} %)" for r in cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", action="store_true", help='print {"rows": [...]} only')
    ap.add_argument("--measured", nargs="*", default=None,
                    help="step_collectives.py JSON files (labelled before / after) to check the counting rule "
                         "against (default: the newest in benchmarks/results/)")
    ap.add_argument("--out", default=None, help="JSON file to write: every row's figures and the assumptions")
    args = ap.parse_args(argv)
    files = args.measured if args.measured is not None else _newest_measured()
    checks = check_rule([json.loads(Path(f).read_text()) for f in files])
    censuses = [census(arch, stem) for arch, stem in MODELS.items()]
    rows = table(censuses)
    if args.out:
        assumptions = {"global_batch": GLOBAL_BATCH, "peak_flops": PEAK_FLOPS, "anchor_mfu": ANCHOR_MFU,
                       "kernel_floor_us": KERNEL_FLOOR_US, "nvlink_bus_gbps": NVLINK_BUS_GBPS,
                       "ib_bus_gbps": IB_BUS_GBPS,
                       "latency_us": [LATENCY_INTRA_US, LATENCY_INTER_US, LATENCY_PER_DOUBLING_US]}
        Path(args.out).write_text(json.dumps({"rows": rows, "assumptions": assumptions}, indent=1) + "\n")
    if args.json:
        print(json.dumps({"rows": [{k: r[k] for k in ("model", "design", "gpus", "batch_per_gpu", "img_s_per_gpu",
                                                         "efficiency")} for r in rows]}))
        return 0
    for c in censuses:
        print(f"{c['arch']}: {len(c['online_bn'])} online + {len(c['target_bn'])} target BN layers, "
              f"{c['online_params'] / 1e6:.1f}M online parameters, {c['flops_per_image'] / 1e9:.1f} GFLOP an image")
    for check in checks:
        print(f"rule vs profiler, {check['design']}, {check['procs']} processes: {check['rule_count']} vs "
              f"{check['measured_count']:g} BN collectives, {check['rule_bytes']} vs {check['measured_bytes']:g} "
              f"bytes: {'agrees' if check['agrees'] else 'DIFFERS'}")
    print(markdown(rows))
    print()
    print(options_markdown(censuses))
    return 0 if all(c["agrees"] for c in checks) else 1


def _newest_measured() -> list[str]:
    results = Path(__file__).resolve().parent / "results"
    return [str(sorted(results.glob(f"*-step-collectives-{label}.json"))[-1])
            for label in ("before", "after") if list(results.glob(f"*-step-collectives-{label}.json"))]


if __name__ == "__main__":
    sys.exit(main())
