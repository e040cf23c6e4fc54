"""The slowest runs, opt-in (``pytest -m slow``; `make test` leaves them out): a full-size build
rebuilt and held to its pinned bytes, and real FHE on a full-size variant, from this repository's
own registry and release store, as a fresh clone has them.

The rebuild passed on 2026-12-08 in 1,793 s on a 2-core AMD EPYC family 26 model 2 (Zen 5,
AVX-512), every file byte for byte the build made on a Zen 4 (``CI=1 pytest -m slow -k
pinned_bytes tests/test_slow.py``). The real-FHE test passed the same day on the same machine
in 962 s (``-k real_fhe``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from zoo.build import run as builder
from zoo.catalog import registry as reg
from zoo.fhe import evaluate

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
#: A full-size build whose rebuild trains nothing (`compile_from`: the parent's weights), so
#: that what it checks is the compile, the packaging and the card of a full network.
RECOMPILED = "cifar10-cnv-2w2a-r6-norm2"
#: A full-size variant whose real FHE takes minutes per image here, not hours.
FAST_FULL = "cifar10-split-pf-head2-r6"


@pytest.fixture
def project_store(zoo_home: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The project's registry and release store (read only: nothing here records or publishes)
    with a fresh ZOO_HOME."""
    monkeypatch.setenv("ZOO_REGISTRY", str(ROOT / "registry.json"))
    monkeypatch.setenv("ZOO_RELEASES", str(ROOT / "releases"))
    return ROOT / "registry.json"


def test_a_full_size_recompile_gives_its_pinned_bytes(
    project_store: Path, cifar_dir: Path, tmp_path: Path
) -> None:
    pinned = reg.load(project_store).variant(RECOMPILED).live[-1]
    out, report = builder.check(pinned.short_ref, data_dir=cifar_dir, out_dir=tmp_path / "check")
    assert set(report.values()) == {"match"}, report
    assert sorted(report) == sorted(e.path for e in pinned.files)


def test_real_fhe_on_a_full_size_variant_agrees_with_simulation(
    project_store: Path, cifar_dir: Path, tmp_path: Path
) -> None:
    """Three images: real FHE gives its simulation's class on at least two (its lookups err at
    p_error, so a run of 50 agreed on 48; a broken circuit agrees by chance on one in ten)."""
    results = tmp_path / "execute.jsonl"
    summary = evaluate.evaluate(FAST_FULL, fhe="execute", n_images=3, data_dir=cifar_dir,
                                results=results)  # fmt: skip
    _, records = evaluate.parse_results(results.read_text())
    assert summary["n_images"] == 3 and sorted(records) == [0, 1, 2]
    assert all(record["seconds"] > 0 for record in records.values())
    agree = [np.argmax(r["execute"]) == np.argmax(r["simulate"]) for r in records.values()]
    assert sum(agree) >= 2, agree
