"""Which implementation an op runs: `set_backend("auto"|"triton"|"reference")`, or FASTBYOL_KERNELS (read once,
at import; a bad value is reported, as one line naming the variable, by the first `kernel_backend` call or by
`check_backend`, which the trainer calls before it creates anything).

auto       Triton on CUDA tensors, the plain-PyTorch reference on CPU tensors.
triton     Triton everywhere; CPU tensors need TRITON_INTERPRET=1 (set before `import triton`), as the tests do.
reference  the plain-PyTorch reference everywhere (fastbyol.reference).

Under torch.compile the loss goes in as one of two op forms (FASTBYOL_OP_FORM, read at import, or
`set_op_form`), for the Triton path:

custom_op  (default) `torch.library.custom_op`: Inductor calls it as an opaque extern kernel through the dispatcher.
triton_op  `torch.library.triton_op` + `wrap_triton`: Inductor sees the Triton kernel itself and launches it from
           its own generated code. Which is faster is a GPU measurement (benchmarks/gpu_report.py, loss section).
The EMA has no triton_op form: its single launch reads a table of data pointers, which a traced graph cannot
express (the tensors' addresses are not graph values).
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch

from fastbyol.errors import FastByolError

BACKENDS = ("auto", "triton", "reference")
OP_FORMS = ("custom_op", "triton_op")
_op_form = os.environ.get("FASTBYOL_OP_FORM", "custom_op")
_op_form_error = None  # a bad FASTBYOL_OP_FORM: reported by check_backend as one line, never a crash on import
if _op_form not in OP_FORMS:
    _op_form_error = f"FASTBYOL_OP_FORM={_op_form!r} is not one of {', '.join(OP_FORMS)}"
    _op_form = "custom_op"


def op_form() -> str:
    """The loss's op form under torch.compile (a module global: torch.compile guards on it)."""
    return _op_form


_op_form_hooks = []  # called with the form whenever it is set: the loss registers its triton_op form on demand


def on_op_form(hook) -> None:
    """Call hook(form) now and on every later set_op_form (the loss registers its triton_op form only when that form
    is chosen: registering it imports torch's compiler stack, about a second of every start-up otherwise)."""
    _op_form_hooks.append(hook)
    hook(_op_form)


def set_op_form(form: str) -> None:
    """custom_op or triton_op for graphs compiled from now on (compiled functions recompile on the change)."""
    global _op_form
    if form not in OP_FORMS:
        raise ValueError(f"op form {form!r} is not one of {OP_FORMS}")
    _op_form = form
    for hook in _op_form_hooks:
        hook(form)


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


class KernelBackendError(FastByolError, ValueError):
    """An impossible kernel selection (a bad FASTBYOL_KERNELS, Triton asked for where it cannot run)."""


_backend = os.environ.get("FASTBYOL_KERNELS", "auto")  # read once: a module global, not an environment read per call


def set_backend(name: str) -> str:
    """Select the backend for every later call (auto, triton or reference); returns the previous selection."""
    global _backend
    if name not in BACKENDS:
        raise KernelBackendError(f"kernel backend {name!r} is not one of {', '.join(BACKENDS)}")
    previous, _backend = _backend, name
    return previous


def backend() -> str:
    """The selection as set (auto, triton or reference), before it meets a device."""
    return _backend


def check_backend(device: torch.device) -> str:
    """kernel_backend(device), raised as one line naming FASTBYOL_KERNELS when the selection cannot run there (or
    FASTBYOL_OP_FORM when it is not one of OP_FORMS)."""
    if _op_form_error is not None:
        raise KernelBackendError(_op_form_error)
    return kernel_backend(device)


def kernel_backend(device: torch.device) -> str:
    """'triton' or 'reference' for tensors on `device`, or a KernelBackendError for an impossible request."""
    selected = _backend
    if selected not in BACKENDS:
        raise KernelBackendError(f"FASTBYOL_KERNELS={selected!r} is not one of {', '.join(BACKENDS)}")
    if selected == "reference" or device.type == "meta":  # meta tensors (FLOP counting): shapes only, no kernel
        return "reference"
    on_cuda = device.type == "cuda"
    if selected == "triton":
        if not triton_available():
            raise KernelBackendError("FASTBYOL_KERNELS=triton but triton is not installed")
        if not on_cuda and not interpreter_on():
            raise KernelBackendError(f"FASTBYOL_KERNELS=triton on {device.type} tensors needs TRITON_INTERPRET=1 "
                                     "(set before triton is imported), or FASTBYOL_KERNELS=auto")
        return "triton"
    return "triton" if on_cuda and triton_available() else "reference"


def profiled(name: str):
    """The op's name in torch.profiler traces for an eager call; nothing at all while no profiler records."""
    return torch.profiler.record_function(name) if torch._C._autograd._profiler_enabled() else contextlib.nullcontext()
