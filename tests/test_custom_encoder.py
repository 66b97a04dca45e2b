"""Encoders of the user's own (the README's example runs in tests/test_readme.py): `--arch module.path:factory`, the
feature width found by a forward, the 1-D exclusion rule, the export of the module's own state_dict, bad `--arch`
values as one line with exit 2, and an exact resume after SIGKILL."""

import os

import pytest
import torch
import torch.nn as nn

from fastbyol.cli import main
from fastbyol.models import BYOL, feature_dim_of
from fastbyol.optim import excluded_parameters

from .backbone_runs import kill_and_resume

class TinyConvNet(nn.Module):
    """(B, 3, H, W) -> (B, 24), no feature-width attribute: BYOL finds it by a forward."""

    def __init__(self, image_size: int = 16):
        super().__init__()
        self.image_size = image_size
        self.conv = nn.Conv2d(3, 24, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(24)
        self.scale = nn.Parameter(torch.ones(24))  # 1-D: excluded from decay and the trust ratio by the rule

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x))).mean((2, 3)) * self.scale


def tiny_conv_encoder(image_size: int = 16) -> nn.Module:
    """The `--arch tests.test_custom_encoder:tiny_conv_encoder` factory of the tests."""
    return TinyConvNet(image_size)


def test_feature_width_from_an_attribute_or_a_forward():
    assert feature_dim_of(TinyConvNet()) == 24
    marked = TinyConvNet()
    marked.num_features = 24
    assert feature_dim_of(marked) == 24
    model = BYOL(TinyConvNet(), 32, 16, 32)
    assert model.online_projector[0].in_features == 24
    with pytest.raises(ValueError, match=r"must return \(batch, features\)"):
        feature_dim_of(nn.Conv2d(3, 4, 3))


def test_one_d_rule_unless_the_module_says_otherwise():
    model = BYOL(TinyConvNet(), 32, 16, 32)
    names = [n for n, _ in model.named_parameters() if not n.startswith("target_")]
    flags = dict(zip(names, excluded_parameters(model)))
    assert flags["online_encoder.scale"] and flags["online_encoder.conv.bias"]
    assert not flags["online_encoder.conv.weight"]
    enc = TinyConvNet()
    enc.exclude_1d = False
    enc.no_weight_decay_names = ("conv.weight",)
    flags = dict(zip(names, excluded_parameters(BYOL(enc, 32, 16, 32))))
    assert not flags["online_encoder.scale"] and flags["online_encoder.conv.weight"]
    assert flags["online_projector.1.weight"]  # the heads keep the rule


@pytest.mark.parametrize("arch,message", [
    ("resnet99", "--arch must be one of resnet18"),
    ("no_such_module_xyz:factory", "cannot import no_such_module_xyz"),
    ("os.path:no_such_factory", "has no callable no_such_factory"),
    ("os.path:join", "failed: TypeError"),
    ("os.path:curdir", "has no callable curdir"),
])
def test_a_bad_arch_is_one_line_and_exit_2(tmp_path, capsys, arch, message):
    rc = main(["train", "--arch", arch, "--epochs", "1", "--out", str(tmp_path / "run"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert "module.path:factory" in err or ":" in arch
    assert not (tmp_path / "run").exists()  # nothing written


@pytest.mark.slow
def test_custom_encoder_resumes_exactly_after_a_kill(tmp_path):
    kill_and_resume(tmp_path, ["--arch", "tests.test_custom_encoder:tiny_conv_encoder"])
    assert os.path.exists(tmp_path / "killed" / "summary.json")
