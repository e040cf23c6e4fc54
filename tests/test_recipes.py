"""Smoke builds of the other variant families on real CIFAR: the full-FHE CNV (rounded to 6
bits), VGG11 QAT, and the rounded split variant. Each compiles within its bound, gives the same
bytes twice, and round-trips through publish/pull; CIFAR-100 refuses to train on a partial copy;
the rounded tiny variant runs in real FHE and agrees with simulation."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import build_hashes

import zoo
from zoo.build import run as builder
from zoo.build.data import load_cifar10, load_cifar100_split
from zoo.catalog import manifest
from zoo.catalog import registry as reg
from zoo.errors import BuildError
from zoo.fhe import runtime

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("variant", ["cifar10-cnv-2w2a-r6", "cifar10-vgg11-qat"])
def test_smoke_build_is_bounded_deterministic_and_round_trips(
    variant: str, cifar_dir: Path, zoo_home: Path, registry_file: Path, tmp_path: Path
) -> None:
    first = builder.build(variant, profile="smoke", data_dir=cifar_dir, out_dir=tmp_path / "a")
    second = builder.build(variant, profile="smoke", data_dir=cifar_dir, out_dir=tmp_path / "b")
    assert build_hashes(first) == build_hashes(second)

    document = manifest.read(first)
    entry = reg.load(ROOT / "registry.json").variant(variant)
    params = entry.recipe["params"]
    assert document["circuit"]["max_bit_width"] <= params["max_bit_width"]
    rounding = params.get("rounding_threshold_bits")
    expected_rounding = [rounding["n_bits"]] if rounding else []
    assert document["circuit"]["rounding_threshold_n_bits"] == expected_rounding
    assert document["head"]["ops"][-1]["op"] == "quantize_dequantize"  # the client quantizes

    published = zoo.publish(first, "local")
    pulled = zoo.pull(variant)
    assert build_hashes(pulled.path) == build_hashes(first)
    assert {e.path: e.sha256 for e in published.files} == build_hashes(first)


@pytest.fixture
def partial_cifar100(cifar_dir: Path) -> Path:
    """The data folder, when its CIFAR-100 is a partial copy (as materialized from
    ../shared/data); with the complete official archive there is nothing to refuse."""
    if load_cifar100_split(cifar_dir, "train").is_complete:
        pytest.skip("this data folder holds the complete CIFAR-100 archive")
    return cifar_dir


@pytest.mark.parametrize("profile", ["full", "quick"])
def test_cifar100_refuses_to_train_on_a_partial_copy(
    profile: str, partial_cifar100: Path, registry_file: Path, tmp_path: Path
) -> None:
    with pytest.raises(BuildError, match="partial copy") as info:
        builder.build("cifar100-vgg11-qat", profile=profile, data_dir=partial_cifar100,
                      out_dir=tmp_path / "out")  # fmt: skip
    assert "of 50000 images" in str(info.value)
    assert "cifar-100-python" in info.value.hint and "--profile smoke" in info.value.hint
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_cifar100_smoke_runs_on_the_partial_copy_and_says_so(
    partial_cifar100: Path, registry_file: Path, tmp_path: Path
) -> None:
    out = builder.build("cifar100-vgg11-qat", profile="smoke", data_dir=partial_cifar100,
                        out_dir=tmp_path / "c100")  # fmt: skip
    document = manifest.read(out)
    assert document["data"]["partial"] is True
    assert "partial copy" in document["data"]["dataset"]
    assert document["recipe"]["config"]["data"]["num_classes"] == 100
    assert "partial copy" in (out / "README.md").read_text()


def test_rounded_tiny_runs_in_real_fhe_and_agrees_with_simulation(
    cifar_dir: Path, zoo_home: Path, registry_file: Path, tmp_path: Path
) -> None:
    variant = "cifar10-split-tiny-r4"
    out = builder.build(variant, profile="smoke", data_dir=cifar_dir, out_dir=tmp_path / "r4")
    circuit = manifest.read(out)["circuit"]
    assert max(int(bits) for bits in circuit["pbs_count_by_bit_width"]) <= 4  # rounded PBS
    zoo.publish(out, "local")
    model = runtime.load(variant)
    images, _ = load_cifar10(cifar_dir, "test")
    executed = model.logits(images[:1], "execute")
    simulated = model.logits(images[:1], "simulate")
    assert executed.shape == (1, 10)
    assert (executed.argmax(1) == simulated.argmax(1)).all()


def test_vgg11_smoke_build_from_init_records_it_and_trains_from_it(
    cifar_dir: Path, zoo_home: Path, registry_file: Path, tmp_path: Path
) -> None:
    import torch
    from safetensors.torch import save_file

    from zoo.store.hashing import sha256_file

    vgg = builder.load_recipe("recipes/vgg11_qat.py")
    torch.manual_seed(7)  # another starting point than the recipe's own (seed 0)
    init = tmp_path / "float.safetensors"
    weights = vgg.FloatVGG11(10, width_divisor=8).state_dict()
    save_file({k: v.contiguous() for k, v in weights.items()}, str(init))

    out = builder.build("cifar10-vgg11-qat", profile="smoke", data_dir=cifar_dir,
                        out_dir=tmp_path / "init", init=init)  # fmt: skip

    config = manifest.read(out)["recipe"]["config"]
    assert config["init"] == {"file": init.name, "sha256": sha256_file(init), "format": "zoo"}
    builds = reg.load(ROOT / "registry.json").variant("cifar10-vgg11-qat").builds
    pinned = next(b for b in reversed(builds) if b.profile == "smoke" and not b.yanked)
    pinned_weights = {e.path: e.sha256 for e in pinned.files}["weights.safetensors"]
    assert build_hashes(out)["weights.safetensors"] != pinned_weights
