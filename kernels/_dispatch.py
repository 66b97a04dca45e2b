"""Which implementation an op runs: FASTBYOL_KERNELS=auto|triton|reference, read at every call (cheap).

auto       Triton on CUDA tensors, the plain-PyTorch reference on CPU tensors.
triton     Triton everywhere; CPU tensors need TRITON_INTERPRET=1 (set before `import triton`), as the tests do.
reference  the plain-PyTorch reference everywhere (fastbyol.reference).
"""

from __future__ import annotations

import functools
import os

import torch

MODES = ("auto", "triton", "reference")


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def kernel_path(device: torch.device) -> str:
    """'triton' or 'reference' for tensors on `device`, or a clear error for an impossible request."""
    mode = os.environ.get("FASTBYOL_KERNELS", "auto")
    if mode not in MODES:
        raise ValueError(f"FASTBYOL_KERNELS={mode!r} is not one of {MODES}")
    if mode == "reference":
        return "reference"
    on_cuda = device.type == "cuda"
    if mode == "triton":
        if not triton_available():
            raise RuntimeError("FASTBYOL_KERNELS=triton but triton is not installed")
        if not on_cuda and not interpreter_on():
            raise RuntimeError(f"FASTBYOL_KERNELS=triton on {device.type} tensors needs TRITON_INTERPRET=1 "
                               "(set before triton is imported)")
        return "triton"
    return "triton" if on_cuda and triton_available() else "reference"
