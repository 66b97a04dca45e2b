"""Elastic restart under torchrun, on one host and on two (network namespaces joined by a veth pair).

- `torchrun --max-restarts 3 ... --auto-resume` with 2 processes: one worker killed with SIGKILL after the first
  checkpoint brings the group down, torchrun starts it again, the same command line continues from the checkpoint,
  and the run ends with the parameters of an uninterrupted 2-process run.
- Two hosts: two network namespaces, 198.51.100.1 and 198.51.100.2 (a documentation range, inside the namespaces
  only), one torchrun agent in each (`--nnodes 2 --rdzv-backend c10d`, the endpoint on the first host's address,
  gloo over the veth: GLOO_SOCKET_IFNAME), one worker each. The 2-host run gives the 2-process one-host run's
  parameters; then the second host's worker is killed mid-run and the elastic restart finishes it exactly. The
  namespaces (and every process left in them) are removed at the end, also when the test fails. Skipped, with the
  reason, where namespaces cannot be made (not root, no `ip`, a container without the capability).
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

from .support import child_pids as _children
from .support import small_idx_dataset as _small_idx_dataset

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="torchrun's workers are found through /proc")

# 320 images, global batch 32 (16 a process): 10 steps an epoch, 20 in all
ARGS = ["--epochs", "2", "--batch-size", "32", "--image-size", "16", "--num-threads", "1", "--log-every", "2",
        "--ckpt-every-steps", "2", "--knn-every", "0", "--proj-hidden", "64", "--pred-hidden", "64", "--proj-dim", "32",
        "--seed", "11", "--no-progress"]
STEPS = 20
HOSTS = ("198.51.100.1", "198.51.100.2")
ENV = dict(os.environ, OMP_NUM_THREADS="1")
# rank 0 (the writer) SIGKILLs itself inside its 2nd checkpoint write (step 4), once: the restarted group is spared
KILLED_ONCE = dict(ENV, FASTBYOL_TEST_KILL_IN_CHECKPOINT_WRITE="2", FASTBYOL_TEST_KILL_FRESH_ONLY="1")
STEP_AT_KILL = 2  # the checkpoint left by the kill: the write of step 4 was never renamed


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(data, out, rdzv: list[str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *rdzv, "--max-restarts", "3", "--monitor-interval", "0.2",
            "-m", "fastbyol", "train", "--data", str(data), "--out", str(out), *ARGS, "--auto-resume"]


def _one_host(port: int) -> list[str]:
    return ["--nnodes", "1", "--nproc-per-node", "2", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}"]


def _two_hosts(node: int, port: int) -> list[str]:
    return ["--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint",
            f"{HOSTS[0]}:{port}", "--rdzv-id", "fastbyol-two-hosts", "--rdzv-conf", f"is_host={int(node == 0)}",
            "--local-addr", HOSTS[node]]


def _kill_tree(pid: int) -> None:
    """SIGKILL a torchrun agent and its workers (which run in sessions of their own)."""
    for child in _children(pid):
        _kill_tree(child)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _finish(procs: list[subprocess.Popen], timeout: float = 600) -> list[str]:
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=timeout)
        assert p.returncode == 0, (out or "")[-1500:] + (err or "")[-3000:]
        outs.append(out)
    return outs


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """(data folder, the uninterrupted 2-process one-host run's summary)."""
    root = tmp_path_factory.mktemp("elastic")
    data = _small_idx_dataset(root / "data", 320, 64)
    full = root / "full"
    res = subprocess.run(_torchrun(data, full, _one_host(_free_port())), capture_output=True, text=True, timeout=600,
                         env=ENV)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((full / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == STEPS
    return data, summary


@pytest.mark.slow
def test_torchrun_restarts_a_killed_worker_and_the_run_ends_exactly(reference, tmp_path):
    data, expected = reference
    run = tmp_path / "run"
    agent = subprocess.Popen(_torchrun(data, run, _one_host(_free_port())), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=KILLED_ONCE)
    try:
        out = _finish([agent])[0]
    finally:
        if agent.poll() is None:
            _kill_tree(agent.pid)
    assert f"resuming {run} at step {STEP_AT_KILL}" in out  # the restarted group continued the killed run
    summary = json.loads((run / "summary.json").read_text())
    assert summary["resumed"] and summary["steps"] == STEPS
    assert summary["params_sha256"] == expected["params_sha256"]


# ------------------------------------------------------------------------------------------------------- two hosts
def _ip(*argv, check=True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *argv], capture_output=True, text=True, timeout=30, check=check)


@pytest.fixture
def two_hosts():
    """Two network namespaces joined by a veth pair: [(namespace, interface)] for hosts .1 and .2; torn down (with
    every process still in them) at the end."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("two hosts need root and iproute2's `ip` (network namespaces)")
    tag = f"fb{os.getpid() % 100000}"
    names, links = [f"{tag}-a", f"{tag}-b"], [f"{tag}a", f"{tag}b"]
    try:
        for ns in names:
            _ip("netns", "add", ns)
        _ip("link", "add", links[0], "type", "veth", "peer", "name", links[1])
        for ns, link, host in zip(names, links, HOSTS):
            _ip("link", "set", link, "netns", ns)
            _ip("-n", ns, "addr", "add", f"{host}/24", "dev", link)
            _ip("-n", ns, "link", "set", link, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
    except (subprocess.CalledProcessError, OSError) as e:
        _teardown(names)
        reason = e.stderr.strip() if isinstance(e, subprocess.CalledProcessError) else str(e)
        pytest.skip(f"network namespaces cannot be made here: {reason}")
    try:
        yield list(zip(names, links))
    finally:
        _teardown(names)


def _teardown(names: list[str]) -> None:
    for ns in names:
        pids = _ip("netns", "pids", ns, check=False).stdout.split()
        for pid in pids:  # the agents and workers this test started there
            try:
                os.kill(int(pid), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
        _ip("netns", "del", ns, check=False)


def _agents(hosts, data, out, port, env=ENV) -> list[subprocess.Popen]:
    return [subprocess.Popen(["ip", "netns", "exec", ns, "env", f"GLOO_SOCKET_IFNAME={link}",
                              *_torchrun(data, out, _two_hosts(node, port))],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
            for node, (ns, link) in enumerate(hosts)]


@pytest.mark.slow
def test_two_hosts_equal_one_host_and_restart_exactly(reference, two_hosts, tmp_path):
    data, expected = reference
    ns_a = two_hosts[0][0]
    ping = subprocess.run(["ip", "netns", "exec", ns_a, sys.executable, "-c",
                           f"import socket; socket.create_connection(('{HOSTS[1]}', 9), 3)"],
                          capture_output=True, text=True, timeout=30)
    assert "refused" in ping.stderr.lower(), ping.stderr  # host .2 answers from host .1 (nothing listens on port 9)
    full = tmp_path / "two-hosts"
    procs = _agents(two_hosts, data, full, 29400)
    try:
        _finish(procs)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    summary = json.loads((full / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == STEPS
    assert summary["params_sha256"] == expected["params_sha256"]

    run = tmp_path / "killed"
    procs = _agents(two_hosts, data, run, 29401, env=KILLED_ONCE)  # the writer's worker dies once
    try:
        outs = _finish(procs)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert any(f"resuming {run} at step {STEP_AT_KILL}" in out for out in outs)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["resumed"] and summary["steps"] == STEPS
    assert summary["params_sha256"] == expected["params_sha256"]


# ------------------------------------------------------------------------------- a restarted group under one store
def test_each_start_agrees_on_a_fresh_prefix_despite_an_earlier_starts_keys():
    """`_agree_on_attempt` on one store across two starts of a 2-rank group: the second start's ranks agree on one
    name, not the first start's, though the first start's hello/ack keys are still there and rank 1 comes late."""
    import threading
    from datetime import timedelta

    import torch.distributed as dist

    from fastbyol.system.distributed import _agree_on_attempt

    server = dist.TCPStore("127.0.0.1", 0, is_master=True, multi_tenant=True, timeout=timedelta(seconds=60))

    def start(late: float) -> list[str]:
        names = [None, None]

        def rank(r):
            time.sleep(late if r == 1 else 0.0)
            client = dist.TCPStore("127.0.0.1", server.port, 2, is_master=False, timeout=timedelta(seconds=60))
            names[r] = _agree_on_attempt(client, r, 2, poll_s=0.01)

        threads = [threading.Thread(target=rank, args=(r,)) for r in (0, 1)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        return names

    first = start(0.0)
    second = start(0.5)  # rank 0 first finds the first start's hello/1 and answers it: nobody waits for that answer
    assert first[0] == first[1] and second[0] == second[1] and first[0] != second[0]


_START = """
import os, sys, time
import torch, torch.distributed as dist
rank, port, delay = int(sys.argv[1]), sys.argv[2], float(sys.argv[3])
time.sleep(delay)
os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
                  TORCHELASTIC_USE_AGENT_STORE="True")
from fastbyol.system.distributed import close_distributed, init_distributed
init_distributed("cpu")
t = torch.full((1,), rank + 1.0)
dist.all_reduce(t)
dist.barrier()
print("sum", t.item(), flush=True)
close_distributed()  # as the trainer does: a gloo group left to interpreter exit can abort ("terminate called ...")
"""


@pytest.mark.slow
def test_a_restarted_gloo_group_joins_under_the_agent_store_with_ranks_apart():
    """What torchrun does on a restart, without torchrun: two starts of a 2-process gloo group (init_distributed:
    the default group, the BN group) on one shared store that keeps the first start's keys, the second start with
    its ranks 2 s apart. On the plain env:// rendezvous the second start fails ("connectFullMesh ... Connection
    refused": the late rank's key still holds the dead first start's address)."""
    from datetime import timedelta

    import torch.distributed as dist

    server = dist.TCPStore("127.0.0.1", 0, is_master=True, multi_tenant=True, timeout=timedelta(seconds=120))
    for delays in ((0.0, 0.0), (0.0, 2.0)):
        procs = [subprocess.Popen([sys.executable, "-c", _START, str(r), str(server.port), str(d)], env=ENV,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for r, d in enumerate(delays)]
        outs = _finish(procs, timeout=300)
        assert all("sum 3.0" in out for out in outs), outs
