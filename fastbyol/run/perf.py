"""Performance bookkeeping shared by the trainer, `bench` and the GPU report: the accelerators' peak FLOP/s, the FLOPs
of one BYOL image counted by torch, model FLOP utilisation (one formula), a device sync, and library versions.
"""

from __future__ import annotations

import copy
import platform

import numpy as np
import torch

# dense bf16 peak of the accelerators MFU is quoted against (datasheets), FLOP/s
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}


def peak_flops(device: torch.device) -> float | None:
    """Dense bf16 FLOP/s of one accelerator of `device`'s kind; None on a CPU or an unlisted GPU."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


def mfu(img_per_s: float, flops_per_image: float, peak: float | None, world_size: int = 1) -> float | None:
    """Model FLOP utilisation: achieved FLOP/s over the peak of all `world_size` accelerators (img_per_s counts the
    images of every process); None without a known peak."""
    if peak is None:
        return None
    return img_per_s * flops_per_image / (peak * world_size)


def device_sync(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU): the end of every timed region."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_memory_in_use(device: torch.device) -> float | None:
    """Bytes in use on the GPU by every allocator (torch's caching allocator, DALI's pools, CUDA contexts), from the
    driver; torch.cuda.max_memory_allocated sees torch's tensors only. None on a CPU."""
    if device.type != "cuda":
        return None
    free, total = torch.cuda.mem_get_info(device)
    return float(total - free)


def flops_per_image(model, image_size: int, device: torch.device | None = None) -> float:
    """FLOPs of one BYOL image (two views): online forward + backward and target forward, counted by torch on a
    batch of 2, so the figure follows the real architecture (about 8 encoder forwards).

    Counted on the meta device: shapes only, no arithmetic, no random numbers, the real model untouched (the same
    count as on real tensors, in a fraction of the time: 1.6 s instead of 17 s for ResNet-50 on a CPU). `device` is
    accepted for callers of the earlier signature and ignored."""
    from torch.utils.flop_counter import FlopCounterMode

    from ..kernels import byol_loss_symmetric

    probe = copy.deepcopy(model).to("meta")
    x = torch.empty(2, 3, image_size, image_size, device="meta").contiguous(memory_format=torch.channels_last)
    with FlopCounterMode(display=False) as counter:
        p1, p2, z1, z2 = probe(x, x)[:4]  # BYOL.forward: then h1, the probe's features
        byol_loss_symmetric(p1, p2, z1, z2).backward()
    return counter.get_total_flops() / 2


def library_versions() -> dict:
    """Versions of Python and the libraries a figure depends on (None for one that is not installed)."""
    from ..version import __version__

    versions = {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
                "fastbyol": __version__}
    for name, module in (("triton", "triton"), ("dali", "nvidia.dali")):
        try:
            versions[name] = __import__(module, fromlist=["__version__"]).__version__
        except ImportError:
            versions[name] = None
    return versions
