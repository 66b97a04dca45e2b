"""fastbyol.kernels: the two hot ops of BYOL as Triton kernels behind torch.library custom ops.

    from fastbyol.kernels import byol_loss, byol_loss_symmetric, ema_update_

Installed from the top-level folder `kernels/` as `fastbyol.kernels` (PyPI already has a package named `kernels`).
`set_backend("auto"|"triton"|"reference")` picks the path (FASTBYOL_KERNELS, read once at import, sets it
first); FASTBYOL_OP_FORM=custom_op|triton_op (or `set_op_form`) the form torch.compile sees (see `_dispatch`).
"""

from ._dispatch import (KernelBackendError, backend, check_backend, kernel_backend, op_form, set_backend,
                        set_op_form)
from .ema import clear_ema_cache, ema_update_
from .loss import byol_loss, byol_loss_symmetric

__all__ = [
    "KernelBackendError", "backend", "byol_loss", "byol_loss_symmetric", "check_backend", "clear_ema_cache",
    "ema_update_", "kernel_backend", "op_form", "set_backend", "set_op_form",
]
