"""Knowledge distillation from a published build: its clear logits as soft targets.

A profile with ``distill_from: "VARIANT@REV"`` (:class:`zoo.build.schedule.ScheduleKeys`) trains
against a mix of the smoothed labels and the teacher's softened class probabilities (Hinton et
al., 2015):

    loss = (1 - w) * CE(student, label) + w * T^2 * KL(softmax(teacher / T) || softmax(student / T))

with ``w = distill_weight`` and ``T = distill_temperature``. The teacher is pulled and verified
like any pull and run once, in the clear (``zoo.load(ref, circuits=False).logits(x)``), on every
training image and on its mirror image; a training step then takes the row of the flip its
augmentation drew (the small translations are not followed: the teacher saw the image centred).
Those logits are cached in the build's ``work/`` folder, keyed by the teacher and the training
data, so that a resumed build (or a GPU piece, which has no concrete-ml) does not recompute them.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from zoo.build.data import fingerprint
from zoo.errors import RecipeConfigError
from zoo.store.atomic import replace_synced

#: Images per call of the teacher.
TEACHER_BATCH = 500


def teacher_logits(
    prof: dict[str, Any],
    images: np.ndarray,
    labels: np.ndarray,
    work_dir: Path,
    log: logging.Logger,
    registry_path: Path | None = None,
) -> np.ndarray | None:
    """Logits (N, 2, classes) of the profile's teacher in the clear on ``images`` (uint8 NHWC)
    and on their horizontal mirrors, from ``work_dir``'s cache when it holds them; None for a
    profile that does not distill."""
    from safetensors.numpy import load_file, save_file

    if distill_settings(prof) is None:
        return None
    ref = prof["distill_from"]
    key = hashlib.sha256(f"{ref}\n{fingerprint(images, labels)}".encode()).hexdigest()[:16]
    path = Path(work_dir) / f"teacher-{key}.safetensors"
    if path.exists():
        return load_file(str(path))["logits"]
    import zoo

    model = zoo.load(ref, circuits=False, registry_path=registry_path)
    log.info("distillation: logits of %s on %d training images and their mirrors", ref,
             len(labels))  # fmt: skip
    rows = []
    for i in range(0, len(images), TEACHER_BATCH):
        batch = images[i : i + TEACHER_BATCH]
        plain = model.logits(batch, fhe="disable")
        mirror = model.logits(np.ascontiguousarray(batch[:, :, ::-1]), fhe="disable")
        rows.append(np.stack([plain, mirror], axis=1).astype(np.float32))
    logits = np.concatenate(rows)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({"logits": logits}, str(tmp), metadata={"teacher": ref})
    replace_synced(tmp, path)
    return logits


class DistillLoss(torch.nn.Module):
    """Cross-entropy with label smoothing, mixed with the teacher's softened probabilities."""

    def __init__(self, weight: float, temperature: float, label_smoothing: float) -> None:
        super().__init__()
        self.weight, self.temperature = weight, temperature
        self.hard = torch.nn.CrossEntropyLoss(label_smoothing=label_smoothing)

    def forward(
        self, logits: torch.Tensor, labels: torch.Tensor, teacher: torch.Tensor
    ) -> torch.Tensor:
        """The loss of a batch: student ``logits``, ``labels`` and the ``teacher``'s logits."""
        t = self.temperature
        soft = F.kl_div(F.log_softmax(logits / t, dim=1), F.log_softmax(teacher / t, dim=1),
                        reduction="batchmean", log_target=True)  # fmt: skip
        return (1 - self.weight) * self.hard(logits, labels) + self.weight * t * t * soft


def distill_settings(prof: dict[str, Any]) -> tuple[str, float, float] | None:
    """(teacher ref, weight, temperature) of a profile that distills, else None."""
    ref = prof.get("distill_from")
    if ref is None:
        return None
    if "@" not in ref:  # the newest build of a variant changes; training must not
        raise RecipeConfigError(f"distill_from {ref!r} names no build: pin it as VARIANT@REV")
    return ref, float(prof.get("distill_weight", 0.5)), float(prof.get("distill_temperature", 4.0))
