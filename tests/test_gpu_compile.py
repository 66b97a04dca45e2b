"""The Triton kernels compiled ahead of time for Hopper (sm_90) at their headline launches, with no GPU and no
interpreter: any compile error or register spill fails. The launch configurations come from the launchers' own
functions (fastbyol.tools.gpu_compile.headline_launches), so this compiles what runs."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton.backends.nvidia")

_WORKER = ("import json, sys\n"
           "from fastbyol.tools.gpu_compile import headline_launches, worker\n"
           "names = set(sys.argv[1:])\n"
           "print(json.dumps(worker([c for c in headline_launches() if c['kernel'] in names], targets=(90,))))\n")


def _rows(python: str, kernels: list[str]) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([python, "-c", _WORKER, *kernels], env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_launch_functions_are_the_launchers():
    from fastbyol.tools.gpu_compile import headline_launches

    launches = {(c["kernel"], c["case"]): c for c in headline_launches()}
    blur_v = launches[("_blur_v", "224 px, batch 256, K=23")]
    assert blur_v["constexprs"]["ROWS"] * blur_v["constexprs"]["BLOCK_W"] <= 512  # the spill-free launch
    assert blur_v["grid"] == (256, 112)
    stats = launches[("_stats", "224 px, batch 256, K=23")]
    assert stats["constexprs"]["BLOCK"] // (32 * stats["num_warps"]) <= 4  # 8 pixels a thread spilled (Triton 3.6)
    color = launches[("_color", "224 px, batch 256, K=23")]
    assert color["constexprs"]["NB"] == stats["constexprs"]["NB"]  # _color reads _stats' partial sums
    assert {k for k, _ in launches} == {"_stats", "_color", "_blur_h", "_blur_v", "_byol_loss_fwd_kernel",
                                        "_ema_kernel"}


@pytest.mark.slow
def test_photometric_kernels_compile_for_sm90_without_spills():
    rows = _rows(sys.executable, ["_stats", "_color", "_blur_h", "_blur_v"])
    assert len(rows) == 4
    for r in rows:
        assert r["ok"], r
        assert r["spills"] == 0, r
        assert 0 < r["registers"] <= 255


@pytest.mark.slow
def test_loss_and_ema_kernels_compile_for_sm90_without_spills():
    rows = _rows(sys.executable, ["_byol_loss_fwd_kernel", "_ema_kernel"])
    assert len(rows) == 3
    assert all(r["ok"] and r["spills"] == 0 and r["registers"] > 0 for r in rows), rows


@pytest.mark.slow
def test_every_kernel_compiles_without_spills_under_the_gpu_machines_triton():
    """Triton 3.6 (the GPU machine's) for sm_90, every headline launch: _stats at 4 warps spilled 8 B here only."""
    scratch = Path.home() / ".cache" / "fastbyol" / "triton-3.6.0"
    if not (scratch / ".complete").exists():
        pytest.skip("no Triton 3.6.0 scratch venv: `fastbyol bench gpu-compile` makes it")
    from fastbyol.tools.gpu_compile import headline_launches, run_in

    launches = headline_launches()
    rows = [r for r in run_in(str(scratch / "bin" / "python"), launches, targets=(90,))]
    assert len(rows) == len(launches) and all(r["triton"] == "3.6.0" and r["target"] == "sm_90" for r in rows)
    assert {r["kernel"] for r in rows} >= {"_stats", "_color", "_blur_h", "_blur_v"}
    bad = [(r["kernel"], r.get("error"), r.get("spills")) for r in rows if not (r["ok"] and r["spills"] == 0)]
    assert not bad, bad
