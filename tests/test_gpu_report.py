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
    lars = {r["variant"]: r for r in report["lars"]}
    assert set(lars) == {"per-parameter loop (reference)", "foreach (fastbyol LARS)"}
    assert all(r["ms"] > 0 and r["tensors"] > 10 for r in lars.values())
    rows = {(r["variant"], r["compile"], r["source"]): r for r in report["step"]}
    assert set(rows) == {("plain", "off", "synthetic"), ("fastbyol", "off", "synthetic"),
                         ("fastbyol", "default", "synthetic"), ("fastbyol", "off", "dali")}
    assert not [r for r in rows.values() if "error" in r], rows
    assert all(r["img_per_s"] > 0 and r["warmup_seconds"] > 0 for r in rows.values())
    flops = {r["flops_per_image"] for r in rows.values()}
    assert len(flops) == 1  # the same network in every row
    # compilation happens in the warm-up, not in the timed steps: the compiled row's warm-up holds far more than one
    # of its steps (a comparison with the eager row's warm-up would read the machine's load, not the compiler)
    compiled = rows[("fastbyol", "default", "synthetic")]
    assert compiled["warmup_seconds"] > compiled["step_ms"] / 1000
    assert report["dali"]["samples_per_s"] > 0 and report["dali"]["source"] == "jpeg"
    md = (tmp_path / "report.md").read_text()
    assert "two-view samples/s" in md and "LARS step over" in md
    assert "| resnet-tiny | 28 | 32 | fastbyol | default | synthetic |" in md
    assert "compiled fastbyol, symmetric (custom_op)" in {r["variant"] for r in report["loss"]}
    # the README table generator renders every section of a report
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import readme_table
    finally:
        sys.path.pop(0)
    table = readme_table.table(report, "report.json")
    assert "compiled as custom_op" in table and "| LARS step |" in table and "two-view samples/s" in table
    assert "| resnet-tiny fastbyol | 28 | 32 | default | synthetic |" in table
    results = tmp_path / "results"
    results.mkdir()
    for name in ("2026-01-01-h100-ops.json", "2026-02-01-h100-ops-before-x.json", "2026-01-15-h200-report.json"):
        (results / name).write_text("{}")
    assert readme_table.latest_report(results).name == "2026-01-15-h200-report.json"



def test_the_readme_block_is_what_its_generator_writes():
    """README.md's performance block is exactly `python benchmarks/readme_table.py`'s output from the newest committed
    report (never edited by hand), and it prints no missing version as 'None'."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import readme_table
    finally:
        sys.path.pop(0)
    text = (ROOT / "README.md").read_text()
    made, name = readme_table.regenerated(text, ROOT)
    assert made == text, f"README.md's block differs from the one made from {name}: run benchmarks/readme_table.py"
    block = text[text.index(readme_table.START):text.index(readme_table.END)]
    assert "None" not in block
    report = json.loads((ROOT / "benchmarks" / "results" / name).read_text())
    head = readme_table.table({**report, "versions": {"torch": "2.0", "dali": None}}, name).splitlines()[0]
    assert "torch 2.0" in head and "DALI" not in head and "triton" not in head


def test_gpu_report_sections(tmp_path):
    script = str(ROOT / "benchmarks" / "gpu_report.py")
    res = subprocess.run([sys.executable, script, "--out", str(tmp_path), "--tiny", "--sections", "lars"],
                         capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["sections"] == ["lars"] and "loss" not in report and "step" not in report
    md = (tmp_path / "report.md").read_text()
    assert "LARS step over" in md and "## Loss" not in md
    res = subprocess.run([sys.executable, script, "--out", str(tmp_path / "x"), "--tiny", "--sections", "lars,nope"],
                         capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert res.returncode == 2 and "nope" in res.stderr and not (tmp_path / "x").exists()
