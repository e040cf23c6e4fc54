"""Steps shared by the recipes (quantization-aware training for concrete-ml).

Data (subsets, normalisation, augmentation), seeding for bit-for-bit reproducible training,
atomic checkpoints, top-k accuracy, the circuit's input quantizer as a client-side head op, a
timer of the recipe's stages, and the end every recipe shares (:func:`finish`: compile, hold the
circuit to its accumulator bound, export the client's head, simulate). Each recipe in
``recipes/`` composes these with its own data, model and schedule. Imports torch: only recipes
and tests import this module.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, TypedDict

import numpy as np
import torch

from zoo.build.data import CIFAR10_DIRNAME, fingerprint
from zoo.build.schedule import ScheduleKeys, set_lr
from zoo.catalog import versions
from zoo.cost import progress
from zoo.errors import BitWidthBoundError, BuildError, RecipeConfigError
from zoo.fhe import head as zoo_head
from zoo.fhe import sigpipe
from zoo.store.atomic import replace_synced

if TYPE_CHECKING:
    from zoo.build.run import BuildContext, RecipeResult

#: Torch intra-op threads; fixed so that float reductions happen in the same order.
TORCH_THREADS = 2
#: Images per call of the compiled circuit in simulation / execution.
SIM_EVAL_BATCH = 500


# --- config ---------------------------------------------------------------------------------


class _CompileOptions(TypedDict, total=False):
    # concrete's choice of crypto parameters per partition: "precision" (concrete's default: one
    # set per bit width) or "precision_and_norm2" (per bit width and weight norm: lighter
    # bootstraps where the weights are small). Absent unless a variant sets it, so that older
    # builds keep their bytes.
    multi_parameter_strategy: str


class CompileSettings(_CompileOptions):
    """What every architecture says about its circuit (the keys :func:`finish` reads)."""

    max_bit_width: int  # the accumulator bound the compiled circuit is held to
    p_error: float  # concrete's per-PBS error probability
    rounding_threshold_bits: dict[str, Any] | None  # concrete-ml's rounded PBS, or none


#: :data:`CompileSettings`' values of ``multi_parameter_strategy``.
MULTI_PARAMETER_STRATEGIES = ("precision", "precision_and_norm2")


class ProfileBase(TypedDict):
    """What every profile says about data and evaluation (``None``: the whole split)."""

    n_train: int | None
    n_test: int | None
    n_calib: int  # training images the compiler calibrates on
    batch_size: int
    eval_batch_size: int


class MonitorKeys(TypedDict, total=False):
    """Optional profile key of both recipes: log (and keep in the training history) the clear
    test top-1 of the weights that would ship every ``monitor_every`` epochs; it never steers
    training."""

    monitor_every: int


def check_records(records: dict[str, Any], kind: Any) -> None:
    """Every record of ``records`` has the required keys of the TypedDict ``kind`` and no key it
    does not know: a recipe's ARCHS and PROFILES are checked so by the tests."""
    required, allowed = kind.__required_keys__, kind.__required_keys__ | kind.__optional_keys__
    for name, record in records.items():
        missing, extra = required - set(record), set(record) - allowed
        if missing or extra:
            raise RecipeConfigError(f"{kind.__name__} {name!r}: missing {sorted(missing)}, "
                                    f"unknown {sorted(extra)}")  # fmt: skip


#: Profile keys a variant may set through ``profile_overrides`` though no profile has them:
#: ``n_simulate``, how many of the test images the build simulates in FHE (default: all),
#: ``monitor_every`` (:class:`MonitorKeys`) and the keys of the shared schedule
#: (:class:`zoo.build.schedule.ScheduleKeys`), rounding in the training loop among them.
OPTIONAL_PROFILE_KEYS = (
    frozenset({"n_simulate"}) | MonitorKeys.__optional_keys__ | ScheduleKeys.__optional_keys__
)


def merge_params(
    family: str,
    archs: dict[str, dict[str, Any]],
    profiles: dict[str, dict[str, Any]],
    profile_overrides: dict[tuple[str, str], dict[str, Any]],
    variant: str,
    params: dict[str, Any],
    profile: str,
    profile_type: type | None = None,
) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """(arch name, arch, profile) of a variant: the registry's ``params`` name an ``arch`` and
    may override any of its keys; ``params["profile_overrides"]`` may override profile keys
    (tests shrink a profile so), the profile's own and the optional ones (the shared ones and
    those of the recipe's ``profile_type``). Unknown names and keys raise ``ValueError``."""
    params = dict(params)
    arch_name = params.pop("arch", None) or variant
    overrides = dict(params.pop("profile_overrides", None) or {})
    if arch_name not in archs:
        raise RecipeConfigError(f"unknown {family} arch {arch_name!r}; choose from {sorted(archs)}")
    if profile not in profiles:
        raise RecipeConfigError(f"unknown profile {profile!r}; choose from {sorted(profiles)}")
    arch = copy.deepcopy(archs[arch_name])
    for key, value in params.items():
        if key not in arch and key not in _CompileOptions.__optional_keys__:
            raise RecipeConfigError(f"unknown {family} parameter {key!r}")
        arch[key] = value
    prof = dict(profiles[profile])
    prof.update(profile_overrides.get((arch_name, profile), {}))
    optional = OPTIONAL_PROFILE_KEYS | getattr(profile_type, "__optional_keys__", frozenset())
    unknown = set(overrides) - set(prof) - optional
    if unknown:
        raise RecipeConfigError(f"unknown profile keys in profile_overrides: {sorted(unknown)}")
    prof.update(overrides)
    return arch_name, arch, prof


def jsonable(obj: Any) -> Any:
    """Tuples to lists, recursively: the config as JSON will read it back."""
    if isinstance(obj, (list, tuple)):
        return [jsonable(o) for o in obj]
    if isinstance(obj, dict):
        return {k: jsonable(v) for k, v in obj.items()}
    return obj


# --- data -----------------------------------------------------------------------------------


def subset(images: np.ndarray, labels: np.ndarray, n: int | None):
    """The first ``n`` images (official order), or all of them."""
    if n is None or n >= len(labels):
        return images, labels
    return images[:n], labels[:n]


def data_record(
    dataset: str, train: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray]
) -> dict[str, Any]:
    """The manifest's ``data`` block: what was trained and tested on, with fingerprints."""
    return {
        "dataset": dataset,
        "train_fingerprint": fingerprint(*train),
        "test_fingerprint": fingerprint(*test),
        "n_train": len(train[1]),
        "n_test": len(test[1]),
        "subset": "first n images of each split, official order",
    }


def cifar10_name(data_dir: Path) -> str:
    """How a build names its CIFAR-10: this workspace's copy says so in a PROVENANCE.txt."""
    provenance = Path(data_dir) / CIFAR10_DIRNAME / "PROVENANCE.txt"
    return "CIFAR-10 (JPEG q75 copy)" if provenance.exists() else "CIFAR-10"


def normalize_images(images_uint8_nhwc: np.ndarray, mean: torch.Tensor, std: torch.Tensor):
    """uint8 NHWC -> float32 NCHW tensor ``(x / 255 - mean) / std``."""
    x = torch.from_numpy(np.ascontiguousarray(images_uint8_nhwc)).permute(0, 3, 1, 2)
    x = x.to(torch.float32) / 255.0
    return (x - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)


def augment(
    images: np.ndarray,
    rng: np.random.Generator,
    padding: int,
    hflip: bool,
    flip: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Random crop (32, zero padding ``padding``) and horizontal flip, on uint8 NHWC: the
    images and which of them were flipped. ``flip`` (with ``hflip``) says which to mirror
    instead of a draw (which is still made, so that the crops of later batches do not move).

    The zero padding is black pixels, as torchvision pads the PIL image before ``ToTensor``.
    """
    n, h, w, _ = images.shape
    padded = np.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    dy = rng.integers(0, 2 * padding + 1, size=n)
    dx = rng.integers(0, 2 * padding + 1, size=n)
    drawn = rng.random(n) < 0.5 if hflip else np.zeros(n, dtype=bool)
    flip = flip if hflip and flip is not None else drawn
    out = np.empty_like(images)
    for i in range(n):
        crop = padded[i, dy[i] : dy[i] + h, dx[i] : dx[i] + w]
        out[i] = crop[:, ::-1] if flip[i] else crop
    return out, flip


# --- training -------------------------------------------------------------------------------


def seed_everything(seed: int, device: str) -> None:
    """Seed python, numpy and torch, and force deterministic torch kernels."""
    if device.startswith("cuda"):
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    torch.set_num_threads(TORCH_THREADS)
    # On CUDA, Brevitas' statistics-based activation scales (kthvalue) have no deterministic
    # kernel, only a warning: their values are reproducible, the rest stays deterministic.
    torch.use_deterministic_algorithms(True, warn_only=device.startswith("cuda"))


def gpu_record(device: torch.device) -> dict[str, str]:
    """``{"device": GPU name}`` for an epoch trained on a GPU, for its history record (nothing
    on the CPU, so that CPU builds keep their bytes)."""
    return {"device": torch.cuda.get_device_name(device)} if device.type == "cuda" else {}


def train_epoch(
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    images: np.ndarray,
    labels: np.ndarray,
    rng: np.random.Generator,
    data: dict[str, Any],
    batch_size: int,
    device: torch.device,
    desc: str,
    after_step: Callable[[torch.nn.Module], None] | None = None,
    progress: bool = False,
    loss_fn: torch.nn.Module | None = None,
    lr_at_step: Callable[[int], float] | None = None,
    teacher: np.ndarray | None = None,
    flips: np.ndarray | None = None,
) -> dict[str, float]:
    """One epoch of training in the order ``rng`` draws, with the recipe's augmentation
    (``data``: mean, std, crop_padding, hflip); ``loss_fn`` defaults to cross-entropy;
    ``lr_at_step(b)`` sets the learning rate before batch ``b`` (a per-step schedule, see
    :mod:`zoo.build.schedule`); ``teacher``: logits (N, 2, classes) of each image and its
    mirror, passed to ``loss_fn`` as a third argument (:mod:`zoo.build.distill`); ``flips``:
    which images to mirror (:func:`zoo.build.schedule.epoch_flips`; None: drawn);
    ``after_step(model)`` runs after every optimizer step (weight
    clipping, weight average); ``progress`` shows a bar. Full batches only (BatchNorm needs > 1
    sample), at least one. Returns the mean ``loss`` and ``train_top1``."""
    from tqdm import tqdm

    mean = torch.tensor(data["mean"], dtype=torch.float32)
    std = torch.tensor(data["std"], dtype=torch.float32)
    criterion = loss_fn if loss_fn is not None else torch.nn.CrossEntropyLoss()
    order = rng.permutation(len(labels))
    model.train()
    loss_sum, correct, seen = 0.0, 0, 0
    n_batches = max(1, len(labels) // batch_size)
    # disable=None: a bar on terminals only, not in logs
    bar = tqdm(range(n_batches), desc=desc, leave=False, disable=None if progress else True)
    for b in bar:
        if lr_at_step is not None:
            set_lr(opt, lr_at_step(b))
        idx = order[b * batch_size : (b + 1) * batch_size]
        x, flipped = augment(images[idx], rng, data["crop_padding"], data["hflip"],
                             None if flips is None else flips[idx])  # fmt: skip
        x = normalize_images(x, mean, std).to(device)
        y = torch.from_numpy(labels[idx]).to(device)
        out = model(x)
        if teacher is None:
            loss = criterion(out, y)
        else:
            soft = torch.from_numpy(teacher[idx, flipped.astype(np.intp)]).to(device)
            loss = criterion(out, y, soft)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if after_step is not None:
            after_step(model)
        loss_sum += float(loss.detach()) * len(idx)
        correct += int((out.detach().argmax(1) == y).sum())
        seen += len(idx)
        bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}")
    return {"loss": loss_sum / max(seen, 1), "train_top1": correct / max(seen, 1)}


#: Keys that do not change what training computes (or records in its history): compile
#: settings and ``clear_blocks`` (how many blocks the client runs), so that a ``-r<bits>``
#: variant resumes from a copy of its base's ``work/`` folder instead of training again;
#: calibration and evaluation batch sizes; and the epoch counts whose learning rate depends on
#: the epoch index alone (a longer schedule continues a shorter one). ``float_epochs`` is not
#: among them: the float stage's cosine spans it. Where a profile rounds in the loop,
#: ``n_calib`` and ``clear_blocks`` do change training (:data:`ROUNDING_INPUTS`).
NOT_TRAINING = frozenset(
    {"p_error", "rounding_threshold_bits", "max_bit_width", "output_bits", "n_calib",
     "eval_batch_size", "epochs", "qat_epochs", "clear_blocks", "n_simulate",
     "multi_parameter_strategy"}
)  # fmt: skip


#: Epoch counts that a per-step schedule (``lr_schedule``, :mod:`zoo.build.schedule`) spans:
#: there they are part of what training computes.
EPOCH_COUNTS = frozenset({"epochs", "qat_epochs"})

#: What rounding in the loop (``round_accumulators``, :mod:`zoo.build.rounding`) reads: the
#: images it calibrates the rounded widths on, and which blocks the client runs (not rounded).
ROUNDING_INPUTS = frozenset({"n_calib", "clear_blocks"})


def training_fingerprint(cfg: dict[str, Any]) -> str:
    """sha256 of the config keys that training depends on (see :data:`NOT_TRAINING`; the
    epoch counts too under a per-step schedule, whose learning rate spans them, and
    :data:`ROUNDING_INPUTS` too where the profile rounds in the loop)."""
    import hashlib

    rounds = cfg["profile"].get("round_accumulators")
    ignored = NOT_TRAINING - (ROUNDING_INPUTS if rounds else frozenset())

    def keep(d: dict[str, Any]) -> dict[str, Any]:
        spans = EPOCH_COUNTS if d.get("lr_schedule") else frozenset()
        return {k: v for k, v in d.items() if k not in ignored - spans}

    relevant = {k: v for k, v in cfg.items() if k not in ("arch", "profile", "profile_name")}
    relevant.update(arch=keep(cfg["arch"]), profile=keep(cfg["profile"]))
    blob = json.dumps(jsonable(relevant), sort_keys=True).encode()
    return "sha256:" + hashlib.sha256(blob).hexdigest()


def _split_tensors(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """``obj`` as JSON, each tensor moved into ``tensors`` (named by order) and left as a
    reference; dict keys keep their type (an optimizer's state is keyed by int)."""
    if isinstance(obj, torch.Tensor):
        name = f"t{len(tensors)}"
        tensors[name] = obj.detach().cpu().clone()  # clone: no storage shared between entries
        return {"tensor": name}
    if isinstance(obj, dict):
        return {"dict": [[k, _split_tensors(v, tensors)] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        return {"list": [_split_tensors(v, tensors) for v in obj]}
    return {"value": obj}


def _join_tensors(tree: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Undo :func:`_split_tensors`."""
    if "tensor" in tree:
        return tensors[tree["tensor"]]
    if "dict" in tree:
        return {k: _join_tensors(v, tensors) for k, v in tree["dict"]}
    if "list" in tree:
        return [_join_tensors(v, tensors) for v in tree["list"]]
    return tree["value"]


def runtime_scales(module: torch.nn.Module) -> dict[str, dict[str, torch.Tensor]]:
    """What Brevitas' runtime-statistics scales (``ParameterFromRuntimeStatsScaling``) hold
    beyond their state dict, by module name: the step counter, the running statistics and the
    raw ``value``. While a scale still collects statistics its state dict saves them as
    ``value``, and loading any ``value`` ends the collection: a checkpoint needs these too."""
    return {
        name: {"counter": torch.tensor(int(m.counter)), "buffer": m.buffer.detach().cpu().clone(),
               "value": m.value.detach().cpu().clone()}
        for name, m in module.named_modules() if hasattr(m, "collect_stats_steps")
    }  # fmt: skip


def restore_runtime_scales(module: torch.nn.Module, saved: dict[str, Any]) -> None:
    """Put back what :func:`runtime_scales` saved, after ``load_state_dict``."""
    modules = dict(module.named_modules())
    with torch.no_grad():
        for name, held in saved.items():
            scale = modules[name]
            scale.counter = int(held["counter"])
            scale.buffer.copy_(held["buffer"])
            scale.value.copy_(held["value"])


def trained_with() -> dict[str, str]:
    """The installed versions of the packages whose arithmetic training runs (torch, brevitas;
    :data:`zoo.catalog.versions.RECORDED`), as a checkpoint records them."""
    have = versions.installed()
    return {name: have[name] for name in versions.RECORDED}


def save_checkpoint(path: Path, state: dict[str, Any], cfg: dict[str, Any], data: str) -> None:
    """Write ``state`` (tensors, and JSON-able values around them: optimizer settings, history)
    as safetensors with the structure in its metadata, to a temporary file, synced, then
    renamed: neither a kill nor a power loss leaves half a checkpoint, and nothing in it is
    pickle. The training fingerprint of ``cfg`` and ``data``, the fingerprint of the training
    images (:func:`zoo.build.data.fingerprint`), go with it."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    tree = json.dumps(_split_tensors(state, tensors), sort_keys=True)
    tmp = path.with_name(f".{path.name}.tmp")
    meta = {"state": tree, "fingerprint": training_fingerprint(cfg), "data": data,
            "versions": json.dumps(trained_with(), sort_keys=True)}  # fmt: skip
    save_file(tensors, str(tmp), metadata=meta)
    replace_synced(tmp, path)


def load_checkpoint(
    path: Path, cfg: dict[str, Any], epochs: int, data: str | None = None, device: str = "cpu"
) -> dict[str, Any]:
    """Load a :func:`save_checkpoint` file; refuse one trained under another config, on other
    images than ``data`` fingerprints (to resume; checkpoints from before they recorded it
    pass), with other torch/brevitas versions than those installed (unless a GPU trained it
    or trains it on, ``device``: such a build is not a CPU's bytes anyway), or for more than
    the ``epochs`` this config trains."""
    from safetensors import SafetensorError, safe_open

    hint = "remove the build's work/ folder, or build into another --out"
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118
        state = _join_tensors(json.loads(meta["state"]), tensors)
        saved = json.loads(meta.get("versions", "{}"))  # checkpoints before 2026-12-07: none
        if not (isinstance(saved, dict) and all(isinstance(v, str) for v in saved.values())):
            raise ValueError(f"versions {meta['versions']!r} is not a table of versions")
    except (SafetensorError, KeyError, ValueError) as err:
        raise BuildError(f"{path} is not a training checkpoint ({err})", hint=hint) from err
    if meta.get("fingerprint") != training_fingerprint(cfg):
        raise BuildError(
            f"{path} was trained with another configuration (recipe, arch, profile, seed or "
            "data settings differ, or it predates training fingerprints), so --resume cannot "
            "continue it",
            hint=hint,
        )
    on_gpu = device != "cpu" or any(
        isinstance(h, dict) and "device" in h for h in state.get("history", [])
    )
    here = trained_with()
    if saved and saved != here and not on_gpu:  # a GPU's are not a CPU's bytes anyway
        raise BuildError(
            f"{path} was trained with {_listed(saved)}, and this process has "
            f"{_listed(here)}: a build whose pieces ran on other versions matches no "
            "rebuild",
            hint=f"resume where {_listed(saved)} is installed (pip install "
            f"{' '.join(f'{k}=={v}' for k, v in sorted(saved.items()))}), or {hint}",
        )
    if data is not None and meta.get("data", data) != data:
        raise BuildError(
            f"{path} was trained on other images than these (another --data-dir, copy of "
            "CIFAR or number of training images), so --resume cannot continue it",
            hint=hint,
        )
    if int(state["epoch"]) + 1 > epochs:
        raise BuildError(
            f"{path} holds {int(state['epoch']) + 1} epochs, more than the {epochs} of this "
            "profile: the build would ship a model its config does not describe",
            hint=hint,
        )
    return state


def _listed(found: dict[str, str]) -> str:
    return ", ".join(f"{name} {version}" for name, version in sorted(found.items()))


def topk_accuracy(logits: np.ndarray, labels: np.ndarray, ks=(1, 2, 3)) -> dict[int, float]:
    """Top-k accuracies; ties broken by a stable sort (lowest class index first)."""
    order = np.argsort(-logits, axis=1, kind="stable")
    return {k: float((order[:, :k] == labels[:, None]).any(1).mean()) for k in ks}


def accuracy_metrics(clear: np.ndarray, simulated: np.ndarray, labels: np.ndarray) -> dict:
    """Top-1/2/3 of the clear model and of FHE simulation, and their argmax agreement."""
    clear_acc, sim_acc = topk_accuracy(clear, labels), topk_accuracy(simulated, labels)
    return {
        **{f"clear_top{k}": clear_acc[k] for k in (1, 2, 3)},
        **{f"fhe_simulation_top{k}": sim_acc[k] for k in (1, 2, 3)},
        "clear_vs_simulation_argmax_agreement": float(
            (clear.argmax(1) == simulated.argmax(1)).mean()
        ),
        "n_test_images": len(labels),
    }


# --- the client's input conversion ----------------------------------------------------------


def head_input_config(mean: list[float], std: list[float]) -> dict[str, Any]:
    """The ``input`` block of a head config: uint8 NHWC -> normalised float NCHW."""
    return {
        "layout": "NHWC",
        "dtype": "uint8",
        "to_float": "x / 255",
        "normalize": "(x - input.mean) / input.std",
        "mean": list(mean),
        "std": list(std),
        "to_layout": "NCHW",
    }


def quantizer_tensors_and_op(
    quant_identity: Any, prefix: str = "quant"
) -> tuple[dict[str, torch.Tensor], dict]:
    """A Brevitas ``QuantIdentity``'s numbers as head tensors (named ``prefix.*``) and a
    ``quantize_dequantize`` op.

    The op reproduces, on the client, the quantization the circuit's input expects.
    """
    qi = quant_identity
    scale = qi.quant_act_scale().detach().reshape(()).to(torch.float32)
    zero_point = qi.quant_act_zero_point().detach().reshape(()).to(torch.float32)
    bits = int(qi.quant_act_bit_width())
    narrow = bool(qi.act_quant.is_narrow_range)
    signed = bool(qi.is_quant_act_signed)
    tensors = {
        f"{prefix}.scale": scale.clone(),
        f"{prefix}.zero_point": zero_point.clone(),
        f"{prefix}.bit_width": torch.tensor(bits, dtype=torch.int64),
        f"{prefix}.signed": torch.tensor(int(signed), dtype=torch.int64),
        f"{prefix}.narrow_range": torch.tensor(int(narrow), dtype=torch.int64),
    }
    op = {
        "op": "quantize_dequantize",
        "scale": f"{prefix}.scale",
        "zero_point": f"{prefix}.zero_point",
        "bit_width": bits,
        "signed": signed,
        "narrow_range": narrow,
        "rounding": "half_to_even",
        "formula": "clamp(round(x / scale + zero_point), qmin, qmax) - zero_point) * scale",
    }
    return tensors, op


# --- compile and simulate -------------------------------------------------------------------


def compile_qat(
    module: torch.nn.Module, calib: np.ndarray, arch: dict[str, Any], onnx_path: Path
) -> Any:
    """``compile_brevitas_qat_model`` on ``module`` (in eval mode) with the arch's ``p_error``,
    ``rounding_threshold_bits`` and ``multi_parameter_strategy``, calibrated on ``calib``; the
    ONNX export goes to ``onnx_path``. An arch with ``output_bits`` quantizes the circuit's
    inputs and outputs to that many bits; without it, concrete-ml's default applies."""
    from concrete import fhe
    from concrete.ml.torch.compile import compile_brevitas_qat_model

    bits = arch.get("output_bits")
    strategy = arch.get("multi_parameter_strategy")
    if strategy is not None and strategy not in MULTI_PARAMETER_STRATEGIES:
        raise BuildError(f"unknown multi_parameter_strategy {strategy!r}",
                         hint=f"use one of {', '.join(MULTI_PARAMETER_STRATEGIES)}")  # fmt: skip
    configuration = None if strategy is None else fhe.Configuration(
        multi_parameter_strategy=fhe.MultiParameterStrategy[strategy.upper()]
    )  # fmt: skip
    module.eval()
    return compile_brevitas_qat_model(
        module,
        calib,
        n_bits={"model_inputs": bits, "model_outputs": bits} if bits is not None else None,
        p_error=arch["p_error"],
        rounding_threshold_bits=arch["rounding_threshold_bits"],
        configuration=configuration,
        output_onnx_file=onnx_path,
    )


def check_bit_width(quantized_module: Any, bound: int) -> int:
    """Return the circuit's max integer bit width; raise :class:`BitWidthBoundError` above
    ``bound``."""
    width = int(quantized_module.fhe_circuit.graph.maximum_integer_bit_width())
    if width > bound:
        raise BitWidthBoundError(
            f"compiled circuit needs {width}-bit integers, above this variant's bound of "
            f"{bound} bits: tighten the fan-in pruning ('fanin') or lower the bit widths"
        )
    return width


def fhe_logits(quantized_module: Any, x: np.ndarray, fhe: str = "simulate") -> np.ndarray:
    """The compiled circuit under ``fhe`` ("simulate" or "execute") on its float inputs, with a
    progress bar (images, ETA) on a terminal.

    Simulation draws PBS errors at rate ``p_error`` from concrete's own generator, which cannot
    be seeded: simulated metrics repeat only when ``p_error`` is small enough that no error is
    ever drawn, so builds put them in report.json, not in the pinned manifest.
    """
    from tqdm.auto import tqdm

    outs = []
    bar = tqdm(total=len(x), desc=f"FHE {fhe}", unit="img", disable=None, leave=False)
    try:
        for i in range(0, len(x), SIM_EVAL_BATCH):
            batch = np.ascontiguousarray(x[i : i + SIM_EVAL_BATCH])
            outs.append(quantized_module.forward(batch, fhe=fhe))
            bar.update(len(batch))
    finally:
        bar.close()
        sigpipe.restore()
    return np.concatenate(outs).astype(np.float32)


# --- the recipe's stages and its end ---------------------------------------------------------


@dataclass
class Stages:
    """Wall seconds and device of each step of a recipe, as ``RecipeResult.stages`` holds them:
    ``with stages("train", ctx.device): ...``."""

    times: dict[str, dict[str, Any]] = field(default_factory=dict)

    @contextlib.contextmanager
    def __call__(self, name: str, device: str = "cpu") -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.times[name] = {"device": device, "wall_seconds": time.perf_counter() - started}

    def seconds(self, name: str) -> float:
        """Wall seconds of a finished stage."""
        return self.times[name]["wall_seconds"]


def finish(
    ctx: BuildContext,
    stages: Stages,
    cfg: dict[str, Any],
    *,
    circuit: torch.nn.Module,
    calibration: np.ndarray,
    onnx_name: str,
    export_head: Callable[[], tuple[dict[str, Any], dict[str, Any]]],
    clear: np.ndarray,
    test: tuple[np.ndarray, np.ndarray],
    weights: dict[str, torch.Tensor],
    data: dict[str, Any],
    metrics: dict[str, Any],
) -> RecipeResult:
    """The end every recipe shares, after training and the clear evaluation.

    1. Compile ``circuit`` (what runs encrypted), calibrated on ``calibration`` (its inputs for
       training images), and hold it to the arch's ``max_bit_width``.
    2. Export the client's head and simulate the circuit from it (what a client computes) on the
       first ``n_simulate`` test images (the profile's; all by default). ``clear`` holds the
       clear model's logits on all test images; its accuracy is reported on all of them.
    3. Collect the result: the recipe's own ``metrics`` join the accuracies and the bit widths.
    """
    from zoo.build.run import RecipeResult

    arch, prof = cfg["arch"], cfg["profile"]
    test_x, test_y = test
    with stages("compile"), progress.waiting("compile", ctx.expected.get("compile_seconds")):
        qmodule = compile_qat(circuit, calibration, arch, Path(ctx.work_dir) / onnx_name)
    width = check_bit_width(qmodule, arch["max_bit_width"])
    ctx.log.info("compiled: max bit width %d (bound %d)", width, arch["max_bit_width"])

    with stages("evaluate_fhe_simulation"):
        head, head_config = export_head()
        n_sim = prof.get("n_simulate") or len(test_y)
        sim = fhe_logits(qmodule, zoo_head.forward(head, head_config, test_x[:n_sim]))
        out = accuracy_metrics(clear[:n_sim], sim, test_y[:n_sim])
        if n_sim < len(test_y):  # the clear model is measured on all of them
            clear_acc = topk_accuracy(clear, test_y)
            out.update({f"clear_top{k}": clear_acc[k] for k in (1, 2, 3)})
            out.update(n_test_images=len(test_y), n_simulated_images=n_sim)
    ctx.log.info("FHE-sim top-1/2/3: %.4f %.4f %.4f",
                 *(out[f"fhe_simulation_top{k}"] for k in (1, 2, 3)))  # fmt: skip
    out.update(max_bit_width=width, max_bit_width_bound=arch["max_bit_width"],
               compile_seconds=stages.seconds("compile"), **metrics)  # fmt: skip
    return RecipeResult(
        head=head,
        head_config=head_config,
        weights={k: v.detach().cpu().contiguous() for k, v in weights.items()},
        quantized_module=qmodule,
        metrics=out,
        config=cfg,
        stages=stages.times,
        data=data,
    )
