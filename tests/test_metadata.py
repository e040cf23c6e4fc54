"""Every variant and build of registry.json, checked as torchvision checks its Weights' meta:
all problems are collected and reported in one run."""

from __future__ import annotations

import re
from pathlib import Path

from zoo.build.training import OPTIONAL_PROFILE_KEYS
from zoo.catalog import registry as reg
from zoo.store.hub import content_revision

ROOT = Path(__file__).resolve().parent.parent
REQUIRED_ROLES = {"head", "weights", "client", "server", "manifest", "card"}
ACCURACY_KEYS = ("clear_top1", "fhe_simulation_top1", "fhe_execute_top1")


def _variant_problems(variant: reg.Variant, registry: reg.Registry) -> list[str]:
    problems = []
    name = variant.name
    if not name.startswith(f"{variant.dataset}-"):
        problems.append(f"{name}: name does not start with its dataset {variant.dataset}")
    expected_classes = {"cifar10": 10, "cifar100": 100}[variant.dataset]
    if variant.num_classes != expected_classes:
        problems.append(f"{name}: num_classes {variant.num_classes} != {expected_classes}")
    if not (ROOT / variant.recipe["module"]).is_file():
        problems.append(f"{name}: recipe {variant.recipe['module']} does not exist")
    if variant.reference["metrics"] and "not measured here" not in variant.reference.get(
        "note", ""
    ):
        problems.append(f"{name}: reference metrics must be labelled 'not measured here'")
    # <base>[-head<k>]-r<bits>: the base's trained weights, compiled with rounding; with
    # -head<k>, the client's head runs k convs (clear_blocks = k, less the arch's own clear
    # conv if it has one), else the base's split.
    rounded = re.fullmatch(r"(.+?)(?:-head(\d+))?-r(\d+)", name)
    if rounded:
        base, bits = rounded.group(1), int(rounded.group(3))
        if rounded.group(2):
            expected = int(rounded.group(2)) - (1 if _has_clear_conv(variant) else 0)
        else:
            expected = registry.variants[base].recipe["params"].get("clear_blocks", 0) if (
                base in registry.variants) else 0  # fmt: skip
        if variant.recipe["params"].get("clear_blocks", 0) != expected:
            problems.append(f"{name}: clear_blocks is not {expected}")
        rounding = variant.recipe["params"].get("rounding_threshold_bits")
        n_bits = rounding.get("n_bits") if isinstance(rounding, dict) else rounding
        if n_bits != bits:
            problems.append(f"{name}: rounding_threshold_bits.n_bits is not {bits}")
        # Rounding in the training loop, if any, is the circuit's.
        in_loop = variant.recipe["params"].get("profile_overrides", {}).get("round_accumulators")
        if in_loop not in (None, bits):
            problems.append(f"{name}: trains with {in_loop}-bit rounding, its circuit has {bits}")
        if base not in registry.variants:
            problems.append(f"{name}: its unrounded base {base} is not catalogued")
        else:
            # Compile settings only: rounding, p_error, the bit-width bound (approximate
            # rounding keeps one more bit before it rounds: cifar10-split-8bit-r4 needs 9), how
            # many blocks the client runs, and how many test images the build simulates.
            base_params = _training_params(registry.variants[base].recipe["params"])
            if _training_params(variant.recipe["params"]) != base_params:
                problems.append(f"{name}: params differ from {base}'s beyond compile settings")
    bound = variant.recipe["params"].get("max_bit_width")
    revisions = [b.revision for b in variant.builds]
    if len(set(revisions)) != len(revisions):
        problems.append(f"{name}: a revision is pinned twice")
    for build in variant.builds:
        where = f"{name}@{build.revision[:12]}"
        roles = [f.role for f in build.files]
        if set(roles) != REQUIRED_ROLES or len(roles) != len(set(roles)):
            problems.append(
                f"{where}: roles {sorted(roles)} != one each of {sorted(REQUIRED_ROLES)}"
            )
        if any(f.size <= 0 for f in build.files):
            problems.append(f"{where}: a file has size 0")
        if build.profile not in variant.recipe["profiles"]:
            problems.append(f"{where}: profile {build.profile} is not one of the recipe's")
        if bound is not None and build.circuit["max_bit_width"] > bound:
            problems.append(f"{where}: max bit width {build.circuit['max_bit_width']} > {bound}")
        by_width = build.circuit.get("pbs_count_by_bit_width")
        if by_width is not None and sum(by_width.values()) != build.circuit["pbs_count"]:
            problems.append(f"{where}: PBS counts by bit width do not add up to pbs_count")
        if not any(k in build.metrics for k in ACCURACY_KEYS):
            problems.append(f"{where}: no measured accuracy")
        if build.revision != content_revision(list(build.files)):
            problems.append(f"{where}: the revision is not the content hash of its files")
        for hub in build.hubs:
            if len(hub.revision) != {"local": 64, "hf": 40}[hub.kind]:
                problems.append(f"{where}: {hub.kind} revision {hub.revision} has the wrong form")
    return problems


def _has_clear_conv(variant: reg.Variant) -> bool:
    """Whether the variant's architecture runs a conv in the clear before any block."""
    from zoo.build.run import load_recipe

    arch = load_recipe(variant.recipe["module"]).ARCHS[variant.recipe["params"]["arch"]]
    return arch["head"]["out_channels"] is not None


def _training_params(params: dict) -> dict:
    """A variant's params without what only compilation and evaluation read."""
    compile_only = ("rounding_threshold_bits", "p_error", "max_bit_width", "clear_blocks")
    own = {k: v for k, v in params.items() if k not in compile_only}
    overrides = {k: v for k, v in own.pop("profile_overrides", {}).items()
                 if k not in OPTIONAL_PROFILE_KEYS}  # fmt: skip
    return {**own, "profile_overrides": overrides} if overrides else own


def test_every_variant_and_build_has_complete_metadata() -> None:
    registry = reg.load(ROOT / "registry.json")
    problems = [p for v in registry.variants.values() for p in _variant_problems(v, registry)]
    assert not problems, "\n".join(problems)


def test_every_live_build_still_renders_its_pinned_card() -> None:
    """A build's README.md is rendered from its manifest and its registry entry's summary, and
    `zoo build --check` / `--build-missing` render it again: editing a summary (or the params)
    of a variant with live builds would make them unreproducible."""
    import json

    from zoo.catalog import card
    from zoo.store.releases import ReleaseStore

    registry, store = reg.load(ROOT / "registry.json"), ReleaseStore(ROOT / "releases")
    drifted = []
    for variant in registry.variants.values():
        for build in variant.live:
            document = json.loads(store.blob(build.file("manifest").sha256).read_text())
            pinned = store.blob(build.file("card").sha256).read_text()
            same = all(document["recipe"][k] == variant.recipe[k] for k in ("module", "params"))
            if card.render(document, variant) != pinned or not same:
                drifted.append(build.short_ref)
    assert not drifted, (
        f"the registry entries of {drifted} no longer give their pinned README.md / manifest: "
        "restore their summary and recipe, or yank the builds and rebuild (or, if nothing of "
        "the registry changed, install the huggingface-hub and PyYAML of constraints.txt, which "
        "write the card's YAML)"
    )


def test_every_variant_resolves_with_its_recipe() -> None:
    """The registry's params name a real arch and real keys, for every profile."""
    from zoo.build.run import load_recipe

    problems = []
    registry = reg.load(ROOT / "registry.json")
    for variant in registry.variants.values():
        recipe = load_recipe(variant.recipe["module"])
        if "compile_from" in variant.recipe["params"]:
            problems += _recompile_problems(variant, registry)
            continue
        for profile in variant.recipe["profiles"]:
            try:
                cfg = recipe.resolve_config(variant.name, variant.recipe["params"], profile, 0)
            except ValueError as exc:
                problems.append(f"{variant.name} ({profile}): {exc}")
                continue
            if cfg["arch"]["max_bit_width"] != variant.recipe["params"].get("max_bit_width"):
                problems.append(f"{variant.name}: max_bit_width is not pinned in the registry")
    assert not problems, "\n".join(problems)


def _recompile_problems(variant: reg.Variant, registry: reg.Registry) -> list[str]:
    """A ``compile_from`` variant names a live build of this registry, with its recipe and
    profile, and sets compile settings only (so that a fresh clone can rebuild it)."""
    from zoo.build.recompile import COMPILE_KEYS

    params, name = variant.recipe["params"], variant.name
    try:
        parent = reg.resolve(registry, params["compile_from"], check_runtime=False)
    except Exception as exc:  # noqa: BLE001 - any failure to resolve is the problem reported
        return [f"{name}: compile_from {params['compile_from']}: {exc}"]
    problems = []
    if set(params) - COMPILE_KEYS - {"compile_from"}:
        problems.append(f"{name}: sets more than compile settings")
    if variant.recipe["profiles"] != [parent.profile]:
        problems.append(f"{name}: its profiles are not [{parent.profile!r}], its parent's")
    if variant.recipe["module"] != registry.variant(parent.variant).recipe["module"]:
        problems.append(f"{name}: its recipe is not its parent's")
    if "max_bit_width" not in params:
        problems.append(f"{name}: max_bit_width is not pinned in the registry")
    return problems


def test_the_required_variants_are_catalogued() -> None:
    names = set(reg.load(ROOT / "registry.json").variants)
    assert {
        "cifar10-split-8bit", "cifar10-split-tiny",
        "cifar10-vgg11-qat", "cifar100-vgg11-qat", "cifar10-vgg11-qat-r6", "cifar10-vgg11-qat-r7",
        "cifar10-cnv-2w2a", "cifar10-cnv-2w2a-r6", "cifar10-split-8bit-r4",
    } <= names  # fmt: skip
