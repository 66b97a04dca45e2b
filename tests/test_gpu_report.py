"""benchmarks/gpu_report.py in its CPU mode (tiny sizes): it runs, and writes a complete JSON and markdown report."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_report_tiny_on_cpu(tmp_path):
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_report.py"), "--out", str(tmp_path), "--tiny"],
                         capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["tiny"] and report["versions"]["torch"]
    variants = {r["variant"] for r in report["loss"]}
    assert {"fastbyol byol_loss", "eager reference", "compiled reference"} <= variants
    assert all(r["ms"] > 0 for r in report["loss"] + report["ema"])
    assert {r["variant"] for r in report["ema"]} >= {"torch._foreach_lerp_", "fastbyol ema_update_ (tensor tau)"}
    assert "EMA over" in (tmp_path / "report.md").read_text()
    steps = {r["variant"]: r for r in report["step"]}
    assert set(steps) == {"plain", "fastbyol"} and all(r["img_per_s"] > 0 for r in steps.values())
    assert steps["plain"]["flops_per_image"] == steps["fastbyol"]["flops_per_image"]  # the same network
