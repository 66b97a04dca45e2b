"""Data parallelism on the CPU (gloo), as torchrun runs it.

- Two processes with half the global batch each, DDP around the model and GlobalBatchNorm (cross-replica BN through a
  functional all-reduce; tests/test_dist_batchnorm.py checks it alone), stepped by the trainer's own `byol_step`, give what one
  process gives with the whole batch: losses, online and target parameters and BN running statistics.
- The collectives of the trainer's bookkeeping (`broadcast_object`, `gather_objects`, `global_mean`, `barrier`), with
  one process and with two.
- `fastbyol train` under torchrun with 2 processes: rank 0 alone writes the run directory; killed with SIGKILL and
  resumed with torchrun, it ends with the same parameters as an uninterrupted 2-process run.
"""

import json
import os
import subprocess
import sys
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from fastbyol.run.checkpoint import load_checkpoint
from fastbyol.system.batchnorm import GlobalBatchNorm, convert_batchnorm
from fastbyol.system.distributed import (barrier, broadcast_object, close_distributed, gather_objects, global_mean,
                                         init_distributed)
from fastbyol.models import BYOL, build_encoder
from fastbyol.optim import LARS
from fastbyol.train import byol_step

from .support import free_port as _free_port
from .support import spawn_ranks

STEPS, BATCH = 3, 16


def _model():
    torch.manual_seed(0)
    model = BYOL(build_encoder("resnet-tiny", stem="small-s2", image_size=16), 64, 32, 64)
    return model.to(memory_format=torch.channels_last)


def _data():
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(BATCH, 3, 16, 16, generator=gen), torch.randn(BATCH, 3, 16, 16, generator=gen))
            for _ in range(STEPS)]


def _train(model, net, data, rank=0, world=1):
    opt = LARS(model.online_parameters(), lr=0.2, weight_decay=1e-6)
    target, online = model.ema_pairs()
    losses = []
    for v1, v2 in data:
        part = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
        loss = byol_step(net, opt, (target, online), (v1[part].contiguous(memory_format=torch.channels_last),
                                                      v2[part].contiguous(memory_format=torch.channels_last)),
                         lr=0.2, tau=0.9)
        if world > 1:  # each rank's loss is its half's mean: the global mean is their average
            dist.all_reduce(loss)
            loss /= world
        losses.append(loss.item())
    return losses


def _worker(rank, world, port, out_path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    assert init_distributed("cpu") == (rank, world, True)
    model = convert_batchnorm(_model(), "cpu")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        net = DistributedDataParallel(model, broadcast_buffers=False, gradient_as_bucket_view=True)
        losses = _train(model, net, _data(), rank, world)
    grads = [(p.grad.stride(), p.stride()) for p in model.online_parameters() if p.ndim == 4]
    if rank == 0:
        torch.save({"losses": losses, "state": model.state_dict(), "grad_strides": grads,
                    "warnings": [str(w.message) for w in caught]}, out_path)
    dist.barrier()
    close_distributed()


def _helpers_worker(rank, world, port, out_path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    init_distributed("cpu")
    got = {"broadcast": broadcast_object({"rank": rank, "name": f"run-{rank}"}, rank, world),
           "gathered": gather_objects((rank, [rank] * rank), world)}
    t = torch.tensor(float(rank + 1) ** 2)
    got["mean"] = global_mean(t, world)
    got["t_after"] = t.item()  # the caller's tensor is not reduced in place
    barrier(world)
    torch.save(got, f"{out_path}.{rank}")
    close_distributed()


def test_dist_helpers_with_one_process_are_identities():
    obj = {"a": [1, 2]}
    assert broadcast_object(obj, 0, 1) is obj
    assert gather_objects(obj, 1) == [obj] and gather_objects(obj, 1)[0] is obj
    barrier(1)  # no process group: nothing to wait for, no error
    t = torch.tensor(2.5)
    assert global_mean(t, 1) == 2.5 and isinstance(global_mean(t, 1), float)


@pytest.mark.slow
def test_dist_helpers_with_two_processes(tmp_path):
    out = tmp_path / "helpers"
    for rank, got in enumerate(spawn_ranks(_helpers_worker, 2, out)):
        assert got["broadcast"] == {"rank": 0, "name": "run-0"}  # rank 0's value everywhere
        assert got["gathered"] == [(0, []), (1, [1])]  # rank order, on every rank
        assert got["mean"] == 2.5  # (1 + 4) / 2
        assert got["t_after"] == float(rank + 1) ** 2


def test_convert_batchnorm_keeps_the_parameters():
    model = _model()
    before = {n: p for n, p in model.named_parameters()}
    convert_batchnorm(model, "cpu")
    after = dict(model.named_parameters())
    assert isinstance(model.target_encoder.bn1, GlobalBatchNorm) and isinstance(model.predictor[1], GlobalBatchNorm)
    assert all(after[n] is p for n, p in before.items())  # the same objects: optimizer and EMA lists stay valid
    assert not any(p.requires_grad for n, p in after.items() if n.startswith("target_"))  # frozen target stays so
    assert model.target_encoder.bn1.running_var is model.target_encoder.bn1._buffers["running_var"]


@pytest.mark.slow
def test_two_processes_equal_one_process(tmp_path):
    out = tmp_path / "rank0.pt"
    mp.spawn(_worker, args=(2, _free_port(), str(out)), nprocs=2, join=True)
    two = torch.load(out, weights_only=False)
    model = _model()
    one_losses = _train(model, model, _data())
    # fp32 differences (global statistics as sum / sum of squares against torch's own BN) start at ~1e-7 and grow
    # through LARS's trust ratio: exact to print precision for two steps, then close
    assert max(abs(a - b) for a, b in zip(one_losses[:2], two["losses"][:2])) < 1e-5
    assert max(abs(a - b) for a, b in zip(one_losses, two["losses"])) < 1e-3
    assert one_losses[0] != one_losses[-1]
    one_state = model.state_dict()
    for name, value in one_state.items():
        if value.is_floating_point():
            torch.testing.assert_close(two["state"][name], value, rtol=1e-3, atol=2e-4, msg=name)
    assert any("running_var" in k for k in one_state)  # BN statistics compared too
    # DDP's bucket views take each channels_last parameter's own strides: no copy, no stride warning
    assert two["grad_strides"] and all(g == p for g, p in two["grad_strides"]), two["grad_strides"]
    assert not [w for w in two["warnings"] if "stride" in w.lower()], two["warnings"]


ARGS = ["--data", "synthetic", "--epochs", "3", "--batch-size", "64", "--no-progress", "--ckpt-every-steps", "2",
        "--log-every", "3", "--knn-every", "0", "--seed", "5"]


def _torchrun(*argv):
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
            str(_free_port()), "-m", "fastbyol", "train", *argv]


@pytest.mark.slow
def test_torchrun_two_processes_write_once_and_resume_exactly(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    full = tmp_path / "full"
    res = subprocess.run(_torchrun(*ARGS, "--out", str(full)), capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((full / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 3 * (512 // 64)  # 512 synthetic training images
    assert res.stdout.count("summary:") == 1 and res.stdout.count("config:") == 1  # rank 0 alone speaks
    losses = [json.loads(line) for line in (full / "metrics.jsonl").read_text().splitlines()]
    log_steps = [r["step"] for r in losses if "loss" in r]
    assert log_steps == sorted(set(log_steps)) and log_steps[-1] == 24  # one writer: no line twice
    ckpt = load_checkpoint(full / "checkpoint.pt")
    state = ckpt["state"]
    assert state["world_size"] == 2 and len(state["data_states"]) == 2 and len(state["torch_rngs"]) == 2
    assert state["data_states"][0] != state["data_states"][1]  # each rank's own shard and random stream

    killed = tmp_path / "killed"  # rank 0 SIGKILLs itself inside its 3rd checkpoint write (step 6); torchrun ends
    kill_env = dict(env, FASTBYOL_TEST_KILL_IN_CHECKPOINT_WRITE="3")  # the group (no restarts)
    res = subprocess.run(_torchrun(*ARGS, "--out", str(killed)), capture_output=True, text=True, timeout=600,
                         env=kill_env)
    assert res.returncode != 0 and not (killed / "summary.json").exists()
    step_at_kill = load_checkpoint(killed / "checkpoint.pt")["state"]["step"]
    assert step_at_kill == 4
    # the same run resumed by one process is refused: the shards would not match
    res = subprocess.run([sys.executable, "-m", "fastbyol", "train", "--resume", str(killed)], capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 2 and "with 2 processes" in res.stderr
    res = subprocess.run(_torchrun("--resume", str(killed), "--no-progress"), capture_output=True, text=True,
                         timeout=600, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"resumed at step {step_at_kill}" in res.stdout
    resumed = json.loads((killed / "summary.json").read_text())
    assert resumed["resumed"] and resumed["steps"] == 24
    assert resumed["params_sha256"] == summary["params_sha256"]
    # the same settings; each new run its own id
    killed_cfg, full_cfg = (json.loads((run / "config.json").read_text().replace(str(full), str(killed)))
                            for run in (killed, full))
    assert killed_cfg.pop("run_id") != full_cfg.pop("run_id") and killed_cfg == full_cfg
