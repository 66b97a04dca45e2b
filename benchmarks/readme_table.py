"""Regenerate the performance block of README.md from the newest report in benchmarks/results/ (a GPU plan's merged
report, benchmarks/gpu_plan.md, or an ops report of benchmarks/gpu_report.py).

    python benchmarks/readme_table.py          # rewrites the block between the perf-table markers

The numbers are never typed by hand: they come from the JSON a real run wrote (benchmarks/gpu_report.py).
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
START, END = "<!-- perf-table:start -->", "<!-- perf-table:end -->"


def latest_report(results: Path) -> Path:
    """The newest GPU report: files are named DATE-DEVICE-ops*.json or DATE-DEVICE-report*.json (sorted by name;
    names with 'before' are kept for the record, not for the README)."""
    reports = sorted(p for p in results.glob("*.json") if "-ops" in p.stem or "-report" in p.stem)
    reports = [p for p in reports if "before" not in p.stem]  # kept for the record, not for the README
    if not reports:
        raise SystemExit(f"no *-ops.json or *-report.json under {results}")
    return reports[-1]


def goals(report: dict) -> list[dict]:
    """The GPU goals beside the figures of a (merged GPU plan) report: ResNet-50, 224 px, batch 256, bf16."""
    rows = {(r.get("arch"), r.get("variant"), r.get("compile"), r.get("source")): r
            for r in report.get("step", []) if "img_per_s" in r}
    ours = [r for (arch, v, _, src), r in rows.items() if arch == "resnet50" and v == "fastbyol" and src == "synthetic"]
    best = max(ours, key=lambda r: r["img_per_s"], default=None)
    peer = {v: r for (arch, v, _, src), r in rows.items() if arch == "resnet50" and v in ("byol-pytorch", "lightly")}
    train = report.get("train") or {}
    jpeg = [r for r in report.get("augment", []) if r.get("source") == "jpeg" and r.get("size") == 224]
    best_jpeg = max(jpeg, key=lambda r: r["samples_per_s"], default=None)  # the faster decode mode (roi / once)

    def ratio(a, b):
        return None if a is None or b is None else a / b

    best_ips = best["img_per_s"] if best else None
    out = [
        {"goal": "BYOL img/s, ResNet-50 224 px bf16, one GPU", "target": ">= 3000",
         "measured": best_ips, "met": best_ips is not None and best_ips >= 3000,
         "note": best and f"{best['compile']} compile, MFU {100 * (best['mfu'] or 0):.1f}%"},
        {"goal": "MFU of that step", "target": ">= 20%", "measured": best and best["mfu"],
         "met": bool(best and best["mfu"] and best["mfu"] >= 0.20), "note": None},
        {"goal": "fed by DALI from JPEGs (fastbyol train) / device-resident", "target": ">= 0.95",
         "measured": ratio(train.get("img_per_s"), best_ips),
         "met": (ratio(train.get("img_per_s"), best_ips) or 0) >= 0.95, "note": "train's img/s over the best step row"},
        {"goal": "x byol-pytorch's img/s (same card, same run)", "target": ">= 3",
         "measured": ratio(best_ips, peer.get("byol-pytorch", {}).get("img_per_s")),
         "met": (ratio(best_ips, peer.get("byol-pytorch", {}).get("img_per_s")) or 0) >= 3, "note": None},
        {"goal": "x lightly's img/s (same card, same run)", "target": "> 1",
         "measured": ratio(best_ips, peer.get("lightly", {}).get("img_per_s")),
         "met": (ratio(best_ips, peer.get("lightly", {}).get("img_per_s")) or 0) > 1, "note": None},
        {"goal": "DALI two-view samples/s, 224 px JPEG", "target": ">= 6000",
         "measured": best_jpeg["samples_per_s"] if best_jpeg else None,
         "met": bool(best_jpeg) and best_jpeg["samples_per_s"] >= 6000,
         "note": best_jpeg.get("images") if best_jpeg else None},
    ]
    return out


def _fmt(x) -> str:
    if x is None:
        return "not measured"
    return f"{x:.2f}" if x < 10 else f"{x:.0f}"


_SHORT_DTYPES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}


def table(report: dict, name: str) -> str:
    """The README's performance block: goals (when the report has step rows), the training step (ours, plain, the
    peers), the DALI-fed training run, the augmentation pipeline, then the ops (loss, EMA, LARS). Sections the
    report lacks are left out."""
    v = report.get("versions", {})
    c = report.get("ceilings")
    dtype = str(c.get("matmul_dtype", "torch.bfloat16")).replace("torch.", "") if c else ""
    ceil = (f" Medians; ceilings measured in the same run: copy {c['copy_GBps']:.0f} GB/s, "
            f"{_SHORT_DTYPES.get(dtype, dtype)} matmul {c['matmul_TFLOPs']:.0f} TFLOP/s." if c else "")
    versions = ", ".join(f"{label} {v[key]}" for key, label in (("torch", "torch"), ("triton", "triton"),
                                                                 ("dali", "DALI")) if v.get(key))  # only what ran
    what = "Measured" if report.get("step") or report.get("train") or report.get("augment") else "Ops"
    lines = [f"{what} on {report['device']} ({name}, commit {report['commit']}, {report['date']}"
             f"{'; ' + versions if versions else ''}).{ceil}"]
    if report.get("step") and any(r.get("arch") == "resnet50" for r in report["step"]):
        lines += ["", "| goal | target | measured | met |", "|---|---|---|---|"]
        lines += [f"| {g['goal']} | {g['target']} | {_fmt(g['measured'])} | {'yes' if g['met'] else 'no'} |"
                  for g in goals(report)]
    if report.get("step"):
        lines += ["", "| BYOL step | px | batch | compile | input | img/s | step ms | MFU |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in report["step"]:
            head = f"| {r['arch']} {r['variant']} | {r['size']} | {r['batch']} | {r['compile']} | {r['source']} |"
            if "error" in r:
                lines.append(f"{head} failed: {r['error'][:80]} | | |")
            else:
                mfu = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
                lines.append(f"{head} {r['img_per_s']:.0f} | {r['step_ms']:.1f} | {mfu} |")
    t = report.get("train")
    if t and "img_per_s" in t:
        lines += ["", f"`fastbyol train` fed by DALI from {t.get('images')} ImageNet-like JPEGs: {t['img_per_s']:.0f} "
                      f"img/s, {100 * t['data_wait_share']:.1f}% of the time waiting for data, over {t['steps']} "
                      "steps."]
    if report.get("dali"):
        d = report["dali"]
        lines += ["", f"DALI alone: {d['samples_per_s']:.0f} two-view samples/s ({d['source']} -> {d['size']} px, "
                      f"batch {d['batch']}, on {d['device']})."]
    for d in report.get("augment", []):
        lines += ["", f"Augmentation pipeline: {d['samples_per_s']:.0f} two-view samples/s ({d['source']} -> "
                      f"{d['size']} px, batch {d['batch']}, DALI on {d['device']})."]
    if report.get("loss"):
        lines += ["", "| op | size | fastbyol | eager reference | compiled reference | x eager | x compiled |",
                  "|---|---|---|---|---|---|---|"]
        by = {(r["B"], r["dtype"], r["variant"]): r for r in report["loss"]}
        for (B, dtype, variant), r in by.items():
            if variant.startswith("fastbyol"):
                label = f"{variant.split()[-1]} fwd+bwd"
            elif variant.startswith("compiled fastbyol"):  # our op inside a torch.compile'd graph, in one op form
                label = f"byol_loss_symmetric fwd+bwd, compiled as {variant.rsplit('(', 1)[-1].rstrip(')')}"
            else:
                continue
            suffix = ", symmetric" if "symmetric" in variant else ""
            eager, comp = by[(B, dtype, "eager reference" + suffix)], by[(B, dtype, "compiled reference" + suffix)]
            lines.append(f"| {label} | B={B} D={r['D']} {dtype} | {r['ms']:.3f} ms | "
                         f"{eager['ms']:.3f} ms | {comp['ms']:.3f} ms | {r['speedup_vs_eager']:.1f} | "
                         f"{r['speedup_vs_compiled']:.1f} |")
    if report.get("ema"):
        lines += ["", "| EMA variant | tensors / elements | ms | GB/s | of copy | x per-parameter loop |",
                  "|---|---|---|---|---|---|"]
        for r in report["ema"]:
            lines.append(f"| {r['variant']} | {r['tensors']} / {r['elements'] / 1e6:.1f}M | {r['ms']:.3f} | "
                         f"{r['GBps']:.0f} | {100 * r['fraction_of_copy']:.0f}% | {r['speedup_vs_loop']:.1f} |")
    if report.get("lars"):
        lines += ["", "| LARS step | tensors / elements | ms | x per-parameter loop | kernels per step |",
                  "|---|---|---|---|---|"]
        lines += [f"| {r['variant']} | {r['tensors']} / {r['elements'] / 1e6:.1f}M | {r['ms']:.3f} | "
                  f"{r['speedup_vs_loop']:.1f} | {r.get('kernels_per_step') or 'n/a'} |" for r in report["lars"]]
    return "\n".join(lines)


def regenerated(text: str, root: Path = ROOT) -> tuple[str, str]:
    """(README text with its performance block made from the newest report under root/benchmarks/results, that
    report's name)."""
    path = latest_report(root / "benchmarks" / "results")
    report = json.loads(path.read_text())
    if START not in text or END not in text:
        raise SystemExit("README.md has no perf-table markers")
    block = f"{START}\n{table(report, path.name)}\n\n(generated by `python benchmarks/readme_table.py`)\n{END}"
    return re.sub(re.escape(START) + ".*?" + re.escape(END), lambda _: block, text, flags=re.S), path.name


def main() -> int:
    readme = ROOT / "README.md"
    text, name = regenerated(readme.read_text())
    readme.write_text(text)
    print(f"README.md table from {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
