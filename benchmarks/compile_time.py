"""Compile time of the BYOL training step (Dynamo trace, AOTAutograd, Inductor's lowering, code generation and the
kernels' compilation), per design, each in a fresh process with empty compiler caches, on this machine's CPU.

    python benchmarks/compile_time.py [--arch resnet50] [--size 224] [--batch 2] [--designs four-pass per-network]
        [--backend inductor] [--repeat N] [--out FILE]

Designs:
- four-pass: one graph of the whole step's forward, each network once per view (`torch.compile` of a BYOL module
  that forwards each view on its own; here `torch.compile(model.forward_per_view)`, the same passes and layers).
- whole: one graph of the whole one-pass forward (`torch.compile(model)`): online and target, both views stacked.
- per-network: the trainer's (`fastbyol.models.networks.compile_networks`): the online network's training graph and
  the target's no-grad graph, compiled on their own; a network that repeats blocks (ResNet-50) block by block, each
  distinct block once per network.
With `--python PY` (a pre-change checkout's environment, whose `fastbyol` has no `compile_networks`) each design
is run by that interpreter instead: its `torch.compile(model)` is the four-pass graph itself (`--designs whole`).

One step is forward, the fused loss and backward; compile time = the first step's time - the median of the next
steps' (it also contains the first step's one-time allocations), in CPU seconds of the process and of the compiler
processes it ran (Inductor compiles in this process, `TORCHINDUCTOR_COMPILE_THREADS=1`: on a machine shared with
other work, wall time measures the neighbours; CPU time does not) and in wall seconds. After the first step nothing
may compile again: `recompiles_after_first` counts Dynamo's unique graphs made by later steps (0 expected). The aten node counts of the
forward and backward graphs come from a second, code-free trace (AOTAutograd with counting compilers).
Image size and batch change the run time of a step, not the graph: small ones keep the CPU's part small.

Results: benchmarks/results/ (the date, the CPU, the load and the figures are in the JSON).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fastbyol.system.machine import cpu_description

DESIGNS = ("four-pass", "whole", "per-network")


def _network(design: str, model):
    """The callable the step runs for a design, and the compile function it is made with."""
    import torch

    if design == "per-network":
        from fastbyol.models.networks import compile_networks

        return lambda backend: compile_networks(model, "default", backend=backend)
    if design == "four-pass" and hasattr(model, "forward_per_view"):
        return lambda backend: torch.compile(model.forward_per_view, backend=backend)
    return lambda backend: torch.compile(model, backend=backend)  # four-pass in a pre-change checkout; whole here


def _node_counts(design: str, arch: str, size: int, batch: int) -> dict:
    """aten nodes of every forward and backward graph the design compiles (AOTAutograd, no code generated)."""
    import torch
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.partitioners import min_cut_rematerialization_partition

    counts = {"forward": [], "backward": []}

    def counter(kind):
        def compile_fn(gm, example_inputs):
            counts[kind].append(sum(1 for n in gm.graph.nodes if n.op == "call_function"))
            return gm.forward
        return compile_fn

    backend = aot_autograd(fw_compiler=counter("forward"), bw_compiler=counter("backward"),
                           inference_compiler=counter("forward"), partition_fn=min_cut_rematerialization_partition)
    torch._dynamo.reset()
    model, views = _model(arch, size, batch)
    _step(_network(design, model)(backend), views)
    torch._dynamo.reset()
    return counts


def _model(arch: str, size: int, batch: int):
    import torch

    from fastbyol.models import BYOL, build_encoder

    torch.manual_seed(0)
    model = BYOL(build_encoder(arch, "auto", size)).to(memory_format=torch.channels_last)
    gen = torch.Generator().manual_seed(1)
    views = [torch.randn(batch, 3, size, size, generator=gen).contiguous(memory_format=torch.channels_last)
             for _ in range(2)]
    return model, views


def _cpu_seconds() -> float:
    """CPU seconds (user + system) of this process and of its finished children (the C++ compiler's runs)."""
    import resource

    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _step(net, views) -> tuple[float, float]:
    """(wall, CPU) seconds of one forward + loss + backward."""
    from fastbyol.kernels import byol_loss_symmetric

    t0, c0 = time.perf_counter(), _cpu_seconds()
    out = net(*views)
    byol_loss_symmetric(*out[:4]).backward()
    return time.perf_counter() - t0, _cpu_seconds() - c0


def measure(design: str, arch: str, size: int, batch: int, backend: str, steps: int = 3) -> dict:
    """One design in this process: compile + first step, then `steps` more (in a fresh process: empty caches)."""
    import statistics

    import torch
    import torch._inductor.config as inductor_config
    from torch._dynamo.utils import compile_times, counters

    inductor_config.fx_graph_cache = False  # every run generates its code
    if hasattr(inductor_config, "autograd_cache"):
        inductor_config.autograd_cache = False
    torch._dynamo.reset()
    counters.clear()
    model, views = _model(arch, size, batch)
    net = _network(design, model)(backend)
    (first, first_cpu) = _step(net, views)
    graphs_first = counters["stats"]["unique_graphs"]
    later = [_step(net, views) for _ in range(steps)]
    phases = {k: round(v, 2) for k, v in _phase_seconds(compile_times(repr="csv", aggregate=True)).items()}
    step_s, step_cpu = statistics.median(w for w, _ in later), statistics.median(c for _, c in later)
    return {"design": design, "arch": arch, "size": size, "batch": batch, "backend": backend,
            "compile_cpu_s": first_cpu - step_cpu, "compile_wall_s": first - step_s, "first_step_s": first,
            "step_s": step_s, "graphs": graphs_first,
            "recompiles_after_first": counters["stats"]["unique_graphs"] - graphs_first,
            "graph_breaks": sum(counters["graph_break"].values()), "phases_s": phases,
            "nodes": _node_counts(design, arch, size, batch), "torch": torch.__version__,
            "fastbyol": "this checkout" if _this_checkout() else "another checkout (--python)"}


def _this_checkout() -> bool:
    """Whether the fastbyol measured is the one beside this script (a path would name a folder outside the
    repository in the committed results)."""
    return Path(sys.modules["fastbyol.models"].__file__).resolve().parents[2] == Path(__file__).resolve().parents[1]


def _phase_seconds(csv) -> dict:
    """Dynamo's cumulative timings by phase (its compile_times table), the few that say where the time went."""
    names, values = csv
    wanted = ("_compile.compile_inner", "OutputGraph.call_user_compiler", "compile_fx.<locals>.fw_compiler_base",
              "compile_fx.<locals>.bw_compiler", "compile_fx_inner", "GraphLowering.codegen",
              "GraphLowering.compile_to_module", "async_compile.wait")
    return {n: float(v) for n, v in zip(names, values) if n in wanted and v not in ("", None)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", default="resnet50")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=2, help="images per view (the graph does not depend on it)")
    ap.add_argument("--designs", nargs="+", default=["four-pass", "per-network"], choices=DESIGNS)
    ap.add_argument("--backend", default="inductor")
    ap.add_argument("--repeat", type=int, default=1, help="runs of every design, interleaved (the rows say which)")
    ap.add_argument("--python", default=sys.executable, help="the interpreter (and so the fastbyol) to measure")
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # a child: one design, JSON on stdout
    ap.add_argument("--out", default=None, help="JSON file to write")
    args = ap.parse_args(argv)
    if args.one:
        print(json.dumps(measure(args.designs[0], args.arch, args.size, args.batch, args.backend)))
        return 0
    rows = []
    for run, design in ((r, d) for r in range(1, args.repeat + 1) for d in args.designs):
        with tempfile.TemporaryDirectory() as cache:
            env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache, TRITON_CACHE_DIR=cache,
                       TORCHINDUCTOR_COMPILE_THREADS="1", OMP_NUM_THREADS="1")
            cmd = [args.python, str(Path(__file__).resolve()), "--one", "--designs", design, "--arch", args.arch,
                   "--size", str(args.size), "--batch", str(args.batch), "--backend", args.backend]
            done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tempfile.gettempdir())
        if done.returncode:
            raise SystemExit(f"{design}: {done.stderr[-3000:]}")
        rows.append({**json.loads(done.stdout.strip().splitlines()[-1]), "run": run})
        row = rows[-1]
        print(f"{design}: compile {row['compile_cpu_s']:.1f} CPU s ({row['compile_wall_s']:.1f} s wall), graphs "
              f"{row['graphs']}, recompiles after the first step {row['recompiles_after_first']}, nodes "
              f"{row['nodes']}", flush=True)
    result = {"rows": rows, "cpu": cpu_description(), "load_avg": os.getloadavg(),
              "date": time.strftime("%Y-%m-%d", time.gmtime())}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0



if __name__ == "__main__":
    sys.exit(main())
