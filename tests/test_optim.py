"""The foreach LARS step equals the reference per-parameter step (float64), in every corner the reference has, and
takes a fixed, small number of kernel launches whatever the number of parameters.

Launches are counted on the CPU, where they do not depend on the device: the profiler's top-level aten ops (each
one kernel on CUDA, views none), with every foreach call checked against the conditions of its fused CUDA path
(one device and dtype, dense tensors, corresponding tensors of equal sizes and strides); a call that misses them
counts one launch per tensor, as CUDA's fallback loop does.
"""

import copy

import pytest
import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode

from fastbyol.models import BYOL, build_encoder
from fastbyol.optim import LARS, LarsHyper, lars_foreach_
from fastbyol.reference import lars_excluded, lars_update_

# aten ops that make views or read metadata: no kernel
NO_KERNEL = {"aten::view", "aten::select", "aten::unbind", "aten::as_strided", "aten::slice", "aten::detach",
             "aten::alias", "aten::expand", "aten::unsqueeze", "aten::squeeze", "aten::t", "aten::empty"}


def _dense(t: torch.Tensor) -> bool:
    """Non-overlapping and dense: the strides, sorted, pack the sizes with no gap (size-1 dimensions aside)."""
    expected = 1
    for stride, size in sorted((st, n) for n, st in zip(t.shape, t.stride()) if n != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _fused_route(lists: list[list[torch.Tensor]]) -> bool:
    """Whether a foreach call with these tensor lists takes CUDA's multi-tensor path (ATen's
    check_fast_path_restrictions: sizes equal; strides equal except along dimensions of size 1)."""
    first = lists[0][0]
    tensors = [t for lst in lists for t in lst]
    if any(t.dtype != first.dtype or t.device != first.device or not _dense(t)
           for t in tensors):
        return False
    for other in lists[1:]:
        for a, b in zip(lists[0], other):
            if a.shape != b.shape or any(n != 1 and sa != sb for n, sa, sb in zip(a.shape, a.stride(), b.stride())):
                return False
    return True


class _ForeachRoutes(TorchDispatchMode):
    """Records (op, tensors in its first list, fused path?) for every top-level foreach call."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name.startswith("_foreach_"):
            lists = [list(a) for a in args if isinstance(a, (list, tuple)) and a and isinstance(a[0], torch.Tensor)]
            self.calls.append((name, len(lists[0]), _fused_route(lists)))
        return func(*args, **(kwargs or {}))


def count_launches(step) -> tuple[int, list[str], list[tuple]]:
    """(CUDA kernel launches of step() by the launch model above, the kernel-launching top-level aten ops, the
    foreach calls with their route). Runs step twice: once profiled, once under the dispatch mode (the profiler
    would record the mode's re-dispatched calls too)."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    top = [e.name for e in prof.events()
           if e.name.startswith("aten::") and not (e.cpu_parent is not None and e.cpu_parent.name.startswith("aten::"))]
    ops = [name for name in top if name not in NO_KERNEL]
    with _ForeachRoutes() as routes:
        step()
    slow = sum(n - 1 for _, n, fused in routes.calls if not fused)  # the fallback: one launch per tensor
    return len(ops) + slow, ops, routes.calls


def _stepping_optimizer(arch: str, weight_decay: float, tensor_lr: bool) -> tuple[LARS, int]:
    torch.manual_seed(0)
    model = BYOL(build_encoder(arch, stem="small-s2", image_size=16), 64, 32, 64).to(memory_format=torch.channels_last)
    params = list(model.online_parameters())
    for p in params:
        p.grad = torch.randn_like(p)
    opt = LARS(params, lr=torch.tensor(0.1) if tensor_lr else 0.1, weight_decay=weight_decay)
    opt.step()  # momentum buffers and the workspace are made in the first step
    return opt, len(params)


@pytest.mark.parametrize("weight_decay", [0.0, 1e-6])
@pytest.mark.parametrize("tensor_lr", [False, True])
def test_lars_step_takes_a_handful_of_fused_launches(weight_decay, tensor_lr):
    opt, _ = _stepping_optimizer("resnet-tiny", weight_decay, tensor_lr)
    launches, ops, calls = count_launches(opt.step)
    assert calls and all(fused for _, _, fused in calls), calls  # every foreach call on the fused path
    # measured (torch 2.13): 14 with weight decay and a float lr (the trainer's case); one fewer without decay,
    # one more for a tensor lr
    assert launches == len(ops) <= 15, ops


def test_lars_launches_do_not_grow_with_the_number_of_parameters():
    (opt_small, n_small), (opt_big, n_big) = (_stepping_optimizer(a, 1e-6, False) for a in ("resnet-tiny", "resnet18"))
    assert n_big > n_small + 20
    small, big = count_launches(opt_small.step), count_launches(opt_big.step)
    assert small[0] == big[0] and small[1] == big[1], (small, big)


def test_launch_model_sees_the_per_tensor_fallback():
    """The counter is not blind: 0-D trust ratios beside N-D tensors (the old form) count one launch per tensor."""
    ws = [torch.randn(4, 3), torch.randn(5, 2, 2), torch.randn(7)]
    trust = torch.rand(3)
    launches, ops, _ = count_launches(lambda: torch._foreach_mul_(ws, list(trust.unbind(0))))
    assert ops == ["aten::_foreach_mul_"] and launches == 3
    launches, _, _ = count_launches(lambda: torch._foreach_mul_(ws, [torch.rand_like(w) for w in ws]))
    assert launches == 1 + 3  # the fused multiply, and the three rand_like


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
                      hyper=LarsHyper(weight_decay, 0.9, 1e-3), excluded=excluded)
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
            p1, p2, z1, z2 = m(x, x.flip(0))[:4]
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


# ------------------------------------------------------------------------ lightly's trust-ratio form ----------
def _lightly_lars_step(params, grads, bufs, lr, weight_decay, momentum, eta, eps, excluded):
    """lightly.utils.lars.LARS.step's arithmetic, written out from its source (float64 oracle): ratio
    eta |w| / (|g| + wd |w| + eps) on the decayed parameters; the excluded ones are lightly's weight_decay=0 group."""
    for w, g, m, skip in zip(params, grads, bufs, excluded):
        d = g.clone()
        w_norm, g_norm = w.norm(), g.norm()
        if not skip and w_norm != 0 and g_norm != 0:
            ratio = eta * w_norm / (g_norm + w_norm * weight_decay + eps)
            d = (d + weight_decay * w) * ratio
        m.mul_(momentum).add_(d)
        w.sub_(lr * m)


@pytest.mark.parametrize("weight_decay", [0.0, 1e-2])
@pytest.mark.parametrize("tensor_lr", [False, True])
def test_lightly_trust_ratio_foreach_equals_its_loop_and_lightlys_arithmetic(weight_decay, tensor_lr):
    from fastbyol.optim import lars_update_lightly_

    params_oracle, grads = _tensors()
    params_loop = [p.clone() for p in params_oracle]
    params_new = [p.clone() for p in params_oracle]
    bufs = [[torch.zeros_like(p) for p in params_oracle] for _ in range(3)]
    excluded = [lars_excluded(p) for p in params_oracle]
    for step in range(3):
        lr = 0.3 + 0.1 * step
        _lightly_lars_step(params_oracle, grads, bufs[0], lr, weight_decay, 0.9, 1e-3, 1e-8, excluded)
        lars_update_lightly_(params_loop, grads, bufs[1], lr=lr, weight_decay=weight_decay, momentum=0.9,
                             trust_coefficient=1e-3, excluded=excluded)
        lars_foreach_(params_new, grads, bufs[2], lr=torch.tensor(lr, dtype=torch.float64) if tensor_lr else lr,
                      hyper=LarsHyper(weight_decay, 0.9, 1e-3, trust_ratio="lightly"), excluded=excluded)
        for i, (a, b, c) in enumerate(zip(params_new, params_loop, params_oracle)):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
            if i not in (5, 6):  # |w| = 0, |g| = 0: lightly leaves the weight decay out there, fastbyol adds it
                torch.testing.assert_close(b, c, rtol=1e-12, atol=1e-14)


def test_the_two_trust_ratios_differ_by_the_weight_decay_term():
    params, grads = _tensors()
    official, lightly = [p.clone() for p in params], [p.clone() for p in params]
    excluded = [lars_excluded(p) for p in params]
    for ps, form in ((official, "official"), (lightly, "lightly")):
        lars_foreach_(ps, grads, [torch.zeros_like(p) for p in ps], lr=1.0,
                      hyper=LarsHyper(weight_decay=0.5, trust_ratio=form), excluded=excluded)
    assert not torch.equal(official[0], lightly[0])  # adapted: the ratios differ
    torch.testing.assert_close(official[3], lightly[3], rtol=0, atol=0)  # excluded (1-D): the same plain step
    for ps, form in ((official, "official"), (lightly, "lightly")):  # without weight decay they are one ratio
        ps[:] = [p.clone() for p in params]
        lars_foreach_(ps, grads, [torch.zeros_like(p) for p in ps], lr=1.0,
                      hyper=LarsHyper(weight_decay=0.0, trust_ratio=form, eps=0.0), excluded=excluded)
    torch.testing.assert_close(official[0], lightly[0], rtol=1e-12, atol=1e-14)


def test_lars_optimizer_lightly_form_foreach_matches_its_loop():
    torch.manual_seed(0)
    ws = [torch.nn.Parameter(torch.randn(6, 5, dtype=torch.float64)), torch.nn.Parameter(torch.randn(5,
                                                                                                     dtype=torch.float64))]
    twins = [torch.nn.Parameter(w.detach().clone()) for w in ws]
    fast = LARS(ws, lr=0.5, weight_decay=1e-2, trust_ratio="lightly")
    loop = LARS(twins, lr=0.5, weight_decay=1e-2, trust_ratio="lightly", foreach=False)
    for _ in range(2):
        for group, opt in ((ws, fast), (twins, loop)):
            opt.zero_grad()
            sum((w ** 3).sum() for w in group).backward()
            opt.step()
    for a, b in zip(ws, twins):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_lars_refuses_an_unknown_trust_ratio():
    with pytest.raises(ValueError, match="trust_ratio must be one of"):
        LARS([torch.nn.Parameter(torch.ones(2, 2))], lr=0.1, trust_ratio="layerwise")


def test_cached_group_lists_follow_late_gradients_and_loaded_state():
    """The per-group lists LARS builds once: a parameter whose gradient appears only at a later step is stepped
    from then on, and a loaded state's momentum buffers replace the cached ones (the same result as a fresh
    optimizer given the same state)."""
    torch.manual_seed(0)
    a, b = torch.nn.Parameter(torch.randn(8, 4)), torch.nn.Parameter(torch.randn(6))
    opt = LARS([a, b], lr=0.1)
    a.grad = torch.randn(8, 4)
    opt.step()
    b_before = b.detach().clone()
    a.grad, b.grad = torch.randn(8, 4), torch.randn(6)
    opt.step()
    assert not torch.equal(b.detach(), b_before)  # b joined when its gradient came
    saved = copy.deepcopy(opt.state_dict())
    for entry in saved["state"].values():  # a state unlike the one the cached lists hold
        entry["momentum_buffer"].mul_(3.0)
    fresh_a, fresh_b = a.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    fresh = LARS([fresh_a, fresh_b], lr=0.1)
    fresh.load_state_dict(copy.deepcopy(saved))  # each its own buffers
    opt.load_state_dict(copy.deepcopy(saved))
    ga, gb = torch.randn(8, 4), torch.randn(6)
    for o, (pa, pb) in ((opt, (a, b)), (fresh, (fresh_a, fresh_b))):
        pa.grad, pb.grad = ga.clone(), gb.clone()
        o.step()
    assert torch.equal(a.detach(), fresh_a.detach()) and torch.equal(b.detach(), fresh_b.detach())
