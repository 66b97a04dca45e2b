"""Distributed runs agree before the first step and never wait without end (fastbyol/system/agreement.py, peers.py,
distributed.py), on the CPU with gloo and deterministic fault points:

- The ranks compare their settings and their data (size, fingerprint) and stop on every rank in one line naming the
  first difference (Hypothesis: any one fact changed on any rank is the one named).
- A rendezvous that cannot complete ends in one line within the documented time: a peer that never starts
  (`--dist-timeout`), a port in use (at once), a port held by a program that is no rendezvous store (twice the
  timeout; c10d's own client would wait there without end).
- A peer that dies inside a collective ends the survivor in one line at once; a peer that stops with an error before
  a barrier is named, with its reason, by the ranks waiting there; a peer that dies silently before a barrier ends
  the wait after the timeout; a live peer that works longer than the timeout is waited for.
- Through `fastbyol train`: the issue's example (two ranks started with different `--proj-hidden`), and a peer
  SIGKILLed or SIGSTOPped mid-run: one line on the survivor, nothing left of the new run.
"""

import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from fastbyol.config import get_preset  # noqa: E402
from fastbyol.data.fingerprint import source_fingerprint  # noqa: E402
from fastbyol.system.agreement import first_difference, settings_facts  # noqa: E402

from .support import free_port, without_log_lines  # noqa: E402

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="gloo processes on one Linux host")
ENV = dict(os.environ, OMP_NUM_THREADS="1")

# one rank of a 2-process job: init_distributed with a timeout, then a scenario; prints one JSON line, exits 2 on a
# FastByolError (its one line in "error"), 1 on anything else (a traceback: the test fails)
RANK = r"""
import json, os, sys, time
rank, port, scenario, timeout = int(sys.argv[1]), sys.argv[2], sys.argv[3], float(sys.argv[4])
os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
import torch, torch.distributed as dist
from fastbyol.errors import FastByolError
from fastbyol.system import distributed as d
from fastbyol.system.agreement import agree
t0 = time.monotonic()
def done(**kw):
    print(json.dumps(dict(rank=rank, seconds=time.monotonic() - t0, **kw)), flush=True)
try:
    try:
        d.init_distributed("cpu", timeout_s=timeout)
        if scenario == "agree":
            agree({"--seed": 0, "--proj-hidden": 64 if rank == 0 else 128}, rank, 2)
        elif scenario == "agree-data":  # the same size and plan, one pixel apart
            import types
            import numpy as np
            from fastbyol.system.agreement import dataset_facts
            images = np.zeros((64, 8, 8, 3), np.uint8)
            images[63, 0, 0, 0] = rank
            plan = types.SimpleNamespace(to_dict=lambda: {"local_batch": 8, "total_steps": 16})
            agree(dataset_facts(types.SimpleNamespace(num_pretraining=64, pretraining_source=images), plan), rank, 2)
        elif scenario == "agree-same":
            agree({"--seed": 0, "data": "abc"}, rank, 2)
        elif scenario == "die-in-collective":
            if rank == 1:
                os._exit(3)
            time.sleep(0.5)
            dist.all_reduce(torch.ones(3))
        elif scenario == "error-before-barrier":
            if rank == 1:
                raise FastByolError("x.jpg: not an image file")
            d.barrier(2)
        elif scenario == "die-before-barrier":
            if rank == 1:
                os._exit(3)
            d.barrier(2)
        elif scenario == "slow-barrier":
            if rank == 0:
                time.sleep(2.5 * timeout)  # working, alive: longer than the timeout
            d.barrier(2)
        done(ok=True)
    finally:
        d.close_distributed()
except FastByolError as e:
    done(error=str(e))
    sys.exit(2)
except Exception as e:
    mapped = d.explain(e)
    if mapped is None:
        raise
    done(error=str(mapped))
    sys.exit(2)
"""


def _start(rank: int, port: int, scenario: str, timeout: float) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", RANK, str(rank), str(port), scenario, str(timeout)], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _result(proc: subprocess.Popen, limit: float = 120) -> dict:
    out, err = proc.communicate(timeout=limit)
    assert proc.returncode in (0, 2), err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    lines = [ln for ln in out.splitlines() if ln.startswith("{")]
    assert len(lines) == 1, (out, err)
    result = json.loads(lines[0])
    if "error" in result:
        assert "\n" not in result["error"]
    return result


def _job(scenario: str, timeout: float = 20.0) -> list[dict]:
    """Both ranks' results; a rank that dies on purpose (os._exit(3): the scenario's fault point) gives {}."""
    port = free_port()
    procs = [_start(r, port, scenario, timeout) for r in (0, 1)]
    results = []
    for p in procs:
        if scenario.startswith("die") and p.wait(timeout=120) == 3:
            results.append({})
        else:
            results.append(_result(p))
    return results


# ------------------------------------------------------------------------------------------------ the agreement
FACTS = settings_facts(get_preset("fmnist-tiny"))


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(sorted(FACTS)), st.integers(1, 3), st.integers(0, 2))
def test_the_first_difference_is_the_one_named(name, world, changed_rank):
    every = [dict(FACTS) for _ in range(world + 1)]
    rank = 1 + changed_rank % world
    every[rank][name] = ("another", FACTS[name])
    diff = first_difference(every)
    assert diff.startswith(f"rank {rank} has {name} ") and f"rank 0 has {FACTS[name]!r}"[:60] in diff
    assert first_difference([dict(FACTS)] * (world + 1)) is None


def test_the_facts_cover_every_setting_and_the_fingerprint_tells_data_apart():
    assert {"--proj-hidden", "--seed", "--decode", "--dist-timeout", "--preset", "fastbyol", "torch"} <= set(FACTS)
    a = np.random.default_rng(0).integers(0, 256, (50, 8, 8, 3), dtype=np.uint8)
    b = a.copy()
    b[17, 3, 3, 1] ^= 1  # one pixel of a row in the sample
    assert source_fingerprint(a) == source_fingerprint(a.copy()) != source_fingerprint(b)
    assert source_fingerprint(a[:49]) != source_fingerprint(a)


@pytest.mark.slow
def test_ranks_with_other_settings_stop_in_one_line_naming_it():
    results = _job("agree")
    assert [r.get("error", "")[:60] for r in results] == [results[0]["error"][:60]] * 2  # the same line on each
    assert "rank 1 has --proj-hidden 128, rank 0 has 64" in results[0]["error"]
    data = _job("agree-data")
    assert data[0]["error"] == data[1]["error"] and "rank 1 has the data's fingerprint" in data[0]["error"]
    assert all(r.get("ok") for r in _job("agree-same"))


# ------------------------------------------------------------------------------------------------ the rendezvous
@pytest.mark.slow
def test_a_peer_that_never_starts_ends_the_rendezvous_in_one_line():
    result = _result(_start(0, free_port(), "agree-same", 3.0))
    assert "1 of the 2 processes joined" in result["error"] and result["seconds"] < 3.0 * 2 + 10


@pytest.mark.slow
def test_a_port_in_use_and_a_port_that_is_no_store():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        first = _result(_start(0, port, "agree-same", 3.0))
        assert f"MASTER_PORT {port} is in use" in first["error"] and first["seconds"] < 10
        # rank 1 reaches the listener, which accepts and never answers: c10d's client alone would wait without end
        second = _result(_start(1, port, "agree-same", 3.0))
        assert "did not complete within 6 s" in second["error"] and second["seconds"] < 6 + 10


# ------------------------------------------------------------------------------------------------ a peer lost
@pytest.mark.slow
def test_peers_lost_at_a_collective_or_a_barrier_end_in_one_line():
    died = _job("die-in-collective")
    assert "another process stopped" in died[0]["error"] and died[0]["seconds"] < 15
    errored = _job("error-before-barrier")
    assert errored[1]["error"] == "x.jpg: not an image file"
    assert "rank 1 stopped: x.jpg: not an image file" in errored[0]["error"] and errored[0]["seconds"] < 15
    silent = _job("die-before-barrier", timeout=3.0)
    assert "rank 1 gave no sign of life for 3 s" in silent[0]["error"] and silent[0]["seconds"] < 3 + 15


@pytest.mark.slow
def test_a_live_peer_is_waited_for_longer_than_the_timeout():
    t0 = time.monotonic()
    assert all(r.get("ok") for r in _job("slow-barrier", timeout=2.0))
    assert time.monotonic() - t0 > 5.0


# ------------------------------------------------------------------------------------------ through fastbyol train
TRAIN = ["--data", "synthetic", "--epochs", "3", "--batch-size", "32", "--image-size", "16", "--knn-every", "0",
         "--no-progress", "--num-threads", "1", "--proj-dim", "32", "--pred-hidden", "64", "--log-every", "2"]


def _train_rank(rank: int, port: int, out, *extra: str) -> subprocess.Popen:
    env = dict(ENV, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(port))
    return subprocess.Popen([sys.executable, "-m", "fastbyol", "train", *TRAIN, "--out", str(out), *extra], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _one_line_exit_2(proc: subprocess.Popen, limit: float = 300) -> str:
    _, err = proc.communicate(timeout=limit)
    err = without_log_lines(err)  # the steps trained before the stop logged their lines
    assert proc.returncode == 2 and err.count("\n") == 1 and "Traceback" not in err, err[-3000:]
    return err


@pytest.mark.slow
def test_fastbyol_train_ranks_with_another_width_stop_before_the_first_step(tmp_path):
    """The issue's example: two ranks started with different --proj-hidden; one line each, no DDP traceback."""
    port = free_port()
    procs = [_train_rank(r, port, tmp_path / "run", "--proj-hidden", str(64 * (r + 1))) for r in (0, 1)]
    errs = [_one_line_exit_2(p) for p in procs]
    assert errs[0] == errs[1] and "rank 1 has --proj-hidden 128, rank 0 has 64" in errs[0]
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_fastbyol_train_survivors_of_a_killed_or_stopped_peer_end_in_one_line(tmp_path):
    """A peer SIGKILLed mid-run: the other ends at once; a peer that stops answering (SIGSTOP): after the timeout."""
    import signal

    for sig, timeout, needle in ((signal.SIGKILL, 60, "another process stopped"),
                                 (signal.SIGSTOP, 8, "did not complete within --dist-timeout 8 s")):
        out, port = tmp_path / sig.name, free_port()
        procs = [_train_rank(r, port, out, "--proj-hidden", "64", "--dist-timeout", str(timeout)) for r in (0, 1)]
        try:
            deadline = time.monotonic() + 300
            while not (out / "metrics.jsonl").is_file() or not (out / "metrics.jsonl").stat().st_size:
                assert time.monotonic() < deadline and procs[0].poll() is None, procs[0].communicate()[1][-3000:]
                time.sleep(0.05)
            procs[1].send_signal(sig)
            t0 = time.monotonic()
            err = _one_line_exit_2(procs[0])
            assert needle in err and time.monotonic() - t0 < timeout + 20, err
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                p.communicate()
        assert not out.exists()  # a new run that stopped before its first checkpoint leaves nothing
