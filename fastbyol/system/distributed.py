"""Data-parallel pieces: process-group set-up from torchrun's environment and the collectives the trainer's
bookkeeping uses (broadcast, gather, barrier, global mean: identities with one process). Batch norm over all ranks
is `fastbyol.system.batchnorm`'s, DDP's wrapping `fastbyol.system.data_parallel`'s.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def world() -> tuple[int, int, int]:
    """(rank, local_rank, world_size) from torchrun's environment; (0, 0, 1) without it; a bad value is one line
    naming the variable (`fastbyol.system.environment`)."""
    from .environment import torchrun_world

    return torchrun_world()


def _attempt_store(rank: int, world_size: int):
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
    from torch.distributed.constants import default_pg_timeout

    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size, is_master=False,
                          timeout=default_pg_timeout)  # a client of the agent's server, as env:// makes it
    return dist.PrefixStore(f"fastbyol/attempt/{_agree_on_attempt(store, rank, world_size)}", store)


def _agree_on_attempt(store, rank: int, world_size: int, poll_s: float = 0.05) -> str:
    """A name for this start of the group, the same on every rank, unused by any earlier start (collective, over the
    store). Rank 0 draws it; rank r draws a nonce, posts it under `hello/r` (an earlier start's nonce may still be
    there: rank 0 answers whatever it finds) and waits for the answer under `ack/<its nonce>`, a key only this start
    writes; rank 0 goes on until every rank has confirmed under `joined/<name>/r`."""
    import time
    import uuid

    from torch.distributed.constants import default_pg_timeout

    nonce = uuid.uuid4().hex
    if rank != 0:
        store.set(f"fastbyol/hello/{rank}", nonce)
        store.wait([f"fastbyol/ack/{nonce}"])  # the store's timeout bounds it
        name = store.get(f"fastbyol/ack/{nonce}").decode()
        store.set(f"fastbyol/joined/{name}/{rank}", "1")
        return name
    waiting, answered = set(range(1, world_size)), {}
    deadline = time.monotonic() + default_pg_timeout.total_seconds()
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
            raise RuntimeError(f"ranks {sorted(waiting)} did not join this start of the worker group in "
                               f"{default_pg_timeout}")
        if waiting:
            time.sleep(poll_s)
    return nonce


def init_distributed(device_type: str) -> tuple[int, int, bool]:
    """Join the process group torchrun describes (nccl on CUDA, gloo on CPU).

    Returns (rank, world_size, created): created is True when this call made the group (the caller then destroys
    it), False when there is one process or the caller's code had already joined a group."""
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), False
    rank, local_rank, world_size = world()
    if world_size == 1:
        return rank, world_size, False
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
    backend = "nccl" if device_type == "cuda" else "gloo"
    store = _attempt_store(rank, world_size)
    if store is None:
        dist.init_process_group(backend)
    else:
        dist.init_process_group(backend, store=store, rank=rank, world_size=world_size)
    return rank, world_size, True


def close_distributed() -> None:
    from .batchnorm import forget_bn_groups

    if dist.is_initialized():
        dist.destroy_process_group()
    forget_bn_groups()


def broadcast_object(obj, rank: int, world_size: int):
    """Rank 0's value of a picklable object, on every rank (collective); `obj` itself with one process."""
    if world_size == 1:
        return obj
    box = [obj if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(obj, world_size: int) -> list:
    """Every rank's value of a picklable object, in rank order, on every rank (collective); [obj] with one process."""
    if world_size == 1:
        return [obj]
    out = [None] * world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(world_size: int) -> None:
    """Wait until every rank gets here (collective); nothing with one process."""
    if world_size > 1:
        dist.barrier()


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
