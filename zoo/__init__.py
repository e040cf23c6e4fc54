"""zoo: a model zoo for encrypted (FHE) CIFAR inference with Concrete ML.

    import zoo
    zoo.list_variants()
    result = zoo.pull("cifar10-split-tiny", role="client")
    model = zoo.load("cifar10-split-tiny")          # head, FHE client and server, manifest
    model.predict("cat.png", fhe="execute")         # real FHE; "simulate" for the fast check

The public functions live in :mod:`zoo.api`, :mod:`zoo.fhe.runtime` (``load``, ``keygen``),
:mod:`zoo.build.run`, and :func:`zoo.fhe.evaluate.evaluate`; they are imported
on first use so that ``import zoo`` stays cheap.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
_API = {"list_variants", "info", "pull", "publish", "verify", "cache_list", "cache_remove",
        "cache_prune"}  # fmt: skip
_RUNTIME = {"load", "keygen"}
__all__ = sorted(_API | _RUNTIME)


def __getattr__(name: str) -> Any:
    if name in _API:
        from zoo import api

        return getattr(api, name)
    if name in _RUNTIME:
        from zoo.fhe import runtime

        return getattr(runtime, name)
    raise AttributeError(f"module 'zoo' has no attribute {name!r}")
