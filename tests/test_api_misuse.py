"""The Python API refuses what it cannot compute with, in one line, before anything changes:

- `ema_update_` refuses a tau outside [0, 1] or not finite (a target outside the average), a tau tensor that is not
  0-D and floating or lives on another device (its shape is checked, never its value: no host sync), and list
  elements that are not tensors; every tau in [0, 1] gives the reference's result.
- `byol_loss` / `byol_loss_symmetric` refuse integer tensors and things that are not tensors.
- An encoder whose output has the wrong batch size, a non-floating dtype, or lives on another device than its input
  is named in one line (`EncoderOutputError`), when BYOL is built and at every forward; BYOL refuses widths below 1.
- The kNN helpers refuse a k below 1, a bad temperature, labels outside the classes and mismatched lengths.
- `train()` refuses a cfg that is not a Config (`require_config`) and a resume that is no path; a run whose encoder
  drops rows from the batch stops at the first step naming it, and leaves nothing.
"""

import math

import numpy as np
import pytest
import torch
import torch.nn as nn

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from fastbyol.config import Config, require_config  # noqa: E402
from fastbyol.errors import FastByolError  # noqa: E402
from fastbyol.evaluation.features import KnnSettings, extract_features, knn_accuracy  # noqa: E402
from fastbyol.kernels import byol_loss, byol_loss_symmetric, ema_update_, set_backend  # noqa: E402
from fastbyol.models import BYOL  # noqa: E402
from fastbyol.models.byol import EncoderOutputError  # noqa: E402
from fastbyol.reference import ema_update_reference_  # noqa: E402

QUICK = settings(max_examples=40, deadline=None)


@pytest.fixture(autouse=True)
def _reference_kernels():
    """The ops' checks come before any kernel: the reference path keeps these tests off the Triton interpreter."""
    previous = set_backend("reference")
    yield
    set_backend(previous)


def _lists():
    return [torch.randn(5, 3), torch.randn(7)], [torch.randn(5, 3), torch.randn(7)]


# ---------------------------------------------------------------------------------------------------------- the EMA
@QUICK
@given(st.one_of(st.floats(max_value=-1e-12), st.floats(min_value=1.0 + 1e-12), st.just(math.nan),
                 st.just(math.inf), st.just(-math.inf)))
def test_ema_refuses_a_tau_outside_the_average(tau):
    target, online = _lists()
    before = [t.clone() for t in target]
    with pytest.raises(ValueError, match=r"tau must be in \[0, 1\]"):
        ema_update_(target, online, tau)
    assert all(torch.equal(a, b) for a, b in zip(target, before))  # nothing moved


@QUICK
@given(st.floats(min_value=0.0, max_value=1.0))
def test_every_tau_in_the_average_is_the_reference(tau):
    target, online = _lists()
    expected = [t.clone() for t in target]
    ema_update_reference_(expected, online, tau)
    ema_update_(target, online, tau)
    for got, want in zip(target, expected):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("tau, needle", [
    (torch.tensor([0.5]), "0-D floating tensor"), (torch.full((2, 1), 0.5), "0-D floating tensor"),
    (torch.tensor(1), "0-D floating tensor"), ("0.99", "got str"), (None, "got NoneType"), (True, "got bool"),
    (torch.tensor(0.5, device="meta"), "on the tensors' device cpu"),
])
def test_ema_refuses_a_tau_of_another_kind(tau, needle):
    target, online = _lists()
    with pytest.raises(ValueError, match=needle):
        ema_update_(target, online, tau)


def test_ema_reads_no_value_of_a_tensor_tau():
    """A device tensor's value is the caller's: a tau tensor above 1 is not read, so not refused (reading it would be
    a host sync on a GPU); its shape is what is checked."""
    target, online = _lists()
    ema_update_(target, online, torch.tensor(0.25))  # accepted: 0-D, floating, on the tensors' device
    with pytest.raises(ValueError, match="not a torch.Tensor"):
        ema_update_([target[0], 3.0], online, 0.5)


# --------------------------------------------------------------------------------------------------------- the loss
@pytest.mark.parametrize("dtype", [torch.int64, torch.uint8, torch.bool])
def test_the_loss_refuses_integer_tensors(dtype):
    p = torch.ones(4, 8, dtype=dtype)
    with pytest.raises(ValueError, match="expected floating tensors"):
        byol_loss(p, p)
    with pytest.raises(ValueError, match="expected floating tensors"):
        byol_loss_symmetric(torch.randn(4, 8), torch.randn(4, 8), p, p)
    with pytest.raises(ValueError, match="got a list"):
        byol_loss([[1.0]], torch.randn(1, 1))


# ------------------------------------------------------------------------------------------------------ the encoder
class Returns(nn.Module):
    """An encoder whose output is `make(x)` (a linear layer first, so it has parameters)."""

    def __init__(self, make):
        super().__init__()
        self.lin = nn.Linear(3, 16)
        self.make = make

    def forward(self, x):
        return self.make(self.lin(x.mean((2, 3))))


BAD_OUTPUTS = {
    "rows": (lambda f: f[:1], "1 rows for a"),
    "rows-doubled": (lambda f: torch.cat([f, f]), "4 rows for a"),
    "dtype": (lambda f: f.argmax(1, keepdim=True).expand(-1, 16), "torch.int64 features"),
    "shape": (lambda f: f[:, :, None], "shape"),
    "not-a-tensor": (lambda f: (f,), "a tuple, not a tensor"),
}


@pytest.mark.parametrize("kind", BAD_OUTPUTS)
def test_a_bad_encoder_output_is_named_when_byol_is_built(kind):
    make, needle = BAD_OUTPUTS[kind]
    with pytest.raises(EncoderOutputError, match=needle) as e:
        BYOL(Returns(make), 32, 16, 32, image_size=8)
    assert "\n" not in str(e.value) and isinstance(e.value, FastByolError)


def test_a_bad_encoder_output_is_named_at_the_forward():
    """An encoder that says its width (no probe forward) and answers on another device, or with another batch size
    once training: named at the forward, before the heads see it."""
    state = {"make": lambda f: f}
    encoder = Returns(lambda f: state["make"](f))
    encoder.num_features = 16
    model = BYOL(encoder, 32, 16, 32, image_size=8)
    x = torch.randn(4, 3, 8, 8)
    assert model(x, x)[0].shape == (4, 16)
    state["make"] = lambda f: f.to("meta")
    with pytest.raises(EncoderOutputError, match="features on meta for an input on cpu"):
        model(x, x)
    state["make"] = lambda f: f[:2]
    with pytest.raises(EncoderOutputError, match="2 rows for a"):
        model(x, x)


@pytest.mark.parametrize("name, value", [("proj_hidden", 0), ("proj_dim", -3), ("pred_hidden", 2.5),
                                         ("image_size", True)])
def test_byol_refuses_a_width_below_one(name, value):
    widths = dict(proj_hidden=32, proj_dim=16, pred_hidden=32, image_size=8)
    widths[name] = value
    with pytest.raises(ValueError, match=f"{name} must be an integer >= 1"):
        BYOL(Returns(lambda f: f), **widths)
    with pytest.raises(ValueError, match="must be a torch.nn.Module"):
        BYOL(lambda x: x, 32, 16, 32)


# ----------------------------------------------------------------------------------------------- the kNN helpers
def _feats(n, d=8):
    return torch.nn.functional.normalize(torch.randn(n, d), dim=1)


@pytest.mark.parametrize("change, needle", [
    (dict(knn=KnnSettings(k=0)), "k must be an integer >= 1"),
    (dict(knn=KnnSettings(k=2.5)), "k must be an integer >= 1"),
    (dict(knn=KnnSettings(temperature=0.0)), "temperature"),
    (dict(knn=KnnSettings(temperature=math.nan)), "temperature"),
    (dict(knn=KnnSettings(chunk=0)), "chunk must be an integer >= 1"),
    (dict(num_classes=0), "num_classes"), (dict(train_labels=np.array([0, 1, 5, 1, 0, 1])), r"in \[0, 3\)"),
    (dict(train_labels=np.array([0, 1, 2])), "6 bank features but labels of shape"),
    (dict(query_labels=np.array([-1, 0])), r"in \[0, 3\)"),
])
def test_the_knn_helpers_refuse_bad_arguments(change, needle):
    args = dict(train_feats=_feats(6), train_labels=np.array([0, 1, 2, 1, 0, 1]), query_feats=_feats(2),
                query_labels=np.array([0, 2]), num_classes=3, knn=KnnSettings(k=3, temperature=0.1))
    args.update(change)
    with pytest.raises(ValueError, match=needle):
        knn_accuracy(**args)


def test_feature_extraction_refuses_images_it_cannot_read():
    encoder = Returns(lambda f: f)
    with pytest.raises(ValueError, match=r"\(N, H, W, 3\) uint8"):
        extract_features(encoder, np.zeros((2, 8, 8, 3), np.float32))
    with pytest.raises(EncoderOutputError, match="1 rows"):
        extract_features(Returns(lambda f: f[:1]), np.zeros((2, 8, 8, 3), np.uint8))


# ------------------------------------------------------------------------------------------------------- train()
@pytest.mark.parametrize("given", [{"data": {}}, "fmnist-tiny", None, Config])
def test_train_refuses_what_is_not_a_config(given):
    with pytest.raises(FastByolError, match="expected a fastbyol.config.Config") as e:
        require_config(given)
    assert "\n" not in str(e.value)
    broken = Config()
    broken.optim = {"epochs": 1}
    with pytest.raises(FastByolError, match="its 'optim' is a dict, not a OptimConfig"):
        require_config(broken)


def test_train_says_what_it_was_given(tmp_path):
    import fastbyol.train as trainer

    with pytest.raises(FastByolError, match=r"train\(cfg\): expected a fastbyol.config.Config.*got dict"):
        trainer.train({"data": {"data": "synthetic"}})
    with pytest.raises(FastByolError, match=r"train\(resume=...\): expected a run directory.*got int"):
        trainer.train(Config(), resume=3)
    assert not any(tmp_path.iterdir())


class HalfBatch(nn.Module):
    """Says its width (no probe forward), then answers a training forward with half the batch's rows."""

    num_features = 16

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, stride=2, padding=1)

    def forward(self, x):
        f = self.conv(x).mean((2, 3))
        return f[: len(f) // 2] if self.training and x.device.type != "meta" else f


def test_train_names_an_encoder_that_drops_rows(small_idx_data, tmp_path):
    """Before: the loss compared half a batch of predictions with half a batch of targets and trained on."""
    from .support import train_with

    # the two views go through the encoder in one pass: a (64, ...) input for a batch of 32 images
    with pytest.raises(EncoderOutputError, match=r"32 rows for a \(64, 3, 28, 28\) input \(a batch of 64\)"):
        train_with(small_idx_data(192, 64), tmp_path / "run", HalfBatch(), epochs=1, batch_size=32)
    assert not (tmp_path / "run").exists()
