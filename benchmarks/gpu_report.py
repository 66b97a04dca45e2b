"""One-command performance report: ceilings, the fused loss, the single-launch EMA, DALI and the BYOL step; and the
report writer of the GPU plan (benchmarks/gpu_plan.py merges its calls into this format and renders it with
`markdown`).

    python benchmarks/gpu_report.py --out DIR            # on a GPU: full sizes, compiled Triton kernels
    python benchmarks/gpu_report.py --out DIR --tiny     # anywhere: tiny sizes (CPU: reference / interpreter)

Writes DIR/report.json and DIR/report.md (device, versions, sizes, git commit, every figure). Timings are medians:
triton.testing.do_bench (CUDA events) on a GPU, perf_counter around synchronized calls on a CPU. Sections:
- ceilings: device-to-device copy GB/s (bytes read + written), bf16 matmul TFLOP/s;
- loss: fused forward+backward against the eager and the torch.compile'd reference, B in {256, 4096}, D = 256; and
  ours compiled in each torch.library form (custom_op, and triton_op on CUDA: the FASTBYOL_OP_FORM choice);
- EMA over the ResNet-50 + BYOL heads parameter list: per-parameter loop, torch._foreach_lerp_, one lerp_ over a
  flat buffer, and ema_update_ (float tau and 0-D tensor tau), as GB/s against the copy ceiling;
- lars: one LARS step over the online parameters, foreach ops against the per-parameter loop (median ms, CUDA-graph
  replay ms, and the kernels one step launches, counted by torch.profiler);
- dali: two-view samples/s of the DALI pipeline alone from synthetic JPEGs at 224 px, batch 256, GPU decode (when
  DALI is importable);
- step: BYOL img/s, step time, MFU and warm-up (compilation) time of our training step (channels_last, bf16
  autocast, fused ops; eager, torch.compile default and reduce-overhead = CUDA graphs) beside a plain PyTorch step
  (NCHW fp32, eager loss, per-parameter EMA loop): ResNet-50 at 224 px batch 256 on device-resident synthetic views
  and fed by the DALI pipeline, and ResNet-18 at 32 px batch 512; peak memory per row on CUDA.
Results of real GPU runs are committed under benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from fastbyol.kernels import byol_loss, byol_loss_symmetric, ema_update_, kernel_backend, set_op_form
from fastbyol.kernels.loss import HAS_TRITON_OP
from fastbyol.models import BYOL, build_encoder
from fastbyol.reference import byol_loss_reference, byol_loss_symmetric_reference, ema_update_reference_
from fastbyol.run.perf import library_versions


SECTIONS = ("loss", "ema", "lars", "dali", "step")
# torch.compile's backend for the compiled rows: 'eager' in the GPU plan's CPU dry run (graph capture without code
# generation, which takes minutes on a 2-core CPU)
COMPILE_BACKEND = "inductor"


def bench_ms(fn, device: torch.device, reps: int = 50) -> float:
    """Median milliseconds of fn()."""
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median"))
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def graph_ms(fn, device: torch.device) -> float | None:
    """Median ms of fn captured in a CUDA graph and replayed: device time without host launch overhead."""
    if device.type != "cuda":
        return None
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            fn()
    except RuntimeError as e:  # not capturable (a host sync inside): recorded as no figure
        print(f"graph capture failed: {str(e).splitlines()[0][:200]}", flush=True)
        return None
    return bench_ms(graph.replay, device)


def cuda_kernels(fn, device: torch.device) -> int | None:
    """Device kernels (and copies) one call of fn launches, counted by torch.profiler on CUDA; None elsewhere."""
    if device.type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def git_commit() -> str:
    if os.environ.get("FASTBYOL_COMMIT"):
        return os.environ["FASTBYOL_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def ceilings(device, tiny: bool) -> dict:
    n = (1 << 16) if tiny else (1 << 28)  # fp32 elements: 1 GiB on a GPU
    a = torch.randn(n, device=device)
    b = torch.empty_like(a)
    ms = bench_ms(lambda: b.copy_(a), device)
    copy_gbs = 2 * a.numel() * 4 / ms / 1e6
    m = 256 if tiny else 8192
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    x, y = torch.randn(m, m, device=device, dtype=dtype), torch.randn(m, m, device=device, dtype=dtype)
    ms_mm = bench_ms(lambda: x @ y, device, reps=10)
    return {"copy_bytes": 2 * n * 4, "copy_ms": ms, "copy_GBps": copy_gbs, "matmul_n": m, "matmul_dtype": str(dtype),
            "matmul_ms": ms_mm, "matmul_TFLOPs": 2 * m**3 / ms_mm / 1e9}


def loss_section(device, tiny: bool, batch_sizes: tuple | None = None, dtypes: tuple | None = None) -> list[dict]:
    """Fused loss forward + backward against the eager and compiled references, and ours compiled in each op form;
    batch_sizes / dtypes narrow the sweep (default: (64, 256) tiny, (256, 4096) else; bf16 and fp32 on CUDA)."""
    rows = []
    if dtypes is None:
        dtypes = (torch.bfloat16, torch.float32) if device.type == "cuda" else (torch.float32,)
    compiled_ref = torch.compile(byol_loss_reference, backend=COMPILE_BACKEND)
    compiled_sym = torch.compile(byol_loss_symmetric_reference, backend=COMPILE_BACKEND)
    for B in batch_sizes or ((64, 256) if tiny else (256, 4096)):
        D = 256
        for dtype in dtypes:
            p1, p2, z1, z2 = (torch.randn(B, D, device=device, dtype=dtype, requires_grad=i < 2) for i in range(4))

            def run(f, sym):
                def go():
                    p1.grad = p2.grad = None
                    loss = f(p1, p2, z1, z2) if sym else f(p1, z1)
                    loss.backward()
                return go

            variants = {
                "eager reference": (byol_loss_reference, False),
                "compiled reference": (compiled_ref, False),
                "fastbyol byol_loss": (byol_loss, False),
                "eager reference, symmetric": (byol_loss_symmetric_reference, True),
                "compiled reference, symmetric": (compiled_sym, True),
                "fastbyol byol_loss_symmetric": (byol_loss_symmetric, True),
            }
            times = {name: bench_ms(run(f, sym), device) for name, (f, sym) in variants.items()}
            # our op inside a compiled graph, in each torch.library form (triton_op: Triton on CUDA only)
            for style in ("custom_op", "triton_op") if device.type == "cuda" and HAS_TRITON_OP else ("custom_op",):
                set_op_form(style)
                torch._dynamo.reset()
                compiled_ours = torch.compile(lambda a, b, c, d: byol_loss_symmetric(a, b, c, d),
                                              backend=COMPILE_BACKEND)
                try:
                    times[f"compiled fastbyol, symmetric ({style})"] = bench_ms(run(compiled_ours, True), device)
                finally:
                    set_op_form("custom_op")
            s = p1.element_size()
            for name, ms in times.items():
                pairs = 2 if "symmetric" in name else 1
                # fewest bytes of fwd+bwd: read p, z; write dL/dp; backward reads it and writes the scaled copy
                rows.append({"B": B, "D": D, "dtype": str(dtype).replace("torch.", ""), "variant": name, "ms": ms,
                             "min_bytes": 5 * pairs * B * D * s,
                             "speedup_vs_eager": times["eager reference" + (", symmetric" if pairs == 2 else "")] / ms,
                             "speedup_vs_compiled": times["compiled reference" + (", symmetric" if pairs == 2 else "")]
                             / ms})
    return rows


def ema_section(device, tiny: bool, copy_gbps: float) -> list[dict]:
    if tiny:
        model = BYOL(build_encoder("resnet-tiny", stem="small-s2", image_size=28), 256, 64, 256)
    else:
        model = BYOL(build_encoder("resnet50", image_size=224))
    model = model.to(device)
    target, online = model.ema_pairs()
    n = sum(t.numel() for t in target)
    flat_t = torch.cat([t.detach().flatten() for t in target])
    flat_o = torch.cat([o.detach().flatten() for o in online])
    tau_t = torch.tensor(0.996, device=device)
    variants = {
        "per-parameter loop (reference)": lambda: ema_update_reference_(target, online, 0.996),
        "torch._foreach_lerp_": lambda: torch._foreach_lerp_(target, online, 0.004),
        "flat buffer lerp_ (1 launch)": lambda: flat_t.lerp_(flat_o, 0.004),
        "fastbyol ema_update_ (float tau)": lambda: ema_update_(target, online, 0.996),
        "fastbyol ema_update_ (tensor tau)": lambda: ema_update_(target, online, tau_t),
    }
    rows = []
    with torch.no_grad():
        times = {name: bench_ms(f, device) for name, f in variants.items()}
        graph_times = {name: graph_ms(f, device) for name, f in variants.items()}
    for name, ms in times.items():
        gbps = 3 * n * 4 / ms / 1e6
        g_ms = graph_times[name]
        rows.append({"tensors": len(target), "elements": n, "variant": name, "ms": ms, "GBps": gbps,
                     "fraction_of_copy": gbps / copy_gbps,
                     "speedup_vs_loop": times["per-parameter loop (reference)"] / ms,
                     "graph_ms": g_ms, "graph_GBps": None if g_ms is None else 3 * n * 4 / g_ms / 1e6})
    return rows


def lars_section(device, tiny: bool) -> list[dict]:
    """One LARS step over the online parameters (ResNet-50 + BYOL heads on a GPU): foreach ops against the
    reference per-parameter loop."""
    from fastbyol.optim import LARS

    if tiny:
        model = BYOL(build_encoder("resnet-tiny", stem="small-s2", image_size=28), 256, 64, 256)
    else:
        model = BYOL(build_encoder("resnet50", image_size=224))
    model = model.to(device=device, memory_format=torch.channels_last)
    rows = []
    for variant in ("per-parameter loop (reference)", "foreach (fastbyol LARS)"):
        params = [torch.nn.Parameter(p.detach().clone()) for p in model.online_parameters()]
        for p in params:
            p.grad = torch.randn_like(p)
        opt = LARS(params, lr=0.1, weight_decay=1e-6, foreach=variant.startswith("foreach"))
        rows.append({"variant": variant, "tensors": len(params), "elements": sum(p.numel() for p in params),
                     "ms": bench_ms(opt.step, device, reps=5 if tiny else 50), "graph_ms": graph_ms(opt.step, device),
                     "kernels_per_step": cuda_kernels(opt.step, device)})
    for r in rows:
        r["speedup_vs_loop"] = rows[0]["ms"] / r["ms"]
    print("lars", rows, flush=True)
    return rows


def _dali_ok() -> bool:
    from fastbyol.augment import dali_available

    return dali_available()


def dali_section(device, tiny: bool) -> dict | None:
    """Two-view samples/s of the DALI pipeline alone, from synthetic JPEGs (GPU decode on CUDA); None without DALI."""
    if not _dali_ok():
        print("dali: not importable, section skipped", flush=True)
        return None
    from fastbyol.tools.bench_augment import AugmentBenchSettings, bench_augment

    if tiny:
        r = bench_augment(AugmentBenchSettings(28, 32, "cpu", "jpeg", steps=3))
    else:
        r = bench_augment(AugmentBenchSettings(224, 256, "gpu", "jpeg", steps=20))
    print("dali", r, flush=True)
    return r


# (variant, compile mode, input) per case; GPU cases: the compile mode is chosen from these rows
STEP_RUNS_GPU = [("plain", "off", "synthetic"), ("fastbyol", "off", "synthetic"), ("fastbyol", "default", "synthetic"),
                 ("fastbyol", "reduce-overhead", "synthetic"), ("fastbyol", "default", "dali")]
STEP_RUNS_TINY = [("plain", "off", "synthetic"), ("fastbyol", "off", "synthetic"), ("fastbyol", "default", "synthetic"),
                  ("fastbyol", "off", "dali")]


def step_section(device, tiny: bool) -> list[dict]:
    """BYOL img/s and MFU of our training step (eager, compiled, fed by DALI) against the plain PyTorch step, same
    model and batch. A row that fails records its error and the report goes on."""
    from fastbyol.tools.bench_step import StepCase, bench_step

    if tiny:
        cases = [(dict(arch="resnet-tiny", size=28, batch=32, proj_hidden=256, stem="small-s2", steps=3),
                  STEP_RUNS_TINY)]
    else:
        cases = [(dict(arch="resnet50", size=224, batch=256, proj_hidden=4096, stem="auto", steps=10), STEP_RUNS_GPU),
                 (dict(arch="resnet18", size=32, batch=512, proj_hidden=4096, stem="auto", steps=20),
                  [r for r in STEP_RUNS_GPU if r[2] == "synthetic"])]
    rows = []
    for case, runs in cases:
        for variant, mode, source in runs:
            if source == "dali" and not _dali_ok():
                continue
            try:
                row = bench_step(StepCase(case["arch"], case["size"], case["batch"], variant,
                                          proj_hidden=case["proj_hidden"], stem=case["stem"], compile=mode,
                                          source=source), steps=case["steps"], device=str(device))
            except Exception as e:  # noqa: BLE001 (one failed row must not lose the rest of the report)
                row = dict(arch=case["arch"], size=case["size"], batch=case["batch"], variant=variant, compile=mode,
                           source=source, error=f"{type(e).__name__}: {str(e).splitlines()[0][:300]}")
            rows.append(row)
            print("step", row, flush=True)
            torch._dynamo.reset()  # each compiled row starts from its own compilation
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


def markdown(report: dict) -> str:
    """report.md: every section the report has (a GPU plan's merged report has more than this script writes)."""
    lines = [f"# fastbyol performance report: {report['device']}", "",
             f"commit `{report['commit']}`, {report['date']}, versions {report['versions']}, "
             f"kernel backend `{report.get('kernel_backend')}`"]
    c = report.get("ceilings")
    if c:
        lines += ["", f"Ceilings: copy {c['copy_GBps']:.0f} GB/s ({c['copy_bytes'] / 1e9:.2f} GB moved), "
                      f"{c['matmul_dtype']} matmul {c['matmul_n']}^3 {c['matmul_TFLOPs']:.1f} TFLOP/s"]
    if report.get("plan"):
        lines += ["", "## Plan items", "", "| call | item | status | s | note |", "|---|---|---|---|---|"]
        lines += [f"| {e['call']} | {e['name']} | {e['status']} | {e.get('seconds') or ''} | "
                  f"{(e.get('reason') or e.get('error') or '')[:160]} |" for e in report["plan"]]
    if report.get("loss"):
        lines += ["", "## Loss, forward + backward (median ms)", "",
                  "| B | D | dtype | variant | ms | x eager | x compiled |", "|---|---|---|---|---|---|---|"]
        for r in report["loss"]:
            lines.append(f"| {r['B']} | {r['D']} | {r['dtype']} | {r['variant']} | {r['ms']:.4f} | "
                         f"{r['speedup_vs_eager']:.2f} | {r['speedup_vs_compiled']:.2f} |")
    if report.get("ema"):
        e0 = report["ema"][0]
        lines += ["", f"## EMA over {e0['tensors']} tensors, {e0['elements'] / 1e6:.1f}M fp32 elements (median ms)",
                  "", "| variant | ms | GB/s | of copy | x loop | CUDA graph ms | graph GB/s |",
                  "|---|---|---|---|---|---|---|"]
        for r in report["ema"]:
            g = "n/a | n/a" if r["graph_ms"] is None else f"{r['graph_ms']:.4f} | {r['graph_GBps']:.0f}"
            lines.append(f"| {r['variant']} | {r['ms']:.4f} | {r['GBps']:.0f} | {100 * r['fraction_of_copy']:.0f}% | "
                         f"{r['speedup_vs_loop']:.1f} | {g} |")
    rows = report.get("lars", [])
    if rows:
        lines += ["", f"## LARS step over {rows[0]['tensors']} online tensors, {rows[0]['elements'] / 1e6:.1f}M "
                      "elements (median ms)", "", "| variant | ms | x loop | CUDA graph ms | kernels per step |",
                  "|---|---|---|---|---|"]
        lines += [f"| {r['variant']} | {r['ms']:.3f} | {r['speedup_vs_loop']:.1f} | {_num(r.get('graph_ms'), 3)} | "
                  f"{_num(r.get('kernels_per_step'), 0)} |" for r in rows]
    if "dali" in report and not isinstance(report["dali"], list):
        d = report["dali"]
        lines += ["", "## DALI two-view augmentation alone", ""]
        lines.append("DALI not importable: no figures" if d is None else
                     f"{d['samples_per_s']:.0f} two-view samples/s: {d['source']} -> {d['size']} px, batch "
                     f"{d['batch']}, DALI on {d['device']} ({d['threads']} threads)")
    if report.get("augment"):
        lines += ["", "## Augmentation pipeline (DALI + photometric chain), two-view samples/s", "",
                  "| source | decode | px | batch | DALI on | samples/s (median interval) | samples/s (mean) | images |",
                  "|---|---|---|---|---|---|---|---|"]
        lines += [f"| {r['source']} | {r.get('decode', '')} | {r['size']} | {r['batch']} | {r['device']} | "
                  f"{r['samples_per_s']:.0f} | "
                  f"{_num(r.get('samples_per_s_mean'), 0)} | {r.get('images', 'synthetic')} |"
                  for r in report["augment"]]
    if report.get("step"):
        lines += ["", "## BYOL training step", "",
                  "| arch | px | batch | step | compile | input | img/s | step ms | GFLOP/img | MFU | warm-up s | "
                  "peak GB |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in report.get("step", []):
        head = f"| {r['arch']} | {r['size']} | {r['batch']} | {r['variant']} | {r['compile']} | {r['source']} |"
        if "error" in r:
            lines.append(f"{head} failed: {r['error'][:200]} | | | | | |")
            continue
        mfu = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        lines.append(f"{head} {r['img_per_s']:.0f} | {r['step_ms']:.1f} | {r['flops_per_image'] / 1e9:.2f} | {mfu} | "
                     f"{r['warmup_seconds']:.1f} | {_num(r.get('peak_memory_gb'), 1)} |")
    notes = {r["variant"]: r["runs"] for r in report.get("step", []) if r.get("runs")}
    if notes:
        lines += ["", "What the peers' rows run:", ""] + [f"- {k}: {v}" for k, v in notes.items()]
    if report.get("photometric"):
        lines += ["", "## Photometric chain alone (both views)", "",
                  "| px | batch | backend | ms per batch | images/s |", "|---|---|---|---|---|"]
        for r in report["photometric"]:
            if "ms_per_batch" in r:
                lines.append(f"| {r['size']} | {r['batch']} | {r['backend']} | {r['ms_per_batch']:.2f} | "
                             f"{r['images_per_s']:.0f} |")
            else:
                lines.append(f"| {r.get('size')} | {r.get('batch', '')} | {r.get('backend')} | "
                             f"{r.get('error') or r.get('skipped')} | |")
    t = report.get("train")
    if t:
        mfu = "n/a" if t.get("mfu") is None else f"{100 * t['mfu']:.1f}%"
        lines += ["", "## fastbyol train (DALI-fed)", "",
                  f"`{t['command']}`: {t['img_per_s']:.0f} img/s over {t['steps']} steps ({t['epochs']} epochs of "
                  f"{t['images']} images), step {t['step_ms']:.1f} ms, data-wait share "
                  f"{100 * t['data_wait_share']:.1f}%, MFU {mfu}, warm-up {t['warmup_seconds']:.1f} s, peak memory "
                  f"{_num(t.get('peak_memory_gb'), 1)} GB, compile {t.get('compile')}"]
    return "\n".join(lines) + "\n"


def _num(x, digits: int) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="output folder for report.json and report.md")
    ap.add_argument("--tiny", action="store_true", help="tiny sizes (CPU smoke run)")
    ap.add_argument("--sections", default=",".join(SECTIONS),
                    help=f"comma-separated subset of {','.join(SECTIONS)} (ceilings always run)")
    args = ap.parse_args(argv)
    wanted = {x.strip() for x in args.sections.split(",") if x.strip()}
    if wanted - set(SECTIONS):
        ap.error(f"--sections: unknown {sorted(wanted - set(SECTIONS))}; choose from {','.join(SECTIONS)}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tiny = args.tiny or device.type != "cuda"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "commit": git_commit(), "versions": library_versions(), "tiny": tiny, "kernel_backend": kernel_backend(device),
    }
    print(f"device {report['device']}; kernels {report['kernel_backend']}; tiny={tiny}", flush=True)
    report["ceilings"] = ceilings(device, tiny)
    print("ceilings", report["ceilings"], flush=True)
    report["sections"] = [x for x in SECTIONS if x in wanted]
    if "loss" in wanted:
        report["loss"] = loss_section(device, tiny)
    if "ema" in wanted:
        report["ema"] = ema_section(device, tiny, report["ceilings"]["copy_GBps"])
    if "lars" in wanted:
        report["lars"] = lars_section(device, tiny)
    if "dali" in wanted:
        report["dali"] = dali_section(device, tiny)
    if "step" in wanted:
        report["step"] = step_section(device, tiny)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    md = markdown(report)
    (out / "report.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
