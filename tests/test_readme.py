"""The README's examples run: the drop-in ops give what the plain PyTorch lines they replace give, and an encoder
defined in the example trains, records its factory and exports its own state_dict."""

import json
import re
from pathlib import Path

import torch

import fastbyol.kernels as fk
from fastbyol.cli import main
from fastbyol.reference import byol_loss_symmetric_reference, ema_update_reference_

README = Path(__file__).resolve().parents[1] / "README.md"


def _example() -> str:
    text = README.read_text()
    section = text.split("## Use the ops in your own trainer", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def _run(code: str) -> dict:
    namespace: dict = {}
    exec(compile(code, "README-example", "exec"), namespace)
    return namespace


def test_readme_example_matches_plain_pytorch(select_backend, monkeypatch, capsys):
    select_backend("triton")  # the Triton kernels (interpreted on a CPU-only machine)
    fast = _run(_example())
    assert "loss" in capsys.readouterr().out
    # the same example with the plain-PyTorch references the ops replace
    monkeypatch.setattr(fk, "byol_loss_symmetric", byol_loss_symmetric_reference)
    monkeypatch.setattr(fk, "ema_update_", ema_update_reference_)
    plain = _run(_example())
    assert abs(fast["loss"].item() - plain["loss"].item()) < 1e-4
    moved = False
    for t_fast, t_plain, o in zip(fast["target_params"], plain["target_params"], plain["online_params"]):
        torch.testing.assert_close(t_fast, t_plain, rtol=1e-4, atol=1e-5)
        moved |= not torch.equal(t_plain, o)
    assert moved


def test_readme_keeps_the_two_commands():
    text = README.read_text()
    assert "make train" in text and "make test" in text


def _encoder_example() -> str:
    section = README.read_text().split("## Your own encoder", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_encoder_example_trains_its_own_encoder(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__main__"}
    exec(compile(_encoder_example(), "README-encoder-example", "exec"), namespace)
    summary = namespace["summary"]
    assert summary["steps"] == 2 * (256 // 64) and summary["final_loss"] > 0
    assert "steps, final loss" in capsys.readouterr().out
    run = tmp_path / "runs" / "my-encoder"
    assert json.loads((run / "config.json").read_text())["model"]["arch"] == "__main__:SmallConvNet"
    # the export is the module's own state_dict; the command line, which cannot import __main__:SmallConvNet, says
    # in one line how it could
    state = torch.load(tmp_path / "my-encoder.pt")
    assert main(["export", str(run), "--out", str(tmp_path / "enc.pt")]) == 2
    assert "add --arch __main__:SmallConvNet" in capsys.readouterr().err
    assert set(state) == set(namespace["SmallConvNet"]().state_dict())
    namespace["SmallConvNet"]().load_state_dict(state)
