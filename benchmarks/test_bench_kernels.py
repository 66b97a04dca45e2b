"""pytest-benchmark suite for the two ops (make bench). GPU sizes on CUDA; small sizes on CPU, where `fastbyol`
means the Triton kernel under the interpreter (FASTBYOL_KERNELS=triton) and `reference` the plain-PyTorch path.

    make bench      # saves pytest-benchmark JSON to benchmarks/results/bench-latest.json
"""

import pytest
import torch

from fastbyol.kernels import _dispatch
from fastbyol.kernels import byol_loss, byol_loss_symmetric, ema_update_
from fastbyol.models import BYOL, build_encoder
from fastbyol.reference import byol_loss_reference, byol_loss_symmetric_reference, ema_update_reference_

from .conftest import DEVICE

ON_GPU = DEVICE.type == "cuda"
DTYPES = [torch.bfloat16, torch.float32] if ON_GPU else [torch.float32]
_compiled = {}


def _loss_fn(variant: str, symmetric: bool):
    ref = byol_loss_symmetric_reference if symmetric else byol_loss_reference
    if variant == "eager":
        return ref
    if variant == "compiled":
        return _compiled.setdefault(symmetric, torch.compile(ref))
    return byol_loss_symmetric if symmetric else byol_loss


@pytest.mark.parametrize("symmetric", [False, True], ids=["single", "symmetric"])
@pytest.mark.parametrize("variant", ["fastbyol", "eager", "compiled"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("B", [256, 4096])
def test_loss_forward_backward(timed, monkeypatch, B, dtype, variant, symmetric):
    if variant == "fastbyol":
        monkeypatch.setattr(_dispatch, "_backend", "triton")  # set_backend's state, put back after the test
    D = 256
    p1, p2, z1, z2 = (torch.randn(B, D, device=DEVICE, dtype=dtype, requires_grad=i < 2) for i in range(4))
    fn = _loss_fn(variant, symmetric)

    def step():
        p1.grad = p2.grad = None
        loss = fn(p1, p2, z1, z2) if symmetric else fn(p1, z1)
        loss.backward()

    step()  # compile / warm up outside the timing
    timed(step, B=B, D=D, dtype=str(dtype), min_bytes=(2 if symmetric else 1) * 5 * B * D * p1.element_size())


@pytest.fixture(scope="module")
def ema_lists():
    if ON_GPU:  # the real parameter set: ResNet-50 + BYOL heads, ~33M fp32 elements
        model = BYOL(build_encoder("resnet50", image_size=224))
    else:  # CPU: the tiny preset's network, so the interpreter finishes
        model = BYOL(build_encoder("resnet-tiny", stem="small-s2", image_size=28), 1024, 256, 1024)
    target, online = model.to(DEVICE).ema_pairs()
    return target, [o.detach() for o in online]


@pytest.mark.parametrize("variant", ["fastbyol", "per-parameter loop", "foreach_lerp", "flat buffer lerp_"])
def test_ema(timed, monkeypatch, ema_lists, variant):
    target, online = ema_lists
    n = sum(t.numel() for t in target)
    if variant == "fastbyol":
        monkeypatch.setattr(_dispatch, "_backend", "triton")  # set_backend's state, put back after the test
        tau = torch.tensor(0.996, device=DEVICE)
        fn = lambda: ema_update_(target, online, tau)  # noqa: E731
    elif variant == "per-parameter loop":
        fn = lambda: ema_update_reference_(target, online, 0.996)  # noqa: E731
    elif variant == "foreach_lerp":
        fn = lambda: torch._foreach_lerp_(target, online, 0.004)  # noqa: E731
    else:
        flat_t = torch.cat([t.flatten() for t in target])
        flat_o = torch.cat([o.flatten() for o in online])
        fn = lambda: flat_t.lerp_(flat_o, 0.004)  # noqa: E731
    with torch.no_grad():
        fn()
        timed(fn, tensors=len(target), elements=n, bytes=3 * n * 4)  # GB/s = bytes / median time


@pytest.mark.parametrize("variant", ["foreach", "per-parameter loop"])
def test_lars_step(timed, ema_lists, variant):
    """One LARS step over the online parameters of the same network: foreach ops against the reference loop."""
    from fastbyol.optim import LARS

    _, online = ema_lists
    params = [torch.nn.Parameter(o.clone()) for o in online]
    for p in params:
        p.grad = torch.randn_like(p)
    opt = LARS(params, lr=0.1, weight_decay=1e-6, foreach=variant == "foreach")
    opt.step()  # momentum buffers allocated outside the timing
    timed(opt.step, tensors=len(params), elements=sum(p.numel() for p in params))
