"""Shared by the backbone tests: a tiny training run killed with SIGKILL at a known step after its first checkpoint,
resumed, and compared with the same run uninterrupted (bit-identical parameters)."""

import json
import os
import subprocess
import sys
from pathlib import Path

from fastbyol.run.checkpoint import load_checkpoint

from .support import small_idx_dataset

ROOT = Path(__file__).resolve().parents[1]
# the run dies by SIGKILL inside step KILL_AT (after the checkpoint at step 2): no cleanup, no final save
KILLER = """
import os, signal, sys
import fastbyol.train as t
real, calls = t.byol_step, [0]
def dying(*a, **k):
    calls[0] += 1
    if calls[0] == {kill_at}:
        os.kill(os.getpid(), signal.SIGKILL)
    return real(*a, **k)
t.byol_step = dying
from fastbyol.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])  # --arch tests.module:factory
    return env


def _run(args: list[str], kill_at: int | None = None) -> subprocess.CompletedProcess:
    head = [sys.executable, "-c", KILLER.format(kill_at=kill_at)] if kill_at else [sys.executable, "-m", "fastbyol"]
    return subprocess.run([*head, *args], capture_output=True, text=True, timeout=900, cwd=ROOT, env=_env())


def kill_and_resume(tmp_path: Path, arch_args: list[str], steps_expected: int = 8, kill_at: int = 5) -> dict:
    """Train `arch_args` (2 epochs of 4 steps, 16 px, checkpoints every 2 steps) whole, then killed inside step
    `kill_at` and resumed; asserts the same params_sha256 and returns the whole run's summary."""
    data = small_idx_dataset(tmp_path / "data", 128, 40)
    common = ["train", "--data", str(data), "--epochs", "2", "--batch-size", "32", "--image-size", "16",
              "--ckpt-every-steps", "2", "--log-every", "2", "--knn-every", "0", "--no-progress", "--seed", "5",
              "--proj-hidden", "64", "--pred-hidden", "64", "--proj-dim", "32", *arch_args]
    full = _run([*common, "--out", str(tmp_path / "full")])
    assert full.returncode == 0, full.stderr[-2000:]
    expected = json.loads((tmp_path / "full" / "summary.json").read_text())
    assert expected["steps"] == steps_expected
    killed = tmp_path / "killed"
    died = _run([*common, "--out", str(killed)], kill_at=kill_at)
    assert died.returncode == -9, died.stderr[-2000:]
    assert not (killed / "summary.json").exists()
    assert load_checkpoint(killed / "checkpoint.pt")["state"]["step"] == 4  # the last checkpoint before the kill
    # a module:factory encoder is imported on resume only when the command allows it again (a run folder never does)
    own = [a for i, a in enumerate(arch_args) if i and arch_args[i - 1] == "--arch" and ":" in a]
    resumed = _run(["train", "--resume", str(killed), "--no-progress", *(x for a in own for x in ("--arch", a))])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed at step 4" in resumed.stdout
    again = json.loads((killed / "summary.json").read_text())
    assert again["resumed"] and again["steps"] == steps_expected
    assert again["params_sha256"] == expected["params_sha256"]
    return expected
