"""The GPU plan (benchmarks/gpu_plan.md) dry-runs on the CPU, so it cannot rot before a GPU comes: its four calls,
through the same `benchmarks/gpu_run.sh` a device call runs, at tiny sizes (compiled rows traced with the 'eager'
backend, the CUDA tests collected rather than run, peers recorded as not installed where they are absent). Every
item must end ok, every file the device would send back must obey the device tool's rules (at most 8 files a call,
plain names), and the merged report must render through gpu_report and readme_table.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_plan  # noqa: E402
import readme_table  # noqa: E402

sys.path.pop(0)


def test_every_call_lists_known_items_and_fits_its_budget():
    for call, names in gpu_plan.CALLS.items():
        assert names and all(n in gpu_plan.ITEMS for n in names), (call, names)
        assert len(set(names)) == len(names)
    # the device time: four calls of at most their budget + 30 s each, plus a 2-minute machine start, in 15 minutes
    assert sum(gpu_plan.BUDGET.values()) + 4 * 30 + 120 <= 15 * 60
    # the compiled headline right after the ceilings, then the eager and plain rows and the CUDA tests; peers later
    assert gpu_plan.CALLS[1][:3] == ["env", "ceilings", "step-r50-compiled"]
    assert {"step-r50-eager", "step-r50-plain", "tests-cuda"} <= set(gpu_plan.CALLS[1])
    assert {"peer-byol-pytorch", "peer-lightly"} <= set(gpu_plan.CALLS[2])
    # the compiled row's estimate fits call 1 with everything before it, and is not the upper end by default
    est = {n: gpu_plan.ITEMS[n]["est"] for n in gpu_plan.CALLS[1]}
    assert est["env"] + est["ceilings"] + est["step-r50-compiled"] <= gpu_plan.BUDGET[1]
    assert sum(est.values()) <= gpu_plan.BUDGET[1]


def test_the_compiled_rows_estimate_comes_from_the_compile_time_measurement(tmp_path):
    rows = [{"arch": "resnet50", "design": "four-pass", "compile_cpu_s": 600.0},
            {"arch": "resnet50", "design": "per-network", "compile_cpu_s": 200.0}]
    (tmp_path / "2030-01-01-compile-time.json").write_text(json.dumps({"rows": rows}))
    expected = gpu_plan.FOUR_PASS_COMPILE_S / 3 + gpu_plan.STEPS_AND_AUTOTUNE_S
    assert gpu_plan.compile_estimate(tmp_path) == pytest.approx(expected)
    empty = tmp_path / "none"
    empty.mkdir()
    assert gpu_plan.compile_estimate(empty) == gpu_plan.FOUR_PASS_COMPILE_S + gpu_plan.STEPS_AND_AUTOTUNE_S


def test_second_look_takes_what_calls_one_and_two_left(tmp_path):
    plan = gpu_plan.Plan(3, tmp_path, tmp_path, 10.0, tiny=True)
    (tmp_path / "call1.json").write_text(json.dumps({"call": 1, "items": [
        {"name": "env", "status": "ok"}, {"name": "step-r50-eager", "status": "ok"},
        {"name": "step-r50-compiled", "status": "skipped"}, {"name": "tests-cuda", "status": "failed"}]}))
    again = gpu_plan.second_look(plan)
    # in call order: the ok ones not again, the skipped and failed ones, those never started (no record; call 2 has
    # none at all)
    not_ok = [n for n in gpu_plan.CALLS[1] if n not in ("env", "step-r50-eager")]
    assert again == not_ok + gpu_plan.CALLS[2][1:]
    assert "step-r50-compiled" in again and "tests-cuda" in again


def test_items_past_the_budget_are_skipped_with_a_reason(tmp_path):
    out, state = tmp_path / "out", tmp_path / "state"
    assert gpu_plan.run_call(2, out, state, budget=0.0, names=["lars", "step-r18-plain"]) == 0
    record = json.loads((out / "call2.json").read_text())
    assert [e["status"] for e in record["items"]] == ["skipped", "skipped"]
    assert all("time" in e["reason"] for e in record["items"])
    assert (state / "call2.json").read_text() == (out / "call2.json").read_text()


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CPU dry run: with CUDA the items run at full size")
def test_call_four_times_both_decode_modes_and_the_merge_keeps_both(tmp_path):
    """Call 4 times bench_augment on the ImageNet-like JPEGs in both decode modes, one row each,
    written as measured; the merged report keeps both rows (the mode is part of a row's identity)."""
    pytest.importorskip("nvidia.dali")
    names = ["augment-jpeg-224-roi", "augment-jpeg-224-once"]
    assert all(n in gpu_plan.CALLS[4] for n in names)
    out, state = tmp_path / "out", tmp_path / "state"
    assert gpu_plan.run_call(4, out, state, names=names) == 0
    record = json.loads((out / "call4.json").read_text())
    assert [(e["name"], e["status"]) for e in record["items"]] == [(n, "ok") for n in names]
    rows = record["report"]["augment"]
    assert [r["decode"] for r in rows] == ["roi", "once"] and all(r["samples_per_s"] > 0 for r in rows)
    assert all(f"decode {r['decode']}" in r["images"] for r in rows)
    assert [r["decode"] for r in gpu_plan.merge([out])["augment"]] == ["roi", "once"]


@pytest.mark.slow
def test_the_four_calls_dry_run_on_the_cpu(tmp_path):
    env = dict(os.environ, PY=sys.executable, PLAN_INSTALL="0", PLAN_STATE=str(tmp_path / "state"),
               OMP_NUM_THREADS="1", FASTBYOL_CACHE=str(tmp_path / "cache"))
    outs = []
    for call in (1, 2, 3, 4):
        out = tmp_path / f"out{call}"
        res = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_run.sh"), str(call)], cwd=ROOT,
                             env=dict(env, OUT=str(out)), capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
        record = json.loads((out / f"call{call}.json").read_text())
        statuses = {e["name"]: (e["status"], e.get("error") or e.get("reason")) for e in record["items"]}
        assert all(s == "ok" for s, _ in statuses.values()), statuses
        expected = gpu_plan.CALLS[call] if call != 3 else gpu_plan.CALLS[3]  # calls 1-2 left nothing to look at again
        assert [e["name"] for e in record["items"]] == expected
        # what the device tool sends back: at most 8 files, names of letters, digits, '.', '_' and '-'
        files = [p for p in out.rglob("*") if p.is_file()]
        assert 0 < len(files) <= 8 and all(re.fullmatch(r"[A-Za-z0-9._-]+", p.name) for p in files), files
        outs.append(out)
    steps = {(r["arch"], r["variant"], r["compile"]): r for r in json.loads((outs[0] / "call1.json").read_text())[
        "report"]["step"]}
    assert steps[("resnet-tiny", "fastbyol", "default")]["compile_backend"] == "eager"
    assert steps[("resnet-tiny", "fastbyol", "off")]["img_per_s"] > 0
    peers = {(r["arch"], r["variant"], r["compile"]): r for r in json.loads((outs[1] / "call2.json").read_text())[
        "report"]["step"]}  # the peers run in call 2, after call 1's headline rows
    peer = peers[("resnet18", "lightly", "off")]
    assert "img_per_s" in peer or peer["error"].startswith("not installed")
    augment = json.loads((outs[3] / "call4.json").read_text())["report"]["augment"]
    assert [(r["source"], r["decode"]) for r in augment][:2] == [("jpeg", "roi"), ("jpeg", "once")]
    summary = json.loads((outs[3] / "call4-train-summary.json").read_text())
    assert summary["steps"] > 0 and summary["img_per_s"] > 0
    # the merge: one report in gpu_report's format, rendered by gpu_report and readme_table
    merged = tmp_path / "merged"
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_plan.py"), "--merge", *map(str, outs),
                          "--out", str(merged)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    report = json.loads((merged / "report.json").read_text())
    assert len(report["plan"]) == sum(len(gpu_plan.CALLS[c]) for c in (1, 2, 3, 4))
    assert {"ceilings", "lars", "loss", "ema", "step", "augment", "photometric", "train"} <= set(report)
    md = (merged / "report.md").read_text()
    assert "## BYOL training step" in md and "fastbyol train (DALI-fed)" in md and "## Plan items" in md
    table = readme_table.table(report, "report.json")
    assert "| BYOL step |" in table and "LARS step" in table
