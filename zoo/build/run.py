"""``zoo build``: run a variant's recipe and package the result as a build directory.

A build directory holds the reproducible artifacts, listed with their sha256 in
``manifest.json``::

    head.safetensors     float clear head + input-quantization numbers (client)
    weights.safetensors  Brevitas state of the encrypted part
    client.zip           concrete-ml client specs, rewritten deterministically
    server.zip           concrete-ml compiled circuit, rewritten deterministically
    README.md            Hugging Face model card, rendered from the manifest
    manifest.json        recipe, resolved config, seed, data fingerprints, runtime, metrics, circuit

plus what is *not* reproducible and therefore not part of the pinned build: ``report.json``
(wall times, host, where each stage ran, and metrics measured with random draws such as FHE
simulation, whose PBS-error RNG concrete does not let us seed; ``zoo publish`` copies them into
the registry)
and ``work/`` (checkpoints, logs). Same recipe, profile, seed, data, runtime and device (CPU
kernels held to AVX2 by :mod:`zoo.build.kernels`) ⇒ the same bytes for every pinned file;
:func:`check` and ``--build-missing`` rely on it.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import platform
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from zoo import config
from zoo.build import kernels
from zoo.catalog import card, manifest, versions
from zoo.catalog import registry as reg
from zoo.cost import machine
from zoo.errors import BuildError, BuildPaused, InputError, IntegrityError, RuntimeMismatchError
from zoo.store import cache
from zoo.store.atomic import write_atomic
from zoo.store.hashing import sha256_file

log = logging.getLogger(__name__)
RESUME_HINT = "run the same command again with --resume to continue from the checkpoint"
#: ``long`` trains several times longer than ``full``: for a lent GPU, in pieces (``--stop-after``);
#: ``fast``: the fast-training schedule for the CPU, in pieces; ``distill``: ``fast`` taught by
#: another build (:mod:`zoo.build.distill`), ``distill-long`` the same on a longer schedule;
#: ``finetune`` continues another build's weights (architectures that name one in ``init_from``)
PROFILES = ("fast", "distill", "distill-long", "finetune", "long", "full", "quick", "smoke")


@dataclass
class BuildContext:
    """What a recipe's ``build(ctx)`` gets."""

    variant: str
    params: dict[str, Any]
    profile: str
    seed: int
    data_dir: Path
    work_dir: Path
    device: str
    resume: bool
    log: logging.Logger
    init: Path | None = None  # --init: weights to start training from (recipes with ACCEPTS_INIT)
    #: the registry that names the variant: parents and teachers are resolved in it too
    registry_path: Path | None = None
    #: seconds each step took when this variant and profile were last built (``*_seconds`` of
    #: the registry's timings), for progress bars' ETAs
    expected: dict[str, float] = field(default_factory=dict)
    #: ``time.monotonic()`` after which the build stops at its next checkpoint (--stop-after)
    stop_at: float | None = None
    #: stop once training is done, before compiling (--train-only: a GPU machine without
    #: concrete-ml trains; the compile and simulation run where concrete-ml is installed)
    train_only: bool = False
    #: training wall seconds that earlier commands of this build spent (the checkpoints it
    #: resumed say so; None: one from before they recorded it), added to this command's
    trained_before: float | None = 0.0

    def checkpointed(self, what: str) -> None:
        """Recipes call this after writing each checkpoint: stop there if time is up."""
        if self.stop_at is not None and time.monotonic() >= self.stop_at:
            raise BuildPaused(f"stopped after {what} (--stop-after): the checkpoint is in "
                              f"{self.work_dir}", hint=RESUME_HINT)  # fmt: skip

    def training_clock(self, state: dict[str, Any] | None) -> Callable[[], float | None]:
        """Recipes call this as a training stage starts, with the checkpoint it resumes (or
        None). It returns the stage's clock for the next checkpoint: wall seconds of training
        over all pieces so far (None when the checkpoint is older than that record)."""
        before = 0.0 if state is None else state.get("train_seconds")
        known = before is not None and self.trained_before is not None
        self.trained_before = self.trained_before + before if known else None
        piece = time.perf_counter()
        return lambda: None if before is None else before + time.perf_counter() - piece

    def trained(self) -> None:
        """Recipes call this when training is done, before compiling."""
        if self.train_only:
            raise BuildPaused(
                f"trained; stopped before compiling (--train-only): the checkpoints are in "
                f"{self.work_dir}",
                hint="run the same command without --train-only, with --resume, where "
                "concrete-ml is installed: training is skipped, compile and simulation run",
            )

    def train_device(self, epochs_left: bool) -> str:
        """Where training runs: ``device``, or the CPU when a resumed stage has no epoch left
        (so that a build trained on a GPU compiles and evaluates on a machine without one)."""
        if not epochs_left:
            return "cpu"
        if self.device != "cpu":
            import torch

            if not torch.cuda.is_available():
                raise BuildError(
                    f"--device {self.device}: this machine's torch sees no GPU",
                    hint="train with --device cpu, or where a GPU is (docs/gpu.md)",
                )
        return self.device


@dataclass
class RecipeResult:
    """What a recipe's ``build(ctx)`` returns: everything the packaging step needs."""

    head: dict[str, Any]  # tensors of head.safetensors
    head_config: dict[str, Any]  # its metadata: how the client runs it (zoo.fhe.head)
    weights: dict[str, Any]  # tensors of weights.safetensors
    quantized_module: Any  # the compiled concrete-ml model
    metrics: dict[str, Any]
    config: dict[str, Any]  # the recipe's full resolved config
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)  # device, wall seconds
    data: dict[str, Any] = field(default_factory=dict)  # dataset, fingerprints, sizes
    #: the variant whose training made the weights (another one's for a recompile, so that
    #: both builds share the bytes of weights.safetensors)
    weights_of: str | None = None


def load_recipe(module: str) -> ModuleType:
    """Import a recipe file (``recipes/NAME.py``, as the registry names it); any other path (a
    pulled manifest names one too) is refused, so no downloaded file is ever run."""
    if not re.fullmatch(r"recipes/[a-z0-9_]+\.py", module):
        raise BuildError(
            f"{module!r} is not a recipe of this project (recipes/NAME.py); refused to run it",
            hint="the manifest or registry entry that names it is not from this project: "
            "pull the build from the project's registry",
        )
    path = config.recipe_path(module)
    if not path.is_file():
        raise BuildError(f"recipe {module} not found at {path}", hint="check the registry entry")
    spec = importlib.util.spec_from_file_location(f"zoo_recipe_{path.stem}", path)
    assert spec is not None and spec.loader is not None
    recipe = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = recipe  # dataclasses and pickling look modules up here
    spec.loader.exec_module(recipe)
    return recipe


def _logger(work_dir: Path) -> logging.Logger:
    """``zoo.build.run.build``'s logger, also writing ``WORK_DIR/build.log`` (the console shows
    its messages where the application configured ``zoo`` logging, as the CLI does)."""
    logger = logging.getLogger("zoo.build.run.build")
    logger.setLevel(logging.INFO)
    log_file = str((work_dir / "build.log").resolve())
    for handler in list(logger.handlers):
        if getattr(handler, "baseFilename", None) != log_file:
            logger.removeHandler(handler)
            handler.close()
    if not logger.handlers:
        handler = logging.FileHandler(log_file)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        logger.addHandler(handler)
    return logger


#: Metric names measured with random draws: FHE simulation injects PBS errors at the circuit's
#: p_error with an RNG that concrete does not let us seed, so these go to report.json.
SAMPLED = ("fhe_simulation_", "clear_vs_simulation_")


def _split_metrics(metrics: dict[str, Any]) -> tuple[dict, dict, dict, dict]:
    """A recipe's metrics as (reproducible scalars, structured details, sampled, wall times)."""
    timings = {k: v for k, v in metrics.items() if k.endswith("_seconds")}
    sampled = {k: v for k, v in metrics.items() if k.startswith(SAMPLED)}
    rest = {k: v for k, v in metrics.items() if k not in timings and k not in sampled}
    scalars = {k: v for k, v in rest.items() if v is None or isinstance(v, (int, float, str))}
    return scalars, {k: v for k, v in rest.items() if k not in scalars}, sampled, timings


def trained_on(details: dict[str, Any]) -> str:
    """``cuda`` if an epoch of the training history ran on a GPU (its record names the GPU),
    else ``cpu``: where the weights were made, whatever device the last command named."""
    history = details.get("train_history") or []
    return "cuda" if any("device" in record for record in history) else "cpu"


def _write_safetensors(path: Path, tensors: dict[str, Any], meta: dict[str, Any]) -> None:
    from safetensors.torch import save_file

    contiguous = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    # One metadata key: safetensors keeps metadata in a hash map, whose order is not stable.
    save_file(contiguous, str(path), metadata={"zoo": json.dumps(meta, sort_keys=True)})


def build(
    variant: str,
    *,
    profile: str = "quick",
    data_dir: Path | None = None,
    out_dir: Path | None = None,
    seed: int | None = None,
    resume: bool = False,
    device: str = "cpu",
    registry_path: Path | None = None,
    init: Path | None = None,
    stop_after: float | None = None,
    train_only: bool = False,
) -> Path:
    """Build ``variant`` with its recipe and write the build directory; return its path.

    ``init`` is a safetensors file of weights to start training from, for recipes that accept
    one (``ACCEPTS_INIT``); its sha256 enters the recipe's config, hence the manifest.
    ``stop_after`` (seconds) stops the build at the first checkpoint after that time and
    ``train_only`` once training is done; both raise :class:`~zoo.errors.BuildPaused`, and
    ``resume=True`` continues.
    """
    kernels.pin()  # before the recipe imports torch
    from zoo.build.package import circuit_statistics, write_fhe_zips

    entry = reg.load(registry_path).variant(variant)
    if profile not in entry.recipe["profiles"]:
        raise BuildError(
            f"{variant} has no profile {profile!r}",
            hint=f"use one of {', '.join(entry.recipe['profiles'])}",
        )
    seed = entry.recipe["seed"] if seed is None else seed
    if seed < 0:
        raise InputError(f"--seed must be >= 0, got {seed}")
    if stop_after is not None and not stop_after >= 0:  # NaN too
        raise InputError(f"--stop-after must be a number of seconds >= 0, got {stop_after}")
    data_dir = Path(data_dir) if data_dir else config.data_dir()
    out_dir = Path(out_dir) if out_dir else Path("build-out") / f"{variant}-{profile}"
    held = out_dir.exists() and (
        any(p.is_file() for p in out_dir.iterdir()) or any(out_dir.glob("work/*.safetensors"))
    )  # a paused build holds only its checkpoints, maybe hours of training (or a GPU's)
    if held and not resume:
        raise BuildError(
            f"{out_dir} already holds a build or its checkpoints",
            hint="pass --resume to continue it, or another --out, or remove it",
        )
    recipe = load_recipe(entry.recipe["module"])
    if init is not None:
        if not getattr(recipe, "ACCEPTS_INIT", False):
            raise BuildError(
                f"the recipe of {variant} ({entry.recipe['module']}) takes no --init",
                hint="leave out --init: this recipe trains from its own initialisation",
            )
        if not Path(init).is_file():
            raise BuildError(f"--init file {init} not found", hint="pass a .safetensors file")
    work_dir = out_dir / "work"
    work_dir.mkdir(parents=True, exist_ok=True)
    for stale in [manifest.MANIFEST, *manifest.ROLE_OF, manifest.REPORT]:  # manifest first
        (out_dir / stale).unlink(missing_ok=True)
    for torn in out_dir.glob(".*.tmp"):  # what a killed write_atomic left: not part of a build
        if torn.is_file():
            torn.unlink()
    logger = _logger(work_dir)
    started = time.time()
    ctx = BuildContext(
        variant=variant, params=dict(entry.recipe["params"]), profile=profile, seed=seed,
        data_dir=data_dir, work_dir=work_dir, device=device, resume=resume, log=logger,
        init=Path(init) if init is not None else None, train_only=train_only,
        registry_path=registry_path,
        stop_at=None if stop_after is None else time.monotonic() + stop_after,
        expected=next((b.raw.get("timings", {}) for b in reversed(entry.builds)
                       if b.profile == profile), {}),
    )  # fmt: skip
    logger.info("building %s (profile %s, seed %d, device %s)", variant, profile, seed, device)
    if "compile_from" in ctx.params:  # a new circuit for a pinned build's weights
        from zoo.build.recompile import recompile

        result = recompile(ctx, entry.dataset)
    else:
        result = recipe.build(ctx)

    package_started = time.time()
    _write_safetensors(out_dir / "head.safetensors", result.head, result.head_config)
    _write_safetensors(
        out_dir / "weights.safetensors", result.weights, {"variant": result.weights_of or variant}
    )
    write_fhe_zips(result.quantized_module, out_dir)
    circuit = circuit_statistics(result.quantized_module)
    metrics, details, sampled, timings = _split_metrics(result.metrics)
    if ctx.trained_before is None:  # resumed from a checkpoint that did not record it
        timings.pop("train_seconds", None)
        timings["pieces"] = ("resumed from a checkpoint without its training time: these "
                             "seconds are the last command's")  # fmt: skip
    elif "train_seconds" in timings:
        timings["train_seconds"] += ctx.trained_before
    runtime = versions.installed()
    document = {
        "schema_version": 1,
        "variant": variant,
        "family": entry.family,
        "recipe": {
            "module": entry.recipe["module"],
            "params": entry.recipe["params"],
            "config": result.config,
        },  # fmt: skip
        "seed": seed,
        "profile": profile,
        "device": trained_on(details),
        "data": result.data,
        "runtime": {k: runtime[k] for k in versions.BINDING + versions.RECORDED},
        "metrics": metrics,
        "details": details,
        "circuit": circuit,
        "head": result.head_config,
    }
    (out_dir / "README.md").write_text(card.render(document, entry))
    timings.update(
        package_seconds=round(time.time() - package_started, 3),
        build_seconds=round(time.time() - started + (ctx.trained_before or 0), 3),
    )
    report = {
        "variant": variant,
        "profile": profile,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "host": {"machine": platform.machine(), **machine.cpu()},
        "stages": result.stages,
        "metrics": sampled,
        "timings": timings,
    }
    write_atomic(out_dir / manifest.REPORT, manifest.dumps(report))
    manifest.write(out_dir, document)  # last: a folder with a manifest is a whole build
    logger.info("wrote %s in %.1f s", out_dir, timings["build_seconds"])
    return out_dir


def compare(build_dir: Path, pinned: reg.Build) -> dict[str, str]:
    """File by file: does a fresh build match a published one? path → "match" or why not."""
    report = {}
    for entry in pinned.files:
        path = Path(build_dir) / entry.path
        if not path.is_file():
            report[entry.path] = "missing from the rebuild"
            continue
        actual = manifest.entry_for(path, entry.role)
        report[entry.path] = (
            "match" if actual.sha256 == entry.sha256 else f"differs ({actual.sha256[:19]}…)"
        )
    return report


MISMATCH_HINT = (
    "a rebuild matches only with the same recipe, profile, seed, data, runtime versions and kind "
    "of device; a build trained on a GPU (see the registry's `device`) does not reproduce on a "
    "CPU, and a CPU build whose manifest records no `cpu_kernels` (made before they were held to "
    "AVX2) reproduces only on the kind of CPU that made it"
)


def _can_rebuild_here(pinned: reg.Build) -> None:
    """Refuse to rebuild what cannot match, before hours of it: a build whose weights a GPU
    trained, or one made with other versions of the binding packages than those installed."""
    problems = versions.mismatches(pinned.runtime)
    if problems:
        raise RuntimeMismatchError(
            f"{pinned.short_ref} was built with other versions: {'; '.join(problems)}; a "
            "rebuild here cannot give its bytes",
            hint=versions.install_hint(pinned.runtime),
        )
    if pinned.raw.get("device", "cpu") != "cpu":
        raise BuildError(
            f"{pinned.short_ref} was trained on a GPU ({pinned.raw['device']}): a rebuild on a "
            "CPU cannot give its bytes",
            hint="pull it from the release store or a hub instead; its GPU command is in "
            "docs/gpu.md",
        )


def _check_init(pinned: reg.Build, registry: reg.Registry, init: Path | None) -> None:
    """Refuse, before anything trains, a rebuild of ``pinned`` whose ``init`` is not the
    ``--init`` file it was trained from (read from its manifest in the release store, else in
    the cache: a yanked build may be in neither, and then, like a build that compiles a
    parent's weights, it is not checked)."""
    from zoo.store.releases import ReleaseStore

    if "compile_from" in registry.variant(pinned.variant).recipe["params"]:
        return  # trains nothing: the init in its config is its parent's
    pinned_manifest = pinned.file("manifest")
    for path in (ReleaseStore.beside(registry.path).blob(pinned_manifest.sha256),
                 cache.build_path(pinned) / pinned_manifest.path):  # fmt: skip
        if path.is_file() and sha256_file(path) == pinned_manifest.sha256:
            break
    else:
        return
    try:
        wanted = json.loads(path.read_text())["recipe"]["config"].get("init")
        wanted = wanted and wanted["sha256"]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return
    given = None if init is None else sha256_file(Path(init))
    if given != wanted:
        raise BuildError(
            f"{pinned.short_ref} was trained from "
            + (f"--init weights {wanted}" if wanted else "its own initialisation")
            + (f", not from {init} ({given})" if init is not None else ""),
            hint="pass the file it names with --init (`zoo build VARIANT --check REV --init FILE`)"
            if wanted
            else "leave out --init",
        )


def check(
    ref: str,
    *,
    data_dir: Path | None = None,
    out_dir: Path | None = None,
    registry_path: Path | None = None,
    resume: bool = False,
    init: Path | None = None,
) -> tuple[Path, dict[str, str]]:
    """Rebuild the build ``ref`` names and compare every file with its pinned sha256.

    ``resume`` continues from the checkpoints in ``out_dir/work`` (for instance a copy of the
    base variant's, whose training a rounded or later-split variant shares). ``init`` is the
    ``--init`` file a build was trained from; where the release store holds the pinned
    manifest, a missing, needless or other file is refused before anything trains."""
    registry = reg.load(registry_path)
    pinned = reg.resolve(registry, ref, check_runtime=False, allow_yanked=True)
    _can_rebuild_here(pinned)
    _check_init(pinned, registry, init)
    out_dir = out_dir or Path(tempfile.mkdtemp(prefix=f"zoo-check-{pinned.variant}-"))
    build(
        pinned.variant, profile=pinned.profile, data_dir=data_dir, out_dir=out_dir,
        seed=pinned.raw.get("seed"), device="cpu", registry_path=registry_path, resume=resume,
        init=init,
    )  # fmt: skip
    return out_dir, compare(out_dir, pinned)


def rebuild_into_cache(
    pinned: reg.Build,
    registry: reg.Registry,
    *,
    role: str = "all",
    cache_root: Path | None = None,
    data_dir: Path | None = None,
) -> cache.PullResult:
    """Pull by rebuilding: accept the rebuild only if every pinned file matches its sha256.

    A mismatching rebuild is kept aside (its path is in the error) and nothing enters the cache.
    The rebuild holds the build's cache lock and staging folder, as a download does.
    """
    _can_rebuild_here(pinned)
    _check_init(pinned, registry, None)
    root = cache_root or config.cache_dir()
    result = cache.PullResult(pinned, cache.build_path(pinned, root), role, source="rebuild")
    with cache.staging(pinned, root) as out_dir:
        build(
            pinned.variant, profile=pinned.profile, data_dir=data_dir, out_dir=out_dir,
            seed=pinned.raw.get("seed"), device="cpu", registry_path=registry.path,
        )  # fmt: skip
        report = compare(out_dir, pinned)
        bad = {path: why for path, why in report.items() if why != "match"}
        if bad:
            kept = root.parent / "rebuilds" / f"{pinned.variant}-{pinned.revision[:12]}"
            shutil.rmtree(kept, ignore_errors=True)
            kept.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(out_dir), kept)
            listing = "; ".join(f"{p}: {why}" for p, why in sorted(bad.items()))
            raise IntegrityError(
                f"the rebuild of {pinned.variant}@{pinned.revision[:12]} does not match its "
                f"pins ({listing}); kept aside in {kept}",
                hint=MISMATCH_HINT,
            )
        for entry in pinned.files_for(role):
            cache.verify_into(out_dir / entry.path, entry, result.path / entry.path)
            result.downloaded.append(entry.path)
            result.downloaded_bytes += entry.size
    return result
