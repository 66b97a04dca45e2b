"""Cross-replica, per-view BN (`fastbyol.system.batchnorm.GlobalBatchNorm`) on 2 and 4 gloo processes against
single-process nn.BatchNorm over the union batch of each view, in float64 (to 1e-8: inputs with extreme means,
|mean| = 1000 std, where float64 sums keep 10 digits of the variance): outputs, input and parameter gradients,
running statistics; eager at 2 and 4 processes, compiled
(AOTAutograd, fullgraph) at 2; float32 with |mean| = 1000 std; and no graph break in a converted one-pass BYOL model
under torch._dynamo.explain.
"""

import os

import pytest
import torch
import torch.nn as nn

from fastbyol.models import BYOL, build_encoder
from fastbyol.system.batchnorm import (
    GlobalBatchNorm,
    bn_process_group,
    convert_batchnorm,
    has_other_batchnorm,
    set_views,
)
from fastbyol.system.distributed import close_distributed, init_distributed

from .support import spawn_ranks

LOCAL, STEPS, VIEWS = 3, 3, 2  # rows of each view per rank (prime), steps, views
OFFSETS = (1000.0, -25.0, 7.0)  # per input channel: |mean| >> std (std 1)


def _net() -> nn.Module:
    """4-D BN (momentum 0.1) and 1-D BN (momentum None: the cumulative average), affine weights not 1 and 0."""
    torch.manual_seed(3)
    net = nn.Sequential(nn.Conv2d(3, 6, 1, bias=True), nn.BatchNorm2d(6), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                        nn.Flatten(), nn.Linear(6, 5), nn.BatchNorm1d(5, momentum=None))
    with torch.no_grad():
        net[0].bias.fill_(300.0)  # the conv's output keeps a large mean: the BN inputs are extreme too
        for bn in (net[1], net[6]):
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
    return net.double().to(memory_format=torch.channels_last)


def _data(world: int) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    """Per step, per view: (input (world * LOCAL, 3, 5, 5), output weights (world * LOCAL, 5)), the global batch."""
    gen = torch.Generator().manual_seed(11)
    offset = torch.tensor(OFFSETS, dtype=torch.float64).view(1, 3, 1, 1)
    n = world * LOCAL
    return [[((torch.randn(n, 3, 5, 5, generator=gen, dtype=torch.float64) + offset + 3.0 * v)
              .contiguous(memory_format=torch.channels_last), torch.randn(n, 5, generator=gen, dtype=torch.float64))
             for v in range(VIEWS)] for _ in range(STEPS)]


def _run(net: nn.Module, rows: slice, world: int, forward=None, per_view: bool = False) -> dict:
    """STEPS forward + backward passes; loss: sum of out * w over the rows, so the global loss is the sum over ranks.
    per_view: one pass per view (the single-process reference), else both views stacked in one pass."""
    outs, x_grads = [], []
    forward = forward or net
    for step in _data(world):
        xs = [x[rows].clone().requires_grad_(True) for x, _ in step]
        net.zero_grad(set_to_none=True)
        if per_view:
            out = torch.cat([forward(x) for x in xs])
        else:
            set_views([m for m in net.modules() if isinstance(m, GlobalBatchNorm)], VIEWS)
            out = forward(torch.cat(xs))
        (out * torch.cat([w[rows] for _, w in step])).sum().backward()
        outs.append(out.detach())
        x_grads.append(torch.cat([x.grad for x in xs]))
    return {"outs": outs, "x_grads": x_grads, "grads": {n: p.grad.clone() for n, p in net.named_parameters()},
            "buffers": {n: b.clone() for n, b in net.named_buffers()}}


def _worker(rank: int, world: int, port: int, out_path: str, compiled: bool) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    init_distributed("cpu")
    import torch.distributed as dist

    rows = slice(rank * LOCAL, (rank + 1) * LOCAL)
    got = {"eager": _run(convert_batchnorm(_net(), "cpu"), rows, world)}
    if compiled:  # AOTAutograd: the functional collective and its backward traced into the graphs
        torch._dynamo.reset()
        net = convert_batchnorm(_net(), "cpu")
        got["compiled"] = _run(net, rows, world, torch.compile(net, backend="aot_eager", fullgraph=True))
    for run in got.values():  # parameter gradients summed over the ranks: the gradient of the global loss
        for g in run["grads"].values():
            dist.all_reduce(g)
    # float32, |mean| = 1000 std, both views in one pass
    bn = convert_batchnorm(nn.BatchNorm2d(3), "cpu")
    set_views([bn], VIEWS)
    gen = torch.Generator().manual_seed(5)
    x32 = torch.randn(VIEWS, world * LOCAL, 3, 4, 4, generator=gen) + 1000.0
    got["fp32"] = {"x": x32, "out": bn(x32[:, rows].flatten(0, 1)).detach(), "running_var": bn.running_var.clone()}
    if compiled:  # the trainer's model, converted: one graph, no break (BN in the encoder, projector and predictor)
        torch._dynamo.reset()
        torch.manual_seed(0)
        byol = convert_batchnorm(BYOL(build_encoder("resnet-tiny", stem="small-s2", image_size=16), 64, 32, 64),
                                 "cpu")
        explained = torch._dynamo.explain(byol)(torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16))
        got["explain"] = {"graphs": explained.graph_count, "breaks": explained.graph_break_count,
                          "reasons": [str(r.reason)[:200] for r in explained.break_reasons],
                          "bn_layers": sum(isinstance(m, GlobalBatchNorm) and m.group_name is not None
                                           for m in byol.modules())}
    torch.save(got, f"{out_path}.{rank}")
    dist.barrier()
    close_distributed()


def _close(actual, expected, what, rtol=1e-8, atol=1e-8):
    """float64: the sums' cancellation costs (|mean| / std)^2 x 1e-16 of the variance, 1e-10 at 1000 std, which the
    gradient of the layer before (times inputs of 1000 std) carries up to ~1e-9; 1e-13 at a mean of 1 std."""
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
def test_per_view_bn_over_ranks_equals_one_process_bn_of_each_view(tmp_path, world):
    out = tmp_path / "bn"
    compiled = world == 2
    ranks = spawn_ranks(_worker, world, out, compiled)
    ref = _run(_net(), slice(None), world, per_view=True)  # nn.BatchNorm, one process, one pass per view
    n = world * LOCAL

    def by_view(t):  # a rank's (VIEWS * LOCAL, ...) rows -> (VIEWS, LOCAL, ...)
        return t.view(VIEWS, LOCAL, *t.shape[1:])

    for run in ("eager", "compiled") if compiled else ("eager",):
        for step in range(STEPS):
            for what in ("outs", "x_grads"):
                got = torch.cat([by_view(r[run][what][step]) for r in ranks], dim=1)  # (VIEWS, n, ...)
                _close(got, ref[what][step].view(VIEWS, n, *ref[what][step].shape[1:]), f"{run} {what} {step}")
        for rank in ranks:
            for name, g in ref["grads"].items():
                _close(rank[run]["grads"][name], g, f"{run} gradient of {name}")
            for name, b in ref["buffers"].items():
                _close(rank[run]["buffers"][name], b, f"{run} buffer {name}")
    assert ref["buffers"]["1.num_batches_tracked"] == STEPS * VIEWS  # one update per view
    assert ref["buffers"]["1.running_mean"].abs().max() > 100.0  # the large means reached the statistics
    x32 = ranks[0]["fp32"]["x"].double()
    bn = nn.BatchNorm2d(3).double()
    ref32 = torch.stack([bn(x32[v]) for v in range(VIEWS)])  # (VIEWS, n, 3, 4, 4)
    got32 = torch.cat([by_view(r["fp32"]["out"]) for r in ranks], dim=1).double()
    torch.testing.assert_close(got32, ref32, rtol=0, atol=2e-4)
    for r in ranks:
        torch.testing.assert_close(r["fp32"]["running_var"].double(), bn.running_var, rtol=1e-4, atol=0)
    if compiled:
        for rank in ranks:
            e = rank["explain"]
            assert e["bn_layers"] > 10
            assert e["breaks"] == 0 and e["graphs"] == 1, e


def _groups_worker(rank: int, world: int, port: int, out_path: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    init_distributed("cpu")
    import torch.distributed as dist

    bn = convert_batchnorm(nn.BatchNorm1d(4), "cpu", group_size=2)  # ranks {0, 1} and {2, 3}
    x = torch.randn(6, 4, generator=torch.Generator().manual_seed(rank)) + 10 * rank
    got = {"out": bn(x).detach(), "group_size": bn.group_size, "same_group": bn_process_group("cpu", 2) is not None}
    try:
        bn_process_group("cpu", 3)
    except ValueError as e:
        got["error"] = str(e)
    torch.save(got, f"{out_path}.{rank}")
    dist.barrier()
    close_distributed()


@pytest.mark.slow
def test_a_bn_group_of_two_ranks_takes_the_statistics_of_its_own_block(tmp_path):
    out = tmp_path / "groups"
    ranks = spawn_ranks(_groups_worker, 4, out)
    xs = [torch.randn(6, 4, generator=torch.Generator().manual_seed(r)) + 10 * r for r in range(4)]
    for block in ((0, 1), (2, 3)):
        ref = nn.BatchNorm1d(4)(torch.cat([xs[r] for r in block])).detach()
        torch.testing.assert_close(torch.cat([ranks[r]["out"] for r in block]), ref, rtol=1e-5, atol=1e-5)
    assert all(r["group_size"] == 2 for r in ranks)
    assert all("does not divide the 4 processes" in r["error"] for r in ranks)


def test_without_a_process_group_each_view_is_plain_bn_in_order():
    net, twin = _net(), convert_batchnorm(_net())
    assert isinstance(twin[1], GlobalBatchNorm) and twin[1].group_name is None
    x1, x2 = (x for x, _ in _data(1)[0])
    set_views([twin[1], twin[6]], 2)
    torch.testing.assert_close(twin(torch.cat([x1, x2])), torch.cat([net(x1), net(x2)]), rtol=0, atol=0)
    for (name, a), (_, b) in zip(twin.named_buffers(), net.named_buffers()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    twin.eval(), net.eval()  # evaluation: the running statistics, whatever `views` says
    torch.testing.assert_close(twin(x1), net(x1), rtol=0, atol=0)


def test_convert_keeps_subclasses_and_says_so():
    class BatchNormAct(nn.BatchNorm2d):  # timm's BatchNormAct2d does more than BN in its forward
        def forward(self, x):
            return super().forward(x).relu()

    net = convert_batchnorm(nn.Sequential(nn.BatchNorm2d(3), BatchNormAct(3)))
    assert type(net[0]) is GlobalBatchNorm and type(net[1]) is BatchNormAct
    assert has_other_batchnorm(net) and not has_other_batchnorm(nn.Sequential(net[0], nn.LayerNorm(3)))


def test_global_bn_refuses_3d_input_and_a_batch_that_does_not_split():
    bn = GlobalBatchNorm(4)
    bn.group_name = "unused"
    with pytest.raises(ValueError, match="2-D or 4-D"):
        bn(torch.randn(2, 4, 3))
    bn.group_name, bn.views = None, 2
    with pytest.raises(ValueError, match="does not split into 2 views"):
        bn(torch.randn(5, 4))
