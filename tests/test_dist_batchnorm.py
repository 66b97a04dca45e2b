"""Cross-replica BN (`fastbyol.system.batchnorm.GlobalBatchNorm`) with two gloo processes against single-process BN over the
whole batch, in float64: outputs, input and parameter gradients, running statistics; eager and compiled
(AOTAutograd, fullgraph); and no graph break in a converted BYOL model under torch._dynamo.explain.
"""

import os

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn as nn

from fastbyol.system.batchnorm import GlobalBatchNorm, convert_batchnorm
from fastbyol.system.distributed import close_distributed, init_distributed
from fastbyol.models import BYOL, build_encoder

from .support import free_port as _free_port

WORLD, BATCH, STEPS = 2, 8, 3


def _net() -> nn.Module:
    """4-D BN (momentum 0.1) and 1-D BN (momentum None: the cumulative average), affine weights not 1 and 0."""
    torch.manual_seed(3)
    net = nn.Sequential(nn.Conv2d(3, 6, 3, bias=False), nn.BatchNorm2d(6), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                        nn.Flatten(), nn.Linear(6, 5), nn.BatchNorm1d(5, momentum=None))
    with torch.no_grad():
        for bn in (net[1], net[6]):
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
    return net.double().to(memory_format=torch.channels_last)


def _data() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(input, output weights) per step: inputs with a large per-channel offset (mean >> std), so the
    sum-of-squares form meets the cancellation it must survive."""
    gen = torch.Generator().manual_seed(11)
    offset = torch.tensor([40.0, -25.0, 7.0], dtype=torch.float64).view(1, 3, 1, 1)
    return [((torch.randn(BATCH, 3, 6, 6, generator=gen, dtype=torch.float64) + offset)
             .contiguous(memory_format=torch.channels_last),
             torch.randn(BATCH, 5, generator=gen, dtype=torch.float64)) for _ in range(STEPS)]


def _run(net: nn.Module, part: slice, compile_backend: str | None = None) -> dict:
    """STEPS forward + backward passes on this rank's part of each batch (loss: sum of out * w over the part, so the
    global loss is the sum over ranks); returns outputs, input gradients, parameter gradients and BN buffers."""
    outs, x_grads = [], []
    forward = net if compile_backend is None else torch.compile(net, backend=compile_backend, fullgraph=True)
    for x, w in _data():
        x = x[part].clone().requires_grad_(True)
        net.zero_grad(set_to_none=True)
        out = forward(x)
        (out * w[part]).sum().backward()
        outs.append(out.detach())
        x_grads.append(x.grad)
    return {"outs": outs, "x_grads": x_grads, "grads": {n: p.grad.clone() for n, p in net.named_parameters()},
            "buffers": {n: b.clone() for n, b in net.named_buffers()}}


def _worker(rank: int, port: int, out_path: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WORLD))
    torch.set_num_threads(1)
    init_distributed("cpu")
    import torch.distributed as dist

    part = slice(rank * BATCH // WORLD, (rank + 1) * BATCH // WORLD)
    got = {"eager": _run(convert_batchnorm(_net(), "cpu"), part)}
    # the same under torch.compile (AOTAutograd: the functional collective and its backward traced into the graphs;
    # Inductor's code for it is what a GPU run confirms)
    torch._dynamo.reset()
    got["compiled"] = _run(convert_batchnorm(_net(), "cpu"), part, compile_backend="aot_eager")
    # parameter gradients summed over the ranks: the gradient of the global loss
    for run in ("eager", "compiled"):
        for g in got[run]["grads"].values():
            dist.all_reduce(g)
    # float32 with |mean| = 1000 std: one-pass sums of squares would lose the variance (eps * 1e6), var_mean does not
    bn = convert_batchnorm(nn.BatchNorm2d(3), "cpu")
    gen = torch.Generator().manual_seed(5)
    x32 = torch.randn(BATCH, 3, 5, 5, generator=gen) + 1000.0
    got["fp32"] = {"x": x32, "out": bn(x32[part]).detach(), "running_var": bn.running_var.clone()}
    # the trainer's model, converted: one graph, no break (two views, BN in the encoder, projector and predictor)
    torch._dynamo.reset()
    torch.manual_seed(0)
    byol = convert_batchnorm(BYOL(build_encoder("resnet-tiny", stem="small-s2", image_size=16), 64, 32, 64), "cpu")
    v1, v2 = torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16)
    explained = torch._dynamo.explain(byol)(v1, v2)
    got["explain"] = {"graphs": explained.graph_count, "breaks": explained.graph_break_count,
                      "reasons": [str(r.reason)[:200] for r in explained.break_reasons],
                      "bn_layers": sum(isinstance(m, GlobalBatchNorm) for m in byol.modules())}
    torch.save(got, f"{out_path}.{rank}")
    dist.barrier()
    close_distributed()


@pytest.mark.slow
def test_two_process_bn_equals_one_process_bn_over_the_whole_batch(tmp_path):
    out = tmp_path / "bn"
    mp.spawn(_worker, args=(_free_port(), str(out)), nprocs=WORLD, join=True)
    ranks = [torch.load(f"{out}.{r}", weights_only=False) for r in range(WORLD)]
    ref = _run(_net(), slice(None))  # plain nn.BatchNorm, one process, the whole batch

    def close(actual, expected, what):
        torch.testing.assert_close(actual, expected, rtol=1e-9, atol=1e-10, msg=lambda m: f"{what}: {m}")

    for run in ("eager", "compiled"):
        for step in range(STEPS):
            close(torch.cat([r[run]["outs"][step] for r in ranks]), ref["outs"][step], f"{run} output, step {step}")
            close(torch.cat([r[run]["x_grads"][step] for r in ranks]), ref["x_grads"][step],
                  f"{run} input gradient, step {step}")
        for rank in ranks:
            for name, g in ref["grads"].items():
                close(rank[run]["grads"][name], g, f"{run} gradient of {name}")
            for name, b in ref["buffers"].items():
                close(rank[run]["buffers"][name], b, f"{run} buffer {name}")
    x32 = ranks[0]["fp32"]["x"]
    bn = nn.BatchNorm2d(3).double()
    ref32 = bn(x32.double())
    torch.testing.assert_close(torch.cat([r["fp32"]["out"] for r in ranks]).double(), ref32, rtol=0, atol=2e-4)
    for r in ranks:
        torch.testing.assert_close(r["fp32"]["running_var"].double(), bn.running_var, rtol=1e-4, atol=0)
    assert ref["buffers"]["1.num_batches_tracked"] == STEPS
    assert ref["buffers"]["1.running_mean"].abs().max() > 1.0  # the inputs' offset reached the statistics
    for rank in ranks:
        e = rank["explain"]
        assert e["bn_layers"] > 10
        assert e["breaks"] == 0 and e["graphs"] == 1, e


def test_without_a_process_group_it_is_plain_bn():
    net = _net()
    twin = convert_batchnorm(_net(), "cpu")
    assert isinstance(twin[1], GlobalBatchNorm) and twin[1].group_name is None
    x = _data()[0][0]
    torch.testing.assert_close(twin(x), net(x), rtol=0, atol=0)
    twin.eval(), net.eval()
    torch.testing.assert_close(twin(x), net(x), rtol=0, atol=0)


def test_global_bn_refuses_3d_input():
    bn = GlobalBatchNorm(4)
    bn.group_name = "unused"
    with pytest.raises(ValueError, match="2-D or 4-D"):
        bn(torch.randn(2, 4, 3))
