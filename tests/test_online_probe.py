"""The online linear probe (fastbyol.evaluation.probe): BYOL trains bit for bit as without it (params_sha256), it
draws nothing from BYOL's random streams, its curve lands in metrics.jsonl and the plot, and it learns."""

import json

import pytest
import torch

from fastbyol.cli import main
from fastbyol.config import get_preset
from fastbyol.data import load_embedded
from fastbyol.evaluation.probe import OnlineProbe
from fastbyol.models import build_encoder

from .support import small_idx_dataset as _small_idx_dataset


def _train(data, out, *flags):
    assert main(["train", "--data", str(data), "--epochs", "3", "--batch-size", "64", "--out", str(out),
                 "--no-progress", "--knn-every", "1", "--log-every", "2", *flags]) == 0
    summary = json.loads((out / "summary.json").read_text())
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return summary, rows


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("probe")
    data = _small_idx_dataset(root / "data", 640, 200)
    with_probe = _train(data, root / "with")  # on by default: the dataset has labels
    without = _train(data, root / "without", "--no-online-probe")
    return root, with_probe, without


def test_probe_does_not_change_byol_training(runs):
    _, (with_s, with_rows), (without_s, without_rows) = runs
    assert with_s["params_sha256"] == without_s["params_sha256"]
    assert with_s["knn_top1"] == without_s["knn_top1"]
    losses = [r["loss"] for r in with_rows if "loss" in r]
    assert losses and losses == [r["loss"] for r in without_rows if "loss" in r]
    assert without_s["online_probe_top1"] is None
    assert not any("online_probe_top1" in r for r in without_rows)


def test_probe_curve_in_metrics_and_summary(runs):
    _, (summary, rows), _ = runs
    curve = [r for r in rows if "online_probe_top1" in r]
    assert [r.get("final", False) for r in curve] == [False, False, True]  # after epochs 1 and 2, then the end
    assert all(0.0 <= r["online_probe_top1"] <= 100.0 and "knn_top1" in r for r in curve)
    assert summary["online_probe_top1"] == curve[-1]["online_probe_top1"]
    assert summary["online_probe_top1"] > 30.0  # 10 balanced classes: chance is 10%; it learned


def test_probe_curve_in_the_plot(runs, monkeypatch):
    pytest.importorskip("matplotlib")
    import matplotlib.axes

    root, _, _ = runs
    plotted = []
    original = matplotlib.axes.Axes.plot
    monkeypatch.setattr(matplotlib.axes.Axes, "plot",
                        lambda self, *a, **k: plotted.append(k.get("label")) or original(self, *a, **k))
    assert main(["plot", str(root / "with"), "--out", str(root / "with.png")]) == 0
    assert (root / "with.png").stat().st_size > 0 and "online probe" in plotted


def test_probe_draws_no_rng_and_leaves_the_encoder_unchanged():
    torch.manual_seed(0)
    encoder = build_encoder("resnet-tiny", "small-s2", 28)
    x = torch.randn(8, 3, 28, 28)
    want = encoder(x)
    state = torch.get_rng_state()
    probe = OnlineProbe(encoder, encoder.feature_dim, 10, torch.device("cpu"), seed=0)
    assert torch.equal(torch.get_rng_state(), state)  # its init comes from its own generator
    got = encoder(x)
    torch.testing.assert_close(got, want, atol=0, rtol=0)  # the hook returns nothing: the output is the encoder's
    got.sum().backward()
    grads = {n: p.grad.clone() for n, p in encoder.named_parameters()}
    w0 = probe.head.weight.detach().clone()
    probe.step(torch.randint(0, 10, (8,), generator=torch.Generator().manual_seed(1)))
    assert torch.equal(torch.get_rng_state(), state)
    assert not torch.equal(probe.head.weight, w0)  # it trained
    for n, p in encoder.named_parameters():  # and sent no gradient into the encoder (the features are detached)
        assert torch.equal(p.grad, grads[n]), n
    probe.close()


def test_probe_captures_training_forwards_of_view_1_only():
    torch.manual_seed(0)
    encoder = build_encoder("resnet-tiny", "small-s2", 28)
    probe = OnlineProbe(encoder, encoder.feature_dim, 10, torch.device("cpu"), seed=0)
    encoder.eval()
    encoder(torch.randn(4, 3, 28, 28))  # a kNN check's features: not captured
    assert probe._features == []
    encoder.train()
    v1, v2 = torch.randn(6, 3, 28, 28), torch.randn(6, 3, 28, 28)
    want = encoder(v1).detach()
    encoder(v2)
    assert len(probe._features) == 1
    torch.testing.assert_close(probe._features[0], want, atol=0, rtol=0)
    w0 = probe.head.weight.detach().clone()
    probe.step(torch.zeros(5, dtype=torch.long))  # labels of another batch: skipped, not mixed up
    assert probe._features == [] and torch.equal(probe.head.weight, w0)
    probe.close()


def test_probe_state_round_trips_exactly_and_a_foreign_one_is_refused():
    """A probe restored from state_dict() continues exactly as the original (head, momentum, statistics); a state of
    another class count, a statistic of another size or a wrong momentum buffer is one FastByolError naming the
    checkpoint; a probe that diverged (non-finite) still loads: it never touches BYOL, so it must not block a resume."""
    from fastbyol.errors import FastByolError

    torch.manual_seed(0)
    encoder = build_encoder("resnet-tiny", "small-s2", 28)
    gen = torch.Generator().manual_seed(2)
    batches = [(torch.randn(8, 3, 28, 28, generator=gen), torch.randint(0, 10, (8,), generator=gen)) for _ in range(6)]

    def steps(probe, part):
        for x, y in part:
            encoder(x)
            probe.step(y)

    a = OnlineProbe(encoder, encoder.feature_dim, 10, torch.device("cpu"), seed=0)
    steps(a, batches[:3])
    saved = a.state_dict()
    a.close()
    b = OnlineProbe(encoder, encoder.feature_dim, 10, torch.device("cpu"), seed=7)  # another init: overwritten
    b.load_state_dict(saved)
    a = OnlineProbe(encoder, encoder.feature_dim, 10, torch.device("cpu"), seed=0)
    a.load_state_dict(saved)
    b.close()
    steps(a, batches[3:])
    c = OnlineProbe(encoder, encoder.feature_dim, 10, torch.device("cpu"), seed=0)  # uninterrupted: 6 steps
    a.close()
    steps(c, batches)
    for got, want in ((a.head.weight, c.head.weight), (a.head.bias, c.head.bias), (a.mean, c.mean), (a.var, c.var)):
        torch.testing.assert_close(got, want, atol=0, rtol=0)
    assert a._seen == c._seen == 6
    other = OnlineProbe(encoder, encoder.feature_dim, 5, torch.device("cpu"), seed=0)
    damaged = {**saved, "mean": saved["mean"][:-1].clone()}
    momentum = {**saved, "optimizer": {**saved["optimizer"], "state": {0: {"momentum_buffer": torch.zeros(3)}}}}
    for probe, state in ((other, saved), (c, damaged), (c, momentum), (c, {**saved, "seen": -1}), (c, [])):
        with pytest.raises(FastByolError, match="run/checkpoint.pt: its online probe state"):
            probe.load_state_dict(state, "run/checkpoint.pt")
    diverged = {**saved, "mean": saved["mean"].clone().fill_(float("nan"))}
    c.load_state_dict(diverged, "run/checkpoint.pt")
    assert torch.isnan(c.mean).all()
    other.close()
    c.close()


def test_probe_is_off_with_its_reason_under_accumulation(runs, capsys):
    """--accumulate > 1 splits the step into forwards the probe does not read: off, with its reason, and the loader is
    not asked for labels it would gather for nothing."""
    from fastbyol.train import loader_labels

    root, _, _ = runs
    summary, _ = _train(root / "data", root / "accumulated", "--accumulate", "2")
    assert summary["online_probe_top1"] is None
    assert "online probe: off (it reads one forward a step, and --accumulate splits the step" in capsys.readouterr().out
    cfg, dataset = get_preset("fmnist-tiny"), load_embedded()
    labels, reader_labels = loader_labels(cfg, cfg.resolve("cpu", 1, 8000), dataset)
    assert labels is not None and not reader_labels  # labelled arrays: their labels are asked for
    cfg.optim.accumulate = 2
    assert loader_labels(cfg, cfg.resolve("cpu", 1, 8000), dataset) == (None, False)