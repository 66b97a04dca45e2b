"""`DeferredMean` across two processes (gloo, as torchrun runs them on the CPU): each log point's value, read one
log point later, is the all-reduced mean of every rank's loss sum at that point, the same bits as `global_mean`, on
every rank; queuing it (`start`) and the steps between log points make no host sync."""

import os

import pytest
import torch

from fastbyol.system.distributed import DeferredMean, close_distributed, gather_objects, global_mean, init_distributed

from .support import spawn_ranks
from .test_train_host_syncs import SyncCounter

POINTS, STEPS = 5, 3  # log points, steps between them


def _worker(rank, world, port, out_path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    init_distributed("cpu")
    g = torch.Generator().manual_seed(100 + rank)  # each rank its own losses
    loss_sum, mean = torch.zeros(()), DeferredMean(torch.device("cpu"))
    counter = SyncCounter()
    sent, read = [], []  # this rank's loss sum at each point; (point read at, value) of each earlier point
    for point in range(POINTS):
        with counter:  # the steps of the interval
            for _ in range(STEPS):
                loss_sum += torch.rand((), generator=g) * 4.0
        if mean.pending:
            read.append((point, mean.value()))  # the previous point's mean
        sent.append(loss_sum.clone())
        with counter:
            mean.start(loss_sum, world)  # collective
        loss_sum.zero_()  # changed right after start, as the trainer does
    read.append((POINTS, mean.value()))
    every = gather_objects([t.item() for t in sent], world)
    reference = [global_mean(t, world) for t in sent]  # the synchronous collective, for comparison
    torch.save(dict(read=read, sent=every, reference=reference, syncs=counter.syncs), f"{out_path}.{rank}")
    close_distributed()


@pytest.mark.slow
def test_deferred_mean_with_two_processes(tmp_path):
    out = tmp_path / "deferred"
    got = spawn_ranks(_worker, 2, out)
    sums = got[0]["sent"]  # [rank][point], every rank's loss sums
    assert got[1]["sent"] == sums and sums[0] != sums[1]  # the ranks' values differ: a mean to take
    want = [((torch.tensor(a) + torch.tensor(b)) / 2).item() for a, b in zip(*sums)]  # float32, as gloo sums
    for rank in range(2):
        read = got[rank]["read"]
        assert [p for p, _ in read] == list(range(1, POINTS + 1))  # each value read one log point later
        assert [v for _, v in read] == want == got[rank]["reference"]
        assert got[rank]["syncs"] == []
