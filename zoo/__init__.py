"""zoo: a model zoo for encrypted (FHE) CIFAR inference with Concrete ML.

    import zoo
    zoo.list_variants()
    result = zoo.pull("cifar10-split-tiny", role="client")

The public functions live in :mod:`zoo.api` (and :mod:`zoo.build` for builds); they are imported
on first use so that ``import zoo`` stays cheap.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
_API = {"list_variants", "info", "pull", "publish", "verify", "cache_list", "cache_remove",
        "cache_prune"}  # fmt: skip
__all__ = sorted(_API | {"build"})


def __getattr__(name: str) -> Any:
    if name in _API:
        from zoo import api

        return getattr(api, name)
    if name == "build":
        from zoo.build import build

        return build
    raise AttributeError(f"module 'zoo' has no attribute {name!r}")
