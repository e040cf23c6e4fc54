"""The release store (releases/), yanked builds, re-publishing, and bundles for air-gapped machines.

The first test is the registry's hygiene gate: every build that registry.json offers (not yanked)
has all its files in the project's releases/, byte for byte, so a fresh clone can pull it.
"""

from __future__ import annotations

import json
import shutil
import stat
import zipfile
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import ROOT, make_build_dir

import zoo
from zoo import api
from zoo.catalog import manifest
from zoo.catalog import registry as reg
from zoo.cli import main
from zoo.errors import IntegrityError, NotFoundError, UnsafeArchiveError, YankedError
from zoo.store import bundle, cache
from zoo.store.releases import ReleaseStore

VARIANT = "cifar10-split-tiny"


def test_every_live_build_of_the_project_is_in_its_release_store() -> None:
    registry = reg.load(ROOT / "registry.json")
    store = ReleaseStore(ROOT / "releases")
    live = [b for v in registry.variants.values() for b in v.live]
    assert live, "the registry offers no build at all"
    gaps = {
        b.short_ref: bad
        for b in live
        if (bad := {p: why for p, why in store.check(b).items() if why != "ok"})
    }
    assert not gaps, f"publish these with `zoo publish BUILD_DIR --hub releases`, or yank: {gaps}"
    # The first command users are promised: a full build, at least as good as the reference.
    flagship = reg.resolve(registry, "cifar10-split-8bit", check_runtime=False)
    reference = registry.variant("cifar10-split-8bit").reference["metrics"]
    assert flagship.profile == "full" and flagship.metrics["n_test_images"] == 10_000
    assert flagship.metrics["fhe_simulation_top1"] >= reference["fhe_simulation_top1"]


def test_info_says_what_the_client_computes_in_the_clear(
    zoo_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Once a split build is cached, `zoo info` lists the client's clear steps from its manifest."""
    monkeypatch.setenv("ZOO_RELEASES", str(ROOT / "releases"))
    ref = "cifar10-split-pf-head2-r6"
    assert zoo.info(ref)["resolved"]["client_computes"] is None  # nothing cached yet
    zoo.pull(ref, role="client")
    assert zoo.info(ref)["resolved"]["client_computes"] == (
        "quantize 8-bit -> conv2d -> quantize 2-bit -> conv2d -> avg_pool2d -> quantize 2-bit, "
        "sends 64x14x14"
    )


def test_info_names_the_variants_that_compile_the_same_weights_again() -> None:
    """`zoo info` of a variant lists every variant whose recipe compiles its weights again
    (``compile_from``), with the compile settings and what that variant's newest build measured."""
    registry = reg.load(ROOT / "registry.json")
    derived = {
        v.name: v for v in registry.variants.values()
        if v.recipe["params"].get("compile_from", "").startswith("cifar10-cnv-2w2a-r6@")
    }  # fmt: skip
    assert "cifar10-cnv-2w2a-r6-norm2" in derived
    listed = zoo.info("cifar10-cnv-2w2a-r6", ROOT / "registry.json")["recompiled_as"]
    assert {row["variant"] for row in listed} == set(derived)
    row = next(r for r in listed if r["variant"] == "cifar10-cnv-2w2a-r6-norm2")
    norm2 = derived["cifar10-cnv-2w2a-r6-norm2"]
    assert row["compile"]["multi_parameter_strategy"] == "precision_and_norm2"
    assert row["revision"] == norm2.live[-1].revision
    assert row["metrics"]["fhe_simulation_top1"] == norm2.live[-1].metrics["fhe_simulation_top1"]
    assert zoo.info("cifar10-split-tiny", ROOT / "registry.json")["recompiled_as"] == []
    shown = CliRunner().invoke(main, ["info", "cifar10-cnv-2w2a-r6"]).output
    line = next(x for x in shown.splitlines() if x.startswith(f"recompiled as {norm2.name} "))
    assert "(the weights of cifar10-cnv-2w2a-r6@b017b136a62a, " in line
    measured = norm2.live[-1].metrics
    assert f"real FHE top-1 {measured['fhe_execute_top1']:.4f}" in line
    assert f", the slowest {measured['fhe_execute_max_seconds_per_image']:,.0f} s" in line
    for row in listed:  # a sample continued on another machine: those images' seconds too
        if row["metrics"].get("fhe_execute_other_machines"):
            line = next(x for x in shown.splitlines() if f" {row['variant']} " in x)
            assert f"; also timed {row['metrics']['fhe_execute_other_machines']}" in line


def test_every_variant_either_has_a_live_build_or_says_why_not() -> None:
    for variant in reg.load(ROOT / "registry.json").variants.values():
        for build in variant.builds:
            assert build.yanked is None or len(build.yanked) >= 10, build.short_ref


def test_the_registry_is_a_lean_catalogue() -> None:
    """Builds carry pins and headline numbers, not circuit dumps: the registry grows with the
    number of builds (about 4 kB each, plus one row per crypto parameter set of the circuit,
    which the cost model prices: 3 for most, 6 under concrete's per-norm strategy), not with
    their detail."""
    for variant in reg.load(ROOT / "registry.json").variants.values():
        for build in variant.builds:
            assert not set(build.circuit) & api.CATALOG_CIRCUIT_DROP, build.short_ref
            rows = len(build.circuit.get("pbs_count_per_parameter") or [])
            bound = 5_000 + 400 * max(0, rows - 3)  # 5 kB up to 3 sets, as before
            assert len(json.dumps(build.raw, indent=2)) <= bound, build.short_ref


def test_store_publish_and_pull_on_a_machine_without_hubs(
    zoo_home: Path, registry_file: Path, build_dir: Path, tmp_path: Path
) -> None:
    build = zoo.publish(build_dir)  # default: the release store
    assert build.hubs == () and not (zoo_home / "hub").exists()
    store = ReleaseStore.beside(registry_file)
    assert set(store.check(build).values()) == {"ok"}
    result = zoo.pull(VARIANT)
    assert result.source == "releases"
    assert sorted(result.downloaded) == sorted(e.path for e in build.files)
    assert zoo.pull(VARIANT, offline=True).downloaded == []

    # Files shared by two builds are stored once.
    other = make_build_dir(tmp_path / "other", seed=3)
    shutil.copy(build_dir / "head.safetensors", other / "head.safetensors")
    document = manifest.read(other)
    document.pop("files")
    manifest.write(other, document)
    blobs_before = store.size()[0]
    zoo.publish(other)
    assert store.size()[0] == blobs_before + len(build.files) - 1


def test_a_corrupt_or_truncated_blob_never_enters_the_cache(
    zoo_home: Path, registry_file: Path, build_dir: Path
) -> None:
    build = zoo.publish(build_dir)
    blob = ReleaseStore.beside(registry_file).blob(build.file("server").sha256)
    original = blob.read_bytes()
    blob.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
    with pytest.raises(IntegrityError, match="server.zip: hash mismatch"):
        zoo.pull(VARIANT, role="server")
    assert not (cache.build_path(build) / "server.zip").exists()
    blob.write_bytes(original[:100])
    with pytest.raises(IntegrityError, match="expected .* bytes, got 100"):
        zoo.pull(VARIANT, role="server")
    assert not any((zoo_home / "cache" / "tmp").iterdir())
    blob.unlink()
    with pytest.raises(NotFoundError, match="release store .* lacks server.zip") as info:
        zoo.pull(VARIANT, role="server")
    assert "--build-missing" in info.value.hint


def test_recorded_hubs_come_first_then_the_store(
    zoo_home: Path, registry_file: Path, build_dir: Path
) -> None:
    build = zoo.publish(build_dir, ["local", "releases"])
    assert [h.kind for h in build.hubs] == ["local"]
    assert zoo.pull(VARIANT).source == "local"
    shutil.rmtree(zoo_home)  # the machine that held the local hub is gone
    assert zoo.pull(VARIANT).source == "releases"


def test_a_bad_copy_on_one_source_falls_through_to_the_next(
    zoo_home: Path, registry_file: Path, build_dir: Path
) -> None:
    build = zoo.publish(build_dir, ["local", "releases"])
    (local,) = build.hubs
    hub_file = zoo_home / "hub" / local.repo / "revisions" / local.revision / "server.zip"
    hub_file.write_bytes(hub_file.read_bytes()[:100])  # the local hub's copy is truncated
    assert zoo.pull(VARIANT, role="server").source == "releases"
    cache.check_hashes(build, "server")

    shutil.rmtree(cache.build_path(build))
    ReleaseStore.beside(registry_file).blob(build.file("server").sha256).write_bytes(b"x" * 100)
    with pytest.raises(IntegrityError) as info:  # both bad: each source named, nothing kept
        zoo.pull(VARIANT, role="server")
    assert f"from hub local:{local.repo}: server.zip: expected" in str(info.value)
    assert "from the release store" in str(info.value)
    assert "republish" in info.value.hint
    assert not (cache.build_path(build) / "server.zip").exists()


def test_republishing_keeps_what_was_recorded(
    zoo_home: Path, registry_file: Path, build_dir: Path
) -> None:
    first = zoo.publish(build_dir, "local")
    api.record_metrics(first.ref, {"fhe_execute_top1": 0.5, "fhe_execute_n_images": 100})
    again = zoo.publish(build_dir)  # the same bytes, now also in the store
    assert again.revision == first.revision
    assert again.metrics["fhe_execute_n_images"] == 100
    assert again.raw["published"] == first.raw["published"]
    assert [h.kind for h in again.hubs] == ["local"]
    assert len(reg.load(registry_file).variant(VARIANT).builds) == 1
    assert stat.S_IMODE(registry_file.stat().st_mode) == 0o644  # a catalogue: readable by all


def test_a_hub_published_to_again_takes_its_new_revision() -> None:
    """A recreated or squashed hub repo is repaired by publishing to it again."""
    hub_a1, hub_a2 = ({"kind": "hf", "repo": "org/a", "revision": r} for r in ("c1", "c2"))
    hub_b = {"kind": "hf", "repo": "org/b", "revision": "c3"}
    entry = {"metrics": {}, "circuit": {}}
    merged = api.merge_entry({**entry, "hubs": [hub_a1, hub_b]}, {**entry, "hubs": [hub_a2]})
    assert merged["hubs"] == [hub_a2, hub_b]


def _yank(registry_file: Path, reason: str) -> None:
    document = json.loads(registry_file.read_text())
    document["variants"][VARIANT]["builds"][-1]["yanked"] = reason
    reg.save(document, registry_file)


def test_yanked_builds_are_never_resolved_and_say_why(
    zoo_home: Path, registry_file: Path, build_dir: Path, tmp_path: Path
) -> None:
    old = zoo.publish(build_dir)
    zoo.pull(VARIANT)
    _yank(registry_file, "its files were lost with the machine that built it")
    assert [e.status for e in zoo.cache_list()] == ["yanked"]
    assert zoo.cache_prune()["removed"] == [f"{old.short_ref} (yanked)"]
    with pytest.raises(YankedError, match="every build of .* is yanked .* lost with") as info:
        zoo.pull(VARIANT)
    assert f"zoo build {VARIANT} --profile smoke" in info.value.hint
    new = zoo.publish(make_build_dir(tmp_path / "new", seed=5))
    assert zoo.pull(VARIANT).build.revision == new.revision
    with pytest.raises(YankedError, match=f"{old.revision[:12]} is yanked: its files were lost"):
        zoo.pull(f"{VARIANT}@{old.revision[:9]}")
    row = next(r for r in zoo.list_variants() if r["variant"] == VARIANT)
    assert (row["builds"], row["yanked"]) == (1, 1)


# --- bundles -------------------------------------------------------------------------------


@pytest.fixture
def exported(zoo_home: Path, registry_file: Path, build_dir: Path, tmp_path: Path) -> Path:
    """A bundle of the published scratch build; the cache emptied afterwards."""
    zoo.publish(build_dir)
    path = tmp_path / "tiny.zoo.zip"
    bundle.export([VARIANT], path)
    shutil.rmtree(zoo_home / "cache")
    shutil.rmtree(ReleaseStore.beside(registry_file).root)  # the air-gapped machine has no store
    return path


def _untouched(zoo_home: Path, registry_file: Path, before: bytes) -> bool:
    builds = zoo_home / "cache" / "builds"
    return registry_file.read_bytes() == before and not (builds.exists() and any(builds.iterdir()))


def test_bundle_round_trip(exported: Path, zoo_home: Path) -> None:
    assert stat.S_IMODE(exported.stat().st_mode) == 0o644  # made to be shared
    data = bundle.import_bundle(exported)
    assert data == {"imported": [zoo.pull(VARIANT).build.short_ref], "added_to_registry": []}
    assert zoo.pull(VARIANT, offline=True).downloaded == []


def _rewrite(source: Path, target: Path, edit) -> Path:  # noqa: ANN001 - a callable
    """Copy a bundle, letting ``edit(name, data)`` change or drop (None) each member."""
    with zipfile.ZipFile(source) as src, zipfile.ZipFile(target, "w") as dst:
        for info in src.infolist():
            data = edit(info.filename, src.read(info))
            if data is not None:
                dst.writestr(info.filename, data)
    return target


def test_hostile_bundles_leave_cache_and_registry_untouched(
    exported: Path, zoo_home: Path, registry_file: Path, tmp_path: Path
) -> None:
    before = registry_file.read_bytes()

    def flip_last_byte(name: str, data: bytes) -> bytes:
        return data[:-1] + bytes([data[-1] ^ 1]) if name.startswith("sha256/") else data

    flip = _rewrite(exported, tmp_path / "flip.zip", flip_last_byte)
    with pytest.raises(IntegrityError, match="does not match its pin"):
        bundle.import_bundle(flip)
    assert _untouched(zoo_home, registry_file, before)

    escape = _rewrite(exported, tmp_path / "escape.zip", lambda n, d: d)
    with zipfile.ZipFile(escape, "a") as archive:
        archive.writestr("../../evil", b"x")
    with pytest.raises(UnsafeArchiveError, match=r"\.\."):
        bundle.import_bundle(escape)
    assert not (tmp_path.parent / "evil").exists()

    link = _rewrite(exported, tmp_path / "link.zip", lambda n, d: d)
    with zipfile.ZipFile(link, "a") as archive:
        info = zipfile.ZipInfo("sha256/link")
        info.external_attr = (0o120777 << 16) | 0x20
        archive.writestr(info, "/etc/passwd")
    with pytest.raises(UnsafeArchiveError, match="link"):
        bundle.import_bundle(link)

    big = _rewrite(exported, tmp_path / "big.zip", lambda n, d: d)
    with zipfile.ZipFile(big, "a", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("sha256/" + "0" * 64, bytes(64 << 20))  # 64 MiB of zeros
    with pytest.raises(UnsafeArchiveError):
        bundle.import_bundle(big)

    with pytest.raises(UnsafeArchiveError, match="not a zoo bundle"):
        bundle.import_bundle(_rewrite(exported, tmp_path / "noindex.zip",
                                      lambda n, d: None if n == bundle.INDEX else d))  # fmt: skip
    for name, index in [("deep", b"[" * 100_000), ("ints", b'{"builds": [1]}'),
                        ("text", b'{"builds": "x"}')]:  # fmt: skip

        def swap(n: str, d: bytes, index: bytes = index) -> bytes:
            if n != bundle.INDEX:
                return d
            if not index.startswith(b"{"):
                return index
            return json.dumps({**json.loads(d), **json.loads(index)}).encode()

        with pytest.raises(UnsafeArchiveError, match="not a zoo bundle|not a list of objects"):
            bundle.import_bundle(_rewrite(exported, tmp_path / f"{name}.zip", swap))

    index = json.dumps({"format": bundle.FORMAT, "version": bundle.VERSION, "builds": []})
    for method, problem in [(zipfile.ZIP_DEFLATED, "not a zoo bundle .*decompressing"),
                            (zipfile.ZIP_BZIP2, "compression method 12")]:  # fmt: skip
        odd = tmp_path / f"index-{method}.zip"
        with zipfile.ZipFile(odd, "w", method) as archive:
            archive.writestr(bundle.INDEX, index)
        if method == zipfile.ZIP_DEFLATED:  # a deflate stream that does not decode
            with zipfile.ZipFile(odd) as archive:
                info = archive.getinfo(bundle.INDEX)
            data = bytearray(odd.read_bytes())
            start = info.header_offset + 30 + len(info.filename) + len(info.extra)
            data[start : start + info.compress_size] = b"\xff" * info.compress_size
            odd.write_bytes(bytes(data))
        with pytest.raises(UnsafeArchiveError, match=problem):
            bundle.import_bundle(odd)
    assert _untouched(zoo_home, registry_file, before)


def test_unknown_builds_need_trust(
    exported: Path, zoo_home: Path, registry_file: Path, tmp_path: Path
) -> None:
    document = json.loads(registry_file.read_text())
    document["variants"][VARIANT]["builds"] = []
    reg.save(document, registry_file)
    before = registry_file.read_bytes()
    with pytest.raises(NotFoundError, match="does not pin") as info:
        bundle.import_bundle(exported)
    assert "--trust" in info.value.hint
    assert _untouched(zoo_home, registry_file, before)

    def forge(name: str, data: bytes) -> bytes:  # a listing that does not hash to its revision
        if name != bundle.INDEX:
            return data
        index = json.loads(data)
        index["builds"][0]["build"]["files"][0]["size"] += 1
        return json.dumps(index).encode()

    with pytest.raises(IntegrityError, match="does not hash to its revision"):
        bundle.import_bundle(_rewrite(exported, tmp_path / "forged.zip", forge), trust=True)
    assert _untouched(zoo_home, registry_file, before)

    data = bundle.import_bundle(exported, trust=True)
    assert data["added_to_registry"] == data["imported"]
    assert zoo.pull(VARIANT, offline=True).downloaded == []
