"""Data-parallel pieces: process-group set-up from torchrun's environment, the collectives the trainer's
bookkeeping uses (broadcast, gather, barrier, global mean: identities with one process), and batch norm over all
ranks.

Every wait on another rank is bounded by --dist-timeout (`init_distributed(device_type, timeout_s)`): the rendezvous
(at most twice the timeout, one line for a peer that never starts, a port in use or held by another program), every
process group's collectives, and `barrier`, which waits for a live rank however long it works and for a silent one at
most the timeout (fastbyol.system.peers). The bookkeeping's objects (broadcast, gather, the stop check) go over one
gloo group (`control_group`: the default group on the CPU, a gloo group beside NCCL on CUDA). `explain(e)` turns what
torch raises for a lost peer into one line.

The official recipe's BN is cross-replica. `nn.SyncBatchNorm` needs CUDA and breaks a torch.compile graph at every
BN layer (c10d calls Dynamo cannot trace), so `GlobalBatchNorm` does
it for CUDA (NCCL) and the CPU (gloo) alike: each rank's per-channel mean, sum of squared deviations and count
are exchanged by one functional all-reduce that Dynamo traces, so a compiled model has no graph break
(tests/test_dist_batchnorm.py counts them with torch._dynamo.explain under gloo), and the backward is the single-process
backward of the whole global batch.
`convert_batchnorm(model, device_type)` swaps it in.
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
import torch.nn as nn

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
_BN_GROUP = None
_PEERS: Peers | None = None  # the other ranks, while this process's group lives (fastbyol.system.peers)
_LAST = {"rank": 0, "timeout_s": DEFAULT_TIMEOUT_S, "peers": None}  # the last group made here, for `explain`


def _timeout() -> timedelta:
    return timedelta(seconds=_LAST["timeout_s"])


def _cpu_bn_group():
    """A gloo process group of its own for the BN statistics on the CPU (see `_bn_group`)."""
    global _BN_GROUP
    if _BN_GROUP is None:
        _BN_GROUP = dist.new_group(backend="gloo", timeout=_timeout())
    return _BN_GROUP


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
        if device_type != "cuda":
            _cpu_bn_group()  # made now, by every rank together, not lazily in the first forward
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


def data_parallel(model: nn.Module, device: torch.device, world_size: int) -> nn.Module:
    """The network the step runs: the model itself, or under torchrun DDP with cross-replica BN (GlobalBatchNorm, one
    functional all-reduce on NCCL and gloo: no graph break under torch.compile). The BN buffers are equal on every
    rank by construction, so DDP does not broadcast them; the gradient buckets are views with each parameter's own
    (channels_last) strides."""
    if world_size == 1:
        return model
    import inspect

    from torch.nn.parallel import DistributedDataParallel

    convert_batchnorm(model, device.type)
    no_buffer_sync = ({"forward_sync_buffers": False}  # newer torch's name for the same switch
                      if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
                      else {"broadcast_buffers": False})
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                   gradient_as_bucket_view=True, **no_buffer_sync)


def close_distributed() -> None:
    """Leave the group (idempotent). Called while an exception propagates (the caller's `finally`), it first posts
    that exception's line for the ranks that wait on this one (fastbyol.system.peers)."""
    global _BN_GROUP, _PEERS
    if _PEERS is not None:
        _PEERS.stop(sys.exc_info()[1])
        _PEERS = None
    if dist.is_initialized():
        dist.destroy_process_group()
    _BN_GROUP = None


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


class _AllReduceSum(torch.autograd.Function):
    """Sum over the ranks of a process group, with the functional collective (`_c10d_functional.all_reduce`), which
    Dynamo traces into the graph; SyncBatchNorm's and `torch.distributed.nn`'s c10d calls break the graph instead.
    Backward: the incoming gradients summed over the ranks (d/ds_r of sum_r' L_r')."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group_name: str) -> torch.Tensor:
        ctx.group_name = group_name
        # wait_tensor: on CUDA the current stream waits for NCCL's (no host sync); on the CPU the host waits for gloo
        return torch.ops._c10d_functional.wait_tensor(torch.ops._c10d_functional.all_reduce(x, "sum", group_name))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        summed = torch.ops._c10d_functional.all_reduce(grad.contiguous(), "sum", ctx.group_name)
        return torch.ops._c10d_functional.wait_tensor(summed), None


class GlobalBatchNorm(nn.BatchNorm2d):
    """BatchNorm over the union of every rank's batch (2-D and 4-D inputs), traceable by torch.compile, on CUDA
    (NCCL) and on the CPU (gloo).

    Training: each rank's per-channel (mean, M2 = sum of squared deviations, count), from torch.var_mean (two-pass /
    Welford: no sum-of-squares cancellation when |mean| >> std), goes into its row of a (world, 2C + 1) table; one
    autograd-aware functional all-reduce sums the table, so every rank holds every row, and the rows combine by
    Chan's formula, as SyncBatchNorm combines its gathered statistics. The backward is the single-process backward
    of the global batch. Biased variance to normalize, unbiased for the running estimate, as nn.BatchNorm does;
    statistics in float32 (float64 for float64 inputs). Evaluation, or no group: plain BN.

    Nothing computed in the forward depends on the running buffers, which are updated in place: torch 2.13's
    AOTAutograd was seen to give wrong input gradients when a value used in the backward is derived from a buffer
    mutated later in the same graph (the running mean as a shift for the sums; tests/test_dist_batchnorm.py).

    group_name, rank, world_size: the process group the statistics are summed over and this process's place in it,
    set by `convert_batchnorm`; group_name None = plain BN."""

    group_name: str | None = None
    rank: int = 0
    world_size: int = 1

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.ndim not in (2, 4):
            raise ValueError(f"GlobalBatchNorm expects 2-D or 4-D input, got {x.ndim}-D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.group_name is None:
            return super().forward(x)
        self._check_input_dim(x)
        c = x.shape[1]
        dims = [0] if x.ndim == 2 else [0, 2, 3]
        shape = [1, c] if x.ndim == 2 else [1, c, 1, 1]
        xf = x.to(torch.promote_types(x.dtype, torch.float32))  # bf16/fp16 activations: fp32 statistics
        var_local, mean_local = torch.var_mean(xf, dim=dims, correction=0)  # (C,) each
        n_local = torch.full((1,), x.numel() // c, device=x.device, dtype=xf.dtype)
        mine = (torch.arange(self.world_size, device=x.device) == self.rank).to(xf.dtype)  # (world,) one-hot
        row = torch.cat([mean_local, var_local * n_local, n_local])  # (2C + 1,) mean, M2, count
        # (world, 2C + 1): every rank's row, after one all-reduce (its backward sums the gradients over the ranks)
        table = _AllReduceSum.apply(mine[:, None] * row[None, :], self.group_name)
        means, m2s, counts = table[:, :c], table[:, c:2 * c], table[:, 2 * c:]  # (world, C), (world, C), (world, 1)
        n = counts.sum()
        mean = (counts * means).sum(0) / n
        var = (m2s + counts * (means - mean) ** 2).sum(0) / n  # biased: what normalizes
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                # momentum None: the cumulative average, as nn.BatchNorm
                factor = (self.momentum if self.momentum is not None
                          else 1.0 / self.num_batches_tracked.to(self.running_mean.dtype))
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), factor)
                unbiased = var * n / (n - 1).clamp_min(1.0)
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), factor)
        y = (xf - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)


def _bn_group(device_type: str) -> tuple[str, int, int]:
    """(group name, rank in it, its size) of the group the BN statistics are summed over: the default (NCCL) group
    on CUDA, as SyncBatchNorm; on the CPU a gloo group of its own (made by every rank together in
    `init_distributed`), so its collectives never interleave with DDP's asynchronous gradient all-reduces."""
    group = dist.group.WORLD if device_type == "cuda" else _cpu_bn_group()
    return group.group_name, dist.get_rank(group), dist.get_world_size(group)


def convert_batchnorm(module: nn.Module, device_type: str) -> nn.Module:
    """Every BatchNorm1d/2d -> GlobalBatchNorm summing its statistics over all ranks (call after the process group
    is made, on every rank); the parameters and buffers are the same objects, so a frozen (target) BN stays frozen.
    Without a process group the converted layers are plain BN."""
    return _convert(module, _bn_group(device_type) if dist.is_initialized() else (None, 0, 1))


def _convert(module: nn.Module, group: tuple[str | None, int, int]) -> nn.Module:
    if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)) and not isinstance(module, GlobalBatchNorm):
        new = GlobalBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                              module.track_running_stats)
        if module.affine:  # the same Parameter objects: requires_grad (False in the target) and identity kept
            new.weight, new.bias = module.weight, module.bias
        if module.track_running_stats:
            new.running_mean, new.running_var = module.running_mean, module.running_var
            new.num_batches_tracked = module.num_batches_tracked
        new.group_name, new.rank, new.world_size = group
        new.train(module.training)
        return new
    if isinstance(module, GlobalBatchNorm):
        module.group_name, module.rank, module.world_size = group
        return module
    for name, child in module.named_children():
        module.add_module(name, _convert(child, group))
    return module
