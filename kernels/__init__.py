"""fastbyol.kernels: the two hot ops of BYOL as Triton kernels behind torch.library custom ops.

    from fastbyol.kernels import byol_loss, byol_loss_symmetric, ema_update_

Installed from the top-level folder `kernels/` as `fastbyol.kernels` (PyPI already has a package named `kernels`).
FASTBYOL_KERNELS=auto|triton|reference picks the path (see `_dispatch`).
"""

from ._dispatch import kernel_path
from .ema import ema_update_
from .loss import byol_loss, byol_loss_symmetric

__all__ = ["byol_loss", "byol_loss_symmetric", "ema_update_", "kernel_path"]
