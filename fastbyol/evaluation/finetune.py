"""Semi-supervised fine-tuning (`fastbyol finetune RUN --fraction 0.01|0.1|1.0`): the whole encoder plus a linear
head trained on a class-balanced, seeded subset of the labelled training split (or the images a `--subset` file
names), top-1 on the test split's centre crops; `--init random` fine-tunes a random-init encoder the same way
(supervised training from scratch on the subset: the baseline).

Settings: the official evaluation code's fine-tuning mode (deepmind-research byol/eval_experiment.py with
freeze_backbone=False, configs/eval.py): one SGD with Nesterov momentum 0.9 for encoder and head, no weight decay,
lr = 0.2 * batch / 256 with a cosine decay to 0 and no warm-up, 80 epochs (of the subset here), BN in train mode;
the views are the linear protocol's (random resized crop and flip, drawn per image and per epoch; centre crop at
test), as the paper's semi-supervised protocol uses spatial augmentations only. The batch is the paper's 1024,
scaled to the subset as the linear protocol scales it (at most an eighth of it, a power of two).
"""

from __future__ import annotations

import copy
import math
import re
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import FastByolError
from ..models import feature_dim_of
from .paper import linear_heads, top1, scaled_batch
from .runs import EvalRun
from .views import TrainViews, centre_crop, normalise

FINETUNE_EPOCHS = 80
FINETUNE_BASE_LR = 0.2


def check_fraction(fraction: float) -> None:
    if not (math.isfinite(fraction) and 0.0 < fraction <= 1.0):
        raise FastByolError(f"--fraction must be in (0, 1] (0.01 = 1% of the labels), got {fraction:g}")


def balanced_subset(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Sorted indices: round(fraction * count) images of each class (at least one), drawn with the seed."""
    check_fraction(fraction)
    rng = np.random.default_rng([seed, 0xF1E7])
    picked = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        k = max(1, min(len(members), round(fraction * len(members))))
        picked.append(rng.choice(members, size=k, replace=False))
    return np.sort(np.concatenate(picked))


MAX_SUBSET_BYTES = 1 << 28  # a subset file of more than 256 MB is no list of image names
INDEX = re.compile(r"[0-9]+")  # an index line: ASCII digits only (str.isdigit also takes '²' and other digits)


def read_subset(path: str | Path) -> tuple[str, list[tuple[int, str]], bytes]:
    """The entries of a subset file, one a line (blank lines and # comments skipped), with their line numbers, and
    the file's bytes (its digest names the result): ("indices", ...) when every entry is a 0-based index into the
    labelled train split (ASCII digits), ("names", ...) when none is (file names: image_picker). A mixture, a file
    naming nothing, one that is not UTF-8 text or not a regular file is one line."""
    path = Path(path)
    try:
        if not path.is_file():
            raise FastByolError(f"--subset {path}: no such file")
        if path.stat().st_size > MAX_SUBSET_BYTES:
            raise FastByolError(f"--subset {path}: {path.stat().st_size} bytes, more than a list of images holds "
                                f"(at most {MAX_SUBSET_BYTES})")
        contents = path.read_bytes()
        lines = contents.decode("utf-8").splitlines()
    except OSError as e:
        raise FastByolError(f"--subset {path}: unreadable ({e.strerror or type(e).__name__})") from None
    except UnicodeDecodeError as e:
        raise FastByolError(f"--subset {path}: not UTF-8 text (byte {e.start})") from None
    entries = [(n, line.split("#", 1)[0].strip()) for n, line in enumerate(lines, 1)]
    entries = [(n, e) for n, e in entries if e]
    if not entries:
        raise FastByolError(f"--subset {path}: names no image (one 0-based index or file name a line)")
    numbers = [(n, e) for n, e in entries if INDEX.fullmatch(e)]
    if numbers and len(numbers) < len(entries):
        n_name, name = next((n, e) for n, e in entries if not INDEX.fullmatch(e))
        raise FastByolError(f"--subset {path}: mixes indices (line {numbers[0][0]}: {numbers[0][1]!r}) and file "
                            f"names (line {n_name}: {name!r}); use one form")
    return ("indices" if numbers else "names"), entries, contents


def subset_indices(path: str | Path, entries: list[tuple[int, str]], n_train: int) -> np.ndarray:
    """Sorted unique indices of an "indices" subset file; one line naming an entry outside the split."""
    values = []
    for n, entry in entries:
        digits = entry.lstrip("0") or "0"
        if len(digits) > 18 or int(digits) >= n_train:  # 18 digits: below 2**63, and int() never meets a huge text
            raise FastByolError(f"--subset {path}, line {n}: {entry[:40]!r} is not an image of the labelled train "
                                f"split ({n_train} images, indices 0..{n_train - 1})")
        values.append(int(digits))
    return np.unique(np.asarray(values, dtype=np.int64))


def image_picker(path: str | Path, entries: list[tuple[int, str]]):
    """For a "names" subset file: pick(relpaths) -> sorted positions in `relpaths` (the train split's files,
    relative to its root, "/"-separated) of the images the file names. An entry is such a relative path, or a bare
    file name unique in the split (ImageNet's subset lists: `n01440764_10026.JPEG`). One line naming the first
    entry that is missing or ambiguous (and where it could be)."""

    def pick(relpaths: list[str]) -> np.ndarray:
        where = {rel: i for i, rel in enumerate(relpaths)}
        by_name: dict[str, list[int]] = {}
        for i, rel in enumerate(relpaths):
            by_name.setdefault(rel.rsplit("/", 1)[-1], []).append(i)
        picked = []
        for n, entry in entries:
            rel = entry.replace("\\", "/").removeprefix("./")
            if rel in where:
                picked.append(where[rel])
                continue
            found = by_name.get(rel, []) if "/" not in rel else []
            if len(found) > 1:
                raise FastByolError(f"--subset {path}, line {n}: {entry!r} is the name of {len(found)} images of the "
                                    f"train split ({relpaths[found[0]]}, {relpaths[found[1]]}): give its path "
                                    "relative to the train folder")
            if not found:
                raise FastByolError(f"--subset {path}, line {n}: {entry!r} is not an image of the train split "
                                    f"({len(relpaths)} images; a path relative to the train folder, or a file name)")
            picked.append(found[0])
        return np.unique(np.asarray(picked, dtype=np.int64))

    return pick


def finetune(run: EvalRun, subset: np.ndarray, epochs: int = FINETUNE_EPOCHS, base_lr: float = FINETUNE_BASE_LR,
             batch_size: int | None = None, progress: bool = True) -> dict:
    """Top-1 (%) on the test split after fine-tuning the run's encoder and a linear head on `subset`."""
    from tqdm import tqdm

    if epochs <= 0:
        raise FastByolError(f"--epochs must be > 0, got {epochs}")
    if not (math.isfinite(base_lr) and base_lr > 0):
        raise FastByolError(f"--lr must be a finite number > 0, got {base_lr}")
    cfg, device = run.cfg, run.device
    batch = batch_size or scaled_batch(len(subset))
    if batch < 2 or batch > len(subset):
        raise FastByolError(f"--batch-size must be in 2..{len(subset)} (the subset's images), got {batch}")
    encoder = copy.deepcopy(run.encoder).train()
    head = linear_heads(feature_dim_of(encoder, cfg.data.image_size), run.num_classes, 1, cfg.run.seed, device)[0]
    lr = base_lr * batch / 256
    opt = torch.optim.SGD([*encoder.parameters(), *head.parameters()], lr=lr, momentum=0.9, nesterov=True,
                          weight_decay=0.0)
    views = TrainViews(run.train_images[subset], batch, cfg.data.image_size, seed=cfg.run.seed,
                       num_threads=cfg.data.num_threads)
    labels = torch.as_tensor(run.train_labels[subset])
    total, step = epochs * views.steps_per_epoch, 0
    for _ in tqdm(range(epochs), desc="fine-tune", unit="epoch", disable=not progress):
        for idx, crops in views.epoch():
            loss = F.cross_entropy(head(encoder(normalise(crops, device))), labels[idx].to(device))
            for group in opt.param_groups:
                group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / total))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
    encoder.eval()
    test = centre_crop(run.test_images, cfg.data.image_size)
    with torch.no_grad():
        feats = torch.cat([encoder(normalise(test[i:i + 512], device)).float() for i in range(0, len(test), 512)])
    per_class = np.bincount(run.train_labels[subset], minlength=run.num_classes)
    return dict(top1=top1(head, feats, run.test_labels), subset_images=len(subset),
                subset_per_class=per_class.tolist(), epochs=epochs, batch_size=batch, base_lr=base_lr, lr=lr,
                optimizer="SGD, Nesterov momentum 0.9, no weight decay, cosine lr to 0, no warm-up")
