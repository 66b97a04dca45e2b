"""The presets for the budgets people use: ImageNet ResNet-50 at 100 and 300 epochs with the official code's values
for those lengths, and ImageNet-100; each trains a step on small data with its own network, heads and optimizer."""

import json

import pytest

from fastbyol.cli import main
from fastbyol.config import get_preset

# the official BYOL code's presets by length (byol/configs/byol.py): base lr, weight decay, tau
OFFICIAL = {1000: (0.2, 1.5e-6, 0.996), 300: (0.3, 1e-6, 0.99), 100: (0.45, 1e-6, 0.99)}


@pytest.mark.parametrize("name, epochs", [("imagenet-resnet50", 1000), ("imagenet-resnet50-300ep", 300),
                                          ("imagenet-resnet50-100ep", 100)])
def test_imagenet_presets_take_the_official_values_for_their_length(name, epochs):
    cfg = get_preset(name)
    assert cfg.optim.epochs == epochs and (cfg.optim.base_lr, cfg.optim.weight_decay, cfg.optim.tau_base) == \
        OFFICIAL[epochs]
    assert (cfg.data.batch_size, cfg.data.image_size, cfg.model.arch, cfg.model.proj_hidden, cfg.model.pred_hidden,
            cfg.optim.warmup_epochs, cfg.optim.optimizer) == (4096, 224, "resnet50", 4096, 4096, 10, "lars")


def test_imagenet100_preset():
    cfg = get_preset("imagenet100-resnet18")
    assert (cfg.data.data, cfg.data.batch_size, cfg.model.arch, cfg.optim.epochs) == ("imagenet100", 256, "resnet18",
                                                                                      400)
    assert (cfg.optim.base_lr, cfg.optim.weight_decay, cfg.optim.tau_base) == OFFICIAL[300]


@pytest.mark.parametrize("name", ["imagenet-resnet50-100ep", "imagenet-resnet50-300ep", "imagenet100-resnet18"])
def test_a_new_preset_trains_a_step_on_small_data(small_idx_data, tmp_path, name):
    """The preset's network, heads and optimizer, one step of 16 images at 32 px (the size and batch are the only
    settings changed)."""
    out = tmp_path / "run"
    assert main(["train", "--preset", name, "--data", str(small_idx_data(16, 16)), "--batch-size", "16",
                 "--image-size", "32", "--epochs", "1", "--knn-every", "0", "--num-threads", "2",
                 "--out", str(out), "--no-progress"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    config = json.loads((out / "config.json").read_text())
    assert summary["steps"] == 1 and summary["final_loss"] > 0
    preset = get_preset(name)
    assert config["model"] == {**preset.to_dict()["model"]} and config["preset"] == name
    assert {k: config["optim"][k] for k in ("base_lr", "weight_decay", "tau_base")} == \
        {k: getattr(preset.optim, k) for k in ("base_lr", "weight_decay", "tau_base")}
