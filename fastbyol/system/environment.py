"""The environment is input: every variable fastbyol reads, checked in one place into one line naming it.

torchrun's RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT, and the FASTBYOL_* switches
(FASTBYOL_CACHE, FASTBYOL_KERNELS, FASTBYOL_OP_FORM; the test-only FASTBYOL_TEST_* fault injections). `fastbyol
train` calls `check_environment()` before anything is created, so a bad value ends in one line and no run folder.
"""

from __future__ import annotations

import os
import re

from ..errors import FastByolError

MAX_PORT = 65535


def _count(name: str, default: int, low: int) -> int:
    """The variable as a decimal integer >= low (its default when unset), else FastByolError naming it."""
    raw = os.environ.get(name)
    if raw is None:
        return default
    text = raw.strip()
    if not re.fullmatch(r"[0-9]{1,18}", text):  # no sign, no spaces inside, no '1e3', no Unicode digits, no 10^5000
        raise FastByolError(f"environment variable {name}={raw!r} must be an integer >= {low}")
    value = int(text)
    if value < low:
        raise FastByolError(f"environment variable {name}={raw!r} must be an integer >= {low}")
    return value


def torchrun_world() -> tuple[int, int, int]:
    """(rank, local_rank, world_size) from torchrun's variables, each checked (0, 0, 1 without them)."""
    world_size = _count("WORLD_SIZE", 1, 1)
    rank = _count("RANK", 0, 0)
    local_rank = _count("LOCAL_RANK", 0, 0)
    local_world = _count("LOCAL_WORLD_SIZE", world_size, 1)
    if rank >= world_size:
        raise FastByolError(f"environment variable RANK={rank} must be < WORLD_SIZE={world_size}")
    if local_world > world_size:
        raise FastByolError(f"environment variable LOCAL_WORLD_SIZE={local_world} must be <= WORLD_SIZE={world_size}")
    if local_rank >= local_world:
        raise FastByolError(f"environment variable LOCAL_RANK={local_rank} must be < "
                            f"{'LOCAL_WORLD_SIZE' if 'LOCAL_WORLD_SIZE' in os.environ else 'WORLD_SIZE'}={local_world}")
    if world_size > 1:
        _rendezvous()
    return rank, local_rank, world_size


def _rendezvous() -> None:
    """MASTER_ADDR and MASTER_PORT, which a process group of more than one process needs."""
    addr = os.environ.get("MASTER_ADDR")
    if addr is None or not addr.strip() or any(c.isspace() or not c.isprintable() for c in addr):
        raise FastByolError(f"environment variable MASTER_ADDR={addr!r} must name the rendezvous host (WORLD_SIZE > 1; "
                            "start the processes with torchrun)")
    if "MASTER_PORT" not in os.environ:
        raise FastByolError("environment variable MASTER_PORT is not set (WORLD_SIZE > 1; start the processes with "
                            "torchrun)")
    port = _count("MASTER_PORT", 0, 1)
    if port > MAX_PORT:
        raise FastByolError(f"environment variable MASTER_PORT={port} must be a TCP port in 1..{MAX_PORT}")


def _cache_folder() -> None:
    raw = os.environ.get("FASTBYOL_CACHE")
    if raw is None or raw == "":  # empty: the default cache folder, as before
        return
    if "\0" in raw or not raw.strip():
        raise FastByolError(f"environment variable FASTBYOL_CACHE={raw!r} must be a folder path")
    path = os.path.expanduser(raw)
    if os.path.exists(path) and not os.path.isdir(path):
        raise FastByolError(f"environment variable FASTBYOL_CACHE={raw!r} names a file, not a folder")


def fault_injection_count(name: str) -> int:
    """A test-only fault-injection count (FASTBYOL_TEST_*): 0 when unset or not a number (never a crash on import)."""
    raw = os.environ.get(name, "0").strip()
    return int(raw) if re.fullmatch(r"[0-9]{1,18}", raw) else 0


def check_environment() -> tuple[int, int, int]:
    """Every variable fastbyol reads, checked; returns torchrun_world(). FASTBYOL_KERNELS and FASTBYOL_OP_FORM are
    checked against the device by `fastbyol.kernels.check_backend`."""
    _cache_folder()
    return torchrun_world()
