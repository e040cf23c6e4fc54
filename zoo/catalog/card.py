"""The model card (``README.md`` of a build): a Hugging Face card rendered from the manifest.

Rendered from the same data as ``manifest.json`` and nothing else (no dates, no timings), so it is
as reproducible as the build, and its numbers cannot drift from the manifest's.
"""

from __future__ import annotations

import json
from typing import Any

from zoo.catalog.registry import Variant

DATASET_IDS = {"cifar10": "cifar10", "cifar100": "cifar100"}
MODES = (("clear", "clear: float head + Brevitas"), ("fhe_simulation", "FHE simulation"),
         ("fhe_execute", "real FHE"))  # fmt: skip


def card_data(document: dict[str, Any], variant: Variant) -> Any:
    """``huggingface_hub.ModelCardData`` with a model-index of the measured accuracies."""
    from huggingface_hub import EvalResult, ModelCardData

    metrics = document["metrics"]
    results = [
        EvalResult(
            task_type="image-classification",
            dataset_type=DATASET_IDS[variant.dataset],
            dataset_name=document["data"].get("dataset", variant.dataset),
            dataset_split="test",
            metric_type="accuracy",
            metric_name=f"Top-{k} ({label})",
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


def render(document: dict[str, Any], variant: Variant) -> str:
    """The card text for a build's manifest document."""
    metrics = document["metrics"]
    circuit = document["circuit"]
    rows = "\n".join(f"| {k} | {json.dumps(v)} |" for k, v in sorted(metrics.items()))
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
    return f"---\n{card_data(document, variant).to_yaml()}\n---\n{body}"
