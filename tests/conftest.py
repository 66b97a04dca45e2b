"""Shared test set-up: the Triton interpreter on CPU-only machines, a seeded RNG for every test."""

import os

import torch

# TRITON_INTERPRET must be set before triton is imported, so the same kernel source runs on CPU tensors.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)
    np.random.seed(0)
    yield


@pytest.fixture
def kernels_path():
    """Select the kernel backend (`fastbyol.kernels.set_backend`) for one test; the previous one comes back after."""
    from fastbyol.kernels import set_backend

    first = set_backend("auto")
    set_backend(first)
    yield set_backend
    set_backend(first)
