"""Knowledge distillation (zoo/build/distill.py): the loss, the teacher's logits from a real
published build (pulled from the project's release store), and the rows a training step takes."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import zoo
from zoo.build import distill, schedule
from zoo.build.data import load_split
from zoo.build.training import train_epoch
from zoo.errors import InputError

ROOT = Path(__file__).resolve().parent.parent
TEACHER = "cifar10-split-tiny@232e42415edb"


def test_the_loss_mixes_labels_and_softened_teacher() -> None:
    torch.manual_seed(0)
    logits, teacher = torch.randn(8, 10), torch.randn(8, 10)
    labels = torch.randint(0, 10, (8,))
    assert distill.distill_settings({}) is None
    with pytest.raises(ValueError, match="VARIANT@REV"):
        distill.distill_settings({"distill_from": "cifar10-split-tiny"})
    prof = {"distill_from": TEACHER, "distill_weight": 0.25, "distill_temperature": 2.0,
            "label_smoothing": 0.1}  # fmt: skip
    loss = schedule.criterion(prof)
    assert isinstance(loss, distill.DistillLoss)
    hard = F.cross_entropy(logits, labels, label_smoothing=0.1)
    p = F.softmax(teacher / 2, 1)
    kl = (p * (p.log() - F.log_softmax(logits / 2, 1))).sum(1).mean()
    assert loss(logits, labels, teacher) == pytest.approx(float(0.75 * hard + 0.25 * 4 * kl))
    # a student that already agrees with its teacher pays only the labels' share
    assert loss(teacher, labels, teacher) == pytest.approx(
        float(0.75 * F.cross_entropy(teacher, labels, label_smoothing=0.1)), abs=1e-6
    )


def test_teacher_logits_come_from_the_build_and_its_mirror_images(
    cifar_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ZOO_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("ZOO_RELEASES", str(ROOT / "releases"))
    monkeypatch.setattr(distill, "TEACHER_BATCH", 10)  # three batches, the last one short
    images, labels = (a[:24] for a in load_split(cifar_dir, "cifar10", "train"))
    prof = {"distill_from": TEACHER}
    log = logging.getLogger("test")
    assert distill.teacher_logits({}, images, labels, tmp_path, log) is None
    logits = distill.teacher_logits(prof, images, labels, tmp_path, log)
    model = zoo.load(TEACHER, circuits=False)
    assert model.client is None and model.server is None
    with pytest.raises(InputError, match="needs the client and the server") as refused:
        model.logits(images, "simulate")
    assert "circuits=True" in refused.value.hint
    with pytest.raises(InputError, match="circuits=False loads none"):
        zoo.load(TEACHER, role="client", server_url="http://127.0.0.1:1", circuits=False)
    assert logits.shape == (24, 2, 10) and logits.dtype == np.float32
    np.testing.assert_allclose(logits[:, 0], model.logits(images, "disable"), rtol=1e-6)
    np.testing.assert_allclose(logits[:, 1], model.logits(images[:, :, ::-1], "disable"),
                               rtol=1e-6)  # fmt: skip
    assert not np.allclose(logits[:, 0], logits[:, 1])
    (cached,) = tmp_path.glob("teacher-*.safetensors")

    def no_pull(*args: object, **kwargs: object) -> None:
        raise AssertionError("the cached logits were computed again")

    monkeypatch.setattr(zoo, "load", no_pull)  # a second call reads the cache
    np.testing.assert_array_equal(distill.teacher_logits(prof, images, labels, tmp_path, log),
                                  logits)  # fmt: skip
    assert list(tmp_path.glob("teacher-*.safetensors")) == [cached]


def test_each_step_is_taught_with_its_images_rows_and_the_flip_its_augmentation_drew(
    cifar_dir: Path,
) -> None:
    """The teacher rows handed to the loss are those of the batch's images, the mirror's
    exactly for the flipped ones."""
    images, labels = (a[:16] for a in load_split(cifar_dir, "cifar10", "train"))
    teacher = np.zeros((16, 2, 10), dtype=np.float32)
    teacher[:, :, 0] = 2 * np.arange(16)[:, None] + np.arange(2)  # row of image i, flip f: 2i + f
    seen: list[torch.Tensor] = []

    def loss_fn(out: torch.Tensor, y: torch.Tensor, soft: torch.Tensor) -> torch.Tensor:
        seen.append(soft[:, 0].clone())
        return F.cross_entropy(out, y)

    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    data = {"mean": [0.5] * 3, "std": [0.5] * 3, "crop_padding": 0, "hflip": True}
    train_epoch(model, opt, images, labels, np.random.default_rng(0), data, 8,
                torch.device("cpu"), "t", loss_fn=loss_fn, teacher=teacher)  # fmt: skip
    rng = np.random.default_rng(0)
    order = rng.permutation(16)  # the batch order, then per batch the crop draws and the flips
    expected = []
    for batch in (order[:8], order[8:]):
        rng.integers(0, 1, size=8), rng.integers(0, 1, size=8)
        flipped = rng.random(8) < 0.5
        assert 0 < flipped.sum() < 8
        expected.append(2 * batch + flipped)
    np.testing.assert_array_equal(torch.cat(seen).numpy(), np.concatenate(expected))
