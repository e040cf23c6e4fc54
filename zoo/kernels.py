"""CPU kernels held to one instruction set, so that builds are bit for bit the same on any x86-64.

torch (ATen), oneDNN, MKL and numpy's OpenBLAS each pick their kernels by the CPU's instruction
set, and kernels of different widths round differently: the tiny recipe trained with torch's
plain kernels and with its AVX2 ones gives different weights, and no build of the project's
first machine (most likely AVX-512) reproduced on its AVX2 one. A build therefore holds all four to
AVX2, which every x86-64 machine of the last decade runs. The libraries read these variables
when they start, so :func:`pin` must run before torch and numpy are imported: ``zoo build``
does it first thing, and :func:`check` refuses a build in a process where it came too late.
A variable already set in the environment is left as it is (and recorded as it is).

The instruction set also goes with the speed of FHE (1.7-2.2x between those two machines), so
:func:`cpu` describes the machine for the cost model's calibrations too. It does not tell two
hosts of one kind apart (two such virtual machines ran the same circuits 1.2-1.45x apart), nor a
host busy with other guests. :func:`cpu_ticks` and :func:`steal` measure one cause of the latter,
the CPU time the hypervisor gave other guests during a measurement; what they cannot see from
inside the guest (a busy SMT sibling, the host's clock) once slowed real FHE by 15% with no steal.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

from zoo.errors import BuildError

#: What each library is held to (x86-64; elsewhere the variables are harmless and ignored).
PINS = {
    "ATEN_CPU_CAPABILITY": "avx2",
    "DNNL_MAX_CPU_ISA": "AVX2",
    "MKL_CBWR": "AVX2",
    "OPENBLAS_CORETYPE": "Haswell",
}
#: torch's capabilities above the pin: seeing one means torch started before :func:`pin`.
ABOVE_PIN = ("AVX512",)


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


def pin() -> None:
    """Set the variables of :data:`PINS` that are not set yet (before torch/numpy start)."""
    for name, value in PINS.items():
        os.environ.setdefault(name, value)


def check() -> dict[str, Any]:
    """The kernels this process really uses, for the build's config; refuse unpinned ones."""
    import torch

    capability = torch.backends.cpu.get_cpu_capability()
    if capability.startswith(ABOVE_PIN):
        raise BuildError(
            f"torch runs its {capability} kernels in this process, so the build would not "
            "reproduce on AVX2 machines",
            hint="build with `zoo build` (a fresh process), or call zoo.kernels.pin() "
            "before importing torch",
        )
    return {"torch": capability, **{name: os.environ.get(name) for name in PINS}}
