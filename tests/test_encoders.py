"""A trained encoder for your own code (fastbyol/evaluation/encoders.py): `fastbyol.load_encoder` from a run folder
and from each export format gives the run's weights; `fastbyol export` prints how to load its file; an encoder of
the user's own is imported only when the caller names it."""

import json

import pytest
import torch

import fastbyol
from fastbyol.cli import main
from fastbyol.errors import FastByolError
from fastbyol.evaluation.encoders import loading_hint
from fastbyol.evaluation.runs import encoder_state
from fastbyol.run.checkpoint import load_checkpoint

from .support import one_step_run


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return one_step_run(tmp_path_factory.mktemp("enc") / "run")


def _same(encoder, state):
    mine = encoder.state_dict()
    assert set(mine) == set(state)
    for k, v in state.items():
        assert torch.equal(mine[k], v), k


def test_load_encoder_of_a_run_is_its_online_encoder(run):
    enc = fastbyol.load_encoder(run)
    assert not enc.training
    ckpt = load_checkpoint(run / "checkpoint.pt")
    _same(enc, encoder_state(ckpt))
    _same(fastbyol.load_encoder(run, which="target"), encoder_state(ckpt, "target"))
    assert enc(torch.randn(2, 3, 28, 28)).shape == (2, 128)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_load_encoder_of_an_export(run, tmp_path, capsys, suffix):
    if suffix == ".safetensors":
        pytest.importorskip("safetensors")
    out = tmp_path / f"enc{suffix}"
    assert main(["export", str(run), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    ckpt_state = encoder_state(load_checkpoint(run / "checkpoint.pt"))
    if suffix == ".safetensors":  # the file names its encoder
        assert f'fastbyol.load_encoder("{out}")' in printed
        _same(fastbyol.load_encoder(out), ckpt_state)
    else:
        assert f'fastbyol.load_encoder("{out}", arch="resnet-tiny", stem="small-s2", image_size=28)' in printed
        with pytest.raises(FastByolError, match="does not name its encoder: give arch="):
            fastbyol.load_encoder(out)
        _same(fastbyol.load_encoder(out, arch="resnet-tiny", stem="small-s2", image_size=28), ckpt_state)
        with pytest.raises(FastByolError, match="the weights do not fit resnet18"):
            fastbyol.load_encoder(out, arch="resnet18")


def test_the_hint_names_torchvision_and_timm(tmp_path):
    pt = tmp_path / "e.pt"
    assert loading_hint(pt, "resnet50", "imagenet", 224)[0] == \
        f'torchvision.models.resnet50().load_state_dict(torch.load("{pt}"), strict=False)  # only fc is missing'
    assert loading_hint(pt, "resnet50", "auto", 224)[0].startswith("torchvision.models.resnet50()")
    assert loading_hint(pt, "resnet18", "small", 32)[0].startswith("fastbyol.load_encoder")  # not torchvision's stem
    st = tmp_path / "e.safetensors"
    assert loading_hint(st, "vit_small_patch16", "auto", 224)[0] == (
        f'timm.create_model("vit_small_patch16_224", num_classes=0).load_state_dict('
        f'safetensors.torch.load_file("{st}"), strict=False)  # only the head is missing')
    assert "img_size=96" in loading_hint(st, "vit_tiny_patch16", "auto", 96)[0]


def test_an_encoder_of_your_own_is_imported_only_when_named(run, tmp_path, monkeypatch):
    import shutil
    import sys

    own = tmp_path / "own"
    shutil.copytree(run, own)
    config = json.loads((own / "config.json").read_text())
    config["model"]["arch"] = "planted_module_xyz:make"
    (own / "config.json").write_text(json.dumps(config))
    (tmp_path / "planted_module_xyz.py").write_text("raise SystemExit('imported')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(FastByolError, match="an encoder of your own: pass arch="):
        fastbyol.load_encoder(own)
    assert "planted_module_xyz" not in sys.modules
    from fastbyol.models import build_encoder

    enc = fastbyol.load_encoder(own, arch=lambda: build_encoder("resnet-tiny", "small-s2", 28))
    _same(enc, encoder_state(load_checkpoint(run / "checkpoint.pt")))


def test_not_a_run_nor_an_export(tmp_path):
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(FastByolError, match="neither a run folder nor an export"):
        fastbyol.load_encoder(tmp_path / "x.txt")
    with pytest.raises(FastByolError, match="not a fastbyol run"):
        fastbyol.load_encoder(tmp_path)
