"""The accuracy–latency picture of every pinned build, from registry.json (measured by
`zoo build` and `zoo eval`) and the cost model (`zoo.cost.model`, calibrated by `zoo bench pbs`).

Writes benchmarks/results/tradeoff.json (one row per variant: profile, top-1 clear / FHE
simulation / real FHE, PBS count, estimated and measured real-FHE seconds per image here with
the estimate's relative error, eval-key size, keygen time of the last real-FHE run that made
keys, build and compile wall times) and
benchmarks/results/tradeoff.png (top-1 against seconds per image, measured where `zoo eval
--record` ran real FHE, else estimated; log scale, with the published reference points),
benchmarks/RESULTS.md (the table of every variant's newest build, yanked ones included), and the
README's table of live builds, between its ``variants:begin`` / ``variants:end`` markers. None
of these is edited by hand.

    .venv/bin/python benchmarks/tradeoff.py

Reference points were measured on 128-vCPU machines; they are drawn at their core-seconds
divided by this machine's core count (perfect scaling, the most favourable reading for them).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from zoo.catalog import registry as reg  # noqa: E402
from zoo.cost import model as cost  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
REFERENCE_CPUS = 128
BEGIN, END = "<!-- variants:begin -->", "<!-- variants:end -->"
MIN_REAL_IMAGES = 10  # fewer real-FHE images say nothing about accuracy: plot simulation then


def rows(registry: reg.Registry) -> list[dict[str, Any]]:
    """One row per variant with a pinned build: its newest live one, else its newest yanked one
    (what was measured, marked as not obtainable)."""
    out = []
    for variant in registry.variants.values():
        if not variant.builds:
            continue
        build = (variant.live or variant.builds)[-1]
        metrics, circuit, timings = build.metrics, build.circuit, build.raw.get("timings", {})
        estimate = cost.breakdown(circuit)
        measured = metrics.get("fhe_execute_seconds_per_image")
        # the estimate is for the calibration's machine: a run elsewhere is not its test
        calibration = estimate and estimate["calibration"]
        here = calibration and cost.describe_machine(calibration)
        comparable = (measured and metrics.get("fhe_execute_machine") == here
                      and not metrics.get("fhe_execute_conditions"))  # fmt: skip
        out.append(
            {
                "variant": variant.name,
                "revision": build.revision[:12],
                "yanked": build.yanked,
                "profile": build.profile,
                "n_test_images": metrics.get("n_test_images"),
                "n_simulated_images": metrics.get("n_simulated_images"),
                "clear_top1": metrics.get("clear_top1"),
                "fhe_simulation_top1": metrics.get("fhe_simulation_top1"),
                "fhe_execute_top1": metrics.get("fhe_execute_top1"),
                "fhe_execute_n_images": metrics.get("fhe_execute_n_images"),
                "max_bit_width": circuit.get("max_bit_width"),
                "pbs_count": circuit.get("pbs_count"),
                "pbs_count_by_bit_width": circuit.get("pbs_count_by_bit_width"),
                "estimated_fhe_seconds_per_image": estimate and estimate["total_seconds"],
                "estimate_method": estimate and estimate["method"],
                "estimate_is_lower_bound": bool(estimate and estimate["lower_bound"]),
                # a WoP circuit priced from another kind of machine's WoP points: where
                "estimate_wop_other_machine": estimate["calibration"]["wop_other_machine"]
                if estimate and estimate["method"] == "wop"
                else None,
                "fhe_execute_seconds_per_image": measured,
                "fhe_execute_timed_images": metrics.get("fhe_execute_timed_images"),
                # set when the run was not clean (e.g. cores shared): then no error is computed
                "fhe_execute_conditions": metrics.get("fhe_execute_conditions"),
                "fhe_execute_machine": metrics.get("fhe_execute_machine"),
                # measured on another kind of machine than the estimate's calibration describes
                "fhe_execute_elsewhere": bool(measured)
                and metrics.get("fhe_execute_machine") != here,
                # the cost model's error against a clean real-FHE run on the calibration's machine
                "estimate_relative_error": (estimate["total_seconds"] / measured - 1)
                if comparable
                else None,
                "eval_key_bytes": circuit.get("eval_key_bytes"),
                "eval_key_bytes_serialized": metrics.get("eval_key_bytes_serialized"),
                "keygen_seconds": metrics.get("keygen_seconds"),
                "build_seconds": timings.get("build_seconds"),
                "build_in_pieces_unknown": bool(timings.get("pieces")),
                "compile_seconds": timings.get("compile_seconds"),
            }
        )
    return out


def references(registry: reg.Registry, cpus: int) -> list[dict[str, Any]]:
    """Published points with a real-FHE time and an accuracy, scaled to ``cpus`` cores."""
    out = []
    for variant in registry.variants.values():
        metrics = variant.reference["metrics"]
        seconds = metrics.get("fhe_execute_seconds_per_image")
        top1 = metrics.get("fhe_execute_top1") or metrics.get("fhe_simulation_top1")
        if seconds and top1:
            out.append(
                {
                    "variant": variant.name,
                    "top1": top1,
                    "seconds_on_reference": seconds,
                    "core_seconds": seconds * REFERENCE_CPUS,
                    "seconds_here_if_scaled": seconds * REFERENCE_CPUS / cpus,
                    "source": variant.reference["source"],
                }
            )
    return out


def plot(table: list[dict[str, Any]], refs: list[dict[str, Any]], path: Path) -> None:
    """Top-1 (real FHE if measured, else FHE simulation) against estimated seconds per image."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    plotted = 0
    for row in table:
        real = (row["fhe_execute_n_images"] or 0) >= MIN_REAL_IMAGES
        top1 = row["fhe_execute_top1"] if real else row["fhe_simulation_top1"]
        measured = row["estimate_relative_error"] is not None  # a clean run on this machine
        seconds = (
            row["fhe_execute_seconds_per_image"] if measured
            else row["estimated_fhe_seconds_per_image"]
        )  # fmt: skip
        if top1 is None or not seconds:
            continue
        color = "tab:gray" if row["yanked"] else "tab:green" if measured else "tab:blue"
        ax.scatter(seconds, top1, color=color)
        label = f"{row['variant']} ({row['profile']}{', yanked' if row['yanked'] else ''})"
        ax.annotate(label, (seconds, top1), fontsize=7,
                    xytext=(4, 3 if plotted % 2 else -10),  # neighbours' labels apart
                    textcoords="offset points")  # fmt: skip
        plotted += 1
    for ref in refs:
        ax.scatter(ref["seconds_here_if_scaled"], ref["top1"], color="tab:red", marker="x")
        point = (ref["seconds_here_if_scaled"], ref["top1"])
        ax.annotate(f"reference: {ref['variant']}", point, fontsize=7, color="tab:red",
                    xytext=(4, -9), textcoords="offset points")  # fmt: skip
    ax.set_xscale("log")
    ax.set_xlabel(
        f"real-FHE seconds per image on this {os.cpu_count()}-core machine\n"
        "(zoo builds: green measured on a quiet machine, blue cost-model estimate, gray yanked;\n"
        "references: core-seconds / cores)"
    )
    ax.set_ylabel(f"top-1 (real FHE if measured on ≥ {MIN_REAL_IMAGES} images, else FHE sim.)")
    ax.set_title("zoo variants: accuracy against FHE cost (CIFAR-10 JPEG q75 copy)")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)


RESULTS_HEADER = """# Results: every variant's newest build

Generated from `registry.json` by `python benchmarks/tradeoff.py`; do not edit. Accuracies are on
CIFAR-10 *(JPEG q75 copy)*, the data available here. The estimate is the cost model of
`zoo.cost.model` with {calibration}; the measured time is `server.run` per image in `zoo eval
--fhe execute --record`, with the estimate's error only where it ran on that kind of machine. A
row marked "(yanked)" is a build that can no longer be had: its numbers are history
(docs/variants.md). An estimate marked † prices WoP-PBS lookups (11 bits and more) with the WoP
points of another kind of machine (the default calibration's; docs/cost-model.md), one marked ≥
is a lower bound. "[N timed]": the seconds are those of the N images that ran with nothing else
on the machine (the others shared it: Ray workers side by side, or other work, or ran on another
machine: `zoo info` lists those). Eval keys:
serialized (`zoo keygen --record`), else concrete's in-memory figure (*). Build seconds count
every command of a build made in pieces (`--resume`), but those marked ‡, which resumed
checkpoints from before they kept their training time: theirs are the last command's, and their
whole training is in docs/benchmarks.md and docs/variants.md.

![top-1 against FHE seconds per image](results/tradeoff.png)

"""


def _num(value: Any, digits: int = 0) -> str:
    if value is None:
        return "–"
    return f"{value:,.{digits}f}"


def _measured(row: dict[str, Any]) -> str:
    """Real-FHE seconds per image, with how many images they cover when not all the sample."""
    timed, n = row["fhe_execute_timed_images"], row["fhe_execute_n_images"]
    seconds = _num(row["fhe_execute_seconds_per_image"])
    return seconds + (f" [{timed} timed]" if timed and timed != n else "")


def _keys(row: dict[str, Any]) -> str:
    """Serialized evaluation keys (what a client uploads), else concrete's in-memory figure*."""
    if row["eval_key_bytes_serialized"]:
        return f"{row['eval_key_bytes_serialized'] / 2**20:,.0f} MiB"
    keys = row["eval_key_bytes"]
    return "–" if keys is None else f"{keys / 2**20:,.0f} MiB*"


def _estimate(row: dict[str, Any]) -> str:
    """The estimate, ``≥`` when a lower bound, ``†`` when its WoP points are another machine's."""
    bound = "≥ " if row["estimate_is_lower_bound"] else ""
    elsewhere = "†" if row["estimate_wop_other_machine"] else ""
    return f"{bound}{_num(row['estimated_fhe_seconds_per_image'])}{elsewhere}"


def _real(row: dict[str, Any]) -> str:
    if row["fhe_execute_top1"] is None:
        return "–"
    return f"{row['fhe_execute_top1']:.4f} ({row['fhe_execute_n_images']})"


def readme_table(table: list[dict[str, Any]]) -> str:
    """The README's table: the live builds, what a user can pull."""
    lines = [
        "| variant | profile | top-1 clear | top-1 FHE sim. (images) | top-1 real FHE (images) "
        "| PBS | est. FHE s/img | measured FHE s/img | eval keys |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in table:
        if row["yanked"]:
            continue
        simulated = row["n_simulated_images"] or row["n_test_images"]
        lines.append(
            f"| `{row['variant']}` | {row['profile']} | {_num(row['clear_top1'], 4)} | "
            f"{_num(row['fhe_simulation_top1'], 4)} ({simulated:,}) | {_real(row)} | "
            f"{row['pbs_count']:,} | {_estimate(row)} | "
            f"{_measured(row)}{'‡' if row['fhe_execute_elsewhere'] else ''} | {_keys(row)} |"
        )
    return "\n".join(lines) + "\n"


def splice(text: str, table: str, begin: str = BEGIN, end: str = END) -> str:
    """``text`` with what stands between the ``begin`` and ``end`` lines replaced by ``table``."""
    head, rest = text.split(begin + "\n", 1)
    _, tail = rest.split(end, 1)
    return f"{head}{begin}\n{table}{end}{tail}"


def markdown(table: list[dict[str, Any]], registry: reg.Registry) -> str:
    """benchmarks/RESULTS.md's table: every variant's newest build (variants without a build get
    a "no build" row; a yanked build's profile says so)."""
    lines = [
        "| variant | profile | test images | top-1 clear | top-1 FHE sim. | top-1 real FHE "
        "(images) | max bits | PBS (by width) | est. FHE s/img | measured FHE s/img (error) "
        "| eval keys | keygen s | build s (compile s) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    rows = {row["variant"]: row for row in table}
    for name in registry.variants:
        row = rows.get(name)
        if row is None:
            lines.append(f"| `{name}` | no build |" + " |" * 11)
            continue
        widths = sorted((row["pbs_count_by_bit_width"] or {}).items(), key=lambda i: int(i[0]))
        by_width = ", ".join(f"{int(n):,} × {w}-bit" for w, n in widths)
        real = _real(row)
        measured = _measured(row)
        if row["estimate_relative_error"] is not None:
            measured += f" ({row['estimate_relative_error']:+.0%})"
        elif row["fhe_execute_conditions"]:
            measured += " (cores shared: no error computed)"
        elif row["fhe_execute_seconds_per_image"] is not None:
            measured += " (on another machine: no error computed)"
        profile = row["profile"] + (" (yanked)" if row["yanked"] else "")
        images = str(row["n_test_images"])
        if row["n_simulated_images"]:
            images += f" ({row['n_simulated_images']} simulated)"
        lines.append(
            f"| `{name}` | {profile} | {images} | "
            f"{_num(row['clear_top1'], 4)} | {_num(row['fhe_simulation_top1'], 4)} | {real} | "
            f"{row['max_bit_width']} | {row['pbs_count']:,} ({by_width}) | "
            f"{_estimate(row)} | {measured} | "
            f"{_keys(row)} | "
            f"{_num(row['keygen_seconds'], 1)} | "
            f"{_num(row['build_seconds'])}{'‡' if row['build_in_pieces_unknown'] else ''} "
            f"({_num(row['compile_seconds'])}) |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    """Render the table and the plot from registry.json."""
    registry = reg.load(ROOT / "registry.json")
    cpus = os.cpu_count() or 1
    table, refs = rows(registry), references(registry, cpus)
    calibration = cost.calibration_summary(cost.current_calibration())
    RESULTS.mkdir(parents=True, exist_ok=True)
    document = {"cpus": cpus, "calibration": calibration, "variants": table, "references": refs}
    (RESULTS / "tradeoff.json").write_text(json.dumps(document, indent=2, sort_keys=True) + "\n")
    plot(table, refs, RESULTS / "tradeoff.png")
    where = (
        f"the {calibration['source']} calibration of {cost.describe_machine(calibration)} "
        f"({calibration['created'][:10]})"
        if calibration
        else "no calibration"
    )
    header = RESULTS_HEADER.replace("{calibration}", where)
    (ROOT / "benchmarks" / "RESULTS.md").write_text(header + markdown(table, registry))
    readme = ROOT / "README.md"
    readme.write_text(splice(readme.read_text(), readme_table(table)))
    for row in table:
        seconds = row["estimated_fhe_seconds_per_image"]
        measured = row["fhe_execute_seconds_per_image"]
        print(f"{row['variant']:24s} {row['profile']:6s} sim {row['fhe_simulation_top1']} "
              f"est {'?' if seconds is None else f'{seconds:.0f}'} s/img"
              + (f", measured {measured:.0f} s/img ({row['estimate_relative_error']:+.0%})"
                 if row["estimate_relative_error"] is not None else ""))  # fmt: skip
    print("wrote benchmarks/results/tradeoff.json and .png, benchmarks/RESULTS.md, README's table")


if __name__ == "__main__":
    main()
