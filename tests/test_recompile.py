"""A ``compile_from`` variant: a pinned build's weights compiled with other settings, no
training (zoo/build/recompile.py). Real builds: the pinned cifar10-split-tiny, from the
project's release store, recompiled for real, and a pinned VGG11 smoke build taken as far as
its clear evaluation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import ROOT, build_hashes, read_json

from zoo.build import run as builder
from zoo.catalog import registry as reg
from zoo.cost import model as cost
from zoo.errors import BuildError, BuildPaused

PARENT = "cifar10-split-tiny"
SAME, NORM2 = "cifar10-split-tiny-same", "cifar10-split-tiny-norm2"
VGG_PARENT = "cifar10-vgg11-qat@8cd6ca65c1d4"  # smoke, pinned; its data record says ``partial``


@pytest.fixture
def recompile_registry(
    zoo_home: Path, registry_file: Path, monkeypatch: pytest.MonkeyPatch
) -> reg.Build:
    """The scratch registry with the pinned tiny build and two variants compiled from it: one
    with its own settings, one with concrete's per-norm parameters at p_error 0.01."""
    norm2 = {"multi_parameter_strategy": "precision_and_norm2", "p_error": 0.01}
    monkeypatch.setenv("ZOO_RELEASES", str(ROOT / "releases"))
    return _compile_from(PARENT, {SAME: {}, NORM2: norm2}, registry_file)


def _compile_from(parent: str, children: dict[str, dict], registry_file: Path) -> reg.Build:
    """Pin the project's build ``parent`` in the scratch registry and add one variant compiled
    from it per entry of ``children`` (name: compile settings); return the pinned build."""
    pinned = reg.resolve(reg.load(ROOT / "registry.json"), parent, check_runtime=False)
    raw = json.loads(registry_file.read_text())
    raw["variants"][pinned.variant]["builds"] = [pinned.raw]
    for name, settings in children.items():
        variant = json.loads(json.dumps(raw["variants"][pinned.variant]))
        variant["recipe"]["params"] = {"compile_from": pinned.short_ref, **settings}
        variant["recipe"]["profiles"] = [pinned.profile]
        variant["builds"] = []
        raw["variants"][name] = variant
    reg.save(raw, registry_file)
    return pinned


def _build(variant: str, parent: reg.Build, data: Path, out: Path) -> tuple[Path, dict, dict]:
    """Build ``variant``; return its folder, its files' hashes and the parent's pinned ones."""
    out = builder.build(variant, profile=parent.profile, data_dir=data, out_dir=out)
    return out, build_hashes(out), {entry.path: entry.sha256 for entry in parent.files}


def test_the_parents_settings_give_its_circuit_bit_for_bit(
    recompile_registry: reg.Build, cifar_dir: Path, tmp_path: Path
) -> None:
    parent = recompile_registry
    out, hashes, pinned = _build(SAME, parent, cifar_dir, tmp_path / "b")
    for name in ("head.safetensors", "weights.safetensors", "client.zip", "server.zip"):
        assert hashes[name] == pinned[name], name  # nothing was trained, the compile repeats
    document = read_json(out / "manifest.json")
    assert document["recipe"]["params"]["compile_from"] == parent.short_ref
    assert document["metrics"]["clear_top1"] == parent.metrics["clear_top1"]
    assert document["details"]["train_history"]  # the weights' history travels with them


def test_other_settings_change_the_circuit_and_nothing_else(
    recompile_registry: reg.Build, cifar_dir: Path, tmp_path: Path
) -> None:
    parent = recompile_registry
    out, hashes, pinned = _build(NORM2, parent, cifar_dir, tmp_path / "b")
    assert hashes["weights.safetensors"] == pinned["weights.safetensors"]  # shared in releases/
    assert hashes["head.safetensors"] == pinned["head.safetensors"]
    assert hashes["server.zip"] != pinned["server.zip"]
    document = read_json(out / "manifest.json")
    arch = document["recipe"]["config"]["arch"]
    assert (arch["multi_parameter_strategy"], arch["p_error"]) == ("precision_and_norm2", 0.01)
    assert document["circuit"]["configured_p_error"] == 0.01
    # per weight norm: more parameter sets, each lighter, so less time than the parent's
    assert len(cost.pbs_rows(document["circuit"])) > len(cost.pbs_rows(parent.circuit))
    assert cost.estimate_seconds(document["circuit"]) < cost.estimate_seconds(parent.circuit)
    assert _build(NORM2, parent, cifar_dir, tmp_path / "again")[1] == hashes


@pytest.mark.parametrize(
    ("params", "profile", "error"),
    [
        ({"fanin": [7, 7, 7, 7]}, None, r"may not set \['fanin'\]"),
        ({}, "quick", "trained with the profile 'smoke', not 'quick'"),
        ({"multi_parameter_strategy": "fastest"}, None, "unknown multi_parameter_strategy"),
    ],
)
def test_a_recompile_refuses_what_it_cannot_honour(
    recompile_registry: reg.Build,
    registry_file: Path,
    cifar_dir: Path,
    tmp_path: Path,
    params: dict,
    profile: str | None,
    error: str,
) -> None:
    raw = json.loads(registry_file.read_text())
    raw["variants"][SAME]["recipe"]["params"].update(params)
    raw["variants"][SAME]["recipe"]["profiles"].append("quick")
    reg.save(raw, registry_file)
    with pytest.raises(BuildError, match=error):
        builder.build(SAME, profile=profile or recompile_registry.profile, data_dir=cifar_dir,
                      out_dir=tmp_path / "b")  # fmt: skip


def test_a_vgg11_parent_passes_its_data_check(
    zoo_home: Path,
    registry_file: Path,
    cifar_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """VGG11 builds record whether their data was a partial copy; the fingerprints, not that
    extra key, decide whether these are the parent's images (up to the compile: --train-only)."""
    monkeypatch.setenv("ZOO_RELEASES", str(ROOT / "releases"))
    parent = _compile_from(VGG_PARENT, {"cifar10-vgg11-qat-same": {}}, registry_file)
    with pytest.raises(BuildPaused, match="--train-only"):
        builder.build("cifar10-vgg11-qat-same", profile=parent.profile, data_dir=cifar_dir,
                      out_dir=tmp_path / "b", train_only=True)  # fmt: skip
