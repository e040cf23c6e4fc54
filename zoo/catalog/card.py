"""The model card: a Hugging Face card rendered from a build's manifest, and with its FHE truth.

A build's ``README.md`` is rendered from ``manifest.json`` and nothing else (no dates, no
timings), so it is as reproducible as the build. What is measured later (FHE simulation with its
random draws, real FHE on N images, seconds per image and where, the serialized evaluation keys)
lives in the registry; :func:`render` with ``measured`` adds it, for ``zoo card`` and
``Model.card()``.
"""

from __future__ import annotations

import json
import math
from typing import Any

from zoo.catalog.registry import Variant

DATASET_IDS = {"cifar10": "cifar10", "cifar100": "cifar100"}
MODES = (("clear", "clear: float head + Brevitas"), ("fhe_simulation", "FHE simulation"),
         ("fhe_execute", "real FHE"))  # fmt: skip


def wilson_interval(p: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """95 % Wilson score interval of a proportion ``p`` observed on ``n`` trials."""
    if n <= 0:
        return (0.0, 1.0)
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def _images(metrics: dict[str, Any], mode: str) -> int | None:
    """On how many test images ``mode``'s accuracy was measured, where the metrics say."""
    if mode == "fhe_execute":
        return metrics.get("fhe_execute_n_images")
    if mode == "fhe_simulation":
        return metrics.get("n_simulated_images") or metrics.get("n_test_images")
    return metrics.get("n_test_images")


def card_data(document: dict[str, Any], variant: Variant, counted: bool = False) -> Any:
    """``huggingface_hub.ModelCardData`` with a model-index of the measured accuracies (with
    ``counted``, each named with its number of images)."""
    from huggingface_hub import EvalResult, ModelCardData

    metrics = document["metrics"]

    def name(mode: str, label: str, k: int) -> str:
        n = _images(metrics, mode) if counted else None
        return f"Top-{k} ({label}, {n} images)" if n else f"Top-{k} ({label})"

    results = [
        EvalResult(
            task_type="image-classification",
            dataset_type=DATASET_IDS[variant.dataset],
            dataset_name=document["data"].get("dataset", variant.dataset),
            dataset_split="test",
            metric_type="accuracy",
            metric_name=name(mode, label, k),
            metric_value=metrics[f"{mode}_top{k}"],
        )
        for mode, label in MODES
        for k in (1, 2, 3)
        if f"{mode}_top{k}" in metrics
    ]
    return ModelCardData(
        library_name="concrete-ml",
        license="bsd-3-clause",
        pipeline_tag="image-classification",
        tags=[
            "fhe",
            "concrete-ml",
            "brevitas",
            "homomorphic-encryption",
            "cifar",
            document.get("family", variant.family),
        ],  # fmt: skip
        datasets=[DATASET_IDS[variant.dataset]],
        metrics=["accuracy"],
        model_name=document["variant"],
        eval_results=results or None,
    )


def fhe_truth(measured: dict[str, Any], circuit: dict[str, Any]) -> list[tuple[str, str]]:
    """(what, value) rows of what a build does under FHE, from its registry record."""
    metrics, rows = measured["metrics"], []
    for mode, label in MODES[1:]:
        if f"{mode}_top1" in metrics:
            tops = " / ".join(f"{metrics[f'{mode}_top{k}']:.4f}" for k in (1, 2, 3))
            rows.append((f"{label} top-1/2/3", f"{tops} on {_images(metrics, mode):,} test images"))
    n = metrics.get("fhe_execute_n_images")
    if n:
        low, high = wilson_interval(metrics["fhe_execute_top1"], n)
        rows.append(("real FHE top-1, 95 % interval", f"{low:.3f} - {high:.3f} (Wilson, n={n})"))
        agree = metrics["fhe_execute_agreement"]
        seconds = metrics["fhe_execute_seconds_per_image"]
        where = metrics.get("fhe_execute_machine") or "an unrecorded machine"
        rows.append(("real FHE agrees with simulation",
                     f"{agree:.2f} of images ({metrics.get('fhe_execute_sample')})"))  # fmt: skip
        timed = metrics.get("fhe_execute_timed_images") or n
        if metrics.get("fhe_execute_conditions"):
            where += f" ({metrics['fhe_execute_conditions']})"
        elif timed != n:
            where += f", over the {timed} images timed alone on it"
        slowest = metrics.get("fhe_execute_max_seconds_per_image")
        slowest = f"; the slowest {slowest:,.0f}" if slowest and timed > 1 else ""
        rows.append(("real FHE seconds per image", f"{seconds:,.0f} on {where}{slowest}"))
        if metrics.get("fhe_execute_other_machines"):
            rows.append(("real FHE images timed on other machines",
                         metrics["fhe_execute_other_machines"]))  # fmt: skip
    rows.append(("PBS per image", f"{circuit.get('pbs_count', 0):,}, max bit width "
                 f"{circuit.get('max_bit_width')}"))  # fmt: skip
    rows.append(("evaluation keys (what a client uploads)", key_size_text(measured)))
    if metrics.get("keygen_seconds"):
        rows.append(("key generation", f"{metrics['keygen_seconds']:.1f} s"))
    return rows


def key_size_text(measured: dict[str, Any]) -> str:
    """The serialized evaluation-key size when measured, else concrete's in-memory figure,
    labelled as such."""
    serialized = measured["metrics"].get("eval_key_bytes_serialized")
    if serialized:
        return f"{serialized / 2**20:,.0f} MiB serialized"
    in_memory = measured.get("circuit", {}).get("eval_key_bytes")
    if in_memory:
        return f"not measured (concrete's in-memory figure: {in_memory / 2**20:,.0f} MiB)"
    return "not measured"


def render(
    document: dict[str, Any], variant: Variant, measured: dict[str, Any] | None = None
) -> str:
    """The card text for a build's manifest document; with ``measured`` (the build's registry
    record), its metrics and an "FHE truth" section too."""
    if measured is not None:
        document = {**document, "metrics": measured["metrics"]}
    metrics = document["metrics"]
    circuit = document["circuit"]
    rows = "\n".join(f"| {k} | {json.dumps(v)} |" for k, v in sorted(metrics.items())
                     if measured is None or not isinstance(v, (list, dict)))  # fmt: skip
    circuit_rows = "\n".join(
        f"| {k} | {json.dumps(circuit[k])} |"
        for k in ("max_bit_width", "pbs_count", "pbs_count_by_bit_width", "p_error",
                  "rounding_threshold_bits", "eval_key_bytes")
        if k in circuit
    )  # fmt: skip
    name = document["variant"]
    body = f"""
# {name}

{variant.summary}

Built by `zoo build {name} --profile {document["profile"]} --seed {document["seed"]}` from
`{document["recipe"]["module"]}` on `{document.get("device", "cpu")}`; data:
{document["data"].get("dataset", variant.dataset)}. Every file of this build is pinned by sha256
in `manifest.json`; rebuilding with the same recipe, profile, seed, data, runtime and kind of
device gives the same bytes (`zoo build {name} --check REVISION`).

## Use

```bash
zoo pull {name}                       # verified download into the cache
zoo predict {name} image.png --fhe execute
```

Runtime: concrete-ml {document["runtime"]["concrete-ml"]}, concrete-python
{document["runtime"]["concrete-python"]}, Python {document["runtime"]["python"]}, torch
{document["runtime"]["torch"]}, brevitas {document["runtime"]["brevitas"]}.

## Measured

| metric | value |
|---|---|
{rows}

## Circuit

| statistic | value |
|---|---|
{circuit_rows}
"""
    if measured is not None:
        truth = "\n".join(f"| {what} | {value} |" for what, value in fhe_truth(measured, circuit))
        body += f"""
## FHE truth

Measured after the build and kept in the registry (`zoo info {name}`).

| what | measured |
|---|---|
{truth}
"""
    return f"---\n{card_data(document, variant, measured is not None).to_yaml()}\n---\n{body}"
