"""fastbyol.kernels against the plain-PyTorch references of fastbyol.reference.

On a machine without CUDA the Triton kernels run under TRITON_INTERPRET=1 (set in conftest.py) on CPU tensors,
with FASTBYOL_KERNELS=triton; on a GPU the same tests run the compiled kernels on CUDA tensors.
Tolerances: fp32 tight; fp16 and bf16 loose, bf16 looser still because the interpreter truncates fp32 -> bf16
stores instead of rounding.
"""

import pytest
import torch

from fastbyol.kernels import byol_loss, byol_loss_symmetric, ema_update_, kernel_backend
from fastbyol.models import BYOL, build_encoder
from fastbyol.reference import byol_loss_reference, byol_loss_symmetric_reference, ema_update_reference_

pytest.importorskip("triton")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# (dtype, loss atol, gradient tolerance relative to the largest gradient element)
DTYPES = [(torch.float32, 1e-5, 1e-4), (torch.float16, 2e-3, 5e-3), (torch.bfloat16, 2e-2, 3e-2)]


@pytest.fixture(autouse=True)
def _triton_path(select_backend):
    select_backend("triton")


def _reference_f64(p, z):
    pr = p.detach().double().requires_grad_(True)
    loss = byol_loss_reference(pr, z.detach().double())
    loss.backward()
    return loss.detach(), pr.grad


def _assert_grad_close(got, ref, tol):
    # gradient entries are of order 2 / (B sqrt(D)) for unit-variance rows; at D = 1 the exact gradient is 0
    B, D = ref.shape
    scale = max(ref.abs().max().item(), 2.0 / (B * D**0.5))
    err = (got.double() - ref).abs().max().item()
    assert err <= tol * scale, f"gradient error {err:.3g} over {tol} x {scale:.3g}"


@pytest.mark.parametrize("B", [1, 7, 61])
@pytest.mark.parametrize("D", [1, 255, 256, 2049, 4096])
@pytest.mark.parametrize("dtype,atol,gtol", DTYPES)
def test_loss_forward_and_gradient_against_float64(B, D, dtype, atol, gtol):
    if B == 61 and D == 4096 and DEVICE == "cpu" and dtype != torch.float32:
        pytest.skip("covered by fp32 at this size; the interpreter is slow")
    p = torch.randn(B, D, device=DEVICE, dtype=torch.float64).to(dtype).requires_grad_(True)
    z = torch.randn(B, D, device=DEVICE, dtype=torch.float64).to(dtype).requires_grad_(True)
    assert kernel_backend(p.device) == "triton"
    loss = byol_loss(p, z)
    assert loss.dtype == torch.float32 and loss.shape == ()
    loss.backward()
    ref_loss, ref_grad = _reference_f64(p, z)
    assert abs(loss.item() - ref_loss.item()) <= atol
    assert p.grad.dtype == dtype and z.grad is None
    _assert_grad_close(p.grad, ref_grad, gtol)


def test_loss_row_strided_inputs():
    big_p = torch.randn(13, 300, device=DEVICE)
    big_z = torch.randn(300, 13, device=DEVICE)
    p = big_p[:, 20:275].detach().requires_grad_(True)  # row stride 300
    z = big_z[20:275].T  # column-major: row stride 1, column stride 13
    loss = byol_loss(p, z)
    loss.backward()
    ref_loss, ref_grad = _reference_f64(p, z)
    assert abs(loss.item() - ref_loss.item()) < 1e-5
    _assert_grad_close(p.grad, ref_grad, 1e-4)


def test_symmetric_equals_two_calls_and_scales_with_upstream_gradient():
    p1, p2, z1, z2 = (torch.randn(37, 256, device=DEVICE, requires_grad=True) for _ in range(4))
    sym = byol_loss_symmetric(p1, p2, z1, z2)
    two = byol_loss(p1, z2) + byol_loss(p2, z1)
    ref = byol_loss_symmetric_reference(p1, p2, z1, z2)
    assert abs(sym.item() - two.item()) < 1e-5 and abs(sym.item() - ref.item()) < 1e-5
    (3.0 * sym).backward()
    g1, g2 = p1.grad.clone(), p2.grad.clone()
    p1.grad = p2.grad = None
    (3.0 * ref).backward()
    torch.testing.assert_close(g1, p1.grad, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(g2, p2.grad, rtol=1e-4, atol=1e-7)
    assert z1.grad is None and z2.grad is None


def test_loss_zero_rows_use_the_epsilon():
    p = torch.randn(5, 64, device=DEVICE)
    p[2] = 0.0
    p.requires_grad_(True)
    z = torch.randn(5, 64, device=DEVICE)
    loss = byol_loss(p, z)
    loss.backward()
    ref_loss, ref_grad = _reference_f64(p, z)
    assert torch.isfinite(loss) and abs(loss.item() - ref_loss.item()) < 1e-5
    _assert_grad_close(p.grad, ref_grad, 1e-4)


def test_loss_public_equals_reference_path(select_backend):
    p = torch.randn(17, 100, device=DEVICE, requires_grad=True)
    z = torch.randn(17, 100, device=DEVICE)
    fast = byol_loss(p, z)
    fast.backward()
    g_fast = p.grad.clone()
    p.grad = None
    select_backend("reference")
    slow = byol_loss(p, z)
    slow.backward()
    assert abs(fast.item() - slow.item()) < 1e-5
    torch.testing.assert_close(g_fast, p.grad, rtol=1e-4, atol=1e-7)


def test_loss_bad_input():
    with pytest.raises(ValueError, match="one shape"):
        byol_loss(torch.randn(3, 4), torch.randn(3, 5))
    with pytest.raises(ValueError, match="empty"):
        byol_loss(torch.randn(0, 4), torch.randn(0, 4))


def _resnet50_byol_pairs():
    model = BYOL(build_encoder("resnet50", image_size=224)).to(DEVICE)
    target, online = model.ema_pairs()
    with torch.no_grad():
        for t, o in zip(target, online):  # distinct target and online values everywhere
            t.copy_(torch.randn_like(t))
            o.copy_(torch.randn_like(o))
    return target, online


def test_ema_equals_foreach_lerp_on_resnet50_with_heads():
    target, online = _resnet50_byol_pairs()
    assert len(target) > 150 and sum(t.numel() for t in target) > 30_000_000
    for tau in (0.996, 0.5):
        expected = [t.detach().clone() for t in target]
        torch._foreach_lerp_(expected, [o.detach() for o in online], 1.0 - tau)
        before = [t.detach().clone() for t in target]
        ema_update_(target, online, tau)
        for i, (t, e, b) in enumerate(zip(target, expected, before)):
            torch.testing.assert_close(t, e, rtol=1e-6, atol=1e-6, msg=f"tensor {i}, tau {tau}")
            if tau == 0.5:  # the old values work as poison: each element must move by |online - target| / 2
                assert ((t != b) | (e == b)).all(), f"tensor {i}: some elements were not written"
                assert (e != b).float().mean() > 0.999


def test_ema_tensor_tau_mixed_dtypes_and_layouts():
    t = [torch.randn(5, 7, device=DEVICE), torch.randn(4, 3, 5, 5, device=DEVICE).to(
        memory_format=torch.channels_last), torch.randn(33, device=DEVICE)]
    o = [torch.randn(5, 7, device=DEVICE).to(torch.bfloat16),
         torch.randn(4, 3, 5, 5, device=DEVICE).to(memory_format=torch.channels_last), torch.randn(33, device=DEVICE)]
    ref = [x.clone() for x in t]
    tau = torch.tensor(0.75, device=DEVICE)
    ema_update_(t, o, tau)
    ema_update_reference_(ref, o, 0.75)
    for a, b in zip(t, ref):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    assert t[1].is_contiguous(memory_format=torch.channels_last)


def test_ema_integer_tensors_left_alone_and_errors():
    t = [torch.randn(8, device=DEVICE), torch.tensor([3], device=DEVICE)]
    o = [torch.randn(8, device=DEVICE), torch.tensor([9], device=DEVICE)]
    ema_update_(t, o, 0.5)
    assert t[1].item() == 3
    with pytest.raises(ValueError, match="2 target tensors but 1"):
        ema_update_(t, o[:1], 0.5)
    with pytest.raises(ValueError, match="tensor 0: target shape"):
        ema_update_([torch.randn(3, device=DEVICE)], [torch.randn(4, device=DEVICE)], 0.5)
    with pytest.raises(ValueError, match="mix float and integer"):
        ema_update_([torch.randn(3, device=DEVICE)], [torch.ones(3, dtype=torch.int64, device=DEVICE)], 0.5)
    with pytest.raises(ValueError, match="strides"):
        ema_update_([torch.randn(4, 4, device=DEVICE)], [torch.randn(4, 4, device=DEVICE).T], 0.5)
    if DEVICE == "cuda":
        with pytest.raises(ValueError, match="target on"):
            ema_update_([torch.randn(3, device="cuda")], [torch.randn(3)], 0.5)


def test_opcheck_all_ops():
    p, z = torch.randn(9, 33, device=DEVICE, requires_grad=True), torch.randn(9, 33, device=DEVICE)
    torch.library.opcheck(torch.ops.fastbyol.byol_loss_fwd.default, (p, z))
    args = tuple(torch.randn(9, 33, device=DEVICE, requires_grad=i < 2) for i in range(4))
    torch.library.opcheck(torch.ops.fastbyol.byol_loss_symmetric_fwd.default, args)
    t = [torch.randn(10, device=DEVICE), torch.randn(3, 4, device=DEVICE)]
    o = [torch.randn(10, device=DEVICE), torch.randn(3, 4, device=DEVICE)]
    torch.library.opcheck(torch.ops.fastbyol.ema_update_.default, (t, o, torch.tensor(0.9, device=DEVICE)))


def test_tensor_tau_does_not_recompile():
    from torch._dynamo.testing import CompileCounter

    counter = CompileCounter()
    t, o = [torch.randn(16, device=DEVICE)], [torch.randn(16, device=DEVICE)]

    @torch.compile(backend=counter, fullgraph=True)
    def update(tau):
        ema_update_(t, o, tau)

    ref = [t[0].clone()]
    for tau in (0.9, 0.95, 0.99):
        update(torch.tensor(tau, device=DEVICE))
        ema_update_reference_(ref, o, tau)
    assert counter.frame_count == 1
    torch.testing.assert_close(t[0], ref[0], rtol=1e-6, atol=1e-6)


def _tiny_byol(seed=0):
    torch.manual_seed(seed)
    return BYOL(build_encoder("resnet-tiny", stem="small-s2", image_size=16), 64, 32, 64).to(DEVICE)


def test_twenty_steps_fast_ops_match_references(select_backend):
    # on CUDA: deterministic cuDNN and no TF32, so only the ops under test differ between the two runs
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.backends.cudnn.flags(enabled=True, benchmark=False, deterministic=True, allow_tf32=False):
            _twenty_steps(select_backend)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32


def _twenty_steps(select_backend):
    from fastbyol.optim import LARS
    from fastbyol.train import byol_step

    gen = torch.Generator().manual_seed(1)
    data = [(torch.randn(16, 3, 16, 16, generator=gen), torch.randn(16, 3, 16, 16, generator=gen)) for _ in range(20)]
    results = {}
    for mode in ("triton", "reference"):
        select_backend(mode)
        model = _tiny_byol()
        opt = LARS(model.online_parameters(), lr=0.0)
        target, online = model.ema_pairs()
        losses = [byol_step(model, opt, (target, online), (v1.to(DEVICE), v2.to(DEVICE)), lr=0.2, tau=0.99).item()
                  for v1, v2 in data]
        results[mode] = (losses, [t.detach().clone() for t in target])
    (l_fast, t_fast), (l_ref, t_ref) = results["triton"], results["reference"]
    # fp32 rounding differences grow through BN and LARS's trust ratio (measured here: 1e-7 for 10 steps,
    # then ~1e-4 after 20), so: tight over the first steps, looser at the end; a wrong kernel is off by ~1e-1
    assert max(abs(a - b) for a, b in zip(l_fast[:8], l_ref[:8])) < 1e-5
    assert max(abs(a - b) for a, b in zip(l_fast, l_ref)) < 1e-3
    assert l_fast[0] != l_fast[-1]
    for a, b in zip(t_fast, t_ref):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)


@pytest.mark.slow
def test_compiled_step_fullgraph_no_graph_break(select_backend):
    """A whole BYOL step (forward, fused loss, backward) and the EMA compile with fullgraph=True on this device
    (on CPU: Inductor's C++ backend around the ops' reference kernels)."""
    select_backend("auto")
    model = _tiny_byol()
    target, online = model.ema_pairs()

    @torch.compile(fullgraph=True)
    def loss_fn(v1, v2):
        p1, p2, z1, z2 = model(v1, v2)[:4]
        return byol_loss_symmetric(p1, p2, z1, z2)

    @torch.compile(fullgraph=True)
    def ema(tau):
        ema_update_(target, online, tau)

    v1, v2 = torch.randn(8, 3, 16, 16, device=DEVICE), torch.randn(8, 3, 16, 16, device=DEVICE)
    loss = loss_fn(v1, v2)
    loss.backward()
    assert all(p.grad is not None for p in model.online_parameters())
    eager = byol_loss_symmetric_reference(*model(v1, v2)[:4])
    assert abs(loss.item() - eager.item()) < 1e-3  # BN batch statistics: the same batch gives the same loss
    before = [t.clone() for t in target]
    ema(torch.tensor(0.5, device=DEVICE))
    for t, b, o in zip(target, before, online):
        torch.testing.assert_close(t, 0.5 * b + 0.5 * o.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("symmetric", [False, True])
def test_triton_op_form_equals_the_reference(symmetric):
    """The triton_op form of the loss (FASTBYOL_OP_FORM=triton_op) runs the same kernel: loss and gradient against
    float64, through its registered autograd. On a CPU it runs eagerly under the interpreter (torch's wrap_triton
    hands interpreted kernels back unwrapped, so only a GPU can trace it: the next test)."""
    from fastbyol.kernels.loss import register_traceable_ops

    if not register_traceable_ops():  # registered on demand (set_op_form("triton_op") does it too)
        pytest.skip("this torch has no torch.library.triton_op")
    ps = [torch.randn(13, 255, device=DEVICE, requires_grad=True) for _ in range(2)]
    zs = [torch.randn(13, 255, device=DEVICE) for _ in range(2)]
    if symmetric:
        loss = torch.ops.fastbyol.byol_loss_symmetric_fwd_traceable(ps[0], ps[1], zs[0], zs[1])[0]
        pairs = [(ps[0], zs[1]), (ps[1], zs[0])]
    else:
        loss = torch.ops.fastbyol.byol_loss_fwd_traceable(ps[0], zs[0])[0]
        pairs = [(ps[0], zs[0])]
    loss.backward()
    ref_total = 0.0
    for p, z in pairs:
        ref_loss, ref_grad = _reference_f64(p, z)
        ref_total += ref_loss.item()
        _assert_grad_close(p.grad, ref_grad, 1e-4)
    assert abs(loss.item() - ref_total) <= 2e-5


@pytest.mark.skipif(DEVICE != "cuda", reason="tracing a triton_op needs real (not interpreted) Triton kernels")
def test_triton_op_form_compiles_fullgraph_on_cuda():
    from fastbyol.kernels import set_op_form
    from fastbyol.kernels.loss import HAS_TRITON_OP

    if not HAS_TRITON_OP:
        pytest.skip("this torch has no torch.library.triton_op")
    args = tuple(torch.randn(64, 256, device=DEVICE, requires_grad=i < 2) for i in range(4))
    torch.library.opcheck(torch.ops.fastbyol.byol_loss_symmetric_fwd_traceable.default, args)
    set_op_form("triton_op")
    try:
        torch._dynamo.reset()
        step = torch.compile(lambda a, b, c, d: byol_loss_symmetric(a * 1.0, b, c, d), fullgraph=True)
        loss = step(*args)
        loss.backward()
    finally:
        set_op_form("custom_op")
        torch._dynamo.reset()
    ref = byol_loss_symmetric_reference(*(a.detach().double() for a in args))
    assert abs(loss.item() - ref.item()) <= 1e-5
    assert args[0].grad is not None and args[2].grad is None


def test_op_form_switch(select_backend):
    from fastbyol.kernels import op_form, set_op_form

    with pytest.raises(ValueError, match="op form 'nope'"):
        set_op_form("nope")
    assert op_form() == "custom_op"
    select_backend("reference")  # the triton_op form is for the Triton path: the reference keeps the custom op
    set_op_form("triton_op")
    try:
        torch._dynamo.reset()
        args = tuple(torch.randn(8, 16, device=DEVICE, requires_grad=i < 2) for i in range(4))
        loss = torch.compile(byol_loss_symmetric, fullgraph=True, backend="aot_eager")(*args)
    finally:
        set_op_form("custom_op")
        torch._dynamo.reset()
    torch.testing.assert_close(loss, byol_loss_symmetric_reference(*args).float(), rtol=1e-5, atol=1e-6)


def test_ema_cache_follows_new_lists_and_moved_storage(select_backend):
    """The plan cache (keyed by the list objects, with an O(1) stamp) never runs on stale tensors: new lists, a
    model moved to new storage, and tensors replaced in place (after clear_ema_cache) all give the formula's result."""
    from fastbyol.kernels import clear_ema_cache

    select_backend("triton")

    def check(target, online, tau=0.9):
        expected = [tau * t.double() + (1 - tau) * o.double() for t, o in zip(target, online)]
        ema_update_(target, online, tau)
        for t, e in zip(target, expected):
            torch.testing.assert_close(t.double(), e, rtol=0, atol=1e-6)

    target = [torch.randn(5, 3), torch.randn(17), torch.randn(2, 3, 4)]
    online = [torch.randn_like(t) for t in target]
    check(target, online)
    check(target, online)  # the bound lists: the cached plan
    check(list(target), list(online))  # new lists over the same tensors
    moved = [t.clone() for t in target]  # new storage under new lists
    check(moved, online)
    target[:] = [t.clone() for t in target]  # the same list object, every tensor reallocated: the stamp moves
    check(target, online)
    target[1] = torch.randn(17)  # one tensor in the middle replaced in place: clear_ema_cache says so
    clear_ema_cache()
    check(target, online)


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_ema_cache_tells_views_at_the_same_address_apart(select_backend, backend):
    """Views that start where an earlier list's tensors started but differ in size or strides get their own plan:
    the whole tensor is updated after its prefix was, and a size mismatch hidden behind a cached address is still the
    documented ValueError."""
    select_backend(backend)
    a, b = torch.randn(10, generator=torch.Generator().manual_seed(1)), torch.randn(10)
    ema_update_([a[:3]], [b[:3]], 0.5)  # a plan for the prefix views
    expected = 0.5 * a.double() + 0.5 * b.double()
    ema_update_([a], [b], 0.5)  # the same data pointers, the whole tensors
    torch.testing.assert_close(a.double(), expected, rtol=0, atol=1e-6)
    expected[3:] = a.double()[3:]  # and back to the prefix: the rest stays as it is
    expected[:3] = 0.5 * a.double()[:3] + 0.5 * b.double()[:3]
    ema_update_([a[:3]], [b[:3]], 0.5)
    torch.testing.assert_close(a.double(), expected, rtol=0, atol=1e-6)
    t, o = torch.zeros(4), torch.ones(4)
    ema_update_([t], [o], 0.5)
    with pytest.raises(ValueError):
        ema_update_([t], [o[:2]], 0.5)
