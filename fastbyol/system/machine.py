"""What machine a figure was measured on: the CPU's model name and how many cores this process may use. CPU seconds,
img/s and even bit-exact results differ between CPU models, so every benchmark records them beside its figures."""

from __future__ import annotations

import os


def cpu_model() -> str:
    """The CPU's model name as the kernel reports it ("unknown" where it does not: no /proc/cpuinfo)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def usable_cores() -> int:
    """The cores this process may run on (its affinity; the machine's count where affinity is not reported)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def cpu_description() -> str:
    """'MODEL x CORES', e.g. 'AMD EPYC x 2'."""
    return f"{cpu_model()} x {usable_cores()}"
