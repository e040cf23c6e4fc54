"""The shared training schedule (zoo/build/schedule.py), piece by piece; a real training run of the
split-CNV recipe under it is in test_split_cnv.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from zoo.build import schedule


def _model() -> torch.nn.Module:
    layers = [torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten()]
    return torch.nn.Sequential(*layers, torch.nn.Linear(4 * 30 * 30, 10))


def test_one_cycle_rises_then_falls_to_zero() -> None:
    lrs = [schedule.one_cycle_lr(1.0, step, 100, warmup=0.2) for step in range(101)]
    assert lrs[0] == pytest.approx(0.04) and lrs[20] == pytest.approx(1.0) and lrs[100] == 0.0
    assert all(a < b for a, b in zip(lrs[:20], lrs[1:21]))  # rising
    assert all(a > b for a, b in zip(lrs[20:100], lrs[21:101]))  # falling
    assert schedule.per_step({"lr_schedule": "one-cycle"}) and not schedule.per_step({})
    with pytest.raises(ValueError, match="cosine"):
        schedule.per_step({"lr_schedule": "cosine"})


def test_optimizers_and_their_weight_decay() -> None:
    model = _model()
    adam = schedule.make_optimizer(model, {}, 0.02)  # the recipes' optimizer until now
    assert type(adam) is torch.optim.Adam and len(adam.param_groups) == 1
    assert adam.param_groups[0]["weight_decay"] == 0 and adam.param_groups[0]["lr"] == 0.02
    sgd = schedule.make_optimizer(model, {"optimizer": "sgd", "weight_decay": 5e-4}, 0.1)
    assert (
        type(sgd) is torch.optim.SGD
        and sgd.defaults["nesterov"]
        and sgd.defaults["momentum"] == 0.9
    )
    decayed, free = sgd.param_groups
    assert decayed["weight_decay"] == 5e-4 and free["weight_decay"] == 0.0
    assert {p.ndim for p in decayed["params"]} == {2, 4}  # conv and linear weights
    assert {p.ndim for p in free["params"]} == {1}  # biases, BatchNorm scale and shift
    adamw = schedule.make_optimizer(model, {"weight_decay": 0.01}, 1e-3)
    assert type(adamw) is torch.optim.AdamW
    with pytest.raises(ValueError, match="lion"):
        schedule.make_optimizer(model, {"optimizer": "lion"}, 0.1)


def test_label_smoothing_and_weight_average() -> None:
    logits, target = torch.tensor([[4.0, 0.0, 0.0]]), torch.tensor([0])
    plain = schedule.criterion({})(logits, target)
    assert plain == pytest.approx(torch.nn.functional.cross_entropy(logits, target))
    assert schedule.criterion({"label_smoothing": 0.1})(logits, target) > plain
    model = _model()
    assert schedule.weight_average(model, {}) is None
    average = schedule.weight_average(model, {"ema_decay": 0.5})
    before = model[0].weight.detach().clone()
    with torch.no_grad():
        model[0].weight.add_(1.0)
    average.update_parameters(model)  # the first update copies the weights
    with torch.no_grad():
        model[0].weight.add_(1.0)
    average.update_parameters(model)
    assert torch.allclose(average.module[0].weight, before + 1.5)  # 0.5 * (b + 1) + 0.5 * (b + 2)


def test_norm_lr_scale_raises_the_rate_of_batchnorm_and_biases_and_survives_set_lr() -> None:
    model = _model()
    opt = schedule.make_optimizer(model, {"norm_lr_scale": 4.0}, 0.01)
    assert type(opt) is torch.optim.AdamW
    weights, norms = opt.param_groups
    assert weights["lr"] == 0.01 and norms["lr"] == pytest.approx(0.04)
    assert weights["weight_decay"] == 0.0 and norms["weight_decay"] == 0.0
    schedule.set_lr(opt, 0.002)  # per step or per epoch, the recipes set it this way
    assert weights["lr"] == 0.002 and norms["lr"] == pytest.approx(0.008)
    restored = schedule.make_optimizer(_model(), {"norm_lr_scale": 4.0}, 0.5)
    restored.load_state_dict(opt.state_dict())  # a resumed checkpoint keeps the scale
    schedule.set_lr(restored, 1.0)
    assert [g["lr"] for g in restored.param_groups] == [1.0, 4.0]
    plain = schedule.make_optimizer(model, {}, 0.01)
    schedule.set_lr(plain, 0.003)
    assert plain.param_groups[0]["lr"] == 0.003  # no scale: exactly the rate set


def test_alternating_flips_mirror_every_image_once_in_two_epochs() -> None:
    assert schedule.epoch_flips({}, [0], 0, 10) is None  # random: the augmentation draws
    first, second, third = (schedule.epoch_flips({"flip": "alternate"}, [0], e, 1000)
                            for e in range(3))  # fmt: skip
    assert 400 < first.sum() < 600  # a random half
    assert (first ^ second).all() and (first == third).all()
    assert not (first == schedule.epoch_flips({"flip": "alternate"}, [1], 0, 1000)).all()
    with pytest.raises(ValueError, match="sometimes"):
        schedule.epoch_flips({"flip": "sometimes"}, [0], 0, 10)


def test_chosen_flips_leave_the_crops_where_the_draw_puts_them() -> None:
    from zoo.build.training import augment

    images = np.random.default_rng(0).integers(0, 256, (64, 32, 32, 3), dtype=np.uint8)
    drawn, drawn_flips = augment(images, np.random.default_rng(5), 4, True)
    chosen = ~drawn_flips
    out, flipped = augment(images, np.random.default_rng(5), 4, True, chosen)
    assert (flipped == chosen).all()
    assert (out[chosen] == drawn[chosen][:, :, ::-1]).all()  # the same crop, mirrored once more
    assert (out[~chosen] == drawn[~chosen][:, :, ::-1]).all()
    unflipped, none = augment(images, np.random.default_rng(5), 4, False, chosen)
    assert not none.any()  # without hflip nothing is mirrored, whatever is chosen
