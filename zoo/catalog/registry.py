"""The catalogue: ``registry.json`` loaded into typed records, validated, and resolved.

Knows no network. Every load is validated against ``zoo/catalog/schema/registry.schema.json``; an
invalid file raises one :class:`RegistryError` naming the JSON path of every bad field.
Writes (by ``zoo publish``) go through :func:`save`, which validates first and replaces the file
atomically, so a failed write leaves the old file as it was.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from zoo import config
from zoo.catalog import versions
from zoo.errors import (
    InputError,
    NotFoundError,
    RegistryError,
    RuntimeMismatchError,
    YankedError,
)
from zoo.store.atomic import write_atomic

SCHEMA_PATH = Path(__file__).parent / "schema" / "registry.schema.json"
#: The fewest hex digits of a revision that name a build (``VARIANT@REV``).
MIN_REVISION_PREFIX = 7
#: The one file of each role: the loaders open these names.
FILE_OF_ROLE = {
    "head": "head.safetensors",
    "weights": "weights.safetensors",
    "client": "client.zip",
    "server": "server.zip",
    "card": "README.md",
    "manifest": "manifest.json",
}
ROLES_FOR = {
    "client": ("head", "client", "manifest"),
    "server": ("server", "manifest"),
}


@dataclass(frozen=True)
class FileEntry:
    """One pinned file of a build."""

    path: str
    role: str
    size: int
    sha256: str


@dataclass(frozen=True)
class HubRef:
    """A hub that holds a build, and the hub's own revision of it."""

    kind: str  # "local" or "hf"
    repo: str
    revision: str


@dataclass(frozen=True)
class Build:
    """One published build of a variant, named by its content revision (immutable)."""

    variant: str
    revision: str
    hubs: tuple[HubRef, ...]
    profile: str
    files: tuple[FileEntry, ...]
    runtime: dict[str, str]
    metrics: dict[str, Any]
    circuit: dict[str, Any]
    yanked: str | None = None  # why the build is withdrawn
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def ref(self) -> str:
        """``VARIANT@REVISION``, the build's full name."""
        return f"{self.variant}@{self.revision}"

    @property
    def short_ref(self) -> str:
        """``VARIANT@REV12``, for messages."""
        return f"{self.variant}@{self.revision[:12]}"

    def files_for(self, role: str) -> tuple[FileEntry, ...]:
        """The files that ``role`` (client, server or all) needs."""
        if role == "all":
            return self.files
        if role not in ROLES_FOR:
            raise InputError(f"unknown role {role!r}", hint="use client, server or all")
        return tuple(f for f in self.files if f.role in ROLES_FOR[role])

    def file(self, role: str) -> FileEntry:
        """The (single) file with ``role``."""
        for entry in self.files:
            if entry.role == role:
                return entry
        raise NotFoundError(f"build {self.ref} has no {role} file")

    @property
    def download_bytes(self) -> int:
        """Bytes of all files of the build."""
        return sum(f.size for f in self.files)


@dataclass(frozen=True)
class Variant:
    """A catalogue entry: what the variant is, how to build it, its published builds."""

    name: str
    family: str
    summary: str
    dataset: str
    num_classes: int
    recipe: dict[str, Any]
    reference: dict[str, Any]
    builds: tuple[Build, ...]
    raw: dict[str, Any] = field(repr=False, compare=False)

    @property
    def live(self) -> tuple[Build, ...]:
        """The builds that are not yanked, oldest first."""
        return tuple(b for b in self.builds if not b.yanked)


@dataclass(frozen=True)
class Registry:
    """All variants of a registry file."""

    path: Path
    variants: dict[str, Variant]
    raw: dict[str, Any] = field(repr=False, compare=False)

    def variant(self, name: str) -> Variant:
        """The variant called ``name``, or a NotFoundError that suggests close names."""
        if name in self.variants:
            return self.variants[name]
        close = difflib.get_close_matches(name, self.variants, n=3)
        hint = (
            f"did you mean {', '.join(close)}?" if close else "run `zoo list` to see all variants"
        )
        raise NotFoundError(f"no variant {name!r} in {self.path}", hint=hint)


@lru_cache(maxsize=1)
def _schema() -> dict[str, Any]:
    return json.loads(SCHEMA_PATH.read_text())


def validate(document: Any, definition: str | None = None) -> list[str]:
    """Every schema violation of ``document`` as "JSON-path: message" (empty when valid).

    ``definition`` names a ``$defs`` entry (e.g. ``"manifest"``) to validate against instead of
    the whole registry.
    """
    from jsonschema import Draft202012Validator, ValidationError, validators  # ~40 ms

    search_pattern = Draft202012Validator.VALIDATORS["pattern"]

    def pattern(validator: Any, regex: str, instance: Any, schema: dict[str, Any]) -> Any:
        # Python's ``$`` also matches before a final line break (ECMA-262's does not), so
        # "server.zip\n" would pass "^[a-z.]+$" and fail later, as a name no file has.
        if validator.is_type(instance, "string") and "\n" in instance:
            yield ValidationError(f"{instance!r} contains a line break")
        else:
            yield from search_pattern(validator, regex, instance, schema)

    schema = _schema()
    if definition is not None:
        schema = {"$defs": schema["$defs"], "$ref": f"#/$defs/{definition}"}
    validator = validators.extend(Draft202012Validator, {"pattern": pattern})(schema)
    errors = sorted(validator.iter_errors(document), key=lambda e: list(map(str, e.absolute_path)))
    return [f"{e.json_path}: {e.message}" for e in errors]


def parse_build(variant: str, raw: dict[str, Any]) -> Build:
    """A build entry (already validated) as a record."""
    return Build(
        variant=variant,
        revision=raw["revision"],
        hubs=tuple(HubRef(**h) for h in raw["hubs"]),
        profile=raw["profile"],
        files=tuple(FileEntry(**f) for f in raw["files"]),
        runtime=dict(raw["runtime"]),
        metrics=dict(raw["metrics"]),
        circuit=dict(raw["circuit"]),
        yanked=raw.get("yanked"),
        raw=raw,
    )


def parse(document: dict[str, Any], path: Path) -> Registry:
    """Validate a registry document and turn it into records."""
    problems = validate(document)
    if problems:
        listing = "\n  ".join(problems)
        raise RegistryError(
            f"{path} fails its schema ({len(problems)} problem(s)):\n  {listing}",
            hint="fix the fields above, or restore the file with `git checkout registry.json`",
        )
    beyond = []  # what the schema cannot say
    for name, variant in document["variants"].items():
        seen = set()
        for i, build in enumerate(variant["builds"]):
            where = f"$.variants.{name}.builds[{i}]"
            paths = [f["path"] for f in build["files"]]
            beyond += [f"{where}: file {p!r} is listed twice" for p in sorted(set(paths))
                       if paths.count(p) > 1]  # fmt: skip
            beyond += [f"{where}: file {f['path']!r} has role {f['role']!r}, whose file is "
                       f"{FILE_OF_ROLE[f['role']]!r}" for f in build["files"]
                       if FILE_OF_ROLE[f["role"]] != f["path"]]  # fmt: skip
            if build["revision"] in seen:
                beyond.append(f"{where}: revision {build['revision'][:12]} is listed twice")
            seen.add(build["revision"])
    if beyond:
        raise RegistryError(
            f"{path} fails its schema:\n  " + "\n  ".join(beyond),
            hint="restore the file with `git checkout registry.json`; entries are written by "
            "`zoo publish`, not by hand",
        )
    variants = {}
    for name, raw in sorted(document["variants"].items()):
        variants[name] = Variant(
            name=name,
            family=raw["family"],
            summary=raw["summary"],
            dataset=raw["dataset"],
            num_classes=raw["num_classes"],
            recipe=raw["recipe"],
            reference=raw["reference"],
            builds=tuple(parse_build(name, b) for b in raw["builds"]),
            raw=raw,
        )
    return Registry(path=path, variants=variants, raw=document)


def load(path: Path | None = None) -> Registry:
    """Load and validate the registry (default: :func:`zoo.config.registry_path`)."""
    path = Path(path) if path is not None else config.registry_path()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RegistryError(
            f"registry file {path} does not exist",
            hint="pass --registry PATH or set ZOO_REGISTRY",
        ) from None
    except IsADirectoryError:
        raise RegistryError(
            f"{path} is a directory, not a registry file", hint="pass the registry.json in it"
        ) from None
    except UnicodeDecodeError as exc:
        raise RegistryError(
            f"{path} is not UTF-8 text (byte {exc.start})",
            hint="restore it with `git checkout registry.json`",
        ) from None
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        raise RegistryError(
            f"{path} is not valid JSON: line {exc.lineno} column {exc.colno}: {exc.msg}",
            hint="restore it with `git checkout registry.json`",
        ) from None
    except RecursionError:
        raise RegistryError(
            f"{path} nests too deeply to be a registry",
            hint="restore it with `git checkout registry.json`",
        ) from None
    return parse(document, path)


def dumps(document: dict[str, Any]) -> str:
    """The canonical text of a registry document (sorted keys, 2-space indent, final newline)."""
    return json.dumps(document, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def lock(path: Path) -> Any:
    """The file lock around a read-modify-:func:`save` of the registry at ``path``, named by the
    file it resolves to (as ``save`` writes it), so that two spellings of one file share it."""
    from filelock import FileLock

    return FileLock(f"{Path(path).resolve()}.lock")


def save(document: dict[str, Any], path: Path) -> Registry:
    """Validate ``document`` and write it to ``path`` atomically; return the parsed registry.
    A link is followed: the file it names is replaced, not the link."""
    path = Path(path).resolve()
    registry = parse(document, path)
    write_atomic(path, dumps(document))
    return registry


def split_ref(ref: str) -> tuple[str, str | None]:
    """``"VARIANT@REV"`` → ``("VARIANT", "REV")``; ``"VARIANT"`` → ``("VARIANT", None)``."""
    name, sep, revision = ref.partition("@")
    if not name or (sep and not revision) or "@" in revision:
        raise InputError(
            f"cannot parse {ref!r}", hint="name a build as VARIANT or VARIANT@REVISION"
        )
    if revision and not all(c in "0123456789abcdef" for c in revision):
        raise InputError(
            f"revision {revision!r} is not hexadecimal",
            hint="use the revision shown by `zoo info VARIANT` (a prefix of 7+ characters works)",
        )
    return name, revision or None


def resolve(
    registry: Registry,
    ref: str,
    runtime: dict[str, str] | None = None,
    check_runtime: bool = True,
    allow_yanked: bool = False,
) -> Build:
    """The build that ``ref`` names and this runtime can load.

    ``VARIANT@REV`` selects by revision (a unique prefix of 7+ hex digits is enough);
    ``VARIANT`` selects the newest build whose concrete-ml / concrete-python / Python versions
    match the installed ones, as pip picks a wheel by its tags. Yanked builds are never
    selected, and naming one by revision raises :class:`YankedError` with its reason
    (``allow_yanked`` lets maintenance commands such as ``zoo build --check`` through).
    """
    name, revision = split_ref(ref)
    variant = registry.variant(name)
    if not variant.builds:
        raise NotFoundError(
            f"variant {name} has no published build",
            hint=f"build one with `zoo build {name}`, then `zoo publish` it",
        )
    runtime = versions.installed() if runtime is None else runtime
    if revision is not None:
        if len(revision) < MIN_REVISION_PREFIX:
            raise NotFoundError(f"revision prefix {revision!r} is too short", hint="give 7+ digits")
        hits = [b for b in variant.builds if b.revision.startswith(revision)]
        if not hits:
            known = ", ".join(b.revision[:12] for b in variant.builds)
            raise NotFoundError(f"{name} has no build {revision}", hint=f"known builds: {known}")
        if len(hits) > 1:
            raise NotFoundError(f"revision prefix {revision} is ambiguous", hint="give more digits")
        build = hits[0]
        if build.yanked and not allow_yanked:
            raise YankedError(
                f"{build.short_ref} is yanked: {build.yanked}",
                hint=f"pull `{name}` for its current build, or rebuild this recipe with "
                f"`zoo build {name} --profile {build.profile}`",
            )
        problems = versions.mismatches(build.runtime, runtime)
        if check_runtime and problems:
            raise RuntimeMismatchError(
                f"{build.short_ref} was built for another runtime: {'; '.join(problems)}",
                hint=versions.install_hint(build.runtime),
            )
        return build
    live = variant.builds if allow_yanked else variant.live
    if not live:
        reasons = "; ".join(f"{b.revision[:12]}: {b.yanked}" for b in variant.builds)
        raise YankedError(
            f"every build of {name} is yanked ({reasons})",
            hint=f"build one with `zoo build {name} --profile {variant.builds[-1].profile}`",
        )
    matching = [b for b in live if not versions.mismatches(b.runtime, runtime)]
    if matching:
        return matching[-1]
    if not check_runtime:
        return live[-1]
    listing = "; ".join(
        f"{b.revision[:12]} (concrete-ml {b.runtime['concrete-ml']}, concrete-python "
        f"{b.runtime['concrete-python']}, Python {b.runtime['python']})"
        for b in live
    )
    raise RuntimeMismatchError(
        f"no build of {name} matches this runtime (concrete-ml {runtime.get('concrete-ml')}, "
        f"concrete-python {runtime.get('concrete-python')}, Python {runtime.get('python')}); "
        f"builds: {listing}",
        hint=versions.install_hint(live[-1].runtime) + f", or rebuild with `zoo build {name}`",
    )
