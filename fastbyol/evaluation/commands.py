"""`fastbyol eval` and `fastbyol finetune`: load the run (runs.load_encoder), run the protocol, write its JSON into
the run directory, print the run's results table."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import FastByolError
from .results import format_table, table_rows, write_result
from .runs import load_encoder, tiny_batch_note, unfinished_note

PROTOCOLS = ("features", "paper")


def evaluate(run_dir: str | Path, data: str | None = None, init: str = "trained", probe_epochs: int = 100,
             probe_lr: float = 0.2, progress: bool = True, log=print, protocol: str = "features",
             epochs: int | None = None, batch_size: int | None = None) -> dict:
    """`fastbyol eval`: the features protocol (kNN + linear probe on frozen features) or the paper's linear
    protocol; writes RUN_DIR/eval-PROTOCOL.json (eval-PROTOCOL-random.json for --init random)."""
    from .linear import check_probe_args, features_protocol
    from .paper import PAPER_EPOCHS, check_args, paper_protocol

    if protocol not in PROTOCOLS:
        raise FastByolError(f"--protocol must be one of {', '.join(PROTOCOLS)}, got {protocol!r}")
    if protocol == "features":
        check_probe_args(probe_epochs, probe_lr)
    else:
        check_args(epochs or PAPER_EPOCHS, batch_size, (1.0,))
    run = load_encoder(run_dir, data, init)
    _note(unfinished_note(run, _total_steps(run_dir)), log)
    if protocol == "features":
        result = features_protocol(run, probe_epochs, probe_lr, progress)
    else:
        result = paper_protocol(run, epochs or PAPER_EPOCHS, batch_size, progress=progress, log=log)
    if protocol == "paper":
        _note(tiny_batch_note(result["batch_size"], result["fit_images"], batch_size is not None), log)
    result = dict(run_dir=str(run_dir), init=init, dataset=run.dataset_name, arch=run.cfg.model.arch, step=run.step,
                  **result)
    out = write_result(run.result_path(f"eval-{protocol}"), result)
    for line in format_table(table_rows(run_dir)):
        log(line)
    log(f"eval: {out}")
    return result


def finetune_run(run_dir: str | Path, fraction: float | None = None, subset_file: str | None = None,
                 init: str = "trained", data: str | None = None, epochs: int | None = None, lr: float | None = None,
                 batch_size: int | None = None, progress: bool = True, log=print) -> dict:
    """`fastbyol finetune`: writes RUN_DIR/finetune-FRACTION.json (or finetune-SUBSETNAME.json), -random for the
    baseline."""
    from .finetune import (FINETUNE_BASE_LR, FINETUNE_EPOCHS, balanced_subset, check_fraction, finetune,
                           image_picker, read_subset, subset_indices)

    if (fraction is None) == (subset_file is None):
        raise FastByolError("give one of --fraction (0.01 = 1% of the labels) or --subset FILE")
    if fraction is not None:
        check_fraction(fraction)
    kind, entries = read_subset(subset_file) if subset_file is not None else (None, [])
    # file names: the dataset decodes exactly the images they name as its train split (image folders only)
    pick = image_picker(subset_file, entries) if kind == "names" else None
    run = load_encoder(run_dir, data, init, train_pick=pick, pick_what=f"--subset {subset_file}")
    _note(unfinished_note(run, _total_steps(run_dir)), log)
    if kind == "names":
        subset, name = np.arange(len(run.train_labels)), Path(subset_file).stem
    elif kind == "indices":
        subset, name = subset_indices(subset_file, entries, len(run.train_labels)), Path(subset_file).stem
    else:
        subset, name = balanced_subset(run.train_labels, fraction, run.cfg.run.seed), f"{fraction:g}"
    result = finetune(run, subset, epochs or FINETUNE_EPOCHS, FINETUNE_BASE_LR if lr is None else lr, batch_size,
                      progress)
    _note(tiny_batch_note(result["batch_size"], len(subset), batch_size is not None), log)
    result = dict(run_dir=str(run_dir), init=init, dataset=run.dataset_name, arch=run.cfg.model.arch, step=run.step,
                  fraction=fraction, subset_file=None if subset_file is None else str(subset_file), **result)
    out = write_result(run.result_path(f"finetune-{name}"), result)
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
