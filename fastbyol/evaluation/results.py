"""The results table of a run: what `fastbyol eval` and `fastbyol finetune` wrote into the run directory
(eval-features.json, eval-paper.json, finetune-FRACTION.json, each with a -random twin for the random-init
baseline) and the kNN and online-probe figures of its summary.json, one row a measure, trained against random init."""

from __future__ import annotations

import json
from pathlib import Path

from ..run.disk import atomic_write_json
from ..run import names

# (label, file stem, key) of each row, in the order the table prints them
ROWS = [("kNN (features)", "eval-features", "knn_top1"), ("linear (features)", "eval-features", "linear_top1"),
        ("linear (paper protocol)", "eval-paper", "linear_top1")]


def write_result(path: Path, result: dict) -> Path:
    atomic_write_json(path, result)
    return path


def _read(path: Path) -> dict | None:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _number(record: dict | None, key: str) -> float | None:
    value = None if record is None else record.get(key)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def table_rows(run_dir: str | Path) -> list[tuple[str, float | None, float | None]]:
    """(measure, trained top-1, random-init top-1) of every result found in the run directory."""
    run_dir = Path(run_dir)
    rows = []
    summary = _read(run_dir / names.SUMMARY)
    if _number(summary, "online_probe_top1") is not None:
        rows.append(("online probe (pretraining)", _number(summary, "online_probe_top1"), None))
    for label, stem, key in ROWS:
        trained, random = _read(run_dir / f"{stem}.json"), _read(run_dir / f"{stem}-random.json")
        if trained is not None or random is not None:
            rows.append((label, _number(trained, key), _number(random, key)))
    fractions = sorted({p.name[len("finetune-"):-len(".json")].removesuffix("-random")
                        for p in run_dir.glob("finetune-*.json")}, key=lambda f: float(f) if _is_float(f) else 2.0)
    for f in fractions:
        trained, random = _read(run_dir / f"finetune-{f}.json"), _read(run_dir / f"finetune-{f}-random.json")
        label = f"fine-tune {float(f) * 100:g}% labels" if _is_float(f) else f"fine-tune {f}"
        rows.append((label, _number(trained, "top1"), _number(random, "top1")))
    return rows


def _is_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def format_table(rows) -> list[str]:
    """Lines of the table: measure, trained, random init, gain (points)."""
    def cell(v):
        return f"{v:.2f}%" if v is not None else "-"

    lines = [f"{'top-1 on the test split':<28}{'trained':>10}{'random init':>13}{'gain':>9}"]
    for label, trained, random in rows:
        gain = f"{trained - random:+.2f}" if trained is not None and random is not None else "-"
        lines.append(f"{label:<28}{cell(trained):>10}{cell(random):>13}{gain:>9}")
    return lines
