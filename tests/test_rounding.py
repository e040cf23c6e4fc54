"""Rounding in the training loop (zoo/build/rounding.py) on VGG11: its QAT stage rounds every
conv accumulator and every pool sum as concrete-ml's ``rounding_threshold_bits`` does, so the
rounded Brevitas network and the compiled circuit compute the same logits. (The split CNV's
cases, plain and pool-first: the rounding tests of tests/test_split_cnv.py.)"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from conftest import circuit_lsbs

from zoo.build import run as builder
from zoo.build.data import load_cifar10
from zoo.build.rounding import AccumulatorRounding
from zoo.build.run import BuildContext
from zoo.build.training import compile_qat, normalize_images, seed_everything

vgg = builder.load_recipe("recipes/vgg11_qat.py")


def test_vgg_qat_rounds_as_the_circuit_does(cifar_dir: Path, tmp_path: Path) -> None:
    bits = 6
    overrides = {"n_train": 256, "n_calib": 64, "batch_size": 64, "qat_epochs": 1,
                 "round_accumulators": bits, "monitor_every": 1}  # fmt: skip
    params = {"arch": "vgg11-5bit", "profile_overrides": overrides,
              "rounding_threshold_bits": {"method": "EXACT", "n_bits": bits}}  # fmt: skip
    cfg = vgg.resolve_config("cifar10-vgg11-qat", params, "smoke", 0)
    ctx = BuildContext(variant="cifar10-vgg11-qat", params=params, profile="smoke", seed=0,
                       device="cpu", resume=False, log=logging.getLogger("test-rounding"),
                       work_dir=tmp_path, data_dir=cifar_dir)  # fmt: skip
    seed_everything(0, "cpu")
    model = vgg.QuantVGG11(10, 5, cfg["profile"]["width_divisor"])
    x, y = load_cifar10(cifar_dir, "train")
    test_x, test_y = load_cifar10(cifar_dir, "test")
    history = vgg.train_stage("qat", model, x[:256], y[:256], cfg, ctx,
                              monitor=(test_x[:100], test_y[:100]))  # fmt: skip
    # every conv and pool sum is rounded, the output linear is not; the wide ones lose bits
    lsbs = history[0]["lsbs_removed"]
    assert len(lsbs) == 8 + 5 and max(lsbs) > 0
    assert 0.0 <= history[0]["monitor_top1"] <= 1.0  # monitor_every: 1

    mean = torch.tensor(cfg["data"]["mean"], dtype=torch.float32)
    std = torch.tensor(cfg["data"]["std"], dtype=torch.float32)
    calib = normalize_images(x[:64], mean, std)
    test = normalize_images(test_x[:100], mean, std)
    circuit = compile_qat(model, calib.numpy(), cfg["arch"], tmp_path / "c.onnx")
    compiled = circuit.forward(test.numpy(), fhe="disable")
    model.eval()
    with torch.no_grad():
        plain = model(test).numpy()
        hooks = AccumulatorRounding(model, bits, round_last=False, pools=True)
        hooks.attach(model)
        hooks.calibrate(lambda: model(calib))  # the trained weights' ranges, as compiled
        rounded = model(test).numpy()
        hooks.detach()
        assert np.array_equal(model(test).numpy(), plain)  # hooks gone
    assert hooks.lsbs == circuit_lsbs(circuit)
    # equal up to float error (1e-8 here); unrounded, the model is 1e-3 away
    np.testing.assert_allclose(rounded, compiled, rtol=0, atol=1e-6)
    assert not np.allclose(plain, compiled, rtol=0, atol=1e-4)
