"""Before the first step, the ranks of a torchrun job agree: the same settings, the same data, or every rank stops
in one line naming the first difference (instead of DDP's traceback about parameter shapes, or a job that trains
each rank on something else).

    agree(settings_facts(cfg, resume, step), rank, world_size)       # after the process group, before the data
    agree(dataset_facts(dataset, plan), rank, world_size)            # after the data, before the model

Each rank gathers every rank's facts (one all_gather_object over the bookkeeping's gloo group, bounded by
--dist-timeout) and compares them with rank 0's, in the same order on every rank, so every rank raises the same
line. The facts: every setting of the config (as its flag), the resumed run and step, fastbyol's and torch's
versions; then the dataset's size and fingerprint (fastbyol.data.fingerprint) and the resolved plan (device, local
batch, steps: what the settings and the data make on this machine).
"""

from __future__ import annotations

from dataclasses import fields

from ..errors import FastByolError


def settings_facts(cfg, resume=None, step: int = 0) -> dict[str, object]:
    """{name: value} of what must be equal on every rank before the data is read: each setting (named by its flag),
    the preset, the run resumed and its step, fastbyol's and torch's versions."""
    import torch

    from ..config import SECTIONS, flag_name
    from ..version import __version__

    facts: dict[str, object] = {"--preset": cfg.preset}
    for section in SECTIONS:
        values = getattr(cfg, section)
        facts.update({flag_name(f.name): getattr(values, f.name) for f in fields(values)})
    facts.update({"--resume": None if resume is None else str(resume), "the resumed step": step,
                  "fastbyol": __version__, "torch": torch.__version__})
    return facts


def dataset_facts(dataset, plan) -> dict[str, object]:
    """{name: value} of what must be equal once the data is read: its size and fingerprint, and the plan resolved
    from the settings and the data."""
    from ..data.fingerprint import source_fingerprint

    facts: dict[str, object] = {"the pretraining images": dataset.num_pretraining,
                                "the data's fingerprint": source_fingerprint(dataset.pretraining_source)}
    facts.update({f"the resolved {name.replace('_', ' ')}": value for name, value in plan.to_dict().items()})
    return facts


def first_difference(every: list[dict[str, object]]) -> str | None:
    """'rank R has NAME X, rank 0 has Y' for the first rank and fact (in rank, then insertion order) that differs
    from rank 0's; None when all agree."""
    mine = every[0]
    for r, theirs in enumerate(every[1:], 1):
        for name in list(mine) + [k for k in theirs if k not in mine]:
            a, b = mine.get(name, "nothing"), theirs.get(name, "nothing")
            if a != b:
                return f"rank {r} has {name} {_short(b)}, rank 0 has {_short(a)}"
    return None


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def agree(facts: dict[str, object], rank: int, world_size: int) -> None:
    """Every rank's facts equal rank 0's (collective), else FastByolError on every rank, naming the first
    difference. Nothing with one process."""
    if world_size == 1:
        return
    from .distributed import gather_objects

    diff = first_difference(gather_objects(facts, world_size))
    if diff is not None:
        raise FastByolError(f"the {world_size} processes of this job disagree before the first step: {diff}; start "
                            "every process with the same settings, on the same data")
