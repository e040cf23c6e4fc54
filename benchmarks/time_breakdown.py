"""Where one image's real-FHE time goes: bootstraps, key switches, linear work and the rest.

For a build and its measured real-FHE seconds per image on this machine (a ``zoo eval --fhe
execute`` results file), it prices the build's bootstraps (PBS), key switches (KS) and linear
work (the clear multiplications and additions on ciphertexts concrete reports, times the
ciphertext size) with this machine's calibration (``zoo bench pbs``, see
``zoo/cost/model.py``); what the model does not explain is the rest.
Next to it, the physical floor: the build's PBS count times the bench's best per-PBS time on
this machine (its cheapest bootstrap, key switch included), the time no circuit with that many
PBS can beat here.

    .venv/bin/python benchmarks/time_breakdown.py cifar10-split-8bit-head2-r6@9c547ae \\
        benchmarks/results/fhe/cifar10-split-8bit-head2-r6@9c547ae0dd70-execute-n50-seed0-avx512.jsonl

One JSON line per run goes to ``benchmarks/results/time_breakdown.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from zoo import api  # noqa: E402
from zoo.cost import machine  # noqa: E402
from zoo.cost import model as cost  # noqa: E402
from zoo.fhe.evaluate import parse_results, seconds_by_machine  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def measured_here(path: Path) -> dict[str, Any] | None:
    """``{"machine", "n_images", "seconds_per_image"}`` of the images of a results file that ran
    alone on this kind of machine (:func:`zoo.fhe.evaluate.seconds_by_machine`), None if none
    did."""
    _, records = parse_results(path.read_text())
    here = cost.describe_machine(machine.cpu())
    rows = seconds_by_machine([r for r in records.values() if "seconds" in r])
    return next((r for r in rows if "parallel" not in r and r["machine"]
                 and cost.describe_machine(r["machine"]) == here), None)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    """Print the breakdown and append it to the results file."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("ref", help="VARIANT@REV")
    parser.add_argument("results", type=Path, help="its `zoo eval --fhe execute` results file")
    parser.add_argument("--out", type=Path, default=RESULTS / "time_breakdown.jsonl")
    args = parser.parse_args(argv)

    pulled = api.pull(args.ref)
    circuit = json.loads((pulled.path / "manifest.json").read_text())["circuit"]
    stats = circuit["concrete_statistics"]
    calibration = cost.current_calibration()
    if calibration is None or (calibration.get("source") or {}).get("other_machine"):
        raise SystemExit("calibrate this machine first: zoo bench pbs")
    estimate = cost.breakdown(circuit, calibration)
    ks = sum(r["seconds"] for r in estimate["rows"] if r.get("key_switch"))
    linear = sum(r["seconds"] for r in estimate["rows"] if r.get("linear"))
    pbs = sum(r["seconds"] for r in estimate["rows"] if not r.keys() & {"key_switch", "linear"})
    here = measured_here(args.results)
    if here is None:
        raise SystemExit(f"{args.results}: no image measured on this kind of machine")
    measured = here["seconds_per_image"]
    ops = sum(int(row["count"]) for key in cost.LINEAR_KEYS
              for row in stats.get(f"{key}_count_per_parameter") or [])  # fmt: skip
    work = cost.linear_work(stats) or 0.0
    points = [
        p for p in calibration["points"] if p.get("kind") != "wop" and p.get("seconds_per_pbs")
    ]
    best = min(p["seconds_per_pbs"] for p in points)
    # the bench's fastest circuit on exactly this build's parameter sets (key switch included)
    mine = [r["parameter"] for r in cost.pbs_rows(circuit)]
    same = [p for p in points if [r["parameter"] for r in p["pbs_count_per_parameter"]] == mine]
    own = min((p["seconds_per_pbs"] for p in same), default=None)
    row = {
        "ref": pulled.build.short_ref,
        "machine": cost.describe_machine(here["machine"]),
        "calibration": calibration.get("created"),
        "n_images": here["n_images"],
        "measured_seconds_per_image": round(measured, 1),
        "pbs_count": int(circuit["pbs_count"]),
        "pbs_seconds": round(pbs, 1),
        "key_switch_count": int(circuit["key_switch_count"]),
        "key_switch_seconds": round(ks, 1),
        "overhead_seconds": round(estimate["overhead_seconds"], 3),
        "linear_operations": ops,
        "linear_work": work,
        "linear_seconds": round(linear, 1),
        "rest_seconds": round(measured - estimate["total_seconds"], 1),
        "estimate_seconds": round(estimate["total_seconds"], 1),
        "estimate_error": round(estimate["total_seconds"] / measured - 1, 3),
        "floor_seconds_per_pbs": best,
        "floor_seconds": round(int(circuit["pbs_count"]) * best, 1),
        "bench_seconds_per_pbs_same_parameters": own,
    }
    print(
        f"{row['ref']} on {row['machine']}: measured {measured:.1f} s/img"
        f" ({row['n_images']} images)"
        f" = PBS {pbs:.1f} + KS {ks:.1f} + linear {linear:.1f} ({ops:,} ops, {work:.3g} word-ops)"
        f" + overhead {row['overhead_seconds']:.2f} + rest {row['rest_seconds']:.1f};"
        f" estimate {row['estimate_seconds']:.1f} ({row['estimate_error']:+.0%});"
        f" floor {row['floor_seconds']:.1f} s = {row['pbs_count']:,} PBS x {best * 1e3:.2f} ms"
        + (
            f"; at the bench's {own * 1e3:.2f} ms per PBS of this parameter set:"
            f" {int(circuit['pbs_count']) * own:.1f} s"
            if own
            else ""
        )
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("a") as handle:
        handle.write(json.dumps(row, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
