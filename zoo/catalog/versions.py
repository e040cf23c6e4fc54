"""The runtime a build needs, and whether this interpreter has it (read without importing torch).

A build pins ``concrete-ml``, ``concrete-python`` and the Python ``major.minor`` it was compiled
with: a circuit serialised by one concrete version is not guaranteed to load in another, so those
three must match exactly, as pip matches a wheel's tags. ``torch`` and ``brevitas`` are recorded
for rebuilding but do not decide whether the artifacts load.
"""

from __future__ import annotations

import sys
from importlib import metadata

BINDING = ("concrete-ml", "concrete-python", "python")
RECORDED = ("torch", "brevitas")


def installed() -> dict[str, str]:
    """Versions of the runtime packages in this environment ("missing" when absent)."""
    found = {"python": f"{sys.version_info.major}.{sys.version_info.minor}"}
    for dist in BINDING[:2] + RECORDED:
        try:
            found[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            found[dist] = "missing"
    return found


def mismatches(required: dict[str, str], have: dict[str, str] | None = None) -> list[str]:
    """The binding packages whose installed version differs, as "name: need X, have Y"."""
    have = installed() if have is None else have
    return [
        f"{name}: need {required[name]}, have {have.get(name, 'missing')}"
        for name in BINDING
        if required.get(name) != have.get(name)
    ]


def install_hint(required: dict[str, str]) -> str:
    """The command that gives an environment matching ``required``."""
    return (
        f"use Python {required.get('python')} and "
        f"`pip install concrete-ml=={required.get('concrete-ml')} "
        f"concrete-python=={required.get('concrete-python')}`"
    )
