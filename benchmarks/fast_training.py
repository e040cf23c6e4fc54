"""Ablate the shared fast-training schedule (``zoo/build/schedule.py``) on the full-FHE CNV
and on VGG11 (``vgg-*`` configurations: float stage, then 5-bit QAT, at width/4).

Each named configuration trains the ``cnv-2w2a`` architecture (2-bit weights and activations,
no pruning) from the same seed (or from a build's weights) for ``--epochs`` epochs on all 50,000
training images, through the recipe's own training loop, then measures the clear top-1 of the
weights it would ship on the first ``-n`` test images (the Brevitas model in the clear, its
accumulators rounded under ``round_accumulators``); ``--simulate N`` then compiles the ``-r6``
circuit and simulates it on the first N test images (6-bit rounding costs this architecture 3-4
points). Every configuration keeps its checkpoints under ``--work`` and is resumed where it
stopped (``--stop-after`` seconds ends a run at an epoch boundary); its result goes to ``--out``
as one JSON line, with the seconds its training took (summed over the runs that resumed it,
``seconds.json`` in its folder), as soon as it is done; configurations already there are skipped.

    .venv/bin/python benchmarks/fast_training.py --epochs 4 \\
        --config baseline --config adam-one-cycle --config one-cycle-sgd --config +smoothing \\
        --config +ema
    .venv/bin/python benchmarks/fast_training.py --epochs 3 --simulate 1000 \\
        --config finetune --config finetune+round6
    .venv/bin/python benchmarks/fast_training.py --epochs 4 --qat-epochs 1 \\
        --config vgg-fast --config vgg-fast+bn

The configurations (``baseline`` is the recipe's ``full`` schedule, Adam at lr 0.02 halved every
5 epochs; ``+smoothing`` and ``+ema`` add to ``adam-one-cycle``):
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from zoo.build import kernels  # noqa: E402

kernels.pin()  # before torch starts: the same kernels as `zoo build` (AVX2 on any x86-64)

from zoo import config  # noqa: E402
from zoo.build.data import load_cifar10  # noqa: E402
from zoo.build.run import BuildContext, load_recipe  # noqa: E402
from zoo.build.training import Stages, compile_qat, fhe_logits, topk_accuracy  # noqa: E402
from zoo.cost import model as cost  # noqa: E402
from zoo.cost.machine import cpu  # noqa: E402
from zoo.errors import BuildPaused  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
ADAM_CYCLE = {"lr_schedule": "one-cycle", "warmup": 0.2, "lr": 0.02}
SGD_CYCLE = {"optimizer": "sgd", "momentum": 0.9, "weight_decay": 5e-4,
             "lr_schedule": "one-cycle", "warmup": 0.2, "lr": 0.1}  # fmt: skip
#: The 60-epoch ``long`` build that the fine-tune configurations start from.
LONG = "cifar10-cnv-2w2a-r6@30b002fd4819"
#: The teacher of the ``+distill`` configurations: VGG11 5-bit, FHE-sim top-1 0.87.
TEACHER = "cifar10-vgg11-qat@0dd41d5e1360"
EMA = {**ADAM_CYCLE, "label_smoothing": 0.1, "ema_decay": 0.99}
#: name -> profile overrides of the ``full`` profile (every one trains ``--epochs`` epochs);
#: ``profile`` and ``init_from`` (a build whose weights start training) are not overrides.
CONFIGS: dict[str, dict[str, Any]] = {
    "baseline": {},
    "adam-one-cycle": ADAM_CYCLE,
    "one-cycle-sgd": SGD_CYCLE,
    # Nesterov SGD at lr 0.1 lost to Adam (0.4565 against 0.6870 after 4 epochs, 2026-12-05): the
    # rest add to Adam's one-cycle.
    "+smoothing": {**ADAM_CYCLE, "label_smoothing": 0.1},
    "+ema": EMA,
    # More epochs of the long build at the ``finetune`` profile's low rate, without and with the
    # 6-bit accumulator rounding of the -r6 circuit in the loop (straight-through gradient).
    "finetune": {"profile": "finetune", "init_from": LONG},
    "finetune+round6": {"profile": "finetune", "init_from": LONG, "round_accumulators": 6},
    # +ema taught by the VGG11 build (zoo/build/distill.py): weight 0.5 on T² × the KL
    # divergence to its probabilities softened at T = 4, or not softened (T = 1: the teacher
    # trained with label smoothing, so its logits span only ~5.5 and T = 4 leaves its top class
    # 0.27 on average, against 0.89 at T = 1).
    "+distill": {**EMA, "distill_from": TEACHER, "distill_weight": 0.5, "distill_temperature": 4},
    "+distill-t1": {
        **EMA,
        "distill_from": TEACHER,
        "distill_weight": 0.5,
        "distill_temperature": 1,
    },  # fmt: skip
    # The rest of the list, each added to +ema alone: derandomised flips, decoupled
    # weight decay (AdamW; lr x decay per step, on conv and linear weights), and BatchNorm
    # parameters and biases at 4x the rate.
    "+alt-flip": {**EMA, "flip": "alternate"},
    "+decay": {**EMA, "weight_decay": 0.05},
    "+norm-lr": {**EMA, "norm_lr_scale": 4.0},
}
#: The ``vgg-*`` configurations: overrides of VGG11's ``quick`` profile (width/4, Adam, cosine
#: lr per epoch, peak 1e-3); each trains ``--epochs`` float epochs, then ``--qat-epochs`` of QAT.
VGG_FAST = {"lr_schedule": "one-cycle", "warmup": 0.2, "label_smoothing": 0.1, "ema_decay": 0.99}
VGG_CONFIGS: dict[str, dict[str, Any]] = {
    "vgg-fast": VGG_FAST,
    "vgg-fast+bn": {**VGG_FAST, "batch_norm": True},
}
#: Rows measured on more test images also give the top-1 on the first this many (the default).
FIRST = 2000
#: What ``--simulate`` compiles: the -r6 circuit of ``cifar10-cnv-2w2a-r6``.
R6 = {"p_error": 0.01, "rounding_threshold_bits": {"method": "APPROXIMATE", "n_bits": 6}}
_ALL = {**CONFIGS, **VGG_CONFIGS}
__doc__ += "".join(f"\n* ``{name}``: {json.dumps(over)}" for name, over in _ALL.items()) + "\n"


@contextmanager
def _clock(folder: Path) -> Iterator[dict[str, float]]:
    """Add the block's seconds to ``folder/seconds.json`` (summed over the runs that resumed a
    configuration, even one that paused); the dict yielded holds the total once it ends."""
    clock = folder / "seconds.json"
    total = {"seconds": json.loads(clock.read_text())["seconds"] if clock.exists() else 0.0}
    started = time.perf_counter()
    try:
        yield total
    finally:
        total["seconds"] = round(total["seconds"] + time.perf_counter() - started, 1)
        clock.write_text(json.dumps(total))


def run(
    name: str,
    epochs: int,
    n_test: int,
    work: Path,
    stop_after: float | None,
    n_train: int | None,
    n_simulate: int,
) -> dict | None:
    """Train (or resume) one configuration, then simulate its -r6 circuit on the first
    ``n_simulate`` test images (0: not); its result row, or None if it paused."""
    recipe = load_recipe("recipes/split_cnv.py")
    overrides = {**CONFIGS[name], "epochs": epochs, "n_test": n_test, "monitor_every": epochs}
    profile, init_from = overrides.pop("profile", "full"), overrides.pop("init_from", None)
    params = {"arch": "cnv-2w2a", **R6, "profile_overrides": overrides}
    cfg = recipe.resolve_config("cifar10-cnv-2w2a-r6", params, profile, 0)
    folder = work / name
    folder.mkdir(parents=True, exist_ok=True)
    ctx = BuildContext(
        variant="cifar10-cnv-2w2a-r6", params=params, profile=profile, seed=0, device="cpu",
        resume=True, work_dir=folder, data_dir=config.data_dir(),
        log=logging.getLogger("fast_training"),
        stop_at=None if stop_after is None else time.monotonic() + stop_after,
    )  # fmt: skip
    recipe.seed_everything(0, "cpu")
    model = recipe.SplitCNV(cfg["arch"])
    if init_from is not None:
        recipe.load_parent(model, init_from)
    images, labels = (a[:n_train] for a in load_cifar10(ctx.data_dir, "train"))
    test_images, test_labels = load_cifar10(ctx.data_dir, "test")
    monitor = (test_images[:n_test], test_labels[:n_test])
    try:
        with _clock(folder) as spent:
            history = recipe.train(model, images, labels, cfg, ctx, monitor=monitor)
    except BuildPaused as paused:
        print(f"{name}: {paused}")
        return None
    row = {}
    if n_test > FIRST:  # comparable with the rows measured on the first 2,000 test images
        logits = recipe.clear_logits(model, test_images[:FIRST], cfg["profile"]["eval_batch_size"])
        row["clear_top1_first_2000"] = topk_accuracy(logits, test_labels[:FIRST], ks=(1,))[1]
    if n_simulate:
        started = time.perf_counter()
        bs = cfg["profile"]["eval_batch_size"]
        calib = recipe.head_outputs(model, images[: cfg["profile"]["n_calib"]], bs)
        circuit = compile_qat(model.encrypted, calib, cfg["arch"], folder / "r6.onnx")
        feats = recipe.head_outputs(model, test_images[:n_simulate], bs)
        logits = fhe_logits(circuit, feats, "simulate")
        row.update(fhe_simulation_top1_r6=topk_accuracy(logits, test_labels[:n_simulate])[1],
                   n_simulate=n_simulate,
                   simulate_seconds=round(time.perf_counter() - started, 1))  # fmt: skip
    return {
        **row,
        "profile": profile,
        "init_from": init_from,
        "config": name,
        "overrides": CONFIGS[name],
        "epochs": epochs,
        "n_test": n_test,
        "n_train": len(labels),
        "clear_top1": history[-1]["monitor_top1"],
        "history": history,
        "seconds": spent["seconds"],
        "machine": cost.describe_machine(cpu()),
    }


def run_vgg(
    name: str, epochs: int, qat_epochs: int, n_test: int, work: Path, stop_after: float | None
) -> dict | None:
    """Train (or resume) one VGG11 configuration, both stages as ``zoo build`` does; its result
    row (float and QAT clear top-1 on the first ``n_test`` test images), or None if it paused."""
    recipe = load_recipe("recipes/vgg11_qat.py")
    overrides = {**VGG_CONFIGS[name], "float_epochs": epochs, "qat_epochs": qat_epochs,
                 "n_test": n_test, "n_train": None}  # fmt: skip
    params = {"arch": "vgg11-5bit", "profile_overrides": overrides}
    cfg = recipe.resolve_config("cifar10-vgg11-qat", params, "quick", 0)
    folder = work / name
    folder.mkdir(parents=True, exist_ok=True)
    ctx = BuildContext(
        variant="cifar10-vgg11-qat", params=params, profile="quick", seed=0, device="cpu",
        resume=True, work_dir=folder, data_dir=config.data_dir(),
        log=logging.getLogger("fast_training"),
        stop_at=None if stop_after is None else time.monotonic() + stop_after,
    )  # fmt: skip
    recipe.seed_everything(0, "cpu")
    train = load_cifar10(ctx.data_dir, "train")
    test = tuple(a[:n_test] for a in load_cifar10(ctx.data_dir, "test"))
    try:
        with _clock(folder) as spent:
            float_model, qmodel, history = recipe.train_stages(ctx, cfg, Stages(), train, test)
    except BuildPaused as paused:
        print(f"{name}: {paused}")
        return None
    bs = cfg["profile"]["eval_batch_size"]
    top1 = [topk_accuracy(recipe.logits_of(m, test[0], cfg, bs), test[1], ks=(1,))[1]
            for m in (float_model, qmodel)]  # fmt: skip
    return {
        "family": "vgg11",
        "config": name,
        "overrides": VGG_CONFIGS[name],
        "width_divisor": cfg["profile"]["width_divisor"],
        "epochs": epochs,
        "qat_epochs": qat_epochs,
        "n_test": n_test,
        "n_train": len(train[1]),
        "float_top1": top1[0],
        "clear_top1": top1[1],
        "history": history,
        "seconds": spent["seconds"],
        "machine": cost.describe_machine(cpu()),
    }


def main(argv: list[str] | None = None) -> int:
    """Run the configurations not yet in ``--out``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", action="append", required=True,
                        choices=sorted(_ALL))  # fmt: skip
    parser.add_argument("--epochs", type=int, default=4, help="(VGG11: float epochs)")
    parser.add_argument("--qat-epochs", type=int, default=1, help="VGG11's QAT epochs")
    parser.add_argument("-n", "--n-test", type=int, default=FIRST)
    parser.add_argument("--work", type=Path, default=ROOT / "build-out" / "fast_training")
    parser.add_argument("--out", type=Path, help="default: results/fast_training-FAMILY.jsonl")
    parser.add_argument("--stop-after", type=float, help="seconds; stop at an epoch boundary")
    parser.add_argument("--n-train", type=int, help="first N training images (default: all)")
    parser.add_argument(
        "--simulate",
        type=int,
        default=0,
        metavar="N",
        help="then simulate the -r6 circuit on the first N test images",
    )
    args = parser.parse_args(argv)
    vgg = [name in VGG_CONFIGS for name in args.config]
    if any(vgg) and not all(vgg):
        parser.error("VGG11 and CNV configurations go to different files: run them apart")
    if args.out is None:
        args.out = RESULTS / f"fast_training-{'vgg11' if all(vgg) else 'cnv-2w2a'}.jsonl"
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    done = set()
    if args.out.exists():
        rows = [json.loads(line) for line in args.out.read_text().splitlines() if line.strip()]
        done = {(r["config"], r["epochs"], r.get("qat_epochs"), r["n_test"], r["n_train"],
                 r.get("n_simulate")) for r in rows}  # fmt: skip
    for name in args.config:
        qat = args.qat_epochs if name in VGG_CONFIGS else None
        simulate = None if name in VGG_CONFIGS else args.simulate or None
        if (name, args.epochs, qat, args.n_test, args.n_train or 50_000, simulate) in done:
            print(f"{name}: already in {args.out}")
            continue
        if name in VGG_CONFIGS:
            row = run_vgg(name, args.epochs, args.qat_epochs, args.n_test, args.work,
                          args.stop_after)  # fmt: skip
        else:
            row = run(name, args.epochs, args.n_test, args.work, args.stop_after, args.n_train,
                      args.simulate)  # fmt: skip
        if row is None:
            return 3
        print(f"{name}: clear top-1 {row['clear_top1']:.4f} after {args.epochs} epochs")
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with args.out.open("a") as handle:
            handle.write(json.dumps(row, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
