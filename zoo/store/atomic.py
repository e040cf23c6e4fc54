"""Write a file whole or not at all: a temporary file in the same folder, synced, then renamed
(so a kill or a power loss leaves the old file or the new one, never a torn one)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from zoo.errors import InputError


def write_atomic(path: Path, data: bytes | str, mode: int = 0o644) -> None:
    """Replace ``path`` with ``data`` (text is UTF-8); a crash leaves the old file or none,
    never a torn one. ``mode`` is the new file's permissions (a catalogue is for all to read)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data.encode() if isinstance(data, str) else data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def sync(path: Path) -> None:
    """Flush ``path`` (a file, or a folder after renames in it) to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_synced(tmp: Path, path: Path) -> None:
    """Sync ``tmp`` (a whole file that a library wrote, e.g. safetensors) and rename it over
    ``path``."""
    sync(tmp)
    os.replace(tmp, path)


def writable(path: Path) -> None:
    """Refuse an output file whose folder does not exist, before any work for it is done."""
    if not Path(path).parent.is_dir():
        raise InputError(
            f"cannot write {path}: the folder {Path(path).parent} does not exist",
            hint="create the folder first, or name a file in one that exists",
        )
