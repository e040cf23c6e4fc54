"""The evaluation keys a `zoo serve` server received: content-addressed files, LRU-evicted.

A key set is stored as one file named by the sha256 of its bytes (the key id), so uploads are
idempotent and an id can never name a path outside the store. Uploads land in ``.incoming/``
first and are moved into place only once checked. Folders are 0700, files 0600. Only evaluation
keys ever reach a server: they let it compute on ciphertexts, not decrypt them.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
import time
from pathlib import Path
from typing import BinaryIO

from zoo.errors import KeyIdError
from zoo.store.atomic import replace_synced, sync

KEY_ID = re.compile(r"[0-9a-f]{64}")
INCOMING = ".incoming"
STALE_SECONDS = 3600  # an upload left half-written by a killed server


def check_key_id(key_id: str) -> str:
    """Return ``key_id`` if it is a sha256 hex digest, else raise :class:`KeyIdError`."""
    if not KEY_ID.fullmatch(key_id):
        raise KeyIdError(
            f"malformed key id {key_id[:80]!r}",
            hint="a key id is the sha256 (64 lowercase hex digits) that POST /keys returned",
        )
    return key_id


def _touch(path: Path) -> None:
    """Mark a key as used now (ns clock: the file system's own is coarser)."""
    now = time.time_ns()
    os.utime(path, ns=(now, now))


def make_private(folder: Path, *parents: Path) -> Path:
    """Create ``folder`` and make it (and the given parents) 0700."""
    folder.mkdir(parents=True, exist_ok=True)
    for part in (*parents, folder):
        os.chmod(part, 0o700)
    return folder


class Incoming:
    """An upload being received into a temporary file (0600), with its size and sha256."""

    def __init__(self, folder: Path) -> None:
        handle, name = tempfile.mkstemp(dir=folder, prefix="upload-")
        self.path = Path(name)
        self.size = 0
        self.committed = False
        self._file: BinaryIO = os.fdopen(handle, "wb")
        self._hash = hashlib.sha256()

    def write(self, chunk: bytes) -> None:
        """Append a chunk of the body."""
        self._file.write(chunk)
        self._hash.update(chunk)
        self.size += len(chunk)

    def close(self) -> None:
        """Close the file (idempotent)."""
        self._file.close()

    @property
    def key_id(self) -> str:
        """sha256 hex of what was written."""
        return self._hash.hexdigest()


class KeyStore:
    """One build's evaluation keys on disk, at most ``max_keys`` of them (LRU by mtime)."""

    def __init__(self, folder: Path, max_keys: int) -> None:
        if max_keys < 1:
            raise ValueError("max_keys must be at least 1")
        self.folder = folder
        self.max_keys = max_keys
        self.incoming = make_private(folder / INCOMING, folder)
        now = time.time()
        for stale in self.incoming.iterdir():
            if now - stale.stat().st_mtime > STALE_SECONDS:
                stale.unlink(missing_ok=True)

    def key_ids(self) -> list[str]:
        """Stored key ids, least recently used first."""
        used = {}
        for path in self.folder.iterdir():
            if KEY_ID.fullmatch(path.name):
                try:
                    used[path.name] = path.stat().st_mtime_ns
                except FileNotFoundError:  # evicted meanwhile
                    continue
        return sorted(used, key=lambda key_id: used[key_id])

    def get(self, key_id: str) -> Path | None:
        """The file of a stored key id (marked as used), or None; malformed ids raise."""
        path = self.folder / check_key_id(key_id)
        try:
            _touch(path)
        except FileNotFoundError:
            return None
        return path

    def begin(self) -> Incoming:
        """Start receiving an upload into ``.incoming/``."""
        return Incoming(self.incoming)

    def discard(self, incoming: Incoming) -> None:
        """Drop an upload that was refused (nothing to do once committed)."""
        incoming.close()
        if incoming.committed:
            return
        incoming.path.unlink(missing_ok=True)

    def commit(self, incoming: Incoming) -> str:
        """Move a checked upload into place under its key id (synced first: a power loss leaves
        the whole file or none under that id); evict beyond ``max_keys``."""
        incoming.close()
        key_id = incoming.key_id
        target = self.folder / key_id
        os.chmod(incoming.path, 0o600)
        replace_synced(incoming.path, target)
        sync(self.folder)  # the rename too
        incoming.committed = True
        _touch(target)
        self.evict(keep=key_id)
        return key_id

    def evict(self, keep: str | None = None) -> list[str]:
        """Remove the least recently used keys above ``max_keys``; return their ids."""
        ids = self.key_ids()
        removed = []
        for key_id in ids:
            if len(ids) - len(removed) <= self.max_keys:
                break
            if key_id != keep:
                (self.folder / key_id).unlink(missing_ok=True)
                removed.append(key_id)
        return removed
