"""Host-side (CPU) time per training step of the optimizer and the EMA bookkeeping, for ResNet-50 + BYOL heads:

    python benchmarks/host_step_time.py [--src TREE ...] [--repeats N] [--out FILE]

Rows, each the median of N calls in microseconds (fewer for the real-tensor LARS rows and the photometric ones):
- `lars_step_meta`: `LARS.step()` over the 171 online parameters on the meta device, so no arithmetic runs and what
  is left is the host's work per step (Python, list building, dispatch of the fixed number of foreach ops): what a
  GPU step pays on the CPU before its kernels are queued.
- `ema_lookup`: finding the EMA's cached launch tables for the 2 x 165 (target, online) tensors (`kernels.ema.pair_tables`,
  what the Triton path runs before its single launch).
- `lars_u_*`: LARS's u = g + wd w over the 57 adapted tensors (34,989,248 fp32 elements, 140 MB) as today (one
  `_foreach_add`, new tensors each step) and into a buffer kept across steps (`_foreach_copy_` + `_foreach_add_`):
  host time on the meta device, wall time on real CPU tensors, and whether the two give the same bits.
- `photometric_*`: the Triton photometric launcher at 256 x 3 x 224 x 224 with its kernels replaced by no-ops: host
  time per call, and the tensors (and bytes) it allocates per call, with fresh buffers and with a kept ScratchBuffers
  (the loader's; only trees that have it). One call per view: two a step.
With --src, each tree (a checkout of the project; its `kernels/` is found as `fastbyol/kernels`) is measured in a
subprocess of its own, in turn, in one run on one machine: before and after a change side by side.

Measured (Intel Xeon Processor, 2 cores shared with other jobs, torch 2.13 CPU, 2026-12-02, median of 200;
benchmarks/results/host_step_time.json): base 5713b7e LARS.step 202 ms, EMA lookup (`ema_plan` there) 46.4 us; with the group lists
built once and the plan found by list identity, 102 ms and 1.1 us. The two trees ran one after the other on a
machine under heavy load (load average ~7 on 2 cores), so the LARS ratio is noisy and not yet explained in full
(the meta device's own dispatch of the same foreach ops is in both); rerun it on a quiet machine before quoting it.

Measured 2026-12-03 (same machine, load average 12-14; base 13c90ce and this tree in one run, --repeats 40;
benchmarks/results/2026-12-03/host_step_time.json):
- photometric launcher per call: 4 tensors / 385.4 MB allocated (base) -> 1 tensor / 77.1 MB (the output alone)
  with the loader's ScratchBuffers; host time 49-58 us -> 40 us (CPU allocator, not CUDA's caching one).
- LARS u: same bits both ways; wall time on CPU tensors 0.85-1.0 s today against 1.56-1.87 s with a kept buffer
  (its extra pass over 140 MB); so today's copy stays. On the meta device today's form costs ~28 ms of host time
  against 0.9 ms, but that is the meta device's: an out-of-place foreach op there runs a per-tensor Python meta
  function (~0.5 ms a tensor; 57 plain `torch.add` calls cost the same), which is also most of `lars_step_meta`.
  On a GPU the difference is 57 caching-allocator blocks (host) against 280 MB more traffic (device).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import time


def median_us_of(fn, repeats: int) -> float:
    """The median of `repeats` timed calls of fn, in microseconds, after one untimed call (lists, workspaces and
    the EMA's tables are built there)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e6 * statistics.median(times)


def measure(repeats: int) -> dict:
    import torch

    from fastbyol.kernels import ema as ema_module
    from fastbyol.models import BYOL, build_encoder
    from fastbyol.optim import LARS

    model = BYOL(build_encoder("resnet50", image_size=224)).to(device="meta", memory_format=torch.channels_last)
    params = list(model.online_parameters())
    for p in params:
        p.grad = torch.empty_like(p)
    opt = LARS(params, lr=0.1, weight_decay=1e-6)
    target, online = model.ema_pairs()

    median_us = functools.partial(median_us_of, repeats=repeats)

    row = {"lars_step_meta": median_us(opt.step), "ema_lookup": median_us(lambda: ema_module.pair_tables(target, online)),
           "parameters": len(params), "ema_tensors": len(target) + len(online)}
    row.update(lars_u(params, median_us, max(5, repeats // 8)))
    row.update(photometric_host(median_us, max(3, repeats // 20)))
    return row


def lars_u(params, median_us, repeats: int) -> dict:
    """LARS's u = g + wd w for the adapted tensors two ways: today's `_foreach_add` (new tensors each step) against
    a buffer kept across steps (`_foreach_copy_` then `_foreach_add_`, one more pass over memory). Host time on the
    meta device; wall time on real CPU float32 tensors (allocation and memory traffic included); and whether the
    two give the same bits."""
    import torch

    from fastbyol.optim import lars_excluded

    ws = [p for p in params if not lars_excluded(p)]
    real_ws = [torch.randn(p.shape) for p in ws]
    real_gs = [torch.randn(p.shape) for p in ws]
    wd = 1.5e-6

    def fresh(gs, ws_):
        return torch._foreach_add(gs, ws_, alpha=wd)

    def kept(buf, gs, ws_):
        torch._foreach_copy_(buf, gs)
        torch._foreach_add_(buf, ws_, alpha=wd)
        return buf

    meta_gs = [p.grad for p in ws]
    meta_buf = [torch.empty_like(p) for p in ws]
    real_buf = [torch.empty_like(w) for w in real_ws]
    same = all(torch.equal(a, b) for a, b in zip(fresh(real_gs, real_ws), kept(real_buf, real_gs, real_ws)))

    cpu_us = functools.partial(median_us_of, repeats=repeats)

    return {"lars_u_fresh_meta": median_us(lambda: fresh(meta_gs, ws)),
            "lars_u_kept_meta": median_us(lambda: kept(meta_buf, meta_gs, ws)),
            "lars_u_fresh_cpu": cpu_us(lambda: fresh(real_gs, real_ws)),
            "lars_u_kept_cpu": cpu_us(lambda: kept(real_buf, real_gs, real_ws)),
            "lars_u_same_bits": same, "lars_u_elements": sum(w.numel() for w in real_ws)}


def photometric_host(median_us, repeats: int) -> dict:
    """The Triton photometric launcher at the headline shape (256 x 3 x 224 x 224, K=23), its four kernel launches
    replaced by no-ops: the host's work per call (checks, launch plan, buffers) and the tensors it allocates
    (counted by a dispatch mode), with fresh buffers each call (no `buffers=`: the base) and with a ScratchBuffers
    kept across calls, as the loader does (where the tree has it). On CPU tensors: the allocation cost measured is
    the CPU allocator's, not CUDA's caching allocator's."""
    import inspect

    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    import fastbyol.kernels.photometric as kp
    from fastbyol.augment import IMAGENET_MEAN, IMAGENET_STD

    class _NoLaunch:
        def __init__(self, name):
            self.__name__ = name

        def __getitem__(self, grid):
            return lambda *args, **kwargs: None

    for name in ("_stats", "_color", "_blur_h", "_blur_v"):
        setattr(kp, name, _NoLaunch(name))
    crops = torch.zeros((256, 3, 224, 224), dtype=torch.uint8)
    params = torch.zeros((256, 10), dtype=torch.float32)
    import fastbyol.augment.photometric as ph

    chain = dict(blur_window=23, solarize_threshold=0.5, mean=IMAGENET_MEAN, std=IMAGENET_STD, out_dtype=torch.float16)
    # a tree whose chain takes its constants as one ChainSpec, or (older trees) as keywords
    args, kw = ((ph.ChainSpec(**chain),), {}) if hasattr(ph, "ChainSpec") else ((), chain)

    class _Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.tensors = self.bytes = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func.overloadpacket in (torch.ops.aten.empty, torch.ops.aten.empty_like, torch.ops.aten.empty_strided):
                self.tensors += 1
                self.bytes += out.numel() * out.element_size()
            return out

    rows = {}
    variants = {"fresh": {}}
    if "buffers" in inspect.signature(kp.photometric_triton).parameters:
        from fastbyol.augment.photometric import ScratchBuffers

        variants["kept"] = {"buffers": ScratchBuffers()}
    for label, extra in variants.items():
        call = lambda: kp.photometric_triton(crops, params, *args, **kw, **extra)  # noqa: E731
        call()  # the kept buffers are made here
        with _Count() as count:
            call()
        rows[f"photometric_{label}_us"] = median_us(call)
        rows[f"photometric_{label}_allocs"] = count.tensors
        rows[f"photometric_{label}_alloc_bytes"] = count.bytes
    return rows


def _tree_kernels() -> None:
    """Import `fastbyol.kernels` from this tree's `kernels/` (the installed project may map it to another tree)."""
    import importlib.util

    import fastbyol

    kdir = os.path.join(os.getcwd(), "kernels")
    if not os.path.exists(os.path.join(kdir, "__init__.py")):
        return
    spec = importlib.util.spec_from_file_location("fastbyol.kernels", os.path.join(kdir, "__init__.py"),
                                                  submodule_search_locations=[kdir])
    module = importlib.util.module_from_spec(spec)
    sys.modules["fastbyol.kernels"] = module
    spec.loader.exec_module(module)
    fastbyol.kernels = module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--src", nargs="*", default=[], help="project trees to measure, in turn (default: this one)")
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--out", help="write the rows as JSON here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        _tree_kernels()
        print(json.dumps(measure(args.repeats)))
        return
    rows = []
    for src in args.src or [os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]:
        env = {**os.environ, "PYTHONPATH": src, "TRITON_INTERPRET": "1"}  # CPU tensors through the Triton launcher
        done = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", "--repeats", str(args.repeats)],
                              env=env, cwd=src, capture_output=True, text=True, check=True)
        rows.append({"src": src, **json.loads(done.stdout.strip().splitlines()[-1])})
    for row in rows:
        print(f"{row['src']}: LARS.step {row['lars_step_meta']:.0f} us, EMA lookup {row['ema_lookup']:.1f} us "
              f"({row['parameters']} parameters, {row['ema_tensors']} EMA tensors)")
        print(f"  LARS u = g + wd w ({row['lars_u_elements']} elements, same bits: {row['lars_u_same_bits']}): "
              f"fresh {row['lars_u_fresh_meta']:.0f} us host / {row['lars_u_fresh_cpu']:.0f} us CPU, kept buffer "
              f"{row['lars_u_kept_meta']:.0f} us host / {row['lars_u_kept_cpu']:.0f} us CPU")
        for label in ("fresh", "kept"):
            if f"photometric_{label}_us" in row:
                print(f"  photometric launcher, {label} buffers: {row[f'photometric_{label}_us']:.0f} us host, "
                      f"{row[f'photometric_{label}_allocs']} tensors / "
                      f"{row[f'photometric_{label}_alloc_bytes'] / 1e6:.1f} MB allocated a call")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"repeats": args.repeats, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
