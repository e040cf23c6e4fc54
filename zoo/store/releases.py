"""The release store: ``releases/`` beside ``registry.json``, the durable home of pinned builds.

A hub can vanish with the machine that held it (the local hub lives under ``$ZOO_HOME``); the
release store ships with the source tree, so a fresh clone can pull every build its registry
offers. It is content-addressed, like git's objects: each file is stored once under its sha256,
``releases/sha256/ab/abcdef…``, so builds that share a file (the same clear head, rounded
variants of the same weights) share its blob, and a blob is never rewritten.

``zoo publish BUILD_DIR --hub releases`` writes it (each blob through a temporary file, verified,
then renamed); ``zoo pull`` reads it after the build's recorded hubs, staged and verified like
any hub download. It knows nothing of variants: the registry's pins are the index.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from pathlib import Path

from zoo import config
from zoo.catalog.registry import Build, FileEntry
from zoo.errors import NotFoundError
from zoo.store.atomic import replace_synced
from zoo.store.hashing import copy_hashed, sha256_file

KIND = "releases"


@dataclass
class ReleaseStore:
    """A content-addressed folder of build files (default: ``releases/`` beside the registry)."""

    root: Path
    kind: str = KIND

    @classmethod
    def beside(cls, registry_path: Path | None = None) -> ReleaseStore:
        """The store of a registry file: ``$ZOO_RELEASES``, else ``releases/`` next to it."""
        return cls(config.releases_dir(registry_path))

    def blob(self, sha256: str) -> Path:
        """Where the file with this ``sha256:<hex>`` digest lives."""
        digest = sha256.split(":", 1)[-1]
        return self.root / "sha256" / digest[:2] / digest

    def publish(self, repo: str, files: list[tuple[Path, FileEntry]], message: str) -> str:
        """Store every file not yet stored; return the build's content revision."""
        from zoo.store.hub import content_revision, copy_pinned, remove_stale

        for source, entry in files:
            target = self.blob(entry.sha256)
            target.parent.mkdir(parents=True, exist_ok=True)
            remove_stale(target.parent)
            if target.is_file() and sha256_file(target) == entry.sha256:
                continue  # content-addressed: these bytes are stored already
            tmp = target.parent / f".tmp-{uuid.uuid4().hex}"
            try:
                copy_pinned(source, tmp, entry)
                os.chmod(tmp, 0o644)
                replace_synced(tmp, target)
            finally:
                tmp.unlink(missing_ok=True)
        return content_revision([entry for _, entry in files])

    def download(
        self, repo: str, revision: str, entries: list[FileEntry], staging: Path, progress: bool
    ) -> dict[str, Path]:
        """Copy each file's blob into ``staging`` (verification is the cache's job)."""
        missing = [e.path for e in entries if not self.blob(e.sha256).is_file()]
        if missing:
            raise NotFoundError(
                f"the release store {self.root} lacks {', '.join(missing)} of "
                f"{repo}@{revision[:12]}",
                hint="publish the build with `zoo publish BUILD_DIR --hub releases`",
            )
        out = {}
        for entry in entries:
            out[entry.path] = staging / entry.path
            with open(self.blob(entry.sha256), "rb") as src, open(out[entry.path], "wb") as dst:
                copy_hashed(src, dst)
        return out

    def check(self, build: Build) -> dict[str, str]:
        """Rehash the stored files of ``build``: path → "ok", "missing" or what is wrong."""
        report = {}
        for entry in build.files:
            path = self.blob(entry.sha256)
            if not path.is_file():
                report[entry.path] = "missing"
            elif path.stat().st_size != entry.size:
                report[entry.path] = f"{path.stat().st_size} bytes, pinned {entry.size}"
            else:
                digest = sha256_file(path)
                ok = digest == entry.sha256
                report[entry.path] = "ok" if ok else f"hash {digest}, pinned {entry.sha256}"
        return report

    def size(self) -> tuple[int, int]:
        """(number of blobs, their bytes)."""
        blobs = [p for p in self.root.glob("sha256/*/*") if p.is_file()]
        return len(blobs), sum(p.stat().st_size for p in blobs)
