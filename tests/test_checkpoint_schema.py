"""A checkpoint's tensors are untrusted input: `model` and `optimizer` are checked against the architecture of the
run's config.json (built on the meta device) before anything is restored, so a damaged or mismatched checkpoint is
one line and exit 2 in `train --resume`, `eval` and `export`, never a traceback."""

import json
import shutil

import pytest
import torch

from fastbyol.run.checkpoint import CHECKPOINT, expected_model_state, load_run
from fastbyol.cli import main
from fastbyol.config import get_preset
from fastbyol.errors import FastByolError
from fastbyol.train import build_model

from .support import one_line, one_step_run


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return one_step_run(tmp_path_factory.mktemp("schema") / "run")


def _first_tensor(model: dict) -> str:
    return next(k for k, v in model.items() if v.dim() >= 2)


def _set_first_optimizer_buffer(c, value):
    c["optimizer"]["state"][next(iter(c["optimizer"]["state"]))]["momentum_buffer"] = value


MUTATIONS = {
    "model is a list": lambda c: c.update(model=list(c["model"].values())),
    "model is None": lambda c: c.update(model=None),
    "a tensor is missing": lambda c: c["model"].pop(_first_tensor(c["model"])),
    "an extra tensor": lambda c: c["model"].update({"online_encoder.extra.weight": torch.zeros(3)}),
    "a wrong shape": lambda c: c["model"].update({_first_tensor(c["model"]): torch.zeros(2, 2)}),
    "a wrong dtype": lambda c: c["model"].update({_first_tensor(c["model"]): c["model"][_first_tensor(
        c["model"])].double()}),
    "a value not a tensor": lambda c: c["model"].update({_first_tensor(c["model"]): "weights"}),
    "the target encoder's shape": lambda c: c["model"].update({"target_encoder.conv1.weight": torch.zeros(1)}),
    "optimizer is a list": lambda c: c.update(optimizer=[1, 2]),
    "optimizer without param_groups": lambda c: c["optimizer"].pop("param_groups"),
    "optimizer over fewer parameters": lambda c: c["optimizer"]["param_groups"][0]["params"].pop(),
    "a momentum buffer of the wrong shape": lambda c: _set_first_optimizer_buffer(c, torch.zeros(7)),
    "a momentum buffer not a tensor": lambda c: _set_first_optimizer_buffer(c, [0.0]),
    "an optimizer setting not a number": lambda c: c["optimizer"]["param_groups"][0].update(lr="fast"),
}


@pytest.fixture
def damaged(trained, tmp_path):
    def make(mutate):
        run = tmp_path / "run"
        shutil.copytree(trained, run)
        ckpt = torch.load(run / CHECKPOINT, weights_only=True)
        mutate(ckpt)
        torch.save(ckpt, run / CHECKPOINT)
        return run
    return make


@pytest.mark.parametrize("name", sorted(MUTATIONS))
def test_a_damaged_checkpoint_is_refused_before_restore(damaged, name):
    with pytest.raises(FastByolError, match="does not fit its config.json"):
        load_run(damaged(MUTATIONS[name]))


@pytest.mark.parametrize("name", ["model is a list", "a wrong shape", "optimizer is a list"])
def test_a_damaged_checkpoint_is_one_line_for_every_consumer(damaged, tmp_path, capsys, name):
    # main: a list as `model` is an AttributeError traceback in eval and export, a TypeError in --resume
    run = damaged(MUTATIONS[name])
    before = (run / CHECKPOINT).read_bytes()
    for argv in (["train", "--resume", str(run), "--no-progress"], ["eval", str(run), "--no-progress"],
                 ["export", str(run), "--out", str(tmp_path / "enc.pt")]):
        assert main(argv) == 2, argv
        one_line(capsys, str(run / CHECKPOINT), "does not fit")
    assert (run / CHECKPOINT).read_bytes() == before and not (tmp_path / "enc.pt").exists()


def test_a_config_json_that_no_longer_matches_its_checkpoint(trained, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    raw = json.loads((run / "config.json").read_text())
    raw["model"]["proj_hidden"] += 1
    (run / "config.json").write_text(json.dumps(raw))
    assert main(["export", str(run), "--out", str(tmp_path / "enc.pt")]) == 2
    one_line(capsys, "does not fit", "online_projector.0.weight")


def test_the_expected_state_is_the_real_models(trained):
    cfg, _, ckpt = load_run(trained)  # the good checkpoint passes
    real = build_model(cfg, torch.device("cpu")).state_dict()
    expected = expected_model_state(cfg)
    online = expected.pop("#online")
    assert expected == {k: (tuple(v.shape), v.dtype) for k, v in real.items()}
    assert len(online) == len(ckpt["optimizer"]["param_groups"][0]["params"])
    cfg2 = get_preset("fmnist-tiny")
    cfg2.model.proj_hidden = 3
    assert expected_model_state(cfg2)["online_projector.0.weight"][0][0] == 3


@pytest.mark.parametrize("arch,optimizer", [("resnet18", "lars"), ("resnet18", "adamw"), ("vit-tiny-cpu", "lars"),
                                            ("vit-tiny-cpu", "adamw")])
def test_a_real_optimizer_state_passes_the_check(arch, optimizer):
    """The optimizer's state_dict numbers its parameters group after group (AdamW's decay and no-decay groups, LARS's
    adapted and excluded groups when a ViT names exclusions), so the check must use that numbering, not the model's
    parameter order: one real step of the real optimizer, then its state_dict is checked as `--resume` checks it;
    a buffer of the wrong shape still fails."""
    from fastbyol.run.checkpoint import check_checkpoint_tensors
    from fastbyol.optim import build_optimizer

    cfg = get_preset("fmnist-tiny")
    cfg.model.arch, cfg.optim.optimizer = arch, optimizer
    cfg.model.proj_hidden = cfg.model.pred_hidden = 64
    cfg.model.proj_dim = 32
    model = build_model(cfg, torch.device("cpu"))
    opt = build_optimizer(cfg.optim, model)
    for p in model.online_parameters():
        p.grad = torch.randn_like(p)
    opt.set_lr(0.01)
    opt.step()
    state = opt.state_dict()
    assert len(state["param_groups"]) == (2 if (optimizer, arch) != ("lars", "resnet18") else 1)
    ckpt = {"format": 2, "model": model.state_dict(), "optimizer": state}
    check_checkpoint_tensors(ckpt, cfg, "RUN/checkpoint.pt")
    index, entry = next((i, e) for i, e in state["state"].items() if any(v.dim() >= 2 for v in e.values()))
    key = next(k for k, v in entry.items() if v.dim() >= 2)
    entry[key] = torch.zeros(*entry[key].shape[:-1], entry[key].shape[-1] + 1)
    with pytest.raises(FastByolError, match=f"optimizer state {index}.{key} does not match"):
        check_checkpoint_tensors(ckpt, cfg, "RUN/checkpoint.pt")
