"""Fault injection: one run killed with SIGKILL 10 to 20 times (at random times, and inside checkpoint writes with
the temporary file written but not renamed), resumed after each, ends with the parameters of an uninterrupted
run and with no stray files in its directory."""

import json
import os
import random
import signal
import subprocess
import time

import pytest

from fastbyol.run.checkpoint import load_checkpoint

from .support import train_cli as _cli

ARGS = ["--epochs", "6", "--batch-size", "32", "--ckpt-every-steps", "2", "--log-every", "3", "--knn-every", "1",
        "--no-progress", "--seed", "5"]
KILLS = 20


def _step(run):
    return load_checkpoint(run / "checkpoint.pt")["state"]["step"] if (run / "checkpoint.pt").exists() else 0


@pytest.mark.slow
def test_twenty_kills_then_the_uninterrupted_parameters(small_idx_data, tmp_path):
    data = small_idx_data(320, 64)  # 10 steps an epoch, 60 in all
    full = tmp_path / "full"
    res = subprocess.run(_cli("--data", str(data), "--out", str(full), *ARGS), capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    expected = json.loads((full / "summary.json").read_text())

    seed = int(os.environ.get("FASTBYOL_FAULT_SEED", time.time_ns()))
    print(f"FASTBYOL_FAULT_SEED={seed}")  # shown with a failure: rerun with it to replay the same kills
    rng = random.Random(seed)
    run = tmp_path / "run"
    kills, in_writes, finished = 0, 0, False
    # the first process writes the first checkpoint unharmed (a kill before it leaves nothing to resume)
    first = subprocess.Popen(_cli("--data", str(data), "--out", str(run), *ARGS), stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    while not (run / "checkpoint.pt").exists() and first.poll() is None:
        time.sleep(0.01)
    first.send_signal(signal.SIGKILL)
    first.wait()
    kills += 1
    while kills < KILLS:
        env = dict(os.environ)
        in_write = rng.random() < 0.5
        # SIGKILL inside the n-th checkpoint write of this process; for the kills at a random moment, a backstop at
        # the 2nd-4th write: a process then completes at most 3 writes (6 steps), so the 60 steps take at least 10
        # kills whatever the machine's speed
        env["FASTBYOL_TEST_KILL_IN_CHECKPOINT_WRITE"] = str(rng.randint(1, 3) if in_write else rng.randint(2, 4))
        proc = subprocess.Popen(_cli("--resume", str(run), "--no-progress"), stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True, env=env)
        if not in_write:  # SIGKILL at a random moment: start-up, a step, a log or kNN point, a checkpoint write
            time.sleep(rng.uniform(0.0, 6.0))
            proc.send_signal(signal.SIGKILL)
        _, err = proc.communicate(timeout=600)
        if proc.returncode == 0 or (run / "summary.json").exists():
            # it finished before the kill (summary.json is the run's last file, written atomically; a kill that
            # lands between it and the exit leaves a finished run)
            finished = True
            break
        assert proc.returncode == -signal.SIGKILL, err[-2000:]
        kills += 1
        in_writes += in_write
        assert not (run / "summary.json").exists()
    if not finished:
        res = subprocess.run(_cli("--resume", str(run), "--no-progress"), capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, res.stderr[-2000:]
    print(f"{kills} kills ({in_writes} inside checkpoint writes), then finished")
    resumed = json.loads((run / "summary.json").read_text())
    assert resumed["steps"] == expected["steps"] == 60
    assert resumed["params_sha256"] == expected["params_sha256"]
    assert sorted(p.name for p in run.iterdir()) == sorted(p.name for p in full.iterdir())  # no stray files
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert steps == [json.loads(x)["step"] for x in (full / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert kills >= KILLS // 2  # the run was really interrupted, many times


def test_a_kill_in_the_last_checkpoint_write_leaves_the_summary_and_a_resumable_run(small_idx_data, tmp_path):
    """The checkpoint marked finished is the last thing a run writes, after summary.json: a run killed inside that
    write has its summary, and a resume evaluates and writes it again with the same parameters (a run is never left
    finished without its summary, which no command would then write)."""
    data = small_idx_data(96, 32)  # 3 steps, no periodic checkpoint: writes 1 (before the evaluation) and 2 (finished)
    args = ["--data", str(data), "--epochs", "1", "--batch-size", "32", "--ckpt-every-steps", "0", "--knn-every", "0",
            "--no-progress", "--seed", "3", "--num-threads", "1"]
    full, run = tmp_path / "full", tmp_path / "run"
    res = subprocess.run(_cli(*args, "--out", str(full)), capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    expected = json.loads((full / "summary.json").read_text())
    env = dict(os.environ, FASTBYOL_TEST_KILL_IN_CHECKPOINT_WRITE="2")
    res = subprocess.run(_cli(*args, "--out", str(run)), capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == -signal.SIGKILL, res.stderr[-2000:]
    killed = json.loads((run / "summary.json").read_text())  # written before the write that was killed
    assert killed["params_sha256"] == expected["params_sha256"]
    assert not load_checkpoint(run / "checkpoint.pt")["state"]["finished"]
    res = subprocess.run(_cli("--resume", str(run), "--no-progress"), capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    assert json.loads((run / "summary.json").read_text())["params_sha256"] == expected["params_sha256"]
    assert load_checkpoint(run / "checkpoint.pt")["state"]["finished"]
    assert sorted(p.name for p in run.iterdir()) == sorted(p.name for p in full.iterdir())  # no stray files
    finals = [x for x in (run / "metrics.jsonl").read_text().splitlines() if '"final"' in x]
    assert finals == [x for x in (full / "metrics.jsonl").read_text().splitlines() if '"final"' in x]
