"""CUDA-only checks of cross-replica BN (`fastbyol.system.batchnorm.GlobalBatchNorm`) on NCCL, skipped without a GPU.

One process in a one-rank NCCL group exercises the path a multi-GPU run takes (the functional all-reduce on NCCL,
Inductor's CUDA code for it): equal to nn.BatchNorm in float64 (outputs, input gradients, running statistics);
no graph break in a converted BYOL model; compiled (Inductor, fullgraph) equal to eager in float32 and under bf16
autocast; no host sync in the steady-state forward and backward. tests/test_dist_batchnorm.py checks two ranks on gloo.
"""

import socket

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn

from fastbyol.system.batchnorm import GlobalBatchNorm, convert_batchnorm
from fastbyol.models import BYOL, build_encoder

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.fixture(scope="module")
def nccl_group():
    if dist.is_initialized():
        pytest.skip("a process group already exists in this process")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _net(dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(3)
    net = nn.Sequential(nn.Conv2d(3, 16, 3, bias=False), nn.BatchNorm2d(16), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                        nn.Flatten(), nn.Linear(16, 8), nn.BatchNorm1d(8))
    with torch.no_grad():
        for bn in (net[1], net[6]):
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
    return net.to(device="cuda", dtype=dtype, memory_format=torch.channels_last)


def _steps(net, forward, dtype, steps=3, autocast=False):
    gen = torch.Generator(device="cuda").manual_seed(11)
    outs, grads = [], []
    for _ in range(steps):
        x = (torch.randn(32, 3, 12, 12, device="cuda", dtype=dtype, generator=gen) * 2 + 5).contiguous(
            memory_format=torch.channels_last).requires_grad_(True)
        w = torch.randn(32, 8, device="cuda", dtype=dtype, generator=gen)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            out = forward(x)
        (out.to(dtype) * w).sum().backward()
        outs.append(out.detach().to(dtype))
        grads.append(x.grad)
    return outs, grads, {n: b.clone() for n, b in net.named_buffers()}


def test_global_bn_on_nccl_equals_batchnorm_in_float64(nccl_group):
    ref_net, net = _net(torch.float64), convert_batchnorm(_net(torch.float64), "cuda")
    assert isinstance(net[1], GlobalBatchNorm) and net[1].group_name is not None
    ref, got = _steps(ref_net, ref_net, torch.float64), _steps(net, net, torch.float64)
    for a, b in zip(got[0] + got[1], ref[0] + ref[1]):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)
    for name, b in ref[2].items():
        torch.testing.assert_close(got[2][name], b, rtol=1e-9, atol=1e-10, msg=name)


@pytest.mark.parametrize("autocast", [False, True])
def test_compiled_global_bn_on_nccl_equals_eager(nccl_group, autocast):
    torch._dynamo.reset()
    eager_net, net = convert_batchnorm(_net(torch.float32), "cuda"), convert_batchnorm(_net(torch.float32), "cuda")
    eager = _steps(eager_net, eager_net, torch.float32, autocast=autocast)
    compiled = _steps(net, torch.compile(net, fullgraph=True), torch.float32, autocast=autocast)
    tol = dict(rtol=2e-2, atol=2e-2) if autocast else dict(rtol=1e-4, atol=1e-5)
    for a, b in zip(compiled[0] + compiled[1], eager[0] + eager[1]):
        torch.testing.assert_close(a, b, **tol)
    for name, b in eager[2].items():
        torch.testing.assert_close(compiled[2][name], b, **tol, msg=name)


def test_converted_byol_has_no_graph_break_and_no_host_sync(nccl_group):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = BYOL(build_encoder("resnet-tiny", stem="small-s2", image_size=16), 64, 32, 64).cuda()
    model = convert_batchnorm(model.to(memory_format=torch.channels_last), "cuda")
    v1, v2 = (torch.randn(8, 3, 16, 16, device="cuda").contiguous(memory_format=torch.channels_last)
              for _ in range(2))
    explained = torch._dynamo.explain(model)(v1, v2)
    assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons
    for mode in ("warm-up", "checked"):
        if mode == "checked":
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")  # any host sync in the forward or backward raises
        try:
            p1, p2, z1, z2 = model(v1, v2)
            (p1.float().square().sum() + p2.float().square().sum()).backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
