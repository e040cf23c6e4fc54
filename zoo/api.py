"""The Python API behind the CLI: list, info, pull, publish, verify, and cache housekeeping.

Each function takes explicit paths (registry, hub folder, cache root, endpoint) with defaults from
:mod:`zoo.config`, raises :class:`zoo.errors.ZooError` subclasses, and returns plain records the
CLI prints as tables or JSON. None of them imports torch or concrete-ml.
"""

from __future__ import annotations

import datetime as _dt
from pathlib import Path
from typing import Any

from zoo import cache, config, cost, hub, manifest, versions
from zoo import registry as reg
from zoo.errors import HubError, NotFoundError, RuntimeMismatchError


def list_variants(registry_path: Path | None = None) -> list[dict[str, Any]]:
    """One row per variant: dataset, accuracies, bit width, cost, published builds."""
    registry = reg.load(registry_path)
    calibration = cost.current_calibration()
    rows = []
    for variant in registry.variants.values():
        build = variant.builds[-1] if variant.builds else None
        metrics = build.metrics if build else {}
        circuit = build.circuit if build else {}
        estimate = cost.breakdown(circuit, calibration) if build else None
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
                "est_other_machine": (calibration or {}).get("source", {}).get("other_machine"),
                "eval_key_bytes": circuit.get("eval_key_bytes"),
                "builds": len(variant.builds),
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
            "est_fhe_seconds_per_image": estimate["total_seconds"] if estimate else None,
            "cost": estimate,
            "cached": cached,
        }
    return out


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
    """Resolve ``VARIANT[@REV]`` and make its files for ``role`` present and verified in the cache.

    Warm pulls touch no network. ``offline`` (default ``ZOO_OFFLINE``) uses the cache only.
    ``build_missing`` rebuilds from the recipe when no hub holds the build, and accepts the
    result only if every reproducible file matches the pinned sha256.
    """
    registry = reg.load(registry_path)
    build = reg.resolve(registry, ref)
    offline = config.offline() if offline is None else offline
    if not cache.missing_files(build, role, cache_root):
        return cache.PullResult(build, cache.build_path(build, cache_root), role)
    if offline:
        return cache.require_cached(build, role, cache_root)
    source = hub.hub_for(build.hub_kind, endpoint=endpoint, hub_dir=hub_dir)
    try:
        return cache.fetch(build, role, source, root=cache_root, progress=progress)
    except (NotFoundError, HubError):
        if not build_missing:
            raise
    from zoo.build import rebuild_into_cache  # heavy: torch, concrete-ml

    return rebuild_into_cache(build, registry, role=role, cache_root=cache_root, data_dir=data_dir)


def publish(
    build_dir: Path,
    hub_spec: str = "local",
    *,
    registry_path: Path | None = None,
    message: str | None = None,
) -> reg.Build:
    """Upload a build directory to a hub as one revision and pin it in the registry."""
    from filelock import FileLock

    document, files = manifest.check(Path(build_dir))
    registry_path = Path(registry_path) if registry_path else config.registry_path()
    variant_name = document["variant"]
    reg.load(registry_path).variant(variant_name)  # fail before uploading anything
    target, repo = hub.parse_hub(hub_spec, variant_name)
    message = message or f"{variant_name}: {document['profile']} build (seed {document['seed']})"
    revision = target.publish(repo, files, message)
    entry = {
        "revision": revision,
        "hub": {"kind": target.kind, "repo": repo},
        "profile": document["profile"],
        "seed": document["seed"],
        "device": document.get("device", "cpu"),
        "published": _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat(),
        "files": [e.__dict__ for _, e in files],
        "runtime": document["runtime"],
        "metrics": document["metrics"],
        "circuit": document["circuit"],
    }
    report = Path(build_dir) / manifest.REPORT
    if report.is_file():
        import json

        measured = json.loads(report.read_text())
        entry["metrics"] = {**measured.get("metrics", {}), **entry["metrics"]}
        timings = measured.get("timings", {})
        entry["timings"] = {k: v for k, v in timings.items() if isinstance(v, (int, float, str))}
    with FileLock(str(registry_path) + ".lock"):
        fresh = reg.load(registry_path).raw
        builds = fresh["variants"][variant_name]["builds"]
        builds[:] = [b for b in builds if b["revision"] != revision] + [entry]
        registry = reg.save(fresh, registry_path)
    return reg.resolve(registry, f"{variant_name}@{revision}", check_runtime=False)


def record_metrics(
    ref: str, metrics: dict[str, Any], registry_path: Path | None = None
) -> reg.Build:
    """Merge measured ``metrics`` into the registry entry of the pinned build ``ref``."""
    from filelock import FileLock

    registry_path = Path(registry_path) if registry_path else config.registry_path()
    with FileLock(str(registry_path) + ".lock"):
        registry = reg.load(registry_path)
        build = reg.resolve(registry, ref, check_runtime=False)
        fresh = registry.raw
        for entry in fresh["variants"][build.variant]["builds"]:
            if entry["revision"] == build.revision:
                entry["metrics"] = {**entry["metrics"], **metrics}
        registry = reg.save(fresh, registry_path)  # validated: a bad metric changes nothing
    return reg.resolve(registry, build.ref, check_runtime=False)


def verify(ref: str, registry_path: Path | None = None, cache_root: Path | None = None) -> dict:
    """Rehash the cached files of every cached build of ``ref`` (or the one it names)."""
    registry = reg.load(registry_path)
    name, revision = reg.split_ref(ref)
    builds = registry.variant(name).builds
    if revision:
        builds = (reg.resolve(registry, ref, check_runtime=False),)
    cached = [b for b in builds if cache.build_path(b, cache_root).is_dir()]
    if not cached:
        raise NotFoundError(f"nothing of {ref} is cached", hint=f"pull it: `zoo pull {ref}`")
    return {b.revision: cache.verify(b, cache_root) for b in cached}


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
        entries = [
            e for e in entries if e.variant == name and e.revision.startswith(revision or "")
        ]
        if not entries:
            raise NotFoundError(f"nothing of {ref} is cached", hint="see `zoo cache ls`")
    return cache.remove(entries)


def cache_prune(registry_path: Path | None = None, cache_root: Path | None = None) -> dict:
    """Drop cached builds this runtime cannot load, orphans, and leftover staging folders."""
    entries = [e for e in cache_list(registry_path, cache_root) if e.status != "ok"]
    freed = cache.remove(entries)
    return {
        "removed": [f"{e.variant}@{e.revision[:12]} ({e.status})" for e in entries],
        "freed_bytes": freed,
        "staging_removed": cache.clean_tmp(cache_root),
    }
