"""Search the cheap end of a trained split-CNV build: recompile its weights with rounded PBS
(``rounding_threshold_bits``) and other ``p_error`` values, price each circuit with the cost model
(`zoo.cost.model`, calibrated by `zoo bench pbs`) and measure its FHE-simulated accuracy.

No retraining: the encrypted part is loaded from the build's ``weights.safetensors`` and its
inputs come from the build's own clear head (``head.safetensors``), exactly what a client sends.
Each setting writes one JSON line to ``--out`` as soon as it is done; a rerun skips the settings
already there (``--resume`` semantics by default), so the search survives a kill.

    .venv/bin/python benchmarks/rounding_search.py cifar10-split-8bit \\
        --build-dir build-out/cifar10-split-8bit-full -n 500 \\
        --setting none --setting approximate:6 --setting approximate:5 --setting exact:5

A setting is ``none`` (no rounding) or ``METHOD:BITS`` with METHOD ``exact`` or ``approximate``,
optionally ``@P_ERROR`` (e.g. ``approximate:6@0.01``); the default p_error is the variant's.

``--clear-blocks N`` moves the split N conv blocks later (the variant param ``clear_blocks``): the
client runs them in the clear after the build's head, the circuit starts after them, and each
setting's name gets the prefix ``cN/``. Training does not depend on the split point, so one build's
weights serve every split.

``--per-layer SETTING`` asks which layer's rounding costs the accuracy: it compiles SETTING once,
then, for each rounded op in turn, removes that op's rounding (``lsbs_to_remove`` 0) and measures
the quantized model in the clear (``fhe="disable"``, no PBS noise) on the same images; one JSON
line per op to ``rounding_layers-VARIANT.jsonl``.
Accuracy is measured on the first ``-n`` CIFAR test images (the official order). Simulated PBS
errors are not seeded by concrete: settings with a large ``p_error`` vary from run to run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from zoo import config  # noqa: E402
from zoo.build.run import load_recipe  # noqa: E402
from zoo.catalog import registry as reg  # noqa: E402
from zoo.cost import model as cost  # noqa: E402
from zoo.fhe import head  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def parse_setting(text: str, default_p_error: float) -> dict[str, Any]:
    """``none`` | ``METHOD:BITS[@P_ERROR]`` → ``{"name", "rounding_threshold_bits", "p_error"}``."""
    body, _, p_error = text.partition("@")
    p = float(p_error) if p_error else default_p_error
    if body == "none":
        rounding = None
    else:
        method, _, bits = body.partition(":")
        if method not in ("exact", "approximate") or not bits.isdigit():
            raise SystemExit(f"bad setting {text!r}: use none or exact:BITS / approximate:BITS")
        rounding = {"method": method.upper(), "n_bits": int(bits)}
    return {"name": text, "rounding_threshold_bits": rounding, "p_error": p}


def load_encrypted_part(recipe: Any, arch: dict[str, Any], weights: Path) -> Any:
    """The circuit's module (less any blocks the client runs) with the build's (pruned, final)
    weights."""
    from safetensors.torch import load_file

    model = recipe.SplitCNV(arch)
    model.encrypted.load_state_dict(load_file(str(weights)))
    return recipe.encrypted_part(model.eval(), arch)


def clear_part(recipe: Any, built: dict[str, Any], arch: dict[str, Any], weights: Path) -> Any:
    """What the client runs after the build's head (which ends after the ``built`` arch's clear
    blocks) when the split moves to ``arch``'s: float head outputs in, the circuit's float
    inputs out (contiguous, see the recipe)."""
    import numpy as np
    import torch
    from safetensors.torch import load_file

    model = recipe.SplitCNV(arch)
    model.encrypted.load_state_dict(load_file(str(weights)))
    model.eval()
    start, end = recipe._clear_end(built), recipe._clear_end(arch)
    if end < start:
        raise SystemExit("--clear-blocks cannot move the split before the build's own")

    @torch.no_grad()
    def run(x: Any) -> Any:
        if end == start:
            return x
        t = torch.from_numpy(x)
        if start < 0:  # the build's head ends on the circuit's input quantizer
            t = model.encrypted.input_quant(t)
        for mod in model.encrypted.features[start + 1 : end + 1]:
            t = mod(t)
        return np.ascontiguousarray(t.numpy())

    return run


def compile_setting(
    encrypted: Any, arch: dict[str, Any], setting: dict[str, Any], calib: Any, work: Path
) -> Any:
    """The build's circuit recompiled with the setting's rounding and p_error."""
    from zoo.build.training import compile_qat

    arch = {**arch, **{k: setting[k] for k in ("rounding_threshold_bits", "p_error")}}
    return compile_qat(encrypted, calib, arch, work / "search.onnx")


def evaluate_setting(
    encrypted: Any,
    arch: dict[str, Any],
    setting: dict[str, Any],
    calib: Any,
    test: tuple[Any, Any],
    work: Path,
) -> dict[str, Any]:
    """Compile one setting, price it, simulate it on the test images."""
    from zoo.build.package import circuit_statistics
    from zoo.build.training import fhe_logits, topk_accuracy

    t0 = time.perf_counter()
    qmodule = compile_setting(encrypted, arch, setting, calib, work)
    compile_seconds = time.perf_counter() - t0
    stats = circuit_statistics(qmodule)
    t0 = time.perf_counter()
    sim = fhe_logits(qmodule, test[0], "simulate")
    simulate_seconds = time.perf_counter() - t0
    accuracy = topk_accuracy(sim, test[1])
    return {
        **setting,
        "max_bit_width": stats["max_bit_width"],
        "pbs_count": stats["pbs_count"],
        "pbs_count_by_bit_width": stats["pbs_count_by_bit_width"],
        "pbs_count_per_parameter": stats["pbs_count_per_parameter"],
        "eval_key_bytes": stats["eval_key_bytes"],
        "key_switch_count": stats["key_switch_count"],
        "key_switch_work": cost.key_switch_work(stats),
        "estimated_fhe_seconds_per_image": cost.estimate_seconds(stats),
        "fhe_simulation_top1": accuracy[1],
        "fhe_simulation_top2": accuracy[2],
        "fhe_simulation_top3": accuracy[3],
        "n_test_images": len(test[1]),
        "compile_seconds": round(compile_seconds, 1),
        "simulate_seconds_per_image": round(simulate_seconds / len(test[1]), 4),
    }


def per_layer(qmodule: Any, test: tuple[Any, Any]) -> list[dict[str, Any]]:
    """Clear-quantized top-1 with every op rounded, then with one op's rounding removed."""
    from zoo.build.training import topk_accuracy

    def top1() -> float:
        return topk_accuracy(qmodule.forward(test[0], fhe="disable"), test[1], ks=(1,))[1]

    rows = [{"op": None, "lsbs_to_remove": None, "top1": top1()}]
    for name, (_, op) in qmodule.quant_layers_dict.items():
        lsbs = getattr(op, "lsbs_to_remove", None)
        if not isinstance(lsbs, dict) or not any(lsbs.values()):
            continue
        op.lsbs_to_remove = {key: 0 for key in lsbs}
        rows.append({"op": name, "lsbs_to_remove": lsbs, "top1": top1()})
        op.lsbs_to_remove = lsbs
    return rows


def main(argv: list[str] | None = None) -> int:
    """Run the search; print one line per setting."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("variant", help="registry variant whose recipe is split_cnv")
    parser.add_argument("--build-dir", type=Path, required=True, help="a build of that variant")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--setting", action="append", help="one or more settings to search")
    what.add_argument("--per-layer", metavar="SETTING", help="per-op rounding sensitivity")
    parser.add_argument("--clear-blocks", type=int, default=None, help="move the split later")
    parser.add_argument("-n", type=int, default=500, help="test images simulated per setting")
    parser.add_argument("--data-dir", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=None, help="JSON lines (appended)")
    args = parser.parse_args(argv)

    from zoo.build.data import load_cifar10

    variant = reg.load().variant(args.variant)
    recipe = load_recipe(variant.recipe["module"])
    manifest = json.loads((args.build_dir / "manifest.json").read_text())
    arch = manifest["recipe"]["config"]["arch"]
    data_dir = args.data_dir or config.data_dir()
    head_tensors, head_config = head.load(args.build_dir / "head.safetensors")
    n_calib = manifest["recipe"]["config"]["profile"]["n_calib"]
    built, prefix = arch, ""
    if args.clear_blocks is not None:
        arch = {**arch, "clear_blocks": args.clear_blocks}
        prefix = f"c{args.clear_blocks}/"
    client = clear_part(recipe, built, arch, args.build_dir / "weights.safetensors")

    def client_inputs(images: Any) -> Any:
        return client(head.forward(head_tensors, head_config, images))

    calib = client_inputs(load_cifar10(data_dir, "train")[0][:n_calib])
    images, labels = load_cifar10(data_dir, "test")
    test = (client_inputs(images[: args.n]), labels[: args.n])
    encrypted = load_encrypted_part(recipe, arch, args.build_dir / "weights.safetensors")

    work = args.build_dir / "work"
    work.mkdir(exist_ok=True)
    if args.per_layer is not None:
        setting = parse_setting(args.per_layer, arch["p_error"])
        qmodule = compile_setting(encrypted, arch, setting, calib, work)
        out = args.out or RESULTS / f"rounding_layers-{args.variant}.jsonl"
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("a") as handle:
            for row in per_layer(qmodule, test):
                row = {"variant": args.variant, "build_dir": str(args.build_dir),
                       "setting": args.per_layer, "n_test_images": len(test[1]), **row}  # fmt: skip
                handle.write(json.dumps(row, sort_keys=True) + "\n")
                print(f"{row['op'] or 'all rounded'}: clear-quantized top-1 {row['top1']:.4f}")
        return 0
    out = args.out or RESULTS / f"rounding_search-{args.variant}.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    done = set()
    if out.exists():
        done = {json.loads(line)["name"] for line in out.read_text().splitlines() if line}
    for text in args.setting:
        setting = parse_setting(text, arch["p_error"])
        setting["name"] = prefix + setting["name"]
        if setting["name"] in done:
            print(f"{text}: already in {out}")
            continue
        row = {
            "variant": args.variant,
            "build_dir": str(args.build_dir),
            "clear_blocks": arch.get("clear_blocks", 0),
            **evaluate_setting(encrypted, arch, setting, calib, test, work),
        }
        with out.open("a") as handle:
            handle.write(json.dumps(row, sort_keys=True) + "\n")
        print(
            f"{text}: {row['max_bit_width']} bits, {row['pbs_count']} PBS, "
            f"est {row['estimated_fhe_seconds_per_image']:.0f} s/img, "
            f"sim top-1 {row['fhe_simulation_top1']:.4f} on {row['n_test_images']}",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
