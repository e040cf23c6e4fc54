"""The training schedule both recipes share: optimizer, learning rate per step, loss smoothing
and a running average of the weights, each chosen by a profile's keys (:class:`ScheduleKeys`).

A profile that names none of them trains as the recipes always did (Adam; the recipe's own
learning-rate rule per epoch; plain cross-entropy; the last weights), so existing profiles, and
the builds pinned from them, do not change. The keys are part of the profile, hence of the
training fingerprint (:func:`zoo.build.training.training_fingerprint`).

The other choices are those of fast CIFAR-10 training recipes: Nesterov SGD with high momentum,
a one-cycle learning rate (linear warm-up, then linear decay to zero, set every step), label
smoothing, decoupled weight decay (not applied to BatchNorm parameters and biases), a higher
learning rate for BatchNorm parameters and biases, alternating (derandomised) flips, and an
exponential moving average of the weights (torch's ``AveragedModel``), whose weights are the ones
evaluated and shipped. Which of them help 2-bit and 5-bit quantization-aware training is
measured, not assumed: ``benchmarks/fast_training.py``. ``round_accumulators`` rounds the
accumulators during quantization-aware training as the compiled circuit will
(:mod:`zoo.build.rounding`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, TypedDict

import numpy as np
import torch
import torch.optim.swa_utils

from zoo.errors import RecipeConfigError


class ScheduleKeys(TypedDict, total=False):
    """Optional profile keys of the shared schedule (absent: the recipe's own rule)."""

    optimizer: Literal["adam", "sgd"]  # sgd: Nesterov momentum
    momentum: float  # sgd only (default 0.9)
    weight_decay: float  # decoupled: AdamW / SGD with decay on weights, not BatchNorm or biases
    norm_lr_scale: float  # learning rate of BatchNorm parameters and biases x this (default 1)
    flip: Literal["random", "alternate"]  # mirror a random half per epoch (default), or each
    # image one epoch in two (a random half first)
    lr_schedule: Literal["one-cycle"]  # per step; absent: the recipe's per-epoch rule
    warmup: float  # one-cycle: fraction of all steps spent rising to the peak lr (default 0.2)
    label_smoothing: float  # cross-entropy label smoothing (default 0)
    ema_decay: float  # average of the weights per step (absent: the last weights)
    round_accumulators: int  # QAT: round accumulators to these bits (zoo.build.rounding)
    round_from: int  # ... from this (QAT) epoch on (default 0)
    distill_from: str  # VARIANT@REV whose clear logits teach (zoo.build.distill)
    distill_weight: float  # share of the teacher's term in the loss (default 0.5)
    distill_temperature: float  # softmax temperature of both (default 4)


def _decay_groups(
    model: torch.nn.Module, weight_decay: float, lr: float, norm_lr_scale: float = 1.0
) -> list[dict[str, Any]]:
    """Parameter groups: weight decay on weight tensors of 2+ dims only (not BatchNorm's scale,
    not biases), as fast-training recipes do; those others learn at ``lr * norm_lr_scale``
    (their ``lr_scale``, which :func:`set_lr` keeps)."""
    decay, rest = [], []
    for parameter in model.parameters():
        if parameter.requires_grad:
            (decay if parameter.ndim > 1 else rest).append(parameter)
    rest_group = {"params": rest, "weight_decay": 0.0, "lr": lr * norm_lr_scale}
    if norm_lr_scale != 1.0:
        rest_group["lr_scale"] = norm_lr_scale
    return [{"params": decay, "weight_decay": weight_decay}, rest_group]


def make_optimizer(
    model: torch.nn.Module, prof: dict[str, Any], lr: float
) -> torch.optim.Optimizer:
    """The profile's optimizer over ``model``'s parameters at learning rate ``lr``: Adam (the
    default, exactly as before: one group, no decay), AdamW with ``weight_decay`` or
    ``norm_lr_scale``, or Nesterov SGD with ``momentum`` and ``weight_decay`` (decay per unit lr,
    as in SGD)."""
    name = prof.get("optimizer", "adam")
    decay = float(prof.get("weight_decay", 0.0))
    scale = float(prof.get("norm_lr_scale", 1.0))
    if name == "adam":
        if not decay and scale == 1.0:
            return torch.optim.Adam(model.parameters(), lr=lr)
        return torch.optim.AdamW(_decay_groups(model, decay, lr, scale), lr=lr)
    if name == "sgd":
        momentum = float(prof.get("momentum", 0.9))
        return torch.optim.SGD(_decay_groups(model, decay, lr, scale), lr=lr, momentum=momentum,
                               nesterov=True)  # fmt: skip
    raise RecipeConfigError(f"unknown optimizer {name!r}: use 'adam' or 'sgd'")


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    """Set the learning rate of ``opt``'s groups to ``lr``, times a group's ``lr_scale``."""
    for group in opt.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def epoch_flips(prof: dict[str, Any], seed: list[int], epoch: int, n: int) -> np.ndarray | None:
    """Which of the ``n`` training images epoch ``epoch`` mirrors under the profile's ``flip``:
    None for ``random`` (the default: the augmentation draws them), or for ``alternate`` a
    random half (drawn from ``seed``) in even epochs and the other half in odd ones, so that every
    image is seen both ways in any two epochs in a row."""
    flip = prof.get("flip", "random")
    if flip not in ("random", "alternate"):
        raise RecipeConfigError(f"unknown flip {flip!r}: use 'random' or 'alternate'")
    if flip == "random":
        return None
    return (np.random.default_rng(seed).random(n) < 0.5) ^ bool(epoch % 2)


def per_step(prof: dict[str, Any]) -> bool:
    """Whether the profile sets the learning rate every step (one-cycle)."""
    schedule = prof.get("lr_schedule")
    if schedule not in (None, "one-cycle"):
        raise RecipeConfigError(
            f"unknown lr_schedule {schedule!r}: use 'one-cycle' or leave it out"
        )
    return schedule == "one-cycle"


def one_cycle_lr(peak: float, step: int, total_steps: int, warmup: float = 0.2) -> float:
    """Linear from ``peak / 25`` up to ``peak`` over the first ``warmup`` of ``total_steps``,
    then linear down to 0 after the last step (a function of the step alone: resume-safe)."""
    rise = max(1, round(warmup * total_steps))
    if step < rise:
        return peak * (0.04 + 0.96 * step / rise)
    return peak * max(0.0, (total_steps - step) / max(1, total_steps - rise))


def lr_at_step(
    prof: dict[str, Any], peak: float, epoch: int, epochs: int, n_images: int
) -> Callable[[int], float] | None:
    """The learning rate of batch ``b`` of epoch ``epoch`` (out of ``epochs`` over ``n_images``
    images in full batches of the profile's ``batch_size``) under the profile's per-step
    schedule, for :func:`zoo.build.training.train_epoch`; None without one."""
    if not per_step(prof):
        return None
    steps = max(1, n_images // prof["batch_size"])  # per epoch (train_epoch: full batches)
    first, total, warmup = epoch * steps, epochs * steps, prof.get("warmup", 0.2)
    return lambda b: one_cycle_lr(peak, first + b, total, warmup)


def criterion(prof: dict[str, Any]) -> torch.nn.Module:
    """Cross-entropy with the profile's ``label_smoothing`` (0: plain cross-entropy); with
    ``distill_from``, mixed with the teacher's term (:class:`zoo.build.distill.DistillLoss`,
    which takes the teacher's logits as a third argument)."""
    from zoo.build.distill import DistillLoss, distill_settings

    smoothing = float(prof.get("label_smoothing", 0.0))
    distill = distill_settings(prof)
    if distill is None:
        return torch.nn.CrossEntropyLoss(label_smoothing=smoothing)
    _, weight, temperature = distill
    return DistillLoss(weight, temperature, smoothing)


class WeightAverage(torch.optim.swa_utils.AveragedModel):
    """An exponential moving average of a model's weights and buffers (BatchNorm statistics).

    Brevitas' runtime-statistics scales (``ParameterFromRuntimeStatsScaling``: the VGG11
    recipe's activation quantizers) use their running statistics for their first
    ``collect_stats_steps`` training steps, then set their learned ``value`` from them once.
    The average's copy never runs a training step, so by itself it would never switch to
    ``value`` (its scales would stay the statistics, and its state dict would lack the key):
    here it switches with the model, from the model's value, and averages it from then on."""

    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        from torch.optim.swa_utils import get_ema_multi_avg_fn

        super().__init__(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)

    def update_parameters(self, model: torch.nn.Module) -> None:
        """Average one more step of ``model`` (the one this average was made of)."""
        from brevitas.core.scaling.standalone import ParameterFromRuntimeStatsScaling as Runtime

        super().update_parameters(model)
        # paired anew each step: loading a state dict re-makes the scale modules
        for mine, theirs in zip(self.module.modules(), model.modules()):
            if isinstance(theirs, Runtime) and mine.counter != theirs.counter:
                with torch.no_grad():
                    mine.value.copy_(theirs.value)
                mine.counter = theirs.counter


def weight_average(model: torch.nn.Module, prof: dict[str, Any]) -> WeightAverage | None:
    """An exponential moving average of ``model`` (:class:`WeightAverage`) with the profile's
    ``ema_decay``, or None without one; ``update_parameters(model)`` after each step."""
    decay = prof.get("ema_decay")
    return None if decay is None else WeightAverage(model, float(decay))
