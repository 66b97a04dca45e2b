"""The fast linear protocol (`fastbyol eval RUN --protocol features`): kNN and a linear probe on frozen features
extracted once from the un-augmented images (the paper's transfer protocol; its ImageNet protocol, with augmented
views, is fastbyol.evaluation.paper).

The probe: SGD with Nesterov momentum 0.9, a cosine schedule, no weight decay; features standardised with the train
split's mean and std. What it optimises for how long (epochs, lr, batch size, seed) is one ProbeSettings.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import FastByolError
from .features import KnnSettings, extract_features, knn_accuracy
from .runs import EvalRun


@dataclass(frozen=True)
class ProbeSettings:
    """The probe's optimisation: `epochs` passes over the train features in `batch_size` batches, peak lr `lr`
    (cosine to 0 over every step), `seed` for the batches' order."""

    epochs: int = 100
    lr: float = 0.2
    batch_size: int = 256
    seed: int = 0


@torch.enable_grad()
def linear_probe(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                 num_classes: int, probe: ProbeSettings = ProbeSettings(), progress: bool = False) -> float:
    """Top-1 (%) of a linear classifier on frozen features: SGD, Nesterov momentum 0.9, cosine lr, no weight decay."""
    from tqdm import tqdm

    epochs, lr, batch_size = probe.epochs, probe.lr, probe.batch_size

    mean, std = train_x.mean(0, keepdim=True), train_x.std(0, keepdim=True).clamp_min(1e-6)
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    gen = torch.Generator().manual_seed(probe.seed)
    head = torch.nn.Linear(train_x.shape[1], num_classes).to(train_x.device)
    opt = torch.optim.SGD(head.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=0.0)
    steps_per_epoch = math.ceil(len(train_x) / batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * steps_per_epoch)
    for _ in tqdm(range(epochs), desc="linear probe", unit="epoch", disable=not progress):
        order = torch.randperm(len(train_x), generator=gen).to(train_x.device)
        for i in range(steps_per_epoch):
            idx = order[i * batch_size:(i + 1) * batch_size]
            loss = torch.nn.functional.cross_entropy(head(train_x[idx]), train_y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    with torch.no_grad():
        return 100.0 * (head(test_x).argmax(1) == test_y).float().mean().item()


def check_probe_args(probe_epochs: int, probe_lr: float) -> None:
    if probe_epochs <= 0:
        raise FastByolError(f"--probe-epochs must be > 0, got {probe_epochs}")
    if not (math.isfinite(probe_lr) and probe_lr > 0):
        raise FastByolError(f"--probe-lr must be a finite number > 0, got {probe_lr}")


def features_protocol(run: EvalRun, probe_epochs: int = 100, probe_lr: float = 0.2, progress: bool = True) -> dict:
    """kNN and linear-probe top-1 of the run's encoder on frozen features of the labelled splits."""
    cfg, device = run.cfg, run.device
    train_f = extract_features(run.encoder, run.train_images, device=device, progress=progress)
    test_f = extract_features(run.encoder, run.test_images, device=device, progress=progress)
    train_y = torch.as_tensor(run.train_labels, device=device)
    test_y = torch.as_tensor(run.test_labels, device=device)
    knn_top1 = knn_accuracy(train_f, train_y, test_f, test_y, run.num_classes, KnnSettings.from_config(cfg))
    probe = linear_probe(train_f, train_y, test_f, test_y, run.num_classes,
                         ProbeSettings(epochs=probe_epochs, lr=probe_lr, seed=cfg.run.seed), progress=progress)
    return dict(protocol="features", knn_top1=knn_top1, knn_k=cfg.run.knn_k, linear_top1=probe,
                probe_epochs=probe_epochs, probe_lr=probe_lr)
