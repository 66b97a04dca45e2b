"""The Triton kernels compiled ahead of time for Hopper (sm_90) at their headline launches, with no GPU and no
interpreter: any compile error or register spill fails. The launch configurations come from the launchers' own
functions (fastbyol.gpu_compile.headline_launches), so this compiles what runs."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton.backends.nvidia")

_WORKER = ("import json, sys\n"
           "from fastbyol.gpu_compile import headline_launches, worker\n"
           "names = set(sys.argv[1:])\n"
           "print(json.dumps(worker([c for c in headline_launches() if c['kernel'] in names], targets=(90,))))\n")


def _rows(python: str, kernels: list[str]) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([python, "-c", _WORKER, *kernels], env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_launch_functions_are_the_launchers():
    from fastbyol.gpu_compile import headline_launches

    launches = {(c["kernel"], c["case"]): c for c in headline_launches()}
    blur_v = launches[("_blur_v", "224 px, batch 256, K=23")]
    assert blur_v["constexprs"]["ROWS"] * blur_v["constexprs"]["BLOCK_W"] <= 512  # the spill-free launch
    assert blur_v["grid"] == (256, 112)
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
def test_blur_and_color_compile_without_spills_under_the_gpu_machines_triton():
    scratch = Path.home() / ".cache" / "fastbyol" / "triton-3.6.0"
    if not (scratch / ".complete").exists():
        pytest.skip("no Triton 3.6.0 scratch venv: `fastbyol bench gpu-compile` makes it")
    from fastbyol.gpu_compile import run_in, headline_launches

    rows = run_in(str(scratch / "bin" / "python"),
                  [c for c in headline_launches() if c["kernel"] in ("_blur_v", "_color")])
    sm90 = [r for r in rows if r["target"] == "sm_90"]
    assert len(sm90) == 2 and all(r["triton"] == "3.6.0" for r in sm90)
    assert all(r["ok"] and r["spills"] == 0 for r in sm90), sm90
