"""The communication benchmark and the scaling model (benchmarks/step_collectives.py, benchmarks/scale_model.py):
the trace's collectives sorted by kind with their bytes (a planted trace), the profiled `fastbyol train` on 2 and 4
gloo processes (at most 36 collectives a step, BN bytes the same at 4 processes as at 2), the counting rule against
those measurements, and the model's table (its JSON form; ResNet-50 at 64 and 256 H100s).
"""

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import scale_model  # noqa: E402
import step_collectives  # noqa: E402

sys.path.pop(0)


def _op(name, ts, dur, dims, types, tid=1):
    return {"ph": "X", "name": name, "tid": tid, "ts": ts, "dur": dur,
            "args": {"Input Dims": dims, "Input type": types}}


def test_the_trace_is_sorted_into_kinds_with_their_bytes():
    events = [
        # a BN all-reduce: the functional op, the c10d op it calls inside it, the gloo work on another thread
        _op("_c10d_functional::all_reduce", 100, 50, [[2, 65], [], []], ["double", "", ""]),
        _op("c10d::allreduce_", 110, 20, [[[2, 65]], []], ["TensorList", ""]),
        _op("gloo:all_reduce", 120, 30, [[2, 65]], ["double"], tid=7),
        # a gradient bucket and the log point's scalars
        _op("c10d::allreduce_", 300, 20, [[[1000]], []], ["TensorList", ""]),
        _op("gloo:all_reduce", 310, 30, [[1000]], ["c10::BFloat16"], tid=8),
        _op("c10d::allreduce_", 400, 5, [[[]], []], ["TensorList", ""]),
        _op("c10d::allreduce_", 410, 5, [[[1]], []], ["TensorList", ""]),
        _op("gloo:all_reduce", 411, 3, [[1]], ["int"], tid=8),
    ]
    got = step_collectives.step_collectives({"traceEvents": events}, steps=1)["per_step"]
    assert got["batchnorm"] == {"count": 1, "bytes": 2 * 65 * 8}
    assert got["gradient buckets"] == {"count": 1, "bytes": 1000 * 2}  # bf16 (the compression hook)
    assert got["logging"] == {"count": 2, "bytes": 4 + 4}
    assert got["total"]["count"] == 4


@pytest.mark.slow
def test_profiled_training_on_2_and_4_processes_halves_the_collectives(tmp_path):
    """The one-pass step on gloo: BN 11 online + 10 target layers forward and 11 backward = 32, 2 buckets, 2 logging
    (at most 36 a step, from 68 before); BN bytes the same on 4 processes as on 2."""
    rows = {procs: step_collectives.run(procs, sys.executable, tmp_path / f"run{procs}") for procs in (2, 4)}
    for row in rows.values():
        per = row["per_step"]
        assert per["batchnorm"]["count"] == 32 and per["gradient buckets"]["count"] == 2, per
        assert per["total"]["count"] <= 36, per
    assert rows[2]["per_step"]["batchnorm"]["bytes"] == rows[4]["per_step"]["batchnorm"]["bytes"] > 0
    checks = scale_model.check_rule([{"label": "after", "rows": list(rows.values())}])
    assert checks and all(c["agrees"] for c in checks), checks


def test_the_counting_rule_agrees_with_the_committed_measurements():
    files = scale_model._newest_measured()
    assert len(files) == 2, files  # before and after
    checks = scale_model.check_rule([json.loads(Path(f).read_text()) for f in files])
    assert {c["design"] for c in checks} == {"before", "after"} and all(c["agrees"] for c in checks), checks
    before = {c["procs"]: c["measured_bytes"] for c in checks if c["design"] == "before"}
    assert before[4] == 2 * before[2]  # the table grew with the world


@pytest.mark.slow
def test_the_models_table(capsys):
    assert scale_model.main(["--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert set(rows[0]) == {"model", "design", "gpus", "batch_per_gpu", "img_s_per_gpu", "efficiency"}
    assert {r["model"] for r in rows} == {"resnet50", "resnet200x2", "vit_base_patch16"}
    eff = {(r["model"], r["design"], r["gpus"]): r["efficiency"] for r in rows}
    assert all(eff[m, d, 1] == 1.0 for m, d, _ in eff)
    assert all(eff[m, "after", g] >= eff[m, "before", g] for m, _, g in eff)
    assert eff["resnet50", "after", 64] >= 0.70 and eff["resnet50", "after", 256] >= 0.30
    assert eff["resnet50", "before", 64] < 0.6 and eff["resnet50", "before", 256] < 0.2
    assert all(r["batch_per_gpu"] * r["gpus"] == 4096 for r in rows)
