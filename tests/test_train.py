"""The training step, the trainer end to end on small data, and the command line's error paths."""

import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from fastbyol.cli import main
from fastbyol.config import get_preset
from fastbyol.models import BYOL, build_encoder
from fastbyol.optim import LARS
from fastbyol.train import byol_step


def _tiny_model():
    return BYOL(build_encoder("resnet-tiny", stem="small-s2", image_size=16), 64, 32, 64).to(
        memory_format=torch.channels_last)


def test_two_steps_move_every_target_parameter_by_the_ema_formula():
    model = _tiny_model()
    opt = LARS(model.online_parameters(), lr=0.0, weight_decay=1e-6)
    target, online = model.ema_pairs()
    for step, tau in enumerate((0.99, 0.995)):
        before = [t.detach().double().clone() for t in target]
        v1, v2 = torch.randn(16, 3, 16, 16), torch.randn(16, 3, 16, 16)
        loss = byol_step(model, opt, (target, online), (v1, v2), lr=5.0, tau=tau)
        assert torch.isfinite(loss)
        for i, (t, b, o) in enumerate(zip(target, before, online)):
            expected = tau * b + (1 - tau) * o.detach().double()
            torch.testing.assert_close(t.detach().double(), expected, rtol=0, atol=1e-6)
            if step == 1:  # online has moved away from the initial copy: every target parameter changes
                assert not torch.equal(t.detach().double(), b), f"target parameter {i} did not move"


def test_train_end_to_end_small(small_idx_data, tmp_path, capsys):
    data = small_idx_data()
    out = tmp_path / "run"
    rc = main(["train", "--data", str(data), "--epochs", "2", "--batch-size", "64", "--out", str(out),
               "--no-progress", "--log-every", "2"])
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    for key in ("knn_top1", "knn_top1_random_init", "img_per_s", "epochs", "steps", "device", "versions",
                "params_sha256"):
        assert key in summary
    assert summary["steps"] == 2 * (300 // 64) and summary["epochs"] == 2
    assert 0 <= summary["knn_top1"] <= 100 and summary["img_per_s"] > 0
    assert summary["versions"]["torch"] == torch.__version__
    assert 0 <= summary["data_wait_share"] < 1 and summary["step_ms"] > 0
    assert 1e7 < summary["flops_per_image"] < 1e9  # the tiny ResNet at 28 px: ~0.18 GFLOP per BYOL image
    assert summary["mfu"] is None and summary["peak_memory_gb"] is None  # CPU: no peak to quote against
    config = json.loads((out / "config.json").read_text())
    assert config["optim"]["epochs"] == 2 and config["data"]["batch_size"] == 64
    assert config["resolved"]["local_batch"] == 64 and config["resolved"]["steps_per_epoch"] == 300 // 64
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)  # plain data: loads without running code
    state = ckpt["state"]
    assert state["step"] == summary["steps"] and state["finished"] and state["num_images"] == 300
    assert any(k.startswith("target_encoder.") for k in ckpt["model"])
    assert state["world_size"] == 1 and len(state["data_states"]) == 1
    assert state["data_states"][0]  # the loader's position
    assert (out / "checkpoint.pt").stat().st_mode & 0o077 == 0  # owner only
    assert (out / "metrics.jsonl").stat().st_mode & 0o077 == 0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert len(steps) >= 4 and all(np.isfinite(r["loss"]) for r in steps)
    knn_rows = [r for r in rows if "knn_top1" in r]
    trained = [r for r in knn_rows if r.get("init") != "random"]
    assert trained[-1]["knn_top1"] == summary["knn_top1"]
    assert [r["knn_top1"] for r in knn_rows if r.get("init") == "random"] == [summary["knn_top1_random_init"]]
    assert summary["warmup_seconds"] > 0 and summary["world_size"] == 1 and summary["compile"] == "off"
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError:
        assert not (out / "tensorboard").exists()  # metrics.jsonl alone
    else:  # the same numbers in TensorBoard's event file
        board = EventAccumulator(str(out / "tensorboard"))
        board.Reload()
        loss = [(e.step, e.value) for e in board.Scalars("train/loss")]
        assert [s for s, _ in loss] == [r["step"] for r in steps]
        np.testing.assert_allclose([v for _, v in loss], [r["loss"] for r in steps], rtol=1e-6)
        assert {"train/lr", "train/tau", "train/img_per_s", "knn/top1", "knn/top1_random_init"} <= set(
            board.Tags()["scalars"])
        assert board.Scalars("knn/top1")[-1].value == pytest.approx(summary["knn_top1"], rel=1e-6)
    printed = capsys.readouterr().out
    assert "kNN top-1: trained" in printed and str(out / "summary.json") in printed


def test_same_seed_same_parameters(small_idx_data, tmp_path):
    data = small_idx_data(160, 40)
    hashes = []
    for name in ("a", "b"):
        assert main(["train", "--data", str(data), "--epochs", "1", "--batch-size", "32", "--out",
                     str(tmp_path / name), "--no-progress"]) == 0
        hashes.append(json.loads((tmp_path / name / "summary.json").read_text())["params_sha256"])
    assert hashes[0] == hashes[1]


@pytest.mark.parametrize("args,message", [
    (["--epochs", "0"], "--epochs must be > 0"),
    (["--batch-size", "-3"], "--batch-size must be >= 2"),
    (["--preset", "nope"], "unknown preset 'nope'"),
    (["--data", "/does/not/exist"], "/does/not/exist"),
    (["--batch-size", "9000"], "larger than the 8000 training images"),
    (["--compile", "fast"], "--compile must be one of auto, off, default"),
])
def test_bad_input_one_line_exit_2_nothing_written(tmp_path, capsys, args, message):
    out = tmp_path / "run"
    rc = main(["train", "--out", str(out), "--no-progress", *args])
    err = capsys.readouterr().err
    assert rc == 2
    assert message in err and "Traceback" not in err and err.count("\n") == 1
    assert not out.exists()


def test_empty_data_folder(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["train", "--data", str(tmp_path / "empty"), "--out", str(tmp_path / "run")]) == 2
    assert "empty" in capsys.readouterr().err and not (tmp_path / "run").exists()


def test_module_entry_point_and_presets():
    res = subprocess.run([sys.executable, "-m", "fastbyol", "presets"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0
    for name in ("fmnist-tiny", "stl10-resnet18", "cifar10-resnet18", "imagenet-resnet50"):
        assert name in res.stdout
    res = subprocess.run([sys.executable, "-m", "fastbyol", "train", "--epochs", "0"], capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 2 and "--epochs must be > 0" in res.stderr


def test_official_preset_values():
    cfg = get_preset("imagenet-resnet50")
    assert (cfg.data.batch_size, cfg.optim.epochs, cfg.optim.base_lr, cfg.optim.tau_base) == (4096, 1000, 0.2, 0.996)
    assert cfg.optim.weight_decay == 1.5e-6 and cfg.model.proj_hidden == 4096 and cfg.data.image_size == 224
    cfg.data.batch_size = 1
    assert get_preset("imagenet-resnet50").data.batch_size == 4096  # presets are copied, not shared


def test_flops_per_image_of_resnet50_matches_the_paper_count():
    """ResNet-50 at 224 px is 4.11 GMAC = 8.2 GFLOP forward; a BYOL image costs ~8 forwards (online fwd + bwd on two
    views, target fwd on two) plus the heads: ~66 GFLOP."""
    from fastbyol.run.perf import flops_per_image

    model = BYOL(build_encoder("resnet50", image_size=224))
    gflop = flops_per_image(model, 224, torch.device("cpu")) / 1e9
    assert 62 < gflop < 70


@pytest.mark.slow
def test_compiled_step_trains_like_the_eager_step(tmp_path):
    """--compile default (Inductor's C++ backend on CPU): the same losses as eager to fp32 reordering, and the first
    step, where compilation happens, timed apart from the steady state."""
    args = ["--data", "synthetic", "--epochs", "1", "--batch-size", "64", "--no-progress", "--log-every", "2",
            "--knn-every", "0", "--seed", "2"]
    runs = {}
    for mode in ("off", "default"):
        res = subprocess.run([sys.executable, "-m", "fastbyol", "train", *args, "--compile", mode, "--out",
                              str(tmp_path / mode)], capture_output=True, text=True, timeout=900)
        assert res.returncode == 0, res.stderr[-3000:]
        assert f"first step (compile {mode}" in res.stdout
        summary = json.loads((tmp_path / mode / "summary.json").read_text())
        losses = [json.loads(line)["loss"] for line in (tmp_path / mode / "metrics.jsonl").read_text().splitlines()
                  if '"loss"' in line]
        runs[mode] = summary, losses
    (eager, eager_losses), (compiled, compiled_losses) = runs["off"], runs["default"]
    assert compiled["compile"] == "default" and eager["compile"] == "off"
    assert len(eager_losses) == len(compiled_losses) == 4 and eager_losses[0] != eager_losses[-1]
    np.testing.assert_allclose(compiled_losses, eager_losses, rtol=2e-4)  # measured: <= 4e-5 apart
    assert compiled["warmup_seconds"] > compiled["step_ms"] / 1000  # compilation is outside the steady state


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_steady_state_step_never_syncs_on_cuda():
    """torch's sync debug mode turns any host-device synchronization inside the step into an error."""
    model = _tiny_model().cuda()
    opt = LARS(model.online_parameters(), lr=0.0)
    target, online = model.ema_pairs()
    v1, v2 = (torch.randn(16, 3, 16, 16, device="cuda").contiguous(memory_format=torch.channels_last)
              for _ in range(2))
    byol_step(model, opt, (target, online), (v1, v2), lr=0.1, tau=0.99, bf16=True)  # warm-up: allocations, autotune
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for step in range(3):
            loss = byol_step(model, opt, (target, online), (v1, v2), lr=0.1 + step, tau=0.99, bf16=True)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(loss).item()


@pytest.mark.parametrize("arch", ["resnet-tiny", "resnet18"])
def test_failed_compile_under_auto_falls_back_to_eager(monkeypatch, arch):
    """--compile auto (a compiled mode where it may fall back): a compiler failure at the first step is one warning
    line and the step runs eagerly, with the result of the eager step; an explicit mode keeps the error. resnet18 is
    compiled block by block: its stem has run (BN statistics updated) when the first block fails, and the fallback
    starts from the buffers as they were."""
    from torch._dynamo.exc import TorchDynamoException

    from fastbyol.train import TrainStep

    def broken_compile(fn, **kwargs):
        def call(*args, **kw):
            raise TorchDynamoException("backend exploded")
        return call

    monkeypatch.setattr(torch, "compile", broken_compile)
    resolved = dataclasses.replace(get_preset("fmnist-tiny").resolve("cpu", 1, 1024), compile_mode="default")
    views = (torch.randn(16, 3, 16, 16), torch.randn(16, 3, 16, 16))
    def make():
        torch.manual_seed(0)
        return BYOL(build_encoder(arch, stem="small-s2", image_size=16), 64, 32, 64).to(
            memory_format=torch.channels_last)

    eager, fallen, explicit = make(), make(), make()
    expected = byol_step(eager, LARS(eager.online_parameters(), lr=0.0), eager.ema_pairs(), views, 0.5, 0.99)
    said = []
    step = TrainStep(fallen, None, LARS(fallen.online_parameters(), lr=0.0), resolved, may_fall_back=True,
                     log=said.append)
    assert step.mode == "default"
    loss = step(*views, 0.5, 0.99)
    assert said == ["warning: torch.compile failed (TorchDynamoException: backend exploded); training continues "
                    "without it (--compile off skips the attempt)"]
    assert step.mode == "off" and torch.equal(loss, expected)
    assert all(torch.equal(a, b) for a, b in zip(fallen.parameters(), eager.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(fallen.buffers(), eager.buffers()))
    assert not any("forward" in vars(m) for m in fallen.modules())  # no compiled block left behind
    strict = TrainStep(explicit, None, LARS(explicit.online_parameters(), lr=0.0), resolved, may_fall_back=False,
                       log=said.append)
    with pytest.raises(TorchDynamoException):
        strict(*views, 0.5, 0.99)


def test_profile_writes_a_trace_naming_the_fused_ops(small_idx_data, tmp_path, capsys):
    """--profile START:STOP: a Chrome trace (Perfetto, TensorBoard) of those steps in RUN_DIR/profile/, the top
    operators by self time and the data-wait share printed."""
    data = small_idx_data(192, 64)
    out = tmp_path / "run"
    assert main(["train", "--data", str(data), "--epochs", "1", "--batch-size", "32", "--out", str(out),
                 "--no-progress", "--knn-every", "0", "--profile", "2:4"]) == 0
    traces = list((out / "profile").glob("*.pt.trace.json"))
    assert [t.name for t in traces] == ["steps_2-4.pt.trace.json"]
    events = json.loads(traces[0].read_text())["traceEvents"]
    names = {e.get("name") for e in events}
    assert {"fastbyol::byol_loss_symmetric", "fastbyol::ema_update_"} <= names
    printed = capsys.readouterr().out
    assert "profile of steps 2..3" in printed and "data wait" in printed and "Self CPU" in printed
