"""The online linear probe: a linear classifier trained during pretraining on the detached online-encoder features
of the first view (solo-learn's online head), with its own optimizer, in the same step; its top-1 on the labelled
test split is logged at each kNN check and at the end (metrics.jsonl `online_probe_top1`, TensorBoard
`probe/top1`, `fastbyol plot`).

It never changes BYOL's training: the features reach it through a forward hook on the online encoder that returns
nothing (the forward is unchanged) and are detached (no gradient flows back); its weights are drawn from its own
torch.Generator (BYOL's torch RNG stream is untouched); its optimizer updates its own parameters only. The same
seed therefore gives the same `params_sha256` with and without it (tests/test_online_probe.py). Its step queues
device work only (no host sync); its accuracy is read at the kNN check, which syncs already.

Optimizer: SGD with Nesterov momentum 0.9, lr 0.1 (constant), no weight decay, on features standardised by a
running mean and variance kept by the probe itself (the plain mean over its first 100 steps, then momentum 0.01):
the raw pooled features' scale changes as BYOL trains, and a fixed lr would otherwise be too large early and too
small late. Checkpointed with the run (head, optimizer, statistics): a resumed run's probe continues where it was, so
its figures are those of the uninterrupted run.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..data.dataset import EncodedSource

PROBE_LR = 0.1  # constant; see the module docstring
STATS_MOMENTUM = 0.01  # of the features' running mean and variance, after the first 100 steps
PROBE_SEED_OFFSET = 0x9E3779B9  # the probe's own generator: seed + this, never BYOL's stream


class OnlineProbe:
    """Register on a BYOL model's online encoder; call `step(labels)` after each BYOL step, `accuracy(...)` at a
    check. Features: the encoder's first call in a step (view 1: BYOL.forward encodes v1 first)."""

    def __init__(self, encoder: torch.nn.Module, feature_dim: int, num_classes: int, device: torch.device,
                 seed: int = 0):
        gen = torch.Generator().manual_seed((seed + PROBE_SEED_OFFSET) % 2**63)
        bound = 1.0 / feature_dim ** 0.5  # nn.Linear's default init, drawn from the probe's own generator
        weight = (torch.rand(num_classes, feature_dim, generator=gen) * 2 - 1) * bound
        bias = (torch.rand(num_classes, generator=gen) * 2 - 1) * bound
        self.head = torch.nn.utils.skip_init(torch.nn.Linear, feature_dim, num_classes, device=device)  # no draw
        with torch.no_grad():
            self.head.weight.copy_(weight)
            self.head.bias.copy_(bias)
        self.mean = torch.zeros(feature_dim, device=device)
        self.var = torch.ones(feature_dim, device=device)
        self.optimizer = torch.optim.SGD(self.head.parameters(), lr=PROBE_LR, momentum=0.9, nesterov=True)
        self._seen = 0  # steps whose features entered the running statistics (a host int)
        self._features: list[torch.Tensor] = []
        self._handle = encoder.register_forward_hook(self._capture)

    def _capture(self, module, inputs, output) -> None:
        # training forwards only (the kNN check's eval-mode features are not the probe's), view 1 only (the step's
        # first call); returns None: the encoder's output is unchanged
        if module.training and not self._features:
            self._features.append(output.detach())

    def _standardise(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / (self.var + 1e-5).sqrt()

    @torch.enable_grad()
    def step(self, labels: torch.Tensor | None) -> None:
        """One SGD step of the head on the captured view-1 features (device work only, no host sync)."""
        if not self._features:
            return
        x = self._features.pop().float()
        self._features.clear()
        if labels is None or labels.shape[0] != x.shape[0]:  # shapes are host metadata: no sync
            return
        weight = max(1.0 / (self._seen + 1), STATS_MOMENTUM)  # the plain mean of the first 100 steps, then EMA
        self._seen += 1
        with torch.no_grad():  # running statistics of the features
            self.mean.lerp_(x.mean(0), weight)
            self.var.lerp_(x.var(0, unbiased=False), weight)
        loss = F.cross_entropy(self.head(self._standardise(x)), labels.to(x.device, non_blocking=True))
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()

    @torch.no_grad()
    def accuracy(self, encoder: torch.nn.Module, images: np.ndarray, labels: np.ndarray,
                 device: torch.device) -> float:
        """Top-1 (%) of the head on the encoder's eval-mode features of un-augmented images (sync: at a check)."""
        from .features import extract_features

        feats = extract_features(encoder, images, device=device, normalize=False)  # eval mode: not captured
        self._features.clear()
        pred = self.head(self._standardise(feats)).argmax(1).cpu()
        return 100.0 * (pred == torch.as_tensor(labels)).float().mean().item()

    def state_dict(self) -> dict:
        """Everything the probe needs to continue exactly: the head, its optimizer, the feature statistics."""
        import copy

        return {"head": {k: v.detach().cpu().clone() for k, v in self.head.state_dict().items()},
                "optimizer": copy.deepcopy(self.optimizer.state_dict()), "mean": self.mean.cpu().clone(),
                "var": self.var.cpu().clone(), "seen": self._seen}  # copies: a snapshot, not views of live tensors

    def load_state_dict(self, state: dict, where: str = "checkpoint") -> None:
        """Restore state_dict(); a state of another shape or type is a FastByolError naming `where`."""
        from ..errors import FastByolError

        def same(a, b) -> bool:  # shape and dtype only: a probe that diverged still resumes (it never touches BYOL)
            return isinstance(a, torch.Tensor) and a.shape == b.shape and a.dtype == b.dtype

        head = state.get("head") if isinstance(state, dict) else None
        own = self.head.state_dict()
        ok = (isinstance(head, dict) and set(head) == set(own) and all(same(head[k], own[k]) for k in own)
              and same(state.get("mean"), self.mean) and same(state.get("var"), self.var)
              and isinstance(state.get("seen"), int) and not isinstance(state.get("seen"), bool)
              and state["seen"] >= 0 and isinstance(state.get("optimizer"), dict))
        if ok:
            try:
                optimizer = torch.optim.SGD(self.head.parameters(), lr=PROBE_LR, momentum=0.9, nesterov=True)
                optimizer.load_state_dict(state["optimizer"])
                for param in self.head.parameters():
                    buf = optimizer.state.get(param, {}).get("momentum_buffer")
                    ok = ok and (buf is None or same(buf, param.detach()))
            except (ValueError, KeyError, TypeError, RuntimeError):
                ok = False
        if not ok:
            raise FastByolError(f"{where}: its online probe state does not fit this run's probe (damaged, or "
                                "another number of classes or features)")
        with torch.no_grad():
            self.head.load_state_dict(head)
            self.mean.copy_(state["mean"])
            self.var.copy_(state["var"])
        self.optimizer = optimizer
        self._seen = state["seen"]

    def close(self) -> None:
        self._handle.remove()


def probe_labels(dataset) -> np.ndarray | None:
    """The labels an array source hands the probe (TwoViewLoader's labels=), where the pretraining images are the
    labelled train split; None for encoded files (probe_reads_labels) and where there are none: STL10's
    unlabelled+train pretraining set, synthetic data."""
    if not dataset.has_knn or dataset.pretrain_files is not None or dataset.pretrain_images is not None:
        return None
    return dataset.train_labels


def probe_reads_labels(dataset) -> bool:
    """Whether the loader reads the probe's labels from the files (TwoViewLoader's reader_labels=): labelled encoded
    files (an image folder with class folders and no unlabeled/, shards whose every sample has a `cls`: their DALI
    reader emits the labels); False for unlabelled folders and shards, a folder's unlabeled/ images, arrays."""
    return dataset.has_knn and isinstance(dataset.pretrain_files, EncodedSource) and dataset.pretrain_files.labelled
