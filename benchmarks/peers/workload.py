"""fastbyol's default workload, for the peer trainers of benchmarks/parity.py: the data, the encoder, the schedules,
the kNN evaluator and the throughput clock, with nothing but torch and numpy (the peers' venv has no fastbyol).

- data: the embedded Fashion-MNIST split (`fastbyol/data/fashion_mnist/t10k-*`), every 5th image held out: 8,000
  images to pretrain and as the kNN bank, 2,000 queries; gray replicated to RGB (fastbyol.data.load_embedded);
- encoder: fastbyol's own `resnet-tiny` with the `small-s2` stem, from `fastbyol/models/resnet.py` imported by path
  (that file imports only torch), built right after torch.manual_seed(seed) as fastbyol's trainer builds it, so the
  random-init encoder of a seed is fastbyol's;
- lr_at: fastbyol.reference.lr_at (linear warmup from 0, cosine to 0), by path as resnet.py;
- kNN: fastbyol.evaluation.features (features of the eval-mode encoder on the un-augmented images, ImageNet-normalised, L2
  normalised; cosine top-k 200, votes exp(sim / 0.1)), copied line for line;
- StepClock: fastbyol's ThroughputMeter rule: the first step is set apart, the evaluations are outside the clock.
tests/test_bench_parity.py checks each copy against fastbyol's own (data, encoder weights, lr, kNN on random features).
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import json
import platform
import sys
import time
import types
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[2]
EMBEDDED = REPO / "fastbyol" / "data" / "fashion_mnist"
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # fastbyol.augment's, which kNN features use
IMAGENET_STD = (0.229, 0.224, 0.225)

# the default workload (fastbyol's fmnist-tiny preset): parity.py passes the same figures to every system
WORKLOAD = dict(arch="resnet-tiny", stem="small-s2", image_size=28, proj_hidden=1024, proj_dim=256, pred_hidden=1024,
                batch_size=128, epochs=16, base_lr=4.0, warmup_epochs=1.0, weight_decay=1e-6, momentum=0.9,
                trust_coefficient=1e-3, tau_base=0.99, crop_min_area=0.2, knn_k=200, knn_temperature=0.1)


def _read_idx_gz(path: Path) -> np.ndarray:
    """An uint8 idx file (gzip): magic 0 0 8 n, n big-endian uint32 sizes, the data."""
    raw = gzip.open(path, "rb").read()
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(train (8000, 28, 28, 3) uint8, train labels int64, test (2000, 28, 28, 3), test labels): the embedded split."""
    images = _read_idx_gz(EMBEDDED / "t10k-images-idx3-ubyte.gz")
    labels = _read_idx_gz(EMBEDDED / "t10k-labels-idx1-ubyte.gz").astype(np.int64)
    test = np.arange(len(images)) % 5 == 0
    rgb = np.ascontiguousarray(np.repeat(images[..., None], 3, axis=3))
    return rgb[~test], labels[~test], rgb[test], labels[test]


def _fastbyol_file(stem: str):
    """fastbyol/<stem>.py imported by path (for files that import only torch, the standard library and their
    neighbours): as a member of a private package whose path is the file's folder, so a relative import of a
    neighbour (models/resnet.py's `from .names import ...`) finds that file, and no package __init__ runs."""
    folder, _, leaf = stem.rpartition("/")
    package = f"_fastbyol_{folder.replace('/', '_') or 'root'}_by_path"
    if package not in sys.modules:
        module = types.ModuleType(package)
        module.__path__ = [str(REPO / "fastbyol" / folder)]
        sys.modules[package] = module
    name = f"{package}.{leaf}"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, REPO / "fastbyol" / f"{stem}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def fastbyol_models():
    """fastbyol/models/resnet.py, imported by path (it imports only torch)."""
    return _fastbyol_file("models/resnet")


def build_encoder(seed: int | None = None) -> torch.nn.Module:
    """fastbyol's resnet-tiny / small-s2 encoder, (B, 3, 28, 28) -> (B, 128); seeded first when seed is given."""
    if seed is not None:
        torch.manual_seed(seed)
    assert WORKLOAD["arch"] == "resnet-tiny"  # the one encoder the peers train (fastbyol's registry: resnet_tiny)
    return fastbyol_models().resnet_tiny(WORKLOAD["stem"])


def lr_at(step: int, total_steps: int, warmup_steps: int, peak_lr: float) -> float:
    """fastbyol.reference.lr_at itself (fastbyol/reference.py imported by path: it imports only torch)."""
    return _fastbyol_file("reference").lr_at(step, total_steps, warmup_steps, peak_lr)


def peer_args(description: str, *extra: tuple[tuple, dict]):
    """The command line both peer scripts share (seed, budget, smoke-test limit, result and encoder files), plus
    their own arguments `extra` as (args, kwargs) pairs; parsed by the caller."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--epochs", type=int, default=WORKLOAD["epochs"])
    ap.add_argument("--batch-size", type=int, default=WORKLOAD["batch_size"])
    for args, kwargs in extra:
        ap.add_argument(*args, **kwargs)
    ap.add_argument("--limit-images", type=int, default=0, help="pretrain on the first N images only (smoke tests)")
    ap.add_argument("--out", default="", help="also write the JSON result here")
    ap.add_argument("--save-encoder", default="", help="write the trained encoder's state_dict here (torch.save): "
                    "parity.py's held-out kNN reads it")
    return ap


# --------------------------------------------------------------------------- kNN: fastbyol/evaluation/features.py, line for line
@torch.no_grad()
def extract_features(encoder: torch.nn.Module, images: np.ndarray, batch_size: int = 512) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, D) float32 L2-normalized features (fastbyol.evaluation.features.extract_features, CPU)."""
    was_training = encoder.training
    encoder.eval()
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255
    feats = []
    for start in range(0, len(images), batch_size):
        x = torch.from_numpy(images[start:start + batch_size])
        x = x.permute(0, 3, 1, 2).float()  # (b, 3, H, W), channels_last view of NHWC
        feats.append(F.normalize(encoder((x - mean) / std).float(), dim=1))
    encoder.train(was_training)
    return torch.cat(feats)


@torch.no_grad()
def knn_predict(train_feats: torch.Tensor, train_labels: torch.Tensor, query_feats: torch.Tensor, num_classes: int,
                k: int = 200, temperature: float = 0.1, chunk: int = 1024) -> torch.Tensor:
    """Predicted class of each query (fastbyol.evaluation.features.knn_predict)."""
    k = min(k, len(train_feats))
    preds = []
    for start in range(0, len(query_feats), chunk):
        sim = query_feats[start:start + chunk] @ train_feats.T  # (q, N)
        top_sim, top_idx = sim.topk(k, dim=1)  # (q, k)
        weights = (top_sim / temperature).exp()
        votes = torch.zeros(len(sim), num_classes, device=sim.device, dtype=weights.dtype)
        votes.scatter_add_(1, train_labels[top_idx], weights)
        preds.append(votes.argmax(dim=1))
    return torch.cat(preds)


def knn_top1(encoder: torch.nn.Module, train_images: np.ndarray, train_labels: np.ndarray, test_images: np.ndarray,
             test_labels: np.ndarray, num_classes: int = 10, k: int = 200, temperature: float = 0.1) -> float:
    """kNN top-1 (%) on the test split with the train split as the bank (fastbyol.evaluation.features.knn_top1)."""
    train_feats = extract_features(encoder, train_images)
    test_feats = extract_features(encoder, test_images)
    pred = knn_predict(train_feats, torch.as_tensor(train_labels), test_feats, num_classes, k, temperature)
    return 100.0 * (pred == torch.as_tensor(test_labels)).float().mean().item()


# ------------------------------------------------------------------------------------------------------ the clock
class StepClock:
    """Training img/s as fastbyol's ThroughputMeter counts it: time from the start of each epoch's loop to its end,
    the waits for data included, the first step of the run set apart (warm-up), evaluations outside."""

    def __init__(self, batch_images: int):
        self.batch_images = batch_images
        self.steps, self.seconds, self.warmup_seconds = 0, 0.0, 0.0
        self._started: float | None = None
        self._first = True

    def resume(self) -> None:
        self._started = time.perf_counter()

    def step(self) -> None:
        if self._first:  # the run's first step: set apart
            now = time.perf_counter()
            self.warmup_seconds = now - self._started
            self._started, self._first = now, False
        else:
            self.steps += 1

    def pause(self) -> None:
        self.seconds += time.perf_counter() - self._started
        self._started = None

    def summary(self) -> dict:
        return {"img_per_s": self.steps * self.batch_images / self.seconds if self.seconds else 0.0,
                "train_seconds": self.seconds, "warmup_seconds": self.warmup_seconds, "timed_steps": self.steps}


def versions(*modules: str) -> dict:
    """Installed versions of python, torch, numpy and the named distributions."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__}
    for name in modules:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def write_result(path: str | None, result: dict) -> None:
    """The run's result as one JSON line on stdout (parity.py reads the last line) and, if given, to `path`."""
    text = json.dumps(result)
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text + "\n")
    print(text, flush=True)
