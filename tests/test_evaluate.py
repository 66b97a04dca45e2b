"""fastbyol eval / export / plot on a small run, and their error paths."""

import json
from pathlib import Path

import pytest
import torch

from fastbyol.cli import main
from fastbyol.evaluation.linear import ProbeSettings, linear_probe

from .support import small_idx_dataset as _small_idx_dataset


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("evalrun")
    data = _small_idx_dataset(root / "data", 320, 120)
    out = root / "run"
    assert main(["train", "--data", str(data), "--epochs", "2", "--batch-size", "64", "--out", str(out),
                 "--no-progress", "--knn-every", "1", "--log-every", "1"]) == 0
    return out


def test_linear_probe_separates_separable_features():
    gen = torch.Generator().manual_seed(0)
    y = torch.arange(300) % 3
    x = torch.randn(300, 16, generator=gen) + 4.0 * torch.nn.functional.one_hot(y, 16).float()
    short = ProbeSettings(epochs=20)
    assert linear_probe(x[:200], y[:200], x[200:], y[200:], 3, short) == 100.0
    shuffled = linear_probe(x[:200], y[:200][torch.randperm(200, generator=gen)], x[200:], y[200:], 3, short)
    assert shuffled < 80.0


def test_eval_trained_and_random(run_dir, capsys):
    assert main(["eval", str(run_dir), "--probe-epochs", "5", "--no-progress"]) == 0
    trained = json.loads((run_dir / "eval-features-probe_epochs5.json").read_text())
    assert 0 <= trained["knn_top1"] <= 100 and 0 <= trained["linear_top1"] <= 100
    summary = json.loads((run_dir / "summary.json").read_text())
    assert abs(trained["knn_top1"] - summary["knn_top1"]) < 1e-6  # the same encoder, data and kNN
    assert main(["eval", str(run_dir), "--init", "random", "--probe-epochs", "5", "--no-progress"]) == 0
    random = json.loads((run_dir / "eval-features-probe_epochs5-random.json").read_text())
    assert abs(random["knn_top1"] - summary["knn_top1_random_init"]) < 1e-6
    out = capsys.readouterr().out
    assert "linear (features)" in out and "eval-features-probe_epochs5.json" in out


def test_online_knn_monitor_in_metrics(run_dir):
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    knn = [r for r in rows if "knn_top1" in r]
    assert [r.get("init") for r in knn].count("random") == 1
    assert any(r.get("knn_subset") for r in knn)  # the check after epoch 1, on a subset
    assert all(0 <= r["knn_top1"] <= 100 for r in knn)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_export_loads_into_the_encoder(run_dir, tmp_path, suffix):
    if suffix == ".safetensors":
        pytest.importorskip("safetensors")
    out = tmp_path / f"encoder{suffix}"
    assert main(["export", str(run_dir), "--out", str(out)]) == 0
    if suffix == ".pt":
        state = torch.load(out, weights_only=True)
    else:
        from safetensors.torch import load_file

        state = load_file(str(out))
    from fastbyol.models import build_encoder

    enc = build_encoder("resnet-tiny", "small-s2", 28)
    enc.load_state_dict(state, strict=True)
    ckpt = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    torch.testing.assert_close(enc.conv1.weight, ckpt["model"]["online_encoder.conv1.weight"])


def test_export_into_torchvision_when_installed(tmp_path):
    tv = pytest.importorskip("torchvision")
    from fastbyol.models import build_encoder

    enc = build_encoder("resnet18", stem="imagenet")
    model = tv.models.resnet18()
    missing, unexpected = model.load_state_dict(enc.state_dict(), strict=False)
    assert set(missing) == {"fc.weight", "fc.bias"} and not unexpected


def test_plot_writes_a_png(run_dir):
    pytest.importorskip("matplotlib")
    assert main(["plot", str(run_dir)]) == 0
    png = run_dir / "curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


@pytest.mark.parametrize("argv,message", [
    (["eval", "/no/such/run"], "run directory not found"),
    (["export", "/no/such/run", "--out", "x.pt"], "run directory not found"),
    (["plot", "/no/such/run"], "no metrics.jsonl"),
])
def test_errors_one_line_exit_2(capsys, argv, message):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_export_bad_suffix(run_dir, tmp_path, capsys):
    assert main(["export", str(run_dir), "--out", str(tmp_path / "enc.bin")]) == 2
    assert ".safetensors" in capsys.readouterr().err


def test_export_and_plot_never_write_over_the_run_or_into_its_data(run_dir, capsys):
    """--out naming the run's own checkpoint (or any file the run needs) or a path inside its --data folder is one
    line and exit 2, with the run's files untouched."""
    pytest.importorskip("matplotlib")
    ckpt = run_dir / "checkpoint.pt"
    before = ckpt.read_bytes()
    data = json.loads((run_dir / "config.json").read_text())["data"]["data"]
    for argv, message in [(["export", str(run_dir), "--out", str(ckpt)], "is a file of the run"),
                          (["export", str(run_dir), "--out", f"{data}/enc.pt"], "inside the run's dataset"),
                          (["plot", str(run_dir), "--out", f"{data}/curves.png"], "inside the run's dataset")]:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert ckpt.read_bytes() == before
    assert not (Path(data) / "enc.pt").exists() and not (Path(data) / "curves.png").exists()


def test_plot_skips_non_finite_values(run_dir, tmp_path):
    """A diverged run logs NaN / Infinity (json writes them as such): the plot leaves them out, no traceback."""
    pytest.importorskip("matplotlib")
    copy = tmp_path / "run"
    copy.mkdir()
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    record = json.loads(lines[0])
    lines += [json.dumps({**record, "step": record["step"] + 1000, "loss": float("nan"), "img_per_s": float("inf")}),
              json.dumps({"step": 5, "knn_top1": float("nan")})]
    (copy / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    assert main(["plot", str(copy)]) == 0
    assert (copy / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
