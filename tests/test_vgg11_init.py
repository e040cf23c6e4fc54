"""``zoo build --init``: the VGG11 recipe starts its float stage from given weights, ours or
torchvision's ``vgg11`` layout, refuses files that do not fit, and records their hash; other
recipes refuse ``--init`` before doing any work."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from zoo.build import run as builder
from zoo.build.training import check_records
from zoo.errors import BuildError
from zoo.store.hashing import sha256_file

vgg = builder.load_recipe("recipes/vgg11_qat.py")

# torchvision's vgg11 ("A" configuration): conv indices in ``features`` and its classifier.
TORCHVISION_CONVS = {0: (64, 3), 3: (128, 64), 6: (256, 128), 8: (256, 256), 11: (512, 256),
                     13: (512, 512), 16: (512, 512), 18: (512, 512)}  # fmt: skip


def torchvision_state(seed: int = 1) -> dict[str, torch.Tensor]:
    """A state dict with torchvision vgg11's names and shapes (random values)."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for index, (out, inp) in TORCHVISION_CONVS.items():
        state[f"features.{index}.weight"] = torch.randn(out, inp, 3, 3, generator=gen)
        state[f"features.{index}.bias"] = torch.randn(out, generator=gen)
    state["classifier.0.weight"] = torch.randn(8, 16, generator=gen)  # shape irrelevant: dropped
    state["classifier.0.bias"] = torch.randn(8, generator=gen)
    return state


def test_torchvision_weights_fill_the_convs_in_order(tmp_path: Path) -> None:
    path = tmp_path / "vgg11.safetensors"
    state = torchvision_state()
    save_file(state, str(path))
    model = vgg.FloatVGG11(10, width_divisor=1)
    final_before = model.final.weight.detach().clone()

    record = vgg.load_init(model, path)

    convs = [m for m in model.features if isinstance(m, torch.nn.Conv2d)]
    for conv, index in zip(convs, sorted(TORCHVISION_CONVS)):
        assert torch.equal(conv.weight, state[f"features.{index}.weight"])
        assert torch.equal(conv.bias, state[f"features.{index}.bias"])
    assert torch.equal(model.final.weight, final_before)  # the classifier is not carried over
    assert record == {"file": path.name, "sha256": sha256_file(path), "format": "torchvision"}


def test_our_own_float_stage_round_trips(tmp_path: Path) -> None:
    source = vgg.FloatVGG11(10, width_divisor=8)
    path = tmp_path / "float.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    torch.manual_seed(123)
    target = vgg.FloatVGG11(10, width_divisor=8)
    assert vgg.load_init(target, path)["format"] == "zoo"
    for key, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], value)


def test_weights_of_another_width_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "vgg11.safetensors"
    save_file(torchvision_state(), str(path))
    with pytest.raises(BuildError, match="shape") as info:
        vgg.load_init(vgg.FloatVGG11(10, width_divisor=8), path)
    assert "profile full" in info.value.hint


def test_a_file_without_vgg11_convs_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "other.safetensors"
    save_file({"features.0.weight": torch.zeros(4, 3, 3, 3), "features.0.bias": torch.zeros(4)},
              str(path))  # fmt: skip
    with pytest.raises(BuildError, match="1 conv weights"):
        vgg.load_init(vgg.FloatVGG11(10), path)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file")
    with pytest.raises(BuildError, match="not a readable safetensors"):
        vgg.load_init(vgg.FloatVGG11(10), garbage)


def test_a_recipe_without_init_refuses_it_before_any_work(
    tmp_path: Path, registry_file: Path
) -> None:
    path = tmp_path / "vgg11.safetensors"
    save_file(torchvision_state(), str(path))
    out = tmp_path / "out"
    with pytest.raises(BuildError, match="takes no --init"):
        builder.build("cifar10-split-tiny", profile="smoke", out_dir=out, init=path)
    assert not out.exists()


def test_archs_and_profiles_are_the_typed_records_they_claim() -> None:
    check_records(vgg.ARCHS, vgg.Arch)
    check_records(vgg.PROFILES, vgg.Profile)
