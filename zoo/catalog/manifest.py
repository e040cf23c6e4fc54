"""``manifest.json``: what a build directory holds, and the check that it holds exactly that.

A build directory (as ``zoo build`` writes it) has its files at the top level and
``manifest.json`` listing each of them with role, size and sha256; ``report.json``
(wall times, host) and sub-folders (``work/``: checkpoints and logs) are not part of the build.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from zoo.catalog.registry import FILE_OF_ROLE, FileEntry, validate
from zoo.errors import BuildError, IntegrityError
from zoo.store.atomic import write_atomic
from zoo.store.hashing import sha256_file

MANIFEST = FILE_OF_ROLE["manifest"]
_ROLE_OF_FILE = {name: role for role, name in FILE_OF_ROLE.items()}
#: The build's files that the manifest lists, with their roles.
ROLE_OF = {name: role for name, role in _ROLE_OF_FILE.items() if name != MANIFEST}
#: Written beside the build but not part of it: wall times and host (not reproducible).
REPORT = "report.json"


def dumps(document: dict[str, Any]) -> str:
    """Canonical JSON: sorted keys, 2-space indent, final newline (same input, same bytes)."""
    return json.dumps(document, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def entry_for(path: Path, role: str | None = None) -> FileEntry:
    """A pinned entry for a file on disk."""
    return FileEntry(
        path=path.name,
        role=role or _ROLE_OF_FILE[path.name],
        size=path.stat().st_size,
        sha256=sha256_file(path),
    )


def write(build_dir: Path, document: dict[str, Any]) -> Path:
    """Add the file listing of ``build_dir`` to ``document`` and write ``manifest.json``."""
    files = [
        entry_for(build_dir / name) for name in sorted(ROLE_OF) if (build_dir / name).is_file()
    ]
    document = dict(document, files=[e.__dict__ for e in files])
    problems = validate(document, "manifest")
    if problems:
        raise BuildError("manifest fails its schema:\n  " + "\n  ".join(problems))
    path = build_dir / MANIFEST
    write_atomic(path, dumps(document))
    return path


def read(build_dir: Path) -> dict[str, Any]:
    """Load and validate ``manifest.json`` of a build directory."""
    path = Path(build_dir) / MANIFEST
    if not path.is_file():
        raise BuildError(
            f"{build_dir} has no {MANIFEST}", hint="give the directory that `zoo build` wrote"
        )
    document = _json_object(path)
    problems = validate(document, "manifest")
    if problems:
        raise BuildError(f"{path} fails its schema:\n  " + "\n  ".join(problems))
    return document


def read_report(build_dir: Path) -> dict[str, Any]:
    """``report.json`` of a build directory (what the build measured and timed), or ``{}``."""
    path = Path(build_dir) / REPORT
    return _json_object(path) if path.is_file() else {}


def _json_object(path: Path) -> dict[str, Any]:
    try:
        document = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        document = None
    if not isinstance(document, dict):
        raise BuildError(
            f"{path} is not a JSON object (torn or foreign)",
            hint="a build interrupted while writing it: rebuild it with `zoo build VARIANT "
            "--out DIR --resume`",
        )
    return document


def check(build_dir: Path) -> tuple[dict[str, Any], list[tuple[Path, FileEntry]]]:
    """The manifest and every file of the build (manifest included), verified against it.

    Raises when a listed file is missing or differs, or a file at the top level is not listed.
    """
    build_dir = Path(build_dir)
    document = read(build_dir)
    listed = {f["path"]: FileEntry(**f) for f in document["files"]}
    problems = []
    for name, entry in sorted(listed.items()):
        path = build_dir / name
        if not path.is_file():
            problems.append(f"{name}: listed but missing")
            continue
        actual = entry_for(path, entry.role)
        if (actual.size, actual.sha256) != (entry.size, entry.sha256):
            problems.append(f"{name}: manifest says {entry.sha256}, file is {actual.sha256}")
    extra = sorted(
        p.name
        for p in build_dir.iterdir()
        if p.is_file() and p.name not in {*listed, MANIFEST, REPORT}
    )
    problems += [f"{name}: present but not in the manifest" for name in extra]
    if problems:
        raise IntegrityError(
            f"{build_dir} does not match its manifest:\n  " + "\n  ".join(problems),
            hint="rebuild it with `zoo build`; never edit a build directory by hand",
        )
    files = [(build_dir / n, e) for n, e in sorted(listed.items())]
    files.append((build_dir / MANIFEST, entry_for(build_dir / MANIFEST, "manifest")))
    return document, files
