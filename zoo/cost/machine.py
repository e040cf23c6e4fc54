"""This machine as the cost model sees it: CPU model, instruction set, and the CPU time the
hypervisor gives other guests.

The instruction set goes with the speed of FHE (1.7-2.2x between an AVX-512 and an AVX2 host), so
:func:`cpu` names the machine of every calibration and timing. It does not tell two hosts of one
kind apart, nor a host busy with other guests: :func:`cpu_ticks` and :func:`steal` measure one
cause of the latter (see ``docs/machines.md``).
"""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any


def cpu() -> dict[str, Any]:
    """This CPU: model name, family and model numbers, core count, and ``isa``: the widest
    vector instruction set its kernels use (``avx512``, ``avx2``, else the architecture)."""
    info: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            info.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    flags = set(info.get("flags", "").split())
    isa = "avx512" if "avx512f" in flags else "avx2" if "avx2" in flags else platform.machine()
    return {
        "cpu_model": info.get("model name") or platform.processor() or platform.machine(),
        "cpu_family": info.get("cpu family"),
        "cpu_model_number": info.get("model"),
        "cpu_count": os.cpu_count(),
        "isa": isa,
    }


def cpu_ticks(stat: str | None = None) -> tuple[int, int] | None:
    """(stolen, total) CPU time of this machine since boot, in clock ticks, from ``stat`` (the
    text of ``/proc/stat``, read when not given); None where the kernel does not report it."""
    try:
        text = Path("/proc/stat").read_text() if stat is None else stat
        first = text.split("\n", 1)[0].split()
        ticks = [int(value) for value in first[1:9]]  # user nice system idle iowait irq soft steal
    except (OSError, ValueError):
        return None
    return (ticks[7], sum(ticks)) if len(ticks) == 8 and first[0] == "cpu" else None


def steal(before: tuple[int, int] | None, after: tuple[int, int] | None) -> float | None:
    """Share of the CPU time between two :func:`cpu_ticks` that the hypervisor gave to other
    guests (0 on a host that nobody else uses); None when unknown or too short to tell."""
    if before is None or after is None or after[1] <= before[1]:
        return None
    return round((after[0] - before[0]) / (after[1] - before[1]), 4)
