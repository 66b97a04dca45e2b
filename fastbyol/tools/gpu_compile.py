"""Every Triton kernel compiled ahead of time for real GPUs, on a machine without one: `triton.compile` with a
`GPUTarget`, no driver, no interpreter, at the launch configurations the launchers use for the headline run
(imagenet-resnet50: 224 px, 256 images a GPU, bf16; the EMA over ResNet-50 + heads) and for the loss at B=4096.

    fastbyol bench gpu-compile --out FILE        # {"rows": [...]}, one row per kernel x target x Triton version
    python -m fastbyol.tools.gpu_compile --out FILE    # the same

Each row: kernel, target ("sm_90"), triton, ok, error, registers, spills (bytes stored + loaded), shared_bytes,
occupancy, config. Registers, spills and static shared memory come from ptxas's own `-v` report (Triton's
TRITON_DUMP_PTXAS_LOG knob, compiled into a fresh cache so ptxas really runs); occupancy is resident warps / the
SM's 64, from registers (allocated per warp in units of 256), shared memory and the warp and block limits.

The launch configurations come from the launchers' own functions (`photometric_launches`, `loss_launch`,
`ema_launch`), so the check compiles what runs.
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

TARGETS = (80, 90, 100)
# per SM: registers, resident warps, resident blocks, shared memory a block may use (bytes)
SM_LIMITS = {80: (65536, 64, 32, 163 * 1024), 90: (65536, 64, 32, 227 * 1024), 100: (65536, 64, 32, 227 * 1024)}


def headline_launches() -> list[dict]:
    """(kernel name, module, launch) at the headline configurations."""
    from fastbyol.kernels.ema import ema_launch
    from fastbyol.kernels.loss import loss_launch
    from fastbyol.kernels.photometric import photometric_launches

    rows = []
    for name, c in photometric_launches(256, 224, 23, "fp16", True).items():
        rows.append(dict(kernel=name, module="fastbyol.kernels.photometric", case="224 px, batch 256, K=23", **c))
    for B in (256, 4096):
        rows.append(dict(kernel="_byol_loss_fwd_kernel", module="fastbyol.kernels.loss",
                         case=f"B={B}, D=256, symmetric, bf16", **loss_launch(B, 256, 2, "bf16")))
    rows.append(dict(kernel="_ema_kernel", module="fastbyol.kernels.ema", case="ResNet-50 + heads, fp32",
                     **ema_launch([32_957_760])))
    return rows


def _occupancy(arch: int, registers: int, shared: int, warps: int) -> float:
    regs, max_warps, max_blocks, smem = SM_LIMITS[arch]
    per_warp = -(-max(registers, 1) * 32 // 256) * 256
    blocks = min(max_blocks, max_warps // warps, regs // (per_warp * warps))
    if shared:
        blocks = min(blocks, smem // (shared + 1024))  # 1 KB reserved a block
    return blocks * warps / max_warps


def compile_one(launch: dict, arch: int) -> dict:
    """One kernel for one target: the row."""
    import importlib

    import triton
    import triton.language as tl
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = getattr(importlib.import_module(launch["module"]), launch["kernel"])
    consts = {k: (tl.dtype(v) if k.endswith("_DTYPE") else v) for k, v in launch["constexprs"].items()}
    signature = {**launch["signature"], **{k: "constexpr" for k in consts}}
    # pointers from torch's allocator are 16-byte aligned: the JIT specializes them so, and so does this
    attrs = {(fn.arg_names.index(k),): [["tt.divisibility", 16]] for k, v in launch["signature"].items()
             if v.startswith("*")}
    row = dict(kernel=launch["kernel"], target=f"sm_{arch}", triton=triton.__version__, case=launch["case"],
               config=dict(grid=list(launch["grid"]), num_warps=launch["num_warps"],
                           num_stages=launch["num_stages"], **launch["constexprs"]))
    knobs.nvidia.dump_ptxas_log = True
    knobs.cache.dir = tempfile.mkdtemp(prefix="fastbyol-aot-")  # a cache hit would skip ptxas and its report
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log):
            k = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=consts, attrs=attrs),
                               target=GPUTarget("cuda", arch, 32),
                               options=dict(num_warps=launch["num_warps"], num_stages=launch["num_stages"]))
    except Exception as e:  # a compile error is the finding: record it
        return dict(row, ok=False, error=f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300]}")
    text = log.getvalue()
    regs = max([int(x) for x in re.findall(r"Used (\d+) registers", text)] or [0])
    spills = sum(int(x) for x in re.findall(r"(\d+) bytes spill (?:stores|loads)", text))
    static = max([int(x) for x in re.findall(r"(\d+) bytes smem", text)] or [0])
    shared = int(getattr(k.metadata, "shared", 0)) + static
    return dict(row, ok=True, error=None, registers=regs, spills=spills, shared_bytes=shared,
                occupancy=_occupancy(arch, regs, shared, launch["num_warps"]), ptxas=text.strip()[-400:])


def worker(launches: list[dict], targets=TARGETS) -> list[dict]:
    """Compile every launch for every target in this process (a fresh Triton cache: ptxas runs every time)."""
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the JIT's default: fused multiply-adds
    return [compile_one(launch, arch) for launch in launches for arch in targets]


SCRATCH_TRITON = "3.6.0"  # the GPU machine's Triton (with its torch 2.11)


def scratch_python(version: str = SCRATCH_TRITON) -> str:
    """A venv with triton==version alone (pip --no-deps), made once under ~/.cache/fastbyol/; the worker reuses this
    process's torch and fastbyol through site.addsitedir (the compile needs only triton and the kernel sources)."""
    import subprocess
    import venv
    from pathlib import Path

    root = Path.home() / ".cache" / "fastbyol" / f"triton-{version}"
    python = root / "bin" / "python"
    if not (root / ".complete").exists():
        venv.create(root, with_pip=True, clear=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", f"triton=={version}"], check=True,
                       capture_output=True, timeout=600)
        (root / ".complete").write_text(version)
    return str(python)


def run_in(python: str, launches: list[dict], targets=TARGETS) -> list[dict]:
    """The worker under another interpreter (another Triton), in a subprocess, for `targets`; rows back as JSON."""
    import site
    import subprocess

    sites = [p for p in site.getsitepackages() if "site-packages" in p]
    code = ("import json, site, sys\n"
            f"for p in {sites!r}: site.addsitedir(p)\n"
            "from fastbyol.tools.gpu_compile import worker\n"
            f"json.dump(worker(json.load(sys.stdin), targets={tuple(targets)!r}), sys.stdout)\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([python, "-c", code], input=json.dumps(launches), capture_output=True, text=True,
                          env=env, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"rc {done.returncode}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def table(rows: list[dict]) -> str:
    lines = [f"{'kernel':<22} {'target':<7} {'triton':<7} {'ok':<3} {'regs':>5} {'spill B':>8} {'smem B':>7} "
             f"{'occ':>5}  config"]
    for r in rows:
        cfg = r["config"]
        short = ", ".join(f"{k}={cfg[k]}" for k in ("num_warps", "ROWS", "BLOCK", "BLOCK_M", "BLOCK_D") if k in cfg)
        if r["ok"]:
            lines.append(f"{r['kernel']:<22} {r['target']:<7} {r['triton']:<7} yes {r['registers']:>5} "
                         f"{r['spills']:>8} {r['shared_bytes']:>7} {r['occupancy']:>5.2f}  {short}")
        else:
            lines.append(f"{r['kernel']:<22} {r['target']:<7} {r['triton']:<7} NO  {r['error']}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="JSON report to write")
    ap.add_argument("--no-scratch", action="store_true", help=f"only the installed Triton, not {SCRATCH_TRITON}")
    args = ap.parse_args(argv)
    from pathlib import Path

    from ..data.cache import atomic_write_bytes
    from ..errors import FastByolError
    from ..run.outputs import check_output

    out = Path(args.out)
    check_output(out)  # never over a run's files; before the minutes of compiling
    if not out.parent.is_dir():
        raise FastByolError(f"--out {out}: the folder {out.parent} does not exist")
    launches = headline_launches()
    rows = worker(launches)
    if not args.no_scratch:
        rows += run_in(scratch_python(), launches)
    atomic_write_bytes(out, json.dumps({"rows": rows}, indent=1).encode())  # whole or not at all
    print(table(rows))
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
