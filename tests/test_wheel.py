"""A non-editable install works outside the source tree: the wheel carries the registry and the
recipes, and its `zoo` lists, pulls (from a release store it is pointed at), loads and builds."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

TINY = "cifar10-split-tiny"


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The project's wheel, built and installed into a fresh target folder (no dependencies:
    they are this environment's)."""
    base = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
         "-w", str(base / "dist"), str(ROOT)],
        check=True,
    )  # fmt: skip
    (wheel,) = (base / "dist").glob("concrete_zoo-*.whl")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target",
         str(base / "site"), str(wheel)],
        check=True,
    )  # fmt: skip
    return base / "site"


def _zoo(site: Path, cwd: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k not in ("ZOO_REGISTRY", "ZOO_RELEASES")}
    environ.update(PYTHONPATH=str(site), ZOO_HOME=str(cwd / "home"), **env)
    return subprocess.run(
        [str(site / "bin" / "zoo"), *args], cwd=cwd, env=environ, capture_output=True, text=True
    )


def test_the_wheel_lists_pulls_loads_and_builds_outside_the_tree(
    installed: Path, tmp_path: Path, cifar_dir: Path
) -> None:
    assert (installed / "zoo" / "registry.json").is_file()  # files, not links
    assert not (installed / "zoo" / "registry.json").is_symlink()
    assert (installed / "zoo" / "recipes" / "split_cnv.py").is_file()
    assert not (installed / "zoo" / "releases").exists()  # the store stays in the tree

    listed = _zoo(installed, tmp_path, "list", "--json")
    assert listed.returncode == 0, listed.stderr
    assert TINY in {row["variant"] for row in json.loads(listed.stdout)}

    # No store beside the installed registry: the pull says where it looked and what to do.
    missing = _zoo(installed, tmp_path, "pull", TINY)
    assert missing.returncode == 3 and "release store" in missing.stderr
    assert "--build-missing" in missing.stderr

    store = {"ZOO_RELEASES": str(ROOT / "releases")}  # e.g. a clone's store on a shared disk
    pulled = _zoo(installed, tmp_path, "pull", TINY, "--json", **store)
    assert pulled.returncode == 0, pulled.stderr
    assert json.loads(pulled.stdout)["source"] == "releases"

    environ = {k: v for k, v in os.environ.items() if k != "ZOO_REGISTRY"}
    environ.update(PYTHONPATH=str(installed), ZOO_HOME=str(tmp_path / "home"))
    code = (
        "import zoo, numpy as np; m = zoo.load('cifar10-split-tiny');"
        "print(zoo.__file__); print(m.predict(np.zeros((32, 32, 3), np.uint8), fhe='simulate'))"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=environ, capture_output=True, text=True
    )
    assert loaded.returncode == 0, loaded.stderr
    assert loaded.stdout.startswith(str(installed))

    # The wheel's recipe rebuilds the pinned build byte for byte.
    out = tmp_path / "rebuilt"
    built = _zoo(installed, tmp_path, "build", TINY, "--profile", "smoke", "--out", str(out),
                 "--data-dir", str(cifar_dir))  # fmt: skip
    assert built.returncode == 0, built.stderr[-2000:]
    checked = _zoo(installed, tmp_path, "pull", TINY, "--json", **store)
    pinned = {p.name: p.read_bytes() for p in Path(json.loads(checked.stdout)["path"]).iterdir()}
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.name in pinned} == pinned
