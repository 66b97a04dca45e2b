"""The foreach LARS step equals the reference per-parameter step (float64), in every corner the reference has."""

import pytest
import torch

from fastbyol.models import BYOL, build_encoder
from fastbyol.optim import LARS, lars_foreach_
from fastbyol.reference import lars_excluded, lars_update_


def _tensors(dtype=torch.float64):
    gen = torch.Generator().manual_seed(7)
    shapes = [(8, 3, 3, 3), (16, 8, 1, 1), (32, 16), (16,), (5,), (7, 11), (4, 4)]
    params = [torch.randn(s, generator=gen, dtype=dtype) for s in shapes]
    params[0] = params[0].contiguous(memory_format=torch.channels_last)
    params[5].zero_()  # |w| = 0: trust 1
    grads = [torch.randn(s, generator=gen, dtype=dtype) for s in shapes]
    grads[0] = grads[0].contiguous(memory_format=torch.channels_last)
    grads[6].zero_()  # |u| = weight decay * |w| only
    return params, grads


@pytest.mark.parametrize("weight_decay", [0.0, 1e-2])
@pytest.mark.parametrize("tensor_lr", [False, True])
def test_foreach_equals_reference(weight_decay, tensor_lr):
    params_ref, grads = _tensors()
    params_new = [p.clone() for p in params_ref]
    bufs_ref = [torch.zeros_like(p) for p in params_ref]
    bufs_new = [torch.zeros_like(p) for p in params_ref]
    excluded = [lars_excluded(p) for p in params_ref]
    grads_before = [g.clone() for g in grads]
    for step in range(3):
        lr = 0.3 + 0.1 * step
        lars_update_(params_ref, grads, bufs_ref, lr=lr, weight_decay=weight_decay, momentum=0.9,
                     trust_coefficient=1e-3, excluded=excluded)
        lars_foreach_(params_new, grads, bufs_new, lr=torch.tensor(lr, dtype=torch.float64) if tensor_lr else lr,
                      weight_decay=weight_decay, momentum=0.9, trust_coefficient=1e-3, excluded=excluded)
        for a, b in zip(params_new + bufs_new, params_ref + bufs_ref):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    assert all(torch.equal(g, b) for g, b in zip(grads, grads_before))  # gradients are read, never written
    assert params_new[0].is_contiguous(memory_format=torch.channels_last)
    assert not torch.equal(params_new[0], _tensors()[0][0])  # it moved


def test_lars_optimizer_uses_foreach_and_matches_the_loop():
    torch.manual_seed(0)
    model = BYOL(build_encoder("resnet-tiny", stem="small-s2", image_size=16), 64, 32, 64).double()
    model = model.to(memory_format=torch.channels_last)
    twin = BYOL(build_encoder("resnet-tiny", stem="small-s2", image_size=16), 64, 32, 64).double()
    twin = twin.to(memory_format=torch.channels_last)
    twin.load_state_dict(model.state_dict())
    fast, loop = LARS(model.online_parameters(), lr=0.5), LARS(twin.online_parameters(), lr=0.5, foreach=False)
    x = torch.randn(8, 3, 16, 16, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    for m, opt in ((model, fast), (twin, loop)):
        for _ in range(2):
            p1, p2, z1, z2 = m(x, x.flip(0))
            opt.zero_grad()
            ((p1 - z2) ** 2 + (p2 - z1) ** 2).mean().backward()
            opt.step()
    for a, b in zip(model.online_parameters(), twin.online_parameters()):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_lars_mixed_dtypes_fall_back_to_the_loop():
    w16 = torch.nn.Parameter(torch.randn(4, 4, dtype=torch.float64))
    w32 = torch.nn.Parameter(torch.randn(4, 4))
    ref16, ref32 = w16.detach().clone(), w32.detach().clone()
    opt = LARS([w16, w32], lr=0.1)
    w16.grad, w32.grad = torch.ones_like(w16), torch.ones_like(w32)
    opt.step()
    lars_update_([ref16, ref32], [torch.ones_like(ref16), torch.ones_like(ref32)],
                 [torch.zeros_like(ref16), torch.zeros_like(ref32)], lr=0.1, weight_decay=1e-6)
    torch.testing.assert_close(w16.detach(), ref16)
    torch.testing.assert_close(w32.detach(), ref32)


def test_lars_refuses_a_negative_lr():
    with pytest.raises(ValueError, match="lr must be >= 0"):
        LARS([torch.nn.Parameter(torch.ones(2))], lr=-1.0)
