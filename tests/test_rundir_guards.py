"""Bad runs and hostile files: one error line and exit 2, never a crash, a lost run or code run from data.

The run directory: one writer (an OS lock), checkpoints only from finite weights, free space checked before training
and before each save, checkpoints that load as plain data, owner-only files, stale temporaries removed on resume,
metrics cut back to the checkpoint on resume, and the settings that used to end in a traceback."""

import json
import os
import pickle
import shutil
import subprocess
import sys

import pytest
import torch

from fastbyol.run.checkpoint import load_checkpoint
from fastbyol.run.disk import RunLock
from fastbyol.cli import main

from fastbyol.errors import TrainingStopped

from .faults import FaultyEncoder
from .support import one_line as _one_line
from .support import train_with

SMALL = ["--epochs", "2", "--batch-size", "32", "--no-progress", "--knn-every", "0"]


@pytest.fixture(scope="module")
def data(small_idx_data):
    return small_idx_data(192, 64)


@pytest.fixture(scope="module")
def finished_run(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("finished") / "run"
    assert main(["train", "--data", str(data), "--out", str(out), *SMALL, "--ckpt-every-steps", "4"]) == 0
    return out


def test_a_second_writer_is_refused(data, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    lock = RunLock(out)  # another run holds the folder
    try:
        assert main(["train", "--data", str(data), "--out", str(out), *SMALL]) == 2
        _one_line(capsys, "in use by another fastbyol run", f"pid {os.getpid()}")
        assert [p.name for p in out.iterdir()] == [".lock"]  # nothing of the refused run
    finally:
        lock.close()
    # the lock dies with its process: a killed run leaves no lock behind
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from fastbyol.run.disk import RunLock; "
                               f"RunLock({str(out)!r}); print('locked', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(Exception, match="in use"):
        RunLock(out)
    holder.kill()
    holder.wait()
    RunLock(out).close()


@pytest.mark.parametrize("what", ["nan-weight", "inf-bn"])
def test_checkpoint_refused_from_nonfinite_weights(data, tmp_path, what):
    """A weight (or a BN running statistic, which export and eval check too) turns non-finite in step 5: the
    checkpoint of step 6 must not be written; the one of step 3 stays."""
    out = tmp_path / "run"
    with pytest.raises(TrainingStopped, match="non-finite by step 6.*last good checkpoint"):
        train_with(data, out, FaultyEncoder(what, at_step=5), epochs=2, batch_size=32, ckpt_every_steps=3,
                   log_every=100)
    ckpt = load_checkpoint(out / "checkpoint.pt")
    assert ckpt["state"]["step"] == 3
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


def test_export_and_eval_refuse_nonfinite_weights(finished_run, tmp_path, capsys):
    """A checkpoint with NaN weights (written by hand) is refused by export and eval."""
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    ckpt = load_checkpoint(out / "checkpoint.pt")
    ckpt["model"]["online_encoder.conv1.weight"][0, 0, 0, 0] = float("nan")
    torch.save(ckpt, out / "checkpoint.pt")
    assert main(["export", str(out), "--out", str(tmp_path / "enc.pt")]) == 2
    _one_line(capsys, "non-finite weights", "conv1.weight")
    assert not (tmp_path / "enc.pt").exists()
    assert main(["eval", str(out), "--probe-epochs", "1", "--no-progress"]) == 2
    _one_line(capsys, "non-finite weights")


def test_nan_before_any_checkpoint_says_so(data, tmp_path, capsys):
    out = tmp_path / "run"
    with pytest.raises(TrainingStopped, match="no checkpoint was written.*new --out"):
        train_with(data, out, FaultyEncoder("nan-output"), epochs=2, batch_size=32, log_every=2)
    assert main(["train", "--resume", str(out)]) == 2  # and --resume says what to do
    _one_line(capsys, "no checkpoint.pt", "new --out")


def test_disk_full_before_training_and_at_a_save(data, tmp_path, monkeypatch, capsys):
    """A real small filesystem (tmpfs) when this machine lets the tests mount one; the save-time refusal then comes
    from the free-space check, and an ENOSPC raised inside the write is caught the same way."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)],
                             capture_output=True).returncode == 0
    try:
        if mounted:  # a checkpoint of the tiny model is ~15 MB: refused before training, nothing left behind
            assert main(["train", "--data", str(data), "--out", str(mnt / "run"), *SMALL]) == 2
            _one_line(capsys, "bytes free, a checkpoint needs about")
            assert not (mnt / "run").exists()
    finally:
        if mounted:
            subprocess.run(["umount", str(mnt)], check=False)
    # the same refusal on any machine: the filesystem says it has 4 MB free
    real_usage = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real_usage(p)._replace(free=4 << 20))
    capsys.readouterr()
    assert main(["train", "--data", str(data), "--out", str(tmp_path / "small-run"), *SMALL]) == 2
    _one_line(capsys, "bytes free, a checkpoint needs about")
    assert not (tmp_path / "small-run").exists()
    monkeypatch.undo()
    # ENOSPC in the middle of the 2nd checkpoint write: the 1st stays, one line names the file and the bytes needed
    real_save = torch.save
    saves = {"n": 0}

    def filling_save(obj, f, *a, **k):
        saves["n"] += 1
        if saves["n"] == 2:
            f.write(b"x" * 1000)
            raise OSError(28, "No space left on device")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", filling_save)
    out = tmp_path / "run"
    assert main(["train", "--data", str(data), "--out", str(out), *SMALL, "--ckpt-every-steps", "4"]) == 2
    _one_line(capsys, "checkpoint.pt: no space left on the device", "bytes needed", "previous file is kept")
    monkeypatch.undo()
    assert load_checkpoint(out / "checkpoint.pt")["state"]["step"] == 4
    assert not list(out.glob(".*.tmp"))


def test_checkpoints_load_as_plain_data_only(finished_run, tmp_path, capsys):
    ckpt = torch.load(finished_run / "checkpoint.pt", weights_only=True)
    assert ckpt["format"] == 2 and ckpt["state"]["finished"]
    for name in ("checkpoint.pt", "config.json", "metrics.jsonl", "summary.json"):
        assert (finished_run / name).stat().st_mode & 0o077 == 0, name

    class Boom:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    evil = tmp_path / "evil"
    shutil.copytree(finished_run, evil)
    ckpt["state"]["finished"] = False
    ckpt["hook"] = Boom()
    with open(evil / "checkpoint.pt", "wb") as f:
        pickle.dump(ckpt, f)  # not even torch's format; a plain pickle that runs a command when unpickled
    torch.save({**ckpt, "hook": Boom()}, evil / "checkpoint2.pt")
    for name in ("checkpoint.pt", "checkpoint2.pt"):
        (evil / name).rename(evil / "checkpoint.pt")
        assert main(["train", "--resume", str(evil)]) == 2
        _one_line(capsys, "checkpoint.pt is corrupt, truncated or not plain data")
    assert not (tmp_path / "pwned").exists()


def test_resume_cleans_temporaries_and_cuts_metrics(data, tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "FASTBYOL_TEST_KILL_IN_CHECKPOINT_WRITE": "2"}  # killed inside the 2nd checkpoint write
    res = subprocess.run([sys.executable, "-m", "fastbyol", "train", "--data", str(data), "--out", str(out), *SMALL,
                          "--ckpt-every-steps", "3", "--log-every", "1"], env=env, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == -9
    assert len(list(out.glob(".checkpoint.pt.*.tmp"))) == 1  # the full-size temporary of the killed write
    assert load_checkpoint(out / "checkpoint.pt")["state"]["step"] == 3
    logged = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert max(logged) == 6  # steps 4..6 were logged after the checkpoint of step 3
    res = subprocess.run([sys.executable, "-m", "fastbyol", "train", "--resume", str(out), "--no-progress"],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    assert not list(out.glob(".*.tmp"))
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert steps == sorted(set(steps)) == list(range(1, steps[-1] + 1))  # each step once, none repeated


def test_resume_refuses_a_changed_dataset_and_a_wrong_config(data, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--data", str(data), "--out", str(out), *SMALL, "--ckpt-every-steps", "2",
                 "--epochs", "3"]) == 0
    ckpt = load_checkpoint(out / "checkpoint.pt")
    ckpt["state"]["finished"] = False
    ckpt["state"]["num_images"] = 500
    torch.save(ckpt, out / "checkpoint.pt")
    capsys.readouterr()
    assert main(["train", "--resume", str(out)]) == 2
    _one_line(capsys, "trained on 500 images", "the dataset now has 192")
    ckpt["state"]["num_images"] = 192
    torch.save(ckpt, out / "checkpoint.pt")
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "model": {**config["model"], "arch": "resnet18"}}))
    assert main(["train", "--resume", str(out)]) == 2
    _one_line(capsys, "does not fit its config.json (resnet18")
    (out / "config.json").write_text(json.dumps({**config, "optim": {**config["optim"], "epochs": "3"}}))
    assert main(["train", "--resume", str(out)]) == 2
    _one_line(capsys, "optim.epochs must be int")


def test_out_must_be_a_writable_folder(data, tmp_path, capsys):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    assert main(["train", "--data", str(data), "--out", str(a_file), *SMALL]) == 2
    _one_line(capsys, "is a file, not a folder")
    assert main(["train", "--data", str(data), "--out", "/proc/fastbyol-run", *SMALL]) == 2
    _one_line(capsys, "/proc/fastbyol-run")


def test_other_commands_name_their_bad_settings(finished_run, tmp_path, capsys):
    assert main(["eval", str(finished_run), "--probe-lr", "-5"]) == 2
    _one_line(capsys, "--probe-lr must be a finite number > 0")
    assert main(["eval", str(finished_run), "--probe-lr", "nan"]) == 2
    _one_line(capsys, "--probe-lr")
    assert main(["export", str(finished_run), "--out", str(tmp_path)]) == 2
    _one_line(capsys, "is a folder")
    assert main(["export", str(finished_run), "--out", "/proc/nope/enc.pt"]) == 2
    _one_line(capsys, "does not exist")
    assert main(["export", str(finished_run), "--out", str(tmp_path / "enc.onnx")]) == 2
    _one_line(capsys, ".pt, .pth or .safetensors")
    pytest.importorskip("matplotlib")
    assert main(["plot", str(finished_run), "--out", str(tmp_path / "x.xyz")]) == 2
    _one_line(capsys, "x.xyz", ".png")
    broken = tmp_path / "broken"
    shutil.copytree(finished_run, broken)
    with open(broken / "metrics.jsonl", "a") as f:
        f.write('{"step": 9, "loss": \n')
    assert main(["plot", str(broken)]) == 2
    n = len((broken / "metrics.jsonl").read_text().splitlines())
    _one_line(capsys, f"metrics.jsonl, line {n}: not a JSON record")
    pytest.importorskip("nvidia.dali")
    assert main(["bench", "augment", "--threads", "-3"]) == 2
    _one_line(capsys, "--threads must be >= 1")
