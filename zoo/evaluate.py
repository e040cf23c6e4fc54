"""``zoo eval``: accuracy of a build on the CIFAR test set, simulated or in real FHE.

Real FHE also runs the simulation of the same images and reports their agreement image by
image: the measurement no reference published.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from zoo import config, runtime
from zoo.data import load_cifar10


def topk(logits: np.ndarray, labels: np.ndarray, k: int) -> float:
    """Fraction of rows whose label is among the k largest logits."""
    order = np.argsort(-logits, axis=1, kind="stable")[:, :k]
    return float((order == labels[:, None]).any(axis=1).mean())


def evaluate(
    ref: str,
    *,
    fhe: str = "simulate",
    n_images: int = 100,
    data_dir: Path | None = None,
    registry_path: Path | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Top-1/2/3 of ``ref`` on the first ``n_images`` CIFAR-10 test images."""
    from tqdm.auto import tqdm

    model = runtime.load(ref, registry_path=registry_path)
    images, labels = load_cifar10(Path(data_dir or config.data_dir()), "test")
    images, labels = images[:n_images], labels[:n_images]
    started = time.perf_counter()
    simulated = model.logits(images, "simulate")
    result: dict[str, Any] = {
        "variant": model.build.variant,
        "revision": model.build.revision,
        "n_images": len(labels),
        "fhe": fhe,
        "simulate_top1": topk(simulated, labels, 1),
        "simulate_top2": topk(simulated, labels, 2),
        "simulate_top3": topk(simulated, labels, 3),
        "simulate_seconds": round(time.perf_counter() - started, 3),
        "keygen_seconds": round(model.timings.get("keygen_seconds", 0.0), 3),
    }
    if fhe == "execute":
        bar = tqdm(range(len(labels)), desc="real FHE", disable=not progress)
        executed = np.stack([model.logits(images[i : i + 1], "execute")[0] for i in bar])
        seconds = model.timings["fhe_seconds"]
        result.update(
            execute_top1=topk(executed, labels, 1),
            execute_top2=topk(executed, labels, 2),
            execute_top3=topk(executed, labels, 3),
            agreement_with_simulation=float((executed.argmax(1) == simulated.argmax(1)).mean()),
            execute_seconds_per_image=round(float(np.mean(seconds)), 3),
            predictions=[int(i) for i in executed.argmax(1)],
            labels=[int(i) for i in labels],
        )
    return result
