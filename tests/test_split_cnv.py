"""The split-CNV recipe: client head export, bit-width bound, deterministic training."""

from __future__ import annotations

import importlib.util
import logging
import re
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
import torch
from conftest import circuit_lsbs
from safetensors import safe_open
from safetensors.torch import save as st_save
from safetensors.torch import save_file

from zoo.build.data import load_cifar10
from zoo.build.run import BuildContext
from zoo.build.training import (
    check_records,
    load_checkpoint,
    save_checkpoint,
    training_fingerprint,
)
from zoo.catalog import versions
from zoo.errors import BitWidthBoundError, BuildError, BuildPaused, RecipeConfigError
from zoo.fhe import head as zoo_head

ROOT = Path(__file__).resolve().parent.parent


def _load_recipe() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "test_recipe_split_cnv", ROOT / "recipes" / "split_cnv.py"
    )
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


sc = _load_recipe()

#: A profile small enough for unit tests (seconds, not minutes).
TINY_PROFILE = {
    "epochs": 2,
    "n_train": 300,
    "n_test": 60,
    "n_calib": 60,
    "batch_size": 50,
    "eval_batch_size": 60,
}


def make_ctx(work_dir: Path, data_dir: Path, **fields: Any) -> BuildContext:
    """The BuildContext `zoo build` would give the recipe: the tiny arch, smoke profile, CPU."""
    defaults: dict[str, Any] = {
        "variant": "cifar10-split-tiny", "params": {"arch": "tiny"}, "profile": "smoke",
        "seed": 0, "device": "cpu", "resume": False, "log": logging.getLogger("test-split-cnv"),
    }  # fmt: skip
    return BuildContext(work_dir=work_dir, data_dir=data_dir, **{**defaults, **fields})


def _train_tiny(
    cifar_dir: Path, work: Path, epochs: int, resume: bool = False, stop_after: int | None = None
):
    """Train the tiny arch on a few hundred images; return (model, cfg)."""
    params = {"arch": "tiny", "profile_overrides": dict(TINY_PROFILE, epochs=epochs)}
    cfg = sc.resolve_config("cifar10-split-tiny", params, "smoke", 0)
    if stop_after is not None:
        cfg["profile"]["epochs"] = stop_after
    sc.seed_everything(0, "cpu")
    model = sc.SplitCNV(cfg["arch"])
    x, y = load_cifar10(cifar_dir, "train")
    ctx = make_ctx(work_dir=work, data_dir=cifar_dir, resume=resume)
    work.mkdir(parents=True, exist_ok=True)
    sc.train(model, x[:300], y[:300], cfg, ctx)
    return model, cfg


def test_configs_resolve() -> None:
    """Both variants and all profiles resolve; bad names are refused."""
    for arch in sc.ARCHS:
        for profile in sc.PROFILES:
            cfg = sc.resolve_config(f"cifar10-{arch}", {"arch": arch}, profile, 0)
            assert cfg["torch_threads"] == sc.TORCH_THREADS
    with pytest.raises(RecipeConfigError, match="unknown split-CNV arch 'nope'"):
        sc.resolve_config("x", {"arch": "nope"}, "smoke", 0)
    with pytest.raises(RecipeConfigError, match="unknown split-CNV parameter 'bogus'"):
        sc.resolve_config("x", {"arch": "tiny", "bogus": 1}, "smoke", 0)


def test_archs_and_profiles_are_the_typed_records_they_claim() -> None:
    check_records(sc.ARCHS, sc.Arch)
    check_records(sc.PROFILES, sc.Profile)  # monitor_every is optional
    typo = {k: v for k, v in sc.PROFILES["smoke"].items() if k != "epochs"} | {"epoch": 1}
    with pytest.raises(ValueError, match=r"missing \['epochs'\], unknown \['epoch'\]"):
        check_records({"bad": typo}, sc.Profile)


def test_reference_model_size() -> None:
    """The 8-bit variant is the ~1.5 M-parameter reference CNV."""
    cfg = sc.resolve_config("cifar10-split-8bit", {"arch": "split-8bit"}, "smoke", 0)
    model = sc.SplitCNV(cfg["arch"])
    n = sum(p.numel() for p in model.parameters())
    assert 1.4e6 < n < 1.7e6
    model.eval()
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


def test_fanin_mask_limits_rows() -> None:
    """Each output neuron keeps at most K weights, the largest ones."""
    w = torch.randn(8, 4, 3, 3)
    mask = sc.fanin_mask(w, 5)
    assert mask.reshape(8, -1).sum(1).tolist() == [5.0] * 8
    a, m = w.abs().reshape(8, -1), mask.reshape(8, -1).bool()
    kept = a.masked_fill(~m, float("inf")).min(1).values
    dropped = a.masked_fill(m, 0.0).max(1).values
    assert torch.all(kept >= dropped)


def test_head_forward_reproduces_model_head(cifar_dir: Path, tmp_path: Path) -> None:
    """zoo.fhe.head.forward (saved tensors + config only) equals the training model's quantized head
    output exactly on real test images."""
    model, cfg = _train_tiny(cifar_dir, tmp_path / "w", epochs=1)
    model.eval()
    tensors, config = sc.export_head(model, cfg["arch"])
    # Round-trip through safetensors bytes, as a client would receive them.
    from safetensors.torch import load as st_load

    tensors = st_load(st_save(tensors))
    x, _ = load_cifar10(cifar_dir, "test")
    images = x[:256]
    got = zoo_head.forward(tensors, config, images)
    mean = torch.tensor(sc.DATA["mean"])
    std = torch.tensor(sc.DATA["std"])
    with torch.no_grad():
        feats = model.head(sc.normalize_images(images, mean, std))
        want = model.encrypted.input_quant(feats).numpy()
        # The unfolded float path (conv then BatchNorm) agrees up to rounding at the
        # quantization boundaries.
        unfolded = model.encrypted.input_quant(
            torch.nn.functional.avg_pool2d(
                torch.nn.functional.hardtanh(
                    model.head.bn(model.head.conv(sc.normalize_images(images, mean, std)))
                ),
                3,
                3,
            )
        ).numpy()
    assert got.dtype == np.float32 and got.flags["C_CONTIGUOUS"]
    assert got.shape == (256, *config["output"]["shape"][1:])
    np.testing.assert_array_equal(got, want)
    assert (got == unfolded).mean() > 0.999
    levels = np.unique(got / float(tensors["quant.scale"]))
    assert set(np.round(levels).tolist()) <= {-1.0, 0.0, 1.0}
    assert config["ops"][-1]["bit_width"] == 2


def test_clear_blocks_move_the_first_encrypted_block_to_the_client(
    cifar_dir: Path, tmp_path: Path
) -> None:
    """With ``clear_blocks`` = 1 the exported head also runs the first ternary conv block (its
    BatchNorm folded in): it reproduces the Brevitas block's quantized output, and the circuit
    that remains computes the same logits from it."""
    model, cfg = _train_tiny(cifar_dir, tmp_path / "w", epochs=1)
    arch = {**cfg["arch"], "clear_blocks": 1}
    model.eval()
    tensors, config = sc.export_head(model, arch)
    assert [op["op"] for op in config["ops"]] == [
        "conv2d", "hardtanh", "avg_pool2d", "quantize_dequantize",  # the split's head
        "conv2d", "quantize_dequantize", "avg_pool2d", "quantize_dequantize",  # block 1
    ]  # fmt: skip
    images = load_cifar10(cifar_dir, "test")[0][:256]
    got = zoo_head.forward(tensors, config, images)
    want = sc.head_outputs(model, images, 64, sc._clear_end(arch))
    assert got.shape == want.shape == (256, *config["output"]["shape"][1:]) == (256, 16, 4, 4)
    # Folding BatchNorm into the conv changes float rounding: rare flips at level boundaries.
    assert (got == want).mean() > 0.999
    tail = sc.encrypted_part(model, arch)
    with torch.no_grad():
        np.testing.assert_allclose(
            tail(torch.from_numpy(want)).numpy(),
            model(sc.normalize_images(images, torch.tensor(sc.DATA["mean"]),
                                      torch.tensor(sc.DATA["std"]))).numpy(),
            rtol=1e-5, atol=1e-5,
        )  # fmt: skip
    with pytest.raises(ValueError, match="clear_blocks"):
        sc.resolve_config("x", {"arch": "tiny", "clear_blocks": 2}, "smoke", 0)


def test_pool_first_fine_tune_starts_from_its_parent_build(
    cifar_dir: Path, zoo_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``cnv-2w2a-pf`` pools each conv's accumulator before BatchNorm and quantizer. Its
    fine-tune starts from the pinned parent build, pulled from the project's release store:
    every learned layer is copied across though the layouts differ. Its exported head, with a
    pooled block in the clear, reproduces the model's quantized output, and its circuit module
    (pools folded into convs) the trained one's logits; a parent of another shape is refused."""
    from safetensors.torch import load_file

    from zoo import api

    monkeypatch.setenv("ZOO_RELEASES", str(ROOT / "releases"))
    cfg = sc.resolve_config("x", {"arch": "cnv-2w2a-pf", "clear_blocks": 2}, "finetune", 0)
    arch = cfg["arch"]
    model = sc.SplitCNV(arch)
    sc.load_parent(model, arch["init_from"])
    parent = load_file(str(api.pull(arch["init_from"]).path / "weights.safetensors"))
    features = model.encrypted.features
    assert isinstance(features[4], torch.nn.AvgPool2d)  # block 2: conv, pool, BatchNorm, quant
    assert torch.equal(features[3].weight, parent["features.3.weight"])
    assert torch.equal(features[5].running_var, parent["features.4.running_var"])
    assert torch.equal(model.encrypted.linear[7].weight, parent["linear.7.weight"])

    model.eval()
    tensors, config = sc.export_head(model, arch)
    assert [op["op"] for op in config["ops"]] == [
        "quantize_dequantize", "conv2d", "quantize_dequantize",
        "conv2d", "avg_pool2d", "quantize_dequantize",
    ]  # fmt: skip
    images = load_cifar10(cifar_dir, "test")[0][:64]
    got = zoo_head.forward(tensors, config, images)
    want = sc.head_outputs(model, images, 64, sc._clear_end(arch))
    assert got.shape == want.shape == (64, 64, 14, 14)
    assert (got == want).mean() > 0.999
    # What is compiled folds each pool into its conv (4x4, stride 2, kernel in -4..4): the
    # same logits as the trained layout.
    circuit = sc.encrypted_part(model, arch)
    assert not any(isinstance(m, torch.nn.AvgPool2d) for m in circuit.modules())
    with torch.no_grad():
        folded = circuit(torch.from_numpy(want))
        trained = sc.EncryptedTail(model.encrypted, sc._clear_end(arch))(torch.from_numpy(want))
    torch.testing.assert_close(folded, trained, rtol=1e-5, atol=1e-4)

    tiny = sc.SplitCNV(sc.resolve_config("x", {"arch": "tiny"}, "smoke", 0)["arch"])
    with pytest.raises(ValueError, match="do not match"):
        sc.load_parent(tiny, arch["init_from"])


def test_every_parent_an_arch_names_is_a_live_build_of_its_layout(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An arch's ``init_from`` names a build that the registry offers, is not yanked, is pulled
    from the release store of a fresh clone, and whose learned layers fit the arch."""
    from zoo.catalog import registry as reg

    monkeypatch.setenv("ZOO_RELEASES", str(ROOT / "releases"))
    catalogue = reg.load(ROOT / "registry.json")
    parents = {name: arch["init_from"] for name, arch in sc.ARCHS.items() if "init_from" in arch}
    assert parents
    for name, ref in parents.items():
        reg.resolve(catalogue, ref, check_runtime=False)  # raises if unknown or yanked
        sc.load_parent(sc.SplitCNV(sc.resolve_config("x", {"arch": name}, "finetune", 0)["arch"]),
                       ref)  # fmt: skip


def test_training_is_deterministic_and_resumable(cifar_dir: Path, tmp_path: Path) -> None:
    """Two runs give byte-identical weights; an interrupted + resumed run gives the same."""
    m1, _ = _train_tiny(cifar_dir, tmp_path / "a", epochs=2)
    m2, _ = _train_tiny(cifar_dir, tmp_path / "b", epochs=2)
    b1, b2 = st_save(m1.state_dict()), st_save(m2.state_dict())
    assert b1 == b2
    # Stop after epoch 1, then resume to 2 from the checkpoint.
    _train_tiny(cifar_dir, tmp_path / "c", epochs=2, stop_after=1)
    m3, _ = _train_tiny(cifar_dir, tmp_path / "c", epochs=2, resume=True)
    assert st_save(m3.state_dict()) == b1


def _small_build(cifar_dir: Path, tmp_path: Path, **params: Any):
    ctx = make_ctx(
        work_dir=tmp_path / "work",
        data_dir=cifar_dir,
        params={"arch": "tiny", "profile_overrides": TINY_PROFILE, **params},
    )
    return sc.build(ctx)


def test_bit_width_bound_fails_when_too_low(cifar_dir: Path, tmp_path: Path) -> None:
    """The build refuses a circuit wider than the variant's bound."""
    with pytest.raises(BitWidthBoundError, match="bound of 3 bits"):
        _small_build(cifar_dir, tmp_path, max_bit_width=3)


def test_small_build_end_to_end(cifar_dir: Path, tmp_path: Path) -> None:
    """A small tiny build compiles within its bound and FHE simulation matches the clear
    model (p_error is small enough that no error is drawn)."""
    r = _small_build(cifar_dir, tmp_path)
    m = r.metrics
    assert m["max_bit_width"] <= sc.ARCHS["tiny"]["max_bit_width"]
    assert max(m["max_nonzero_fanin"]) <= max(sc.ARCHS["tiny"]["fanin"])
    assert m["n_test_images"] == 60
    for k in (1, 2, 3):
        assert 0.0 <= m[f"fhe_simulation_top{k}"] <= 1.0
    assert m["clear_vs_simulation_argmax_agreement"] == 1.0
    assert m["fhe_simulation_top1"] == m["clear_top1"]
    assert r.quantized_module.fhe_circuit.statistics["programmable_bootstrap_count"] > 0
    assert r.quantized_module.fhe_circuit is not None
    assert all(k.endswith("_seconds") or "seconds" not in k for k in m)
    assert set(r.stages) == {
        "data",
        "train",
        "evaluate_clear",
        "compile",
        "evaluate_fhe_simulation",
    }
    assert (tmp_path / "work" / "checkpoint.safetensors").exists()
    # The head shipped to clients feeds the circuit directly.
    x, _ = load_cifar10(cifar_dir, "test")
    inp = zoo_head.forward(r.head, r.head_config, x[:4])
    out = r.quantized_module.forward(inp, fhe="disable")
    assert out.shape == (4, 10)
    assert r.data["n_train"] == 300 and r.data["train_fingerprint"].startswith("sha256:")


def test_small_build_with_a_clear_block(cifar_dir: Path, tmp_path: Path) -> None:
    """``clear_blocks`` = 1: the circuit takes the block's pooled output (16 x 4 x 4), holds
    fewer PBS than the whole encrypted part, and its simulation agrees with the clear model
    (float folding aside)."""
    r = _small_build(cifar_dir, tmp_path, clear_blocks=1)
    assert r.head_config["output"]["shape"] == [None, 16, 4, 4]
    x, _ = load_cifar10(cifar_dir, "test")
    inp = zoo_head.forward(r.head, r.head_config, x[:4])
    assert r.quantized_module.forward(inp, fhe="disable").shape == (4, 10)
    # Each 2-bit activation of the tail is at most one PBS: conv (64 x 2 x 2) and fc (128).
    assert r.quantized_module.fhe_circuit.statistics["programmable_bootstrap_count"] <= 384
    assert r.metrics["clear_vs_simulation_argmax_agreement"] >= 0.95
    assert r.config["arch"]["clear_blocks"] == 1


def test_full_fhe_cnv_has_no_clear_layer(cifar_dir: Path) -> None:
    """cnv-2w2a: the client only normalises and quantizes the image to 8-bit Q1.7; everything
    else (the first conv included) is in the encrypted part."""
    cfg = sc.resolve_config("cifar10-cnv-2w2a", {"arch": "cnv-2w2a"}, "smoke", 0)
    model = sc.SplitCNV(cfg["arch"])
    model.eval()
    assert not model.head.has_conv and not list(model.head.parameters())
    assert model.encrypted.features[0].in_channels == 3
    tensors, config = sc.export_head(model, cfg["arch"])
    assert [op["op"] for op in config["ops"]] == ["quantize_dequantize"]
    assert config["ops"][0]["bit_width"] == 8 and not config["ops"][0]["narrow_range"]
    assert float(tensors["quant.scale"]) == 2.0**-7  # Q1.7: power-of-two scale
    images, _ = load_cifar10(cifar_dir, "test")
    got = zoo_head.forward(tensors, config, images[:8])
    mean, std = torch.tensor(sc.DATA["mean"]), torch.tensor(sc.DATA["std"])
    with torch.no_grad():
        want = model.encrypted.input_quant(sc.normalize_images(images[:8], mean, std)).numpy()
    np.testing.assert_array_equal(got, want)
    assert got.shape == (8, 3, 32, 32) and got.min() >= -1.0 and got.max() <= 1.0 - 2.0**-7
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


def test_resume_refuses_a_checkpoint_of_another_training(tmp_path: Path) -> None:
    """A checkpoint serves any config with the same training (a rounded variant of its base),
    and is refused under another (here: another seed, another learning rate)."""
    base = sc.resolve_config("cifar10-split-tiny", {"arch": "tiny"}, "smoke", 0)
    rounding = {"method": "APPROXIMATE", "n_bits": 4}
    rounded = sc.resolve_config("x", {"arch": "tiny", "rounding_threshold_bits": rounding},
                                "smoke", 0)  # fmt: skip
    path = tmp_path / "checkpoint.safetensors"
    save_checkpoint(path, {"epoch": torch.tensor(3)}, base, "sha256:images")
    assert int(load_checkpoint(path, rounded, 4, "sha256:images")["epoch"]) == 3
    with pytest.raises(BuildError, match="other images"):  # another --data-dir or n_train
        load_checkpoint(path, rounded, 4, "sha256:other-images")
    with pytest.raises(BuildError, match="more than the 3 of this profile"):
        load_checkpoint(path, base, 3)
    other_seed = sc.resolve_config("cifar10-split-tiny", {"arch": "tiny"}, "smoke", 1)
    other_lr = sc.resolve_config(
        "cifar10-split-tiny", {"arch": "tiny", "profile_overrides": {"lr": 0.01}}, "smoke", 0
    )
    for other in (other_seed, other_lr):
        with pytest.raises(BuildError, match="another configuration"):
            load_checkpoint(path, other, 4)


def test_resume_refuses_a_checkpoint_of_other_torch_or_brevitas_versions(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pieces trained on other versions give bytes no rebuild has: refused on the CPU, where
    the versions are those of the checkpoint; accepted for a GPU's epochs (never a CPU's
    bytes) and for checkpoints from before checkpoints recorded their versions."""
    cfg = sc.resolve_config("cifar10-split-tiny", {"arch": "tiny"}, "smoke", 0)
    cpu, gpu = tmp_path / "cpu.safetensors", tmp_path / "gpu.safetensors"
    save_checkpoint(cpu, {"epoch": torch.tensor(1), "history": [{"loss": 1.0}]}, cfg, "d")
    save_checkpoint(gpu, {"epoch": torch.tensor(1), "history": [{"device": "H200"}]}, cfg, "d")
    old = tmp_path / "old.safetensors"
    with safe_open(str(cpu), framework="pt") as f:
        meta = {k: v for k, v in f.metadata().items() if k != "versions"}
        save_file({k: f.get_tensor(k) for k in f.keys()}, str(old), metadata=meta)  # noqa: SIM118
    real = versions.installed()["brevitas"]
    upgraded = {**versions.installed(), "brevitas": real + ".post1"}
    monkeypatch.setattr(versions, "installed", lambda: upgraded)
    with pytest.raises(BuildError, match=re.escape(f"brevitas {real}, torch")):
        load_checkpoint(cpu, cfg, 2, "d")
    for accepted, device in [(gpu, "cpu"), (old, "cpu"), (cpu, "cuda")]:  # cuda: trains on a GPU
        assert int(load_checkpoint(accepted, cfg, 2, "d", device)["epoch"]) == 1
    save_file({"t0": torch.tensor(1)}, str(old), metadata={**meta, "versions": "[1]"})
    with pytest.raises(BuildError, match="is not a training checkpoint"):
        load_checkpoint(old, cfg, 2, "d")


def test_checkpoint_round_trips_an_optimizer_and_refuses_a_damaged_file(tmp_path: Path) -> None:
    """Safetensors checkpoints (no pickle) give back every tensor bit for bit and the values
    around them with their types: the optimizer's state is keyed by parameter index (int)."""
    cfg = sc.resolve_config("cifar10-split-tiny", {"arch": "tiny"}, "smoke", 0)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    model(torch.ones(4, 3)).sum().backward()
    opt.step()
    state = {
        "epoch": torch.tensor(0),
        "optimizer": opt.state_dict(),
        "masks": [],
        "history": [{"epoch": 1, "loss": 0.1 + 0.2}],
        "torch_rng": torch.get_rng_state(),
    }
    path = tmp_path / "checkpoint.safetensors"
    save_checkpoint(path, state, cfg, "sha256:images")
    back = load_checkpoint(path, cfg, 1)
    assert back["history"] == state["history"] and back["masks"] == []
    assert torch.equal(back["torch_rng"], state["torch_rng"])
    assert set(back["optimizer"]["state"]) == {0, 1}
    for k, v in state["optimizer"]["state"][1].items():
        assert torch.equal(back["optimizer"]["state"][1][k], v)
    again = torch.optim.Adam(torch.nn.Linear(3, 2).parameters(), lr=0.5)
    again.load_state_dict(back["optimizer"])
    assert again.param_groups[0]["lr"] == 0.01 and len(again.state) == 2
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(BuildError, match="not a training checkpoint"):
        load_checkpoint(path, cfg, 1)


def test_rounding_in_the_loop_is_the_circuits_rounding(cifar_dir: Path, tmp_path: Path) -> None:
    """``round_accumulators`` trains with each encrypted accumulator rounded as concrete-ml's
    ``rounding_threshold_bits`` rounds it: after training, the rounded torch model and the
    compiled circuit (exact rounding, run in the clear) give the same classes on test images,
    where the unrounded model does not; the layers the client runs stay unrounded."""
    from zoo.build.training import compile_qat

    rounding = {"method": "EXACT", "n_bits": 4}
    overrides = {**TINY_PROFILE, "epochs": 1, "round_accumulators": 4}
    params = {"arch": "tiny", "fanin": None, "clear_blocks": 1,
              "rounding_threshold_bits": rounding, "profile_overrides": overrides}  # fmt: skip
    cfg = sc.resolve_config("x", params, "smoke", 0)
    arch = cfg["arch"]
    sc.seed_everything(0, "cpu")
    model = sc.SplitCNV(arch)
    x, y = load_cifar10(cifar_dir, "train")
    ctx = make_ctx(work_dir=tmp_path, data_dir=cifar_dir, params=params)
    history = sc.train(model, x[:300], y[:300], cfg, ctx)
    lsbs = history[0]["lsbs_removed"]
    # rounded: every encrypted layer but the first (in the clear) and the last (the output)
    assert len(lsbs) == len(model.encrypted.quant_layers()) - 2 and max(lsbs) > 0
    model.eval()
    test_x, _ = load_cifar10(cifar_dir, "test")
    calib = sc.head_outputs(model, x[:60], 60, sc._clear_end(arch))
    circuit = compile_qat(sc.encrypted_part(model, arch), calib, arch, tmp_path / "c.onnx")
    compiled = circuit.forward(sc.head_outputs(model, test_x[:200], 100, sc._clear_end(arch)),
                               fhe="disable")  # fmt: skip
    plain = sc.clear_logits(model, test_x[:200], 100)
    hooks = sc.accumulator_rounding(model, arch, {"round_accumulators": 4})
    hooks.attach(model.encrypted)
    sc.calibrate_rounding(hooks, model, x[:60], 60)  # the trained weights' ranges, as compiled
    rounded = sc.clear_logits(model, test_x[:200], 100)
    hooks.detach()
    assert np.array_equal(rounded, compiled) and not np.array_equal(plain, compiled)
    assert np.array_equal(sc.clear_logits(model, test_x[:200], 100), plain)  # hooks gone
    # the `distill` profile's way (round_as_compiled): the widths the compiler measures
    as_compiled = sc.accumulator_rounding(model, arch, {**overrides, "round_as_compiled": True})
    # both ways agree on this tiny network; they differ in how they measure, which the key picks
    assert hooks.calibrate_rounded and not as_compiled.calibrate_rounded
    as_compiled.attach(model.encrypted)
    assert sc.calibrate_rounding(as_compiled, model, x[:60], 60) == circuit_lsbs(circuit)
    as_compiled.detach()


def test_rounding_in_the_loop_rounds_the_pooled_sums_of_a_pool_first_circuit(
    cifar_dir: Path, tmp_path: Path
) -> None:
    """Pooled first, a block's conv and pool compile to one strided conv: its accumulator, the
    pooled sum, is what the circuit rounds (and the conv's is never formed)."""
    from zoo.build.training import compile_qat

    rounding = {"method": "EXACT", "n_bits": 5}
    overrides = {**TINY_PROFILE, "epochs": 1, "round_accumulators": 5}
    params = {"arch": "cnv-2w2a-pf", "rounding_threshold_bits": rounding,
              "profile_overrides": overrides}  # fmt: skip
    cfg = sc.resolve_config("x", params, "smoke", 0)
    arch = cfg["arch"]
    sc.seed_everything(0, "cpu")
    model = sc.SplitCNV(arch)
    x, y = load_cifar10(cifar_dir, "train")
    history = sc.train(model, x[:300], y[:300], cfg, ctx=make_ctx(tmp_path, cifar_dir,
                                                                  params=params))  # fmt: skip
    assert len(history[0]["lsbs_removed"]) == 6 + 3  # 6 blocks (2 pooled), 3 linears
    model.eval()
    test_x, _ = load_cifar10(cifar_dir, "test")
    calib = sc.head_outputs(model, x[:60], 60)
    circuit = compile_qat(sc.encrypted_part(model, arch), calib, arch, tmp_path / "c.onnx")
    compiled = circuit.forward(sc.head_outputs(model, test_x[:100], 100), fhe="disable")
    plain = sc.clear_logits(model, test_x[:100], 100)
    hooks = sc.accumulator_rounding(model, arch, {"round_accumulators": 5})
    hooks.attach(model.encrypted)
    lsbs = sc.calibrate_rounding(hooks, model, x[:60], 60)
    rounded = sc.clear_logits(model, test_x[:100], 100)
    hooks.detach()
    assert lsbs == circuit_lsbs(circuit) and max(lsbs) > 0  # calibrated as the compiler does
    # The same classes; the logits agree up to the few requantizations that float32 (torch) and
    # float64 (the circuit's lookups) put on either side of a step, which unrounded they do too.
    assert np.mean(rounded.argmax(1) == compiled.argmax(1)) >= 0.95
    assert np.abs(rounded - compiled).mean() < np.abs(plain - compiled).mean() / 4


# -- the shared fast-training schedule (zoo/build/schedule.py) on this recipe -------------------

FAST = {"optimizer": "sgd", "momentum": 0.9, "weight_decay": 5e-4, "lr_schedule": "one-cycle",
        "warmup": 0.25, "lr": 0.05, "label_smoothing": 0.1, "ema_decay": 0.9}  # fmt: skip


def test_epoch_counts_join_the_fingerprint_under_a_per_step_schedule() -> None:
    params = {"arch": "tiny", "fanin": None, "profile_overrides": TINY_PROFILE}
    cfg = sc.resolve_config("cifar10-split-tiny", params, "smoke", 0)
    longer = {**cfg, "profile": {**cfg["profile"], "epochs": 3}}
    assert training_fingerprint(cfg) == training_fingerprint(longer)  # step rule: continues
    fast = {**cfg, "profile": {**cfg["profile"], **FAST}}
    fast_longer = {**fast, "profile": {**fast["profile"], "epochs": 3}}
    assert training_fingerprint(fast) != training_fingerprint(fast_longer)


def test_what_rounding_in_the_loop_calibrates_on_joins_the_fingerprint() -> None:
    params = {"arch": "tiny", "fanin": None, "profile_overrides": TINY_PROFILE}
    cfg = sc.resolve_config("cifar10-split-tiny", params, "smoke", 0)
    rounded = {**cfg, "profile": {**cfg["profile"], "round_accumulators": 5}}
    for key, section, value in (("n_calib", "profile", 30), ("clear_blocks", "arch", 1)):
        for c, joins in ((cfg, False), (rounded, True)):
            other = {**c, section: {**c[section], key: value}}
            assert (training_fingerprint(c) != training_fingerprint(other)) == joins, key


def _train(cifar_dir: Path, work: Path, resume: bool = False, stop_now: bool = False, **extra: Any):
    params = {"arch": "tiny", "fanin": None,
              "profile_overrides": {**TINY_PROFILE, **FAST, **extra}}  # fmt: skip
    cfg = sc.resolve_config("cifar10-split-tiny", params, "smoke", 0)
    sc.seed_everything(0, "cpu")
    model = sc.SplitCNV(cfg["arch"])
    x, y = load_cifar10(cifar_dir, "train")
    ctx = make_ctx(work_dir=work, data_dir=cifar_dir, resume=resume, params=params)
    if stop_now:
        ctx.stop_at = time.monotonic()  # pause at the first checkpoint
    work.mkdir(parents=True, exist_ok=True)
    history = sc.train(model, x[:300], y[:300], cfg, ctx)
    return model, history


def test_fast_schedule_trains_deterministically_and_resumes_mid_schedule(
    cifar_dir: Path, tmp_path: Path
) -> None:
    model, history = _train(cifar_dir, tmp_path / "a")
    again, _ = _train(cifar_dir, tmp_path / "b")
    weights = st_save(model.state_dict())
    assert weights == st_save(again.state_dict())
    # the per-step rate: epoch 1 ends past its peak (warm-up 25 % of 12 steps), epoch 2 at 0
    assert 0 < history[0]["lr"] < FAST["lr"] and history[1]["lr"] == pytest.approx(0.0, abs=0.01)
    with pytest.raises(BuildPaused):
        _train(cifar_dir, tmp_path / "c", stop_now=True)
    resumed, _ = _train(cifar_dir, tmp_path / "c", resume=True)
    assert st_save(resumed.state_dict()) == weights  # optimizer, schedule and average resumed
    # the shipped weights are the average, not the last step's
    cfg = sc.resolve_config("cifar10-split-tiny", {"arch": "tiny", "fanin": None,
                            "profile_overrides": {**TINY_PROFILE, **FAST}}, "smoke", 0)  # fmt: skip
    last = load_checkpoint(tmp_path / "a" / "checkpoint.safetensors", cfg, 2)["model"]
    assert any(not torch.equal(last[k], v) for k, v in model.state_dict().items() if k in last)


def test_a_taught_training_is_deterministic_resumes_and_reads_its_teacher_once(
    cifar_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """distill_from: the teacher (the pinned tiny build, from the project's release store) is
    run once into work/; the rest resumes like any training, and teaching changes the weights."""
    monkeypatch.setenv("ZOO_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("ZOO_RELEASES", str(ROOT / "releases"))
    teacher = {"distill_from": "cifar10-split-tiny@232e42415edb", "distill_temperature": 2.0}
    taught, _ = _train(cifar_dir, tmp_path / "a", **teacher)
    untaught, _ = _train(cifar_dir, tmp_path / "u")
    assert st_save(taught.state_dict()) != st_save(untaught.state_dict())
    with pytest.raises(BuildPaused):
        _train(cifar_dir, tmp_path / "c", stop_now=True, **teacher)
    assert len(list((tmp_path / "c").glob("teacher-*.safetensors"))) == 1
    # the resume pulls nothing: neither the store nor the cache has the teacher now
    monkeypatch.setenv("ZOO_HOME", str(tmp_path / "empty-home"))
    monkeypatch.setenv("ZOO_RELEASES", str(tmp_path / "empty"))
    resumed, _ = _train(cifar_dir, tmp_path / "c", resume=True, **teacher)
    assert st_save(resumed.state_dict()) == st_save(taught.state_dict())


def test_alternating_flips_and_a_faster_batchnorm_change_training_and_resume(
    cifar_dir: Path, tmp_path: Path
) -> None:
    """flip / norm_lr_scale: each changes the weights; with both, a run paused after its first
    epoch resumes to the bytes of one that was not (the scaled rate and the flips of epoch 2)."""
    keys = {"flip": "alternate", "norm_lr_scale": 4.0}
    plain = st_save(_train(cifar_dir, tmp_path / "p")[0].state_dict())
    for key, value in keys.items():
        one = st_save(_train(cifar_dir, tmp_path / key, **{key: value})[0].state_dict())
        assert one != plain, key
    both, _ = _train(cifar_dir, tmp_path / "a", **keys)
    with pytest.raises(BuildPaused):
        _train(cifar_dir, tmp_path / "c", stop_now=True, **keys)
    resumed, _ = _train(cifar_dir, tmp_path / "c", resume=True, **keys)
    assert st_save(resumed.state_dict()) == st_save(both.state_dict())


def test_weight_average_with_fanin_pruning_is_refused(cifar_dir: Path, tmp_path: Path) -> None:
    params = {"arch": "tiny", "profile_overrides": {**TINY_PROFILE, "ema_decay": 0.9}}
    cfg = sc.resolve_config("cifar10-split-tiny", params, "smoke", 0)
    ctx = make_ctx(work_dir=tmp_path, data_dir=cifar_dir, params=params)
    with pytest.raises(BuildError, match="fan-in pruning"):
        sc.train(sc.SplitCNV(cfg["arch"]), None, None, cfg, ctx)
