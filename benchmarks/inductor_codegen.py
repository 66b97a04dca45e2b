"""How far Inductor gets generating the compiled BYOL step's CUDA code on a machine without a GPU (torch CPU build).

    python benchmarks/inductor_codegen.py [--arch resnet-tiny] [--size 32] [--batch 8] [--dtype fp32|bf16]
                                          [--part forward|joint] [--out FILE]

The route, in two stages:
1. Trace on fake tensors: the BYOL module's forward (p1, p2, z1, z2 from two views) and, with --part joint, its
   backward too (the online parameters' gradients for given gradients of p1 and p2, through `torch.autograd.grad`),
   as one functional aten graph (make_fx, functionalized, Inductor's decomposition table; `torch._inductor.lowering`
   imported first, which registers the max-pool decomposition). The fake tensors are CUDA tensors of a fake mode:
   no device is touched.
2. `compile_fx_inner` on that graph with the CUDA device-properties queries patched to an H100's (sm_90, 132 SMs),
   and the generated module's source kept instead of loaded (loading would compile its kernels for a driver this
   machine has not got). Each generated Triton kernel is then compiled for sm_90 with `triton.compile` and
   `GPUTarget`, at each of its configurations, as fastbyol.gpu_compile does for the hand-written kernels.

Prints (and writes with --out) one JSON object: the stage reached, the error if one stopped it, the number of
kernels generated, compiled and failed, and the wall time of each stage.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import sys
import tempfile
import time
import traceback
from unittest import mock

os.environ.pop("TRITON_INTERPRET", None)  # compiled for a GPU target, not interpreted
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the JIT default, as Inductor's enable_fp_fusion


class _Stop(Exception):
    """Raised after the source is generated, so that nothing tries to load it."""


def _props():
    from types import SimpleNamespace

    return SimpleNamespace(name="NVIDIA H100 80GB HBM3", major=9, minor=0, multi_processor_count=132,
                           total_memory=80 * 2**30, max_threads_per_multi_processor=2048, warp_size=32,
                           regs_per_multiprocessor=65536, L2_cache_size=50 * 2**20, gcnArchName="NV",
                           shared_memory_per_block_optin=227 * 1024, max_threads_per_block=1024)


def _sm90_backend():
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend

    return make_backend(GPUTarget("cuda", 90, 32))


def _aten_copy(self, src, non_blocking=False):
    import torch

    return torch.ops.aten.copy_.default(self, src, non_blocking)


def _patches():
    """The CUDA queries Inductor makes while generating code, answered as an H100 would."""
    import torch
    import torch.utils._triton
    from torch._dynamo.device_interface import CudaInterface

    props = _props()
    return [mock.patch.object(torch.cuda, "is_available", lambda: True),
            mock.patch.object(torch.cuda, "device_count", lambda: 1),
            mock.patch.object(torch.cuda, "current_device", lambda: 0),
            mock.patch.object(torch.cuda, "get_device_properties", lambda *a, **k: props),
            mock.patch.object(torch.cuda, "get_device_capability", lambda *a, **k: (9, 0)),
            mock.patch.object(torch.cuda, "get_device_name", lambda *a, **k: props.name),
            mock.patch.object(torch.cuda, "is_bf16_supported", lambda *a, **k: True),
            mock.patch.object(torch.cuda, "get_rng_state", lambda *a, **k: torch.zeros(16, dtype=torch.uint8)),
            mock.patch.object(torch.cuda, "set_rng_state", lambda *a, **k: None),
            mock.patch.object(torch.cuda, "_exchange_device", lambda idx: 0),
            mock.patch.object(torch.cuda, "_maybe_exchange_device", lambda idx: 0),
            # Dynamo's device interface holds its own references to the functions above
            mock.patch.object(CudaInterface, "get_device_properties", staticmethod(lambda *a, **k: props)),
            mock.patch.object(CudaInterface, "current_device", staticmethod(lambda: 0)),
            mock.patch.object(CudaInterface, "device_count", staticmethod(lambda: 1)),
            mock.patch.object(CudaInterface, "exchange_device", staticmethod(lambda idx: 0)),
            mock.patch.object(CudaInterface, "maybe_exchange_device", staticmethod(lambda idx: 0)),
            mock.patch.object(CudaInterface, "is_bf16_supported", staticmethod(lambda *a, **k: True)),
            mock.patch.object(CudaInterface, "memory_allocated", staticmethod(lambda *a, **k: 0)),
            # Triton's active driver (for the target and the cache key) would load libcuda: the sm_90 backend instead
            mock.patch.object(torch.utils._triton, "triton_backend", _sm90_backend),
            # Tensor.copy_'s Python binding takes a device guard for its CUDA (fake) self, which the CPU build has not
            # got; the aten op itself goes straight to the fake kernel (the reinplace pass copies into views so)
            mock.patch.object(torch.Tensor, "copy_", _aten_copy)]


def trace(arch: str, size: int, batch: int, dtype: str, part: str) -> list[tuple[str, object, list]]:
    """Stage 1: AOTAutograd's forward and backward graphs of the BYOL module (functionalized, partitioned as
    torch.compile partitions them, Inductor's decompositions), traced on fake CPU tensors, each moved to CUDA:
    [(name, graph, fake CUDA inputs)]."""
    import torch
    import torch._inductor.lowering  # noqa: F401  registers the decompositions Inductor relies on (max-pool)
    from functorch.compile import aot_function, min_cut_rematerialization_partition
    from torch._inductor.decomposition import select_decomp_table
    from torch._subclasses.fake_tensor import FakeTensorMode

    from fastbyol.models import BYOL, build_encoder

    model = BYOL(build_encoder(arch, image_size=size)).to(memory_format=torch.channels_last)
    online = {n for n, _ in model.named_parameters() if not n.startswith("target_")}
    real_params = {n: p.detach() for n, p in model.named_parameters()}
    real_buffers = dict(model.named_buffers())
    mode = FakeTensorMode(allow_non_fake_inputs=False)
    view_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
    with mode:
        params = {n: mode.from_tensor(p, static_shapes=True).requires_grad_(n in online)
                  for n, p in real_params.items()}
        buffers = {n: mode.from_tensor(b, static_shapes=True) for n, b in real_buffers.items()}
        cl = (3 * size * size, 1, 3 * size, 3)  # channels_last strides
        views = [torch.empty_strided((batch, 3, size, size), cl, dtype=view_dtype) for _ in range(2)]
        grads_out = [torch.empty(batch, 256) for _ in range(2)]
    graphs = []

    def keep(name):
        def compiler(gm, inputs):
            graphs.append((name, gm, list(inputs)))
            return gm  # runs as traced, on the fake tensors

        return compiler

    def forward(params, buffers, v1, v2):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
            return torch.func.functional_call(model, (params, buffers), (v1, v2))

    step = aot_function(forward, fw_compiler=keep("forward"), bw_compiler=keep("backward"),
                        partition_fn=min_cut_rematerialization_partition, decompositions=select_decomp_table())
    with mode:
        p1, p2, z1, z2 = step(params, buffers, *views)
        if part == "joint":
            torch.autograd.backward([p1, p2], [g.to(p1.dtype) for g in grads_out])
    return [(name, *retarget(gm, inputs)) for name, gm, inputs in graphs]


def retarget(gm, inputs):
    """The CPU-traced graph moved to CUDA: every device argument of its nodes, and fake CUDA inputs of the same
    shapes, strides and dtypes (made by empty_strided in a fresh fake mode); the nodes' fake values re-propagated."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp

    cuda = torch.device("cuda", 0)

    def move(a):
        if isinstance(a, torch.device) and a.type == "cpu":
            return cuda
        if isinstance(a, (list, tuple)):
            return type(a)(move(x) for x in a)
        return a

    for node in gm.graph.nodes:
        node.args = move(node.args)
        node.kwargs = {k: move(v) for k, v in node.kwargs.items()}
    gm.graph._codegen = torch.fx.graph.CodeGen()  # flat inputs and outputs, as compile_fx_inner takes a graph
    gm.recompile()
    mode = FakeTensorMode(allow_non_fake_inputs=False)
    with mode:
        fakes = [torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=cuda)
                 if isinstance(t, torch.Tensor) else t for t in inputs]
    FakeTensorProp(gm, mode).propagate_dont_convert_inputs(*fakes)
    return gm, fakes


def generate(gm, inputs, is_backward: bool = False) -> str:
    """Stage 2: Inductor's Python wrapper module for the graph, as source."""
    from torch._inductor import compile_fx
    from torch._inductor.graph import GraphLowering

    kept = {}

    def keep_source(self, *a, **k):
        code = self.codegen()
        code = code[0] if isinstance(code, tuple) else code  # (wrapper, kernels) or the wrapper
        kept["source"] = getattr(code, "value", code)
        raise _Stop()

    import torch.utils._triton

    with contextlib.ExitStack() as stack:
        for p in _patches():
            stack.enter_context(p)
        # answers cached while tracing on the CPU ("no GPU for Triton") are asked again under the patches
        for f in vars(torch.utils._triton).values():
            if hasattr(f, "cache_clear"):
                f.cache_clear()
        stack.enter_context(mock.patch.object(GraphLowering, "compile_to_module", keep_source))
        try:
            compile_fx.compile_fx_inner(gm, inputs, is_backward=is_backward, is_inference=False)
        except _Stop:
            pass
        except Exception as e:  # _Stop may come back wrapped
            if not isinstance(e.__cause__, _Stop) and "_Stop" not in repr(e):
                raise
    return kept["source"]


KERNEL = re.compile(r"(\w+) = async_compile\.triton\('(\w+)', '''(.*?)''', device_str='cuda'\)", re.S)


def _kernel_and_configs(name: str, text: str):
    """Exec one generated kernel module with Inductor's autotuner replaced by a recorder: (the @triton.jit function,
    its triton_meta, the configurations Inductor's heuristics chose for it). Nothing touches a driver."""
    import importlib.util

    from torch._inductor.runtime import triton_helpers, triton_heuristics

    seen = {}

    def record(size_hints, configs, triton_meta, heuristic_type=None, filename=None, inductor_meta=None, **_):
        def decorate(fn):
            seen.update(fn=fn, triton_meta=triton_meta, configs=configs)
            return fn

        return decorate

    path = os.path.join(tempfile.mkdtemp(prefix="fastbyol-inductor-src-"), f"{name}.py")  # @jit reads its file
    with open(path, "w") as f:
        f.write(text)
    spec = importlib.util.spec_from_file_location(f"inductor_kernel_{name}", path)
    module = importlib.util.module_from_spec(spec)
    with contextlib.ExitStack() as stack:
        for p in _patches():
            stack.enter_context(p)
        stack.enter_context(mock.patch.object(triton_helpers, "set_driver_to_gpu", lambda: None))
        stack.enter_context(mock.patch.object(triton_heuristics, "cached_autotune", record))
        spec.loader.exec_module(module)
    return seen["fn"], seen["triton_meta"], seen["configs"]


def compile_kernels(source: str, every_config: bool = True) -> tuple[int, int, list[str], dict]:
    """Compile each generated Triton kernel for sm_90 at each configuration Inductor would autotune over (or only
    the first): (kernels, configurations compiled, failures, spills: kernel -> bytes spilled by each config)."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernels = KERNEL.findall(source)
    compiled, failures, spills = 0, [], {}
    knobs.nvidia.dump_ptxas_log = True
    for _var, name, text in kernels:
        try:
            fn, meta, configs = _kernel_and_configs(name, text)
        except Exception as e:
            failures.append(f"{name}: exec: {type(e).__name__}: {str(e).strip().splitlines()[0][:200]}")
            continue
        attrs = meta.get("configs", [{}])[0] if meta.get("configs") else {}
        for cfg in configs if every_config else configs[:1]:
            consts = {**meta.get("constants", {}), **cfg.kwargs}
            signature = {k: ("constexpr" if k in consts else v) for k, v in meta["signature"].items()}
            knobs.cache.dir = tempfile.mkdtemp(prefix="fastbyol-inductor-")  # a fresh cache: ptxas runs
            log = io.StringIO()
            try:
                with contextlib.redirect_stdout(log):
                    triton.compile(ASTSource(fn=fn, signature=signature, constexprs=consts, attrs=attrs),
                                   target=GPUTarget("cuda", 90, 32),
                                   options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages))
                compiled += 1
                spilled = sum(int(x) for x in re.findall(r"(\d+) bytes spill (?:stores|loads)", log.getvalue()))
                spills.setdefault(name, []).append(spilled)
            except Exception as e:
                failures.append(f"{name} {cfg.kwargs}: {type(e).__name__}: {str(e).strip().splitlines()[0][:200]}")
    return len(kernels), compiled, failures, spills


def _error(e: BaseException) -> dict:
    """The error, the last frames where it was raised, and the chain of exceptions that caused it."""
    def line(x: BaseException) -> str:
        text = str(x).strip()
        return f"{type(x).__name__}: {text.splitlines()[0][:400]}" if text else type(x).__name__

    causes, x = [], e
    while (x.__cause__ or x.__context__) is not None and len(causes) < 4:
        x = x.__cause__ or x.__context__
        causes.append(dict(error=line(x), where=[f"{f.filename.split('site-packages/')[-1]}:{f.lineno} {f.name}"
                                                 for f in traceback.extract_tb(x.__traceback__)[-3:]]))
    return dict(error=line(e), where=[f"{f.filename.split('site-packages/')[-1]}:{f.lineno} {f.name}"
                                      for f in traceback.extract_tb(e.__traceback__)[-int(os.environ.get("FRAMES", 6)):]],
                caused_by=causes)


def codegen_graph(name: str, gm, inputs, aot: bool, source_out: str | None, every_config: bool = True) -> dict:
    """Stage 2 (and the sm_90 compile) for one graph: its row."""
    row = dict(graph=name, nodes=len(gm.graph.nodes), stage="inductor codegen")
    t0 = time.perf_counter()
    try:
        source = generate(gm, inputs, is_backward=name == "backward")
        row["codegen_s"] = round(time.perf_counter() - t0, 1)
        if source_out:
            with open(f"{source_out}.{name}.py", "w") as f:
                f.write(source)
        row.update(kernels=len(KERNEL.findall(source)), triton_defs=source.count("async_compile.triton("),
                   extern_calls=len(re.findall(r"extern_kernels\.\w+\(", source)), source_lines=source.count("\n"))
        if aot:
            row["stage"] = "triton compile sm_90"
            t0 = time.perf_counter()
            _, row["configs_compiled"], row["compile_failures"], spills = compile_kernels(source, every_config)
            # autotuning picks among a kernel's configurations: a finding only where every one of them spills
            row["configs_spilling"] = {k: v for k, v in spills.items() if any(v)}
            row["kernels_spilling_in_every_config"] = sorted(k for k, v in spills.items() if all(v))
            row["compile_s"] = round(time.perf_counter() - t0, 1)
        row.update(stage="done", ok=not row.get("compile_failures"))
    except Exception as e:
        row.update(ok=False, **_error(e))
    return row


def run(arch: str, size: int, batch: int, dtype: str, part: str, aot: bool = True,
        source_out: str | None = None, every_config: bool = True) -> dict:
    import torch

    out = dict(arch=arch, size=size, batch=batch, dtype=dtype, part=part, torch=torch.__version__, graphs=[])
    t0 = time.perf_counter()
    try:
        graphs = trace(arch, size, batch, dtype, part)
    except Exception as e:
        return dict(out, ok=False, stage="trace", **_error(e))
    out["trace_s"] = round(time.perf_counter() - t0, 1)
    out["graphs"] = [codegen_graph(name, gm, inputs, aot, source_out, every_config) for name, gm, inputs in graphs]
    out["ok"] = bool(out["graphs"]) and all(g["ok"] for g in out["graphs"])
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="resnet-tiny")
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    ap.add_argument("--part", choices=("forward", "joint"), default="joint")
    ap.add_argument("--no-aot", action="store_true", help="generate only, do not compile the kernels")
    ap.add_argument("--first-config", action="store_true", help="compile each kernel at its first configuration only")
    ap.add_argument("--out", help="write the result as JSON here")
    ap.add_argument("--source", help="write each generated wrapper module to SOURCE.<graph>.py")
    args = ap.parse_args(argv)
    row = run(args.arch, args.size, args.batch, args.dtype, args.part, not args.no_aot, args.source,
              not args.first_config)
    print(json.dumps(row, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(row, f, indent=1)
    return 0 if row["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
