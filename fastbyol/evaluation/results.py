"""The results of a run: what `fastbyol eval` and `fastbyol finetune` write into the run directory, and the one table
that gathers them with the kNN and online-probe figures of its summary.json, trained against random init.

A result file is named by everything that makes its figure different (`ResultKey`): the protocol, the labelled subset
(a fraction, or a subset file by its name and the digest of its contents), the data when it is not the run's own, the
protocol settings that differ from their defaults, and the init:

    eval-features.json  eval-paper.json  finetune-0.1.json  finetune-subset-1percent-3f2a9c1e.json
    eval-features-data-8c1d2e3f.json (--data other)  finetune-0.1-epochs10-lr0.05.json (settings)  ...-random.json

Each file also records its key, and the table pairs a trained figure only with the random-init figure of the same
key: figures from other data, other settings or another protocol are never on one row.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from ..run.disk import atomic_write_json
from ..run import names

INITS = ("trained", "random")
# (label, key in the result) of each measure a protocol writes, in the order the table prints them
MEASURES = {"features": [("kNN (features)", "knn_top1"), ("linear (features)", "linear_top1")],
            "paper": [("linear (paper protocol)", "linear_top1")], "finetune": [("fine-tune", "top1")]}
_PLAIN = re.compile(r"[^A-Za-z0-9._+-]+")  # what a subset file's name keeps in a result's name


def digest(data: bytes | str, n: int = 8) -> str:
    """The first `n` hex digits of the SHA-256 of `data` (a str is encoded as UTF-8, surrogates kept)."""
    raw = data.encode("utf-8", "surrogateescape") if isinstance(data, str) else data
    return hashlib.sha256(raw).hexdigest()[:n]


def subset_tag(path: str | Path, contents: bytes) -> str:
    """The `subset` part of a result's key for a --subset file: its name, reduced to plain characters and cut to 40
    (a non-UTF-8 or long name stays a valid file name), and the digest of its contents (two files of one name, or a
    file edited between two runs, never share a result)."""
    name = _PLAIN.sub("_", Path(path).stem)[:40].strip("_.") or "subset"
    return f"subset-{name}-{digest(contents)}"


@dataclass(frozen=True)
class ResultKey:
    """What makes a figure different, and so the name of its file."""

    protocol: str  # features | paper | finetune
    subset: str = ""  # finetune: the fraction ("0.1") or subset_tag(); "" for eval
    data: str = ""  # "" for the run's own data, else the --data it was measured on (resolved)
    settings: tuple[tuple[str, object], ...] = ()  # (name, value) of the settings that differ from the defaults
    init: str = "trained"

    def file_name(self) -> str:
        stem = f"finetune-{self.subset}" if self.protocol == "finetune" else f"eval-{self.protocol}"
        if self.data:
            stem += f"-data-{digest(self.data)}"
        stem += "".join(f"-{name}{_plain_value(value)}" for name, value in self.settings)
        return stem + ("-random" if self.init == "random" else "") + ".json"

    def pair(self) -> tuple:
        """Everything but the init: the trained and the random-init figure of one row share it."""
        return self.protocol, self.subset, self.data, self.settings

    def label(self, measure: str) -> str:
        """The table's label: the measure, the subset, and the data and settings where they are not the defaults."""
        if self.protocol == "finetune":
            name, _, tag = self.subset.removeprefix("subset-").rpartition("-")
            measure = (f"fine-tune {float(self.subset) * 100:g}% labels" if _is_fraction(self.subset)
                       else f"fine-tune subset {name} ({tag})")
        extra = ([f"data {Path(self.data).name or self.data}"] if self.data else []) + \
            [f"{name} {value}" for name, value in self.settings]
        return measure + (f" [{', '.join(extra)}]" if extra else "")

    def to_dict(self) -> dict:
        return {**asdict(self), "settings": [list(s) for s in self.settings]}

    @classmethod
    def from_dict(cls, raw) -> ResultKey | None:
        """The key a result file records, or None when it holds none that is well formed (then the file is left out
        of the table)."""
        try:
            key = cls(raw["protocol"], raw["subset"], raw["data"],
                      tuple((str(n), v) for n, v in raw["settings"]), raw["init"])
        except (TypeError, KeyError, ValueError):
            return None
        ok = (key.protocol in MEASURES and key.init in INITS and isinstance(key.subset, str)
              and isinstance(key.data, str))
        return key if ok else None


def write_result(run_dir: Path, key: ResultKey, result: dict) -> Path:
    """RUN_DIR/<key's file name>, written atomically with the key inside."""
    path = Path(run_dir) / key.file_name()
    atomic_write_json(path, {**result, "key": key.to_dict()})
    return path


def _read(path: Path) -> dict | None:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


def _number(record: dict | None, key: str) -> float | None:
    value = None if record is None else record.get(key)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _legacy_key(name: str) -> ResultKey | None:
    """The key of a result written before results recorded theirs, from its file name (eval-PROTOCOL[-random].json,
    finetune-FRACTION[-random].json); None for any other name."""
    stem = name.removesuffix(".json")
    init = "random" if stem.endswith("-random") else "trained"
    stem = stem.removesuffix("-random")
    if stem in ("eval-features", "eval-paper"):
        return ResultKey(stem.removeprefix("eval-"), init=init)
    if stem.startswith("finetune-") and _is_fraction(stem.removeprefix("finetune-")):
        return ResultKey("finetune", stem.removeprefix("finetune-"), init=init)
    return None


def table_rows(run_dir: str | Path) -> list[tuple[str, float | None, float | None]]:
    """(measure, trained top-1, random-init top-1) of every result found in the run directory: one row per measure
    and key (ResultKey.pair), the online probe's figure of summary.json first."""
    run_dir = Path(run_dir)
    rows = []
    summary = _read(run_dir / names.SUMMARY)
    if _number(summary, "online_probe_top1") is not None:
        rows.append(("online probe (pretraining)", _number(summary, "online_probe_top1"), None))
    found: dict[tuple, dict[str, dict]] = {}
    for path in sorted([*run_dir.glob("eval-*.json"), *run_dir.glob("finetune-*.json")]):
        record = _read(path)
        if record is None:
            continue
        key = ResultKey.from_dict(record["key"]) if "key" in record else _legacy_key(path.name)
        if key is None or key.file_name() != path.name:  # a file renamed by hand says nothing it can be trusted for
            continue
        found.setdefault(key.pair(), {})[key.init] = record
    order = {"features": 0, "paper": 1, "finetune": 2}
    for pair in sorted(found, key=lambda p: (order[p[0]], p[2], _subset_order(p[1]), json.dumps(p[3], default=str))):
        key, records = ResultKey(*pair), found[pair]
        for measure, field in MEASURES[key.protocol]:
            rows.append((key.label(measure), _number(records.get("trained"), field),
                         _number(records.get("random"), field)))
    return rows


def _plain_value(value) -> str:
    """A setting's value in a file name: ints as they are, floats by their shortest exact form (0.02, 1e-05)."""
    return repr(float(value)) if isinstance(value, float) else _PLAIN.sub("_", str(value))


def _subset_order(subset: str) -> tuple:
    return (0, float(subset), "") if _is_fraction(subset) else (1, 0.0, subset)


def _is_fraction(text: str) -> bool:
    """Whether `text` is a fraction as --fraction takes it and writes it ("0.1", "1"): a plain decimal in (0, 1]."""
    if not re.fullmatch(r"[0-9]*\.?[0-9]+(e-?[0-9]+)?", text):
        return False
    return 0.0 < float(text) <= 1.0


def format_table(rows) -> list[str]:
    """Lines of the table: measure, trained, random init, gain (points)."""
    def cell(v):
        return f"{v:.2f}%" if v is not None else "-"

    width = max([28, *(len(label) + 2 for label, _, _ in rows)])
    lines = [f"{'top-1 on the test split':<{width}}{'trained':>10}{'random init':>13}{'gain':>9}"]
    for label, trained, random in rows:
        gain = f"{trained - random:+.2f}" if trained is not None and random is not None else "-"
        lines.append(f"{label:<{width}}{cell(trained):>10}{cell(random):>13}{gain:>9}")
    return lines
