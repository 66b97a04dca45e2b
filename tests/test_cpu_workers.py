"""The CPU loader's worker processes (fastbyol.augment.cpu_workers): the same views as the thread path, exact resume
while a batch is computed ahead, and clear errors and clean exits."""

import os
import signal

import numpy as np
import pytest
import torch

pytest.importorskip("nvidia.dali")

from fastbyol.augment import IMAGENET_MEAN, IMAGENET_STD, VIEW2, sample_params  # noqa: E402
from fastbyol.errors import FastByolError  # noqa: E402
from fastbyol.augment.photometric import TAP_TAIL, ChainSpec, photometric  # noqa: E402

from .support import PassThroughPipeline  # noqa: E402


def _images(n=48, size=24, gray=False, seed=1):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (n, size, size, 1 if gray else 3), dtype=np.uint8)
    return np.ascontiguousarray(np.broadcast_to(x, (n, size, size, 3)))


def _batches(loader, n):
    out = []
    while len(out) < n:
        for batch in loader.epoch():
            out.append(tuple(t.clone() for t in batch))
            if len(out) == n:
                break
    return out


@pytest.mark.parametrize("gray", [False, True], ids=["colour", "gray"])
def test_processes_give_the_thread_paths_views(make_loader, gray):
    """Over more than one epoch (48 images, batch 16: 3 an epoch): the same batches, bit for bit (the workers run
    the thread path's chunks of the whole batch), so training does not depend on the choice."""
    images = _images(gray=gray)
    kw = dict(batch_size=16, image_size=20, seed=3, num_threads=2, gray_input=gray)
    threads = _batches(make_loader(images, cpu_parallel="threads", **kw), 7)
    procs = make_loader(images, cpu_parallel="processes", **kw)
    assert procs.cpu_parallel == "processes" and len(procs.maker.workers.procs) == 2
    got = _batches(procs, 7)
    for (t1, t2), (p1, p2) in zip(threads, got):
        assert p1.is_contiguous(memory_format=torch.channels_last) and p1.dtype == torch.float32
        assert torch.equal(p1, t1) and torch.equal(p2, t2)
    assert not torch.equal(got[0][0], got[1][0])


def test_state_taken_while_a_batch_is_computed_ahead_resumes_exactly(make_loader):
    """state() read inside the loop (the workers already hold the next batch) and after an early stop (the batch
    drawn ahead is given back): a loader built from either yields what the first one yields next."""
    kw = dict(batch_size=16, image_size=16, seed=9, num_threads=2)
    a = make_loader(_images(64), **kw)
    it = a.epoch()
    next(it)
    mid = a.state()  # one batch yielded, the second with the workers
    rest = [tuple(t.clone() for t in b) for b in it]  # batches 2..4 of the epoch
    after = _batches(a, 2)  # the next epoch's first two
    b = make_loader(_images(64), checkpoint=mid, **kw)
    resumed = _batches(b, 5)
    for want, got in zip(rest + after, resumed):
        assert all(torch.equal(w, g) for w, g in zip(want, got))

    c = make_loader(_images(64), **kw)
    for k, _ in enumerate(c.epoch()):
        if k == 1:
            break  # stopped with batch 3 drawn ahead: the loader goes back to just after batch 2
    again = _batches(c, 3)
    for want, got in zip(rest[1:] + after, again):
        assert all(torch.equal(w, g) for w, g in zip(want, got))


@pytest.mark.parametrize("where", ["run", "collect", "submit"])
def test_an_interrupt_inside_the_iterator_loses_no_batch(make_loader, monkeypatch, where):
    """Ctrl-C (or any error) while DALI draws, while the parent waits for the workers, or while it sends them a
    batch: the batches not yet yielded are given back, so the loader goes on, and state() resumes, exactly where the
    consumer stopped."""
    kw = dict(seed=9, num_threads=2)
    want = _batches(make_loader(_images(64), cpu_parallel="threads", **kw), 7)
    calls = [0]

    def third_call_interrupted(real):
        def flaky(*args):
            calls[0] += 1
            if calls[0] == 3:
                raise KeyboardInterrupt
            return real(*args)
        return flaky

    class Interrupted(PassThroughPipeline):  # DALI's run(), every pipeline the loader builds counted together
        def run(self, stream=None):
            return third_call_interrupted(super().run)(stream)

    a = make_loader(_images(64), make_pipeline=Interrupted if where == "run" else PassThroughPipeline, **kw)
    if where != "run":  # the worker processes' side: the parent hands a batch over, or waits for it
        monkeypatch.setattr(a.maker.workers, where, third_call_interrupted(getattr(a.maker.workers, where)))
    got = []
    with pytest.raises(KeyboardInterrupt):
        for b in a.epoch():
            got.append(tuple(t.clone() for t in b))
    assert 1 <= len(got) <= 2 and a.maker.workers.in_flight == 0
    resumed = _batches(make_loader(_images(64), checkpoint=a.state(), **kw), 7 - len(got))
    got += _batches(a, 7 - len(got))
    for w, g, r in zip(want, got, [None] * (7 - len(resumed)) + resumed):
        assert all(torch.equal(x, y) for x, y in zip(w, g))
        assert r is None or all(torch.equal(x, y) for x, y in zip(w, r))


def test_a_later_epoch_call_takes_over_from_a_suspended_iterator(make_loader):
    """An iterator left suspended (its next batch already with the workers) and a new epoch() on the same loader:
    the new one starts at the batch the old one would have yielded next; the old one then refuses to go on."""
    kw = dict(batch_size=16, image_size=16, seed=4, num_threads=2)
    want = _batches(make_loader(_images(64), **kw), 4)
    a = make_loader(_images(64), **kw)
    old = a.epoch()
    first = next(old)
    assert all(torch.equal(w, g) for w, g in zip(want[0], first))
    for w, g in zip(want[1:], _batches(a, 3)):
        assert all(torch.equal(x, y) for x, y in zip(w, g))
    with pytest.raises(FastByolError, match="ended by a later epoch"):
        next(old)
    assert a.maker.workers.in_flight == 0


def test_a_dead_worker_is_one_clear_error_and_close_ends_them(make_loader):
    loader = make_loader(_images(), num_threads=2)
    procs = loader.maker.workers.procs
    os.kill(procs[1].pid, signal.SIGKILL)
    procs[1].join(timeout=10)
    with pytest.raises(FastByolError, match=r"fastbyol-augment-1 .*died, exit code -9"):
        _batches(loader, 2)
    assert not any(p.is_alive() for p in procs)  # the failure closed the others too
    with pytest.raises(FastByolError, match="closed"):
        _batches(loader, 1)


def test_workers_exit_with_their_loader(make_loader):
    loader = make_loader(_images(), num_threads=2)
    _batches(loader, 1)
    procs = list(loader.maker.workers.procs)
    assert all(p.is_alive() for p in procs)
    del loader
    import gc

    gc.collect()
    for p in procs:
        p.join(timeout=10)
    assert not any(p.is_alive() for p in procs)


def test_workers_exit_when_their_parent_is_killed(tmp_path):
    """A SIGKILLed trainer leaves no worker behind (nor a pipe held open: a caller reading its output would hang).
    Two loaders: the second's workers inherit the first's pipe ends, so the first's see no EOF and must notice the
    parent's death by themselves."""
    import subprocess
    import sys
    import time

    script = (
        "import os, signal, sys, numpy as np\n"
        "from fastbyol.augment import LoaderSettings, TwoViewLoader\n"
        "x = np.zeros((32, 16, 16, 3), np.uint8)\n"
        "loaders = [TwoViewLoader(x, LoaderSettings(8, 16, num_threads=2)) for _ in range(2)]\n"
        "[next(iter(loader.epoch())) for loader in loaders]\n"
        "print(' '.join(str(p.pid) for loader in loaders for p in loader.maker.workers.procs), flush=True)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    pids = [int(p) for p in done.stdout.split()]
    assert len(pids) == 4

    def alive(pid):
        try:
            with open(f"/proc/{pid}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has exited
        except FileNotFoundError:
            return False

    deadline = time.monotonic() + 20
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(alive(p) for p in pids)


def test_a_workers_exception_comes_back_named():
    from fastbyol.augment.cpu_workers import ChainProcesses

    images = torch.from_numpy(_images(8))
    chain = ChainSpec(blur_window=5, solarize_threshold=0.5, mean=IMAGENET_MEAN, std=IMAGENET_STD, blur_tail=TAP_TAIL)
    workers = ChainProcesses(images, 2, 4, 16, 3, (chain, chain))
    g = torch.Generator().manual_seed(0)
    params = [sample_params(VIEW2, 4, g) for _ in (0, 1)]
    good = torch.tensor([[0, 0, 24, 24, 0]] * 4, dtype=torch.int32)
    v1, v2 = workers(torch.arange(4), [good, good], params)
    assert v1.shape == (4, 3, 16, 16)
    bad = torch.tensor([[0, 0, 0, 24, 0]] * 4, dtype=torch.int32)  # an empty window: the resize raises in the worker
    with pytest.raises(FastByolError, match="CPU augmentation failed: .*Error"):
        workers(torch.arange(4), [bad, good], params)
    workers.close()


def test_every_chunk_is_dealt_to_exactly_one_worker():
    from fastbyol.augment.cpu_workers import assign

    tasks = [(v, list(range(a, a + n))) for v, (a, n) in enumerate([(0, 5), (5, 1), (6, 3), (0, 2), (2, 7)])]
    for workers in (1, 2, 3, 7):
        deal = assign(tasks, workers)
        assert sorted(t for share in deal for t in share) == sorted(tasks)
        loads = [sum(len(idx) for _, idx in share) for share in deal]
        assert max(loads) - min(loads) <= max(len(idx) for _, idx in tasks)


def test_photometric_writes_into_a_given_buffer():
    g = torch.Generator().manual_seed(2)
    crops = torch.randint(0, 256, (6, 3, 12, 12), dtype=torch.uint8, generator=g)
    p = sample_params(VIEW2, 6, g)
    chain = ChainSpec(blur_window=5, solarize_threshold=0.5, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    buf = torch.full((6, 12, 12, 3), float("nan"))
    got = photometric(crops, p, chain, out=buf)
    assert got.data_ptr() == buf.data_ptr() and torch.equal(got, photometric(crops, p, chain))
    with pytest.raises(ValueError, match="out must be"):
        photometric(crops, p, chain, out=torch.empty(6, 3, 12, 12))
