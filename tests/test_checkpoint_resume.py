"""Exact resume after SIGKILL, and a NaN loss stopping the run with the last good checkpoint kept."""

import json
import os
import random
import signal
import subprocess
import time

import pytest
import torch

import fastbyol.train as train_module
from fastbyol.run.checkpoint import load_checkpoint
from fastbyol.cli import main

from .support import train_cli as _cli

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

    killed = tmp_path / "killed"
    proc = subprocess.Popen(_cli("--data", str(data), "--out", str(killed), *ARGS), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (killed / "checkpoint.pt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    time.sleep(random.Random().uniform(0.0, 0.8))  # a random step after the first checkpoint
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if (killed / "summary.json").exists():
        pytest.skip("the run finished before the kill; nothing to resume (machine too fast for this test)")
    step_at_kill = load_checkpoint(killed / "checkpoint.pt")["state"]["step"]
    assert 0 < step_at_kill < 40
    res = subprocess.run(_cli("--resume", str(killed), "--no-progress"), capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    assert f"resumed at step {step_at_kill}" in res.stdout
    resumed = json.loads((killed / "summary.json").read_text())
    assert resumed["steps"] == 40 and resumed["resumed"]
    assert resumed["params_sha256"] == expected["params_sha256"]
    # a finished run is not resumed again
    res = subprocess.run(_cli("--resume", str(killed)), capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and "already finished" in res.stderr


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(small_idx_data, tmp_path, monkeypatch, capsys):
    data = small_idx_data(320, 80)
    real_step = train_module.byol_step
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        loss = real_step(*args, **kwargs)
        return loss * float("nan") if calls["n"] >= 7 else loss

    monkeypatch.setattr(train_module, "byol_step", poisoned)
    out = tmp_path / "run"
    rc = main(["train", "--data", str(data), "--out", str(out), "--epochs", "2", "--batch-size", "32",
               "--ckpt-every-steps", "3", "--log-every", "5", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and ("non-finite" in err or "nan" in err.lower())
    assert "Traceback" not in err
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


def test_a_format_1_checkpoint_resumes_exactly(small_idx_data, tmp_path, monkeypatch):
    """A run saved by fastbyol 0.1 (checkpoint format 1: the state's fields at the top level, no 'format' key) resumes
    and ends with the parameters of an uninterrupted run."""
    data = small_idx_data(256, 64)
    args = ["--data", str(data), "--epochs", "2", "--batch-size", "32", "--ckpt-every-steps", "4", "--log-every", "4",
            "--no-progress", "--seed", "5"]
    full = tmp_path / "full"
    assert main(["train", *args, "--out", str(full)]) == 0
    expected = json.loads((full / "summary.json").read_text())

    class Crash(Exception):
        pass

    real_step = train_module.byol_step
    calls = {"n": 0}

    def crash_at_6(*a, **k):
        calls["n"] += 1
        if calls["n"] == 6:
            raise Crash("the machine went down")
        return real_step(*a, **k)

    monkeypatch.setattr(train_module, "byol_step", crash_at_6)
    old = tmp_path / "old"
    with pytest.raises(Crash):
        main(["train", *args, "--out", str(old), "--debug"])
    monkeypatch.undo()
    ckpt = load_checkpoint(old / "checkpoint.pt")
    state = ckpt.pop("state")
    assert ckpt.pop("format") == 2 and state["step"] == 4
    v1 = {**ckpt, "step": state["step"], "world_size": state["world_size"], "data_states": state["data_states"],
          "torch_rngs": state["torch_rngs"], "timed_images": 0, "train_seconds": 1.0, "finished": False}
    torch.save(v1, old / "checkpoint.pt")
    saved = json.loads((old / "config.json").read_text())
    del saved["augment"]  # fastbyol 0.1 wrote no augment section: the defaults are what it trained with
    (old / "config.json").write_text(json.dumps(saved))
    assert main(["train", "--resume", str(old), "--no-progress"]) == 0
    resumed = json.loads((old / "summary.json").read_text())
    assert resumed["resumed"] and resumed["steps"] == expected["steps"] == 16
    assert resumed["params_sha256"] == expected["params_sha256"]
