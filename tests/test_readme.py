"""The README's drop-in example runs, and gives what the plain PyTorch lines it replaces give."""

import re
from pathlib import Path

import torch

import fastbyol.kernels as fk
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


def test_readme_example_matches_plain_pytorch(kernels_path, monkeypatch, capsys):
    kernels_path("triton")  # the Triton kernels (interpreted on a CPU-only machine)
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
