"""Data-parallel pieces: process-group set-up from torchrun's environment and the collectives the trainer's
bookkeeping uses (broadcast, gather, barrier, global mean: identities with one process). Batch norm over all ranks
is `fastbyol.system.batchnorm`'s, DDP's wrapping `fastbyol.system.data_parallel`'s.

Every wait on another rank is bounded by --dist-timeout (`init_distributed(device_type, timeout_s)`): the rendezvous
(at most twice the timeout, one line for a peer that never starts, a port in use or held by another program), every
process group's collectives (`group_timeout()` for the groups made elsewhere: BN's), and `barrier`, which waits for a
live rank however long it works and for a silent one at most the timeout (fastbyol.system.peers). The bookkeeping's
objects (broadcast, gather, the stop check) go over one gloo group (`control_group`: the default group on the CPU, a
gloo group beside NCCL on CUDA). `explain(e)` turns what torch raises for a lost peer into one line.
"""

from __future__ import annotations

import os
import re
import sys
import threading
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from ..errors import FastByolError
from .native import native_stderr
from .peers import Peers, lost_peer
from .peers import first_line


def world() -> tuple[int, int, int]:
    """(rank, local_rank, world_size) from torchrun's environment; (0, 0, 1) without it; a bad value is one line
    naming the variable (`fastbyol.system.environment`)."""
    from .environment import torchrun_world

    return torchrun_world()


DEFAULT_TIMEOUT_S = 600.0  # --dist-timeout's default (fastbyol.config.RunConfig.dist_timeout), torch's NCCL default
RENDEZVOUS_FACTOR = 2.0  # the rendezvous ends within this many timeouts (c10d's store client retries past one)
_PEERS: Peers | None = None  # the other ranks, while this process's group lives (fastbyol.system.peers)
_LAST = {"rank": 0, "timeout_s": DEFAULT_TIMEOUT_S, "peers": None}  # the last group made here, for `explain`


def _timeout() -> timedelta:
    return timedelta(seconds=_LAST["timeout_s"])


def group_timeout() -> timedelta:
    """The timeout of every collective of the group made by `init_distributed` (--dist-timeout), for the process
    groups made beside it (BN's: fastbyol.system.batchnorm.bn_process_group)."""
    return _timeout()


def _attempt_store(rank: int, world_size: int, timeout: timedelta):
    """The key-value store of this start of the worker group, under torchrun's shared agent store; None elsewhere
    (the plain env:// rendezvous).

    torchrun (torch 2.13, c10d rendezvous) gives its workers the store its agent keeps for the whole job
    (TORCHELASTIC_USE_AGENT_STORE=True), the same server and keys after every `--max-restarts` restart. A restarted
    group's gloo ranks then find the previous start's addresses under the same keys, and a rank that reads a peer's
    key before that peer wrote it anew connects to a dead process: "connectFullMesh ... timed out connecting ...
    Connection refused", in every restart, as soon as the ranks' start-ups are a little apart (a loaded host). So
    every key of the process groups goes under a prefix of this start alone, which rank 0 chooses and hands out
    over keys nobody used before (`_agree_on_attempt`). The restart count is no such prefix: each node's agent
    counts its own restarts, and a node restarted for another node's failure does not count it."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size, is_master=False,
                          timeout=timeout)  # a client of the agent's server, as env:// makes it
    name = _agree_on_attempt(store, rank, world_size, timeout_s=timeout.total_seconds())
    return dist.PrefixStore(f"fastbyol/attempt/{name}", store)


def _agree_on_attempt(store, rank: int, world_size: int, poll_s: float = 0.05,
                      timeout_s: float = DEFAULT_TIMEOUT_S) -> str:
    """A name for this start of the group, the same on every rank, unused by any earlier start (collective, over the
    store). Rank 0 draws it; rank r draws a nonce, posts it under `hello/r` (an earlier start's nonce may still be
    there: rank 0 answers whatever it finds) and waits for the answer under `ack/<its nonce>`, a key only this start
    writes; rank 0 goes on until every rank has confirmed under `joined/<name>/r`. Each side waits at most
    `timeout_s` (the store's own timeout bounds the other ranks' wait)."""
    import uuid

    nonce = uuid.uuid4().hex
    if rank != 0:
        store.set(f"fastbyol/hello/{rank}", nonce)
        store.wait([f"fastbyol/ack/{nonce}"])  # the store's timeout bounds it
        name = store.get(f"fastbyol/ack/{nonce}").decode()
        store.set(f"fastbyol/joined/{name}/{rank}", "1")
        return name
    waiting, answered = set(range(1, world_size)), {}
    deadline = time.monotonic() + timeout_s
    while waiting:
        for r in sorted(waiting):
            if store.check([f"fastbyol/hello/{r}"]):
                posted = store.get(f"fastbyol/hello/{r}").decode()
                if answered.get(r) != posted:
                    store.set(f"fastbyol/ack/{posted}", nonce)
                    answered[r] = posted
            if store.check([f"fastbyol/joined/{nonce}/{r}"]):
                waiting.discard(r)
        if waiting and time.monotonic() > deadline:
            raise FastByolError(f"rank 0: ranks {sorted(waiting)} did not join this start of the worker group within "
                                f"--dist-timeout {timeout_s:g} s")
        if waiting:
            time.sleep(poll_s)
    return nonce


def init_distributed(device_type: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> tuple[int, int, bool]:
    """Join the process group torchrun describes (nccl on CUDA, gloo on CPU), every wait bounded by `timeout_s`
    (--dist-timeout): the rendezvous, each collective, and a barrier's wait for a rank that shows no sign of life
    (fastbyol.system.peers). A rendezvous that cannot complete (a peer that never starts, a port in use, an
    unreachable host) is one FastByolError line.

    Returns (rank, world_size, created): created is True when this call made the group (the caller then destroys
    it), False when there is one process or the caller's code had already joined a group."""
    global _PEERS
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), False
    rank, local_rank, world_size = world()
    if world_size == 1:
        return rank, world_size, False
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
    backend = "nccl" if device_type == "cuda" else "gloo"
    _LAST.update(rank=rank, timeout_s=float(timeout_s), peers=None)
    def join():
        if device_type == "cuda":
            torch.cuda.set_device(local_rank)  # the current device is per thread
        store = _attempt_store(rank, world_size, _timeout())
        if store is None:
            dist.init_process_group(backend, timeout=_timeout())
        else:
            dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=_timeout())
        # the bookkeeping's collectives (objects, barriers' fallback, the stop check) on gloo: host memory only
        control = dist.group.WORLD if backend == "gloo" else dist.new_group(backend="gloo", timeout=_timeout())
        return control

    try:
        with native_stderr():  # c10d's own retry and timeout lines (with C++ frames): the error below says it
            control = _bounded(join, RENDEZVOUS_FACTOR * timeout_s, rank)
    except Exception as e:  # noqa: BLE001 (what torch raises for a rendezvous that cannot complete: one line)
        close_distributed()
        mapped = e if isinstance(e, FastByolError) else rendezvous_error(e, rank, world_size, timeout_s)
        if mapped is None:
            raise
        raise mapped from None
    _PEERS = _LAST["peers"] = Peers(dist.distributed_c10d._get_default_store(), rank, world_size, timeout_s,
                                    control).start()
    return rank, world_size, True


def _bounded(join, limit_s: float, rank: int):
    """join() in a thread of its own, waited for at most `limit_s`: c10d's store client can wait without end for
    a listener on MASTER_PORT that is no store (another program's port); that thread is then left behind (a
    daemon, blocked in a socket read) and the rendezvous is one line."""
    result: dict = {}

    def run():
        try:
            result["value"] = join()
        except BaseException as e:  # noqa: BLE001 (raised again in the caller's thread)
            result["error"] = e

    thread = threading.Thread(target=run, name="fastbyol-rendezvous", daemon=True)
    thread.start()
    thread.join(limit_s)
    if thread.is_alive():
        addr, port = os.environ.get("MASTER_ADDR", "?"), os.environ.get("MASTER_PORT", "?")
        raise FastByolError(f"rank {rank}: the rendezvous at {addr}:{port} did not complete within {limit_s:g} s "
                            f"({RENDEZVOUS_FACTOR:g} x --dist-timeout): is a rendezvous store listening there (rank 0, "
                            "or torchrun's agent), and not another program?")
    if "error" in result:
        raise result["error"]
    return result["value"]


def rendezvous_error(e: BaseException, rank: int, world_size: int, timeout_s: float) -> FastByolError | None:
    """One line for a rendezvous that could not complete, naming what to check; None when `e` is something else."""
    addr, port = os.environ.get("MASTER_ADDR", "?"), os.environ.get("MASTER_PORT", "?")
    text = str(e)
    if "EADDRINUSE" in text or "address already in use" in text.lower():
        return FastByolError(f"rank {rank}: MASTER_PORT {port} is in use on {addr} (another job, or a run that is "
                             "still going, listens there): choose another port (torchrun --master-port)")
    joined = re.search(r"(\d+)/(\d+) clients joined", text)
    if joined:
        return FastByolError(f"rank {rank}: {joined.group(1)} of the {world_size} processes joined at {addr}:{port} "
                             f"within --dist-timeout {timeout_s:g} s: start every rank (same MASTER_ADDR, "
                             "MASTER_PORT and WORLD_SIZE)")
    if isinstance(e, (dist.DistError, RuntimeError)) and re.search(r"[Tt]imed? ?out|timeout|[Cc]onnect", text):
        return FastByolError(f"rank {rank}: the rendezvous at {addr}:{port} did not complete within --dist-timeout "
                             f"{timeout_s:g} s (rank 0 not started, another host or port, or a peer that stopped: "
                             f"{first_line(e)})")
    return None


def explain(e: BaseException) -> FastByolError | None:
    """One line for an exception that says a rank of the last group made here was lost (a peer stopped, a
    collective timed out, the processes built different models); None otherwise, or when no group was made."""
    if _LAST["peers"] is None:
        return None
    return lost_peer(e, _LAST["rank"], _LAST["timeout_s"], _LAST["peers"])


def close_distributed() -> None:
    """Leave the group (idempotent). Called while an exception propagates (the caller's `finally`), it first posts
    that exception's line for the ranks that wait on this one (fastbyol.system.peers)."""
    from .batchnorm import forget_bn_groups

    global _PEERS
    if _PEERS is not None:
        _PEERS.stop(sys.exc_info()[1])
        _PEERS = None
    if dist.is_initialized():
        dist.destroy_process_group()
    forget_bn_groups()


def control_group():
    """The gloo group of the bookkeeping's collectives (the default group on the CPU); None without a group made by
    init_distributed (the default group then)."""
    return None if _PEERS is None else _PEERS.group


def broadcast_object(obj, rank: int, world_size: int):
    """Rank 0's value of a picklable object, on every rank (collective); `obj` itself with one process."""
    if world_size == 1:
        return obj
    box = [obj if rank == 0 else None]
    dist.broadcast_object_list(box, src=0, group=control_group())
    return box[0]


def gather_objects(obj, world_size: int) -> list:
    """Every rank's value of a picklable object, in rank order, on every rank (collective); [obj] with one process."""
    if world_size == 1:
        return [obj]
    out = [None] * world_size
    dist.all_gather_object(out, obj, group=control_group())
    return out


def barrier(world_size: int) -> None:
    """Wait until every rank gets here (collective); nothing with one process. Under init_distributed's group a
    live rank is waited for however long it works, a dead one at most --dist-timeout (fastbyol.system.peers)."""
    if world_size == 1:
        return
    if _PEERS is None:
        dist.barrier()
    else:
        _PEERS.barrier()


def global_mean(t: torch.Tensor, world_size: int) -> float:
    """sync: a device scalar averaged over the ranks, to the host (collective; call it at log and checkpoint points
    only). `t` itself is left unchanged."""
    if world_size > 1:
        t = t.detach().clone()
        dist.all_reduce(t)
        t /= world_size
    return t.item()


class DeferredMean:
    """A device scalar averaged over the ranks and brought to the host without draining the queue: `start` queues the
    all-reduce (collective), a non_blocking copy into pinned host memory and an event after it; `value`, called a log
    point later, waits on that event (long passed in a steady loop) and reads the copy. On the CPU there is no queue:
    the copy is done when `start` returns and `value` only reads it. One value in flight at a time."""

    def __init__(self, device: torch.device):
        self.device = device
        self._host = torch.zeros((), pin_memory=device.type == "cuda")  # pinned: the copy is truly asynchronous
        self._event: torch.cuda.Event | None = None
        self.pending = False

    def start(self, t: torch.Tensor, world_size: int) -> None:
        """Queue the mean of the 0-D tensor `t` over the ranks (collective); `t` may be changed right after."""
        if world_size > 1:
            t = t.detach().clone()
            dist.all_reduce(t)
            t /= world_size
        self._host.copy_(t.detach(), non_blocking=True)
        if self.device.type == "cuda":
            self._event = torch.cuda.Event()
            self._event.record()
        self.pending = True

    def value(self) -> float:
        """The mean queued by the last `start`, as a float (the same value `global_mean` gives)."""
        if self._event is not None:
            self._event.synchronize()  # sync: on the event of the previous log point, not on the queue
            self._event = None
        self.pending = False
        return self._host.item()  # a host tensor: no device round trip
