"""FHE-simulation throughput: test images per second through a pinned build's clear head and the
simulated circuit (what `zoo eval --fhe simulate` runs), on this machine. Results go to
benchmarks/results/simulate.json, one row per variant, with the machine they ran on.

    .venv/bin/python benchmarks/bench_simulate.py [-n 200] [--build-missing] [VARIANT ...]

The default variants are the smoke builds, which `--build-missing` rebuilds byte for byte in
seconds to minutes when no hub has them (a full build would train for hours: pull those from a
hub). A variant whose pinned files cannot be had is reported as skipped, with the reason.

The time is that of `Model.logits(images, "simulate")` on the first ``-n`` test images (clear head
and simulated circuit), after one image has compiled the simulator from server.zip's MLIR (that
compile is reported apart, as `simulator_seconds`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from zoo.build import kernels  # noqa: E402
from zoo.cost import machine  # noqa: E402

kernels.pin()  # before torch starts: a `--build-missing` rebuild must use the pinned kernels

from zoo import api, config  # noqa: E402
from zoo.build.data import load_split  # noqa: E402
from zoo.catalog import registry as reg  # noqa: E402
from zoo.errors import ZooError  # noqa: E402
from zoo.fhe import runtime  # noqa: E402

#: smoke builds, pinned: a bare name would take a variant's newest build, e.g. a trained one
DEFAULT_VARIANTS = ("cifar10-split-tiny", "cifar10-split-tiny-r4", "cifar10-cnv-2w2a@dde39c7626ae")
OUT = ROOT / "benchmarks" / "results" / "simulate.json"


def measure(ref: str, n_images: int, build_missing: bool) -> dict:
    """Pull (or rebuild) the pinned build ``VARIANT[@REV]``, then time the simulation of
    ``n_images``."""
    build = api.pull(ref, build_missing=build_missing).build
    model = runtime.load(build.ref)
    dataset = reg.load().variant(build.variant).dataset
    images, labels = load_split(config.data_dir(), dataset, "test")
    images, labels = images[:n_images], labels[:n_images]
    started = time.perf_counter()
    model.logits(images[:1], "simulate")
    simulator_seconds = time.perf_counter() - started
    started = time.perf_counter()
    logits = model.logits(images, "simulate")
    seconds = time.perf_counter() - started
    return {
        "variant": build.variant,
        "revision": build.revision[:12],
        "n_images": len(images),
        "seconds": round(seconds, 3),
        "images_per_second": round(len(images) / seconds, 3),
        "simulator_seconds": round(simulator_seconds, 3),
        "fhe_simulation_top1": float((logits.argmax(1) == labels).mean()),
    }


def main() -> None:
    """Run the benchmark and write its JSON."""
    parser = argparse.ArgumentParser()
    parser.add_argument("variants", nargs="*", default=list(DEFAULT_VARIANTS))
    parser.add_argument("-n", "--n-images", type=int, default=200)
    parser.add_argument(
        "--build-missing",
        action="store_true",
        help="rebuild a pinned build that no hub has (checked byte for byte)",
    )
    args = parser.parse_args()
    rows, skipped = [], []
    for variant in args.variants:
        try:
            row = measure(variant, args.n_images, args.build_missing)
            rows.append(row)
        except ZooError as error:
            row = {"variant": variant, "reason": str(error)}
            skipped.append(row)
        print(json.dumps(row), flush=True)
    result = {
        "command": "benchmarks/bench_simulate.py " + " ".join(sys.argv[1:]),
        "machine": machine.cpu(),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "rows": rows,
        "skipped": skipped,
    }
    OUT.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
