"""`fastbyol eval` and `fastbyol finetune`: load the run (runs.load_encoder), run the protocol, write its JSON into
the run directory under the name of everything that makes the figure different (results.ResultKey), print the run's
results table. Both hold the run folder's lock from the load to the write (fastbyol.run.outputs): two of them, or one
and a training run, never write the folder at once."""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

from ..errors import FastByolError
from ..run.disk import FolderLock
from .results import ResultKey, format_table, subset_tag, table_rows, write_result
from .runs import load_encoder, tiny_batch_note, unfinished_note

PROTOCOLS = ("features", "paper")


def lock_run(run_dir: str | Path) -> FolderLock:
    """The run folder's lock, for a command that writes its result there (refused in one line while another command,
    a training run included, holds it)."""
    if not Path(run_dir).is_dir():
        raise FastByolError(f"run directory not found: {run_dir}")
    return FolderLock(Path(run_dir), "in use by another fastbyol command (pid {pid}), a training run or an "
                                     "evaluation: wait for it to finish")


@dataclass(frozen=True)
class EvalSettings:
    """The settings of a protocol that change its figure; None where the protocol's own default applies."""

    probe_epochs: int = 100  # features: epochs of the linear probe
    probe_lr: float = 0.2  # features: peak lr of the linear probe
    epochs: int = 80  # paper: of the linear classifier (PAPER_EPOCHS); finetune: over the subset (FINETUNE_EPOCHS)
    lr: float = 0.2  # finetune: base lr (FINETUNE_BASE_LR)
    batch_size: int | None = None  # paper, finetune: the batch (None: scaled to the data)

    USED = {"features": ("probe_epochs", "probe_lr"), "paper": ("epochs", "batch_size"),
            "finetune": ("epochs", "lr", "batch_size")}

    def differing(self, protocol: str) -> tuple[tuple[str, object], ...]:
        """(name, value) of the settings `protocol` reads that differ from their defaults: part of its result's
        name."""
        defaults = {f.name: f.default for f in fields(self)}
        return tuple((name, getattr(self, name)) for name in self.USED[protocol]
                     if getattr(self, name) != defaults[name])


def evaluate(run_dir: str | Path, data: str | None = None, init: str = "trained", protocol: str = "features",
             settings: EvalSettings = EvalSettings(), progress: bool = True, log=print, own=None) -> dict:
    """`fastbyol eval`: the features protocol (kNN + linear probe on frozen features) or the paper's linear
    protocol; writes RUN_DIR/eval-PROTOCOL[...].json (results.ResultKey). own: models.OwnEncoders, the encoders of
    the user's own this command may import (`--arch`, `encoder=`)."""
    from .linear import check_probe_args, features_protocol
    from .paper import check_args, paper_protocol

    if protocol not in PROTOCOLS:
        raise FastByolError(f"--protocol must be one of {', '.join(PROTOCOLS)}, got {protocol!r}")
    if protocol == "features":
        check_probe_args(settings.probe_epochs, settings.probe_lr)
    else:
        check_args(settings.epochs, settings.batch_size, (1.0,))
    with lock_run(run_dir):  # the result goes into the run's folder: one writer at a time
        run = load_encoder(run_dir, data, init, own=own)
        _note(unfinished_note(run, _total_steps(run_dir)), log)
        if protocol == "features":
            result = features_protocol(run, settings.probe_epochs, settings.probe_lr, progress)
        else:
            result = paper_protocol(run, settings.epochs, settings.batch_size, progress=progress, log=log)
            _note(tiny_batch_note(result["batch_size"], result["fit_images"], settings.batch_size is not None), log)
        key = ResultKey(protocol, data=run.data_key, settings=settings.differing(protocol), init=init)
        result = dict(run_dir=str(run_dir), run_id=run.run_id, init=init, dataset=run.dataset_name,
                      arch=run.cfg.model.arch, step=run.step, **result)
        out = write_result(run.run_dir, key, result)
    for line in format_table(table_rows(run_dir)):
        log(line)
    log(f"eval: {out}")
    return result


def finetune_run(run_dir: str | Path, subset: float | str | Path, init: str = "trained", data: str | None = None,
                 settings: EvalSettings = EvalSettings(), progress: bool = True, log=print, own=None) -> dict:
    """`fastbyol finetune`: `subset` is a fraction of the labels (a float: --fraction) or a subset file (--subset);
    writes RUN_DIR/finetune-FRACTION[...].json or finetune-subset-NAME-DIGEST[...].json (results.ResultKey), -random
    for the baseline."""
    from .finetune import balanced_subset, check_fraction, finetune, image_picker, read_subset, subset_indices

    number = isinstance(subset, (int, float)) and not isinstance(subset, bool)
    fraction = float(subset) if number else None
    subset_file = None if fraction is not None else subset
    if fraction is not None:
        check_fraction(fraction)
    kind, entries, contents = read_subset(subset_file) if subset_file is not None else (None, [], b"")
    # file names: the dataset decodes exactly the images they name as its train split (image folders only)
    pick = image_picker(subset_file, entries) if kind == "names" else None
    with lock_run(run_dir):  # the result goes into the run's folder: one writer at a time
        run = load_encoder(run_dir, data, init, train_pick=pick, pick_what=f"--subset {subset_file}", own=own)
        _note(unfinished_note(run, _total_steps(run_dir)), log)
        if kind == "names":
            chosen = np.arange(len(run.train_labels))
        elif kind == "indices":
            chosen = subset_indices(subset_file, entries, len(run.train_labels))
        else:
            chosen = balanced_subset(run.train_labels, fraction, run.cfg.run.seed)
        result = finetune(run, chosen, settings.epochs, settings.lr, settings.batch_size, progress)
        _note(tiny_batch_note(result["batch_size"], len(chosen), settings.batch_size is not None), log)
        tag = f"{fraction:g}" if fraction is not None else subset_tag(subset_file, contents)
        key = ResultKey("finetune", tag, data=run.data_key, settings=settings.differing("finetune"), init=init)
        result = dict(run_dir=str(run_dir), run_id=run.run_id, init=init, dataset=run.dataset_name,
                      arch=run.cfg.model.arch, step=run.step, fraction=fraction,
                      subset_file=None if subset_file is None else str(subset_file), **result)
        out = write_result(run.run_dir, key, result)
    for line in format_table(table_rows(run_dir)):
        log(line)
    log(f"finetune: {out}")
    return result


def _note(text: str | None, log) -> None:
    if text:
        log(text)


def _total_steps(run_dir: str | Path):
    """The run's total steps from its config.json's resolved values ('?' where they cannot be read)."""
    import json

    from ..run.names import CONFIG

    try:
        return json.loads((Path(run_dir) / CONFIG).read_text())["resolved"]["total_steps"]
    except (OSError, ValueError, KeyError, TypeError):
        return "?"
