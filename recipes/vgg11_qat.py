"""VGG11 for 32x32 CIFAR images, trained in float, then fine-tuned with 5-bit QAT for FHE.

Method
------
The network is torchvision's VGG11 (configuration "A", no BatchNorm) adapted to 32x32 inputs as
in Concrete ML's ``use_case_examples/cifar/cifar_brevitas_finetuning``: every MaxPool2d becomes
an AvgPool2d (FHE has no cheap max), the pooling kernels/strides become (2,1), (2,2), (2,2),
(1,1), (7,1) so that the 32x32 image ends as a 1x1 map, the AdaptiveAvgPool2d has output size 1
(an identity on that 1x1 map, so it is left out) and the ImageNet classifier is replaced by one
Linear(512, classes).

1. **Float stage.** The reference fine-tuned ImageNet weights, which cannot be downloaded here,
   so the float network is trained from scratch, or from the weights passed with ``zoo build
   --init FILE.safetensors`` (ours, or torchvision's ``vgg11`` state dict: its eight convs in
   order; its ImageNet classifier is dropped): Adam with a cosine learning rate, random crop
   (32, padding 4) + horizontal flip, normalisation with the dataset's mean and std. (Without
   BatchNorm, SGD at lr 0.02 left the loss near ln 10 for the first hundreds of steps here;
   Adam at 1e-3 started learning at once.) Profiles with ``batch_norm`` (``fast``) put a
   BatchNorm after every conv, which the QAT stage's copy receives folded into the conv.
2. **QAT stage.** A Brevitas copy with ``bits``-bit (5 in the reference) weights, activations
   and input on every layer, the first conv and the final linear included
   (``QuantIdentity`` before each conv block, ``QuantConv2d`` + ``QuantReLU``, AvgPool, and a
   ``QuantLinear``), initialised from the float weights and fine-tuned with Adam at a small
   constant learning rate (reference: lr 1e-5 to 6e-5, about 10 epochs, batch 128).
3. **Compile** the whole network with ``compile_brevitas_qat_model`` (calibrated on normalised
   training images), optionally with rounded PBS (``rounding_threshold_bits``), and check the
   circuit's max bit width against the variant's bound.
4. **Evaluate** float, Brevitas (clear) and FHE simulation top-1/2/3 on the test set; the FHE
   input comes from the exported head (normalise + quantize), as a client computes it.

Profiles: ``full`` is the reference network at full width (train it on a GPU with
``--device cuda`` and ``--resume`` in pieces; compile and simulation run on the CPU). ``fast``,
``quick`` and ``smoke`` divide every channel count by ``width_divisor`` (2, 4, 8) so that they
fit a 2-core CPU in about 2 hours (the shared fast-training schedule), 30 and 3 minutes; the
manifest records it, and their accuracies are those of the narrower network.

CIFAR-100 needs the complete official archive for every profile but ``smoke``; given only a
partial copy (such as ``../shared/data``'s), the build stops and says what is missing. ``smoke``
runs on whatever is there and records ``"partial": true`` in the manifest's data block.

Determinism as in ``split_cnv``: every draw comes from the seed, the data order and
augmentation of epoch ``e`` of stage ``s`` from ``numpy.random.default_rng([seed, s, e])``, and
each epoch ends with a checkpoint (model, optimizer, torch RNG) that ``--resume`` continues;
a stage's last one keeps only the weights the stage ships.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any, TypedDict

import numpy as np
import torch
from torch import nn

from zoo.build import kernels
from zoo.build.data import fingerprint, load_cifar10, load_cifar100_split, require_complete
from zoo.build.distill import teacher_logits
from zoo.build.rounding import AccumulatorRounding
from zoo.build.run import BuildContext, RecipeResult
from zoo.build.schedule import (
    ScheduleKeys,
    criterion,
    epoch_flips,
    lr_at_step,
    make_optimizer,
    set_lr,
    weight_average,
)
from zoo.build.training import (
    TORCH_THREADS,
    CompileSettings,
    MonitorKeys,
    ProfileBase,
    Stages,
    cifar10_name,
    data_record,
    finish,
    gpu_record,
    head_input_config,
    jsonable,
    load_checkpoint,
    merge_params,
    normalize_images,
    quantizer_tensors_and_op,
    restore_runtime_scales,
    runtime_scales,
    save_checkpoint,
    seed_everything,
    subset,
    topk_accuracy,
    train_epoch,
)
from zoo.errors import BuildError, PartialDatasetError, RecipeConfigError

# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------

#: ``zoo build --init``: float weights to start the float stage from (see :func:`load_init`).
ACCEPTS_INIT = True

#: VGG11 for 32x32: "I" a QuantIdentity (Brevitas only), ("C", out) a 3x3 conv with padding 1
#: followed by ReLU, ("P", kernel, stride) an average pool.
FEATURES: list[Any] = [
    "I", ("C", 64), ("P", 2, 1),
    "I", ("C", 128), ("P", 2, 2),
    "I", ("C", 256), ("C", 256), ("P", 2, 2),
    "I", ("C", 512), ("C", 512), ("P", 1, 1),
    "I", ("C", 512), ("C", 512), ("P", 7, 1),
    "I",
]  # fmt: skip


#: Architectures (``params["arch"]``); registry params may override any key.
class Arch(CompileSettings):
    """One architecture of the family."""

    dataset: str  # cifar10 or cifar100
    bits: int  # weights, activations and input, every layer


class _ProfileOptions(TypedDict, total=False):
    batch_norm: bool  # float stage: BatchNorm after every conv, folded into it before QAT


class Profile(ProfileBase, MonitorKeys, ScheduleKeys, _ProfileOptions):
    """One training profile: a float stage, then QAT (the optional keys of the shared schedule,
    :mod:`zoo.build.schedule`, apply to both, each stage's lr being its peak)."""

    width_divisor: int  # channels of every layer divided by this
    float_epochs: int
    float_lr: float
    qat_epochs: int
    qat_lr: float


ARCHS: dict[str, Arch] = {
    "vgg11-5bit": {
        "dataset": "cifar10",
        "bits": 5,  # weights, activations and input, every layer
        "max_bit_width": 16,  # unrounded, the reference circuits need 14 (CIFAR-10) / 13 bits
        "p_error": 2**-40,  # no simulated PBS error is ever drawn: metrics repeat
        "rounding_threshold_bits": None,
    },
}

#: Profiles. ``n_*`` of ``None`` mean the whole split.
PROFILES: dict[str, Profile] = {
    "full": {
        "width_divisor": 1,
        "n_train": None,
        "n_test": None,
        "n_calib": 1000,
        "batch_size": 128,
        "float_epochs": 60,
        "float_lr": 1e-3,
        "qat_epochs": 10,
        "qat_lr": 5e-5,
        "eval_batch_size": 500,
    },
    # Measured here (2 cores) at width/4: a float epoch over 50,000 images ~48 s, a QAT epoch
    # 90-160 s, compile 86 s, FHE simulation of the 2,000 test images 74 s; the whole build
    # 22 min, with another build sharing the cores for 4 of its float epochs.
    "quick": {
        "width_divisor": 4,
        "n_train": None,
        "n_test": 2000,
        "n_calib": 500,
        "batch_size": 128,
        "float_epochs": 10,
        "float_lr": 1e-3,
        "qat_epochs": 2,
        "qat_lr": 1e-4,
        "eval_batch_size": 500,
    },
    # About 2 hours of training on these 2 cores at half width (timed here, batch 128: a float
    # epoch 249 s, a QAT epoch 379 s, est.; the clear test top-1 every 4 epochs): the shared
    # fast schedule of the CNV's ``fast`` profile (benchmarks/fast_training.py), that is Adam
    # with a one-cycle rate set every step (each stage's lr its peak), label smoothing 0.1 and
    # an EMA of the weights, which ships; tested on all 10,000 images. The float stage has a
    # BatchNorm after every conv, folded into it for QAT: at width/4 after 4 float epochs and
    # one QAT epoch, clear top-1 0.7290 with it against 0.6065 without (2,000 test images,
    # benchmarks/results/fast_training-vgg11.jsonl).
    "fast": {
        "width_divisor": 2,
        "n_train": None,
        "n_test": None,
        "n_calib": 1000,
        "batch_size": 128,
        "float_epochs": 24,
        "float_lr": 1e-3,
        "qat_epochs": 4,
        "qat_lr": 1e-4,
        "monitor_every": 4,
        "lr_schedule": "one-cycle",
        "warmup": 0.2,
        "label_smoothing": 0.1,
        "ema_decay": 0.99,
        "batch_norm": True,
        "eval_batch_size": 500,
    },
    "smoke": {
        "width_divisor": 8,
        "n_train": 1000,
        "n_test": 100,
        "n_calib": 100,
        "batch_size": 100,
        "float_epochs": 1,
        "float_lr": 1e-3,
        "qat_epochs": 1,
        "qat_lr": 1e-4,
        "eval_batch_size": 100,
    },
}
PROFILE_OVERRIDES: dict[tuple[str, str], dict[str, Any]] = {}

#: Normalisation and augmentation per dataset (the usual CIFAR channel statistics).
DATASETS: dict[str, dict[str, Any]] = {
    "cifar10": {
        "name": "CIFAR-10",
        "num_classes": 10,
        "mean": [0.4914, 0.4822, 0.4465],
        "std": [0.2470, 0.2435, 0.2616],
    },
    "cifar100": {
        "name": "CIFAR-100",
        "num_classes": 100,
        "mean": [0.5071, 0.4865, 0.4409],
        "std": [0.2673, 0.2564, 0.2762],
    },
}
AUGMENT = {"crop_padding": 4, "hflip": True}


def resolve_config(variant: str, params: dict[str, Any], profile: str, seed: int) -> dict:
    """Architecture, registry params and profile merged into one JSON-able config."""
    arch_name, arch, prof = merge_params(
        "VGG11", ARCHS, PROFILES, PROFILE_OVERRIDES, variant, params, profile, Profile
    )
    if arch["dataset"] not in DATASETS:
        raise RecipeConfigError(
            f"unknown dataset {arch['dataset']!r}; choose from {sorted(DATASETS)}"
        )
    return {
        "recipe": "vgg11_qat",
        "arch_name": arch_name,
        "arch": jsonable(arch),
        "features": jsonable(FEATURES),
        "profile_name": profile,
        "profile": prof,
        "data": dict(DATASETS[arch["dataset"]], **AUGMENT),
        "seed": seed,
        "torch_threads": TORCH_THREADS,
        "cpu_kernels": kernels.check(),
        "deterministic_algorithms": True,
    }


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


def load_data(data_dir: Path, dataset: str, profile_name: str, prof: dict[str, Any]):
    """(train_x, train_y, test_x, test_y, data record) of the first n images of each split.

    CIFAR-100 needs the complete official archive for every profile but ``smoke``.
    """
    if dataset == "cifar10":
        train, test = load_cifar10(data_dir, "train"), load_cifar10(data_dir, "test")
        partial, name = False, cifar10_name(data_dir)
    else:
        train_split = load_cifar100_split(data_dir, "train")
        test_split = load_cifar100_split(data_dir, "test")
        partial = not (train_split.is_complete and test_split.is_complete)
        if partial and profile_name != "smoke":
            try:
                require_complete(train_split, "CIFAR-100 train")
                require_complete(test_split, "CIFAR-100 test")
            except PartialDatasetError as exc:
                raise BuildError(
                    f"the {profile_name} profile trains on the whole CIFAR-100 training set, "
                    f"but {data_dir} holds a partial copy: {exc}",
                    hint="unpack the official cifar-100-python archive into --data-dir; only "
                    "--profile smoke runs on a partial copy",
                ) from None
        train = train_split.images, train_split.labels
        test = test_split.images, test_split.labels
        name = DATASETS["cifar100"]["name"] + (" (partial copy)" if partial else "")
    train_x, train_y = subset(*train, prof["n_train"])
    test_x, test_y = subset(*test, prof["n_test"])
    record = {**data_record(name, (train_x, train_y), (test_x, test_y)), "partial": partial}
    return train_x, train_y, test_x, test_y, record


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------


def _channels(out: int, divisor: int) -> int:
    return max(1, out // divisor)


class FloatVGG11(nn.Module):
    """The float network. "I" entries are ``nn.Identity`` so that parameter names match the
    Brevitas copy's (``features.<i>.weight``) and the weights carry over one to one. With
    ``batch_norm`` each conv's ReLU is preceded by a BatchNorm (``features.<i+1>.0``), which
    :func:`folded_state` folds into the conv for the Brevitas copy."""

    def __init__(self, num_classes: int, width_divisor: int = 1, batch_norm: bool = False) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        ch = 3
        for item in FEATURES:
            if item == "I":
                layers.append(nn.Identity())
            elif item[0] == "C":
                out = _channels(item[1], width_divisor)
                act = nn.Sequential(nn.BatchNorm2d(out), nn.ReLU()) if batch_norm else nn.ReLU()
                layers += [nn.Conv2d(ch, out, 3, padding=1), act]
                ch = out
            else:
                layers.append(nn.AvgPool2d(item[1], item[2]))
        self.features = nn.Sequential(*layers)
        self.final = nn.Linear(ch, num_classes)
        for m in self.modules():  # torchvision's VGG initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits from normalised NCHW images."""
        return self.final(torch.flatten(self.features(x), 1))


def folded_state(model: FloatVGG11) -> dict[str, torch.Tensor]:
    """``model``'s state dict in the Brevitas copy's names, each BatchNorm (eval statistics)
    folded into the conv before it: ``w * g / sqrt(var + eps)``, ``(b - mean) * g / sqrt(var +
    eps) + beta``; the same function of the input, without the BatchNorm."""
    state = {}
    layers = list(model.features)
    for i, layer in enumerate(layers):
        if not isinstance(layer, nn.Conv2d):
            continue
        weight, bias = layer.weight.detach(), layer.bias.detach()
        after = layers[i + 1]
        if isinstance(after, nn.Sequential) and isinstance(after[0], nn.BatchNorm2d):
            bn = after[0]
            scale = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)
            weight = weight * scale[:, None, None, None]
            bias = (bias - bn.running_mean) * scale + bn.bias.detach()
        state[f"features.{i}.weight"], state[f"features.{i}.bias"] = weight, bias
    state.update({f"final.{k}": v.detach() for k, v in model.final.state_dict().items()})
    return state


class QuantVGG11(nn.Module):
    """The Brevitas network compiled to FHE: the same layers, ``bits`` bits everywhere."""

    def __init__(self, num_classes: int, bits: int, width_divisor: int = 1) -> None:
        super().__init__()
        from brevitas.nn import QuantConv2d, QuantIdentity, QuantLinear, QuantReLU
        from brevitas.quant import Int8ActPerTensorFloat, Int8WeightPerTensorFloat

        layers: list[nn.Module] = []
        ch = 3
        for item in FEATURES:
            if item == "I":
                layers.append(QuantIdentity(bit_width=bits, act_quant=Int8ActPerTensorFloat))
            elif item[0] == "C":
                out = _channels(item[1], width_divisor)
                layers.append(
                    QuantConv2d(ch, out, 3, padding=1, weight_bit_width=bits,
                                weight_quant=Int8WeightPerTensorFloat)
                )  # fmt: skip
                layers.append(QuantReLU(bit_width=bits, act_quant=Int8ActPerTensorFloat))
                ch = out
            else:
                layers.append(nn.AvgPool2d(item[1], item[2]))
        self.features = nn.Sequential(*layers)
        self.final = QuantLinear(
            ch, num_classes, bias=True, weight_bit_width=bits, weight_quant=Int8WeightPerTensorFloat
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits from normalised NCHW images (the first QuantIdentity quantizes them)."""
        return self.final(torch.flatten(self.features(x), 1))


def load_init(model: FloatVGG11, path: Path) -> dict[str, Any]:
    """Load float weights from a safetensors file into ``model``; return the config record.

    Accepts our own names (``features.<i>.weight``, ``final.weight``: a float stage saved by
    this recipe) or torchvision's ``vgg11`` (``features.<i>`` convs, matched to ours in order;
    its ImageNet ``classifier.*`` is dropped and ``final`` keeps its fresh initialisation, as in
    the reference, which replaces the classifier). Shapes must match the profile's width.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from zoo.store.hashing import sha256_file

    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise BuildError(f"--init {path} is not a readable safetensors file: {exc}") from exc
    convs = [f"features.{i}" for i, m in enumerate(model.features) if isinstance(m, nn.Conv2d)]
    ours = dict(model.state_dict())
    if set(tensors) == set(ours):
        source = "zoo"
        mapped = tensors
    else:
        source = "torchvision"
        weights = sorted(
            (k for k in tensors if k.startswith("features.") and k.endswith(".weight")),
            key=lambda k: int(k.split(".")[1]),
        )
        if len(weights) != len(convs):
            raise BuildError(
                f"--init {path} has {len(weights)} conv weights (features.<i>.weight), VGG11 "
                f"has {len(convs)}",
                hint="pass a torchvision vgg11 state dict or a float stage saved by this recipe",
            )
        mapped = dict(ours)  # the convs replaced; the rest (final, any BatchNorm) kept fresh
        for key, conv in zip(weights, convs):
            theirs = key.rsplit(".", 1)[0]
            mapped[f"{conv}.weight"] = tensors[key]
            mapped[f"{conv}.bias"] = tensors[f"{theirs}.bias"]
    for key, value in mapped.items():
        if tuple(value.shape) != tuple(ours[key].shape):
            raise BuildError(
                f"--init {path}: {key} has shape {tuple(value.shape)}, this profile's network "
                f"needs {tuple(ours[key].shape)}",
                hint="--init weights fit the full-width network (profile full) only",
            )
    model.load_state_dict({k: v.to(torch.float32) for k, v in mapped.items()})
    return {"file": path.name, "sha256": sha256_file(path), "format": source}


# --------------------------------------------------------------------------------------------
# Training (one loop for both stages)
# --------------------------------------------------------------------------------------------


def _float_lr(prof: dict[str, Any], epoch: int) -> float:
    """Cosine schedule over the float stage, one value per epoch (stateless: resume-safe)."""
    return prof["float_lr"] * 0.5 * (1 + math.cos(math.pi * epoch / prof["float_epochs"]))


def train_stage(
    stage: str,
    model: nn.Module,
    images: np.ndarray,
    labels: np.ndarray,
    cfg: dict[str, Any],
    ctx: BuildContext,
    monitor: tuple[np.ndarray, np.ndarray] | None = None,
) -> list[dict[str, Any]]:
    """Train ``model`` for the stage's epochs; checkpoint (and resume) every epoch; with the
    profile's ``monitor_every`` = k, log the clear top-1 on ``monitor`` (images, labels) of the
    weights the stage would keep every k epochs (it never steers training). The
    profile's schedule keys (:mod:`zoo.build.schedule`) choose the optimizer, a per-step
    learning rate, label smoothing and a weight average (whose weights the stage then keeps);
    in the QAT stage, ``round_accumulators`` rounds every conv and pool sum as the circuit will
    (:mod:`zoo.build.rounding`) from QAT epoch ``round_from`` on."""
    prof, data, seed = cfg["profile"], cfg["data"], cfg["seed"]
    epochs = prof[f"{stage}_epochs"]
    ckpt = Path(ctx.work_dir) / f"{stage}.safetensors"
    # The float stage does not depend on the QAT stage's rounding: a variant's -r6/-r7, whose
    # QAT stages round (``round_*``), share the float checkpoint of the unrounded base.
    stage_cfg = cfg if stage == "qat" else {
        **cfg, "profile": {k: v for k, v in prof.items() if not k.startswith("round_")}
    }  # fmt: skip
    trained_on = fingerprint(images, labels)  # a resume must train on the same images
    state = None
    if ctx.resume and ckpt.exists():
        state = load_checkpoint(ckpt, stage_cfg, epochs, trained_on, ctx.device)
    start = 0 if state is None else int(state["epoch"]) + 1
    clock = ctx.training_clock(state)
    device = torch.device(ctx.train_device(start < epochs))
    if state is not None:  # first: loading re-makes Brevitas' activation scales (new tensors)
        model.load_state_dict(state["model"])
        restore_runtime_scales(model, state.get("scales", {}))
    model.to(device)
    peak = prof[f"{stage}_lr"]
    opt = make_optimizer(model, prof, peak)  # over the parameters the model now holds
    history: list[dict[str, Any]] = []
    if state is not None:
        if start < epochs:  # a finished stage's checkpoint holds the weights it keeps, no more
            if "optimizer" not in state:
                raise BuildError(
                    f"{ckpt} holds a finished {stage} stage of {start} epochs, without the "
                    f"optimizer state that going on to {epochs} would need",
                    hint=f"keep the {stage} stage's epoch count, or build into another --out",
                )
            opt.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
        history = list(state["history"])
        ctx.log.info("%s stage: resumed from %s after epoch %d", stage, ckpt, start)
    ema = weight_average(model, prof) if start < epochs else None
    if ema is not None and state is not None:
        ema.load_state_dict(state["ema"])
        restore_runtime_scales(ema.module, state.get("ema_scales", {}))
    rounding = None
    if stage == "qat" and prof.get("round_accumulators"):
        # as the circuit rounds: every conv and pool sum, not the output linear's accumulator
        rounding = AccumulatorRounding(model, prof["round_accumulators"], round_last=False,
                                       pools=True)  # fmt: skip
        rounding.attach(model)
        if ema is not None:
            rounding.attach(ema.module)
        mean = torch.tensor(data["mean"], dtype=torch.float32)
        std = torch.tensor(data["std"], dtype=torch.float32)
        calib = normalize_images(images[: prof["n_calib"]], mean, std).to(device)
    teacher = None if start == epochs else teacher_logits(prof, images, labels, ctx.work_dir,
                                                          ctx.log, ctx.registry_path)  # fmt: skip
    stage_id = 0 if stage == "float" else 1
    for epoch in range(start, epochs):
        lr = _float_lr(prof, epoch) if stage == "float" else prof["qat_lr"]
        set_lr(opt, lr)
        lsbs = None
        if rounding is not None and epoch >= prof.get("round_from", 0):
            # as the compiler would round the weights this epoch starts from
            model.eval()
            lsbs = rounding.calibrate(lambda: model(calib))
            ctx.log.info("accumulators rounded to %d bits: lsbs removed %s", rounding.bits, lsbs)

        t0 = time.perf_counter()
        rec = train_epoch(
            model, opt, images, labels, np.random.default_rng([seed, stage_id, epoch]), data,
            prof["batch_size"], device, f"{stage} {epoch + 1}/{epochs}",
            progress=ctx.log.isEnabledFor(logging.INFO), loss_fn=criterion(prof), teacher=teacher,
            after_step=None if ema is None else ema.update_parameters,
            lr_at_step=lr_at_step(prof, peak, epoch, epochs, len(labels)),
            flips=epoch_flips(prof, [seed, stage_id], epoch, len(labels)),
        )  # fmt: skip
        lr = opt.param_groups[0]["lr"]  # the epoch's (last step's, per step)
        rec = {"stage": stage, "epoch": epoch + 1, "lr": lr, **rec, **gpu_record(device)}
        if lsbs is not None:
            rec["lsbs_removed"] = lsbs
        every = prof.get("monitor_every")
        if monitor is not None and every and (epoch + 1) % every == 0:
            kept = model if ema is None else ema.module
            logits = logits_of(kept.cpu(), monitor[0], cfg, prof["eval_batch_size"])
            kept.to(device)
            rec["monitor_top1"] = topk_accuracy(logits, monitor[1], ks=(1,))[1]
            ctx.log.info("%s epoch %d: clear test top-1 %.4f", stage, epoch + 1,
                         rec["monitor_top1"])  # fmt: skip
        history.append(rec)
        ctx.log.info("%s epoch %d/%d lr %.6f loss %.4f train acc %.4f (%.1f s)", stage,
                     epoch + 1, epochs, lr, rec["loss"], rec["train_top1"],
                     time.perf_counter() - t0)  # fmt: skip
        # The last epoch's checkpoint keeps only the weights the stage ships (the average's
        # weights and BatchNorm statistics, if any): a third of the size, so that a GPU piece
        # can bring a finished full-width stage back (docs/gpu.md).
        last = epoch + 1 == epochs
        if last and ema is not None:
            model.load_state_dict(ema.module.state_dict())
        save_checkpoint(ckpt, {
            "epoch": torch.tensor(epoch),
            "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            "scales": runtime_scales(model),
            "torch_rng": torch.get_rng_state(),
            "history": history,
            "train_seconds": clock(),
            **({} if last else {"optimizer": opt.state_dict()}),
            **({"ema": {k: v.detach().cpu() for k, v in ema.state_dict().items()},
                "ema_scales": runtime_scales(ema.module)} if ema is not None and not last else {}),
        }, stage_cfg, trained_on)  # fmt: skip
        ctx.checkpointed(f"{stage} epoch {epoch + 1}/{epochs}")
    if rounding is not None:
        rounding.detach()
    model.cpu()
    return history


# --------------------------------------------------------------------------------------------
# Evaluation, head, compilation
# --------------------------------------------------------------------------------------------


def torch_module(cfg: dict[str, Any], weights: dict[str, torch.Tensor]) -> nn.Module:
    """A build's Brevitas module from its resolved config and ``weights.safetensors``: what the
    circuit computes, from the head's output (the quantized image) to the logits (eval mode)."""
    model = QuantVGG11(cfg["data"]["num_classes"], cfg["arch"]["bits"],
                       cfg["profile"]["width_divisor"])  # fmt: skip
    model.load_state_dict(weights)
    return model.eval()


@torch.no_grad()
def logits_of(model: nn.Module, images: np.ndarray, cfg: dict[str, Any], batch: int):
    """Clear logits of a float or Brevitas model on uint8 NHWC images (CPU, eval mode)."""
    model.eval()
    mean = torch.tensor(cfg["data"]["mean"], dtype=torch.float32)
    std = torch.tensor(cfg["data"]["std"], dtype=torch.float32)
    outs = [
        model(normalize_images(images[i : i + batch], mean, std))
        for i in range(0, len(images), batch)
    ]
    return torch.cat(outs).numpy()


def export_head(model: QuantVGG11, cfg: dict[str, Any]) -> tuple[dict, dict]:
    """The client's part: normalise, then the first QuantIdentity's quantization."""
    data = cfg["data"]
    tensors, op = quantizer_tensors_and_op(model.features[0])
    tensors["input.mean"] = torch.tensor(data["mean"], dtype=torch.float32)
    tensors["input.std"] = torch.tensor(data["std"], dtype=torch.float32)
    config = {
        "format": "split-cnv-head/1",  # the op-list format zoo.fhe.head runs, whatever the family
        "input": head_input_config(data["mean"], data["std"]),
        "ops": [op],
        "output": {
            "layout": "NCHW",
            "dtype": "float32",
            "shape": [None, 3, 32, 32],
            "meaning": "the dequantized quantized image: the FHE circuit's input",
        },
    }
    return tensors, config


# --------------------------------------------------------------------------------------------
# The build
# --------------------------------------------------------------------------------------------


def train_stages(
    ctx: BuildContext,
    cfg: dict[str, Any],
    stages: Stages,
    train: tuple[np.ndarray, np.ndarray],
    monitor: tuple[np.ndarray, np.ndarray],
) -> tuple[FloatVGG11, QuantVGG11, list[dict[str, Any]]]:
    """Steps 2-3 of :func:`build`: the float stage, from scratch or from ``ctx.init`` (whose
    hash then enters the config, and with it the training fingerprint and the manifest), then
    the QAT stage from its weights (any BatchNorm folded in); the models and the history."""
    arch, prof = cfg["arch"], cfg["profile"]
    n_classes = cfg["data"]["num_classes"]
    with stages("train_float", ctx.device):
        float_model = FloatVGG11(n_classes, prof["width_divisor"], prof.get("batch_norm", False))
        if ctx.init is not None:
            cfg["init"] = load_init(float_model, ctx.init)
            ctx.log.info("float stage starts from %s (%s)", ctx.init, cfg["init"]["sha256"])
        history = train_stage("float", float_model, *train, cfg, ctx, monitor=monitor)
    with stages("train_qat", ctx.device):
        torch.manual_seed(ctx.seed)
        qmodel = QuantVGG11(n_classes, arch["bits"], prof["width_divisor"])
        missing, unexpected = qmodel.load_state_dict(folded_state(float_model), strict=False)
        if unexpected or any(k.endswith(("weight", "bias")) for k in missing):
            raise BuildError(f"float -> QAT weight transfer failed: {missing=} {unexpected=}")
        history += train_stage("qat", qmodel, *train, cfg, ctx, monitor=monitor)
    return float_model, qmodel, history


def build(ctx: BuildContext) -> RecipeResult:
    """Data -> float training -> QAT -> evaluate clear -> compile -> FHE simulation."""
    cfg = resolve_config(ctx.variant, ctx.params, ctx.profile, ctx.seed)
    arch, prof = cfg["arch"], cfg["profile"]
    Path(ctx.work_dir).mkdir(parents=True, exist_ok=True)
    stages = Stages()
    seed_everything(ctx.seed, ctx.device)

    # 1. Data.
    with stages("data"):
        train_x, train_y, test_x, test_y, data = load_data(
            ctx.data_dir, arch["dataset"], ctx.profile, prof
        )
    ctx.log.info("data: %s, %d train, %d test images", data["dataset"], len(train_y),
                 len(test_y))  # fmt: skip

    # 2-3. Float stage, then QAT.
    float_model, qmodel, history = train_stages(ctx, cfg, stages, (train_x, train_y),
                                                (test_x, test_y))  # fmt: skip
    ctx.trained()
    n_params = sum(p.numel() for p in float_model.parameters())

    # 4. Evaluate in the clear: float and Brevitas.
    bs = prof["eval_batch_size"]
    with stages("evaluate_clear"):
        float_acc = topk_accuracy(logits_of(float_model, test_x, cfg, bs), test_y)
        clear = logits_of(qmodel, test_x, cfg, bs)
        clear_acc = topk_accuracy(clear, test_y)
    ctx.log.info("float top-1 %.4f; Brevitas top-1/2/3: %.4f %.4f %.4f", float_acc[1],
                 clear_acc[1], clear_acc[2], clear_acc[3])  # fmt: skip

    # 5-6. Everything after the input quantizer is encrypted: compile the whole model,
    # calibrated on normalised training images, and simulate it from the exported head.
    mean = torch.tensor(cfg["data"]["mean"], dtype=torch.float32)
    std = torch.tensor(cfg["data"]["std"], dtype=torch.float32)
    return finish(
        ctx, stages, cfg,
        circuit=qmodel,
        calibration=normalize_images(train_x[: prof["n_calib"]], mean, std).numpy(),
        onnx_name="model.onnx",
        export_head=lambda: export_head(qmodel, cfg),
        clear=clear,
        test=(test_x, test_y),
        weights=qmodel.state_dict(),
        data=data,
        metrics={
            "float_top1": float_acc[1],
            "n_parameters": n_params,
            "train_history": history,
        },
    )  # fmt: skip
