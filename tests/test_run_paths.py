"""Paths and names that survive: a run records its data as an absolute path (eval from another folder works), the
default run name says the data, --name names the folder, the stop line gives the command that continues that run,
and an evaluation says when the run is not finished or its batch is tiny."""

import json
import os
import shutil
from datetime import datetime, timezone
from pathlib import Path

import pytest

from fastbyol.cli import main
from fastbyol.run.naming import chosen_run_dir, continue_command, data_label, default_run_name

from .support import one_step_run


def test_eval_of_a_run_with_a_relative_data_path_works_from_another_folder(small_idx_data, tmp_path,
                                                                            monkeypatch, capsys):
    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    work.mkdir()
    elsewhere.mkdir()
    shutil.copytree(small_idx_data(160, 40), work / "data")
    monkeypatch.chdir(work)
    assert main(["train", "--data", "data", "--epochs", "1", "--batch-size", "32", "--image-size", "16",
                 "--knn-every", "0", "--out", "run", "--no-progress"]) == 0
    assert json.loads((work / "run" / "config.json").read_text())["data"]["data"] == str(work / "data")
    monkeypatch.chdir(elsewhere)
    capsys.readouterr()
    assert main(["eval", str(work / "run"), "--probe-epochs", "2", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "eval:" in out and "note:" not in out  # a finished run: no note


def test_names_say_the_data():
    now = datetime(2026, 12, 4, 9, 30, 15, tzinfo=timezone.utc)
    assert default_run_name("embedded", "fmnist-tiny", now) == "embedded-fmnist-tiny-20261204-093015"
    assert default_run_name("/data/imagenet/", "imagenet-resnet50", now).startswith("imagenet-imagenet-resnet50-")
    assert [data_label(s) for s in ("synthetic", "/x/images.npy", "shards/train-{000000..000009}.tar",
                                    "/x/my photos", "")] == ["synthetic", "images", "shards", "my-photos", "data"]
    assert chosen_run_dir("", "") is None and chosen_run_dir("", "r50") == Path("runs/r50")
    assert chosen_run_dir("/out/x", "r50") == Path("/out/x")
    from fastbyol.config import get_preset
    from fastbyol.run.naming import run_dir_for

    cfg = get_preset("fmnist-tiny")
    assert run_dir_for(cfg, now) == Path("runs/embedded-fmnist-tiny-20261204-093015")
    cfg.run.name = "mine"
    assert run_dir_for(cfg, now) == Path("runs/mine")


def test_the_stop_line_gives_the_command_that_works():
    with_out = continue_command(Path("runs/a b"), "runs/a b", "")
    assert with_out.startswith("`fastbyol train --resume 'runs/a b'`") and "--auto-resume" in with_out
    without = continue_command(Path("runs/x"), "", "")
    assert "--resume runs/x" in without and "the same command would start a new run" in without


def test_the_stop_line_reads_the_runs_config(tmp_path):
    from fastbyol.run.preemption import StopCheck

    run = one_step_run(tmp_path / "run")
    assert "would start a new run" in str(StopCheck(1).stopped(1, 10, run))
    config = json.loads((run / "config.json").read_text())
    config["run"]["out"] = str(run)
    (run / "config.json").write_text(json.dumps(config))
    assert "or the same command with --auto-resume" in str(StopCheck(1).stopped(1, 10, run))


def test_auto_resume_takes_a_name(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--auto-resume", "--epochs", "0"]) == 2
    assert main(["train", "--auto-resume"]) == 2
    assert "--auto-resume needs --out or --name" in capsys.readouterr().err
    assert main(["train", "--name", "bad/name"]) == 2
    assert "--name must be a folder name" in capsys.readouterr().err


def test_eval_notes_an_unfinished_run_and_a_tiny_batch(tmp_path, capsys):
    run = one_step_run(tmp_path / "run")  # step 1, not finished
    from fastbyol.run.disk import RunLock

    assert main(["finetune", str(run), "--fraction", "0.01", "--epochs", "1", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert f"note: {run} stopped before its end: this evaluates its last checkpoint, step 1" in out
    assert "note: batch 8, picked for 80 images" in out
    lock = RunLock(run)  # a process training it now: its folder is not evaluated meanwhile
    try:
        assert main(["finetune", str(run), "--fraction", "0.01", "--epochs", "1", "--no-progress"]) == 2
    finally:
        lock.close()
    assert "in use by another fastbyol command" in capsys.readouterr().err
    assert main(["finetune", str(run), "--fraction", "0.01", "--epochs", "1", "--batch-size", "8",
                 "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "stopped before its end" in out and "note: batch" not in out  # a batch given is the user's choice
    names = sorted(p.name for p in run.glob("finetune-0.01*.json"))  # each named by the settings it changed
    assert len(names) == 2 and "batch_size8" in names[0] + names[1] and "epochs1" in names[0], names


def test_an_encoder_module_beside_the_command_needs_no_pythonpath(small_idx_data, tmp_path):
    """`fastbyol train --arch mynet:small` from the folder holding mynet.py: the `fastbyol` script's sys.path starts
    at its own folder, and the current folder is searched last."""
    import subprocess
    import sys

    script = Path(sys.executable).parent / "fastbyol"
    if not script.exists():
        pytest.skip("no fastbyol script beside this interpreter")
    (tmp_path / "mynet.py").write_text(
        "import torch.nn as nn\n\ndef small():\n    return nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), "
        "nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    res = subprocess.run([str(script), "train", "--arch", "mynet:small", "--data", str(small_idx_data(64, 16)),
                          "--epochs", "1", "--batch-size", "32", "--image-size", "16", "--knn-every", "0",
                          "--proj-hidden", "32", "--pred-hidden", "32", "--out", "run", "--no-progress"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    assert json.loads((tmp_path / "run" / "config.json").read_text())["model"]["arch"] == "mynet:small"


def test_a_run_without_out_is_named_for_its_data_and_name_names_it(small_idx_data, tmp_path, monkeypatch, capsys):
    data = small_idx_data(64, 16)
    monkeypatch.chdir(tmp_path)
    flags = ["--data", str(data), "--epochs", "1", "--batch-size", "32", "--image-size", "16", "--knn-every", "0",
             "--no-progress"]
    assert main(["train", *flags]) == 0
    (run,) = (tmp_path / "runs").iterdir()
    assert run.name.startswith(f"{data.name}-fmnist-tiny-")  # the data first
    assert f"summary: runs/{run.name}/summary.json" in capsys.readouterr().out
    assert main(["train", *flags, "--name", "mine"]) == 0
    assert (tmp_path / "runs" / "mine" / "summary.json").is_file()
    assert main(["train", *flags, "--name", "mine", "--auto-resume"]) == 0  # finds it again: finished, nothing to do
    assert "already finished" in capsys.readouterr().out
