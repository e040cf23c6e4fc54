"""Deterministic packaging of a compiled Concrete ML model, and its circuit statistics.

:func:`write_fhe_zips` lets concrete-ml write ``client.zip`` and ``server.zip``
(``FHEModelDev(...).save(via_mlir=True)``), then rewrites both archives so that the same
compiled model gives the same bytes in any process on any day: members sorted and dated
1980-01-01, the skops blob inside ``serialized_processing.json`` renumbered, JSON re-serialised
with sorted keys. What concrete writes, what was nondeterministic and why the server ships MLIR:
``docs/reproducible-zips.md``.
"""

from __future__ import annotations

import io
import json
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from zoo.store.atomic import write_atomic

ZIP_DATE_TIME = (1980, 1, 1, 0, 0, 0)
ZIP_FILE_MODE = 0o100644
ZIP_COMPRESSION = zipfile.ZIP_DEFLATED
ZIP_COMPRESSLEVEL = 9
FHE_ZIP_NAMES = ("client.zip", "server.zip")

_SKOPS_TYPE_NAMES = frozenset({"type", "sklearn_model"})
_ZIP_MAGIC = b"PK\x03\x04"


# --------------------------------------------------------------------------------------------
# Deterministic zip writing
# --------------------------------------------------------------------------------------------


def _zip_info(name: str, compress_type: int) -> zipfile.ZipInfo:
    """Return a ZipInfo with fixed date, mode, system and no extra field."""
    info = zipfile.ZipInfo(filename=name, date_time=ZIP_DATE_TIME)
    info.compress_type = compress_type
    info.create_system = 3  # Unix, so that external_attr carries a POSIX mode
    info.external_attr = ZIP_FILE_MODE << 16
    info.extra = b""
    info.comment = b""
    return info


def deterministic_zip_bytes(
    members: dict[str, bytes],
    *,
    compress_type: int = ZIP_COMPRESSION,
    compresslevel: int | None = ZIP_COMPRESSLEVEL,
) -> bytes:
    """Build a zip archive whose bytes depend only on ``members`` (name -> content).

    Args:
        members: the archive's members, by name.
        compress_type: zipfile compression constant applied to every member.
        compresslevel: compression level (ignored for ZIP_STORED).

    Returns:
        The archive's bytes: members sorted by name, fixed metadata.
    """
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name in sorted(members):
            archive.writestr(
                _zip_info(name, compress_type),
                members[name],
                compress_type=compress_type,
                compresslevel=compresslevel,
            )
    return buffer.getvalue()


def _read_members(zip_bytes: bytes) -> dict[str, bytes]:
    """Return every member of a zip archive given as bytes, by name."""
    with zipfile.ZipFile(io.BytesIO(zip_bytes)) as archive:
        names = archive.namelist()
        if len(set(names)) != len(names):
            raise ValueError("zip archive has duplicate member names")
        return {name: archive.read(name) for name in names}


# --------------------------------------------------------------------------------------------
# Member normalisers
# --------------------------------------------------------------------------------------------


def canonical_json_bytes(obj: Any) -> bytes:
    """Serialise JSON with sorted keys, compact separators and a final newline."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return (text + "\n").encode("ascii")


def _collect_skops_ids(node: Any, mapping: dict[int, int]) -> None:
    """Number every ``__id__`` of a skops schema in order of first appearance (from 1)."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "__id__" and isinstance(value, int) and value not in mapping:
                mapping[value] = len(mapping) + 1
            _collect_skops_ids(value, mapping)
    elif isinstance(node, list):
        for item in node:
            _collect_skops_ids(item, mapping)


def _npy_name(name: str, mapping: dict[int, int]) -> str:
    """Rename a skops ``<id>.npy`` member name according to ``mapping``."""
    stem, dot, suffix = name.partition(".")
    if dot and stem.isdigit() and int(stem) in mapping:
        return f"{mapping[int(stem)]}.{suffix}"
    return name


def _renumber_skops(node: Any, mapping: dict[int, int]) -> Any:
    """Return a copy of a skops schema with ``__id__`` values and file references renumbered."""
    if isinstance(node, dict):
        result = {}
        for key, value in node.items():
            if key == "__id__" and isinstance(value, int):
                result[key] = mapping[value]
            elif key == "file" and isinstance(value, str):
                result[key] = _npy_name(value, mapping)
            else:
                result[key] = _renumber_skops(value, mapping)
        return result
    if isinstance(node, list):
        return [_renumber_skops(item, mapping) for item in node]
    return node


def canonical_skops_bytes(blob: bytes) -> bytes:
    """Make a ``skops.io.dumps`` blob independent of object addresses and of the clock.

    Args:
        blob: the bytes skops wrote (a zip archive with ``schema.json`` and maybe ``.npy`` files).

    Returns:
        An equivalent skops blob: ids renumbered from 1, fixed zip metadata, ZIP_STORED.
    """
    members = _read_members(blob)
    schema = json.loads(members.pop("schema.json"))
    mapping: dict[int, int] = {}
    _collect_skops_ids(schema, mapping)
    renamed = {_npy_name(name, mapping): data for name, data in members.items()}
    # Same text layout as skops' own writer (json.dumps(state, indent=2)).
    renamed["schema.json"] = json.dumps(_renumber_skops(schema, mapping), indent=2).encode()
    return deterministic_zip_bytes(renamed, compress_type=zipfile.ZIP_STORED, compresslevel=None)


def _canonical_processing_node(node: Any) -> Any:
    """Walk concrete-ml's serialized processing JSON, canonicalising embedded skops blobs."""
    if isinstance(node, list):
        return [_canonical_processing_node(item) for item in node]
    if not isinstance(node, dict):
        return node
    result = {key: _canonical_processing_node(value) for key, value in node.items()}
    value = result.get("serialized_value")
    if result.get("type_name") in _SKOPS_TYPE_NAMES and isinstance(value, str):
        blob = bytes.fromhex(value)
        if blob.startswith(_ZIP_MAGIC):  # skops; a pickle fallback is already deterministic
            result["serialized_value"] = canonical_skops_bytes(blob).hex()
    return result


def canonical_processing_json(data: bytes) -> bytes:
    """Canonicalise ``serialized_processing.json`` (skops ids and dates, key order)."""
    return canonical_json_bytes(_canonical_processing_node(json.loads(data)))


def _canonical_plain_json(data: bytes) -> bytes:
    """Canonicalise a plain JSON member (key order, separators)."""
    return canonical_json_bytes(json.loads(data))


_MEMBER_NORMALISERS: dict[str, Callable[[bytes], bytes]] = {
    "serialized_processing.json": canonical_processing_json,
    "versions.json": _canonical_plain_json,
}


def normalise_fhe_zip(zip_bytes: bytes) -> bytes:
    """Rewrite a concrete-ml client/server zip deterministically.

    Args:
        zip_bytes: an archive written by ``FHEModelDev.save``.

    Returns:
        The same members, normalised where needed, in a deterministic container.
    """
    members = _read_members(zip_bytes)
    for name, normalise in _MEMBER_NORMALISERS.items():
        if name in members:
            members[name] = normalise(members[name])
    return deterministic_zip_bytes(members)


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def write_fhe_zips(quantized_module: Any, out_dir: Path) -> dict[str, Path]:
    """Write the deployment ``client.zip`` and ``server.zip`` of a compiled model.

    Args:
        quantized_module: a compiled concrete-ml model (``QuantizedModule`` or built-in model).
        out_dir: directory to write into; created if missing; existing zips are replaced.

    Returns:
        ``{"client.zip": path, "server.zip": path}``.
    """
    # Imported here: concrete-ml takes seconds to import and most zoo commands never package.
    from concrete.ml.deployment import FHEModelDev

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    with tempfile.TemporaryDirectory(prefix="zoo-fhe-") as tmp:
        dev_dir = Path(tmp) / "dev"
        FHEModelDev(str(dev_dir), quantized_module).save(via_mlir=True)
        for name in FHE_ZIP_NAMES:
            target = out_dir / name
            write_atomic(target, normalise_fhe_zip((dev_dir / name).read_bytes()))
            written[name] = target
    return written


def _jsonable_scalar(value: Any) -> Any:
    """Turn numpy scalars, enums and other scalars into JSON-able values."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if hasattr(value, "item"):  # numpy scalar
        return value.item()
    if hasattr(value, "value"):  # Enum such as concrete-ml's Exactness
        return _jsonable_scalar(value.value)
    return str(value)


def _parameter_dict(parameter: Any) -> dict[str, Any]:
    """Describe a concrete key parameter object (BootstrapKeyParam...) as a dict."""
    fields: dict[str, Any] = {"kind": type(parameter).__name__}
    for name in dir(parameter):
        if name.startswith("_"):
            continue
        attribute = getattr(parameter, name)
        value = attribute() if callable(attribute) else attribute
        if isinstance(value, (int, float)):
            fields[name] = value
    return fields


def _parameter_key(parameter: dict[str, Any]) -> str:
    """Sort key for parameter descriptions."""
    return json.dumps(parameter, sort_keys=True)


def _parameter_rows(value: dict[Any, Any]) -> list[dict[str, Any]]:
    """Turn ``{key-parameter object: count}`` into rows sorted by parameter."""
    rows = [
        {"parameter": _parameter_dict(key), "count": _jsonable_scalar(count)}
        for key, count in value.items()
    ]
    return sorted(rows, key=lambda row: _parameter_key(row["parameter"]))


def jsonable_statistic(name: str, value: Any) -> Any:
    """Convert one concrete statistic to JSON-able data, using its name to know its shape.

    ``*_per_parameter`` dicts (keyed by key-parameter objects) become lists of
    ``{"parameter": {...}, "count": n}``; ``*_per_tag_per_parameter`` dicts keep their tag keys
    and hold such lists; ``*_per_tag`` dicts keep their tag keys.
    """
    if name.endswith("_per_tag_per_parameter"):
        return {str(tag): _parameter_rows(per) for tag, per in sorted(value.items())}
    if name.endswith("_per_parameter"):
        return _parameter_rows(value)
    if isinstance(value, dict):
        return {str(key): _jsonable_scalar(item) for key, item in sorted(value.items())}
    return _jsonable_scalar(value)


def _rounding_settings(quantized_module: Any) -> dict[str, Any]:
    """Per-op rounding threshold bits and lsbs removed, keyed by the op's ONNX output name."""
    per_op: dict[str, Any] = {}
    for op_name, (_, op) in getattr(quantized_module, "quant_layers_dict", {}).items():
        setting = getattr(op, "rounding_threshold_bits", None)
        if setting is None:
            continue
        if not isinstance(setting, dict):
            setting = {"n_bits": setting}
        entry = {key: _jsonable_scalar(item) for key, item in setting.items()}
        lsbs = getattr(op, "lsbs_to_remove", None)
        if lsbs is not None:
            entry["lsbs_to_remove"] = (
                {key: _jsonable_scalar(item) for key, item in lsbs.items()}
                if isinstance(lsbs, dict)
                else _jsonable_scalar(lsbs)
            )
        per_op[str(op_name)] = entry
    return dict(sorted(per_op.items()))


def _sorted_keys(node: Any) -> Any:
    """Return ``node`` with every dict's keys in sorted order (recursively)."""
    if isinstance(node, dict):
        return {key: _sorted_keys(node[key]) for key in sorted(node)}
    if isinstance(node, list):
        return [_sorted_keys(item) for item in node]
    return node


def _node_size(node: Any) -> int:
    """Number of scalars a graph node produces (one PBS each when it is a table lookup)."""
    size = 1
    for dim in getattr(node.output, "shape", ()):
        size *= int(dim)
    return size


def _effective_width(node: Any) -> int:
    """Bit width a table lookup fed by ``node`` runs at (after any rounding)."""
    properties = getattr(node, "properties", {}) or {}
    if properties.get("name") == "round_bit_pattern" and properties.get("resulting_bit_width"):
        return int(properties["resulting_bit_width"])
    return int(node.output.dtype.bit_width)


def _is_exact(properties: dict[str, Any], default: Any) -> bool:
    """Whether a round_bit_pattern node rounds exactly (costing PBS) or approximately."""
    exactness = properties.get("exactness") or default
    return str(getattr(exactness, "value", exactness)).lower() == "exact"


def _graph_pbs_by_bit_width(circuit: Any) -> dict[int, int]:
    """PBS per bit width attributed from the concrete graph's table-lookup nodes.

    A table lookup costs one PBS per output scalar at the width of its encrypted input (the
    width left after a preceding ``round_bit_pattern``). Exact rounding costs one 1-bit PBS per
    removed bit and scalar; approximate rounding is folded into the lookup that follows it.
    """
    graph = circuit.graph
    default_exactness = getattr(circuit.configuration, "rounding_exactness", "exact")
    counts: dict[int, int] = {}
    for node in graph.query_nodes(ordered=True):
        if not node.converted_to_table_lookup:
            continue
        properties = node.properties or {}
        if properties.get("name") == "round_bit_pattern":
            if _is_exact(properties, default_exactness):
                removed = int(properties.get("final_lsbs_to_remove") or 0)
                counts[1] = counts.get(1, 0) + removed * _node_size(node)
            continue
        encrypted = [p for p in graph.ordered_preds_of(node) if p.output.is_encrypted]
        width = max((_effective_width(p) for p in encrypted), default=0)
        counts[width] = counts.get(width, 0) + _node_size(node)
    return {width: count for width, count in counts.items() if count}


def _pbs_by_bit_width(circuit: Any, total: int, max_width: int) -> tuple[dict[str, int], int]:
    """Graph attribution reconciled with the compiler's PBS total.

    Returns ``({"width": count}, unattributed)``. PBS the graph does not explain (ops concrete
    lowers into several lookups, e.g. max-pooling comparisons) are charged at ``max_width`` and
    reported as ``unattributed``; a negative ``unattributed`` means the graph over-counts
    (lookups fused by the compiler) and the counts are left as attributed.
    """
    counts = _graph_pbs_by_bit_width(circuit)
    unattributed = total - sum(counts.values())
    if unattributed > 0:
        counts[max_width] = counts.get(max_width, 0) + unattributed
    return {str(width): counts[width] for width in sorted(counts)}, unattributed


def circuit_statistics(quantized_module: Any) -> dict[str, Any]:
    """Summarise the FHE circuit of a compiled model as JSON-able data with sorted keys.

    Fields (the registry's ``circuit`` object uses the first six):

    * ``max_bit_width``: widest integer in the graph (``graph.maximum_integer_bit_width()``);
    * ``pbs_count``: programmable bootstraps per inference, as the compiler counts them;
    * ``pbs_count_by_bit_width``: ``{"4": n, ...}``. concrete-python 2.10 counts PBS per key
      parameter set, not per bit width, so this is attributed from the graph's table lookups
      (see `_graph_pbs_by_bit_width`); ``pbs_count_by_bit_width_unattributed`` is what the
      graph does not explain (0 when the attribution matches the compiler's total);
    * ``p_error`` / ``global_p_error``: achieved by the optimizer (``configured_p_error`` and
      ``configured_global_p_error`` are what compilation asked for);
    * ``rounding_threshold_bits``: per op (ONNX output name) ``{"n_bits", "method",
      "lsbs_to_remove"}``; ``rounding_threshold_n_bits`` lists the distinct ``n_bits``;
    * ``eval_key_bytes``: bootstrap + key-switch (+ packing key-switch) key sizes as concrete
      reports them (uncompressed, in memory; the serialized, seed-compressed keys are smaller);
    * ``pbs_count_per_parameter``: ``[{"parameter": {polynomial_size, glwe_dimension,
      input_lwe_dimension, level, base_log, ...}, "count": n}]``;
    * key-switch counts, key sizes, and ``concrete_statistics``: concrete's whole
      ``statistics`` dict with parameter-keyed dicts converted to such lists.

    Args:
        quantized_module: a compiled concrete-ml model.

    Returns:
        The statistics dict.
    """
    circuit = quantized_module.fhe_circuit
    raw = dict(circuit.statistics)
    stats = {key: jsonable_statistic(key, value) for key, value in raw.items()}
    max_width = int(circuit.graph.maximum_integer_bit_width())
    pbs_count = int(raw.get("programmable_bootstrap_count", 0))
    by_width, unattributed = _pbs_by_bit_width(circuit, pbs_count, max_width)
    packing = int(raw.get("size_of_packing_keyswitch_keys", 0) or 0)
    key_bytes = sum(
        int(raw.get(k, 0) or 0) for k in ("size_of_bootstrap_keys", "size_of_keyswitch_keys")
    )
    rounding = _rounding_settings(quantized_module)
    summary = {
        "max_bit_width": max_width,
        "pbs_count": pbs_count,
        "pbs_count_by_bit_width": by_width,
        "pbs_count_by_bit_width_unattributed": unattributed,
        "pbs_count_per_parameter": stats.get("programmable_bootstrap_count_per_parameter", []),
        "key_switch_count": stats.get("key_switch_count"),
        "packing_key_switch_count": stats.get("packing_key_switch_count"),
        "p_error": stats.get("p_error"),
        "global_p_error": stats.get("global_p_error"),
        "configured_p_error": _jsonable_scalar(circuit.configuration.p_error),
        "configured_global_p_error": _jsonable_scalar(circuit.configuration.global_p_error),
        "rounding_threshold_bits": rounding,
        "rounding_threshold_n_bits": sorted(
            {e["n_bits"] for e in rounding.values() if e.get("n_bits") is not None}
        ),
        "size_of_bootstrap_keys": stats.get("size_of_bootstrap_keys"),
        "size_of_keyswitch_keys": stats.get("size_of_keyswitch_keys"),
        "size_of_packing_keyswitch_keys": packing,
        "size_of_secret_keys": stats.get("size_of_secret_keys"),
        "eval_key_bytes": key_bytes + packing,
        "concrete_statistics": stats,
    }
    return _sorted_keys(summary)
