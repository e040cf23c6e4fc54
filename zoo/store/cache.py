"""The local cache of pulled builds, and ``pull``: decide, download to a temp file, verify, rename.

Layout under ``$ZOO_HOME/cache``::

    builds/VARIANT/REVISION/<files>   every file here was verified before it was renamed in
    locks/VARIANT@REVISION.lock       one file lock per build: concurrent pulls take turns
    tmp/VARIANT@REVISION-<uuid>/      staging of an ongoing pull (removed after, or by the next)

A file appears under ``builds/`` only by ``os.replace`` after its size and sha256 matched the
registry's pin, so an interrupted pull (even ``kill -9``) never leaves a file that a later pull
takes as complete. A warm pull checks presence and size only and touches no network.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from zoo import config
from zoo.catalog import versions
from zoo.catalog.registry import Build, FileEntry, Registry
from zoo.errors import IntegrityError, OfflineError, ZooError
from zoo.store.atomic import replace_synced
from zoo.store.gate import check_zip
from zoo.store.hashing import sha256_file

log = logging.getLogger(__name__)
LOCK_TIMEOUT_S = 3600
#: Files that concrete deserializes: they pass :func:`~zoo.store.gate.check_zip` before kept.
GATED_ROLES = ("client", "server")


def build_path(build: Build, root: Path | None = None) -> Path:
    """Folder of a build in the cache."""
    return (root or config.cache_dir()) / "builds" / build.variant / build.revision


def missing_files(build: Build, role: str, root: Path | None = None) -> list[FileEntry]:
    """The files ``role`` needs that are not in the cache (absent or of the wrong size)."""
    folder = build_path(build, root)
    missing = []
    for entry in build.files_for(role):
        path = folder / entry.path
        try:
            if path.stat().st_size == entry.size:
                continue
        except FileNotFoundError:
            pass
        missing.append(entry)
    return missing


@dataclass
class PullResult:
    """What a pull did."""

    build: Build
    path: Path
    role: str
    downloaded: list[str] = field(default_factory=list)
    downloaded_bytes: int = 0
    source: str = "cache"  # where missing files came from: "cache", a hub kind, or "rebuild"

    @property
    def files(self) -> dict[str, Path]:
        """Path of each file of the role, by role (``head``, ``client``, …)."""
        return {e.role: self.path / e.path for e in self.build.files_for(self.role)}


def verify_into(staged: Path, entry: FileEntry, final: Path) -> None:
    """Move ``staged`` to ``final`` if its size and sha256 match ``entry`` and, for a zip that
    concrete deserializes, it passes the gate; else delete it and raise."""
    size = staged.stat().st_size
    if size != entry.size:
        staged.unlink(missing_ok=True)
        raise IntegrityError(
            f"{entry.path}: expected {entry.size} bytes, got {size} (truncated or wrong file)",
            hint="pull again; if it persists the hub holds other bytes than the registry pins",
        )
    digest = sha256_file(staged)
    if digest != entry.sha256:
        staged.unlink(missing_ok=True)
        raise IntegrityError(
            f"{entry.path}: hash mismatch: expected {entry.sha256}, got {digest}",
            hint="the bad download was deleted; pull again, and if it persists the hub holds "
            "other bytes than the registry pins",
        )
    if entry.role in GATED_ROLES:
        try:
            check_zip(staged)
        except ZooError:
            staged.unlink(missing_ok=True)
            raise
    final.parent.mkdir(parents=True, exist_ok=True)
    replace_synced(staged, final)  # a power loss leaves no right-sized file of zeros


def fetch(
    build: Build,
    role: str,
    hub,  # noqa: ANN001 - zoo.store.hub.Hub
    *,
    repo: str,
    revision: str,
    root: Path | None = None,
    progress: bool = True,
) -> PullResult:
    """Download what ``role`` needs of ``build`` from ``hub`` (which holds it as ``repo`` at
    ``revision``) into the cache, verified."""
    root = root or config.cache_dir()
    result = PullResult(build, build_path(build, root), role, source=hub.kind)
    if not missing_files(build, role, root):
        return result
    with staging(build, root) as folder:
        missing = missing_files(build, role, root)  # another process may have pulled meanwhile
        if not missing:
            return result
        staged = hub.download(repo, revision, missing, folder, progress)
        for entry in missing:
            verify_into(staged[entry.path], entry, result.path / entry.path)
            result.downloaded.append(entry.path)
            result.downloaded_bytes += entry.size
    return result


@contextmanager
def staging(build: Build, root: Path) -> Iterator[Path]:
    """Hold ``build``'s lock and a fresh staging folder in ``tmp/`` (what a killed pull left
    there is removed first); the folder goes when the block ends, however it ends."""
    from filelock import FileLock, Timeout

    (root / "locks").mkdir(parents=True, exist_ok=True)
    (root / "tmp").mkdir(parents=True, exist_ok=True)
    lock = FileLock(root / "locks" / f"{build.ref}.lock", timeout=LOCK_TIMEOUT_S)
    try:
        try:
            held = lock.acquire(timeout=0)
        except Timeout:  # say why nothing happens for a while
            log.info("%s: waiting for another pull or rebuild of it to finish", build.short_ref)
            held = lock.acquire()
    except Timeout:
        raise ZooError(
            f"{build.short_ref}: another pull or rebuild has held {lock.lock_file} for over "
            f"{LOCK_TIMEOUT_S // 60} minutes",
            hint="let it finish, or stop it (`fuser` on the lock file names it) and run again",
        ) from None
    with held:  # released when the block ends
        for stale in (root / "tmp").glob(f"{build.ref}-*"):
            shutil.rmtree(stale, ignore_errors=True)
        folder = Path(tempfile.mkdtemp(prefix=f"{build.ref}-", dir=root / "tmp"))
        try:
            yield folder
        finally:
            shutil.rmtree(folder, ignore_errors=True)


def require_cached(build: Build, role: str, root: Path | None = None) -> PullResult:
    """Offline: the cached build, or an OfflineError that lists what is missing."""
    missing = missing_files(build, role, root)
    if missing:
        names = ", ".join(e.path for e in missing)
        raise OfflineError(
            f"offline, and the cache lacks {len(missing)} file(s) of {build.short_ref} "
            f"for role {role}: {names}",
            hint=f"pull it once with the network: `zoo pull {build.short_ref} --role {role}`",
        )
    return PullResult(build, build_path(build, root), role)


@dataclass
class CachedBuild:
    """A build folder found in the cache."""

    variant: str
    revision: str
    path: Path
    files: list[str]
    size: int
    status: str  # "ok", "runtime-mismatch", "yanked", "orphan"


def scan(registry: Registry, root: Path | None = None) -> list[CachedBuild]:
    """Every build folder in the cache, with whether this runtime can load it."""
    root = root or config.cache_dir()
    have = versions.installed()
    pinned = {(v.name, b.revision): b for v in registry.variants.values() for b in v.builds}
    found = []
    for folder in sorted((root / "builds").glob("*/*")):
        if not folder.is_dir():
            continue
        files = sorted(p.name for p in folder.iterdir() if p.is_file())
        build = pinned.get((folder.parent.name, folder.name))
        if build is None:
            status = "orphan"
        elif build.yanked:
            status = "yanked"
        elif versions.mismatches(build.runtime, have):
            status = "runtime-mismatch"
        else:
            status = "ok"
        found.append(
            CachedBuild(
                variant=folder.parent.name,
                revision=folder.name,
                path=folder,
                files=files,
                size=sum((folder / f).stat().st_size for f in files),
                status=status,
            )
        )
    return found


def remove(entries: list[CachedBuild]) -> int:
    """Delete cached build folders; return bytes freed."""
    freed = 0
    for entry in entries:
        shutil.rmtree(entry.path, ignore_errors=True)
        if not entry.path.exists():  # a read-only cache keeps it: nothing was freed
            freed += entry.size
        with contextlib.suppress(OSError):  # not empty (a pull of another revision), or kept
            entry.path.parent.rmdir()
    return freed


def clean_tmp(root: Path | None = None) -> int:
    """Remove staging folders that no pull holds (their build's lock is free); return count."""
    from filelock import FileLock, Timeout

    root = root or config.cache_dir()
    removed = 0
    for stale in sorted((root / "tmp").glob("*")):
        ref = stale.name.rsplit("-", 1)[0]
        try:
            with FileLock(root / "locks" / f"{ref}.lock", timeout=0):
                shutil.rmtree(stale, ignore_errors=True)
                removed += 1
        except Timeout:
            continue
    return removed


def _intact(path: Path, entry: FileEntry) -> bool:
    """Whether ``path`` still holds the pinned bytes of ``entry`` (size, then sha256); False
    when it is gone (a concurrent ``zoo cache rm`` or ``verify``)."""
    try:
        return path.stat().st_size == entry.size and sha256_file(path) == entry.sha256
    except FileNotFoundError:
        return False


def _discard(path: Path) -> str:
    """Remove a cached file found bad; say "removed", or why it is not (a read-only cache):
    the corruption is the news either way, not the permission."""
    try:
        path.unlink(missing_ok=True)
    except OSError as exc:
        return f"not removable: {exc.strerror}"
    return "removed"


def check_hashes(build: Build, role: str, root: Path | None = None) -> None:
    """Rehash the cached files ``role`` needs before they are used (they are small: pooch
    rehashes on every fetch too); a file changed since its pull is removed and named."""
    folder = build_path(build, root)
    for entry in build.files_for(role):
        path = folder / entry.path
        if not _intact(path, entry):
            what = (f"changed since it was pulled and verified (it is not {entry.sha256}): "
                    f"{_discard(path)}" if path.exists() else "is gone since it was pulled (a "
                    "`zoo cache rm` or `zoo verify` meanwhile?)")  # fmt: skip
            raise IntegrityError(
                f"{path} {what}",
                hint=f"pull it again: `zoo pull {build.short_ref} --role {role}`; if the cache "
                "is shared, find who writes to it",
            )


def verify(build: Build, root: Path | None = None) -> dict[str, str]:
    """Rehash every cached file of ``build`` and pass its zips through the gate: path → "ok",
    "not cached", "corrupt (removed)" or "unsafe (removed): why" ("not removable: why" for
    "removed" in a cache this user cannot write)."""
    folder = build_path(build, root)
    report = {}
    for entry in build.files:
        path = folder / entry.path
        if not path.is_file():
            report[entry.path] = "not cached"
        elif not _intact(path, entry):
            report[entry.path] = f"corrupt ({_discard(path)})"
        else:
            report[entry.path] = "ok"
            if entry.role in GATED_ROLES:
                try:
                    check_zip(path)
                except ZooError as exc:
                    report[entry.path] = f"unsafe ({_discard(path)}): {exc}"
    return report
