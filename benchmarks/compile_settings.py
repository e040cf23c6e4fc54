"""What a pinned build's circuit would cost and score under other compile settings.

For the build ``REF`` (pulled and verified), each ``--setting`` recompiles its Brevitas module,
calibrated on the same training images, with the build's ``p_error`` / concrete
``multi_parameter_strategy`` replaced as the setting says, then records the cost model's
seconds per image on this machine (term by term), the crypto parameters, and the FHE-simulation
top-1 on the first ``-n`` test images beside the clear top-1 on the same images. This is how a
``compile_from`` variant (``zoo/build/recompile.py``) picks its settings before its build
simulates all 10,000. One JSON line per setting goes to ``--out``; settings already there are
skipped.

    ZOO_DATA_DIR=$PWD/.data .venv/bin/python benchmarks/compile_settings.py \\
        cifar10-cnv-2w2a-r6@b017b136a62a -n 2000 \\
        --setting precision:0.01 --setting precision_and_norm2:0.01 \\
        --setting precision_and_norm2:0.02 --setting precision_and_norm2:0.05

A setting is ``STRATEGY:P_ERROR`` (``precision`` is concrete's default strategy).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from zoo.build import kernels  # noqa: E402

kernels.pin()  # before torch starts: the kernels `zoo build` uses

import zoo  # noqa: E402
from zoo import config  # noqa: E402
from zoo.build.data import load_split  # noqa: E402
from zoo.build.package import circuit_statistics  # noqa: E402
from zoo.build.training import compile_qat, fhe_logits, subset, topk_accuracy  # noqa: E402
from zoo.catalog import registry as reg  # noqa: E402
from zoo.cost import machine  # noqa: E402
from zoo.cost import model as cost  # noqa: E402


def main() -> None:
    """Parse the arguments, then recompile and measure each setting not yet in ``--out``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("ref", help="VARIANT@REV of a pinned build")
    parser.add_argument("-n", type=int, default=2000, help="test images to simulate")
    parser.add_argument("--setting", action="append", required=True, help="STRATEGY:P_ERROR")
    parser.add_argument("--data-dir", type=Path, default=None)
    parser.add_argument("--out", type=Path,
                        default=ROOT / "benchmarks/results/compile_settings.jsonl")  # fmt: skip
    args = parser.parse_args()

    done = set()
    if args.out.exists():
        done = {(r["ref"], r["setting"], r["n_images"])
                for r in map(json.loads, args.out.read_text().splitlines())}  # fmt: skip
    model = zoo.load(args.ref, role="all", circuits=False)
    cfg = model.meta["recipe"]["config"]
    prof = cfg["profile"]
    data_dir = args.data_dir or config.data_dir()
    dataset = reg.load().variant(model.build.variant).dataset
    train_x, _ = subset(*load_split(data_dir, dataset, "train"), prof["n_train"])
    test_x, test_y = load_split(data_dir, dataset, "test")
    test_x, test_y = test_x[: args.n], test_y[: args.n]
    module = model.torch_module()
    calibration = model.head(train_x[: prof["n_calib"]])
    inputs = model.head(test_x)
    clear_top1 = topk_accuracy(model.logits(test_x, "disable"), test_y)[1]
    for setting in args.setting:
        if (model.build.short_ref, setting, args.n) in done:
            print(f"{setting}: in {args.out} already")
            continue
        strategy, p_error = setting.split(":")
        arch = {**cfg["arch"], "multi_parameter_strategy": strategy, "p_error": float(p_error)}
        started, ticks = time.perf_counter(), machine.cpu_ticks()
        with tempfile.TemporaryDirectory() as tmp:
            circuit = compile_qat(module, calibration, arch, Path(tmp) / "circuit.onnx")
        compile_seconds = time.perf_counter() - started
        statistics = circuit_statistics(circuit)
        estimate = cost.breakdown(statistics)
        started = time.perf_counter()
        simulated = fhe_logits(circuit, inputs)
        row = {
            "ref": model.build.short_ref,
            "setting": setting,
            "n_images": args.n,
            "clear_top1": clear_top1,
            "fhe_simulation_top1": topk_accuracy(simulated, test_y)[1],
            "estimated_seconds_per_image": round(estimate["total_seconds"], 1),
            "estimate_terms": [
                {k: t[k] for k in ("parameter", "count", "seconds") if k in t}
                for t in estimate["rows"]
            ],  # fmt: skip
            "p_error_achieved": statistics["p_error"],
            "pbs_count": statistics["pbs_count"],
            "eval_key_bytes": statistics["eval_key_bytes"],
            "compile_seconds": round(compile_seconds, 1),
            "simulate_seconds": round(time.perf_counter() - started, 1),
            "cpu_others": machine.others(ticks, machine.cpu_ticks()),
            "calibration": {
                k: (estimate["calibration"] or {}).get(k)
                for k in ("cpu_model", "cpu_family", "cpu_model_number", "isa")
            },
        }
        with args.out.open("a") as handle:
            handle.write(json.dumps(row, sort_keys=True) + "\n")
        top1, seconds = row["fhe_simulation_top1"], row["estimated_seconds_per_image"]
        print(f"{setting}: est. {seconds:,.0f} s/img, FHE-sim top-1 {top1:.4f} "
              f"(clear {clear_top1:.4f}) on {args.n} images")  # fmt: skip


if __name__ == "__main__":
    main()
