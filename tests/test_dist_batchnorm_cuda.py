"""CUDA-only checks of the per-view, cross-replica BN (`fastbyol.system.batchnorm.GlobalBatchNorm`) and of BYOL's
one-pass step on the GPU, skipped without one (the GPU plan's call 1 runs them first among its tests).

One process in a one-rank NCCL group exercises the path a multi-GPU run takes (the functional all-reduce on a BN
communicator of its own, Inductor's CUDA code for it): equal to nn.BatchNorm of each view in float64 (outputs, input
gradients, running statistics); compiled (Inductor, fullgraph) equal to eager in float32 and under bf16 autocast; the
one-pass BYOL forward equal to one pass per view in float64 on the GPU; the trainer's networks (DDP around the online
network, compiled per network) with no graph break, no recompile after the first step, no host sync in a steady
step, and every gradient a view of DDP's buckets with its parameter's strides (the 1x1 weights included).
tests/test_dist_batchnorm.py and tests/test_byol_one_pass.py check 2 and 4 ranks on gloo.
"""

import copy
import socket
import warnings
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
from fastbyol.kernels import byol_loss_symmetric

from fastbyol.models import BYOL, build_encoder
from fastbyol.models.networks import compile_networks
from fastbyol.system.batchnorm import GlobalBatchNorm, bn_process_group, convert_batchnorm, set_views
from fastbyol.system.data_parallel import wrap_online

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


def _steps(net, forward, dtype, steps=3, autocast=False, views=2):
    """Per step: `views` views of 16 images each, stacked (view 1's rows first); outputs, input gradients, buffers."""
    gen = torch.Generator(device="cuda").manual_seed(11)
    set_views([m for m in net.modules() if isinstance(m, GlobalBatchNorm)], views)
    outs, grads = [], []
    for _ in range(steps):
        x = (torch.randn(16 * views, 3, 12, 12, device="cuda", dtype=dtype, generator=gen) * 2 + 5).contiguous(
            memory_format=torch.channels_last).requires_grad_(True)
        w = torch.randn(16 * views, 8, device="cuda", dtype=dtype, generator=gen)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            out = forward(x)
        (out.to(dtype) * w).sum().backward()
        outs.append(out.detach().to(dtype))
        grads.append(x.grad)
    return outs, grads, {n: b.clone() for n, b in net.named_buffers()}


def test_global_bn_on_its_own_nccl_group_equals_batchnorm_of_each_view_in_float64(nccl_group):
    ref_net, net = _net(torch.float64), convert_batchnorm(_net(torch.float64), "cuda")
    group = bn_process_group("cuda")
    assert net[1].group_name == group.group_name != dist.group.WORLD.group_name  # not DDP's communicator
    got = _steps(net, net, torch.float64)
    gen = torch.Generator(device="cuda").manual_seed(11)
    ref_outs, ref_grads = [], []
    for _ in range(3):  # the reference: nn.BatchNorm, one call per view, in order
        x = (torch.randn(32, 3, 12, 12, device="cuda", dtype=torch.float64, generator=gen) * 2 + 5).contiguous(
            memory_format=torch.channels_last).requires_grad_(True)
        w = torch.randn(32, 8, device="cuda", dtype=torch.float64, generator=gen)
        out = torch.cat([ref_net(part) for part in x.chunk(2)])
        (out * w).sum().backward()
        ref_outs.append(out.detach())
        ref_grads.append(x.grad)
    for a, b in zip(got[0] + got[1], ref_outs + ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)
    for name, b in ref_net.named_buffers():
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


def test_one_pass_equals_one_pass_per_view_on_the_gpu_in_float64():
    torch.manual_seed(0)
    model = BYOL(build_encoder("resnet-tiny", stem="small-s2", image_size=16), 64, 32, 64)
    model = model.to(device="cuda", dtype=torch.float64, memory_format=torch.channels_last)
    ref = copy.deepcopy(model)
    v1, v2 = (torch.randn(6, 3, 16, 16, device="cuda", dtype=torch.float64).contiguous(
        memory_format=torch.channels_last) for _ in range(2))
    got, want = model(v1, v2), ref.forward_per_view(v1, v2)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    byol_loss_symmetric(*got[:4]).backward()
    byol_loss_symmetric(*want[:4]).backward()
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-9, atol=1e-11, msg=name)
    for (name, b), c in zip(model.named_buffers(), ref.buffers()):
        torch.testing.assert_close(b, c, rtol=1e-10, atol=1e-12, msg=name)


def test_the_trainers_networks_compile_once_without_host_syncs_into_ddps_buckets(nccl_group):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = BYOL(build_encoder("resnet18", stem="small", image_size=16), 64, 32, 64).cuda()
    model = model.to(memory_format=torch.channels_last)
    settings = SimpleNamespace(bn_group=0, grad_reduce="fp32", bucket_mb=1.0)
    v1, v2 = (torch.randn(8, 3, 16, 16, device="cuda", dtype=torch.float16).contiguous(
        memory_format=torch.channels_last) for _ in range(2))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        net = compile_networks(model, "default", online=wrap_online(model, torch.device("cuda", 0), settings))
        counters.clear()
        for step in range(3):
            if step == 2:
                torch.cuda.synchronize()
                graphs = counters["stats"]["unique_graphs"]
                torch.cuda.set_sync_debug_mode("error")  # any host sync in the forward or backward raises
            try:
                model.zero_grad(set_to_none=False)  # as byol_step under DDP: its buckets' views, zeroed in place
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    out = net(v1, v2)
                    loss = byol_loss_symmetric(*out[:4])
                loss.backward()
            finally:
                torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert counters["stats"]["unique_graphs"] == graphs and not counters["graph_break"], dict(counters["stats"])
    assert out[4].shape == (8, model.feature_dim) and not out[4].requires_grad  # the probe's features
    pointwise = [p for p in model.online_parameters() if p.ndim == 4 and p.shape[2:] == (1, 1)]  # either strides
    assert pointwise and all(p.grad._base is not None and p.grad.stride() == p.stride() for p in pointwise)
    assert all(p.grad._base is not None for p in model.online_parameters())  # views of DDP's buckets
    assert not [w for w in caught if "stride" in str(w.message).lower()], [str(w.message) for w in caught]
