"""Nothing is left behind by a kill, and a restart compares what changes the views (fastbyol/system/children.py,
fastbyol/run/preemption.py):

- SIGKILL of `fastbyol train` while its pre-flight decode child works (held there by FASTBYOL_TEST_DECODE_HANG):
  the child is gone within a second (it asked the kernel for SIGKILL when its parent dies).
- Ctrl-C there (SIGINT to the whole process group, as a terminal sends it) exits 130 with one line, like Ctrl-C in
  any other command: no run folder, no child left, and the interrupted decode recorded nothing (the file is not
  marked as having crashed the decoder); a scheduler's SIGTERM to the group exits 75 (try again), nothing written.
- A forked CPU augmentation worker goes within a second of its parent's SIGKILL while it is busy.
- `--auto-resume` refuses a run whose augmentation settings differ (any of them, any other allowed value: Hypothesis),
  and one that `--device auto` resolved to another device than this machine gives, in one line naming it.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

hypothesis = pytest.importorskip("hypothesis")
pytest.importorskip("PIL")
pytest.importorskip("nvidia.dali")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from fastbyol.config import SECTIONS, allowed_values, get_preset  # noqa: E402
from fastbyol.errors import FastByolError  # noqa: E402
from fastbyol.run.preemption import auto_resume_decision  # noqa: E402
from fastbyol.system.children import watch_parent  # noqa: E402

from .support import descendant_pids, good_jpegs  # noqa: E402
from .test_data_unproven import without_huffman_tables  # noqa: E402

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="children are found through /proc")
ENV = dict(os.environ, OMP_NUM_THREADS="1", FASTBYOL_TEST_DECODE_HANG="hang.jpg")


def _state(pid: int) -> str:
    """The process's state letter (Z: dead, not yet reaped), or '' when it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return ""


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """An image folder with one file the header check leaves unproven (no Huffman tables): hang.jpg."""
    root = tmp_path_factory.mktemp("unproven") / "imgs"
    (root / "all").mkdir(parents=True)
    for p in good_jpegs(tmp_path_factory, 24):
        (root / "all" / p.name).write_bytes(p.read_bytes())
    (root / "all" / "hang.jpg").write_bytes(without_huffman_tables(False))
    return root


def _train_in_decode(folder: Path, out: Path) -> tuple[subprocess.Popen, int]:
    """`fastbyol train` started in a session of its own, and the pid of its pre-flight decode child once it hangs (a
    grandchild where the manifest's prescan, a child of the trainer, runs the decode)."""
    proc = subprocess.Popen([sys.executable, "-m", "fastbyol", "train", "--data", str(folder), "--epochs", "1",
                             "--batch-size", "8", "--image-size", "16", "--knn-every", "0", "--no-progress", "--out",
                             str(out)], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and proc.poll() is None:
        for c in descendant_pids(proc.pid):
            try:
                if b"--decode" in Path(f"/proc/{c}/cmdline").read_bytes():
                    time.sleep(0.5)  # inside its hang
                    return proc, c
            except OSError:
                pass
        time.sleep(0.05)
    proc.kill()
    pytest.fail(f"no pre-flight decode child appeared: {proc.communicate()[1][-2000:]}")


def test_sigkill_during_the_preflight_decode_leaves_no_child(folder, tmp_path):
    proc, child = _train_in_decode(folder, tmp_path / "run")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    time.sleep(1.0)
    assert _state(child) in ("", "Z"), f"decode child {child} still running ({_state(child)})"


def test_ctrl_c_during_the_preflight_decode_exits_130(folder, tmp_path):
    proc, child = _train_in_decode(folder, tmp_path / "run")
    os.killpg(proc.pid, signal.SIGINT)  # the terminal's Ctrl-C: the whole process group
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-2000:]
    lines = err.strip().splitlines()  # the stop handler's line when the Ctrl-C came while the command loaded
    assert lines[-1] == "fastbyol: interrupted" and "Traceback" not in err, err[-2000:]
    assert all(ln == "fastbyol: SIGINT: stopping at the next log point with a checkpoint" for ln in lines[:-1]), err
    assert not (tmp_path / "run").exists()
    time.sleep(0.5)
    assert _state(child) in ("", "Z")
    decoded = folder / ".fastbyol" / "decoded.json"
    recorded = json.loads(decoded.read_text()) if decoded.exists() else []
    assert not any(entry[0].endswith("hang.jpg") for entry in recorded), recorded


def test_a_schedulers_sigterm_during_the_preflight_decode_exits_75(folder, tmp_path):
    """SIGTERM to the whole group (a scheduler's preemption): the child is stopped, not crashed; `fastbyol train`
    exits 75 (try again) with the stop's lines, and nothing is written or recorded."""
    proc, child = _train_in_decode(folder, tmp_path / "run")
    os.killpg(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 75 and "Traceback" not in err, err[-2000:]
    assert err.strip().splitlines()[-1].endswith("was stopped by SIGTERM: nothing of it was recorded; the same "
                                                 "command starts it again"), err
    assert not (tmp_path / "run").exists() and _state(child) in ("", "Z")


# -------------------------------------------------------------------------------------------- a forked worker
WORKER = r"""
import os, sys, time
from fastbyol.system.children import watch_parent
parent = os.getpid()
pid = os.fork()
if pid == 0:
    watch_parent(parent)
    while True:  # busy: never looks at its parent itself
        sum(range(10000))
print(pid, flush=True)
time.sleep(600)
"""


def test_a_busy_forked_worker_dies_with_its_parent():
    proc = subprocess.Popen([sys.executable, "-c", WORKER], stdout=subprocess.PIPE, text=True)
    worker = int(proc.stdout.readline())
    assert _state(worker) in ("R", "S")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    time.sleep(1.0)
    assert _state(worker) in ("", "Z"), f"worker {worker} still running ({_state(worker)})"
    assert watch_parent  # the function the CPU augmentation workers call first


# -------------------------------------------------------------------------------------------- --auto-resume
def _saved_run(run: Path, cfg, device: str = "cpu") -> None:
    import torch

    from fastbyol.run.state import CHECKPOINT_FORMAT

    run.mkdir(parents=True, exist_ok=True)
    (run / "config.json").write_text(json.dumps({**cfg.to_dict(), "resolved": {"total_steps": 30, "device": device}}))
    torch.save({"format": CHECKPOINT_FORMAT, "model": {}, "state": {"step": 4, "finished": False}},
               run / "checkpoint.pt")


def _choices(section: str) -> list[tuple[str, object]]:
    """(field, another value) for every field of a config section: another allowed choice, or another number."""
    from dataclasses import fields

    base = getattr(get_preset("fmnist-tiny"), section)
    out = []
    for f in fields(base):
        value, allowed = getattr(base, f.name), allowed_values(f)
        if allowed:
            out += [(f.name, v) for v in allowed if v != value]
        elif isinstance(value, bool):
            out.append((f.name, not value))
        elif isinstance(value, (int, float)):
            out.append((f.name, value * 2 if f.name != "hw_decoder_load" else value / 2))
    return out


@settings(max_examples=25, deadline=None)
@given(st.sampled_from(_choices("augment")))
def test_auto_resume_refuses_changed_augmentation_settings(tmp_path_factory, change):
    name, value = change
    run = tmp_path_factory.mktemp("run")
    saved = get_preset("fmnist-tiny")
    saved.run.out = str(run)
    _saved_run(run, saved)
    wanted = get_preset("fmnist-tiny")
    wanted.run.out = str(run)
    setattr(wanted.augment, name, value)
    with pytest.raises(FastByolError, match=f"--{name.replace('_', '-')} {value!r}") as e:
        auto_resume_decision(wanted, log=lambda *a: None)
    assert "\n" not in str(e.value) and "augment" in SECTIONS


def test_auto_resume_refuses_a_run_that_auto_put_on_another_device(tmp_path):
    import torch

    run = tmp_path / "run"
    cfg = get_preset("fmnist-tiny")
    cfg.run.out, cfg.run.device = str(run), "auto"
    other = "cpu" if torch.cuda.is_available() else "cuda"
    _saved_run(run, cfg, device=other)
    with pytest.raises(FastByolError, match=f"the device {'cuda' if other == 'cpu' else 'cpu'} \\(the run: {other}\\)"):
        auto_resume_decision(cfg, log=lambda *a: None)
    _saved_run(run, cfg, device="cuda" if other == "cpu" else "cpu")
    assert auto_resume_decision(cfg, log=lambda *a: None) == run
