"""This machine as the cost model sees it: CPU model, instruction set, and the CPU time that
others take from a timed run: the hypervisor's other guests, and the other processes here.

The instruction set goes with the speed of FHE (1.7-2.2x between an AVX-512 and an AVX2 host), so
:func:`cpu` names the machine of every calibration and timing. It does not tell two hosts of one
kind apart, nor a host busy with something else: :func:`cpu_ticks` with :func:`steal` and
:func:`others` measure the two causes of the latter (see ``docs/machines.md``).
"""

from __future__ import annotations

import os
import platform
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple


def cpuinfo() -> dict[str, str]:
    """The first processor's fields of Linux's /proc/cpuinfo (empty where there is none)."""
    info: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            info.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return info


def cpu() -> dict[str, Any]:
    """This CPU: model name, family and model numbers, core count, and ``isa``: the widest
    vector instruction set its kernels use (``avx512``, ``avx2``, else the architecture)."""
    info = cpuinfo()
    flags = set(info.get("flags", "").split())
    isa = "avx512" if "avx512f" in flags else "avx2" if "avx2" in flags else platform.machine()
    return {
        "cpu_model": info.get("model name") or platform.processor() or platform.machine(),
        "cpu_family": info.get("cpu family"),
        "cpu_model_number": info.get("model"),
        "cpu_count": os.cpu_count(),
        "isa": isa,
    }


#: The share of the machine's CPU (:func:`others`) above which a time measured here is not the
#: machine's alone: `zoo eval` says so, and keygen times are not recorded.
BUSY = 0.05


def alone(share: float | None) -> bool:
    """Whether a time measured while others used ``share`` of the CPU (None: unknown) can stand
    for this machine's."""
    return share is None or share <= BUSY


class Ticks(NamedTuple):
    """CPU time since boot, in clock ticks: the machine's (all cores) and this process's own."""

    stolen: int  # given by the hypervisor to other guests
    total: int  # every state, idle included
    busy: int  # running anything here: user, nice, system, irq, softirq
    own: int  # this process's threads and the children it has waited for


def cpu_ticks(stat: str | None = None) -> Ticks | None:
    """The :class:`Ticks` of now, the machine's from ``stat`` (the text of ``/proc/stat``, read
    when not given); None where the kernel does not report them."""
    try:
        text = Path("/proc/stat").read_text() if stat is None else stat
        first = text.split("\n", 1)[0].split()
        ticks = [int(value) for value in first[1:9]]  # user nice system idle iowait irq soft steal
    except (OSError, ValueError):
        return None
    if len(ticks) != 8 or first[0] != "cpu":
        return None
    user, nice, system, _idle, _iowait, irq, soft, stolen = ticks
    times = os.times()
    own = times.user + times.system + times.children_user + times.children_system
    return Ticks(stolen, sum(ticks), user + nice + system + irq + soft,
                 round(own * os.sysconf("SC_CLK_TCK")))  # fmt: skip


def _share(
    before: Ticks | None, after: Ticks | None, ticks: Callable[[Ticks], int]
) -> float | None:
    """Share of the machine's CPU time between ``before`` and ``after`` that ``ticks`` grew by."""
    if before is None or after is None or after.total <= before.total:
        return None  # unknown, or no time passed: nothing to tell
    return round(max(ticks(after) - ticks(before), 0) / (after.total - before.total), 4)


def steal(before: Ticks | None, after: Ticks | None) -> float | None:
    """Share of the CPU time between two :func:`cpu_ticks` that the hypervisor gave to other
    guests (0 on a host that nobody else uses); None when unknown or too short to tell."""
    return _share(before, after, lambda t: t.stolen)


def others(before: Ticks | None, after: Ticks | None) -> float | None:
    """Share of the machine's CPU time between two :func:`cpu_ticks` that other processes of
    this machine used (about 0 when this one ran alone; on 2 cores, a process that keeps one
    core busy throughout counts 0.5); None when unknown or too short to tell."""
    return _share(before, after, lambda t: t.busy - t.own)
