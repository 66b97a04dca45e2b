"""The ResNet family: torchvision's names and shapes (key lists taken from torchvision, tests/fixtures), published
parameter counts, the BYOL paper's width multiplier, and BYOL steps on the CPU. Large models are built on the meta
device (shapes only). The exact resume after a kill of this family is tests/test_checkpoint_resume.py's
(resnet-tiny)."""

import json
from pathlib import Path

import pytest
import torch

from fastbyol.config import PRESETS, Config
from fastbyol.models import ARCHS, BYOL, build_encoder
from fastbyol.optim import LARS, build_optimizer
from fastbyol.train import byol_step

KEYS = json.loads((Path(__file__).parent / "fixtures" / "backbone_keys.json").read_text())
RESNETS = [name for name, arch in ARCHS.items() if arch.family == "resnet"]
# torchvision's counts with the 1000-class fc (torchvision.models.<name>().parameters())
TORCHVISION_PARAMS = {"resnet101": 44_549_160, "resnet152": 60_192_808, "wide_resnet50_2": 68_883_240}
# the BYOL paper's Table 1b, encoder only, in millions
PAPER_PARAMS_M = {"resnet50x2": 94, "resnet50x4": 375, "resnet200x2": 250}


def _meta(arch: str, size: int = 224, stem: str = "imagenet"):
    with torch.device("meta"):
        return build_encoder(arch, stem=stem, image_size=size)


def _count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_the_registry_has_every_depth_at_every_width():
    for depth in (18, 34, 50, 101, 152, 200):
        assert f"resnet{depth}" in ARCHS
        for k in (2, 3, 4):
            assert f"resnet{depth}x{k}" in ARCHS
    assert {"wide_resnet50_2", "wide_resnet101_2", "resnet-tiny"} <= set(ARCHS)


@pytest.mark.parametrize("arch,count", TORCHVISION_PARAMS.items())
def test_parameter_counts_match_torchvision(arch, count):
    enc = _meta(arch)
    assert _count(enc) + enc.feature_dim * 1000 + 1000 == count


@pytest.mark.parametrize("arch,millions", PAPER_PARAMS_M.items())
def test_parameter_counts_match_the_byol_paper(arch, millions):
    assert round(_count(_meta(arch)) / 1e6) == millions


@pytest.mark.parametrize("arch", list(KEYS["torchvision"]))
def test_state_dict_is_torchvisions_except_fc(arch):
    ref = {k: tuple(s) for k, s in KEYS["torchvision"][arch] if not k.startswith("fc.")}
    full = {k for k, _ in KEYS["torchvision"][arch]}
    ours = {k: tuple(v.shape) for k, v in _meta(arch).state_dict().items()}
    assert ours == ref  # so an export loads into torchvision.models.<arch>() with only fc missing
    assert full - set(ours) == {"fc.weight", "fc.bias"}
    assert KEYS["versions"]["torchvision"]


def test_width_multiplier_scales_every_width_stem_included():
    one, two = _meta("resnet50"), _meta("resnet50x2")
    assert two.conv1.out_channels == 2 * one.conv1.out_channels == 128
    for a, b in zip(one.state_dict().values(), two.state_dict().values()):
        assert b.ndim == a.ndim and (a.ndim == 0 or b.shape[0] == 2 * a.shape[0])
    assert two.feature_dim == 4096 and _meta("resnet18x3").feature_dim == 1536
    # torchvision's wide ResNet is another network: the stem and block outputs stay, the bottleneck inside doubles
    wide = _meta("wide_resnet50_2")
    assert wide.conv1.out_channels == 64 and wide.feature_dim == 2048 and wide.layer1[0].conv2.out_channels == 128
    assert _meta("resnet200").layer3.__len__() == 36 and len(_meta("resnet200").layer2) == 24


@pytest.mark.parametrize("arch", RESNETS)
def test_every_resnet_runs_forward_and_backward_on_meta(arch):
    enc = _meta(arch, 32, "auto")
    out = enc(torch.empty(2, 3, 32, 32, device="meta"))
    assert out.shape == (2, enc.feature_dim)
    out.sum().backward()
    assert all(p.grad is not None and p.grad.shape == p.shape for p in enc.parameters())


def _byol_step(arch: str, size: int = 16):
    model = BYOL(build_encoder(arch, stem="auto", image_size=size), 64, 32, 64)
    opt = build_optimizer(Config().optim, model)
    assert isinstance(opt, LARS) and len(opt.param_groups) == 1  # the 1-D rule: one group, as before
    target, online = model.ema_pairs()
    before = [p.detach().clone() for p in online]
    loss = byol_step(model, opt, (target, online), (torch.randn(2, 3, size, size), torch.randn(2, 3, size, size)),
                     lr=0.1, tau=0.99)
    assert torch.isfinite(loss) and 0 < loss.item() <= 8
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in online)
    assert sum(not torch.equal(a, b.detach()) for a, b in zip(before, online)) > len(online) // 2


@pytest.mark.parametrize("arch", ["resnet18x2", "wide_resnet50_2"])
def test_byol_step_on_cpu(arch):
    _byol_step(arch)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["resnet101", "resnet200", "resnet50x2"])
def test_byol_step_on_cpu_large(arch):
    _byol_step(arch)


def test_presets_use_the_papers_settings_for_the_wide_resnets():
    for name, arch in (("imagenet-resnet50x2", "resnet50x2"), ("imagenet-resnet200x2", "resnet200x2")):
        cfg = PRESETS[name][0]
        assert cfg.model.arch == arch and cfg.optim.optimizer == "lars"
        assert (cfg.data.batch_size, cfg.optim.epochs, cfg.optim.base_lr, cfg.optim.tau_base) == (4096, 1000, 0.2,
                                                                                                0.996)
        cfg.validate()
