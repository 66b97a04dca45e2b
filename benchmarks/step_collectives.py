"""The communication of one training step, measured: `fastbyol train` under torchrun on N gloo processes with
`--profile A:B`, and from rank 0's trace the collectives a step, by kind, with their bytes.

    python benchmarks/step_collectives.py [--procs 2 4] [--python PY] [--out FILE]

Kinds, from the trace's operator events on the training thread:
- batchnorm: the functional all-reduces (`_c10d_functional::all_reduce`), which only the cross-replica BN issues;
  bytes = the reduced tensor's elements x its dtype's size;
- gradient buckets: the other all-reduces of more than one element (DDP's buckets, or the compression hook's);
- logging: the other all-reduces of one element (the mean loss at a log point, the stop check).
A c10d all-reduce (`c10d::allreduce_`) inside a functional one is the same collective and is not counted twice; a
bucket's dtype is read from the gloo event of the same shape (the c10d event lists tensors without dtypes).

The run: synthetic data, the default preset's tiny ResNet (resnet-tiny, 28 px), batch 64 over N processes,
`--log-every 1` (so every step has its logging collectives), steps 3..6 profiled (the first steps warm up), CPU,
one thread a process. `--python` runs another environment's `fastbyol` (a pre-change checkout's, for "before").
The counts and bytes feed benchmarks/scale_model.py, which checks its counting rule against them.
"""

from __future__ import annotations

import argparse
import bisect
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from fastbyol.system.machine import cpu_description

DTYPE_BYTES = {"float": 4, "double": 8, "int": 4, "long int": 8, "c10::BFloat16": 2, "c10::Half": 2,
               "float32": 4, "float64": 8, "bfloat16": 2}
PROFILE = (3, 6)


def _numel(dims) -> int:
    n = 1
    for d in dims:
        n *= d
    return n


def step_collectives(trace: dict, steps: int) -> dict:
    """{kind: {"count", "bytes"}} per step, and the BN shapes, from a Chrome trace of `steps` training steps."""
    events = [e for e in trace["traceEvents"] if e.get("ph") == "X"]
    gloo_dtype = {}
    for e in events:
        if e.get("name", "").startswith(("gloo:all_reduce", "nccl:all_reduce")):
            args = e.get("args", {})
            dims, types = args.get("Input Dims") or [[]], args.get("Input type") or [""]
            gloo_dtype[tuple(dims[0])] = types[0]
    functional = sorted((e["tid"], e["ts"], e["ts"] + e["dur"], e) for e in events
                        if e.get("name") == "_c10d_functional::all_reduce")
    spans = defaultdict(list)
    for tid, start, end, _ in functional:
        spans[tid].append((start, end))
    totals = defaultdict(lambda: {"count": 0, "bytes": 0})
    shapes = defaultdict(int)
    for _, _, _, e in functional:
        dims, dtype = e["args"]["Input Dims"][0], e["args"]["Input type"][0]
        totals["batchnorm"]["count"] += 1
        totals["batchnorm"]["bytes"] += _numel(dims) * DTYPE_BYTES.get(dtype, 4)
        shapes[f"{tuple(dims)} {dtype}"] += 1
    for e in events:
        if e.get("name") != "c10d::allreduce_" or _inside(spans[e["tid"]], e["ts"]):
            continue
        for dims in e["args"]["Input Dims"][0]:
            numel = _numel(dims)
            kind = "gradient buckets" if numel > 1 else "logging"
            totals[kind]["count"] += 1
            totals[kind]["bytes"] += numel * DTYPE_BYTES.get(gloo_dtype.get(tuple(dims), "float"), 4)
    per_step = {k: {"count": v["count"] / steps, "bytes": v["bytes"] / steps} for k, v in sorted(totals.items())}
    per_step["total"] = {"count": sum(v["count"] for v in per_step.values()),
                         "bytes": sum(v["bytes"] for v in per_step.values())}
    return {"per_step": per_step, "batchnorm_shapes": {k: v / steps for k, v in sorted(shapes.items())}}


def _inside(spans: list[tuple[float, float]], ts: float) -> bool:
    i = bisect.bisect_right(spans, (ts, float("inf"))) - 1
    return i >= 0 and spans[i][0] <= ts <= spans[i][1]


def run(procs: int, python: str, out: Path, timeout: float = 900) -> dict:
    """One profiled `fastbyol train` under torchrun on `procs` gloo processes; the trace's collectives a step."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [python, "-m", "torch.distributed.run", "--nproc-per-node", str(procs), "--master-port", str(port),
           "-m", "fastbyol", "train", "--data", "synthetic", "--epochs", "1", "--batch-size", "64", "--log-every",
           "1", "--knn-every", "0", "--no-online-probe", "--no-progress", "--profile", f"{PROFILE[0]}:{PROFILE[1]}",
           "--out", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=tempfile.gettempdir())
    if done.returncode:
        raise RuntimeError(f"{' '.join(cmd)}: rc {done.returncode}\n{done.stderr[-3000:]}")
    trace = json.loads(next((out / "profile").glob("steps_*.pt.trace.json")).read_text())
    result = step_collectives(trace, PROFILE[1] - PROFILE[0])
    return {"procs": procs, "seconds": round(time.perf_counter() - t0, 1), **result}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--procs", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--python", default=sys.executable, help="the interpreter (and so the fastbyol) to run")
    ap.add_argument("--label", default=None, help="what this run measures (e.g. before, after)")
    ap.add_argument("--out", default=None, help="JSON file to write")
    args = ap.parse_args(argv)
    rows = []
    for procs in args.procs:
        with tempfile.TemporaryDirectory() as tmp:
            rows.append(run(procs, args.python, Path(tmp) / "run"))
        per = rows[-1]["per_step"]
        print(f"{procs} processes: " + ", ".join(f"{k} {v['count']:g} ({v['bytes'] / 1e3:.1f} kB)"
                                                 for k, v in per.items()), flush=True)
    result = {"label": args.label, "rows": rows, "profiled_steps": list(PROFILE),
              "python": "this checkout's" if args.python == sys.executable else "another environment's (--python)",
              "cpu": cpu_description(), "load_avg": os.getloadavg(), "date": time.strftime("%Y-%m-%d", time.gmtime())}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0



if __name__ == "__main__":
    sys.exit(main())
