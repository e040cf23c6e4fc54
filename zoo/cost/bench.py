"""`zoo bench pbs`: measure what one programmable bootstrap (PBS) costs on this machine.

Layer-sized concrete-python circuits are compiled with the ``p_error`` our builds use
(``2**-40``, see ``recipes/split_cnv.py``; the 4-6-bit lookups also at the rounded variants'
0.01, whose deeper key switches let the fit tell key switches from bootstraps); each gets its
keys once and one encrypted input, then ``circuit.run`` is timed (median of a few runs, one
circuit at a time, see :func:`measure`). Timing ``run`` on an input encrypted once isolates
the server's work; one ``encrypt_run_decrypt`` round trip per circuit is recorded as well. Three
kinds of circuit, together covering the crypto parameter sets and the work of our builds:

* ``tlu``: one table lookup over a vector of ``m`` elements of ``bits`` bits (level-1 bootstraps
  at polynomial sizes 512..16384 for 2..7 bits, level 2 at 32768 for 8 bits);
* ``chain``: a lookup, a clear matrix product of large 2-norm, then a lookup of ``bits`` bits:
  the second lookup's input is noisy, so the optimizer picks level-2 bootstraps, the parameter
  sets of the convolutions of our builds (e.g. polynomial size 8192, ``input_lwe_dimension``
  896, level 2, base log 15 at 6 bits, as in ``cifar10-split-tiny``; at p_error 0.01, N=2048,
  level 2 with key switches at level 8, as in every ``-r6`` build);
* ``dense``: two rounded layers (ternary matrices, accumulators rounded to 6 bits, 2-bit
  activations, p_error 0.01), with more multiply-adds on ciphertexts per PBS than the CNV's
  convs, so the fit can price the linear work too.

A 2-bit lookup on a single element measures the fixed cost of a run with PBS, which the fit
(:func:`zoo.cost.model.fit`) separates from the per-PBS cost.

With ``wop=True`` a fourth kind, ``wop``, times WoP-PBS lookups (see :mod:`zoo.cost.model`): a
lookup of ``bits`` bits over ``m`` elements beside one 12-bit lookup, which makes concrete compile
every lookup of the circuit as WoP-PBS, as in a circuit with wide accumulators (the unrounded
VGG11). They get a fit of their own (:func:`zoo.cost.model.fit_wop`). numpy and concrete are
imported inside the functions only.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from zoo.catalog import versions
from zoo.cost import model as cost
from zoo.cost.machine import cpu, cpu_ticks, others, steal
from zoo.errors import RuntimeMismatchError
from zoo.fhe import sigpipe

BUILD_P_ERROR = 2**-40  # recipes/split_cnv.py ARCHS[*]["p_error"]
#: The p_error of the rounded variants (``-r<bits>``): smaller polynomials and deeper key
#: switches (level 8 at 6 bits against 4 at 2**-40), so key switches weigh more in a run.
ROUNDED_P_ERROR = 0.01
ROUNDED_BITS = (4, 5, 6)
MIN_BITS, MAX_BITS = 2, 8
DEFAULT_MAX_BITS = 7  # 8 bits add polynomial size 32768: ~2 min more keygen on 2 busy cores
CHAIN_BITS = (5, 6, 7)  # level-2 parameter sets at polynomial sizes 4096, 8192, 16384
CHAIN_WEIGHT = 16  # clear weight of the chain's matrix product (its 2-norm forces level 2)


@dataclass(frozen=True)
class PointSpec:
    """One benchmark circuit: ``kind`` (tlu / chain), lookup ``bits``, input ``shape``."""

    kind: str
    bits: int
    shape: tuple[int, ...]
    p_error: float = BUILD_P_ERROR

    @property
    def name(self) -> str:
        """E.g. ``tlu-6bit-16``, ``chain-6bit-2x3`` or ``tlu-6bit-128-p0.01`` (kind, bits,
        input shape, p_error when not the builds' default)."""
        name = f"{self.kind}-{self.bits}bit-{'x'.join(str(d) for d in self.shape)}"
        return name if self.p_error == BUILD_P_ERROR else f"{name}-p{self.p_error:g}"


# Elements per circuit: enough PBS per lookup that the cores work in the throughput regime of
# a real network layer (hundreds of independent PBS), few enough that the slow widths stay
# quick. Small circuits cost more per PBS: on the first quiet 2-core machine the (896, level 2,
# N=8192) bootstrap took 77 ms in a 12-PBS chain but 60 ms in a 96-PBS one, and
# cifar10-split-tiny's 1,408 of them ran at ~63 ms each.
TLU_ELEMENTS = {2: 256, 3: 256, 4: 128, 5: 128, 6: 128, 7: 32, 8: 8}
CHAIN_ROWS = {5: 64, 6: 16, 7: 4}  # x is (rows, k) with k = (2**bits - 1) // CHAIN_WEIGHT
# A 6-bit chain at the rounded p_error compiles to the parameter sets of the rounded 6-bit builds
# (-r6): bootstraps at N=2048, n=815, level 2, key switches at level 8, which no lookup alone
# reaches (the 6-bit p0.01 lookup gets level 1 and key switches at level 6).
ROUNDED_CHAIN_BITS, ROUNDED_CHAIN_ROWS = 6, 64
# Two rounded layers (``dense``), as concrete-ml compiles a rounded network: 2-bit inputs times a
# ternary (2048 x 1024) matrix, the accumulator rounded to 6 bits, a lookup to 2 bits, then the
# same through a (1024 x 1024) matrix. It compiles to the parameter sets of the -r6 builds, and its
# ~1,500 multiply-adds on ciphertexts per PBS (the CNV's 3x3 convs: ~800), which the other
# circuits lack, let the fit price the linear work (each operation on k x N + 1 words).
DENSE_SPEC_SHAPE = (2048, 1024)
# One 2-bit lookup on one element: its run is almost only the fixed cost of a run with PBS
# (~30-60 ms here, against ~1 ms for a run without PBS), which the fit needs to separate.
OVERHEAD_SPEC = PointSpec("tlu", 2, (1,))


# WoP lookups: bits -> elements (with the 12-bit anchor: 64, 32 and 16 lookups). Layer-sized:
# on the first quiet 2-core machine a WoP lookup cost 0.83 s in a circuit of 65, 1.08 s in one of 8,
# and circuits of 3-9 lookups priced the 65-lookup one 24-40% too high. ~25-50 s per run,
# ~0.5 GiB of bootstrap keys and ~10 s of keygen each.
WOP_ELEMENTS = {4: 63, 12: 31, 14: 15}
WOP_ANCHOR_BITS = 12  # a lookup this wide is WoP-PBS, and with it every lookup of the circuit


def wop_specs() -> list[PointSpec]:
    """The WoP circuits of ``zoo bench pbs --wop``."""
    return [PointSpec("wop", b, (m,)) for b, m in WOP_ELEMENTS.items()]


def wop_lookups(spec: PointSpec) -> dict[str, int]:
    """Lookups per bit width of a WoP spec's circuit (its lookup and the anchor)."""
    counts = {str(spec.bits): spec.shape[0]}
    key = str(WOP_ANCHOR_BITS)
    counts[key] = counts.get(key, 0) + 1
    return counts


def point_specs(max_bits: int = MAX_BITS, min_bits: int = MIN_BITS) -> list[PointSpec]:
    """The circuits ``zoo bench pbs`` measures for lookups of ``min_bits``..``max_bits`` bits."""
    if not MIN_BITS <= min_bits <= max_bits <= MAX_BITS:
        raise ValueError(f"bit widths must satisfy {MIN_BITS} <= min <= max <= {MAX_BITS}")
    specs = [PointSpec("tlu", b, (TLU_ELEMENTS[b],)) for b in range(min_bits, max_bits + 1)]
    for b in CHAIN_BITS:
        if min_bits <= b <= max_bits:
            specs.append(PointSpec("chain", b, (CHAIN_ROWS[b], (2**b - 1) // CHAIN_WEIGHT)))
    specs += [PointSpec("tlu", b, (TLU_ELEMENTS[b],), ROUNDED_P_ERROR)
              for b in ROUNDED_BITS if min_bits <= b <= max_bits]  # fmt: skip
    if min_bits <= ROUNDED_CHAIN_BITS <= max_bits:
        k = (2**ROUNDED_CHAIN_BITS - 1) // CHAIN_WEIGHT
        specs.append(
            PointSpec("chain", ROUNDED_CHAIN_BITS, (ROUNDED_CHAIN_ROWS, k), ROUNDED_P_ERROR)
        )
        specs.append(PointSpec("dense", ROUNDED_CHAIN_BITS, DENSE_SPEC_SHAPE, ROUNDED_P_ERROR))
    return specs


def _compile(spec: PointSpec, seed: int = 0) -> tuple[Any, Any]:
    """Compile ``spec``'s circuit; returns (circuit, an input sample)."""
    import numpy as np
    from concrete import fhe

    rng = np.random.default_rng(seed)
    bits = spec.bits
    # the input: ``shape`` of ``bits``-bit values; a dense layer's is one row of 2-bit values
    shape, high = (spec.shape[:1], 3) if spec.kind == "dense" else (spec.shape, 2**bits - 1)
    inputset = [rng.integers(0, high + 1, size=shape) for _ in range(16)]
    inputset += [np.full(shape, high), np.full(shape, high - 1), np.zeros(shape)]
    inputset = [a.astype(np.int64) for a in inputset]
    if spec.kind == "tlu":
        table = fhe.LookupTable([(7 * i + 3) % 2**bits for i in range(2**bits)])

        @fhe.compiler({"x": "encrypted"})
        def tlu(x):
            return table[x]

        function = tlu
    elif spec.kind == "chain":
        k = spec.shape[-1]
        weights = np.full((k, k), CHAIN_WEIGHT, dtype=np.int64)

        @fhe.compiler({"x": "encrypted"})
        def chain(x):
            parity = fhe.univariate(lambda v: v % 2)(x)
            return fhe.univariate(lambda v: (7 * v + 3) % 2**bits)(parity @ weights)

        function = chain
    elif spec.kind == "dense":
        inputs, width = spec.shape
        layers = [
            rng.integers(-1, 2, size=(inputs, width)),
            rng.integers(-1, 2, size=(width, width)),
        ]
        rounders = [fhe.AutoRounder(target_msbs=bits) for _ in layers]

        @fhe.compiler({"x": "encrypted"})
        def dense(x):
            for weights, rounder in zip(layers, rounders):
                x = fhe.round_bit_pattern(
                    x @ weights, lsbs_to_remove=rounder, exactness=fhe.Exactness.APPROXIMATE
                )
                x = fhe.univariate(lambda v, r=rounder: (v >> r.lsbs_to_remove) % 4)(x)
            return x

        function = dense
    elif spec.kind == "wop":
        table = fhe.LookupTable([(7 * i + 3) % 2**bits for i in range(2**bits)])
        anchor = fhe.LookupTable([(5 * i + 1) % 2**WOP_ANCHOR_BITS
                                  for i in range(2**WOP_ANCHOR_BITS)])  # fmt: skip

        @fhe.compiler({"x": "encrypted", "z": "encrypted"})
        def wop(x, z):
            return table[x], anchor[z]

        function = wop
    else:
        raise ValueError(f"unknown benchmark circuit kind {spec.kind!r}")
    if spec.kind == "wop":
        top = 2**WOP_ANCHOR_BITS - 1
        anchors = [np.array([v]) for v in rng.integers(0, top + 1, size=len(inputset) - 2)]
        anchors += [np.array([top]), np.array([0])]
        inputset = [(x, z.astype(np.int64)) for x, z in zip(inputset, anchors)]
    circuit = function.compile(inputset, p_error=spec.p_error, global_p_error=None,
                               auto_adjust_rounders=spec.kind == "dense")  # fmt: skip
    if spec.kind == "wop" and not circuit.statistics.get("packing_key_switch_count"):
        raise RuntimeMismatchError(
            f"{spec.name}: concrete compiled the {WOP_ANCHOR_BITS}-bit lookup without WoP-PBS; "
            "this concrete-python chooses otherwise, so the WoP benchmark does not apply",
            hint="run `zoo bench pbs` without --wop / --add-wop",
        )
    return circuit, inputset[0]


@dataclass
class _Prepared:
    """A compiled circuit with its keys and one encrypted input, ready to be timed."""

    spec: PointSpec
    circuit: Any
    sample: Any
    encrypted: Any
    compile_seconds: float
    keygen_seconds: float
    runs: list[float]


def _prepare(spec: PointSpec) -> _Prepared:
    """Compile, keygen, encrypt once and run once (the first run is up to 3x slower: the keys
    are first touched then, so it is a warm-up and is not counted)."""
    start = time.perf_counter()
    circuit, sample = _compile(spec)
    compiled = time.perf_counter() - start
    start = time.perf_counter()
    circuit.keygen()
    keygen = time.perf_counter() - start
    encrypted = circuit.encrypt(*_args(sample))
    circuit.run(*_args(encrypted))
    sigpipe.restore()
    return _Prepared(spec, circuit, sample, encrypted, compiled, keygen, [])


def _args(value: Any) -> tuple[Any, ...]:
    """A circuit's arguments: the WoP circuits take two."""
    return value if isinstance(value, tuple) else (value,)


def _statistics(circuit: Any) -> dict[str, Any]:
    from zoo.build.package import jsonable_statistic

    raw = dict(circuit.statistics)
    keep = ("programmable_bootstrap_count", "programmable_bootstrap_count_per_parameter",
            "key_switch_count", "key_switch_count_per_parameter",
            *(f"{key}_count_per_parameter" for key in cost.LINEAR_KEYS))  # fmt: skip
    return {key: jsonable_statistic(key, raw[key]) for key in keep if key in raw}


def _point(prepared: _Prepared) -> dict[str, Any]:
    """The measured point as stored in the calibration (without the fit's columns)."""
    spec, circuit = prepared.spec, prepared.circuit
    stats = _statistics(circuit)
    start = time.perf_counter()
    circuit.encrypt_run_decrypt(*_args(prepared.sample))
    round_trip = time.perf_counter() - start
    extra = {"lookups_by_bit_width": wop_lookups(spec)} if spec.kind == "wop" else {}
    return {
        "circuit": spec.name,
        "kind": spec.kind,
        "bits": spec.bits,
        "shape": list(spec.shape),
        "p_error": spec.p_error,
        "max_bit_width": int(circuit.graph.maximum_integer_bit_width()),
        "pbs_count": int(stats.get("programmable_bootstrap_count", 0)),
        "pbs_count_per_parameter": stats.get("programmable_bootstrap_count_per_parameter", []),
        "key_switch_count_per_parameter": stats.get("key_switch_count_per_parameter", []),
        **{k: v for k, v in stats.items() if k.split("_count")[0] in cost.LINEAR_KEYS},
        "run_seconds": [round(r, 6) for r in prepared.runs],
        "run_seconds_median": statistics.median(prepared.runs),
        "encrypt_run_decrypt_seconds": round(round_trip, 6),
        "compile_seconds": round(prepared.compile_seconds, 3),
        "keygen_seconds": round(prepared.keygen_seconds, 3),
        **extra,
    }


def measure(
    specs: list[PointSpec],
    repetitions: int = 5,
    progress: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """Time each circuit on its own: compile, keygen, a warm-up run, ``repetitions`` timed runs
    of ``circuit.run``, then drop its keys before the next one.

    That is how an inference runs (one circuit, its keys, run after run). Keeping every
    circuit's keys in memory and timing them round-robin (8.4 GiB of evaluation keys up to 8
    bits) made the same circuits 20-40% slower on the first 2-core machine (a 96-PBS chain at
    N=8192: 8.2 s against 6.0 s alone), while alternating two circuits cost only ~5%: the
    calibration needs a quiet machine either way, and one circuit at a time measures what a
    user will see.
    """
    import gc

    say = progress or (lambda line: None)
    points = []
    for spec in specs:
        item = _prepare(spec)
        say(f"{spec.name}: compiled and keys generated ({item.keygen_seconds:.1f} s)")
        for _ in range(repetitions):
            start = time.perf_counter()
            item.circuit.run(*_args(item.encrypted))
            item.runs.append(time.perf_counter() - start)
        sigpipe.restore()
        points.append(_point(item))
        del item
        gc.collect()
    return points


def machine() -> dict[str, Any]:
    """This CPU (:func:`zoo.cost.machine.cpu`) and what concrete is allowed to use on it."""
    return {
        **cpu(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "platform": platform.platform(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }


def run_pbs_bench(
    max_bits: int = DEFAULT_MAX_BITS,
    min_bits: int = MIN_BITS,
    repetitions: int = 5,
    out: Path | None = None,
    note: str | None = None,
    progress: Callable[[str], None] | None = None,
    wop: bool = False,
    add_wop: bool = False,
) -> tuple[dict[str, Any], Path]:
    """Measure the benchmark circuits, fit :mod:`zoo.cost.model`'s model and save the calibration.

    Args:
        max_bits / min_bits: range of lookup bit widths (8-bit keygen is the slow part).
        repetitions: timed runs per circuit (the median is kept).
        out: where to write the JSON (default ``$ZOO_HOME/calibration/pbs.json``).
        note: free text stored with the calibration (e.g. "measured under load").
        progress: called with one line per step.
        wop: also time WoP-PBS lookups (:func:`wop_specs`).
        add_wop: time only the WoP lookups and add them to the calibration already at ``out``
            (measured with the installed concrete-python), keeping its other points.

    Returns:
        The calibration document and the path it was written to.
    """
    say = progress or (lambda line: None)
    out = Path(out) if out else cost.user_calibration_path()
    started, ticks = time.perf_counter(), cpu_ticks()
    before = machine()
    base: dict[str, Any] = {}
    if add_wop:
        try:
            base = json.loads(out.read_text())
            reason = cost.stale_reason(base)
        except (OSError, ValueError, AttributeError) as exc:
            raise ValueError(f"--add-wop needs a calibration at {out}: {exc}") from None
        if reason:
            raise ValueError(f"{out} was {reason}: run `zoo bench pbs` without --add-wop")
        kept = [p for p in base.get("points", []) if p.get("kind") != "wop"]
        points = kept + measure(wop_specs(), repetitions, say)
    else:
        specs = [OVERHEAD_SPEC, *point_specs(max_bits, min_bits), *(wop_specs() if wop else [])]
        points = measure(specs, repetitions, say)
    document = {**base, **cost.make_calibration(points)}
    for point in points:
        params = "; ".join(cost.describe(r["parameter"]) for r in point["pbs_count_per_parameter"])
        what = "lookup" if point.get("kind") == "wop" else "PBS"
        say(
            f"{point['circuit']}: {point['pbs_count']} {what} [{params}] "
            f"{point['seconds_per_pbs'] * 1e3:.2f} ms per {what}, "
            f"fit {point['relative_error']:+.0%}"
        )
    after = cpu_ticks()
    measured = {
        "created": _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat(),
        "machine": {
            **before,
            "load_average_after": machine()["load_average"],
            "cpu_steal": steal(ticks, after),
            "cpu_others": others(ticks, after),
        },
        "versions": {k: versions.installed()[k] for k in versions.BINDING},
        "p_error": BUILD_P_ERROR,
        "repetitions": repetitions,
        "bench_seconds": round(time.perf_counter() - started, 1),
    }
    if add_wop:  # the classic points keep their own date and machine
        document["wop_measured"] = {**measured, "note": note} if note else measured
    else:
        document.update(measured, bits=[min_bits, max_bits])
        if note:
            document["note"] = note
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(document, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, out)
    return document, out
