"""The BYOL paper's ImageNet linear protocol (`fastbyol eval RUN --protocol paper`), scaled to the data.

The encoder is frozen and in eval mode (BN running statistics); a linear classifier on its pooled features is trained
on random resized crops and horizontal flips of the training split, drawn per image and per epoch
(fastbyol.evaluation.views), and tested on the centre crop. Settings, from the paper's appendix (ImageNet linear
evaluation) and the official evaluation config (deepmind-research byol/configs/eval.py, eval_experiment.py,
utils/dataset.py, utils/schedules.py):
- SGD with Nesterov momentum 0.9, no weight decay, cosine decay of the lr to 0 without warm-up, 80 epochs;
- lr = base * batch / 256 (the official schedule's scaling), base from the paper's grid {0.4, 0.3, 0.2, 0.1, 0.05},
  chosen on a held-out part of the training split (paper: 10,009 of ImageNet's 1,281,167 images) with the
  classifier trained on the rest; the test top-1 reported is the chosen lr's;
- batch 1024 (paper); scaled to the data: at most an eighth of the training images (rounded down to a power of
  two), so an epoch has at least 8 steps. The held-out part: the paper's fraction, and at least 500 images (at most
  a sixteenth of the split), so the choice is not decided by a handful of images;
- images normalised with ImageNet's mean and std (the official normalize_images).
The five classifiers train side by side on the same batches (one encoder forward a batch for all five, their losses
summed: each one's gradient is its own), which costs one run instead of five.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import FastByolError
from ..models import feature_dim_of
from .features import extract_features
from .runs import EvalRun
from .views import TrainViews, centre_crop, normalise

PAPER_EPOCHS = 80
PAPER_BATCH = 1024
PAPER_LRS = (0.4, 0.3, 0.2, 0.1, 0.05)
PAPER_HELD_OUT = 10009 / 1281167  # of ImageNet's training images


def scaled_batch(n: int, batch: int = PAPER_BATCH) -> int:
    """The paper's batch, at most n / 8 rounded down to a power of two (>= 2)."""
    return max(2, min(batch, 2 ** int(math.floor(math.log2(max(2, n // 8))))))


def held_out_split(labels: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(fit indices, held-out indices) of the training split, seeded; held-out size as the module docstring says."""
    n = len(labels)
    n_val = max(math.ceil(n * PAPER_HELD_OUT), min(n // 16, 500))
    perm = np.random.default_rng([seed, 0x5E1EC7]).permutation(n)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def check_args(epochs: int, batch_size: int | None, lrs) -> None:
    if epochs <= 0:
        raise FastByolError(f"--epochs must be > 0, got {epochs}")
    if batch_size is not None and batch_size < 2:
        raise FastByolError(f"--batch-size must be >= 2, got {batch_size}")
    if not lrs or not all(math.isfinite(v) and v > 0 for v in lrs):
        raise FastByolError(f"--lrs must be finite numbers > 0, got {lrs}")


def linear_heads(dim: int, classes: int, count: int, seed: int, device) -> torch.nn.ModuleList:
    """`count` linear classifiers, nn.Linear's init drawn from their own generator (the same for every one)."""
    gen = torch.Generator().manual_seed(seed)
    bound = 1.0 / math.sqrt(dim)
    w = (torch.rand(classes, dim, generator=gen) * 2 - 1) * bound
    b = (torch.rand(classes, generator=gen) * 2 - 1) * bound
    heads = torch.nn.ModuleList(torch.nn.utils.skip_init(torch.nn.Linear, dim, classes, device=device)
                                for _ in range(count))
    with torch.no_grad():
        for h in heads:
            h.weight.copy_(w)
            h.bias.copy_(b)
    return heads


def centre_features(run: EvalRun, images: np.ndarray) -> torch.Tensor:
    """The frozen encoder's (eval mode) pooled features of the centre crops of `images`."""
    crops = centre_crop(images, run.cfg.data.image_size).permute(0, 2, 3, 1).numpy()  # NHWC for extract_features
    return extract_features(run.encoder, crops, device=run.device, normalize=False)


@torch.no_grad()
def top1(head: torch.nn.Module, feats: torch.Tensor, labels: np.ndarray) -> float:
    """Top-1 accuracy (%) of a linear head on features (N, D) against labels (N,)."""
    return 100.0 * (head(feats).argmax(1).cpu() == torch.as_tensor(labels)).float().mean().item()


def paper_protocol(run: EvalRun, epochs: int = PAPER_EPOCHS, batch_size: int | None = None,
                   lrs: tuple[float, ...] = PAPER_LRS, progress: bool = True, log=print) -> dict:
    """Linear top-1 (%) on the test split under the paper's protocol; see the module docstring."""
    from tqdm import tqdm

    check_args(epochs, batch_size, lrs)
    cfg, device, encoder = run.cfg, run.device, run.encoder
    fit, val = held_out_split(run.train_labels, cfg.run.seed)
    batch = batch_size or scaled_batch(len(fit))
    views = TrainViews(run.train_images[fit], batch, cfg.data.image_size, seed=cfg.run.seed,
                       num_threads=cfg.data.num_threads)
    fit_labels = torch.as_tensor(run.train_labels[fit])
    encoder.eval()
    heads = linear_heads(feature_dim_of(encoder, cfg.data.image_size), run.num_classes, len(lrs), cfg.run.seed, device)
    peak = [base * batch / 256 for base in lrs]
    opt = torch.optim.SGD([{"params": h.parameters(), "lr": lr} for h, lr in zip(heads, peak)], lr=peak[0],
                          momentum=0.9, nesterov=True, weight_decay=0.0)
    total, step = epochs * views.steps_per_epoch, 0
    for _ in tqdm(range(epochs), desc="paper linear", unit="epoch", disable=not progress):
        for idx, crops in views.epoch():
            with torch.no_grad():
                feats = encoder(normalise(crops, device)).float()
            y = fit_labels[idx].to(device)
            loss = sum(F.cross_entropy(h(feats), y) for h in heads)
            scale = 0.5 * (1 + math.cos(math.pi * step / total))  # cosine to 0, no warm-up (official schedule)
            for group, lr in zip(opt.param_groups, peak):
                group["lr"] = lr * scale
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
    val_f, test_f = centre_features(run, run.train_images[val]), centre_features(run, run.test_images)
    val_top1 = [top1(h, val_f, run.train_labels[val]) for h in heads]
    test_top1 = [top1(h, test_f, run.test_labels) for h in heads]
    best = int(np.argmax(val_top1))
    log(f"paper protocol: base lr {lrs[best]:g} chosen on {len(val)} held-out images "
        f"(held-out top-1 {', '.join(f'{lr:g}: {v:.1f}%' for lr, v in zip(lrs, val_top1))})")
    return dict(protocol="paper", linear_top1=test_top1[best], base_lr=lrs[best], lr=peak[best],
                held_out_top1=dict(zip(map(str, lrs), val_top1)), test_top1_per_lr=dict(zip(map(str, lrs), test_top1)),
                epochs=epochs, batch_size=batch, held_out=len(val), fit_images=len(fit),
                optimizer="SGD, Nesterov momentum 0.9, no weight decay, cosine lr to 0, no warm-up")
