"""The one way every evaluation loads a run: its config, its labelled data (the one data path: the dataset's
labelled train and test splits as uint8 NHWC arrays at the run's image size) and its encoder (trained, from the
checkpoint's online encoder, or random-init of the same architecture, drawn from the run's seed: the baseline)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..run.checkpoint import load_run
from ..config import Config
from ..data import NoFileNames
from ..errors import FastByolError
from ..run.state import nonfinite_tensors

INITS = ("trained", "random")
TINY_BATCH = 16  # below this an evaluation batch gets a note


def encoder_state(ckpt: dict, which: str = "online") -> dict:
    """The encoder's state_dict with torchvision's names (no prefix), from a checkpoint's BYOL state; refused when
    any of its tensors holds a NaN or an Inf."""
    prefix = f"{which}_encoder."
    state = {k[len(prefix):]: v for k, v in ckpt["model"].items() if k.startswith(prefix)}
    if not state:
        raise FastByolError(f"the checkpoint holds no {which} encoder")
    bad = nonfinite_tensors(state)
    if bad:
        raise FastByolError(f"the checkpoint's {which} encoder holds non-finite weights ({bad[0]}"
                            f"{f' and {len(bad) - 1} more' if len(bad) > 1 else ''}): refusing to use it")
    return state


def build_run_encoder(cfg: Config, state: dict | None, own=None, where: str = "config.json") -> torch.nn.Module:
    """The run's encoder architecture, with `state` loaded, or random-init from the run's seed when state is None.
    own: models.OwnEncoders (the encoders of the user's own this command may build; nothing else is imported)."""
    from ..models import OwnEncoders

    torch.manual_seed(cfg.run.seed)  # the random-init encoder is the one the run started from
    try:
        encoder = (own or OwnEncoders()).build(cfg.model.arch, cfg.model.stem, cfg.data.image_size, where)
    except ValueError as e:  # not allowed, or a module:factory that cannot be imported here (one line, exit 2)
        raise FastByolError(str(e).splitlines()[0]) from None
    if state is not None:
        try:
            encoder.load_state_dict(state)
        except RuntimeError as e:  # an encoder given in Python that is not the run's (its checkpoint was not
            raise FastByolError(f"the checkpoint's encoder does not fit the encoder given: "  # checked against it)
                                f"{str(e).strip().splitlines()[0][:200]}") from None
    return encoder


def data_key(cfg: Config, data: str | None) -> str:
    """"" when `data` is the run's own dataset (None, the same name, or the same path), else what it names: the
    resolved path, or the name (embedded, fashion-mnist, synthetic); part of a result's name (results.ResultKey)."""
    if data is None or data == cfg.data.data:
        return ""
    def resolved(spec: str) -> str:
        path = Path(spec).expanduser()
        try:
            return str(path.resolve()) if path.exists() else spec
        except OSError:  # a name too long, a loop: as given
            return spec
    mine, theirs = resolved(cfg.data.data), resolved(data)
    return "" if mine == theirs else theirs


@dataclass
class EvalRun:
    """What an evaluation needs of a run."""

    run_dir: Path
    cfg: Config
    step: int  # the checkpoint's step
    init: str  # trained | random
    encoder: torch.nn.Module  # on `device`, channels_last
    device: torch.device
    dataset_name: str  # the dataset's one-line description
    train_images: np.ndarray  # (N, H, W, 3) uint8, the labelled train split
    train_labels: np.ndarray  # (N,) int64
    test_images: np.ndarray
    test_labels: np.ndarray
    num_classes: int
    gray: bool  # R = G = B (Fashion-MNIST)
    finished: bool = True  # the checkpoint is the run's last (False: the run stopped before its end)
    data_key: str = ""  # data_key(): "" for the run's own dataset
    run_id: str = ""  # the run's id (config.json), recorded in its results


def load_encoder(run_dir: str | Path, data: str | None = None, init: str = "trained", train_pick=None,
                 pick_what: str = "train_pick", own=None) -> EvalRun:
    """A run's encoder and labelled splits; `data` overrides the run's dataset (same image size). train_pick: the
    train split is then the images it picks by file (image folders only: fastbyol.data.resolve_dataset); pick_what
    names what picked them in the error for other datasets. own: models.OwnEncoders (`--arch`, `encoder=`)."""
    from ..data import DataRequest, resolve_dataset

    if init not in INITS:
        raise FastByolError(f"--init must be trained or random, got {init!r}")
    cfg, state, ckpt = load_run(run_dir, own)
    spec = data or cfg.data.data
    try:
        request = DataRequest(image_size=cfg.data.image_size, seed=cfg.run.seed, train_pick=train_pick,
                              test_data="" if data else cfg.data.test_data)
        dataset = resolve_dataset(spec, request, data_format="auto" if data else cfg.data.data_format)
    except NoFileNames:
        raise FastByolError(f"{pick_what}: file names pick images of an image folder (class folders) only; "
                            f"{spec}'s labelled train split is picked by 0-based index") from None
    if dataset.train_labels is None or dataset.test_images is None or dataset.test_labels is None:
        raise FastByolError(f"{dataset.name}: evaluation needs labeled train and test splits")
    encoder = build_run_encoder(cfg, encoder_state(ckpt) if init == "trained" else None, own,
                                where=str(Path(run_dir) / "config.json"))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    encoder = encoder.to(device=device, memory_format=torch.channels_last)
    return EvalRun(Path(run_dir), cfg, state.step, init, encoder, device, dataset.describe(), dataset.train_images,
                   np.asarray(dataset.train_labels, dtype=np.int64), dataset.test_images,
                   np.asarray(dataset.test_labels, dtype=np.int64), dataset.num_classes, dataset.gray,
                   state.finished, data_key(cfg, data), state.run_id)


def unfinished_note(run: EvalRun, total_steps) -> str | None:
    """The note an evaluation of a run that stopped before its end prints: which checkpoint it reads (a run training
    now holds its folder's lock, so no evaluation reads it meanwhile)."""
    if run.finished or run.init != "trained":
        return None
    return (f"note: {run.run_dir} stopped before its end: this evaluates its last checkpoint, step {run.step} of "
            f"{total_steps}, not the finished encoder")


def tiny_batch_note(batch: int, images: int, given: bool) -> str | None:
    """The note for an evaluation batch too small for BatchNorm's statistics and a steady gradient (picked from few
    images: the paper's 1024, at most an eighth of them, a power of two)."""
    if given or batch >= TINY_BATCH:
        return None
    return (f"note: batch {batch}, picked for {images} images (the paper's 1024, at most an eighth of them, a power "
            f"of two): figures from batches this small are noisy; --batch-size sets it")
