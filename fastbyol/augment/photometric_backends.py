"""The photometric chain's backends by name: "reference" (fastbyol.augment.photometric, eager), "compiled"
(torch.compile of its per-slot form) and "triton" (fastbyol.kernels.photometric). Kept apart from
fastbyol.augment.photometric, which the Triton kernel imports for its parameter layout, so neither imports the other
back."""

from __future__ import annotations

import torch

from ..config import PHOTOMETRIC_BACKENDS as BACKENDS
from .photometric import photometric, photometric_by_slot

_compiled = None


def photometric_backend(name: str):
    """The chain as `name`: "reference" (photometric, eager), "compiled" (torch.compile of photometric_by_slot,
    compiled once per process and per shape) or "triton" (fastbyol.kernels.photometric; CPU tensors need
    TRITON_INTERPRET=1). All take (crops, params, spec), spec a ChainSpec; the reference also compute_dtype, threads
    and out, the Triton chain buffers."""
    global _compiled
    if name == "reference":
        return photometric
    if name == "compiled":
        if _compiled is None:
            _compiled = torch.compile(photometric_by_slot, fullgraph=True, dynamic=False)
        return _compiled
    if name == "triton":
        from fastbyol.kernels.photometric import photometric_triton

        return photometric_triton
    raise ValueError(f"photometric backend {name!r} is not one of {BACKENDS}")
