"""`zoo build` end to end on real CIFAR-10: determinism, packaging, publish/pull, rebuild-to-pull,
and real FHE on the tiny variant."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import build_hashes
from safetensors import safe_open

import zoo
from zoo.build import run as builder
from zoo.build.data import load_cifar10
from zoo.catalog import manifest
from zoo.catalog import registry as reg
from zoo.cli import main
from zoo.errors import BuildError, BuildPaused, IntegrityError
from zoo.fhe import head, runtime, sigpipe

TINY = "cifar10-split-tiny"


@pytest.fixture(scope="session")
def tiny_build(tmp_path_factory: pytest.TempPathFactory, cifar_dir: Path) -> Path:
    """One smoke build of cifar10-split-tiny, shared by the tests of this module."""
    out = tmp_path_factory.mktemp("tiny") / "build"
    return builder.build(TINY, profile="smoke", data_dir=cifar_dir, out_dir=out)


def test_build_directory_is_complete_and_consistent(tiny_build: Path) -> None:
    document, files = manifest.check(tiny_build)
    assert {e.role for _, e in files} == {"head", "weights", "client", "server", "card", "manifest"}
    assert document["profile"] == "smoke" and document["variant"] == TINY
    assert document["data"]["train_fingerprint"].startswith("sha256:")
    circuit = document["circuit"]
    assert 1 <= circuit["max_bit_width"] <= 6  # the registry's bound for the tiny variant
    assert circuit["pbs_count"] == sum(circuit["pbs_count_by_bit_width"].values())
    assert circuit["pbs_count_by_bit_width_unattributed"] == 0  # the graph explains every PBS
    assert not any(k.endswith("_seconds") for k in document["metrics"])  # wall times: report.json
    report = json.loads((tiny_build / "report.json").read_text())
    timings = report["timings"]
    assert timings["build_seconds"] >= timings["train_seconds"] + timings["package_seconds"]
    card = (tiny_build / "README.md").read_text()
    assert card.startswith("---\n") and "library_name: concrete-ml" in card
    assert f"value: {document['metrics']['clear_top1']}" in card
    assert "fhe_simulation_top1" in report["metrics"]  # sampled: PBS errors are drawn at random


def test_head_file_loads_without_the_recipe(tiny_build: Path, cifar_dir: Path) -> None:
    from safetensors import safe_open

    with safe_open(str(tiny_build / "head.safetensors"), framework="pt") as handle:
        assert list(handle.metadata()) == ["zoo"]
    tensors, config = head.load(tiny_build / "head.safetensors")
    images, _ = load_cifar10(cifar_dir, "test")
    out = head.forward(tensors, config, images[:4])
    assert out.dtype == np.float32 and list(out.shape[1:]) == config["output"]["shape"][1:]
    scale = float(tensors["quant.scale"])
    assert np.allclose(out / scale, np.round(out / scale), atol=1e-4)  # on the quantization grid


def test_same_inputs_give_the_same_bytes(tiny_build: Path, cifar_dir: Path, tmp_path: Path) -> None:
    again = builder.build(TINY, profile="smoke", data_dir=cifar_dir, out_dir=tmp_path / "again")
    assert build_hashes(again) == build_hashes(tiny_build)


def test_a_build_in_pieces_gives_the_same_bytes(
    tiny_build: Path, cifar_dir: Path, tmp_path: Path
) -> None:
    """--stop-after and --train-only stop at a checkpoint (exit code 10); --resume continues to
    the bytes of a build made in one go. A build trained on a GPU finishes on a machine without
    one: a resumed stage with no epoch left runs on the CPU whatever --device says."""
    out = tmp_path / "pieces"
    first = CliRunner().invoke(
        main,
        [
            "build",
            TINY,
            "--profile",
            "smoke",
            "--data-dir",
            str(cifar_dir),
            "--out",
            str(out),
            "--stop-after",
            "0",
        ],
    )
    assert first.exit_code == 10, first.output
    assert "paused: stopped after epoch 1/2" in first.output and "--resume" in first.output
    assert (out / "work" / "checkpoint.safetensors").is_file()
    assert not (out / "manifest.json").exists()
    with pytest.raises(BuildPaused, match="trained; stopped before compiling"):
        builder.build(
            TINY, profile="smoke", data_dir=cifar_dir, out_dir=out, resume=True, train_only=True
        )
    builder.build(TINY, profile="smoke", data_dir=cifar_dir, out_dir=out, resume=True)
    assert build_hashes(out) == build_hashes(tiny_build)
    # The report counts the training of the earlier commands (this one trained nothing): the
    # seconds the checkpoint carries over its pieces.
    timings = json.loads((out / "report.json").read_text())["timings"]
    with safe_open(str(out / "work" / "checkpoint.safetensors"), framework="pt") as f:
        carried = json.loads(f.metadata()["state"])["dict"]
    trained = next(value["value"] for key, value in carried if key == "train_seconds")
    assert trained > 0 and timings["train_seconds"] >= trained
    assert timings["build_seconds"] > timings["train_seconds"]

    builder.build(
        TINY, profile="smoke", data_dir=cifar_dir, out_dir=out, resume=True, device="cuda"
    )  # no CUDA here: nothing is left to train
    assert json.loads((out / "manifest.json").read_text())["device"] == "cpu"  # where it trained
    assert build_hashes(out) == build_hashes(tiny_build)  # the manifest too: trained on the CPU


def test_training_clock_adds_the_pieces_of_every_stage(tmp_path: Path) -> None:
    """Each stage's clock goes on from its checkpoint's seconds; the build's ``trained_before``
    adds up the stages, and one checkpoint from before the record makes both unknown."""
    ctx = builder.BuildContext(variant=TINY, params={}, profile="smoke", seed=0, data_dir=tmp_path,
                               work_dir=tmp_path, device="cpu", resume=True,
                               log=builder.log)  # fmt: skip
    fresh = ctx.training_clock(None)
    assert 0 <= fresh() < 60 and ctx.trained_before == 0
    stage = ctx.training_clock({"train_seconds": 100.0})
    assert 100 <= stage() < 160 and ctx.trained_before == 100
    assert ctx.training_clock({"train_seconds": 7.5})() >= 7.5 and ctx.trained_before == 107.5
    old = ctx.training_clock({"epoch": 3})  # a checkpoint older than train_seconds
    assert old() is None and ctx.trained_before is None
    assert ctx.training_clock({"train_seconds": 1.0})() >= 1.0 and ctx.trained_before is None


def test_refuses_to_overwrite_a_build(tiny_build: Path, cifar_dir: Path) -> None:
    with pytest.raises(BuildError, match="already holds a build"):
        builder.build(TINY, profile="smoke", data_dir=cifar_dir, out_dir=tiny_build)


def test_publish_pull_check_and_rebuild_to_pull(
    tiny_build: Path, cifar_dir: Path, zoo_home: Path, registry_file: Path, tmp_path: Path
) -> None:
    published = zoo.publish(tiny_build, "local")
    pulled = zoo.pull(TINY)
    for entry in published.files:
        assert manifest.entry_for(pulled.path / entry.path).sha256 == entry.sha256

    out, report = builder.check(f"{TINY}@{published.revision[:10]}", data_dir=cifar_dir,
                                out_dir=tmp_path / "check")  # fmt: skip
    assert set(report.values()) == {"match"}, report

    # A machine with no hub: the pinned build is rebuilt, verified, and accepted.
    shutil.rmtree(zoo_home)
    rebuilt = zoo.pull(TINY, build_missing=True, data_dir=cifar_dir)
    assert sorted(rebuilt.downloaded) == sorted(e.path for e in published.files)
    assert all(s == "ok" for s in zoo.verify(TINY)[published.revision].values())

    # A pin the recipe cannot reproduce: nothing enters the cache, the rebuild is kept aside.
    shutil.rmtree(zoo_home)
    document = json.loads(registry_file.read_text())
    pin = document["variants"][TINY]["builds"][-1]
    weights = next(f for f in pin["files"] if f["role"] == "weights")
    weights["sha256"] = "sha256:" + "0" * 64
    reg.save(document, registry_file)
    with pytest.raises(IntegrityError, match="weights.safetensors: differs") as info:
        zoo.pull(TINY, build_missing=True, data_dir=cifar_dir)
    assert "GPU" in info.value.hint
    assert not (zoo_home / "cache" / "builds").exists()
    assert any((zoo_home / "rebuilds").iterdir())


def test_real_fhe_on_real_images_agrees_with_simulation(
    tiny_build: Path, cifar_dir: Path, zoo_home: Path, registry_file: Path
) -> None:
    zoo.publish(tiny_build, "local")
    model = runtime.load(TINY)
    images, labels = load_cifar10(cifar_dir, "test")
    simulated = model.logits(images[:2], "simulate")
    executed = model.logits(images[:2], "execute")
    assert executed.shape == (2, 10)
    assert sigpipe.ignored()  # concrete's runtime took SIGPIPE over; zoo put SIG_IGN back
    assert (executed.argmax(1) == simulated.argmax(1)).all()
    document = manifest.read(tiny_build)
    sim_all = model.logits(images[: document["data"]["n_test"]], "simulate")
    expected = json.loads((tiny_build / "report.json").read_text())["metrics"][
        "fhe_simulation_top1"
    ]
    accuracy = float((sim_all.argmax(1) == labels[: len(sim_all)]).mean())
    assert accuracy == pytest.approx(expected, abs=0.03)  # simulation draws PBS errors at random
    keys = zoo_home / "keys" / TINY
    assert oct(keys.stat().st_mode & 0o777) == "0o700"
    assert all(oct(p.stat().st_mode & 0o777) == "0o600" for p in keys.rglob("*") if p.is_file())


def test_predict_rejects_bad_images(
    tiny_build: Path, zoo_home: Path, registry_file: Path, tmp_path: Path
) -> None:
    from PIL import Image

    zoo.publish(tiny_build, "local")
    model = runtime.load(TINY)
    with pytest.raises(runtime.InputError, match="uint8"):
        model.predict(np.zeros((1, 32, 32, 3), dtype=np.float32))
    with pytest.raises(runtime.InputError, match=r"got \(1, 3, 32, 32\)") as info:
        model.predict(np.zeros((1, 3, 32, 32), dtype=np.uint8))
    assert "channel-first" in info.value.hint
    big = tmp_path / "big.png"
    Image.new("RGB", (64, 48)).save(big)
    with pytest.raises(runtime.InputError, match="64x48"):
        model.predict([big])
    with pytest.raises(runtime.InputError, match="unknown fhe mode"):
        model.predict(np.zeros((32, 32, 3), dtype=np.uint8), fhe="fast")
    with pytest.raises(runtime.InputError, match="top_k must be at least 1"):
        model.predict(np.zeros((32, 32, 3), dtype=np.uint8), top_k=0)


def test_split_8bit_smoke_build_round_trips(
    cifar_dir: Path, zoo_home: Path, registry_file: Path, tmp_path: Path
) -> None:
    out = builder.build(
        "cifar10-split-8bit", profile="smoke", data_dir=cifar_dir, out_dir=tmp_path / "b8"
    )
    document = manifest.read(out)
    assert document["circuit"]["max_bit_width"] <= 8  # the variant's accumulator bound
    published = zoo.publish(out, "local")
    pulled = zoo.pull("cifar10-split-8bit")
    assert build_hashes(pulled.path) == build_hashes(out)
    assert {e.path: e.sha256 for e in published.files} == build_hashes(out)
