"""The shared training schedule (zoo/build/schedule.py), piece by piece; a real training run of the
split-CNV recipe under it is in test_split_cnv.py."""

from __future__ import annotations

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
