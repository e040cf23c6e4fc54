"""Where `zoo` keeps things, read from the environment at call time (never at import).

- ``ZOO_HOME``: root of hub, cache and keys (default ``~/.cache/zoo``)
- ``ZOO_REGISTRY``: the catalogue of variants (default: the project's ``registry.json``)
- ``ZOO_RELEASES``: the release store (default: ``releases/`` beside the registry)
- ``ZOO_OFFLINE``: ``1`` never touches the network
- ``ZOO_HF_ENDPOINT``: the Hugging Face protocol hub (default ``https://huggingface.co``)
- ``HF_TOKEN``: its token
- ``ZOO_DATA_DIR``: CIFAR in the official python layout (default ``$ZOO_HOME/data``)
"""

from __future__ import annotations

import os
from pathlib import Path

#: The package folder. ``zoo/registry.json`` and ``zoo/recipes`` are links to the top-level
#: ``registry.json`` and ``recipes/`` of the source tree; a wheel carries them as files.
PACKAGE_DIR = Path(__file__).resolve().parent
DEFAULT_HF_ENDPOINT = "https://huggingface.co"


def _env_path(name: str) -> Path | None:
    """``$name`` as a path, ``~`` expanded (a unit or .env file does not expand it); None if
    unset or empty."""
    value = os.environ.get(name)
    return Path(value).expanduser() if value else None


def zoo_home() -> Path:
    """Root folder of the local hub, the cache and the keys."""
    return _env_path("ZOO_HOME") or Path.home() / ".cache" / "zoo"


def hub_dir() -> Path:
    """The embedded local directory hub."""
    return zoo_home() / "hub"


def cache_dir() -> Path:
    """Pulled, verified builds."""
    return zoo_home() / "cache"


def keys_dir() -> Path:
    """Client keys, one folder per build (0700)."""
    return zoo_home() / "keys"


def server_keys_dir() -> Path:
    """Evaluation keys that ``zoo serve`` received, one folder per build (0700)."""
    return zoo_home() / "server-keys"


def data_dir() -> Path:
    """Where builds read CIFAR (``cifar-10-batches-py/``, ``cifar-100-python/``)."""
    return _env_path("ZOO_DATA_DIR") or zoo_home() / "data"


def registry_path() -> Path:
    """The registry file: ``$ZOO_REGISTRY`` or the project's ``registry.json`` (link resolved,
    so that an atomic save replaces the file, not the link)."""
    return _env_path("ZOO_REGISTRY") or (PACKAGE_DIR / "registry.json").resolve()


def releases_dir(registry: Path | None = None) -> Path:
    """The release store: ``$ZOO_RELEASES``, else ``releases/`` beside the registry file."""
    return _env_path("ZOO_RELEASES") or (
        Path(registry or registry_path()).resolve().parent / "releases"
    )


def recipe_path(module: str) -> Path:
    """A recipe file named as in the registry (``recipes/NAME.py``)."""
    return (PACKAGE_DIR / module).resolve()


def offline() -> bool:
    """True when ``ZOO_OFFLINE`` asks for cache-only operation."""
    return os.environ.get("ZOO_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def hf_endpoint() -> str:
    """Endpoint of the Hugging Face protocol hub."""
    return os.environ.get("ZOO_HF_ENDPOINT") or DEFAULT_HF_ENDPOINT


def hf_token() -> str | None:
    """Token for the Hugging Face protocol hub, if any."""
    return os.environ.get("HF_TOKEN") or None
