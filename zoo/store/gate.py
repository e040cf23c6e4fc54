"""The artifact gate: what a build's ``client.zip`` / ``server.zip`` may ask Python to construct.

concrete's ``fhe.Server.load`` (and zoo's simulator) read ``server.zip``'s ``configuration.json``
with ``jsonpickle.loads``, which can build any object and call any function; concrete-ml reads
``client.zip``'s ``serialized_processing.json`` with its own decoder, which hands ``type`` values
to skops. A sha256 pin only proves these are the bytes the registry's author chose, so before
anything deserializes them, :func:`check_zip` extracts the archive safely
(:func:`zoo.store.safezip.extract_zip`), parses every JSON member with the plain ``json`` module and
accepts only what real concrete-ml 1.9 builds contain (sizes and compression ratios included):

- jsonpickle ``py/reduce`` of one of :data:`ENUM_TYPES` with plain arguments (an enum member),
  and ``py/object`` of one of :data:`OBJECT_TYPES` (a dataclass of plain fields); no other
  ``py/`` tag anywhere;
- concrete-ml ``type_name`` values in :data:`TYPE_NAMES`, and a ``type`` value only as the skops
  blob that names ``QuantizedModule`` (a small zip of one ``schema.json``, nothing beside it);
- no jsonpickle-encoded key (``json://``) anywhere;
- the members concrete-ml 1.9 writes and no others (:data:`MEMBERS`): no shared library that
  concrete would load in place of compiling ``circuit.mlir``.

Anything else raises :class:`UnsafeArtifactError` naming the member and the tag; nothing has been
deserialized then. Light: imports neither torch nor concrete.
"""

from __future__ import annotations

import io
import json
import tempfile
import zipfile
from pathlib import Path
from typing import Any

from zoo.errors import UnsafeArtifactError
from zoo.store.safezip import COMPRESSIONS, READ_ERRORS, extract_zip

CONFIGURATION = "concrete.fhe.compilation.configuration."
#: Enum classes that concrete's configuration.json rebuilds with ``py/reduce``.
ENUM_TYPES = frozenset(
    CONFIGURATION + name
    for name in ("ParameterSelectionStrategy", "MultiParameterStrategy", "Exactness",
                 "SecurityLevel")
)  # fmt: skip
#: Classes that it rebuilds with ``py/object`` (their fields are checked like any other value).
OBJECT_TYPES = frozenset({CONFIGURATION + "ApproximateRoundingConfig"})
#: concrete-ml's serialized values in ``serialized_processing.json``.
TYPE_NAMES = frozenset({"numpy_float", "numpy_integer", "numpy_array", "UniformQuantizer", "type"})
#: The one type a ``type`` value may name (what ``FHEModelDev`` writes for a QAT module).
SKOPS_SCHEMA = {
    "__class__": "QuantizedModule",
    "__module__": "concrete.ml.quantization.quantized_module",
    "__loader__": "TypeNode",
}
#: The members of each archive that ``FHEModelDev.save(via_mlir=True)`` writes.
MEMBERS = {
    "client.zip": frozenset({"client.specs.json", "serialized_processing.json", "versions.json"}),
    "server.zip": frozenset({"circuit.mlir", "client.specs.json", "composition_rules.json",
                             "configuration.json", "is_simulated", "versions.json"}),
}  # fmt: skip
MAX_SKOPS_SCHEMA_BYTES = 4096  # a real one is 186 bytes
MAX_JSON_BYTES = 64 * 1024**2  # a real build's largest JSON member is a few kB
MAX_DEPTH = 64
#: Bounds on what a build's zip may expand to. Real builds: the largest member is the 241 MB
#: circuit.mlir of VGG11 at half width (``cifar10-vgg11-qat`` ``fast``; its lookup tables as
#: text), compressed 136-fold; at full width the tables are twice as many. A zip bomb expands
#: about 1,000-fold (deflate's limit), which the ratio still refuses. The ratio reads the
#: declared sizes; a header that lies about them meets the two caps while it is streamed.
MAX_MEMBER_BYTES = 1024**3
MAX_TOTAL_BYTES = 2 * 1024**3
MAX_RATIO = 400


def _refuse(archive: Path, member: str, problem: str) -> UnsafeArtifactError:
    return UnsafeArtifactError(
        f"{archive.name}: {member}: {problem}; nothing was loaded",
        hint="this is not what concrete-ml 1.9 writes: do not use this build, and tell whoever "
        "published it (zoo refuses to deserialize it)",
    )


def _plain(value: Any) -> bool:
    return value is None or isinstance(value, (bool, int, float, str))


def _skops_blob(hex_value: Any) -> str | None:
    """None if ``hex_value`` is the skops blob of a QuantizedModule type, else what is wrong."""
    try:
        raw = bytes.fromhex(hex_value)
        if not raw.startswith(b"PK\x03\x04"):  # concrete-ml unpickles it when skops is off
            return "a skops blob that is not a zip from its first byte"
        with zipfile.ZipFile(io.BytesIO(raw)) as blob:
            infos = blob.infolist()
            if [i.filename for i in infos] != ["schema.json"]:
                return f"a skops blob with members {blob.namelist()}"
            if infos[0].compress_type not in COMPRESSIONS:
                return f"a skops blob compressed with method {infos[0].compress_type}"
            if infos[0].file_size > MAX_SKOPS_SCHEMA_BYTES:
                return f"a skops schema of {infos[0].file_size} bytes"
            with blob.open(infos[0]) as handle:
                schema = json.loads(handle.read(MAX_SKOPS_SCHEMA_BYTES + 1))
    except (*READ_ERRORS, TypeError, RuntimeError) as exc:
        return f"a skops blob that does not parse ({type(exc).__name__}: {exc})"
    if not isinstance(schema, dict):
        return "a skops blob whose schema is not an object"
    if any(schema.get(k) != v for k, v in SKOPS_SCHEMA.items()):
        return f"a skops blob of type {schema.get('__module__')}.{schema.get('__class__')}"
    if not all(_plain(v) for v in schema.values()):
        return "a skops blob with nested objects"
    return None


def _enum_member(node: dict[str, Any]) -> bool:
    """``{"py/reduce": [{"py/type": ENUM}, {"py/tuple": [plain, ...]}]}``: ENUM(*plain)."""
    args = node["py/reduce"]
    return (
        len(node) == 1 and isinstance(args, list) and len(args) == 2
        and isinstance(args[0], dict) and list(args[0]) == ["py/type"]
        and args[0]["py/type"] in ENUM_TYPES
        and isinstance(args[1], dict) and list(args[1]) == ["py/tuple"]
        and isinstance(args[1]["py/tuple"], list) and all(map(_plain, args[1]["py/tuple"]))
    )  # fmt: skip


def _walk(node: Any, depth: int) -> str | None:
    """None if every jsonpickle tag and concrete-ml type under ``node`` is allowed."""
    if depth > MAX_DEPTH:
        return f"nesting deeper than {MAX_DEPTH}"
    if isinstance(node, list):
        return next((p for p in (_walk(v, depth + 1) for v in node) if p), None)
    if not isinstance(node, dict):
        return None
    encoded = [k for k in node if k.startswith("json://")]
    if encoded:
        return f"a jsonpickle-encoded key {encoded[0][:120]!r}"
    tags = [k for k in node if k.startswith("py/")]
    if tags == ["py/reduce"] and _enum_member(node):
        return None
    if tags == ["py/object"] and node["py/object"] in OBJECT_TYPES:
        return _walk({k: v for k, v in node.items() if k != "py/object"}, depth + 1)
    if tags:
        return f"jsonpickle {tags[0]} {json.dumps(node[tags[0]])[:120]}"
    if "type_name" in node and "serialized_value" in node:
        name = node["type_name"]
        if name not in TYPE_NAMES:
            return f"concrete-ml type_name {name!r} (allowed: {sorted(TYPE_NAMES)})"
        if name == "type":
            if set(node) != {"type_name", "serialized_value"}:
                return f"keys {sorted(set(node) - {'type_name', 'serialized_value'})} beside a type"
            return _skops_blob(node["serialized_value"])
    return next((p for p in (_walk(v, depth + 1) for v in node.values()) if p), None)


def check_zip(path: Path) -> None:
    """Refuse ``path`` (a build's client.zip or server.zip) unless it extracts safely and its
    JSON members hold only what real builds hold; nothing is deserialized by Python here."""
    path = Path(path)
    with tempfile.TemporaryDirectory(prefix="zoo-gate-") as scratch:
        files = extract_zip(
            path, Path(scratch) / "x", max_member_bytes=MAX_MEMBER_BYTES,
            max_total_bytes=MAX_TOTAL_BYTES, max_ratio=MAX_RATIO,
        )  # fmt: skip
        members = {file.relative_to(Path(scratch) / "x").as_posix(): file for file in files}
        if set(members) not in MEMBERS.values():
            client, server = (sorted(names) for names in MEMBERS.values())
            raise _refuse(path, "members", f"{sorted(members)}, not {client} or {server}")
        for member, file in members.items():
            if not member.endswith(".json"):
                continue
            if file.stat().st_size > MAX_JSON_BYTES:
                raise _refuse(path, member, f"{file.stat().st_size} bytes of JSON")
            try:
                document = json.loads(file.read_bytes())
            except (ValueError, RecursionError) as exc:
                raise _refuse(path, member, f"not plain JSON ({type(exc).__name__})") from None
            problem = _walk(document, 0)
            if problem:
                raise _refuse(path, member, problem)
