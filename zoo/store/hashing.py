"""sha256 of files, written as ``sha256:<hex>`` so that the algorithm travels with the digest."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    """``sha256:<hex>`` of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(CHUNK), b""):
            digest.update(chunk)
    return f"sha256:{digest.hexdigest()}"


def copy_hashed(
    source: BinaryIO, target: BinaryIO, progress: Callable[[int], object] | None = None
) -> tuple[int, str]:
    """Copy a stream, returning (bytes copied, ``sha256:<hex>``) computed on the way."""
    digest = hashlib.sha256()
    size = 0
    for chunk in iter(lambda: source.read(CHUNK), b""):
        digest.update(chunk)
        target.write(chunk)
        size += len(chunk)
        if progress is not None:
            progress(len(chunk))
    return size, f"sha256:{digest.hexdigest()}"
