"""Features of a frozen encoder and the kNN evaluation on them (InstDisc / Wu et al. 2018): cosine similarity,
k = 200, and a temperature-0.1 weighted vote, each neighbour voting exp(sim / T) for its label (computed as
exp((sim - max) / T), the same vote without overflow at any temperature). k, T and the queries per similarity chunk
travel together as one KnnSettings (a run's: KnnSettings.from_config(cfg)).

Features come from the encoder in eval mode on the un-augmented images, normalized like the training views.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..augment import IMAGENET_MEAN, IMAGENET_STD


@torch.no_grad()
def extract_features(encoder: torch.nn.Module, images: np.ndarray, batch_size: int = 512,
                     device: str | torch.device = "cpu", progress: bool = False,
                     normalize: bool = True) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, D) float32 features (L2-normalized unless normalize=False), on `device`. Images of
    another type, dtype or layout, and an encoder that does not return (batch, features) floating features on the
    images' device, are one ValueError line."""
    from tqdm import tqdm

    from ..models.byol import check_features

    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] != 3:
        what = (f"{images.dtype} {images.shape}" if isinstance(images, np.ndarray) else type(images).__name__)
        raise ValueError(f"extract_features: images must be a (N, H, W, 3) uint8 numpy array, got {what}")

    was_training = encoder.training
    encoder.eval()
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1) * 255
    feats = []
    for start in tqdm(range(0, len(images), batch_size), desc="features", unit="batch", disable=not progress):
        x = torch.from_numpy(images[start:start + batch_size]).to(device)
        x = x.permute(0, 3, 1, 2).float()  # (b, 3, H, W), channels_last view of NHWC
        x = (x - mean) / std
        y = encoder(x)
        check_features(y, x)
        y = y.float()
        feats.append(F.normalize(y, dim=1) if normalize else y)
    encoder.train(was_training)
    return torch.cat(feats)


@dataclass(frozen=True)
class KnnSettings:
    """How the kNN votes: the k nearest bank features, each weighing exp(sim / temperature); queries go `chunk` at a
    time (a (chunk, N) similarity matrix: what bounds the memory)."""

    k: int = 200
    temperature: float = 0.1
    chunk: int = 1024

    @classmethod
    def from_config(cls, cfg) -> KnnSettings:
        """A run's: its config's --knn-k and --knn-temperature."""
        return cls(k=cfg.run.knn_k, temperature=cfg.run.knn_temperature)


@torch.no_grad()
def knn_predict(train_feats: torch.Tensor, train_labels: torch.Tensor, query_feats: torch.Tensor,
                num_classes: int, knn: KnnSettings = KnnSettings()) -> torch.Tensor:
    """Predicted class of each query; features L2-normalized, so a dot product is the cosine similarity."""
    k, temperature, chunk = min(knn.k, len(train_feats)), knn.temperature, knn.chunk
    preds = []
    for start in range(0, len(query_feats), chunk):
        sim = query_feats[start:start + chunk] @ train_feats.T  # (q, N)
        top_sim, top_idx = sim.topk(k, dim=1)  # (q, k)
        # exp((sim - max) / T): the row's nearest neighbour weighs 1, so no weight overflows at a small T (exp(1 / 1e-3)
        # is inf in float32 and every vote would tie); the common factor exp(max / T) does not change the argmax
        weights = ((top_sim - top_sim[:, :1]) / temperature).exp()
        votes = torch.zeros(len(sim), num_classes, device=sim.device, dtype=weights.dtype)
        votes.scatter_add_(1, train_labels[top_idx], weights)
        preds.append(votes.argmax(dim=1))
    return torch.cat(preds)


def knn_accuracy(train_feats: torch.Tensor, train_labels, query_feats: torch.Tensor, query_labels, num_classes: int,
                 knn: KnnSettings = KnnSettings()) -> float:
    """kNN top-1 accuracy in percent of L2-normalized query features against a labeled bank. Mismatched lengths, a
    k or chunk below 1, a temperature that is not a finite positive number, or labels outside [0, num_classes) are
    one ValueError line."""
    check_knn_args(train_feats, train_labels, query_feats, query_labels, num_classes, knn)
    bank_labels = torch.as_tensor(train_labels, device=train_feats.device)
    pred = knn_predict(train_feats, bank_labels, query_feats, num_classes, knn)
    return 100.0 * (pred.cpu() == torch.as_tensor(query_labels).cpu()).float().mean().item()


def check_knn_args(train_feats, train_labels, query_feats, query_labels, num_classes: int,
                   knn: KnnSettings) -> None:
    """The kNN evaluation's arguments, checked (ValueError naming the first bad one)."""
    k, temperature = knn.k, knn.temperature
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"kNN: k must be an integer >= 1, got {k!r}")
    if isinstance(knn.chunk, bool) or not isinstance(knn.chunk, int) or knn.chunk < 1:
        raise ValueError(f"kNN: chunk must be an integer >= 1, got {knn.chunk!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not (
            math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"kNN: the temperature must be a finite number > 0, got {temperature!r}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"kNN: num_classes must be an integer >= 1, got {num_classes!r}")
    for name, feats, labels in (("bank", train_feats, train_labels), ("query", query_feats, query_labels)):
        if not torch.is_tensor(feats) or feats.ndim != 2 or not feats.is_floating_point():
            raise ValueError(f"kNN: the {name} features must be a (N, D) floating tensor")
        labels = torch.as_tensor(labels)
        if labels.shape != (len(feats),):
            raise ValueError(f"kNN: {len(feats)} {name} features but labels of shape {tuple(labels.shape)}")
        if len(labels) and (labels.is_floating_point() or int(labels.min()) < 0 or int(labels.max()) >= num_classes):
            raise ValueError(f"kNN: the {name} labels must be integers in [0, {num_classes})")
    if train_feats.shape[1] != query_feats.shape[1]:
        raise ValueError(f"kNN: bank features of width {train_feats.shape[1]}, queries of width "
                         f"{query_feats.shape[1]}")
    if not len(train_feats):
        raise ValueError("kNN: the bank is empty")


def knn_top1(encoder: torch.nn.Module, train_images: np.ndarray, train_labels: np.ndarray, test_images: np.ndarray,
             test_labels: np.ndarray, num_classes: int, knn: KnnSettings = KnnSettings(),
             device: str | torch.device = "cpu") -> float:
    """kNN top-1 accuracy in percent on the test split, with the train split as the memory bank."""
    train_feats = extract_features(encoder, train_images, device=device)
    test_feats = extract_features(encoder, test_images, device=device)
    return knn_accuracy(train_feats, train_labels, test_feats, test_labels, num_classes, knn)
