"""Shared test set-up: the Triton interpreter on CPU-only machines, a seeded RNG for every test, the kernel backend
switch, small idx data and the tests' two-view loaders."""

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
def select_backend():
    """Select the kernel backend (`fastbyol.kernels.set_backend`) for one test; the previous one comes back after."""
    from fastbyol.kernels import set_backend

    first = set_backend("auto")
    set_backend(first)
    yield set_backend
    set_backend(first)


@pytest.fixture(scope="session")
def small_idx_data(tmp_path_factory):
    """small_idx_data(n_train, n_test) -> an idx folder of the embedded Fashion-MNIST's first images, written once a
    session for each size and shared: read it, never write into it (a test that damages data makes its own with
    `support.small_idx_dataset`)."""
    from .support import small_idx_dataset

    made = {}

    def make(n_train: int = 300, n_test: int = 100):
        if (n_train, n_test) not in made:
            made[n_train, n_test] = small_idx_dataset(tmp_path_factory.mktemp(f"idx-{n_train}-{n_test}"), n_train,
                                                      n_test)
        return made[n_train, n_test]

    return make


@pytest.fixture
def make_loader():
    """make_loader(source, **overrides) -> the tests' TwoViewLoader (support.two_view_loader: batch 16, 16 px views,
    seed 0, the CPU, one DALI thread; any setting, augment option or loader argument overridden by keyword). Those
    still alive when the test ends are closed (DALI stopped, fd 2 given back); they are held weakly, so a test can
    drop one and see it go."""
    import weakref

    from .support import two_view_loader

    made = []

    def make(source, **overrides):
        loader = two_view_loader(source, **overrides)
        made.append(weakref.ref(loader))
        return loader

    yield make
    for ref in made:
        loader = ref()
        if loader is not None:
            loader.close()
