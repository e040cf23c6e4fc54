"""Bundles: builds carried as one file to a machine without a hub (an air-gapped FHE server).

A bundle is a zip archive (members stored, not compressed: the files are compressed already)::

    bundle.json          {"format": "zoo-bundle", "version": 1, "builds": [{variant, build}]}
    sha256/<hex>         each file of the builds once, by sha256 (as in the release store)

``export`` pulls the builds (from the cache when they are there) and writes the archive through a
temporary file. ``import_bundle`` trusts nothing in it: the archive is extracted by
:func:`zoo.store.safezip.extract_zip` (no ``..`` paths, links or oversized members), every file is
checked against the importing registry's pins, and a build that registry does not know is added
only with ``trust=True``, after its content revision is recomputed from its file listing. Files
enter the cache through the same verified rename as a hub download; nothing is written to cache
or registry before every file of every build has been checked.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Any

from zoo import api
from zoo.catalog import manifest
from zoo.catalog import registry as reg
from zoo.errors import IntegrityError, NotFoundError, UnsafeArchiveError
from zoo.store import cache, hub
from zoo.store.atomic import writable
from zoo.store.gate import check_zip
from zoo.store.hashing import sha256_file
from zoo.store.safezip import READ_ERRORS, check_member, extract_zip

FORMAT = "zoo-bundle"
VERSION = 1
INDEX = "bundle.json"
MAX_INDEX_BYTES = 16 * 1024**2


def _member(entry: reg.FileEntry) -> str:
    return "sha256/" + entry.sha256.split(":", 1)[1]


def export(refs: list[str], out: Path, registry_path: Path | None = None) -> dict[str, Any]:
    """Write the builds ``refs`` name (pulled first if not cached) into the bundle ``out``."""
    writable(out)
    builds = [api.pull(ref, registry_path=registry_path).build for ref in refs]
    for build in builds:
        cache.check_hashes(build, "all")  # a warm pull checked sizes only
    out = Path(out)
    index = {
        "format": FORMAT,
        "version": VERSION,
        "builds": [{"variant": b.variant, "build": b.raw} for b in builds],
    }
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)
    os.close(fd)
    try:
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as archive:
            archive.writestr(INDEX, manifest.dumps(index))
            written = set()
            for build in builds:
                for entry in build.files:
                    if _member(entry) not in written:
                        archive.write(cache.build_path(build) / entry.path, _member(entry))
                        written.add(_member(entry))
        os.chmod(tmp, 0o644)  # mkstemp's 0600 is for secrets; a bundle is made to be shared
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return {"path": str(out), "builds": [b.short_ref for b in builds], "bytes": out.stat().st_size}


def _read_index(path: Path) -> dict[str, Any]:
    """The bundle's index, size-limited and shape-checked before anything is extracted."""
    try:
        with zipfile.ZipFile(path) as archive:
            info = archive.getinfo(INDEX)
            check_member(path, info)
            if info.file_size > MAX_INDEX_BYTES:
                raise UnsafeArchiveError(f"{path}: {INDEX} declares {info.file_size} bytes")
            with archive.open(info) as handle:
                index = json.loads(handle.read(MAX_INDEX_BYTES + 1))
    except (*READ_ERRORS, KeyError, RecursionError) as exc:
        raise UnsafeArchiveError(
            f"{path} is not a zoo bundle ({type(exc).__name__}: {exc})",
            hint="make bundles with `zoo bundle export`",
        ) from None
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise UnsafeArchiveError(f"{path} is not a zoo bundle (no {FORMAT} index)")
    if index.get("version") != VERSION:
        raise UnsafeArchiveError(
            f"{path} is a zoo bundle of version {index.get('version')}, not {VERSION}",
            hint="export it again with this version of zoo",
        )
    builds = index.get("builds")
    if not isinstance(builds, list) or not all(isinstance(item, dict) for item in builds):
        raise UnsafeArchiveError(f"{path}: its index's builds are not a list of objects")
    return index


def _plan(
    index: dict[str, Any], registry: reg.Registry, trust: bool
) -> tuple[list[reg.Build], list[reg.Build]]:
    """The bundle's builds as pinned by the importing registry (or, trusted, by the bundle),
    and those of them that the registry does not pin yet."""
    builds, new = [], []
    for item in index["builds"]:
        name, raw = item.get("variant"), item.get("build")
        problems = reg.validate(raw, "build")
        if not isinstance(name, str) or problems:
            raise IntegrityError(f"bundle entry {name!r} fails the schema: {'; '.join(problems)}")
        variant = registry.variant(name)  # a bundle never adds variants
        known = [b for b in variant.builds if b.revision == raw["revision"]]
        if known:
            builds.append(known[0])  # the registry's pins, not the bundle's
            continue
        if not trust:
            raise NotFoundError(
                f"the bundle holds {name}@{raw['revision'][:12]}, which {registry.path} does not "
                "pin",
                hint="import it with --trust only if you trust whoever made the bundle",
            )
        build = reg.parse_build(name, {**raw, "hubs": []})  # its hubs are not ours to trust
        if hub.content_revision(list(build.files)) != build.revision:
            raise IntegrityError(
                f"bundle entry {name}@{raw['revision'][:12]}: its file listing does not hash to "
                "its revision"
            )
        builds.append(build)
        new.append(build)
    if not builds:
        raise NotFoundError("the bundle holds no build")
    return builds, new


class _Extracted:
    """A hub over an extracted bundle (files by sha256), for :func:`zoo.store.cache.fetch`."""

    kind = "bundle"

    def __init__(self, root: Path) -> None:
        self.root = root

    def download(
        self, repo: str, revision: str, entries: list, staging: Path, progress: bool
    ) -> dict[str, Path]:
        out = {}
        for entry in entries:
            out[entry.path] = staging / entry.path
            shutil.copyfile(self.root / _member(entry), out[entry.path])
        return out


def import_bundle(
    path: Path,
    *,
    trust: bool = False,
    registry_path: Path | None = None,
    cache_root: Path | None = None,
) -> dict[str, Any]:
    """Verify a bundle against the registry and put its builds into the cache."""
    path = Path(path)
    registry = reg.load(registry_path)
    builds, added = _plan(_read_index(path), registry, trust)
    expected = {_member(e): e for b in builds for e in b.files}
    with tempfile.TemporaryDirectory(prefix="zoo-bundle-") as scratch:
        root = Path(scratch) / "bundle"
        total = sum(e.size for e in expected.values()) + MAX_INDEX_BYTES
        extract_zip(path, root, max_member_bytes=total, max_total_bytes=total)
        for member, entry in sorted(expected.items()):
            blob = root / member
            if not blob.is_file():
                raise IntegrityError(f"{path}: {member} ({entry.path}) is missing")
            if blob.stat().st_size != entry.size or sha256_file(blob) != entry.sha256:
                raise IntegrityError(
                    f"{path}: {member} ({entry.path}) does not match its pin {entry.sha256}",
                    hint="the bundle is corrupt or was tampered with; nothing was imported",
                )
            if entry.role in cache.GATED_ROLES:
                check_zip(blob)  # here too, so that no build enters the cache before all pass
        source = _Extracted(root)
        for build in builds:
            cache.fetch(build, "all", source, repo="", revision=build.revision, root=cache_root)
    if added:
        with reg.lock(registry.path):
            fresh = reg.load(registry.path).raw
            for build in added:
                entries = fresh["variants"][build.variant]["builds"]
                if all(e["revision"] != build.revision for e in entries):
                    entries.append(build.raw)
            reg.save(fresh, registry.path)
    return {
        "imported": [b.short_ref for b in builds],
        "added_to_registry": [b.short_ref for b in added],
    }
