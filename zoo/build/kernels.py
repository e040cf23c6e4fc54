"""CPU kernels held to one instruction set, so that builds are bit for bit the same on any x86-64.

torch (ATen), oneDNN, MKL and numpy's OpenBLAS pick their kernels by the CPU's instruction set,
and kernels of different widths round differently. A build holds all four to AVX2, which every
x86-64 machine of the last decade runs. The libraries read these variables when they start, so
:func:`pin` must run before torch and numpy are imported (every ``zoo`` command does it first
thing, so that eval, predict and serve run the clear head as its build did), and :func:`check`
refuses a build in a process where it came too late. A variable already set in the environment
is left as it is (and recorded as it is); a CPU without AVX2 is left unpinned.
"""

from __future__ import annotations

import os
import platform
from typing import Any

from zoo.cost import machine
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


def pin() -> None:
    """Set the variables of :data:`PINS` that are not set yet (before torch/numpy start); on an
    x86-64 CPU without AVX2 none (the libraries would run instructions it lacks and die: its
    builds record their kernels, and reproduce only there)."""
    if lacks_avx2():
        return
    for name, value in PINS.items():
        os.environ.setdefault(name, value)


def lacks_avx2() -> bool:
    """Whether this is an x86 CPU whose flags (Linux's /proc/cpuinfo) have no AVX2."""
    flags = machine.cpuinfo().get("flags")  # ARM's cpuinfo has "Features", no flags
    return flags is not None and "avx2" not in flags.split()


def check() -> dict[str, Any]:
    """The kernels this process really uses, for the build's config; refuse unpinned ones."""
    import torch

    capability = torch.backends.cpu.get_cpu_capability()
    if capability.startswith(ABOVE_PIN):
        raise BuildError(
            f"torch runs its {capability} kernels in this process, so the build would not "
            "reproduce on AVX2 machines",
            hint="build with `zoo build` (a fresh process), or call zoo.build.kernels.pin() "
            "before importing torch",
        )
    from threadpoolctl import threadpool_info

    x86 = platform.machine().lower() in ("x86_64", "amd64")  # elsewhere the pins mean nothing
    wanted = os.environ.get("OPENBLAS_CORETYPE", "").lower() if x86 else ""
    started = {i.get("architecture") for i in threadpool_info() if i["internal_api"] == "openblas"}
    late = sorted(core for core in started if core and wanted and core.lower() != wanted)
    if late:
        raise BuildError(
            f"OpenBLAS runs its {', '.join(late)} kernels in this process (numpy started before "
            "the pin), so the build would not reproduce on other machines",
            hint="build with `zoo build` (a fresh process), or call zoo.build.kernels.pin() "
            "before importing numpy",
        )
    return {"torch": capability, **{name: os.environ.get(name) for name in PINS}}
