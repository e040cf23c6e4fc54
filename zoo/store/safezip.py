"""Safe, atomic extraction of zip archives downloaded from a hub.

`extract_zip` checks the whole central directory before writing anything, then streams each
member into a fresh temporary directory beside the destination and renames that directory into
place, so the destination either holds the complete archive or does not exist.

Rejected (`UnsafeArchiveError`, naming the archive and the member):

* names that are absolute (``/x``), carry a drive letter (``C:x``), contain a ``..`` component,
  a backslash, a NUL byte, or are empty once ``.`` components are removed;
* members whose mode says symlink, or any other non-regular, non-directory file type; members
  that are encrypted or compressed with anything but stored or deflate;
* duplicate names, compared after normalisation and case-folding (``a/b`` and ``A/./b``
  collide on case-insensitive file systems), and a member that is both a file and the parent
  directory of another member;
* more than ``max_members`` entries, a member whose declared size exceeds ``max_member_bytes``,
  declared sizes summing past ``max_total_bytes``, a member over 1 MiB that declares more than
  ``max_ratio`` times its compressed size (a zip bomb within the size limits);
* a member that yields more bytes than its header declares, or more than the limits, while it
  is streamed (a lying header), and data that fails its CRC or does not decompress.

Extracted files get the default mode (no execute, setuid or sticky bits from the archive).
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import tempfile
import zipfile
import zlib
from pathlib import Path, PurePosixPath

from zoo.errors import UnsafeArchiveError, ZooError

DEFAULT_MAX_MEMBER_BYTES = 2 * 1024**3
DEFAULT_MAX_TOTAL_BYTES = 8 * 1024**3
DEFAULT_MAX_MEMBERS = 10_000
COMPRESSIONS = (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED)  # what zoo and concrete-ml write
#: What zipfile raises while it reads a damaged member (bad CRC or stream, short data, a
#: feature it does not implement).
READ_ERRORS = (zipfile.BadZipFile, zlib.error, EOFError, ValueError, NotImplementedError)
RATIO_FLOOR_BYTES = 1024**2  # smaller members are never refused for their compression ratio
_CHUNK_BYTES = 1024 * 1024
_DRIVE_RE = re.compile(r"^[A-Za-z]:")
_HINT = (
    "Do not use this archive: delete it (and its cache entry) and download it again from a "
    "trusted source; if it still fails, report it to the model's publisher."
)


def _unsafe(zip_path: Path, member: str | None, problem: str) -> UnsafeArchiveError:
    """Build the error for ``member`` of ``zip_path``."""
    where = f"member {member!r} of {zip_path}" if member is not None else f"{zip_path}"
    return UnsafeArchiveError(f"unsafe archive: {where}: {problem}", hint=_HINT)


def _safe_parts(zip_path: Path, name: str) -> tuple[str, ...]:
    """Return the path components of member ``name``, or raise if the name is unsafe."""
    if "\x00" in name:
        raise _unsafe(zip_path, name, "its name contains a NUL byte")
    if "\\" in name:
        raise _unsafe(zip_path, name, "its name contains a backslash")
    if name.startswith("/"):
        raise _unsafe(zip_path, name, "its name is an absolute path")
    if _DRIVE_RE.match(name):
        raise _unsafe(zip_path, name, "its name starts with a drive letter")
    raw_parts = name.split("/")
    if ".." in raw_parts:
        raise _unsafe(zip_path, name, "its name contains a '..' component")
    parts = tuple(part for part in raw_parts if part not in ("", "."))
    if not parts:
        raise _unsafe(zip_path, name, "its name is empty")
    if any(":" in part for part in parts):
        raise _unsafe(zip_path, name, "its name contains ':' (drive or stream syntax)")
    return parts


def _is_dir(info: zipfile.ZipInfo) -> bool:
    """Whether the entry is a directory (trailing slash, or a directory mode)."""
    return info.filename.endswith("/") or stat.S_ISDIR(info.external_attr >> 16)


def check_member(zip_path: Path, info: zipfile.ZipInfo) -> None:
    """Reject a member that is encrypted, patched, oddly compressed or placed, or a symlink or
    other special file (by the Unix mode in the external attributes)."""
    mode = info.external_attr >> 16
    if info.flag_bits & 0x61:  # encrypted, compressed patched data, strongly encrypted
        raise _unsafe(zip_path, info.filename, f"it is encrypted or patched ({info.flag_bits:#x})")
    if info.header_offset < 0:
        raise _unsafe(zip_path, info.filename, "its header lies before the archive")
    if stat.S_ISLNK(mode):
        raise _unsafe(zip_path, info.filename, "it is a symbolic link")
    if info.compress_type not in COMPRESSIONS:
        raise _unsafe(zip_path, info.filename, f"it uses compression method {info.compress_type}")
    kind = stat.S_IFMT(mode)
    if kind not in (0, stat.S_IFREG, stat.S_IFDIR):
        raise _unsafe(zip_path, info.filename, f"it is a special file (mode {oct(mode)})")


def _check_sizes(
    zip_path: Path,
    infos: list[zipfile.ZipInfo],
    max_member_bytes: int,
    max_total_bytes: int,
    max_ratio: float | None = None,
) -> None:
    """Reject members or archives whose declared sizes exceed the limits (streaming then holds
    each member to its declared size)."""
    total = 0
    for info in infos:
        if info.file_size > max_member_bytes:
            raise _unsafe(
                zip_path,
                info.filename,
                f"it declares {info.file_size} bytes, over the {max_member_bytes}-byte limit",
            )
        ratio = info.file_size / max(info.compress_size, 1)
        if max_ratio is not None and info.file_size > RATIO_FLOOR_BYTES and ratio > max_ratio:
            raise _unsafe(
                zip_path,
                info.filename,
                f"it expands {ratio:.0f}-fold ({info.compress_size} to {info.file_size} bytes), "
                f"over the {max_ratio:.0f}-fold limit",
            )
        total += info.file_size
        if total > max_total_bytes:
            raise _unsafe(
                zip_path,
                info.filename,
                f"the archive declares over {max_total_bytes} bytes in total",
            )


def _plan(
    zip_path: Path, infos: list[zipfile.ZipInfo], max_members: int
) -> list[tuple[zipfile.ZipInfo, PurePosixPath]]:
    """Validate names and types of every entry; return (entry, relative path) pairs."""
    if len(infos) > max_members:
        raise _unsafe(zip_path, None, f"it has {len(infos)} entries, over {max_members}")
    seen: dict[str, str] = {}
    files: set[str] = set()
    plan = []
    for info in infos:
        check_member(zip_path, info)
        parts = _safe_parts(zip_path, info.filename)
        key = "/".join(parts).casefold()
        if key in seen:
            raise _unsafe(zip_path, info.filename, f"it duplicates member {seen[key]!r}")
        seen[key] = info.filename
        if not _is_dir(info):
            files.add(key)
        plan.append((info, PurePosixPath(*parts)))
    for info, rel in plan:
        for parent in list(rel.parents)[:-1]:
            if str(parent).casefold() in files:
                raise _unsafe(zip_path, info.filename, f"its parent {str(parent)!r} is a file")
    return plan


def _stream_member(
    zip_path: Path,
    archive: zipfile.ZipFile,
    info: zipfile.ZipInfo,
    target: Path,
    budget: int,
) -> int:
    """Copy one member to ``target`` (created exclusively); return the bytes written."""
    limit = min(info.file_size, budget)
    written = 0
    target.parent.mkdir(parents=True, exist_ok=True)
    with archive.open(info) as source, open(target, "xb") as sink:
        while chunk := source.read(_CHUNK_BYTES):
            written += len(chunk)
            if written > limit:
                raise _unsafe(
                    zip_path,
                    info.filename,
                    f"it yields more than {limit} bytes (its header declares "
                    f"{info.file_size}); the header lies or the limit is reached",
                )
            sink.write(chunk)
    if written != info.file_size:
        raise _unsafe(
            zip_path,
            info.filename,
            f"it yields {written} bytes, its header declares {info.file_size}",
        )
    return written


def _extract_into(
    zip_path: Path,
    archive: zipfile.ZipFile,
    plan: list[tuple[zipfile.ZipInfo, PurePosixPath]],
    root: Path,
    limits: tuple[int, int],
) -> list[PurePosixPath]:
    """Extract every planned entry under ``root``; return the relative paths of the files."""
    max_member_bytes, max_total_bytes = limits
    total = 0
    files = []
    for info, rel in plan:
        target = root.joinpath(*rel.parts)
        if _is_dir(info):
            target.mkdir(parents=True, exist_ok=True)
            continue
        budget = min(max_member_bytes, max_total_bytes - total)
        try:
            total += _stream_member(zip_path, archive, info, target, budget)
        except READ_ERRORS as exc:
            raise _unsafe(zip_path, info.filename, f"its data is corrupt ({exc})") from exc
        files.append(rel)
    return files


def _dest_error(zip_path: Path, dest: Path, problem: str) -> ZooError:
    """Build the error for a destination that cannot receive the archive."""
    return ZooError(
        f"cannot extract {zip_path}: destination {dest} {problem}",
        hint="Remove the destination (or pick another one) and try again; if several processes "
        "extract to the same place, serialise them with a lock.",
    )


def _prepare_dest(zip_path: Path, dest: Path) -> None:
    """Make sure ``dest`` can be replaced by a rename: absent, or an empty directory."""
    if dest.is_symlink() or (dest.exists() and not dest.is_dir()):
        raise _dest_error(zip_path, dest, "exists and is not a directory")
    if dest.is_dir() and any(dest.iterdir()):
        raise _dest_error(zip_path, dest, "already exists and is not empty")
    dest.parent.mkdir(parents=True, exist_ok=True)


def extract_zip(
    zip_path: Path,
    dest: Path,
    *,
    max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES,
    max_total_bytes: int = DEFAULT_MAX_TOTAL_BYTES,
    max_members: int = DEFAULT_MAX_MEMBERS,
    max_ratio: float | None = None,
) -> list[Path]:
    """Extract ``zip_path`` into ``dest`` safely and atomically.

    Args:
        zip_path: the archive.
        dest: the directory to create; it must not exist or be an empty directory. Callers that
            may race on the same ``dest`` should hold a lock (a lost race raises).
        max_member_bytes: largest size allowed for one member.
        max_total_bytes: largest total size allowed for the archive's members.
        max_members: largest number of entries allowed.
        max_ratio: largest expansion (declared over compressed size) of a member over 1 MiB.

    Returns:
        The extracted files (not directories) under ``dest``, sorted.

    Raises:
        UnsafeArchiveError: the archive is unsafe, corrupt or over the limits; nothing is left
            in ``dest`` then.
        ZooError: ``dest`` exists and is not an empty directory (or appeared meanwhile).
    """
    zip_path, dest = Path(zip_path), Path(dest)
    _prepare_dest(zip_path, dest)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    try:
        try:
            with zipfile.ZipFile(zip_path) as archive:
                infos = archive.infolist()
                plan = _plan(zip_path, infos, max_members)
                _check_sizes(zip_path, infos, max_member_bytes, max_total_bytes, max_ratio)
                files = _extract_into(
                    zip_path, archive, plan, tmp, (max_member_bytes, max_total_bytes)
                )
        except (zipfile.BadZipFile, ValueError, NotImplementedError) as exc:  # a name not UTF-8,
            # or a zip version zipfile does not read
            raise _unsafe(zip_path, None, f"it is not a valid zip archive ({exc})") from exc
        os.chmod(tmp, 0o755)
        try:
            os.rename(tmp, dest)
        except OSError as exc:
            raise _dest_error(zip_path, dest, f"could not be created ({exc})") from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return sorted(dest.joinpath(*rel.parts) for rel in files)
