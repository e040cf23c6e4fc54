"""The VGG11 recipe's training stages: deterministic, resumable from any epoch, and a finished
stage's checkpoint keeps only the weights the stage ships (small enough for a GPU piece to
bring a full-width stage back)."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save as st_save

from zoo.build import run as builder
from zoo.build.data import load_cifar10
from zoo.build.run import BuildContext
from zoo.build.training import load_checkpoint, save_checkpoint
from zoo.errors import BuildError, BuildPaused

vgg = builder.load_recipe("recipes/vgg11_qat.py")

#: Width/8, two epochs per stage over 256 images under the fast schedule (one-cycle, EMA).
PROFILE = {"width_divisor": 8, "n_train": 256, "batch_size": 64, "float_epochs": 2,
           "qat_epochs": 2, "lr_schedule": "one-cycle", "label_smoothing": 0.1,
           "ema_decay": 0.9}  # fmt: skip
PARAMS = {"arch": "vgg11-5bit", "profile_overrides": PROFILE}


def _float_stage(
    cifar_dir: Path, work: Path, resume: bool = False, stop_now: bool = False, params=PARAMS
):
    cfg = vgg.resolve_config("cifar10-vgg11-qat", params, "smoke", 0)
    vgg.seed_everything(0, "cpu")
    model = vgg.FloatVGG11(10, PROFILE["width_divisor"])
    x, y = load_cifar10(cifar_dir, "train")
    work.mkdir(parents=True, exist_ok=True)
    ctx = BuildContext(variant="cifar10-vgg11-qat", params=params, profile="smoke", seed=0,
                       data_dir=cifar_dir, work_dir=work, device="cpu", resume=resume,
                       log=logging.getLogger("test-vgg11"))  # fmt: skip
    if stop_now:
        ctx.stop_at = time.monotonic()  # pause at the first checkpoint
    history = vgg.train_stage("float", model, x[:256], y[:256], cfg, ctx)
    return model, history, cfg


def test_a_stage_resumes_to_the_same_weights_and_finishes_with_its_weights_only(
    cifar_dir: Path, tmp_path: Path
) -> None:
    model, history, cfg = _float_stage(cifar_dir, tmp_path / "a")
    weights = st_save(model.state_dict())
    with pytest.raises(BuildPaused):
        _float_stage(cifar_dir, tmp_path / "b", stop_now=True)
    ckpt = tmp_path / "b" / "float.safetensors"
    mid = load_checkpoint(ckpt, cfg, 2)
    assert {"optimizer", "ema"} <= set(mid)
    mid_size = ckpt.stat().st_size
    resumed, resumed_history, _ = _float_stage(cifar_dir, tmp_path / "b", resume=True)
    assert st_save(resumed.state_dict()) == weights  # optimizer, schedule and average resumed
    assert resumed_history == history

    # Finished: the averaged weights alone, well under half a mid-stage checkpoint's bytes.
    done = load_checkpoint(ckpt, cfg, 2)
    assert "optimizer" not in done and "ema" not in done
    assert st_save(done["model"]) == weights
    assert ckpt.stat().st_size < mid_size / 2.5
    # and resuming a finished stage trains nothing and gives the same model
    again, again_history, _ = _float_stage(cifar_dir, tmp_path / "b", resume=True)
    assert st_save(again.state_dict()) == weights and again_history == history


def test_batch_norm_folds_into_the_convs_the_brevitas_copy_loads(cifar_dir: Path) -> None:
    """A float stage with BatchNorm (eval statistics) and the same network without it, loaded
    with the folded weights, compute the same logits; the Brevitas copy takes them."""
    torch.manual_seed(0)
    with_bn = vgg.FloatVGG11(10, width_divisor=8, batch_norm=True)
    for m in with_bn.modules():
        if isinstance(m, torch.nn.BatchNorm2d):  # statistics and affine far from the identity
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.2, 3)
            m.weight.data.uniform_(0.5, 2)
            m.bias.data.uniform_(-0.5, 0.5)
    with_bn.eval()
    folded = vgg.folded_state(with_bn)
    plain = vgg.FloatVGG11(10, width_divisor=8)
    plain.load_state_dict(folded)  # strict: exactly the plain network's names
    images = vgg.normalize_images(load_cifar10(cifar_dir, "test")[0][:16],
                                  torch.tensor([0.5] * 3), torch.tensor([0.25] * 3))  # fmt: skip
    unfolded = vgg.FloatVGG11(10, width_divisor=8).eval()  # the raw convs, BatchNorm dropped
    unfolded.load_state_dict({k: v for k, v in with_bn.state_dict().items() if k in folded})
    with torch.no_grad():
        want, got = with_bn(images), plain.eval()(images)
        assert not torch.allclose(unfolded(images), want, rtol=1e-2, atol=1e-3)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    quant = vgg.QuantVGG11(10, 5, width_divisor=8)
    missing, unexpected = quant.load_state_dict(folded, strict=False)
    assert not unexpected and not any(k.endswith(("weight", "bias")) for k in missing)


def test_the_weight_average_of_a_qat_stage_switches_its_scales_with_the_model(
    cifar_dir: Path, tmp_path: Path
) -> None:
    """Brevitas' activation scales collect statistics for a number of training steps, then
    learn from them; the average's copy switches with them (else it kept the statistics, and
    its state dict missed the learned scales that the stage ships)."""
    from brevitas.core.scaling.standalone import ParameterFromRuntimeStatsScaling as Runtime

    cfg = vgg.resolve_config("cifar10-vgg11-qat", PARAMS, "smoke", 0)
    vgg.seed_everything(0, "cpu")
    model = vgg.QuantVGG11(10, 5, PROFILE["width_divisor"])
    scales = [m for m in model.modules() if isinstance(m, Runtime)]
    for m in scales:
        m.collect_stats_steps = 2  # of the 8 steps of two QAT epochs (default: hundreds)
    x, y = load_cifar10(cifar_dir, "train")
    ctx = BuildContext(variant="cifar10-vgg11-qat", params=PARAMS, profile="smoke", seed=0,
                       data_dir=cifar_dir, work_dir=tmp_path, device="cpu", resume=False,
                       log=logging.getLogger("test-vgg11"))  # fmt: skip
    vgg.train_stage("qat", model, x[:256], y[:256], cfg, ctx)  # ships the average
    assert scales and all(m.counter > m.collect_stats_steps for m in scales)
    assert all(not torch.all(m.value == 1.0) for m in scales)  # learned, not the initial 1.0
    shipped = load_checkpoint(tmp_path / "qat.safetensors", cfg, 2)["model"]
    assert st_save(shipped) == st_save(model.state_dict())


def test_a_qat_stage_paused_while_its_scales_collect_statistics_resumes_to_the_same_weights(
    cifar_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Paused after one QAT epoch (4 steps) of a 6-step statistics collection: the resumed
    stage ships the uninterrupted one's bytes (the scales' counters and statistics, which
    their state dict leaves out, come back with the checkpoint)."""
    import brevitas.quant

    class Six(brevitas.quant.Int8ActPerTensorFloat):  # of 300 steps (loading re-makes scales)
        collect_stats_steps = 6

    monkeypatch.setattr(brevitas.quant, "Int8ActPerTensorFloat", Six)
    cfg = vgg.resolve_config("cifar10-vgg11-qat", PARAMS, "smoke", 0)
    x, y = load_cifar10(cifar_dir, "train")

    def qat(work: Path, resume: bool = False, stop_now: bool = False) -> bytes:
        vgg.seed_everything(0, "cpu")
        work.mkdir(parents=True, exist_ok=True)
        model = vgg.QuantVGG11(10, 5, PROFILE["width_divisor"])
        ctx = BuildContext(variant="cifar10-vgg11-qat", params=PARAMS, profile="smoke", seed=0,
                           data_dir=cifar_dir, work_dir=work, device="cpu", resume=resume,
                           log=logging.getLogger("test-vgg11"))  # fmt: skip
        if stop_now:
            ctx.stop_at = time.monotonic()
        vgg.train_stage("qat", model, x[:256], y[:256], cfg, ctx)
        return st_save(model.state_dict())

    whole = qat(tmp_path / "a")
    with pytest.raises(BuildPaused):
        qat(tmp_path / "b", stop_now=True)
    assert qat(tmp_path / "b", resume=True) == whole


def test_a_rounded_variant_shares_the_float_stage_of_its_base(
    cifar_dir: Path, tmp_path: Path
) -> None:
    """The -r6/-r7 variants round their QAT stage (``round_accumulators``), not their float
    stage: the base's float checkpoint is theirs; a QAT checkpoint is not shared."""
    model, history, base_cfg = _float_stage(cifar_dir, tmp_path)
    params = {**PARAMS, "profile_overrides": {**PROFILE, "round_accumulators": 6}}
    again, again_history, rounded = _float_stage(cifar_dir, tmp_path, resume=True, params=params)
    assert again_history == history  # resumed, finished: nothing trained
    assert st_save(again.state_dict()) == st_save(model.state_dict())
    save_checkpoint(tmp_path / "qat.safetensors", {"epoch": torch.tensor(0)}, base_cfg, "sha256:x")
    with pytest.raises(BuildError, match="another configuration"):
        load_checkpoint(tmp_path / "qat.safetensors", rounded, 2)
