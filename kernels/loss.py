"""Fused BYOL regression loss, forward and backward in one Triton launch.

Math, per row i of p, z in R^{B x D} (z constant), with n_p = max(|p_i|, eps), n_z = max(|z_i|, eps):

    c_i  = <p_i, z_i> / (n_p n_z)
    L    = (1 / B) sum_i (2 - 2 c_i)                                   (byol_loss)
    dL/dp_i = -(2 / B) (z_i / (n_p n_z) - c_i p_i / n_p^2 [|p_i| > eps])

and byol_loss_symmetric(p1, p2, z1, z2) = L(p1, z2) + L(p2, z1), both pairs in the same launch.

Memory traffic (B x D, s bytes per element). Eager `F.normalize(p) , F.normalize(z)`, `(pn * zn).sum`, `2 - 2x`,
`.mean()` and autograd's backward read p and z ~3 times each, write and re-read two normalized (B, D) copies and
their products: ~14 B D s bytes and ~15 launches for one pair. The fused kernel reads p and z once and writes the
gradient once: 3 B D s bytes, one launch; the backward is a single scale of the saved gradient by the incoming
scalar (2 B D s bytes, one launch, no host sync).

The forward's scalar is reduced inside the launch: each program writes its partial sum, and the program that
takes the last ticket of a self-resetting counter adds the partials in a fixed order (deterministic).
"""

from __future__ import annotations

import torch

from fastbyol.reference import NORM_EPS, byol_loss_and_grad_reference

from ._dispatch import kernel_backend, on_op_form, op_form, profiled, triton_available

if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _rows_loss_and_grad(
        p_base, z_base, g_base,  # (B, D) prediction, target, gradient out (contiguous, P's dtype)
        spr, spc, szr, szc,  # row and column strides of p and z, in elements
        rows, row_mask, D, inv_B, eps,
        BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, SINGLE_CHUNK: tl.constexpr,
    ):
        """Loss and gradient of BLOCK_M rows of one pair; returns the rows' loss sum over B."""
        rows64 = rows.to(tl.int64)
        cols = tl.arange(0, BLOCK_D)
        if SINGLE_CHUNK:  # D <= BLOCK_D: rows stay in registers between the two passes
            mask = row_mask[:, None] & (cols < D)[None, :]
            p = tl.load(p_base + rows64[:, None] * spr + cols[None, :] * spc, mask=mask, other=0.0).to(tl.float32)
            z = tl.load(z_base + rows64[:, None] * szr + cols[None, :] * szc, mask=mask, other=0.0).to(tl.float32)
            pp = tl.sum(p * p, axis=1)
            zz = tl.sum(z * z, axis=1)
            pz = tl.sum(p * z, axis=1)
        else:  # pass 1 over D in chunks
            pp = tl.zeros([BLOCK_M], dtype=tl.float32)
            zz = tl.zeros([BLOCK_M], dtype=tl.float32)
            pz = tl.zeros([BLOCK_M], dtype=tl.float32)
            for d0 in range(0, D, BLOCK_D):
                c = d0 + cols
                m = row_mask[:, None] & (c < D)[None, :]
                pc = tl.load(p_base + rows64[:, None] * spr + c[None, :] * spc, mask=m, other=0.0).to(tl.float32)
                zc = tl.load(z_base + rows64[:, None] * szr + c[None, :] * szc, mask=m, other=0.0).to(tl.float32)
                pp += tl.sum(pc * pc, axis=1)
                zz += tl.sum(zc * zc, axis=1)
                pz += tl.sum(pc * zc, axis=1)
        p_norm = tl.sqrt(pp)
        n_p = tl.maximum(p_norm, eps)
        n_z = tl.maximum(tl.sqrt(zz), eps)
        cos = pz / (n_p * n_z)
        coef_z = -2.0 * inv_B / (n_p * n_z)
        coef_p = tl.where(p_norm > eps, 2.0 * inv_B * cos / (n_p * n_p), 0.0)
        if SINGLE_CHUNK:
            g = coef_z[:, None] * z + coef_p[:, None] * p
            tl.store(g_base + rows64[:, None] * D + cols[None, :], g.to(g_base.dtype.element_ty), mask=mask)
        else:  # pass 2: re-read the rows, write the gradient once
            for d0 in range(0, D, BLOCK_D):
                c = d0 + cols
                m = row_mask[:, None] & (c < D)[None, :]
                pc = tl.load(p_base + rows64[:, None] * spr + c[None, :] * spc, mask=m, other=0.0).to(tl.float32)
                zc = tl.load(z_base + rows64[:, None] * szr + c[None, :] * szc, mask=m, other=0.0).to(tl.float32)
                g = coef_z[:, None] * zc + coef_p[:, None] * pc
                tl.store(g_base + rows64[:, None] * D + c[None, :], g.to(g_base.dtype.element_ty), mask=m)
        return tl.sum(tl.where(row_mask, 2.0 - 2.0 * cos, 0.0), axis=0) * inv_B

    @triton.jit
    def _byol_loss_fwd_kernel(
        P1_ptr,  # (B, D) predictions of pair 0, strides (stride_p1r, stride_p1c)
        Z1_ptr,  # (B, D) targets of pair 0, strides (stride_z1r, stride_z1c)
        G1_ptr,  # (B, D) out: dL/dP1, contiguous, P1's dtype
        P2_ptr,  # pair 1, read only when NUM_PAIRS == 2
        Z2_ptr,
        G2_ptr,
        stride_p1r, stride_p1c, stride_z1r, stride_z1c,
        stride_p2r, stride_p2c, stride_z2r, stride_z2c,
        Partial_ptr,  # (num_programs,) fp32 scratch: each program's share of the loss
        Counter_ptr,  # (1,) int32 ticket counter: 0 before and after every launch
        Out_ptr,  # () fp32 out: the loss
        B, D,  # rows, width
        inv_B, eps,  # 1 / B; the norm floor
        NUM_PAIRS: tl.constexpr,  # 1: byol_loss; 2: byol_loss_symmetric (same rows of both pairs per program)
        BLOCK_M: tl.constexpr,  # rows per program
        BLOCK_D: tl.constexpr,  # columns per chunk (power of two)
        SINGLE_CHUNK: tl.constexpr,  # D <= BLOCK_D
        RED_BLOCK: tl.constexpr,  # partials added per step by the last program
    ):
        pid = tl.program_id(0)
        num_programs = tl.num_programs(0)
        rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
        row_mask = rows < B
        partial = _rows_loss_and_grad(P1_ptr, Z1_ptr, G1_ptr, stride_p1r, stride_p1c, stride_z1r, stride_z1c,
                                      rows, row_mask, D, inv_B, eps, BLOCK_M, BLOCK_D, SINGLE_CHUNK)
        if NUM_PAIRS == 2:
            partial += _rows_loss_and_grad(P2_ptr, Z2_ptr, G2_ptr, stride_p2r, stride_p2c, stride_z2r, stride_z2c,
                                           rows, row_mask, D, inv_B, eps, BLOCK_M, BLOCK_D, SINGLE_CHUNK)
        # the scalar: every program writes its partial; the one holding the last ticket adds them in pid order
        tl.store(Partial_ptr + pid, partial)
        tl.debug_barrier()
        ticket = tl.atomic_add(Counter_ptr, 1, sem="acq_rel")
        if ticket == num_programs - 1:
            offs = tl.arange(0, RED_BLOCK)
            acc = tl.zeros([RED_BLOCK], dtype=tl.float32)
            for r0 in range(0, num_programs, RED_BLOCK):
                acc += tl.load(Partial_ptr + r0 + offs, mask=(r0 + offs) < num_programs, other=0.0,
                               cache_modifier=".cg")
            tl.store(Out_ptr, tl.sum(acc, axis=0))
            tl.store(Counter_ptr, 0)


_COUNTERS: dict[torch.device, torch.Tensor] = {}


def _counter(device: torch.device) -> torch.Tensor:
    """One self-resetting ticket counter per device (the kernel sets it back to 0 when it is done)."""
    c = _COUNTERS.get(device)
    if c is None:
        c = _COUNTERS[device] = torch.zeros(1, dtype=torch.int32, device=device)
    return c


def _block_shape(B: int, D: int, interpret: bool) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_D): ~4K elements a program on a GPU; large blocks under the (slow per program) interpreter."""
    max_d, elems = (16384, 1 << 17) if interpret else (2048, 4096)
    block_d = min(triton.next_power_of_2(max(D, 1)), max_d)
    block_m = max(1, min(elems // block_d, triton.next_power_of_2(B), 64 if not interpret else 4096))
    return block_m, block_d


def loss_launch(B: int, D: int, num_pairs: int, dtype: str = "bf16", interpret: bool = False) -> dict:
    """How _triton_forward launches _byol_loss_fwd_kernel for (B, D) inputs of Triton dtype `dtype`: grid,
    constexprs, num_warps, num_stages, signature. The launcher and the ahead-of-time compile check
    (fastbyol.tools.gpu_compile) both use it."""
    block_m, block_d = _block_shape(B, D, interpret)
    ptr = f"*{dtype}"
    strides = {f"stride_{t}{i}{rc}": "i32" for i in (1, 2) for t in "pz" for rc in "rc"}
    signature = dict(P1_ptr=ptr, Z1_ptr=ptr, G1_ptr=ptr, P2_ptr=ptr, Z2_ptr=ptr, G2_ptr=ptr, **strides,
                     Partial_ptr="*fp32", Counter_ptr="*i32", Out_ptr="*fp32", B="i32", D="i32", inv_B="fp32",
                     eps="fp32")
    return dict(grid=(triton.cdiv(B, block_m),),
                constexprs=dict(NUM_PAIRS=num_pairs, BLOCK_M=block_m, BLOCK_D=block_d, SINGLE_CHUNK=D <= block_d,
                                RED_BLOCK=1024),
                num_warps=4 if block_m * block_d <= 4096 else 8, num_stages=3, signature=signature)


def _check_pair(p: torch.Tensor, z: torch.Tensor, name: str) -> None:
    """Two (B, D) floating tensors of one shape on one device, B > 0; else a ValueError naming what is wrong
    (shapes, dtypes and devices only: no host sync)."""
    if not torch.is_tensor(p) or not torch.is_tensor(z):
        bad = p if not torch.is_tensor(p) else z
        raise ValueError(f"{name}: expected two torch.Tensors, got a {type(bad).__name__}")
    if not p.is_floating_point() or not z.is_floating_point():
        raise ValueError(f"{name}: expected floating tensors, got {p.dtype} and {z.dtype}")
    if p.ndim != 2 or p.shape != z.shape:
        raise ValueError(f"{name}: expected two (B, D) tensors of one shape, got {tuple(p.shape)} and "
                         f"{tuple(z.shape)}")
    if p.device != z.device:
        raise ValueError(f"{name}: p is on {p.device} but z on {z.device}")
    if p.shape[0] == 0:
        raise ValueError(f"{name}: the batch is empty")


def _triton_forward(pairs: list[tuple[torch.Tensor, torch.Tensor]],
                    traceable: bool = False) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """traceable: launch through wrap_triton with a fresh ticket counter (the body of the triton_op form, which
    torch.compile traces: no state kept between calls)."""
    from ._dispatch import interpreter_on

    B, D = pairs[0][0].shape
    device = pairs[0][0].device
    interpret = interpreter_on() and device.type != "cuda"
    launch = loss_launch(B, D, len(pairs), interpret=interpret)
    num_programs = launch["grid"][0]
    grads = [torch.empty((B, D), dtype=p.dtype, device=device) for p, _ in pairs]
    partial = torch.empty(num_programs, dtype=torch.float32, device=device)
    out = torch.empty((), dtype=torch.float32, device=device)
    (p1, z1), (p2, z2) = pairs[0], pairs[-1]
    g1, g2 = grads[0], grads[-1]
    kernel = _byol_loss_fwd_kernel
    if traceable:
        from torch.library import wrap_triton

        kernel = wrap_triton(_byol_loss_fwd_kernel)
    counter = torch.zeros(1, dtype=torch.int32, device=device) if traceable else _counter(device)
    kernel[launch["grid"]](
        p1, z1, g1, p2, z2, g2,
        p1.stride(0), p1.stride(1), z1.stride(0), z1.stride(1),
        p2.stride(0), p2.stride(1), z2.stride(0), z2.stride(1),
        partial, counter, out,
        B, D, 1.0 / B, NORM_EPS,
        **launch["constexprs"], num_warps=launch["num_warps"], num_stages=launch["num_stages"],
    )
    return out, grads


def _reference_forward(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The same (loss, dL/dp) from fastbyol.reference in closed form: the CPU kernel of the custom ops.

    (Not autograd: a custom op's body runs below the autograd dispatch key, and torch.func inside it breaks
    under torch.compile's runtime wrappers.)
    """
    losses, grads = zip(*(byol_loss_and_grad_reference(p, z) for p, z in pairs))
    return sum(losses), list(grads)


def _forward(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    p = pairs[0][0]
    if kernel_backend(p.device) == "triton" and p.dtype != torch.float64:
        return _triton_forward(pairs)
    return _reference_forward(pairs)


# ------------------------------------------------------------------------------------- torch.library custom ops
@torch.library.custom_op("fastbyol::byol_loss_fwd", mutates_args=())
def _byol_loss_fwd(p: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    loss, (g,) = _forward([(p, z)])
    return loss, g


@torch.library.custom_op("fastbyol::byol_loss_symmetric_fwd", mutates_args=())
def _byol_loss_symmetric_fwd(
    p1: torch.Tensor, p2: torch.Tensor, z1: torch.Tensor, z2: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    loss, (g1, g2) = _forward([(p1, z2), (p2, z1)])
    return loss, g1, g2


def _loss_dtype(p: torch.Tensor) -> torch.dtype:
    return torch.float64 if p.dtype == torch.float64 else torch.float32


@_byol_loss_fwd.register_fake
def _(p, z):
    return p.new_empty((), dtype=_loss_dtype(p)), torch.empty_like(p, memory_format=torch.contiguous_format)


@_byol_loss_symmetric_fwd.register_fake
def _(p1, p2, z1, z2):
    return (p1.new_empty((), dtype=_loss_dtype(p1)), torch.empty_like(p1, memory_format=torch.contiguous_format),
            torch.empty_like(p2, memory_format=torch.contiguous_format))


def _setup_one(ctx, inputs, output):
    ctx.save_for_backward(output[1])


def _backward_one(ctx, grad_loss, _grad_g):
    (g,) = ctx.saved_tensors
    return g * grad_loss.to(g.dtype), None  # z gets no gradient


def _setup_sym(ctx, inputs, output):
    ctx.save_for_backward(output[1], output[2])


def _backward_sym(ctx, grad_loss, _g1, _g2):
    g1, g2 = ctx.saved_tensors
    return g1 * grad_loss.to(g1.dtype), g2 * grad_loss.to(g2.dtype), None, None


_byol_loss_fwd.register_autograd(_backward_one, setup_context=_setup_one)
_byol_loss_symmetric_fwd.register_autograd(_backward_sym, setup_context=_setup_sym)

# the triton_op form (FASTBYOL_OP_FORM=triton_op): the same kernel, visible to Inductor; Triton path only. Registered
# when that form is chosen (at import from FASTBYOL_OP_FORM, or by set_op_form), never before: torch.library.triton_op
# imports torch._dynamo and torch._inductor, a second of every start-up that runs the custom_op form or no compile.
HAS_TRITON_OP = triton_available() and hasattr(torch.library, "triton_op")
_traceable_registered = []  # the registered ops, once


def register_traceable_ops() -> bool:
    """Register torch.ops.fastbyol.byol_loss_fwd_traceable and byol_loss_symmetric_fwd_traceable (once); False when
    this torch or machine has no triton_op."""
    if not HAS_TRITON_OP:
        return False
    if _traceable_registered:
        return True
    from torch.library import triton_op

    @triton_op("fastbyol::byol_loss_fwd_traceable", mutates_args=())
    def _byol_loss_fwd_tt(p: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        loss, (g,) = _triton_forward([(p, z)], traceable=True)
        return loss, g

    @triton_op("fastbyol::byol_loss_symmetric_fwd_traceable", mutates_args=())
    def _byol_loss_symmetric_fwd_tt(
        p1: torch.Tensor, p2: torch.Tensor, z1: torch.Tensor, z2: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        loss, (g1, g2) = _triton_forward([(p1, z2), (p2, z1)], traceable=True)
        return loss, g1, g2

    _byol_loss_fwd_tt.register_autograd(_backward_one, setup_context=_setup_one)
    _byol_loss_symmetric_fwd_tt.register_autograd(_backward_sym, setup_context=_setup_sym)
    _traceable_registered.extend((_byol_loss_fwd_tt, _byol_loss_symmetric_fwd_tt))
    return True


on_op_form(lambda form: form == "triton_op" and register_traceable_ops())


def _traceable(p: torch.Tensor) -> bool:
    """Under torch.compile: use the triton_op form for this input (style triton_op, the Triton path, not fp64)."""
    return (HAS_TRITON_OP and op_form() == "triton_op" and p.dtype != torch.float64
            and kernel_backend(p.device) == "triton")


class _FusedLossFn(torch.autograd.Function):
    """The eager path: the same forward and backward as the custom ops, without the dispatcher's Python overhead.

    Inputs (p, z) or (p1, p2, z1, z2); the backward scales the gradient saved by the forward."""

    @staticmethod
    def forward(ctx, *tensors):
        if len(tensors) == 2:
            loss, grads = _forward([(tensors[0], tensors[1])])
        else:
            p1, p2, z1, z2 = tensors
            loss, grads = _forward([(p1, z2), (p2, z1)])
        ctx.save_for_backward(*grads)
        ctx.mark_non_differentiable()
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grads = [g * grad_loss.to(g.dtype) for g in ctx.saved_tensors]
        return (*grads, *([None] * len(grads)))  # no gradient for the targets


# ------------------------------------------------------------------------------------------------ public functions
def byol_loss(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """mean_i (2 - 2 cos(p_i, z_i)) for (B, D) p and z; z gets no gradient. fp32/fp16/bf16 (fp64: reference)."""
    _check_pair(p, z, "byol_loss")
    if torch.compiler.is_compiling():  # a torch.library op: no graph break
        if _traceable(p):
            return torch.ops.fastbyol.byol_loss_fwd_traceable(p, z)[0]
        return torch.ops.fastbyol.byol_loss_fwd(p, z)[0]
    with profiled("fastbyol::byol_loss"):
        return _FusedLossFn.apply(p, z)


def byol_loss_symmetric(p1: torch.Tensor, p2: torch.Tensor, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
    """byol_loss(p1, z2) + byol_loss(p2, z1) in one launch: the BYOL objective for two views."""
    _check_pair(p1, z2, "byol_loss_symmetric(p1, z2)")
    _check_pair(p2, z1, "byol_loss_symmetric(p2, z1)")
    if p1.shape != p2.shape or p1.dtype != p2.dtype:
        raise ValueError(f"byol_loss_symmetric: p1 {tuple(p1.shape)} {p1.dtype} and p2 {tuple(p2.shape)} {p2.dtype} "
                         "must match")
    if torch.compiler.is_compiling():
        if _traceable(p1):
            return torch.ops.fastbyol.byol_loss_symmetric_fwd_traceable(p1, p2, z1, z2)[0]
        return torch.ops.fastbyol.byol_loss_symmetric_fwd(p1, p2, z1, z2)[0]
    with profiled("fastbyol::byol_loss_symmetric"):
        return _FusedLossFn.apply(p1, p2, z1, z2)
