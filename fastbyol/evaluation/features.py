"""Features of a frozen encoder and the kNN evaluation on them (InstDisc / Wu et al. 2018): cosine similarity,
k = 200, and a temperature-0.1 weighted vote, each neighbour voting exp(sim / T) for its label (computed as
exp((sim - max) / T), the same vote without overflow at any temperature).

Features come from the encoder in eval mode on the un-augmented images, normalized like the training views.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..augment import IMAGENET_MEAN, IMAGENET_STD


@torch.no_grad()
def extract_features(encoder: torch.nn.Module, images: np.ndarray, batch_size: int = 512,
                     device: str | torch.device = "cpu", progress: bool = False,
                     normalize: bool = True) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, D) float32 features (L2-normalized unless normalize=False), on `device`."""
    from tqdm import tqdm

    was_training = encoder.training
    encoder.eval()
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1) * 255
    feats = []
    for start in tqdm(range(0, len(images), batch_size), desc="features", unit="batch", disable=not progress):
        x = torch.from_numpy(images[start:start + batch_size]).to(device)
        x = x.permute(0, 3, 1, 2).float()  # (b, 3, H, W), channels_last view of NHWC
        y = encoder((x - mean) / std).float()
        feats.append(F.normalize(y, dim=1) if normalize else y)
    encoder.train(was_training)
    return torch.cat(feats)


@torch.no_grad()
def knn_predict(train_feats: torch.Tensor, train_labels: torch.Tensor, query_feats: torch.Tensor,
                num_classes: int, k: int = 200, temperature: float = 0.1, chunk: int = 1024) -> torch.Tensor:
    """Predicted class of each query; features L2-normalized, so a dot product is the cosine similarity."""
    k = min(k, len(train_feats))
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
                 k: int = 200, temperature: float = 0.1) -> float:
    """kNN top-1 accuracy in percent of L2-normalized query features against a labeled bank."""
    bank_labels = torch.as_tensor(train_labels, device=train_feats.device)
    pred = knn_predict(train_feats, bank_labels, query_feats, num_classes, k, temperature)
    return 100.0 * (pred.cpu() == torch.as_tensor(query_labels).cpu()).float().mean().item()


def knn_top1(encoder: torch.nn.Module, train_images: np.ndarray, train_labels: np.ndarray, test_images: np.ndarray,
             test_labels: np.ndarray, num_classes: int, k: int = 200, temperature: float = 0.1,
             device: str | torch.device = "cpu") -> float:
    """kNN top-1 accuracy in percent on the test split, with the train split as the memory bank."""
    train_feats = extract_features(encoder, train_images, device=device)
    test_feats = extract_features(encoder, test_images, device=device)
    return knn_accuracy(train_feats, train_labels, test_feats, test_labels, num_classes, k, temperature)
