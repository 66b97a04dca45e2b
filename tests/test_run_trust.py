"""A run folder is data: reading one (eval, finetune, export, train --resume) imports no code it names, `python -m
fastbyol` imports nothing from the folder it is started in, and a checkpoint is used only with the config.json of
its own run (the run id both carry)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from fastbyol.cli import main
from fastbyol.errors import FastByolError
from fastbyol.evaluation.export import export_encoder
from fastbyol.models import OwnEncoders
from fastbyol.run.checkpoint import CHECKPOINT, RUN_ID_KEY, load_run, save_checkpoint

from .support import one_line, one_step_run

ROOT = Path(__file__).resolve().parents[1]
ARCH = "tests.test_run_trust:tiny_encoder"
MARKER = "IMPORTED"


def tiny_encoder(image_size: int = 28) -> nn.Module:
    """An encoder of the user's own (the allowed --arch of these tests)."""
    return nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten())


def _own_encoder_run(out: Path) -> Path:
    """A one-step run of tiny_encoder, its config.json naming it as ARCH (as train --arch ARCH writes it)."""
    return one_step_run(out, n_metrics=0, encoder=tiny_encoder(), arch=ARCH)


def _set_arch(run: Path, arch: str) -> None:
    cfg = json.loads((run / "config.json").read_text())
    cfg["model"]["arch"] = arch
    (run / "config.json").write_text(json.dumps(cfg))


def _plant(folder: Path, module: str) -> Path:
    """A module in `folder` whose import leaves MARKER there (the side effect a hostile run folder would want)."""
    (folder / f"{module}.py").write_text(f"open({str(folder / MARKER)!r}, 'w').write('ran')\n"
                                         "def make(**kw):\n    raise SystemExit(99)\n")
    return folder / MARKER


def _fastbyol(cwd: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**{k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, **(env or {})}
    return subprocess.run([sys.executable, "-m", "fastbyol", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env=env)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    return one_step_run(tmp_path_factory.mktemp("runs") / "run")


@pytest.mark.parametrize("command", [["export", "{run}", "--out", "{tmp}/e.pt"], ["eval", "{run}"],
                                     ["finetune", "{run}", "--fraction", "0.5"],
                                     ["train", "--resume", "{run}", "--no-progress"]])
def test_a_run_naming_a_module_imports_nothing_and_says_how_to_allow_it(finished, tmp_path, command, capsys):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    marker = _plant(run, "evil")
    _set_arch(run, "evil:make")
    args = [a.format(run=run, tmp=tmp_path) for a in command]
    cwd = os.getcwd()
    os.chdir(run)  # standing in the run folder: still nothing of it is imported
    try:
        assert main(args) == 2
    finally:
        os.chdir(cwd)
    one_line(capsys, "config.json names the encoder evil:make", "--arch evil:make")
    assert not marker.exists() and "evil" not in sys.modules
    assert not (tmp_path / "e.pt").exists() and not list(run.glob("eval-*")) + list(run.glob("finetune-*"))


def test_the_hostile_rounds_example_is_one_line_and_no_abort(finished, tmp_path):
    """config.json edited to "os:abort", then `python -m fastbyol export RUN --out e.pt` from inside the run: exit 2
    and one line (it was SIGABRT)."""
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    _set_arch(run, "os:abort")
    done = _fastbyol(run, "export", str(run), "--out", str(tmp_path / "e.pt"))
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1 and "--arch os:abort" in done.stderr and "Traceback" not in done.stderr


def test_python_m_fastbyol_imports_nothing_from_the_current_folder(finished, tmp_path):
    """A numpy.py (or any module fastbyol imports) in the folder one stands in is not imported by `python -m
    fastbyol`; it is imported where the user asks for it explicitly (PYTHONPATH=.)."""
    here = tmp_path / "here"
    here.mkdir()
    marker = _plant(here, "numpy")
    done = _fastbyol(here, "export", str(finished), "--out", str(tmp_path / "e.pt"))
    assert done.returncode == 0, done.stderr
    assert not marker.exists()
    asked = _fastbyol(here, "export", str(finished), "--out", str(tmp_path / "f.pt"),
                      env={"PYTHONPATH": "."})  # explicit: the user's own choice
    assert asked.returncode != 0 and marker.exists()


def test_an_allowed_module_is_imported_from_the_command_line_or_given_in_python(tmp_path, capsys):
    run = _own_encoder_run(tmp_path / "own")
    assert main(["export", str(run), "--out", str(tmp_path / "refused.pt")]) == 2
    one_line(capsys, f"names the encoder {ARCH}", f"--arch {ARCH}")
    assert main(["export", str(run), "--out", str(tmp_path / "e.pt"), "--arch", "other.module:fn",
                 "--arch", ARCH]) == 0  # repeatable: several modules allowed at once
    assert set(torch.load(tmp_path / "e.pt", weights_only=True)) == set(tiny_encoder().state_dict())
    out = export_encoder(run, tmp_path / "py.pt", own=OwnEncoders(encoder=tiny_encoder))  # Python: encoder=
    assert set(torch.load(out, weights_only=True)) == set(tiny_encoder().state_dict())
    with pytest.raises(FastByolError, match="does not fit the encoder given"):
        export_encoder(run, tmp_path / "wrong.pt", own=OwnEncoders(encoder=lambda: nn.Linear(3, 4)))
    assert main(["export", str(run), "--out", str(tmp_path / "x.pt"), "--arch", "resnet18"]) == 2
    one_line(capsys, "registry encoders need no --arch")


def test_a_checkpoint_is_used_only_with_its_own_runs_config(finished, tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(finished, a)
    one_step_run(b)
    shutil.copy(b / CHECKPOINT, a / CHECKPOINT)  # another run's checkpoint, same architecture
    for command in (["export", str(a), "--out", str(tmp_path / "e.pt")], ["eval", str(a)]):
        assert main(command) == 2
        one_line(capsys, f"{a}/{CHECKPOINT} belongs to run", "not to this folder's config.json")
    cfg = json.loads((a / "config.json").read_text())
    del cfg[RUN_ID_KEY]  # the run id dropped from config.json: the checkpoint still names its own run
    (a / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(FastByolError, match="belongs to run"):
        load_run(a)
    cfg[RUN_ID_KEY] = "not an id"
    (a / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(FastByolError, match="is not a run id"):
        load_run(a)


def test_runs_made_before_run_ids_still_load(finished, tmp_path):
    run = tmp_path / "old"
    shutil.copytree(finished, run)
    cfg = json.loads((run / "config.json").read_text())
    del cfg[RUN_ID_KEY]
    (run / "config.json").write_text(json.dumps(cfg))
    ckpt = torch.load(run / CHECKPOINT, weights_only=True)
    del ckpt["state"]["run_id"]
    save_checkpoint(run / CHECKPOINT, ckpt)
    cfg_loaded, state, _ = load_run(run)
    assert state.run_id == "" and cfg_loaded.model.arch == "resnet-tiny"


def test_a_trained_run_carries_its_id_in_config_and_checkpoint(tmp_path):
    from .support import small_idx_dataset

    data = small_idx_dataset(tmp_path / "data", 64, 32)
    assert main(["train", "--data", str(data), "--epochs", "1", "--batch-size", "32", "--image-size", "16",
                 "--out", str(tmp_path / "run"), "--no-progress", "--knn-every", "0"]) == 0
    run_id = json.loads((tmp_path / "run" / "config.json").read_text())[RUN_ID_KEY]
    assert len(run_id) == 32
    assert torch.load(tmp_path / "run" / CHECKPOINT, weights_only=True)["state"]["run_id"] == run_id


def test_a_data_position_dali_cannot_restore_is_one_line(finished, tmp_path, capsys):
    """A checkpoint's loader state is DALI's serialized checkpoint: a damaged one was DALI's traceback on resume."""
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    ckpt = torch.load(run / CHECKPOINT, weights_only=True)
    ckpt["state"]["data_states"] = ["not a DALI checkpoint"]
    ckpt["state"]["num_images"] = 0  # (one_step_run's count is not the embedded data's)
    save_checkpoint(run / CHECKPOINT, ckpt)
    assert main(["train", "--resume", str(run), "--no-progress"]) == 2
    one_line(capsys, "the checkpoint's data position cannot be restored")


def test_auto_resume_neither_resumes_nor_reports_finished_another_runs_checkpoint(finished, tmp_path, capsys):
    from fastbyol.config import get_preset
    from fastbyol.run.preemption import auto_resume_decision

    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(finished, a)
    one_step_run(b)
    ckpt = torch.load(b / CHECKPOINT, weights_only=True)
    ckpt["state"]["finished"] = True  # another run, finished: copied in, it once made --auto-resume exit 0
    save_checkpoint(a / CHECKPOINT, ckpt)
    cfg = get_preset("fmnist-tiny")
    cfg.run.out = str(a)
    with pytest.raises(FastByolError, match="belongs to run"):
        auto_resume_decision(cfg)
    del ckpt["state"]  # not a training state at all: one line, never a KeyError
    save_checkpoint(a / CHECKPOINT, ckpt)
    with pytest.raises(FastByolError, match="training state is unreadable"):
        auto_resume_decision(cfg)
