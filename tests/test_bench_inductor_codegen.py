"""The compiled BYOL step's CUDA code generated on this CPU-only build (benchmarks/inductor_codegen.py): AOTAutograd's
forward and backward graphs of the resnet-tiny BYOL module traced on fake tensors, moved to CUDA, turned into Triton
kernels by Inductor for an sm_90 device, and every generated kernel compiled for sm_90 with `triton.compile` (its
first configuration). A compile error, a graph Inductor cannot lower, or a backward with no kernels fails."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton.backends.nvidia")

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_inductor_generates_and_sm90_compiles_the_forward_and_backward(tmp_path):
    out = tmp_path / "codegen.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor"), TRITON_CACHE_DIR=str(tmp_path / "triton"))
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "inductor_codegen.py"), "--arch", "resnet-tiny",
                           "--size", "32", "--batch", "4", "--part", "joint", "--first-config", "--source",
                           str(tmp_path / "src"), "--out", str(out)],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert out.exists(), done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert [g["graph"] for g in result["graphs"]] == ["forward", "backward"], result
    for g in result["graphs"]:
        assert g["ok"] and g["stage"] == "done", g
        assert g["kernels"] > 0 and g["kernels"] == g["triton_defs"]  # every definition found and compiled
        assert g["configs_compiled"] == g["kernels"] and g["compile_failures"] == []
        source = (tmp_path / f"src.{g['graph']}.py").read_text()
        assert "device_str='cuda'" in source  # CUDA code; the convolutions stay cuDNN's (extern, not Triton)
        assert ("extern_kernels.convolution(" if g["graph"] == "forward" else "aten.convolution_backward") in source
    fwd, bwd = result["graphs"]
    assert bwd["kernels"] > fwd["kernels"]  # the backward's BN, ReLU and weight-gradient reductions
    assert done.returncode == 0
