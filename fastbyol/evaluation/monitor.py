"""The evaluations the trainer runs itself: the kNN monitor on a fixed subset between epochs, the final kNN of the
trained and of the random-init encoder, and the online probe's test top-1.

Each runs on rank 0 outside the timed region (the caller syncs the ranks after it), on the encoder in eval mode and
the un-augmented labelled splits (`fastbyol.evaluation.features`).
"""

from __future__ import annotations

import numpy as np
import torch

from ..config import Config
from ..models import BYOL
from .features import KnnSettings, knn_top1


def evenly_spaced(n: int, k: int) -> np.ndarray:
    """k indices spread evenly over range(n) (all of them when k >= n): a fixed subset, the same at every check."""
    return np.linspace(0, n - 1, min(k, n)).astype(int)


def evaluate_knn(model: BYOL | torch.nn.Module, dataset, cfg: Config, device: torch.device,
                 subset: int | None = None) -> float | None:
    """kNN top-1 (%) of an encoder (a BYOL model's online encoder) on the labelled splits; None when there are none.

    subset: at most this many bank images and a quarter as many queries (fixed, evenly spaced): the cheap online
    monitor; None: the full splits."""
    if not dataset.has_knn:
        return None
    bank, queries = slice(None), slice(None)
    if subset is not None:
        bank = evenly_spaced(len(dataset.train_images), subset)
        queries = evenly_spaced(len(dataset.test_images), max(1, subset // 4))
    encoder = model.online_encoder if isinstance(model, BYOL) else model
    return knn_top1(encoder, dataset.train_images[bank], dataset.train_labels[bank], dataset.test_images[queries],
                    dataset.test_labels[queries], dataset.num_classes, KnnSettings.from_config(cfg), device)


def random_init_knn(make_encoder, dataset, cfg: Config, device: torch.device) -> float | None:
    """kNN top-1 of the random-init encoder: rebuilt from the seed exactly as the model's encoder was (the encoder is
    the first thing drawn after seeding), so the figure is the one before training, computed off the critical path."""
    if not dataset.has_knn:
        return None
    torch.manual_seed(cfg.run.seed)
    encoder = make_encoder().to(device=device, memory_format=torch.channels_last)
    return evaluate_knn(encoder, dataset, cfg, device)


def probe_top1(probe, model: BYOL, dataset, device: torch.device, subset: int | None = None) -> float | None:
    """The online probe's test top-1 (%): the kNN check's queries (a quarter of `subset`, evenly spaced) or the
    whole test split; None without a probe."""
    if probe is None:
        return None
    queries = slice(None)
    if subset is not None:
        queries = evenly_spaced(len(dataset.test_images), max(1, subset // 4))
    return probe.accuracy(model.online_encoder, dataset.test_images[queries], dataset.test_labels[queries], device)
