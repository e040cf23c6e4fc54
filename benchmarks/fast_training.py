"""Ablate the shared fast-training schedule (``zoo/build/schedule.py``) on the full-FHE CNV.

Each named configuration trains the ``cnv-2w2a`` architecture (2-bit weights and activations,
no pruning) from the same seed for ``--epochs`` epochs on all 50,000 training images, through the
recipe's own training loop, then measures the clear top-1 of the weights it would ship on the
first ``-n`` test images (the Brevitas model in the clear; FHE simulation follows it within a
point on this architecture). Every configuration keeps its checkpoints under ``--work`` and is
resumed where it stopped (``--stop-after`` seconds ends a run at an epoch boundary), and its
result goes to ``--out`` as one JSON line, with the seconds its training took (summed over the
runs that resumed it, ``seconds.json`` in its folder), as soon as it is done; configurations
already there are skipped.

    .venv/bin/python benchmarks/fast_training.py --epochs 4 \\
        --config baseline --config one-cycle-sgd --config +smoothing --config +ema

The configurations (each adds to the one before it, ``baseline`` being the recipe's ``full``
schedule, Adam at lr 0.02 halved every 5 epochs):
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from zoo.build import kernels  # noqa: E402

kernels.pin()  # before torch starts: the same kernels as `zoo build` (AVX2 on any x86-64)

from zoo import config  # noqa: E402
from zoo.build.data import load_cifar10  # noqa: E402
from zoo.build.run import BuildContext, load_recipe  # noqa: E402
from zoo.cost import model as cost  # noqa: E402
from zoo.cost.machine import cpu  # noqa: E402
from zoo.errors import BuildPaused  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
ONE_CYCLE = {"optimizer": "sgd", "momentum": 0.9, "weight_decay": 5e-4,
             "lr_schedule": "one-cycle", "warmup": 0.2, "lr": 0.1}  # fmt: skip
#: name -> profile overrides of the ``full`` profile (every one trains ``--epochs`` epochs).
CONFIGS: dict[str, dict[str, Any]] = {
    "baseline": {},
    "adam-one-cycle": {"lr_schedule": "one-cycle", "warmup": 0.2, "lr": 0.02},
    "one-cycle-sgd": ONE_CYCLE,
    "+smoothing": {**ONE_CYCLE, "label_smoothing": 0.1},
    "+ema": {**ONE_CYCLE, "label_smoothing": 0.1, "ema_decay": 0.99},
}
__doc__ += "".join(f"\n* ``{name}``: {json.dumps(over)}" for name, over in CONFIGS.items()) + "\n"


def run(
    name: str, epochs: int, n_test: int, work: Path, stop_after: float | None, n_train: int | None
) -> dict | None:
    """Train (or resume) one configuration; its result row, or None if it paused."""
    recipe = load_recipe("recipes/split_cnv.py")
    overrides = {**CONFIGS[name], "epochs": epochs, "n_test": n_test, "monitor_every": epochs}
    params = {"arch": "cnv-2w2a", "profile_overrides": overrides}
    cfg = recipe.resolve_config("cifar10-cnv-2w2a", params, "full", 0)
    folder = work / name
    folder.mkdir(parents=True, exist_ok=True)
    ctx = BuildContext(
        variant="cifar10-cnv-2w2a", params=params, profile="full", seed=0, device="cpu",
        resume=True, work_dir=folder, data_dir=config.data_dir(),
        log=logging.getLogger("fast_training"),
        stop_at=None if stop_after is None else time.monotonic() + stop_after,
    )  # fmt: skip
    recipe.seed_everything(0, "cpu")
    model = recipe.SplitCNV(cfg["arch"])
    images, labels = (a[:n_train] for a in load_cifar10(ctx.data_dir, "train"))
    test_images, test_labels = load_cifar10(ctx.data_dir, "test")
    monitor = (test_images[:n_test], test_labels[:n_test])
    clock = folder / "seconds.json"
    spent = json.loads(clock.read_text())["seconds"] if clock.exists() else 0.0
    started = time.perf_counter()
    try:
        history = recipe.train(model, images, labels, cfg, ctx, monitor=monitor)
    except BuildPaused as paused:
        print(f"{name}: {paused}")
        return None
    finally:
        spent += time.perf_counter() - started
        clock.write_text(json.dumps({"seconds": round(spent, 1)}))
    return {
        "config": name,
        "overrides": CONFIGS[name],
        "epochs": epochs,
        "n_test": n_test,
        "n_train": len(labels),
        "clear_top1": history[-1]["monitor_top1"],
        "history": history,
        "seconds": round(spent, 1),
        "machine": cost.describe_machine(cpu()),
    }


def main(argv: list[str] | None = None) -> int:
    """Run the configurations not yet in ``--out``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", action="append", choices=sorted(CONFIGS), required=True)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("-n", "--n-test", type=int, default=2000)
    parser.add_argument("--work", type=Path, default=ROOT / "build-out" / "fast_training")
    parser.add_argument("--out", type=Path, default=RESULTS / "fast_training-cnv-2w2a.jsonl")
    parser.add_argument("--stop-after", type=float, help="seconds; stop at an epoch boundary")
    parser.add_argument("--n-train", type=int, help="first N training images (default: all)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    done = set()
    if args.out.exists():
        rows = [json.loads(line) for line in args.out.read_text().splitlines() if line.strip()]
        done = {(r["config"], r["epochs"], r["n_test"], r["n_train"]) for r in rows}
    for name in args.config:
        if (name, args.epochs, args.n_test, args.n_train or 50_000) in done:
            print(f"{name}: already in {args.out}")
            continue
        row = run(name, args.epochs, args.n_test, args.work, args.stop_after, args.n_train)
        if row is None:
            return 3
        print(f"{name}: clear top-1 {row['clear_top1']:.4f} after {args.epochs} epochs")
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with args.out.open("a") as handle:
            handle.write(json.dumps(row, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
