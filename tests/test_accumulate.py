"""Gradient accumulation (`--accumulate N`, `byol_step(..., n=N)`) against the unaccumulated step.

- One process: N micro-batches of B/N give the gradients, the LARS update (parameters and momentum) and the EMA of
  one batch of B, in float64 on a model without batch statistics (every BatchNorm in eval mode: its running
  statistics normalise, so a sample's output does not depend on the others of its batch). With BN in train mode each
  micro-batch is normalised with its own statistics, which the step's running statistics show.
- Two gloo processes under DDP: each accumulating 2 micro-batches of its half equals one process with the whole batch,
  and DDP's gradient hook runs in the last backward of each optimizer step only (no_sync around the others).
- The setting: refused where the batch does not divide into processes x micro-batches (one line, exit 2); saved in
  config.json; a config.json without it is refused.
- `fastbyol train --accumulate 4` killed with SIGKILL inside a checkpoint write and resumed ends with the parameters
  of the uninterrupted run.
"""

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from fastbyol.run.checkpoint import load_checkpoint
from fastbyol.cli import main
from fastbyol.config import Config, get_preset
from fastbyol.system.distributed import close_distributed, init_distributed
from fastbyol.errors import FastByolError
from fastbyol.models import BYOL, build_encoder
from fastbyol.optim import LARS
from fastbyol.train import byol_step, micro_batches

from .support import spawn_ranks
from .support import small_idx_dataset as _small_idx_dataset

BATCH, SIZE, STEPS = 12, 16, 3  # 12 = 4 micro-batches of 3, or 2 processes x 2 micro-batches of 3
# float64 throughout: the accumulated and the big-batch step differ only by the order of the sums (the mean over 12
# images as 4 means of 3 added, and LARS's norms of a gradient summed in another order): ~1e-15 relative per step
TOL = dict(rtol=1e-9, atol=1e-12)


def _model(bn_eval: bool = True) -> BYOL:
    torch.manual_seed(0)
    model = BYOL(build_encoder("resnet-tiny", stem="small-s2", image_size=SIZE), 48, 24, 40).double()
    model = model.to(memory_format=torch.channels_last)
    if bn_eval:
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.eval()  # running statistics normalise: no batch statistics
                with torch.no_grad():  # not the initial 0 / 1, so that eval BN is not an identity
                    m.running_mean.uniform_(-0.2, 0.2)
                    m.running_var.uniform_(0.5, 1.5)
    return model


def _views(seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [tuple(torch.randn(BATCH, 3, SIZE, SIZE, generator=gen, dtype=torch.float64)
                  .contiguous(memory_format=torch.channels_last) for _ in range(2)) for _ in range(STEPS)]


def _run(model, net, views, accumulate: int, part=slice(None)) -> dict:
    """STEPS optimizer steps (lr and tau change every step); after each: the loss, the online gradients, the
    parameters, LARS's momentum and the target."""
    opt = LARS(model.online_parameters(), lr=0.0, weight_decay=1e-4, momentum=0.9)
    target, online = model.ema_pairs()
    record = []
    for step, (v1, v2) in enumerate(views):
        lr, tau = 0.3 + 0.1 * step, 0.9 + 0.02 * step
        v1, v2 = v1[part], v2[part]
        loss = byol_step(net, opt, (target, online), (v1, v2), lr, tau, n=accumulate)
        record.append(dict(loss=loss.clone(), grads=[p.grad.clone() for p in model.online_parameters()],
                           online=[p.detach().clone() for p in model.online_parameters()],
                           momentum=[opt.state[p]["momentum_buffer"].clone() for p in model.online_parameters()
                                     if "momentum_buffer" in opt.state[p]],
                           target=[p.clone() for p in target]))
    return record


def _assert_same(got: list[dict], expected: list[dict]) -> None:
    for step, (a, b) in enumerate(zip(got, expected, strict=True)):
        for key in ("loss", "grads", "online", "momentum", "target"):
            x, y = (a[key], b[key]) if key != "loss" else ([a[key]], [b[key]])
            assert len(x) == len(y) > 0, key
            for i, (u, v) in enumerate(zip(x, y)):
                torch.testing.assert_close(u, v, **TOL, msg=lambda m: f"step {step}, {key}[{i}]: {m}")


def test_micro_batches_are_slices_of_the_same_memory():
    v1, v2 = _views()[0]
    parts = micro_batches(v1, v2, 4)
    assert len(parts) == 4 and all(a.shape == (3, 3, SIZE, SIZE) == b.shape for a, b in parts)
    assert all(a.is_contiguous(memory_format=torch.channels_last) for a, _ in parts)
    assert parts[2][0].data_ptr() == v1[6:9].data_ptr() and parts[3][1].data_ptr() == v2[9:].data_ptr()
    assert torch.equal(torch.cat([b for _, b in parts]), v2)


@pytest.mark.parametrize("n", [2, 4])
def test_n_micro_batches_equal_one_batch_without_batch_statistics(n):
    views = _views()
    big = _model()
    expected = _run(big, big, views, accumulate=1)
    small = _model()
    got = _run(small, small, views, accumulate=n)
    _assert_same(got, expected)
    assert not torch.equal(expected[0]["online"][0], expected[-1]["online"][0])  # the steps moved the weights
    assert not torch.equal(expected[0]["target"][0], expected[-1]["target"][0])


def test_with_batch_statistics_each_micro_batch_is_normalised_on_its_own():
    """BN in train mode: the running mean after one accumulated step is that of the micro-batches one after another
    (N updates), not that of the whole batch (one update), and the step is not the big-batch step."""
    v1, v2 = _views()[0]
    acc, big = _model(bn_eval=False), _model(bn_eval=False)
    seq = _model(bn_eval=False)
    byol_step(acc, LARS(acc.online_parameters(), lr=0.0), acc.ema_pairs(), (v1, v2), 0.3, 0.9, n=4)
    byol_step(big, LARS(big.online_parameters(), lr=0.0), big.ema_pairs(), (v1, v2), 0.3, 0.9)
    with torch.no_grad():
        for m1, m2 in micro_batches(v1, v2, 4):
            seq(m1, m2)
    bn = "online_encoder.bn1.running_mean"
    torch.testing.assert_close(acc.state_dict()[bn], seq.state_dict()[bn], **TOL)
    assert (acc.state_dict()[bn] - big.state_dict()[bn]).abs().max() > 1e-6
    assert (acc.online_encoder.conv1.weight - big.online_encoder.conv1.weight).abs().max() > 1e-9


def _ddp_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    init_distributed("cpu")
    model = _model()
    net = DistributedDataParallel(model, broadcast_buffers=False, gradient_as_bucket_view=True)
    forwards, hooks = [0], []
    model.register_forward_pre_hook(lambda *_: forwards.__setitem__(0, forwards[0] + 1))

    def counted(state, bucket):  # DDP's all-reduce of one gradient bucket: after which forward it ran
        hooks.append(forwards[0])
        fut = dist.all_reduce(bucket.buffer().div_(world), async_op=True).get_future()
        return fut.then(lambda f: f.value()[0])

    net.register_comm_hook(None, counted)
    half = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
    record = _run(model, net, _views(), accumulate=2, part=half)
    for r in record:  # each rank's loss is the mean over its half: the global loss is their average
        dist.all_reduce(r["loss"])
        r["loss"] /= world
    torch.save({"record": record, "hooks": hooks}, f"{out}.{rank}")
    close_distributed()


@pytest.mark.slow
def test_two_processes_accumulating_equal_one_process_with_the_whole_batch(tmp_path):
    ranks = spawn_ranks(_ddp_worker, 2, tmp_path / "rank")
    model = _model()
    expected = _run(model, model, _views(), accumulate=1)
    for got in ranks:
        _assert_same(got["record"], expected)
        # the all-reduces ran in the backward of the 2nd micro-batch of each optimizer step (forwards 2, 4, 6)
        # and never in that of the 1st (forwards 1, 3, 5)
        assert set(got["hooks"]) == {2 * (step + 1) for step in range(STEPS)}, got["hooks"]


# -------------------------------------------------------------------------------------------------------- settings
def test_batch_not_dividing_into_processes_and_micro_batches_is_refused():
    cfg = get_preset("fmnist-tiny")
    cfg.data.batch_size, cfg.optim.accumulate = 96, 4
    plan = cfg.resolve("cpu", 2, 1000)
    assert (plan.local_batch, plan.accumulate, plan.micro_batch) == (48, 4, 12)
    assert plan.peak_lr == cfg.optim.base_lr * 96 / 256  # the lr of the optimizer step's batch
    assert plan.steps_per_epoch == (1000 // 2) // 48  # optimizer steps
    cfg.optim.accumulate = 5
    with pytest.raises(FastByolError, match=r"--batch-size 96 does not divide into 2 processes x 5 micro-batches "
                                            r"\(--accumulate 5\)"):
        cfg.resolve("cpu", 2, 1000)
    cfg.optim.accumulate = 32  # 48 / 32 does not divide; 96 / 48 leaves 1 an image
    with pytest.raises(FastByolError, match="does not divide"):
        cfg.resolve("cpu", 2, 1000)
    cfg.optim.accumulate = 48
    with pytest.raises(FastByolError, match="leaves 1 image per micro-batch; BatchNorm needs at least 2"):
        cfg.resolve("cpu", 2, 1000)
    cfg.optim.accumulate = 0
    with pytest.raises(FastByolError, match="--accumulate must be >= 1"):
        cfg.validate()


def test_the_cli_refuses_in_one_line_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["train", "--batch-size", "100", "--accumulate", "3", "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert "--batch-size 100 does not divide into 1 process x 3 micro-batches (--accumulate 3)" in err
    assert not out.exists()


def test_saved_and_old_configs():
    cfg = get_preset("fmnist-tiny")
    cfg.optim.accumulate = 4
    assert Config.from_dict(json.loads(json.dumps(cfg.to_dict()))).optim.accumulate == 4
    old = cfg.to_dict()
    del old["optim"]["accumulate"]  # not a config.json this fastbyol writes: refused, naming the setting
    with pytest.raises(FastByolError, match="no setting optim.accumulate"):
        Config.from_dict(old)


# -------------------------------------------------------------------------------------------------- kill and resume
ARGS = ["--epochs", "2", "--batch-size", "64", "--accumulate", "4", "--ckpt-every-steps", "3", "--log-every", "2",
        "--knn-every", "0", "--no-progress", "--seed", "4"]


def _cli(*argv):
    return [sys.executable, "-m", "fastbyol", "train", *argv]


@pytest.mark.slow
def test_accumulate_4_killed_and_resumed_gives_the_uninterrupted_parameters(tmp_path):
    data = _small_idx_dataset(tmp_path / "data", 320, 64)  # 5 optimizer steps an epoch of 4 micro-batches of 16
    full = tmp_path / "full"
    res = subprocess.run(_cli("--data", str(data), "--out", str(full), *ARGS), capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "4 micro-batches of 16 a step" in res.stdout
    expected = json.loads((full / "summary.json").read_text())
    assert expected["steps"] == 10 and json.loads((full / "config.json").read_text())["optim"]["accumulate"] == 4

    killed = tmp_path / "killed"  # SIGKILL inside the 2nd checkpoint write (step 6): the one of step 3 is kept
    env = dict(os.environ, FASTBYOL_TEST_KILL_IN_CHECKPOINT_WRITE="2")
    res = subprocess.run(_cli("--data", str(data), "--out", str(killed), *ARGS), capture_output=True, text=True,
                         timeout=600, env=env)
    assert res.returncode == -9, res.stderr[-2000:]
    assert load_checkpoint(killed / "checkpoint.pt")["state"]["step"] == 3
    res = subprocess.run(_cli("--resume", str(killed), "--no-progress"), capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "resumed at step 3" in res.stdout
    resumed = json.loads((killed / "summary.json").read_text())
    assert resumed["steps"] == 10 and resumed["resumed"]
    assert resumed["params_sha256"] == expected["params_sha256"]
