"""kNN: cosine similarity, weighted vote exp(sim / T) over the k nearest."""

import numpy as np
import torch
import torch.nn.functional as F

from fastbyol.evaluation.features import KnnSettings, knn_predict, knn_top1


def test_weighted_vote_hand_case():
    bank = F.normalize(torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9], [0.2, 0.8]]), dim=1)
    labels = torch.tensor([0, 0, 1, 1, 1])
    q = F.normalize(torch.tensor([[1.0, 0.05], [0.05, 1.0]]), dim=1)
    assert knn_predict(bank, labels, q, 2, KnnSettings(k=5, temperature=0.1)).tolist() == [0, 1]
    # with k = 5 a plain majority would say class 1 for the first query; the temperature weighting says 0
    assert knn_predict(bank, labels, q[:1], 2, KnnSettings(k=5, temperature=10.0)).tolist() == [1]


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
    acc = knn_top1(Flat(), imgs[:40], labels[:40], imgs[40:], labels[40:], 2, KnnSettings(k=10))
    assert acc == 100.0
    shuffled = knn_top1(Flat(), imgs[:40], rng.permutation(labels[:40]), imgs[40:], labels[40:], 2, KnnSettings(k=3))
    assert shuffled < 100.0


def test_vote_is_stable_at_a_tiny_temperature():
    """At T = 1e-3, exp(sim / T) overflows float32 (every weight inf, the argmax falls on class 0); the vote must
    still be the float64 one."""
    from fastbyol.evaluation.features import knn_predict

    torch.manual_seed(3)
    bank = torch.nn.functional.normalize(torch.randn(300, 16), dim=1)
    labels = torch.randint(0, 7, (300,))
    queries = torch.nn.functional.normalize(torch.randn(40, 16), dim=1)
    for temperature in (1e-3, 0.01, 0.1):
        got = knn_predict(bank, labels, queries, 7, KnnSettings(k=50, temperature=temperature))
        sim = queries.double() @ bank.double().T
        top_sim, top_idx = sim.topk(50, dim=1)
        w = ((top_sim - top_sim[:, :1]) / temperature).exp()  # float64 reference, shifted: exact argmax
        votes = torch.zeros(40, 7, dtype=torch.float64).scatter_add_(1, labels[top_idx], w)
        assert torch.equal(got, votes.argmax(dim=1)), temperature
        assert len(set(got.tolist())) > 1  # not everything on one class
