"""In-place multi-tensor EMA, one Triton launch for a whole parameter list:

    target_k <- tau * target_k + (1 - tau) * online_k = target_k + (1 - tau) (online_k - target_k)   for every k

Memory traffic: each element is read twice (target, online) and written once; ResNet-50 + BYOL heads is ~35M fp32
parameters, so ~0.42 GB, ~0.14 ms at 3 TB/s. A per-parameter loop does the same bytes in ~320 launches (two
tensors per module, ~5-10 us each): milliseconds of launch overhead. `torch._foreach_lerp_` groups launches but
still issues several.

Why a pointer table, not a flat buffer: a flat buffer needs the parameters to be views into one allocation, which
the user's model (any trainer) does not guarantee; the table works on the tensors as they are. It is built once per
distinct parameter list (cached by the list objects' identity with an O(1) check, then by data pointers) and maps
each program to (tensor, block start), so one launch covers every tensor. Tensors must be dense (contiguous or
channels_last) with target and online strides equal.

tau is a Python float (a kernel scalar) or a 0-D tensor on the device (read inside the kernel): no host sync, and
under torch.compile a tensor tau changes without a recompile.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch

from fastbyol.reference import ema_update_reference_

from ._dispatch import interpreter_on, kernel_backend, profiled, triton_available

if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _ema_kernel(
        T_ptrs,  # (N,) int64 data pointers of the target tensors (T_DTYPE elements)
        O_ptrs,  # (N,) int64 data pointers of the online tensors (O_DTYPE elements)
        Numels,  # (N,) int64 element counts
        Block_tensor,  # (num_programs,) int32: which tensor program pid updates
        Block_index,  # (num_programs,) int32: which BLOCK of that tensor (first element = index * BLOCK)
        Tau_ptr,  # () fp32 tau on the device, read when TAU_FROM_PTR
        tau_value,  # fp32 tau as a scalar argument otherwise
        T_DTYPE: tl.constexpr,
        O_DTYPE: tl.constexpr,
        TAU_FROM_PTR: tl.constexpr,
        BLOCK: tl.constexpr,  # elements per program
        ALIGNED: tl.constexpr,  # every pointer 16-byte aligned and every numel a multiple of 16: vector access
    ):
        pid = tl.program_id(0)
        k = tl.load(Block_tensor + pid)
        start = tl.load(Block_index + pid).to(tl.int64) * BLOCK  # a multiple of BLOCK, known to the compiler
        n = tl.load(Numels + k)
        t_ptr = tl.load(T_ptrs + k).to(tl.pointer_type(T_DTYPE))
        o_ptr = tl.load(O_ptrs + k).to(tl.pointer_type(O_DTYPE))
        if ALIGNED:  # pointers loaded from memory carry no alignment: say it, or every access is scalar
            t_ptr = tl.multiple_of(t_ptr, 16)
            o_ptr = tl.multiple_of(o_ptr, 16)
            n = tl.multiple_of(n, 16)
        if TAU_FROM_PTR:
            tau = tl.load(Tau_ptr).to(tl.float32)
        else:
            tau = tau_value
        offs = start + tl.arange(0, BLOCK)
        mask = offs < n
        t = tl.load(t_ptr + offs, mask=mask).to(tl.float32)
        o = tl.load(o_ptr + offs, mask=mask).to(tl.float32)
        tl.store(t_ptr + offs, (t + (1.0 - tau) * (o - t)).to(T_DTYPE), mask=mask)

    _TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16,
                  torch.float64: tl.float64}


def _is_dense(t: torch.Tensor) -> bool:
    """No gaps and no overlap: the storage from data_ptr holds exactly numel elements (any dim order)."""
    expected = 1
    for stride, size in sorted((st, s) for s, st in zip(t.shape, t.stride()) if s != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _validate(target: Sequence[torch.Tensor], online: Sequence[torch.Tensor]):
    """The floating (target, online) pairs, or a ValueError naming the first bad pair."""
    if len(target) != len(online):
        raise ValueError(f"ema_update_: {len(target)} target tensors but {len(online)} online tensors")
    pairs = []
    for i, (t, o) in enumerate(zip(target, online)):
        if not torch.is_tensor(t) or not torch.is_tensor(o):
            bad = t if not torch.is_tensor(t) else o
            raise ValueError(f"ema_update_: tensor {i}: a {type(bad).__name__}, not a torch.Tensor")
        if t.shape != o.shape:
            raise ValueError(f"ema_update_: tensor {i}: target shape {tuple(t.shape)} != online {tuple(o.shape)}")
        if t.device != o.device:
            raise ValueError(f"ema_update_: tensor {i}: target on {t.device}, online on {o.device}")
        if t.is_floating_point() != o.is_floating_point():
            raise ValueError(f"ema_update_: tensor {i}: target {t.dtype} and online {o.dtype} mix float and integer")
        if not t.is_floating_point():
            continue  # integer tensors (e.g. num_batches_tracked) are left alone
        pairs.append((t, o))
    if pairs:
        device = pairs[0][0].device
        for i, (t, _) in enumerate(pairs):
            if t.device != device:
                raise ValueError(f"ema_update_: tensors on several devices ({device} and {t.device})")
    return pairs


class _Table:
    """Device-side pointer table and program map for one list of (target, online) tensors of one dtype pair."""

    def __init__(self, pairs, block: int, device: torch.device):
        numels = [t.numel() for t, _ in pairs]
        blocks = [triton.cdiv(n, block) for n in numels]
        tensor_of_block, index_in_tensor = [], []
        for k, nb in enumerate(blocks):
            tensor_of_block += [k] * nb
            index_in_tensor += list(range(nb))
        host = dict(
            t_ptrs=torch.tensor([t.data_ptr() for t, _ in pairs], dtype=torch.int64),
            o_ptrs=torch.tensor([o.data_ptr() for _, o in pairs], dtype=torch.int64),
            numels=torch.tensor(numels, dtype=torch.int64),
            block_tensor=torch.tensor(tensor_of_block, dtype=torch.int32),
            block_index=torch.tensor(index_in_tensor, dtype=torch.int32),
        )
        self.aligned = all(t.data_ptr() % 16 == 0 and o.data_ptr() % 16 == 0 and t.numel() % 16 == 0
                           for t, o in pairs)
        for name, value in host.items():
            setattr(self, name, value.to(device))
        self.num_programs = len(tensor_of_block)


class _PairTables:
    """What one (target, online) list pair needs, validated once: its floating pairs and per-dtype tables.

    Cached (see `pair_tables`), so a step pays an identity check and a dict lookup, not a Python validation loop (~1 ms
    for ResNet-50 + heads). New storage (e.g. after `.to()`) means new pointers and new tables. Resizing a tensor in
    place without moving its storage is not detected: don't.
    """

    def __init__(self, target, online):
        self.pairs = _validate(target, online)
        self.targets = [t for t, _ in self.pairs]
        self.onlines = [o for _, o in self.pairs]
        self.device = self.pairs[0][0].device if self.pairs else None
        self._launches = None  # [(t_dtype, o_dtype, table)], built on the first Triton call

    def launches(self, block: int):
        if self._launches is None:
            groups: dict[tuple[torch.dtype, torch.dtype], list] = {}
            for i, (t, o) in enumerate(self.pairs):
                if not (_is_dense(t) and t.stride() == o.stride()):
                    raise ValueError(f"ema_update_: tensor {i}: target strides {t.stride()} and online strides "
                                     f"{o.stride()} must be equal and dense (contiguous or channels_last)")
                if t.dtype not in _TL_DTYPES or o.dtype not in _TL_DTYPES:
                    raise ValueError(f"ema_update_: tensor {i}: dtypes {t.dtype}/{o.dtype} are not supported")
                groups.setdefault((t.dtype, o.dtype), []).append((t, o))
            self._launches = [(td, od, _Table(g, block, self.device)) for (td, od), g in groups.items()]
        return self._launches


TL_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64"}
# by every tensor's memory: data pointer, dtype, shape, strides
_CACHED: OrderedDict[tuple, _PairTables] = OrderedDict()
_BOUND: OrderedDict[tuple, tuple] = OrderedDict()  # by the identity of both list objects: (lists, stamp, tables)
_MAX_CACHED = 16


def _where(t: torch.Tensor) -> tuple:
    """The memory a tensor covers: two views that start at the same address but differ in size, strides or dtype
    are different tensors to the cache."""
    return t.data_ptr(), t.dtype, t.shape, t.stride()


def _stamp(target: list[torch.Tensor], online: list[torch.Tensor]) -> tuple:
    """O(1) check of a bound list pair: lengths, and the first and last tensors' storage (every tensor of a module
    moves together under `.to()`, `load_state_dict(assign=True)` or `swap_tensors`)."""
    if not target or not online:
        return len(target), len(online)
    return (len(target), len(online), target[0].data_ptr(), target[-1].data_ptr(), online[0].data_ptr(),
            online[-1].data_ptr())  # data pointers only: this runs every step (a tensor swapped in: clear_ema_cache)


def clear_ema_cache() -> None:
    """Forget every cached list pair: call it after replacing tensors inside a list already passed to `ema_update_`
    (an element assigned in place, or one tensor's `.data` swapped between the first and the last)."""
    _CACHED.clear()
    _BOUND.clear()


def pair_tables(target: list[torch.Tensor], online: list[torch.Tensor]) -> _PairTables:
    """The validated tables of a list pair (what ema_update_ looks up each step; benchmarks/host_step_time.py times
    it). A step passes the same two list objects each time (the trainer does): they are recognised by identity and an
    O(1) stamp (~0.5 us for ResNet-50, where the data pointers of the 330 tensors took ~35 us); new lists (or a stamp
    that moved) look the tables up by every tensor's memory (data pointer, dtype, shape, strides: a view of another
    size at the same address is another tensor), and validate new ones if needed. The bound lists are held, so their
    ids cannot be reused while cached."""
    key = (id(target), id(online))
    bound = _BOUND.get(key)
    try:
        stamp = _stamp(target, online)
        if bound is not None and bound[0] is target and bound[1] is online and bound[2] == stamp:
            return bound[3]
        where = (tuple(map(_where, target)), tuple(map(_where, online)))
    except (AttributeError, TypeError):  # an element that is not a tensor: the validation names it
        _validate(target, online)
        raise
    tables = _CACHED.get(where)
    if tables is None:
        tables = _CACHED[where] = _PairTables(target, online)  # validates: raises before caching a bad list
        if len(_CACHED) > _MAX_CACHED:
            _CACHED.popitem(last=False)
    _BOUND[key] = (target, online, stamp, tables)
    if len(_BOUND) > _MAX_CACHED:
        _BOUND.popitem(last=False)
    return tables


def ema_launch(numels: list[int], t_dtype: str = "fp32", o_dtype: str = "fp32", tau_from_ptr: bool = False,
               aligned: bool = True, interpret: bool = False) -> dict:
    """How _triton_ema launches _ema_kernel over tensors of `numels` elements (Triton dtypes t_dtype, o_dtype):
    grid, constexprs (dtype names for T_DTYPE / O_DTYPE), num_warps, num_stages, signature. The launcher and the
    ahead-of-time compile check (fastbyol.tools.gpu_compile) both use it."""
    block = 1 << 16 if interpret else 4096
    signature = dict(T_ptrs="*i64", O_ptrs="*i64", Numels="*i64", Block_tensor="*i32", Block_index="*i32",
                     Tau_ptr="*fp32", tau_value="fp32")
    return dict(grid=(sum(-(-n // block) for n in numels),),
                constexprs=dict(T_DTYPE=t_dtype, O_DTYPE=o_dtype, TAU_FROM_PTR=tau_from_ptr, BLOCK=block,
                                ALIGNED=aligned),
                num_warps=8, num_stages=3, signature=signature)


def _triton_ema(tables: _PairTables, tau: float | torch.Tensor) -> None:
    device = tables.device
    interpret = interpreter_on() and device.type != "cuda"
    block = ema_launch([], interpret=interpret)["constexprs"]["BLOCK"]
    tau_is_tensor = torch.is_tensor(tau)
    if tau_is_tensor and (tau.device != device or tau.ndim != 0):
        raise ValueError(f"ema_update_: tau must be a float or a 0-D tensor on {device}, got {tuple(tau.shape)} "
                         f"on {tau.device}")
    tau_ptr = tau.to(torch.float32) if tau_is_tensor else tables.targets[0]  # unused unless TAU_FROM_PTR
    # one launch per (target dtype, online dtype): one launch in all for a model of one dtype
    for t_dtype, o_dtype, table in tables.launches(block):
        c = ema_launch([], TL_NAMES[t_dtype], TL_NAMES[o_dtype], tau_is_tensor, table.aligned, interpret)
        consts = {**c["constexprs"], "T_DTYPE": _TL_DTYPES[t_dtype], "O_DTYPE": _TL_DTYPES[o_dtype]}
        _ema_kernel[(table.num_programs,)](
            table.t_ptrs, table.o_ptrs, table.numels, table.block_tensor, table.block_index,
            tau_ptr, 0.0 if tau_is_tensor else float(tau), **consts, num_warps=c["num_warps"],
            num_stages=c["num_stages"],
        )


def _ema_dispatch(target: list[torch.Tensor], online: list[torch.Tensor], tau: float | torch.Tensor) -> None:
    tables = pair_tables(target, online)
    if not tables.pairs:
        return
    if kernel_backend(tables.device) == "triton":
        _triton_ema(tables, tau)
    else:
        ema_update_reference_(tables.targets, tables.onlines, tau)


@torch.library.custom_op("fastbyol::ema_update_", mutates_args=("target",))
def _ema_update_op(target: list[torch.Tensor], online: list[torch.Tensor], tau: torch.Tensor) -> None:
    _ema_dispatch(target, online, tau)


@_ema_update_op.register_fake
def _(target, online, tau):
    return None


def _check_tau(tau, target: list) -> None:
    """A Python number in [0, 1], or a 0-D floating tensor on the tensors' device (its value is the caller's: reading
    it would be a host sync); else a ValueError naming what is wrong. Shapes, dtypes and devices only: no sync."""
    if torch.is_tensor(tau):
        if tau.ndim != 0 or not tau.is_floating_point():
            raise ValueError(f"ema_update_: tau must be a float or a 0-D floating tensor, got a {tau.dtype} tensor of "
                             f"shape {tuple(tau.shape)}")
        device = target[0].device if target and torch.is_tensor(target[0]) else tau.device
        if tau.device != device:
            raise ValueError(f"ema_update_: a tensor tau must be on the tensors' device {device}, got {tau.device}")
        return
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) and not hasattr(tau, "__float__"):
        raise ValueError(f"ema_update_: tau must be a float in [0, 1] or a 0-D tensor, got {type(tau).__name__}")
    if not 0.0 <= float(tau) <= 1.0:  # NaN fails both: target = tau t + (1 - tau) o is an average only in [0, 1]
        raise ValueError(f"ema_update_: tau must be in [0, 1] (the target is an average of itself and the online "
                         f"network), got {tau!r}")


@torch.no_grad()
def ema_update_(target: Sequence[torch.Tensor], online: Sequence[torch.Tensor], tau: float | torch.Tensor) -> None:
    """target <- tau * target + (1 - tau) * online, in place, for every floating tensor of two equal-length lists.

    tau: a Python float in [0, 1], or a 0-D floating tensor on the tensors' device (use a tensor inside torch.compile:
    it changes without a recompile; its value is not read, which would be a host sync). Integer tensors are skipped;
    a tau outside [0, 1] or not finite, a tau tensor that is not 0-D, length, shape or device mismatches and
    elements that are not tensors raise ValueError.
    """
    if not isinstance(target, list) or not isinstance(online, list):  # the caller's lists as they are: their
        target, online = list(target), list(online)  # identity keys the tables (see pair_tables)
    _check_tau(tau, target)
    if torch.compiler.is_compiling():  # the custom op: opaque to Inductor, no graph break
        if not torch.is_tensor(tau):
            tau = torch.full((), tau, device=target[0].device if target else "cpu")
        torch.ops.fastbyol.ema_update_(target, online, tau)
    else:  # eager: straight to the kernel, without the dispatcher's Python overhead
        with profiled("fastbyol::ema_update_"):
            _ema_dispatch(target, online, tau)
