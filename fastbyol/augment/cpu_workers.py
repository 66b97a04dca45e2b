"""The CPU loader's pixel work (crops + photometric chain) for array sources, in worker processes.

On the CPU the chain is a few thousand small torch ops per batch: each one holds the GIL while Python parses its
arguments, so worker *threads* mostly wait for each other. Measured on this project's 2-core machine at 96 px
(batch 64, both views): the chain took about as long on 2 threads as on 1, while the same work in 2 processes ran
~1.5x faster than in 1 (benchmarks/augment_vs_lightly.py has the loader-level figures). So for array sources the
loader hands each batch to `workers` processes; each crops (fastbyol.augment.crops.crop_resize_flip_many) and runs the
chain (fastbyol.augment.photometric) for its share of the batch's chunks (the thread path's chunks: `assign`), with one
torch thread each.

What crosses the process boundary: the batch's image indices, crop windows and chain parameters (a few KB, through a
pipe); the images themselves are the loader's array, inherited at fork (copy-on-write, never copied: a memory map
stays a memory map); the views come back through anonymous shared memory (two slots of two (B, S, S, 3) float32
buffers: the workers fill one batch while the parent copies the other into fresh tensors, so the loader's batches
never alias memory it reuses). DALI still draws every random number in the parent, so resume stays exact, and
every row is computed as on the thread path: the batches are the same, bit for bit (tested).

The processes are forked when the loader is built (before its DALI pipeline starts threads), do nothing but torch
and numpy work, and exit when the loader is garbage-collected or closed, or within a tenth of a second of their
parent's death (a SIGKILLed trainer included; fastbyol.system.children.watch_parent), busy or idle. A worker that
raises sends its error back (the loader raises it as one FastByolError); one that dies is named with its exit code.
"""

from __future__ import annotations

import mmap
import multiprocessing
import os
import signal
import weakref
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import FastByolError
from .photometric import ChainSpec, prepare_photometric

SLOTS = 2  # output buffers: one batch computed while the one before is copied out and consumed


def assign(tasks: list[tuple[int, list[int]]], workers: int) -> list[list[tuple[int, list[int]]]]:
    """The batch's chunks (view, image indices) dealt to `workers`: largest first, each to the least loaded (by
    images). Every worker computes the same deal from the same batch, so none is told which chunks are its own."""
    load, deal = [0] * workers, [[] for _ in range(workers)]
    for task in sorted(tasks, key=lambda t: -len(t[1])):  # stable: equal sizes keep the chain's order
        k = load.index(min(load))
        deal[k].append(task)
        load[k] += len(task[1])
    return deal


@dataclass(frozen=True)
class Work:
    """What every worker computes with: the loader's (N, H, W, 3) uint8 images (inherited at fork), the two slots of
    both views' shared output buffers, the view side, 1 or 3 channels, both views' ChainSpec, the worker count
    (each computes its share of every batch: assign)."""

    images: torch.Tensor
    outs: tuple
    size: int
    channels: int
    chains: tuple[ChainSpec, ChainSpec]
    workers: int


def _serve(conn, me: int, work: Work, parent_pid: int, inherited: list) -> None:
    """Worker `me`'s loop: (seq, slot, index, windows1, windows2, params1, params2) of a whole batch -> crops and
    runs its share of the batch's chunks (assign) into work.outs[slot], answers (seq, None) when done or (seq, the
    error's text); a None message, a closed pipe or the parent's death ends it. Ctrl-C, SIGTERM and SIGUSR1 are the
    parent's to handle: ignored. The chunks are the thread path's (fastbyol.augment.photometric.prepare_photometric
    over the whole batch's parameters), so every row is computed exactly as there.
    inherited: the parent's ends of the workers forked before this one, closed here (held open, they would keep
    those workers from seeing their parent go)."""
    from ..system.children import watch_parent
    from .crops import crop_resize_flip_many

    watch_parent(parent_pid)  # busy or idle, the worker goes within a tenth of a second of its parent
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):  # the parent's stop signals (a scheduler may send
        signal.signal(sig, signal.SIG_IGN)  # them to every process): it stops at a log point and ends the workers
    for other in inherited:
        other.close()
    torch.set_num_threads(1)
    while True:
        try:
            if not conn.poll(1.0):  # idle: a killed parent closes no pipe it shares with a sibling; check it lives
                if os.getppid() != parent_pid:
                    return
                continue
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg is None:
            return
        try:
            seq, slot, index, windows, params = msg[0], msg[1], msg[2], msg[3:5], msg[5:7]
            B = len(index)
            runs, tasks, crops = [], [], []
            for v in (0, 1):
                crops.append(torch.empty((B, work.channels, work.size, work.size), dtype=torch.uint8))  # gray: 1 plane
                run, chunks, _ = prepare_photometric(crops[v].expand(-1, 3, -1, -1), torch.from_numpy(params[v]),
                                                     work.chains[v], out=work.outs[slot][v])
                runs.append(run)
                tasks += [(v, list(idx)) for idx in chunks]
            mine = assign(tasks, work.workers)[me]
            for v in (0, 1):  # this worker's images of each view, cropped as crop_resize_flip_many does
                need = sorted({i for tv, idx in mine if tv == v for i in idx})
                if need:
                    rows = [work.images[k] for k in index[need].tolist()]  # (H, W, 3) views of the inherited array
                    (got,) = crop_resize_flip_many([(rows, torch.from_numpy(windows[v][need]))], work.size,
                                                   work.channels, None)
                    crops[v].index_copy_(0, torch.tensor(need), got[:, :work.channels])
            for v, idx in mine:
                runs[v](idx)
            conn.send((seq, None))
        except BaseException as e:  # noqa: BLE001 - sent back whole, raised in the parent
            try:
                conn.send((msg[0], f"{type(e).__name__}: {e}"))
            except (EOFError, OSError):
                return


def _shared(shape: tuple[int, ...]) -> torch.Tensor:
    """A float32 tensor in anonymous shared memory (mmap MAP_SHARED | MAP_ANONYMOUS): what a forked child writes, the
    parent sees. Not a /dev/shm file (a container's 64 MB /dev/shm would fail big batches with SIGBUS), and nothing
    is left behind when the processes die."""
    n = int(np.prod(shape))
    return torch.frombuffer(mmap.mmap(-1, 4 * n), dtype=torch.float32, count=n).reshape(shape)


def _died(proc) -> str:
    proc.join(timeout=5)
    return f"worker {proc.name} (pid {proc.pid}) died, exit code {proc.exitcode}"


def _stop(conns: list, procs: list) -> None:
    for conn in conns:
        try:
            conn.send(None)
            conn.close()
        except (EOFError, OSError):
            pass
    for proc in procs:
        proc.join(timeout=5)
        if proc.is_alive():
            proc.kill()
            proc.join(timeout=5)


class ChainProcesses:
    """`workers` forked processes that crop and run the chain for a CPU loader's array source (module docstring).

    images: the loader's (N, H, W, 3) uint8 tensor; chains: both views' ChainSpec; channels: 1 for gray input (one
    plane resized), else 3."""

    def __init__(self, images: torch.Tensor, workers: int, batch_size: int, size: int, channels: int,
                 chains: tuple[ChainSpec, ChainSpec]):
        if workers < 1:
            raise FastByolError(f"CPU augmentation workers must be >= 1, got {workers}")
        self.batch_size = batch_size
        # two slots of both views' buffers: the workers fill one batch while the parent copies out the other
        self.outs = tuple(tuple(_shared((batch_size, size, size, 3)) for _ in (0, 1)) for _ in range(SLOTS))
        work = Work(images, self.outs, size, channels, chains, workers)
        ctx = multiprocessing.get_context("fork")
        self.conns, self.procs = [], []
        for k in range(workers):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_serve, args=(child, k, work, os.getpid(), list(self.conns)),
                               daemon=True, name=f"fastbyol-augment-{k}")
            proc.start()
            child.close()
            self.conns.append(parent)
            self.procs.append(proc)
        self._sent = self._done = 0  # batches submitted; batches whose answers were all read
        self._seen = [0] * workers  # per worker, the number of the last answer read
        self._finalizer = weakref.finalize(self, _stop, self.conns, self.procs)

    def submit(self, slot: int, index: torch.Tensor, windows: list[torch.Tensor], params: list[torch.Tensor]) -> None:
        """Start a batch in buffer slot `slot` (0 or 1; the other may be in flight): index (B,) rows of the images,
        windows (B, 5) and params (B, N_PARAMS) per view. Its views come from collect(slot), in submission order."""
        if not self._finalizer.alive:
            raise FastByolError("the CPU augmentation workers were closed")
        index = index.numpy()
        w = [np.asarray(x.numpy()) for x in windows]
        p = [np.asarray(x.numpy()) for x in params]
        seq = self._sent + 1
        msg = (seq, slot, index, w[0], w[1], p[0], p[1])
        for k, (conn, proc) in enumerate(zip(self.conns, self.procs)):
            try:
                conn.send(msg)
            except OSError:  # its end of the pipe is closed: it died
                self.close()
                raise FastByolError(f"CPU augmentation failed: {_died(proc)}") from None
            except BaseException:
                if k:  # a batch sent to some workers only: they cannot be brought back in step
                    self.close()
                raise
        self._sent = seq

    def collect(self, slot: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Both views (B, 3, S, S) float32 channels_last, fresh tensors, of the oldest batch submitted (in `slot`)."""
        self._wait()
        # NHWC copies (channels_last views): the batch owns its memory, the slot is reused two batches later
        return tuple(out.clone().permute(0, 3, 1, 2) for out in self.outs[slot])

    @property
    def in_flight(self) -> int:
        """Batches submitted and not collected (or drained)."""
        return self._sent - self._done

    def drain(self) -> None:
        """Wait for every batch submitted and not collected, and drop them (the workers are then idle)."""
        while self.in_flight > 0:
            self._wait()

    def _wait(self) -> None:
        """Every worker's answer for the oldest batch in flight; raises the first error (and closes the workers).
        Answers carry their batch's number and each pipe's last one is remembered, so a wait cut short (Ctrl-C
        between two pipes) leaves nothing out of step: the next wait reads on from where each pipe stopped."""
        if not self._finalizer.alive:
            raise FastByolError("the CPU augmentation workers were closed")
        target = self._done + 1
        errors = []
        for k, (conn, proc) in enumerate(zip(self.conns, self.procs)):
            while self._seen[k] < target:
                try:
                    seq, err = conn.recv()
                except (EOFError, OSError):
                    self._seen[k] = target
                    errors.append(_died(proc))
                    break
                self._seen[k] = seq
                if err is not None:
                    errors.append(err)
        self._done = target
        if errors:
            self.close()
            raise FastByolError(f"CPU augmentation failed: {errors[0]}")

    def __call__(self, index: torch.Tensor, windows: list[torch.Tensor], params: list[torch.Tensor]) -> tuple:
        """submit + collect: one batch's views, synchronously."""
        self.submit(0, index, windows, params)
        return self.collect(0)

    def close(self) -> None:
        self._done = self._sent
        self._finalizer()
