"""kNN: cosine similarity, weighted vote exp(sim / T) over the k nearest."""

import numpy as np
import torch
import torch.nn.functional as F

from fastbyol.knn import knn_predict, knn_top1


def test_weighted_vote_hand_case():
    bank = F.normalize(torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9], [0.2, 0.8]]), dim=1)
    labels = torch.tensor([0, 0, 1, 1, 1])
    q = F.normalize(torch.tensor([[1.0, 0.05], [0.05, 1.0]]), dim=1)
    assert knn_predict(bank, labels, q, 2, k=5, temperature=0.1).tolist() == [0, 1]
    # with k = 5 a plain majority would say class 1 for the first query; the temperature weighting says 0
    assert knn_predict(bank, labels, q[:1], 2, k=5, temperature=10.0).tolist() == [1]


def test_knn_top1_on_separable_images():
    class Flat(torch.nn.Module):
        def forward(self, x):
            return x.flatten(1)

    rng = np.random.default_rng(0)
    # two classes: bright top half or bright bottom half
    imgs = rng.integers(0, 40, (60, 8, 8, 3)).astype(np.uint8)
    labels = np.arange(60) % 2
    imgs[labels == 0, :4] += 200
    imgs[labels == 1, 4:] += 200
    acc = knn_top1(Flat(), imgs[:40], labels[:40], imgs[40:], labels[40:], 2, k=10)
    assert acc == 100.0
    shuffled = knn_top1(Flat(), imgs[:40], rng.permutation(labels[:40]), imgs[40:], labels[40:], 2, k=3)
    assert shuffled < 100.0
