"""Shared fixtures: an isolated ZOO_HOME, a scratch registry, build directories, CIFAR data."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import pytest

from zoo.build import kernels
from zoo.catalog import manifest, versions
from zoo.store import gate

kernels.pin()  # before any test module imports torch: builds here are the pinned kind
ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = ROOT.parent / "shared" / "data"


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """A failing session must exit non-zero even after a test ran a circuit in this process
    (concrete's exit hook would end it with 0)."""
    from zoo.fhe import exit_status

    exit_status.keep(exitstatus)


@pytest.fixture(autouse=True)
def _scratch_release_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No test writes into the project's releases/: publishes to `releases` land in tmp_path
    (tests of the project's own store name it explicitly)."""
    monkeypatch.setenv("ZOO_RELEASES", str(tmp_path / "releases"))


@pytest.fixture
def zoo_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh ZOO_HOME (hub, cache, keys) for one test."""
    home = tmp_path / "zoo-home"
    monkeypatch.setenv("ZOO_HOME", str(home))
    monkeypatch.delenv("ZOO_OFFLINE", raising=False)
    return home


@pytest.fixture
def registry_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A scratch copy of the project's registry.json without its builds, via ZOO_REGISTRY."""
    path = tmp_path / "registry.json"
    document = json.loads((ROOT / "registry.json").read_text())
    for variant in document["variants"].values():
        variant["builds"] = []
    path.write_text(json.dumps(document))
    monkeypatch.setenv("ZOO_REGISTRY", str(path))
    return path


def make_build_dir(
    path: Path, variant: str = "cifar10-split-tiny", payload: int = 1 << 20, seed: int = 0
) -> Path:
    """A build directory in the layout `zoo build` writes, with generated file contents.

    For transport tests (hub, cache, publish): the bytes are arbitrary but real files of
    realistic size; the manifest is produced by the same code as a real build's.
    """
    import numpy as np

    rng = np.random.default_rng(seed)

    def noise(size: int) -> bytes:
        return rng.integers(0, 256, size, dtype=np.uint8).tobytes()

    path.mkdir(parents=True, exist_ok=True)
    for name, size in [("head.safetensors", 8_000), ("weights.safetensors", payload // 4)]:
        (path / name).write_bytes(noise(size))
    # Zips that pass the gate: the members concrete-ml writes, one of them noise for the size.
    for name, size, big in [("client.zip", payload // 8, "client.specs.json"),
                            ("server.zip", payload, "circuit.mlir")]:  # fmt: skip
        with zipfile.ZipFile(path / name, "w", zipfile.ZIP_STORED) as archive:
            for member in sorted(gate.MEMBERS[name]):
                filler = {"noise": noise(size // 2).hex()} if member == big else {}
                archive.writestr(member, json.dumps({"seed": seed, **filler}))
    (path / "README.md").write_text(f"# {variant}\n\ntest build, seed {seed}\n")
    manifest.write(
        path,
        {
            "schema_version": 1,
            "variant": variant,
            "family": "split-cnv",
            "recipe": {"module": "recipes/split_cnv.py", "params": {}, "config": {}},
            "seed": seed,
            "profile": "smoke",
            "data": {},
            "runtime": {k: versions.installed()[k] for k in versions.BINDING + versions.RECORDED},
            "metrics": {"clear_top1": 0.5},
            "circuit": {"max_bit_width": 5, "pbs_count": 100, "pbs_count_by_bit_width": {"5": 100}},
        },
    )
    return path


@pytest.fixture
def build_dir(tmp_path: Path) -> Path:
    """One generated build directory of cifar10-split-tiny."""
    return make_build_dir(tmp_path / "build")


@pytest.fixture(scope="session")
def cifar_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Real CIFAR data in the official python layout (materialized from ../shared/data)."""
    cached = os.environ.get("ZOO_TEST_DATA") or str(ROOT / ".data")
    if (Path(cached) / "cifar-10-batches-py" / ".complete").exists():
        return Path(cached)
    target = tmp_path_factory.mktemp("cifar")
    subprocess.run(
        [sys.executable, str(SHARED_DATA / "materialize_cifar.py"), str(target)], check=True
    )
    return target


def build_hashes(build_dir: Path) -> dict[str, str]:
    """sha256 of every file of a build directory (report.json is not part of the build)."""
    from zoo.store.hashing import sha256_file

    return {
        p.name: sha256_file(p)
        for p in Path(build_dir).iterdir()
        if p.is_file() and p.name != manifest.REPORT
    }


def read_json(path: Path) -> dict:
    """Parse a JSON file."""
    return json.loads(Path(path).read_text())


# --- Local Hugging Face Hub servers (tests/hubserver.py) -----------------------------------

from collections.abc import Callable, Iterator  # noqa: E402
from contextlib import ExitStack  # noqa: E402

from hubserver import FaultHub, HubServer, fault_hub, find_olah_cli, olah_hub  # noqa: E402


@pytest.fixture
def hf_hub(tmp_path: Path) -> Iterator[HubServer]:
    """A local Hugging Face Hub for one test: olah reads + our publish/proxy server.

    Pass ``hf_hub.endpoint`` and ``hf_hub.token`` to ``huggingface_hub`` calls (and an explicit
    ``cache_dir``). Skips when ``olah-cli`` is not installed (see tests/hubserver.py).
    """
    if find_olah_cli() is None:
        if os.environ.get("CI"):
            pytest.fail("olah-cli is missing: `make install` creates .venv-olah with it")
        pytest.skip(
            "olah-cli not found: python -m venv .venv-olah && "
            ".venv-olah/bin/pip install olah==0.5.4"
        )
    with olah_hub(tmp_path / "hf-hub") as hub:
        yield hub


@pytest.fixture
def fault_hub_factory() -> Iterator[Callable[..., FaultHub]]:
    """Start fault-injection hubs: ``fault_hub_factory(files, repo_id=..., lfs_threshold=...)``.

    Every hub started is stopped at the end of the test.
    """
    with ExitStack() as stack:

        def start(
            files: dict[str, bytes], repo_id: str = "zoo-test/fault", **kwargs: Any
        ) -> FaultHub:
            return stack.enter_context(fault_hub(files, repo_id, **kwargs))

        yield start


def circuit_lsbs(circuit: Any) -> list[int]:
    """The low bits each rounded op of a compiled module removes, in the order of its graph."""
    ops = circuit.quant_layers_dict.values()
    return [lsbs for _, op in ops for lsbs in (getattr(op, "lsbs_to_remove", None) or {}).values()]
