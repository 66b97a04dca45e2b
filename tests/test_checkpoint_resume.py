"""Exact resume after SIGKILL, a NaN loss stopping the run with the last good checkpoint kept, and checkpoints this
fastbyol did not write refused."""

import json
import os
import subprocess

import pytest
import torch

from fastbyol.run.checkpoint import load_checkpoint
from fastbyol.cli import main

from fastbyol.errors import TrainingStopped

from .faults import FaultyEncoder
from .support import train_cli as _cli
from .support import train_with

ARGS = ["--epochs", "4", "--batch-size", "64", "--ckpt-every-steps", "2", "--log-every", "3", "--no-progress",
        "--seed", "3"]


def test_sigkill_then_resume_gives_the_same_parameters(small_idx_data, tmp_path):
    data = small_idx_data(640, 100)
    full = tmp_path / "full"
    res = subprocess.run(_cli("--data", str(data), "--out", str(full), *ARGS), capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    expected = json.loads((full / "summary.json").read_text())
    assert expected["steps"] == 40

    killed = tmp_path / "killed"  # SIGKILL inside its 3rd checkpoint write (step 6): the file of step 4 stays
    env = {**os.environ, "FASTBYOL_TEST_KILL_IN_CHECKPOINT_WRITE": "3"}
    res = subprocess.run(_cli("--data", str(data), "--out", str(killed), *ARGS), capture_output=True, text=True,
                         timeout=600, env=env)
    assert res.returncode == -9, res.stderr[-2000:]
    assert not (killed / "summary.json").exists()
    step_at_kill = load_checkpoint(killed / "checkpoint.pt")["state"]["step"]
    assert step_at_kill == 4
    res = subprocess.run(_cli("--resume", str(killed), "--no-progress"), capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    assert f"resumed at step {step_at_kill}" in res.stdout
    resumed = json.loads((killed / "summary.json").read_text())
    assert resumed["steps"] == 40 and resumed["resumed"]
    assert resumed["params_sha256"] == expected["params_sha256"]
    # a finished run is not resumed again
    res = subprocess.run(_cli("--resume", str(killed)), capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and "already finished" in res.stderr


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(small_idx_data, tmp_path):
    data = small_idx_data(320, 80)
    out = tmp_path / "run"
    with pytest.raises(TrainingStopped, match="non-finite|nan"):  # the CLI prints it as its one line, exit 2
        train_with(data, out, FaultyEncoder("nan-output", at_step=7), epochs=2, batch_size=32, ckpt_every_steps=3,
                   log_every=5)
    ckpt = load_checkpoint(out / "checkpoint.pt")
    assert ckpt["state"]["step"] == 6 and not ckpt["state"]["finished"]  # the last checkpoint before the NaN
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    assert not (out / "summary.json").exists()


def test_corrupt_checkpoint_is_named(small_idx_data, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"preset": "x"}))
    assert main(["train", "--resume", str(run)]) == 2
    assert "config.json" in capsys.readouterr().err
    data = small_idx_data(160, 40)
    good = tmp_path / "good"
    assert main(["train", "--data", str(data), "--out", str(good), "--epochs", "1", "--batch-size", "32",
                 "--no-progress"]) == 0
    blob = (good / "checkpoint.pt").read_bytes()
    (good / "checkpoint.pt").write_bytes(blob[: len(blob) // 2])
    capsys.readouterr()
    assert main(["train", "--resume", str(good)]) == 2
    assert "is corrupt, truncated or not plain data" in capsys.readouterr().err
    assert os.path.exists(good / "config.json")


def test_a_checkpoint_of_another_format_is_refused(small_idx_data, tmp_path, capsys):
    """A checkpoint without this fastbyol's format number (an older layout: the state's fields at the top level, no
    'format' key), or with another number, is refused in one line naming the file, as any foreign file is."""
    data = small_idx_data(160, 40)
    run = tmp_path / "run"
    assert main(["train", "--data", str(data), "--out", str(run), "--epochs", "1", "--batch-size", "32",
                 "--ckpt-every-steps", "2", "--no-progress", "--knn-every", "0"]) == 0
    ckpt = load_checkpoint(run / "checkpoint.pt")
    state = ckpt.pop("state")
    ckpt.pop("format")
    ckpt["state"] = {}
    state["finished"] = False
    for bad, needle in (({**ckpt, "step": state["step"]}, "no checkpoint format number"),
                        ({**ckpt, "format": 1, "state": state}, "checkpoint format 1 is not one this fastbyol reads")):
        torch.save(bad, run / "checkpoint.pt")
        capsys.readouterr()
        assert main(["train", "--resume", str(run), "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and needle in err and str(run / "checkpoint.pt") in err, err
