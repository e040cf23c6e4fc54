"""What a build costs before anyone pays for it: estimated seconds of real FHE per image.

Per crypto parameter set ``p`` of the circuit's programmable bootstraps (PBS) and ``q`` of its
key switches (KS)::

    seconds per image = Σ_p count_p × seconds_per_pbs(p) + Σ_q count_q × seconds_per_ks(q)
                        + overhead
    seconds_per_pbs(p) = c × n × level × (k + 1)² × N × log2(N) + e × n × (k + 1) × N × log2(N)
    seconds_per_ks(q) = d × n_in × level × (n_out + 1)
    linear seconds = g × Σ linear operations × (LWE dimension + 1)

with ``c``, ``e``, ``d``, ``g`` and ``overhead`` fitted by ``zoo bench pbs`` on this machine
(``$ZOO_HOME/calibration/pbs.json``), else the shipped calibration of this kind of machine
(``calibration/*.json``: one per kind this project has run on), else ``default.json``; WoP-PBS
lookups have a fit of their own. Why this form, how well it fits and where each calibration
comes from: ``docs/cost-model.md``. Imports neither torch nor concrete (``zoo info`` uses it).
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any

from zoo import config
from zoo.catalog import versions
from zoo.cost import machine

DEFAULT_SECONDS_PER_PBS = {4: 0.019, 6: 0.070, 8: 0.530}
#: Shipped calibrations, one per kind of machine (``zoo bench pbs`` on a quiet host of the kind):
#: estimates use the one of this kind, else ``default.json``.
CALIBRATION_DIR = Path(__file__).resolve().parent / "calibration"
DEFAULT_CALIBRATION = CALIBRATION_DIR / "default.json"
FORMULA = "c * n * level * (k + 1)**2 * N * log2(N) + e * n * (k + 1) * N * log2(N)"
KS_FORMULA = "d * n_in * level * (n_out + 1)"
LINEAR_FORMULA = "g * operations * (dimension + 1)"
#: concrete's statistics of the linear operations on ciphertexts (``<key>_count_per_parameter``)
LINEAR_KEYS = ("clear_multiplication", "encrypted_addition", "clear_addition", "encrypted_negation")
WOP_FORMULA = "(a + b * bits) * n * (level + 1) * (k + 1)**2 * N * log2(N)"
CALIBRATION_SCHEMA = 1
#: The numbers of a calibration's ``fit`` that the estimate multiplies by: a file where one is
#: not a number (null included) is unreadable, not a crash.
FIT_NUMBERS = ("coefficient", "level_free_coefficient", "overhead_seconds",
               "key_switch_coefficient", "linear_coefficient")  # fmt: skip


class StaleCalibrationWarning(UserWarning):
    """A calibration measured with another concrete-python version was ignored."""


# -- the work of one bootstrap ----------------------------------------------------------------


def pbs_terms(parameter: dict[str, Any]) -> tuple[float, float]:
    """The two parts of one PBS's work in :data:`FORMULA`: ``n × level × (k + 1)² × N ×
    log2(N)``, the blind rotation's decompositions, forward FFTs and products, which grow with
    the level, and ``n × (k + 1) × N × log2(N)``, its inverse FFTs, which do not."""
    n = int(parameter["input_lwe_dimension"])
    level = int(parameter["level"])
    k = int(parameter["glwe_dimension"])
    size = int(parameter["polynomial_size"])
    fft = size * math.log2(size)
    return float(n * level * (k + 1) ** 2 * fft), float(n * (k + 1) * fft)


def pbs_seconds(parameter: dict[str, Any], fit_: dict[str, Any]) -> float:
    """Seconds of one PBS at ``parameter`` under a calibration's ``fit``."""
    by_level, level_free = pbs_terms(parameter)
    c, e = float(fit_["coefficient"]), float(fit_.get("level_free_coefficient") or 0.0)
    return c * by_level + e * level_free


def pbs_work(parameter: dict[str, Any]) -> float:
    """The unit of work of a WoP lookup (:data:`WOP_FORMULA`): ``n × (level + 1) × (k + 1)² ×
    N × log2(N)``."""
    n = int(parameter["input_lwe_dimension"])
    level = int(parameter["level"])
    k = int(parameter["glwe_dimension"])
    size = int(parameter["polynomial_size"])
    return float(n * (level + 1) * (k + 1) ** 2 * size * math.log2(size))


def describe(parameter: dict[str, Any]) -> str:
    """A short label of a bootstrap parameter set, e.g. ``N=8192 k=1 n=896 level=2 base_log=15``."""
    return (
        f"N={parameter.get('polynomial_size')} k={parameter.get('glwe_dimension')} "
        f"n={parameter.get('input_lwe_dimension')} level={parameter.get('level')} "
        f"base_log={parameter.get('base_log')}"
    )


def pbs_rows(circuit: dict[str, Any]) -> list[dict[str, Any]]:
    """The ``[{"parameter": {...}, "count": n}]`` PBS counts of a circuit (empty if unknown)."""
    rows = circuit.get("pbs_count_per_parameter")
    if not rows:
        stats = circuit.get("concrete_statistics") or {}
        rows = stats.get("programmable_bootstrap_count_per_parameter") or []
    return [r for r in rows if r.get("count")]


def _statistic(circuit: dict[str, Any], key: str) -> Any:
    """``key`` of the circuit summary, else of concrete's statistics inside it."""
    value = circuit.get(key)
    return (circuit.get("concrete_statistics") or {}).get(key) if value is None else value


def key_switch_work(circuit: dict[str, Any]) -> float | None:
    """``Σ count × n_in × level × (n_out + 1)`` over the circuit's key switches (None when it
    cannot be told): the multiply-adds of switching a PBS output, under a key of dimension
    ``n_in = k × N``, to the key of dimension ``n_out`` the next PBS reads. Key dimensions come
    from the PBS parameter sets; the registry's catalogue states the sum as ``key_switch_work``.
    """
    if circuit.get("key_switch_work") is not None:
        return float(circuit["key_switch_work"])
    rows = _statistic(circuit, "key_switch_count_per_parameter")
    if not rows:
        return None
    dimensions: dict[int, int] = {}
    for row in pbs_rows(circuit):
        p = row["parameter"]
        dimensions[p["input_secret_key_id"]] = int(p["input_lwe_dimension"])
        dimensions[p["output_secret_key_id"]] = int(p["glwe_dimension"]) * int(p["polynomial_size"])
    total = 0.0
    for row in rows:
        p = row["parameter"]
        n_in = dimensions.get(p["input_secret_key_id"])
        n_out = dimensions.get(p["output_secret_key_id"])
        if n_in is None or n_out is None:
            return None
        total += int(row["count"]) * n_in * int(p["level"]) * (n_out + 1)
    return total


def linear_work(circuit: dict[str, Any]) -> float | None:
    """``Σ operations × (dimension + 1)`` over the circuit's linear operations on ciphertexts
    (clear multiplications, encrypted and clear additions, negations: each reads and writes a
    ciphertext of ``dimension + 1`` words), None when concrete's statistics do not say; the
    registry's catalogue states it as ``linear_work``."""
    if circuit.get("linear_work") is not None:
        return float(circuit["linear_work"])
    rows = [_statistic(circuit, f"{key}_count_per_parameter") for key in LINEAR_KEYS]
    if all(r is None for r in rows):
        return None
    return float(sum(int(row["count"]) * (int(row["parameter"]["dimension"]) + 1)
                     for r in rows for row in r or []))  # fmt: skip


def uses_wop(circuit: dict[str, Any]) -> bool:
    """Whether the circuit's lookups are WoP-PBS (it has packing key switches)."""
    count = circuit.get("packing_key_switch_count")
    if count is None:
        count = (circuit.get("concrete_statistics") or {}).get("packing_key_switch_count")
    return bool(count)


def wop_work(circuit: dict[str, Any]) -> list[tuple[int, int, float]]:
    """``(bits, lookups, work)`` per bit width of a WoP circuit's lookups, ``work`` being the
    :func:`pbs_work` of its PBS parameter sets (their count-weighted mean, if several)."""
    rows = pbs_rows(circuit)
    total = sum(int(r["count"]) for r in rows)
    if not total:
        return []
    mean = sum(int(r["count"]) * pbs_work(r["parameter"]) for r in rows) / total
    by_width = {int(b): int(n) for b, n in (circuit.get("pbs_count_by_bit_width") or {}).items()}
    # lookups the table leaves out (the packager already adds what the graph does not
    # attribute to the widest width) are priced at the widest lookup
    missing = total - sum(by_width.values())
    if missing > 0:
        widest = max(by_width, default=int(circuit.get("max_bit_width") or 0))
        by_width[widest] = by_width.get(widest, 0) + missing
    return [(bits, n, mean) for bits, n in sorted(by_width.items()) if n]


def wop_seconds(bits: int, work: float, wop_fit: dict[str, Any]) -> float:
    """Seconds of one WoP lookup of ``bits`` bits at a parameter set of :func:`pbs_work`
    ``work``: ``(a + b × bits) × work``."""
    return (float(wop_fit["a"]) + float(wop_fit["b"]) * bits) * work


# -- the old per-bit-width table (fallback) ---------------------------------------------------


def seconds_per_pbs(bit_width: int, table: dict[int, float] | None = None) -> float:
    """Seconds of one PBS of ``bit_width`` bits, interpolated log-linearly in ``table``."""
    table = dict(sorted((table or DEFAULT_SECONDS_PER_PBS).items()))
    if bit_width in table:
        return table[bit_width]
    if len(table) == 1:  # nothing to interpolate
        return next(iter(table.values()))
    widths = list(table)
    low = max([w for w in widths if w < bit_width], default=widths[0])
    high = min([w for w in widths if w > bit_width], default=widths[-1])
    if low == high:  # outside the table: extrapolate from the nearest pair
        low, high = (widths[0], widths[1]) if bit_width < widths[0] else (widths[-2], widths[-1])
    slope = (math.log(table[high]) - math.log(table[low])) / (high - low)
    return math.exp(math.log(table[low]) + slope * (bit_width - low))


# -- calibrations -----------------------------------------------------------------------------


def user_calibration_path() -> Path:
    """``$ZOO_HOME/calibration/pbs.json``: where `zoo bench pbs` writes this machine's fit."""
    return config.zoo_home() / "calibration" / "pbs.json"


def _read(path: Path) -> dict[str, Any] | None:
    """A calibration document, refitted from its measured points if it was fitted with another
    formula (the points are the measurement; the fit is derived); None if unreadable."""
    try:
        document = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(document, dict) or not isinstance(document.get("fit"), dict):
        return None
    points = document.get("points") or []
    if not isinstance(points, list) or not all(isinstance(p, dict) for p in points):
        return None
    has_wop = any(p.get("kind") == "wop" for p in document.get("points") or [])
    wop_stale = has_wop and (document.get("wop_fit") or {}).get("formula") != WOP_FORMULA
    fit_ = document["fit"]
    if (fit_.get("formula"), fit_.get("linear_formula")) != (FORMULA, LINEAR_FORMULA) or wop_stale:
        try:
            document = {**document, **make_calibration(document["points"])}
        except (KeyError, TypeError, ValueError):
            return None
    if not all(isinstance(document["fit"].get(k, 0.0), (int, float)) for k in FIT_NUMBERS):
        return None
    return document


def stale_reason(document: dict[str, Any], have: dict[str, str] | None = None) -> str | None:
    """Why ``document`` does not describe this runtime (another concrete-python), or None."""
    have = versions.installed() if have is None else have
    measured = (document.get("versions") or {}).get("concrete-python")
    if measured != have.get("concrete-python"):
        return f"measured with concrete-python {measured}, installed {have.get('concrete-python')}"
    return None


#: What makes two machines one kind for FHE speed: the instruction set, the core count and the
#: CPU's generation (family and model numbers). Two AVX-512 hosts, AMD family 26 model 2 and
#: family 25 model 17, ran the same lookups 1.5-2.2x apart (docs/cost-model.md).
MACHINE_KIND = ("isa", "cpu_count", "cpu_family", "cpu_model_number")


def describe_machine(machine: dict[str, Any]) -> str:
    """``AMD EPYC (family 25 model 1), avx2, 2 cores``: a machine as calibrations and real-FHE
    records name it (without the family where it was not recorded)."""
    isa = machine.get("isa") or "instruction set not recorded"
    name = machine.get("cpu_model")
    if machine.get("cpu_family") is not None:
        name = f"{name} (family {machine['cpu_family']} model {machine.get('cpu_model_number')})"
    return f"{name}, {isa}, {machine.get('cpu_count')} cores"


def other_machine(document: dict[str, Any], here: dict[str, Any] | None = None) -> str | None:
    """Why ``document`` describes another kind of machine than this one (:data:`MACHINE_KIND`),
    or None.

    FHE speed follows the instruction set (the same circuits ran 1.7-2.2x slower on this
    project's AVX2 machine than on the one before it, most likely an AVX-512 one), the core
    count and the CPU's generation; a calibration made elsewhere says so instead of silently
    misleading.
    """
    here = machine.cpu() if here is None else here
    theirs = document.get("machine") or {}
    if _alike(theirs, here, MACHINE_KIND):
        return None
    return f"measured on {describe_machine(theirs)}; this is {describe_machine(here)}"


def _alike(theirs: dict[str, Any], here: dict[str, Any], keys: tuple[str, ...]) -> bool:
    """Whether two machine records agree on ``keys``."""
    return all(theirs.get(k) == here.get(k) for k in keys)


def current_calibration(warn: bool = True) -> dict[str, Any] | None:
    """The calibration estimates use, first of: this machine's own (``zoo bench pbs``), the
    shipped one of this kind of machine (:data:`MACHINE_KIND`), a user calibration made on
    another kind of machine, the shipped one of this instruction set and core count, the
    shipped default.

    Returns the calibration document with a ``"source"`` entry added: ``{"kind": "user" |
    "shipped", "path": ..., "ignored": [{"path", "reason"}], "stale": reason or None,
    "other_machine": reason or None, "wop_other_machine": reason or None}``. ``ignored`` lists
    a user calibration that was skipped. A calibration without WoP points borrows the
    default's WoP fit; ``wop_other_machine`` then says where that was measured. None when no
    calibration can be read.
    """
    here = machine.cpu()
    ignored = []
    user_path, user = user_calibration_path(), None
    if user_path.is_file():
        user = _read(user_path)
        reason = "unreadable or not a calibration" if user is None else stale_reason(user)
        if reason is not None:
            user = None
            ignored.append({"path": str(user_path), "reason": reason})
            if warn:
                warnings.warn(
                    f"ignoring {user_path}: {reason}; re-run `zoo bench pbs`",
                    StaleCalibrationWarning,
                    stacklevel=2,
                )
    user_elsewhere = None if user is None else other_machine(user, here)
    path, shipped = None, None
    if user is None or user_elsewhere is not None:  # this machine's own needs no shipped file
        path, shipped = _shipped_calibration(here)
    shipped_elsewhere = None if shipped is None else other_machine(shipped, here)
    if user is not None:
        if user_elsewhere is None or shipped is None or shipped_elsewhere is not None:
            return _with_wop_fit(user, {"kind": "user", "path": str(user_path), "ignored": [],
                                        "other_machine": user_elsewhere}, here)  # fmt: skip
        ignored.append({"path": str(user_path), "reason": f"{user_elsewhere}; a shipped "
                        "calibration of this kind of machine comes first"})  # fmt: skip
    if shipped is None:
        return None
    source = {
        "kind": "shipped",
        "path": str(path),
        "ignored": ignored,
        "stale": stale_reason(shipped),
        "other_machine": shipped_elsewhere,
    }
    return _with_wop_fit(shipped, source, here)


def _shipped_calibration(here: dict[str, Any]) -> tuple[Path, dict[str, Any] | None]:
    """The shipped calibration of this kind of machine, else the nearest: one of this
    instruction set and core count (another CPU generation), else the default (each file read
    once)."""
    nearest = default = None
    for path in sorted(CALIBRATION_DIR.glob("*.json")):
        document = _read(path)
        if document is None:
            continue
        if other_machine(document, here) is None:
            return path, document
        if nearest is None and _alike(document.get("machine") or {}, here, ("isa", "cpu_count")):
            nearest = path, document
        if path == DEFAULT_CALIBRATION:
            default = path, document
    return nearest or default or (DEFAULT_CALIBRATION, _read(DEFAULT_CALIBRATION))


def _with_wop_fit(
    document: dict[str, Any], source: dict[str, Any], here: dict[str, Any]
) -> dict[str, Any]:
    """``document`` with ``source``, and the shipped default's WoP fit if it has none: a WoP
    circuit priced from another machine's WoP points (and said so) is nearer the truth than
    its lower bound as classic PBS."""
    source = {**source, "wop_other_machine": None}
    if document.get("wop_fit"):
        return {**document, "source": source}
    default = _read(DEFAULT_CALIBRATION) if source["path"] != str(DEFAULT_CALIBRATION) else None
    if not default or not default.get("wop_fit"):
        return {**document, "source": source}
    measured = default.get("wop_measured") or default
    source["wop_other_machine"] = other_machine(measured, here)
    borrowed = {"wop_fit": default["wop_fit"], "wop_measured": measured}
    return {**document, **borrowed, "source": source}


def calibration_summary(calibration: dict[str, Any] | None) -> dict[str, Any] | None:
    """What `zoo info` says about a calibration: where, which machine, when, how well it fits."""
    if calibration is None:
        return None
    machine = calibration.get("machine") or {}
    fit_ = calibration.get("fit") or {}
    wop_fit = calibration.get("wop_fit") or {}
    return {
        "source": (calibration.get("source") or {}).get("kind"),
        "path": (calibration.get("source") or {}).get("path"),
        "cpu_model": machine.get("cpu_model"),
        "cpu_family": machine.get("cpu_family"),
        "cpu_model_number": machine.get("cpu_model_number"),
        "isa": machine.get("isa"),
        "cpu_count": machine.get("cpu_count"),
        "created": calibration.get("created"),
        "concrete-python": (calibration.get("versions") or {}).get("concrete-python"),
        "formula": fit_.get("formula"),
        "ks_formula": fit_.get("key_switch_formula")
        if fit_.get("key_switch_coefficient")
        else None,
        "linear_formula": fit_.get("linear_formula") if fit_.get("linear_coefficient") else None,
        "max_abs_relative_error": fit_.get("max_abs_relative_error"),
        "wop_formula": wop_fit.get("formula"),
        "wop_max_abs_relative_error": wop_fit.get("max_abs_relative_error"),
        "note": calibration.get("note"),
        "stale": (calibration.get("source") or {}).get("stale"),
        "other_machine": (calibration.get("source") or {}).get("other_machine"),
        "wop_other_machine": (calibration.get("source") or {}).get("wop_other_machine"),
        "ignored": (calibration.get("source") or {}).get("ignored", []),
    }


# -- the estimate -----------------------------------------------------------------------------


def _short(parameter: dict[str, Any]) -> dict[str, Any]:
    keys = ("polynomial_size", "glwe_dimension", "input_lwe_dimension", "level", "base_log")
    return {key: parameter.get(key) for key in keys}


def breakdown(
    circuit: dict[str, Any],
    calibration: dict[str, Any] | None = None,
    table: dict[int, float] | None = None,
) -> dict[str, Any] | None:
    """Estimated real-FHE seconds per image, term by term; None when the circuit says nothing.

    Returns ``{"method": "per-parameter" | "wop" | "bit-width-table", "rows": [...],
    "overhead_seconds", "total_seconds", "lower_bound", "calibration": calibration_summary or
    None}``; each row has ``count``, ``seconds_each`` and ``seconds``, plus ``parameter``
    (per-parameter) or ``bit_width`` (both for WoP lookups). ``lower_bound`` is true for a WoP
    circuit priced without WoP calibration (as classic PBS, which WoP lookups cost many times),
    and for a circuit whose statistics lack the key-switch or linear work the calibration prices.
    ``calibration`` defaults to :func:`current_calibration`; ``table`` is the per-bit-width
    fallback (default :data:`DEFAULT_SECONDS_PER_PBS`).
    """
    rows = pbs_rows(circuit)
    if rows:
        calibration = current_calibration() if calibration is None else calibration
    wop = uses_wop(circuit)
    if rows and calibration is not None and wop and calibration.get("wop_fit"):
        wop_fit = calibration["wop_fit"]
        overhead = float(calibration["fit"].get("overhead_seconds", 0.0))
        parameter = max(rows, key=lambda r: int(r["count"]))["parameter"]
        terms = []
        for bits, count, work in wop_work(circuit):
            each = wop_seconds(bits, work, wop_fit)
            terms.append({"bit_width": bits, "parameter": _short(parameter), "count": count,
                          "seconds_each": each, "seconds": each * count})  # fmt: skip
        return _result("wop", terms, overhead, False, calibration)
    if rows and calibration is not None:
        overhead = float(calibration["fit"].get("overhead_seconds", 0.0))
        terms = []
        for row in rows:
            each = pbs_seconds(row["parameter"], calibration["fit"])
            terms.append(
                {
                    "parameter": _short(row["parameter"]),
                    "count": int(row["count"]),
                    "seconds_each": each,
                    "seconds": each * int(row["count"]),
                }
            )
        ks_coefficient = float(calibration["fit"].get("key_switch_coefficient") or 0.0)
        ks_work = key_switch_work(circuit)
        ks_count = int(_statistic(circuit, "key_switch_count") or 0)
        if ks_coefficient and ks_work and ks_count:
            seconds = ks_coefficient * ks_work
            terms.append({"key_switch": True, "count": ks_count,
                          "seconds_each": seconds / ks_count, "seconds": seconds})  # fmt: skip
        linear_coefficient = float(calibration["fit"].get("linear_coefficient") or 0.0)
        linear = linear_work(circuit)
        if linear_coefficient and linear:
            terms.append({"linear": True, "work": linear,
                          "seconds": linear_coefficient * linear})  # fmt: skip
        # A term the calibration prices but the circuit's statistics cannot give (builds from
        # before they recorded key_switch_work) is missing from the total: at least this much.
        unpriced = (ks_coefficient and ks_count and ks_work is None) or (
            linear_coefficient and linear is None
        )
        return _result("per-parameter", terms, overhead, wop or bool(unpriced), calibration)
    by_width = circuit.get("pbs_count_by_bit_width")
    if not by_width:
        return None
    terms = [
        {
            "bit_width": int(w),
            "count": int(count),
            "seconds_each": seconds_per_pbs(int(w), table),
            "seconds": int(count) * seconds_per_pbs(int(w), table),
        }
        for w, count in sorted(by_width.items(), key=lambda item: int(item[0]))
    ]
    return _result("bit-width-table", terms, 0.0, wop, None)


def _result(
    method: str,
    terms: list[dict[str, Any]],
    overhead: float,
    lower_bound: bool,
    calibration: dict[str, Any] | None,
) -> dict[str, Any]:
    """:func:`breakdown`'s answer: the terms, most expensive first, and their total."""
    return {
        "method": method,
        "rows": sorted(terms, key=lambda t: -t["seconds"]),
        "overhead_seconds": overhead,
        "total_seconds": sum(t["seconds"] for t in terms) + overhead,
        "lower_bound": lower_bound,
        "calibration": calibration_summary(calibration) if calibration else None,
    }


def estimate_seconds(
    circuit: dict[str, Any],
    table: dict[int, float] | None = None,
    calibration: dict[str, Any] | None = None,
) -> float | None:
    """Estimated real-FHE seconds per image from a build's circuit statistics (None if unknown).

    Per parameter set with the current calibration when the circuit has per-parameter PBS
    counts; with the per-bit-width ``table`` otherwise (see :func:`breakdown`).
    """
    result = breakdown(circuit, calibration, table)
    return None if result is None else result["total_seconds"]


# -- fitting (used by `zoo bench pbs`) --------------------------------------------------------


def fit(points: list[dict[str, Any]]) -> dict[str, Any]:
    """Fit ``run seconds = overhead + Σ count × (c × by_level + e × level_free) + d ×
    key_switch_work + g × linear_work`` (:func:`pbs_terms`, :func:`key_switch_work`,
    :func:`linear_work`) to measured circuits.

    Minimises the squared relative errors (each circuit counts alike, whatever its duration)
    with every coefficient >= 0 (non-negative least squares). ``e`` is fitted only when the
    points have bootstraps of two levels or more, ``d`` (``g``) only when every point has its key
    switches (linear operations) in its statistics; the others are 0, the terms fitted then
    covering that work too (older calibrations). Each point needs ``circuit``,
    ``pbs_count_per_parameter`` and ``run_seconds_median``. Returns ``{"formula",
    "coefficient" (c), "level_free_coefficient" (e), "key_switch_formula",
    "key_switch_coefficient" (d), "linear_formula", "linear_coefficient" (g),
    "overhead_seconds", "errors": [{"circuit", "measured_seconds", "predicted_seconds",
    "relative_error"}], "max_abs_relative_error", "rms_relative_error"}``.
    """
    import numpy as np
    from scipy.optimize import nnls

    rows = []
    for point in points:
        if point.get("kind") == "wop":
            continue  # WoP lookups: fit_wop
        by_level = level_free = 0.0
        for row in point["pbs_count_per_parameter"]:
            a, b = pbs_terms(row["parameter"])
            by_level, level_free = by_level + row["count"] * a, level_free + row["count"] * b
        if by_level > 0 and point["run_seconds_median"] > 0:
            features = [1.0, by_level, level_free, key_switch_work(point), linear_work(point)]
            rows.append((point, features, float(point["run_seconds_median"])))
    if not rows:
        raise ValueError("no measured point with PBS to fit")
    # What the points can tell apart: the level-free term needs bootstraps of two levels or more;
    # key switches (column 3) and linear work (4) need every point to state them, and some work.
    levels = {r["parameter"]["level"] for p, _, _ in rows for r in p["pbs_count_per_parameter"]}
    used = [0, 1] + ([2] if len(levels) > 1 else [])
    used += [i for i in (3, 4) if all(f[i] is not None for _, f, _ in rows)
             and any(f[i] for _, f, _ in rows) and (i == 4 or len(rows) > 3)]  # fmt: skip
    design = np.array([[f[i] for i in used] for _, f, _ in rows], dtype=float)
    seconds = np.array([y for *_, y in rows])
    scale = design.max(axis=0)  # columns of comparable size for the solver
    solution, _ = nnls(design / scale / seconds[:, None], np.ones(len(rows)))
    coefficients = dict.fromkeys(range(5), 0.0) | dict(zip(used, (solution / scale).tolist()))
    predicted = [float(np.dot(design[j], solution / scale)) for j in range(len(rows))]
    return {
        "formula": FORMULA,
        "coefficient": coefficients[1],
        "level_free_coefficient": coefficients[2],
        "key_switch_formula": KS_FORMULA,
        "key_switch_coefficient": coefficients[3],
        "linear_formula": LINEAR_FORMULA,
        "linear_coefficient": coefficients[4],
        "overhead_seconds": coefficients[0],
        **_fit_errors([(p, y, q) for (p, _, y), q in zip(rows, predicted)]),
    }


def _fit_errors(rows: list[tuple[dict[str, Any], float, float]]) -> dict[str, Any]:
    """``errors`` (per circuit), ``max_abs_relative_error`` and ``rms_relative_error`` of a fit
    from ``(point, measured seconds, predicted seconds)`` rows."""
    errors = [
        {
            "circuit": point.get("circuit"),
            "measured_seconds": measured,
            "predicted_seconds": predicted,
            "relative_error": predicted / measured - 1.0,
        }
        for point, measured, predicted in rows
    ]
    relative = [e["relative_error"] for e in errors]
    return {
        "errors": errors,
        "max_abs_relative_error": max(abs(x) for x in relative),
        "rms_relative_error": math.sqrt(sum(x * x for x in relative) / len(relative)),
    }


def _point_wop_work(point: dict[str, Any]) -> tuple[float, float]:
    """(Σ lookups × work, Σ lookups × bits × work) of a measured WoP circuit."""
    circuit = {
        "pbs_count_per_parameter": point["pbs_count_per_parameter"],
        "pbs_count_by_bit_width": point["lookups_by_bit_width"],
    }
    terms = wop_work(circuit)
    return sum(n * w for _, n, w in terms), sum(n * b * w for b, n, w in terms)


def fit_wop(points: list[dict[str, Any]], overhead: float) -> dict[str, Any] | None:
    """Fit ``run seconds = overhead + Σ lookups × (a + b × bits) × work`` to the measured WoP
    circuits (``kind`` "wop"), with the fixed cost of a run from the classic fit; minimises the
    squared relative errors, with ``a, b >= 0``. None without WoP points."""
    rows = []
    for point in points:
        if point.get("kind") == "wop" and float(point["run_seconds_median"]) > 0:
            w0, w1 = _point_wop_work(point)
            if w0 > 0:
                rows.append((point, w0, w1, float(point["run_seconds_median"])))
    if not rows:
        return None
    # minimise Σ (a·u + b·v − t)² with u = w0/y, v = w1/y, t = 1 − overhead/y
    u = [w0 / y for _, w0, _, y in rows]
    v = [w1 / y for _, _, w1, y in rows]
    t = [1 - overhead / y for *_, y in rows]
    suu, suv, svv = (sum(x * z for x, z in zip(p, q)) for p, q in ((u, u), (u, v), (v, v)))
    sut, svt = sum(x * z for x, z in zip(u, t)), sum(x * z for x, z in zip(v, t))
    det = suu * svv - suv * suv
    a = (sut * svv - svt * suv) / det if len(rows) > 1 and det > 0 else -1.0
    b = (suu * svt - suv * sut) / det if len(rows) > 1 and det > 0 else -1.0
    if a < 0 or b < 0:  # one term only: proportional to the width, or constant
        a, b = (0.0, svt / svv) if b > 0 else (sut / suu, 0.0)
    return {
        "formula": WOP_FORMULA,
        "a": a,
        "b": b,
        **_fit_errors([(p, y, overhead + a * w0 + b * w1) for p, w0, w1, y in rows]),
    }


def make_calibration(points: list[dict[str, Any]]) -> dict[str, Any]:
    """A calibration document (the bench adds machine, versions and date) from measured points.

    Adds to each point ``seconds_per_pbs`` (its run time less the fitted fixed cost, per PBS;
    per lookup for WoP points) and ``relative_error`` (the fit's, on its run time). WoP points
    get a fit of their own (``wop_fit``).
    """
    result = fit(points)
    wop_result = fit_wop(points, result["overhead_seconds"])
    errors = result["errors"] + (wop_result["errors"] if wop_result else [])
    by_circuit = {e["circuit"]: e["relative_error"] for e in errors}
    for point in points:
        count = point.get("pbs_count") or sum(r["count"] for r in point["pbs_count_per_parameter"])
        spent = max(point["run_seconds_median"] - result["overhead_seconds"], 0.0)
        point["seconds_per_pbs"] = spent / count if count else None
        point["relative_error"] = by_circuit.get(point.get("circuit"))
    document = {"schema": CALIBRATION_SCHEMA, "fit": result, "points": points}
    if wop_result:
        document["wop_fit"] = wop_result
    return document
