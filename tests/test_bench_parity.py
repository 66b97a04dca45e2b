"""The parity benchmark's pieces (benchmarks/parity.py, benchmarks/peers/): what the peers' trainers copy from
fastbyol equals fastbyol's own (data split, random-init encoder, lr schedule, kNN evaluator on random features), the
held-out splits are disjoint, the table is built from the runs, and the driver's target-first step does what it says.

The peers themselves (lightly, byol-pytorch) live in their own venv, never in .venv: the end-to-end smoke run of each
peer script runs only when FASTBYOL_PEER_PYTHON names that venv's python (it takes about a minute each).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks import parity
from benchmarks.peers import workload as W
from fastbyol.evaluation import features as fb_knn
from fastbyol.data import load_embedded
from fastbyol.models import BYOL, build_encoder
from fastbyol.reference import ema_update_reference_, lr_at

ROOT = Path(__file__).resolve().parents[1]


def test_peer_data_is_fastbyols_embedded_split():
    train_x, train_y, test_x, test_y = W.load_split()
    ds = load_embedded()
    assert train_x.shape == (8000, 28, 28, 3) and test_x.shape == (2000, 28, 28, 3)
    np.testing.assert_array_equal(train_x, ds.train_images)
    np.testing.assert_array_equal(train_y, ds.train_labels)
    np.testing.assert_array_equal(test_x, ds.test_images)
    np.testing.assert_array_equal(test_y, ds.test_labels)


@pytest.mark.parametrize("seed", [0, 7])
def test_peer_encoder_is_fastbyols_random_init(seed):
    """The peers' backbone of a seed is fastbyol's encoder of that seed, weight for weight (fastbyol draws its encoder
    first after seeding, in the trainer and in its random-init kNN)."""
    torch.manual_seed(seed)
    ours = build_encoder("resnet-tiny", "small-s2", 28).state_dict()
    peer = W.build_encoder(seed).state_dict()
    assert peer.keys() == ours.keys()
    for name in ours:
        torch.testing.assert_close(peer[name], ours[name], rtol=0, atol=0, msg=name)
    assert W.fastbyol_models().__file__ == str(ROOT / "fastbyol" / "models" / "resnet.py")  # by path, not a copy


def test_peer_lr_schedule_is_fastbyols():
    for total, warmup, peak in ((992, 62, 2.0), (10, 0, 1.0), (7, 3, 0.5)):
        for step in range(0, total + 2):  # past the end too
            assert W.lr_at(step, total, warmup, peak) == lr_at(step, total, warmup, peak)
    assert W._fastbyol_file("reference").__file__ == str(ROOT / "fastbyol" / "reference.py")  # by path, not a copy


@pytest.mark.parametrize("n_bank,n_query,k", [(300, 37, 200), (97, 1, 200), (50, 1030, 7)])
def test_peer_knn_votes_equal_fastbyols(n_bank, n_query, k):
    """Random L2-normalized features, random labels: the same predictions, class for class (k > bank size too, and a
    query count over one chunk of 1024)."""
    bank = torch.nn.functional.normalize(torch.randn(n_bank, 16), dim=1)
    queries = torch.nn.functional.normalize(torch.randn(n_query, 16), dim=1)
    labels = torch.randint(0, 10, (n_bank,))
    ours = fb_knn.knn_predict(bank, labels, queries, 10, fb_knn.KnnSettings(k, 0.1))
    peer = W.knn_predict(bank, labels, queries, 10, k, 0.1)
    torch.testing.assert_close(peer, ours, rtol=0, atol=0)
    query_labels = torch.randint(0, 10, (n_query,))
    assert fb_knn.knn_accuracy(bank, labels, queries, query_labels, 10, fb_knn.KnnSettings(k, 0.1)) == pytest.approx(
        100.0 * (peer == query_labels).float().mean().item(), abs=0)


def test_peer_features_and_top1_equal_fastbyols():
    """Features of an encoder on random uint8 images (ImageNet normalisation, eval mode, L2) and the top-1 figure."""
    torch.manual_seed(3)
    encoder = build_encoder("resnet-tiny", "small-s2", 28)
    encoder.train()
    rng = np.random.default_rng(0)
    bank = rng.integers(0, 256, (613, 28, 28, 3), dtype=np.uint8)  # over one feature batch of 512
    queries = rng.integers(0, 256, (101, 28, 28, 3), dtype=np.uint8)
    bank_y, query_y = rng.integers(0, 10, 613), rng.integers(0, 10, 101)
    torch.testing.assert_close(W.extract_features(encoder, bank), fb_knn.extract_features(encoder, bank),
                               rtol=0, atol=0)
    assert encoder.training  # both put the mode back
    assert W.knn_top1(encoder, bank, bank_y, queries, query_y, 10, 200, 0.1) == \
        fb_knn.knn_top1(encoder, bank, bank_y, queries, query_y, 10, fb_knn.KnnSettings(200, 0.1))


def test_step_clock_sets_the_first_step_apart(monkeypatch):
    now = [0.0]
    monkeypatch.setattr(W.time, "perf_counter", lambda: now[0])
    clock = W.StepClock(batch_images=128)
    clock.resume()
    now[0] = 5.0
    clock.step()  # the first step: 5 s of warm-up, not counted
    for _ in range(4):
        now[0] += 0.5
        clock.step()
    now[0] += 0.25  # the end of the epoch (data wait) is counted
    clock.pause()
    clock.resume()
    now[0] += 10.0  # an evaluation outside the clock would sit between pause and resume; here one more step
    clock.step()
    clock.pause()
    s = clock.summary()
    assert s["warmup_seconds"] == 5.0 and s["timed_steps"] == 5
    assert s["train_seconds"] == pytest.approx(12.25)
    assert s["img_per_s"] == pytest.approx(5 * 128 / 12.25)


def test_heldout_splits_are_disjoint_and_cover_everything():
    splits = parity.heldout_splits(60000)
    assert len(splits) == parity.HELDOUT_SPLITS
    seen = np.concatenate([np.concatenate([b, q]) for b, q in splits])
    assert len(seen) == 60000 and len(np.unique(seen)) == 60000
    for bank, query in splits:
        assert len(query) == 4000 and len(bank) == 16000
        assert not set(bank.tolist()) & set(query.tolist())


def _record(system, variant, seed, knn, img_s):
    return {"system": system, "variant": variant, "seed": seed, "knn_top1": knn, "knn_top1_random_init": 60.0 + seed,
            "img_per_s": img_s, "wall_seconds": 100.0 + seed, "heldout_knn": [knn - 1, knn - 2, knn - 3]}


def test_table_means_and_speed_ratio():
    records = [_record("fastbyol", "baseline", 0, 75.0, 800.0), _record("lightly", "", 0, 76.0, 400.0),
               _record("fastbyol", "baseline", 1, 77.0, 700.0), _record("lightly", "", 1, 74.0, 500.0)]
    rows = {r["system"]: r for r in parity.summarise(records, [0, 1])}
    assert rows["fastbyol"]["knn_mean"] == pytest.approx(76.0)
    assert rows["fastbyol"]["heldout_mean"] == pytest.approx(74.0)
    assert rows["lightly"]["img_per_s_median"] == pytest.approx(450.0)
    assert parity.speed_ratio(records) == pytest.approx((2.0 + 1.4) / 2)  # per seed, back to back, then the median
    table = parity.markdown(list(rows.values()), [0, 1])
    assert "| fastbyol | 75.00 | 77.00 | 76.00 | 74.00 | 60.00 / 61.00 | 750 | 100 |" in table


def test_every_variant_names_known_patches_and_flags():
    from fastbyol.cli import _build_parser

    parser = _build_parser()
    for name, v in parity.VARIANTS.items():
        assert set(v.patches) <= set(parity.PATCHES), name
        parser.parse_args(["train", *v.flags])  # the flags exist (argparse exits on an unknown one)


def test_target_before_patch_moves_the_ema_before_the_forward(restore_trainer):
    """The patched step equals, written out here: the EMA of the target at tau, then the forward, the loss, backward
    and the optimizer step, and no EMA after it (float64)."""
    from fastbyol import train as T
    from fastbyol.kernels import byol_loss_symmetric
    from fastbyol.optim import LARS

    def model_and_opt():
        torch.manual_seed(1)
        m = BYOL(build_encoder("resnet-tiny", "small-s2", 16), 32, 8, 32).double()
        with torch.no_grad():  # a target that differs from the online net, so the order matters
            for p in m.target_parameters():
                p.add_(0.01 * torch.randn_like(p))
        return m, LARS(m.online_parameters(), lr=0.0, weight_decay=1e-6)

    v1, v2 = torch.randn(4, 3, 16, 16, dtype=torch.float64), torch.randn(4, 3, 16, 16, dtype=torch.float64)
    original = T.byol_step
    parity.PATCHES["target-before"]()
    assert T.byol_step is not original
    m1, o1 = model_and_opt()
    T.byol_step(m1, o1, m1.ema_pairs(), (v1, v2), 0.5, 0.9)

    m2, o2 = model_and_opt()
    ema_update_reference_(*m2.ema_pairs(), 0.9)
    o2.set_lr(0.5)
    p1, p2, z1, z2 = m2(v1, v2)[:4]
    byol_loss_symmetric(p1, p2, z1, z2).backward()
    o2.step()
    for (name, a), b in zip(m1.state_dict().items(), m2.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=name)
    m3, o3 = model_and_opt()  # the trainer's own order gives another target: the comparison can fail
    original(m3, o3, m3.ema_pairs(), (v1, v2), 0.5, 0.9)
    assert not torch.equal(m3.target_parameters()[0], m1.target_parameters()[0])


def test_driver_refuses_an_unknown_patch():
    with pytest.raises(SystemExit, match="unknown patch"):
        parity.driver(["no-such-patch", "--", "presets"])


def test_unknown_variant_is_refused(capsys):
    with pytest.raises(SystemExit):
        parity.main(["--variants", "no-such-variant", "--systems", "fastbyol"])
    assert "unknown variant" in capsys.readouterr().err


PEER_PYTHON = os.environ.get("FASTBYOL_PEER_PYTHON", "")


@pytest.mark.skipif(not PEER_PYTHON, reason="set FASTBYOL_PEER_PYTHON to the peers' venv python to smoke-run them")
@pytest.mark.parametrize("script", ["lightly_byol.py", "byol_pytorch_readme.py"])
def test_peer_script_smoke(script, tmp_path):
    out = tmp_path / "r.json"
    res = subprocess.run([PEER_PYTHON, str(ROOT / "benchmarks" / "peers" / script), "--epochs", "1",
                          "--limit-images", "512", "--out", str(out), "--save-encoder", str(tmp_path / "e.pt")],
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-2000:]
    r = json.loads(out.read_text())
    assert r["steps"] == 4 and 0 < r["knn_top1"] <= 100 and r["img_per_s"] > 0
    torch.testing.assert_close(r["knn_top1_random_init"], 69.0, rtol=0, atol=0.01)  # seed 0's, as fastbyol's
    state = torch.load(tmp_path / "e.pt", weights_only=True)
    build_encoder("resnet-tiny", "small-s2", 28).load_state_dict(state)


def test_parity_runs_in_a_fresh_interpreter():
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "parity.py"), "--list-variants"],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "baseline" in res.stdout and "target-before" in res.stdout


@pytest.fixture
def restore_trainer():
    from fastbyol import train as T

    saved = {name: getattr(T, name) for name in parity.TRAINER_NAMES}  # what the driver's patches replace
    yield
    for name, value in saved.items():
        setattr(T, name, value)


def test_head_first_bias_is_inert_under_batch_norm():
    """What models.mlp's docstring claims: the first Linear's bias gets a zero gradient and changes no output (BN in
    train mode follows it), and head_first_bias=False removes it from both heads (float64)."""
    torch.manual_seed(0)
    model = BYOL(build_encoder("resnet-tiny", "small-s2", 16), 32, 8, 32).double()
    v1, v2 = torch.randn(6, 3, 16, 16, dtype=torch.float64), torch.randn(6, 3, 16, 16, dtype=torch.float64)
    p1, p2, z1, z2 = model(v1, v2)
    ((p1 - z2) ** 2 + (p2 - z1) ** 2).sum().backward()
    for head in (model.online_projector, model.predictor):
        assert head[0].bias is not None
        assert head[0].bias.grad.abs().max() < 1e-12 * head[0].weight.grad.abs().max()
    with torch.no_grad():
        model.online_projector[0].bias.add_(3.0)
        model.predictor[0].bias.add_(-2.0)
    q1 = model(v1, v2)[0]
    torch.testing.assert_close(q1, p1, rtol=1e-10, atol=1e-10)
    bare = BYOL(build_encoder("resnet-tiny", "small-s2", 16), 32, 8, 32, head_first_bias=False)
    assert bare.online_projector[0].bias is None and bare.predictor[0].bias is None
    assert bare.target_projector[0].bias is None and bare.online_projector[3].bias is not None


def test_driver_patches_reach_the_trainer(restore_trainer):
    """head-no-bias and lars-lightly change what the trainer builds (its build_model and build_optimizer, the calls
    fastbyol train makes)."""
    from fastbyol import train as T
    from fastbyol.config import Config

    cfg = Config()
    model = T.build_model(cfg, torch.device("cpu"))
    assert model.online_projector[0].bias is not None and T.build_optimizer(cfg.optim, model).trust_ratio == "official"
    parity.PATCHES["head-no-bias"]()
    parity.PATCHES["lars-lightly"]()
    model = T.build_model(cfg, torch.device("cpu"))
    assert isinstance(model, BYOL) and model.online_projector[0].bias is None and model.predictor[0].bias is None
    assert model.target_projector[0].bias is None
    assert T.build_optimizer(cfg.optim, model).trust_ratio == "lightly"


def test_augmentation_patches(restore_trainer, monkeypatch):
    """blur-cover / blur-official: the trainer's --blur-window; brightness-mul: x (1 + delta) in the chain's table;
    crop-bilinear: the crops are resized bilinear with antialiasing."""
    import torch.nn.functional as F

    from fastbyol.augment import photometric as P
    from fastbyol.augment import crop_resize_flip

    monkeypatch.setattr(P, "JITTER_FNS", P.JITTER_FNS)
    monkeypatch.setattr(F, "interpolate", F.interpolate)
    assert parity.VARIANTS["blur-cover"].flags == ("--blur-window", "cover")  # a trainer setting since the ablation
    assert parity.VARIANTS["blur-official"].flags == ("--blur-window", "official")

    parity.PATCHES["brightness-mul"]()
    x = torch.rand(3, 3, 8, 8, dtype=torch.float64)
    delta = torch.tensor([-0.4, 0.1, 0.4], dtype=torch.float64)
    torch.testing.assert_close(P.JITTER_FNS[0](x, delta), (x * (1 + delta.view(-1, 1, 1, 1))).clamp(0, 1))

    images = [torch.randint(0, 256, (28, 28, 3), dtype=torch.uint8) for _ in range(2)]
    windows = torch.tensor([[2, 3, 14, 12, 0], [0, 0, 28, 28, 1]])
    bicubic = crop_resize_flip(images, windows, 28)
    parity.PATCHES["crop-bilinear"]()
    got = crop_resize_flip(images, windows, 28)
    src = images[0][2:16, 3:15].permute(2, 0, 1).unsqueeze(0)
    want = torch.nn.functional.interpolate(src, size=(28, 28), mode="bilinear", antialias=True)[0]
    assert torch.equal(got[0], want) and not torch.equal(got[0], bicubic[0])
