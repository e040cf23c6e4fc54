"""The Python API behind the CLI: list, info, pull, publish, verify, and cache housekeeping.

Each function takes explicit paths (registry, hub folder, cache root, endpoint) with defaults from
:mod:`zoo.config`, raises :class:`zoo.errors.ZooError` subclasses, and returns plain records the
CLI prints as tables or JSON. None of them imports torch or concrete-ml.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
from pathlib import Path
from typing import Any

from zoo import config
from zoo.catalog import card as cards
from zoo.catalog import manifest, versions
from zoo.catalog import registry as reg
from zoo.cost import model as cost
from zoo.errors import (
    HubError,
    InputError,
    IntegrityError,
    NotFoundError,
    OfflineError,
    RuntimeMismatchError,
    ZooError,
)
from zoo.store import cache, hub, releases
from zoo.store.gate import check_zip

log = logging.getLogger(__name__)
#: Concrete ML's names for where a prediction runs: ``disable`` (the clear model: float head and
#: the Brevitas module, no encryption), ``simulate`` (the compiled circuit's integers, with its
#: lookup errors, no encryption) and ``execute`` (real FHE). The API, ``zoo predict`` and
#: ``zoo eval`` share the default, Concrete ML's.
FHE_MODES = ("disable", "simulate", "execute")
DEFAULT_FHE = "disable"
#: What to pull and load: the client's files, the server's, or all of a build.
ROLES = ("client", "server", "all")


def check_fhe_mode(fhe: str) -> str:
    """``fhe`` if it is one of :data:`FHE_MODES`, else an :class:`InputError` that lists them."""
    if fhe not in FHE_MODES:
        raise InputError(
            f"unknown fhe mode {fhe!r}: the modes are {', '.join(FHE_MODES)}",
            hint="disable is the clear model, simulate and execute the circuit",
        )
    return fhe


def list_variants(registry_path: Path | None = None) -> list[dict[str, Any]]:
    """One row per variant: its newest live build's accuracies, bit width and cost, and how
    many builds are live and yanked."""
    registry = reg.load(registry_path)
    calibration = cost.current_calibration()
    rows = []
    for variant in registry.variants.values():
        live = variant.live
        build = live[-1] if live else None
        metrics = build.metrics if build else {}
        circuit = build.circuit if build else {}
        estimate = cost.breakdown(circuit, calibration) if build else None
        elsewhere = (calibration or {}).get("source", {}).get("other_machine")
        if estimate and estimate["method"] == "wop":  # priced by WoP points, maybe borrowed
            elsewhere = elsewhere or estimate["calibration"]["wop_other_machine"]
        rows.append(
            {
                "variant": variant.name,
                "dataset": variant.dataset,
                "profile": build.profile if build else None,
                "clear_top1": metrics.get("clear_top1"),
                "fhe_simulation_top1": metrics.get("fhe_simulation_top1"),
                "fhe_execute_top1": metrics.get("fhe_execute_top1"),
                "max_bit_width": circuit.get("max_bit_width"),
                "est_fhe_seconds": estimate["total_seconds"] if estimate else None,
                # WoP-PBS circuit without WoP calibration: the estimate is a lower bound
                "est_fhe_lower_bound": bool(estimate and estimate["lower_bound"]),
                # a calibration from another kind of machine: why, else None
                "est_other_machine": elsewhere,
                "eval_key_bytes": circuit.get("eval_key_bytes"),
                "eval_key_bytes_serialized": metrics.get("eval_key_bytes_serialized"),
                "builds": len(live),
                "yanked": len(variant.builds) - len(live),
            }
        )
    return rows


def info(ref: str, registry_path: Path | None = None) -> dict[str, Any]:
    """All metadata of a variant and a cost preview of the build a pull would take."""
    registry = reg.load(registry_path)
    name, _ = reg.split_ref(ref)
    variant = registry.variant(name)
    out: dict[str, Any] = {
        "variant": variant.name,
        "family": variant.family,
        "summary": variant.summary,
        "dataset": variant.dataset,
        "num_classes": variant.num_classes,
        "recipe": variant.recipe,
        "reference": variant.reference,
        "builds": [b.raw for b in variant.builds],
        "runtime_installed": versions.installed(),
    }
    try:
        build = reg.resolve(registry, ref)
    except NotFoundError:
        if "@" in ref:
            raise
        build = None
    except RuntimeMismatchError as exc:
        out["resolved"] = None
        out["resolve_error"] = str(exc)
        build = None
    if build is not None:
        cached = not cache.missing_files(build, "all")
        estimate = cost.breakdown(build.circuit)
        out["resolved"] = {
            "revision": build.revision,
            "profile": build.profile,
            "download_bytes": {
                role: sum(f.size for f in build.files_for(role))
                for role in ("client", "server", "all")
            },
            "eval_key_bytes": build.circuit.get("eval_key_bytes"),
            "eval_key_bytes_serialized": build.metrics.get("eval_key_bytes_serialized"),
            "fhe_truth": cards.fhe_truth(build.raw, build.circuit),
            "est_fhe_seconds_per_image": estimate["total_seconds"] if estimate else None,
            "cost": estimate,
            "cached": cached,
            "client_computes": client_computes(build),
        }
    out["recompiled_as"] = recompiled_as(registry, variant.name)
    return out


#: What ``info`` shows of a recompiled variant's build.
RECOMPILE_METRICS = (
    "fhe_simulation_top1",
    "n_test_images",
    "fhe_execute_top1",
    "fhe_execute_n_images",
    "fhe_execute_seconds_per_image",
    "fhe_execute_max_seconds_per_image",
    "fhe_execute_timed_images",
    "fhe_execute_machine",
    "fhe_execute_other_machines",
)


def recompiled_as(registry: reg.Registry, name: str) -> list[dict[str, Any]]:
    """The variants that compile this variant's weights again (``compile_from``), each with what
    its newest live build measured: a lighter circuit for the same network is a pull away."""
    out = []
    for other in registry.variants.values():
        params = other.recipe["params"]
        source = params.get("compile_from")
        if source is None or reg.split_ref(source)[0] != name:
            continue
        newest = other.live[-1] if other.live else None
        metrics = newest.metrics if newest else {}
        out.append(
            {
                "variant": other.name,
                "compile_from": source,
                "compile": {k: v for k, v in params.items() if k != "compile_from"},
                "revision": newest.revision if newest else None,
                "metrics": {k: metrics[k] for k in RECOMPILE_METRICS if k in metrics},
            }
        )
    return out


def client_computes(build: reg.Build) -> str | None:
    """What the client runs in the clear before encrypting, from the build's manifest once it is
    cached (None before): e.g. ``quantize 8-bit -> conv2d -> quantize 2-bit, sends 64x30x30``."""
    try:
        head = json.loads((cache.build_path(build) / "manifest.json").read_text()).get("head")
        steps = [
            f"quantize {op['bit_width']}-bit" if op["op"] == "quantize_dequantize" else op["op"]
            for op in head["ops"]
        ]
        shape = "x".join(str(d) for d in head["output"]["shape"][1:])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return f"{' -> '.join(steps)}, sends {shape}"


def pull(
    ref: str,
    *,
    role: str = "all",
    offline: bool | None = None,
    registry_path: Path | None = None,
    endpoint: str | None = None,
    hub_dir: Path | None = None,
    cache_root: Path | None = None,
    progress: bool = False,
    build_missing: bool = False,
    data_dir: Path | None = None,
) -> cache.PullResult:
    """Resolve ``VARIANT[@REV]`` and make its files for ``role`` present in the cache, each
    verified by sha256 when it entered.

    Warm pulls touch no network and check sizes only (:func:`verify` rehashes what is cached;
    :func:`zoo.load` checks hashes before concrete reads a file). ``offline`` (default
    ``ZOO_OFFLINE``) uses the cache only.
    ``build_missing`` rebuilds from the recipe when no hub holds the build, and accepts the
    result only if every reproducible file matches the pinned sha256.
    """
    registry = reg.load(registry_path)
    build = reg.resolve(registry, ref)
    offline = config.offline() if offline is None else offline
    if not cache.missing_files(build, role, cache_root):
        return cache.PullResult(build, cache.build_path(build, cache_root), role)
    if offline:
        return _offline(registry, ref, build, role, cache_root)
    sources = [(hub.hub_for(h, endpoint, hub_dir), h.repo, h.revision, f"hub {h.kind}:{h.repo}")
               for h in build.hubs]  # fmt: skip
    store = releases.ReleaseStore.beside(registry.path)  # last: files by sha256, any build
    sources.append(
        (store, f"zoo/{build.variant}", build.revision, f"the release store {store.root}")
    )
    failures: list[ZooError] = []
    for source, repo, revision, label in sources:
        try:
            pulled = cache.fetch(
                build, role, source, repo=repo, revision=revision, root=cache_root,
                progress=progress,
            )  # fmt: skip
        except (NotFoundError, HubError, IntegrityError) as exc:
            # Bad bytes from one source (deleted by the check) must not stop the next one.
            log.debug("%s: not from %s: %s", build.short_ref, label, exc)
            if isinstance(exc, IntegrityError):
                exc = type(exc)(f"from {label}: {exc}", hint=exc.hint)
            failures.append(exc)
            continue
        log.info("%s (%s): verified from %s", build.short_ref, role, label)
        return pulled
    if build_missing:
        from zoo.build.run import rebuild_into_cache  # heavy: torch, concrete-ml

        return rebuild_into_cache(
            build, registry, role=role, cache_root=cache_root, data_dir=data_dir
        )
    # Reported as the worst failure: bad bytes, then a hub that failed (network, HTTP), then
    # not found.
    worst = next(
        (e for kind in (IntegrityError, HubError) for e in failures if isinstance(e, kind)),
        failures[0],
    )
    hint = (f"rebuild it from its recipe, accepted only if it matches the pins: "
            f"`zoo pull {build.short_ref} --build-missing`")  # fmt: skip
    if isinstance(worst, IntegrityError):
        hint += "; the source that gave other bytes than the pins holds a bad copy: republish it"
    raise type(worst)(
        f"no source could give {build.short_ref}: " + "; ".join(str(e) for e in failures),
        hint=hint,
    )


def _offline(
    registry: reg.Registry, ref: str, build: reg.Build, role: str, cache_root: Path | None
) -> cache.PullResult:
    """Offline: ``build`` from the cache; when it is not cached and ``ref`` names no revision,
    the newest live build of the variant that this runtime loads and the cache holds whole
    (a registry updated since the last pull must not make a cached variant unusable)."""
    try:
        return cache.require_cached(build, role, cache_root)
    except OfflineError:
        if reg.split_ref(ref)[1] is not None:
            raise
        cached = [
            b
            for b in registry.variant(build.variant).live
            if not versions.mismatches(b.runtime) and not cache.missing_files(b, role, cache_root)
        ]
        if not cached:
            raise
    log.warning("offline: %s, the newest build of %s, is not cached; using the cached %s "
                "(pull with the network to get the newer one)",
                build.short_ref, build.variant, cached[-1].short_ref)  # fmt: skip
    return cache.PullResult(cached[-1], cache.build_path(cached[-1], cache_root), role)


#: What the registry keeps of a build's circuit (what ``zoo list`` / ``info`` and the cost model
#: read); concrete's full statistics and per-layer settings stay in the pinned manifest.
CATALOG_CIRCUIT_DROP = frozenset({"concrete_statistics", "rounding_threshold_bits"})


def catalog_entry(document: dict[str, Any], files: list[reg.FileEntry]) -> dict[str, Any]:
    """The registry entry of a build, from its manifest (no hubs yet)."""
    return {
        "revision": hub.content_revision(files),
        "hubs": [],
        "profile": document["profile"],
        "seed": document["seed"],
        "device": document.get("device", "cpu"),
        "published": _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat(),
        "files": [e.__dict__ for e in files],
        "runtime": document["runtime"],
        "metrics": document["metrics"],
        "circuit": catalog_circuit(document["circuit"]),
    }


def catalog_circuit(circuit: dict[str, Any]) -> dict[str, Any]:
    """The registry's ``circuit`` of a build: its manifest's, less what only the manifest keeps,
    plus the key-switch and linear work the cost model prices (from concrete's statistics)."""
    kept = {k: v for k, v in circuit.items() if k not in CATALOG_CIRCUIT_DROP}
    work = {
        "key_switch_work": cost.key_switch_work(circuit),
        "linear_work": cost.linear_work(circuit),
    }
    return {**kept, **{k: v for k, v in work.items() if v is not None}}


def merge_entry(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """A re-publish of the same revision: the new hubs are added (a hub published to again
    takes its new revision, so a recreated repo can be repaired), and everything recorded
    before (measured metrics, timings, first publish date) is kept; the build is live again."""
    hubs = {(h["kind"], h["repo"]): h for h in old["hubs"]}
    hubs |= {(h["kind"], h["repo"]): h for h in new["hubs"]}
    merged = {**new, **{k: v for k, v in old.items() if k != "yanked"}, "hubs": [*hubs.values()]}
    merged["metrics"] = {**new["metrics"], **old["metrics"]}
    merged["circuit"] = new["circuit"]  # the same circuit, in the catalogue's current form
    merged["timings"] = {**new.get("timings", {}), **old.get("timings", {})}
    return merged


def publish(
    build_dir: Path,
    hub_specs: str | list[str] = "releases",
    *,
    registry_path: Path | None = None,
    message: str | None = None,
) -> reg.Build:
    """Upload a build directory to each hub (``releases``, ``local``, ``hf://ORG/REPO``) and
    pin it in the registry; a build already pinned keeps what was recorded of it."""
    document, files = manifest.check(Path(build_dir))
    for path, entry in files:
        if entry.role in cache.GATED_ROLES:
            check_zip(path)
    registry_path = Path(registry_path) if registry_path else config.registry_path()
    variant_name = document["variant"]
    reg.load(registry_path).variant(variant_name)  # fail before uploading anything
    targets = [
        hub.parse_hub(spec, variant_name, registry_path)
        for spec in ([hub_specs] if isinstance(hub_specs, str) else hub_specs)
    ]
    remote = [repo for target, repo in targets if target.kind == "hf"]
    if remote and config.offline():
        raise OfflineError(
            f"ZOO_OFFLINE is set, and publishing to {', '.join(remote)} needs the network",
            hint="unset ZOO_OFFLINE, or publish to `releases` or `local` only",
        )
    message = message or f"{variant_name}: {document['profile']} build (seed {document['seed']})"
    entry = catalog_entry(document, [e for _, e in files])
    measured = manifest.read_report(Path(build_dir))  # before any upload: it may be torn
    entry["metrics"] = {**measured.get("metrics", {}), **entry["metrics"]}
    timings = measured.get("timings", {})
    entry["timings"] = {k: v for k, v in timings.items() if isinstance(v, (int, float, str))}
    for target, repo in targets:
        hub_revision = target.publish(repo, files, message)
        if target.kind != releases.KIND:  # the store is implied for every build
            entry["hubs"].append({"kind": target.kind, "repo": repo, "revision": hub_revision})
    with reg.lock(registry_path):
        fresh = reg.load(registry_path).raw
        builds = fresh["variants"][variant_name]["builds"]
        index = next((i for i, b in enumerate(builds) if b["revision"] == entry["revision"]), None)
        if index is None:
            builds.append(entry)
        else:
            builds[index] = merge_entry(builds[index], entry)
        registry = reg.save(fresh, registry_path)
    return reg.resolve(
        registry, f"{variant_name}@{entry['revision']}", check_runtime=False, allow_yanked=True
    )


def record_metrics(
    ref: str, metrics: dict[str, Any], registry_path: Path | None = None
) -> reg.Build:
    """Merge measured ``metrics`` into the registry entry of the pinned build ``ref``."""
    registry_path = Path(registry_path) if registry_path else config.registry_path()
    with reg.lock(registry_path):
        registry = reg.load(registry_path)
        build = reg.resolve(registry, ref, check_runtime=False, allow_yanked=True)
        fresh = registry.raw
        for entry in fresh["variants"][build.variant]["builds"]:
            if entry["revision"] == build.revision:
                entry["metrics"] = {**entry["metrics"], **metrics}
        registry = reg.save(fresh, registry_path)  # validated: a bad metric changes nothing
    return reg.resolve(registry, build.ref, check_runtime=False, allow_yanked=True)


def card(ref: str, registry_path: Path | None = None) -> str:
    """The model card of a build with its FHE truth: the build's own card plus what the
    registry holds of it (simulation and real-FHE accuracy with their image counts, seconds
    per image and where, serialized evaluation-key size). Pulls the build's client files."""
    import json

    pulled = pull(ref, role="client", registry_path=registry_path)
    cache.check_hashes(pulled.build, "client")  # a warm pull checked sizes only
    document = json.loads((pulled.path / "manifest.json").read_text())
    variant = reg.load(registry_path).variant(pulled.build.variant)
    return cards.render(document, variant, measured=pulled.build.raw)


def verify(ref: str, registry_path: Path | None = None, cache_root: Path | None = None) -> dict:
    """Rehash the cached files of every cached build of ``ref`` (or the one it names)."""
    registry = reg.load(registry_path)
    name, revision = reg.split_ref(ref)
    builds = registry.variant(name).builds
    if revision:
        builds = (reg.resolve(registry, ref, check_runtime=False, allow_yanked=True),)
    cached = [b for b in builds if cache.build_path(b, cache_root).is_dir()]
    if not cached:
        raise NotFoundError(f"nothing of {ref} is cached", hint=f"pull it: `zoo pull {ref}`")
    return {b.revision: cache.verify(b, cache_root) for b in cached}


def releases_check(registry_path: Path | None = None) -> dict[str, Any]:
    """Rehash the release store's files of every live (not yanked) build of the registry."""
    registry = reg.load(registry_path)
    store = releases.ReleaseStore.beside(registry.path)
    blobs, size = store.size()
    builds = {b.short_ref: store.check(b) for v in registry.variants.values() for b in v.live}
    return {"store": str(store.root), "blobs": blobs, "bytes": size, "builds": builds}


def cache_list(registry_path: Path | None = None, cache_root: Path | None = None) -> list:
    """The builds in the cache with size and whether this runtime can load them."""
    return cache.scan(reg.load(registry_path), cache_root)


def cache_remove(
    ref: str | None, registry_path: Path | None = None, cache_root: Path | None = None
) -> int:
    """Remove a variant's cached builds (or one build, or all when ``ref`` is None)."""
    entries = cache_list(registry_path, cache_root)
    if ref is not None:
        name, revision = reg.split_ref(ref)
        if revision is not None and len(revision) < reg.MIN_REVISION_PREFIX:  # as resolve()
            raise InputError(f"revision prefix {revision!r} is too short", hint="give 7+ digits")
        entries = [
            e for e in entries if e.variant == name and e.revision.startswith(revision or "")
        ]
        if not entries:
            raise NotFoundError(f"nothing of {ref} is cached", hint="see `zoo cache ls`")
        if revision is not None and len(entries) > 1:
            raise InputError(
                f"{ref} names {len(entries)} cached builds",
                hint="give more digits of the revision (`zoo cache ls`), or the variant alone "
                "to remove them all",
            )
    return cache.remove(entries)


def cache_prune(
    registry_path: Path | None = None, cache_root: Path | None = None, orphans: bool = False
) -> dict:
    """Drop cached builds this runtime cannot load, yanked ones, and leftover staging folders.

    Builds this registry does not pin (orphans) may belong to another registry that shares the
    cache: they are kept and listed unless ``orphans`` is set."""
    found = cache_list(registry_path, cache_root)
    entries = [e for e in found if e.status != "ok" and (orphans or e.status != "orphan")]
    freed = cache.remove(entries)
    return {
        "removed": [f"{e.variant}@{e.revision[:12]} ({e.status})" for e in entries],
        "kept_orphans": []
        if orphans
        else [f"{e.variant}@{e.revision[:12]}" for e in found if e.status == "orphan"],
        "freed_bytes": freed,
        "staging_removed": cache.clean_tmp(cache_root),
    }
