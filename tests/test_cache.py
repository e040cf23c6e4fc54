"""Publish → pull → verify on the local directory hub, and the faults that must leave it clean."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import make_build_dir

import zoo
from zoo.catalog import manifest
from zoo.catalog import registry as reg
from zoo.errors import (
    InputError,
    IntegrityError,
    NotFoundError,
    OfflineError,
    RegistryError,
    RuntimeMismatchError,
)
from zoo.store import cache

VARIANT = "cifar10-split-tiny"


def _hub_files(home: Path) -> dict[str, bytes]:
    root = home / "hub"
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def test_publish_pull_verify_round_trip(
    zoo_home: Path, registry_file: Path, build_dir: Path
) -> None:
    build = zoo.publish(build_dir, "local")
    assert [h.kind for h in build.hubs] == ["local"] and len(build.revision) == 64
    pinned = {e.path: e.sha256 for e in build.files}
    assert set(pinned) == {p.name for p in build_dir.iterdir() if p.is_file()}

    result = zoo.pull(VARIANT)
    assert sorted(result.downloaded) == sorted(pinned)
    for name, digest in pinned.items():
        assert manifest.entry_for(result.path / name).sha256 == digest

    again = zoo.pull(VARIANT)  # warm
    assert again.downloaded == [] and again.path == result.path
    assert zoo.verify(VARIANT) == {build.revision: dict.fromkeys(pinned, "ok")}


def test_measured_metrics_are_recorded_into_the_pinned_build(
    zoo_home: Path, registry_file: Path, build_dir: Path
) -> None:
    build = zoo.publish(build_dir, "local")
    updated = zoo.api.record_metrics(
        f"{VARIANT}@{build.revision[:10]}", {"fhe_execute_top1": 0.5, "fhe_execute_n_images": 4}
    )
    assert updated.metrics["fhe_execute_top1"] == 0.5
    assert updated.metrics["clear_top1"] == build.metrics["clear_top1"]  # kept
    before = registry_file.read_bytes()
    with pytest.raises(RegistryError, match="fhe_execute_top1"):  # not a fraction
        zoo.api.record_metrics(build.ref, {"fhe_execute_top1": 1.5})
    assert registry_file.read_bytes() == before


def test_publish_twice_is_idempotent_and_pins_once(
    zoo_home: Path, registry_file: Path, build_dir: Path
) -> None:
    first = zoo.publish(build_dir, "local")
    second = zoo.publish(build_dir, "local")
    assert first.revision == second.revision
    assert len(reg.load(registry_file).variant(VARIANT).builds) == 1


def test_role_pulls_only_what_it_needs(
    zoo_home: Path, registry_file: Path, build_dir: Path
) -> None:
    zoo.publish(build_dir, "local")
    client = zoo.pull(VARIANT, role="client")
    assert sorted(client.downloaded) == ["client.zip", "head.safetensors", "manifest.json"]
    server = zoo.pull(VARIANT, role="server")
    assert sorted(server.downloaded) == ["server.zip"]


def test_offline_uses_the_cache_and_names_what_is_missing(
    zoo_home: Path, registry_file: Path, build_dir: Path
) -> None:
    zoo.publish(build_dir, "local")
    with pytest.raises(OfflineError, match="client.zip, head.safetensors, manifest.json"):
        zoo.pull(VARIANT, role="client", offline=True)
    zoo.pull(VARIANT, role="client")
    assert zoo.pull(VARIANT, role="client", offline=True).downloaded == []
    with pytest.raises(OfflineError, match="server.zip"):
        zoo.pull(VARIANT, role="server", offline=True)


def test_offline_a_cached_build_serves_after_a_newer_one_is_published(
    zoo_home: Path, registry_file: Path, build_dir: Path, tmp_path: Path
) -> None:
    old = zoo.publish(build_dir, "local")
    zoo.pull(VARIANT, role="client")
    new = zoo.publish(make_build_dir(tmp_path / "newer", seed=5), "local")  # e.g. a `git pull`
    assert zoo.pull(VARIANT, role="client", offline=True).build.revision == old.revision
    with pytest.raises(OfflineError, match="head.safetensors") as info:  # a pin is never swapped
        zoo.pull(f"{VARIANT}@{new.revision[:12]}", role="client", offline=True)
    assert f"zoo pull {new.short_ref} " in info.value.hint  # that build, not the newest
    with pytest.raises(OfflineError):  # nor is a role the old build lacks in the cache
        zoo.pull(VARIANT, role="server", offline=True)
    assert zoo.pull(VARIANT, role="client").build.revision == new.revision  # online: the newest


def test_hash_mismatch_on_the_hub_fails_and_leaves_the_cache_clean(
    zoo_home: Path, registry_file: Path, build_dir: Path
) -> None:
    build = zoo.publish(build_dir, "local")
    (local,) = build.hubs
    hub_file = zoo_home / "hub" / local.repo / "revisions" / local.revision / "server.zip"
    original = hub_file.read_bytes()
    hub_file.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))  # same size, other bytes
    expected = build.file("server").sha256
    with pytest.raises(IntegrityError, match=f"server.zip: hash mismatch: expected {expected}"):
        zoo.pull(VARIANT, role="server")
    assert not (cache.build_path(build) / "server.zip").exists()
    assert not any((zoo_home / "cache" / "tmp").iterdir())

    hub_file.write_bytes(original[: len(original) // 2])  # truncated
    with pytest.raises(IntegrityError, match="expected .* bytes, got"):
        zoo.pull(VARIANT, role="server")

    hub_file.write_bytes(original)  # repaired hub: the same pull now succeeds
    assert sorted(zoo.pull(VARIANT, role="server").downloaded) == ["manifest.json", "server.zip"]


def test_verify_finds_and_removes_a_corrupt_cached_file(
    zoo_home: Path, registry_file: Path, build_dir: Path
) -> None:
    build = zoo.publish(build_dir, "local")
    result = zoo.pull(VARIANT)
    weights = result.path / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[100] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert zoo.verify(VARIANT)[build.revision]["weights.safetensors"] == "corrupt (removed)"
    assert zoo.pull(VARIANT).downloaded == ["weights.safetensors"]


def test_a_corrupt_file_in_a_read_only_cache_is_reported_as_corrupt(
    zoo_home: Path, registry_file: Path, build_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A shared cache this user cannot write: the news is the corruption, not the permission.
    (Root ignores file modes, so the refused removal is simulated.)"""
    build = zoo.publish(build_dir, "local")
    head = zoo.pull(VARIANT).path / "head.safetensors"
    head.write_bytes(head.read_bytes()[::-1])
    unlink = Path.unlink

    def refused(path: Path, missing_ok: bool = False) -> None:
        if path == head:
            raise PermissionError(13, "Permission denied", str(path))
        unlink(path, missing_ok=missing_ok)

    monkeypatch.setattr(Path, "unlink", refused)
    with pytest.raises(IntegrityError, match="changed since it was pulled .*: not removable"):
        cache.check_hashes(build, "client")
    report = zoo.verify(VARIANT)[build.revision]
    assert report["head.safetensors"] == "corrupt (not removable: Permission denied)"


def test_cache_rm_takes_one_build_by_a_prefix_of_7_or_more_digits(
    zoo_home: Path, registry_file: Path, build_dir: Path, tmp_path: Path
) -> None:
    builds = [zoo.publish(build_dir, "local"),
              zoo.publish(make_build_dir(tmp_path / "other", seed=3), "local")]  # fmt: skip
    for build in builds:
        zoo.pull(build.short_ref)
    with pytest.raises(InputError, match="too short"):
        zoo.cache_remove(f"{VARIANT}@{builds[0].revision[:3]}")
    assert zoo.cache_remove(f"{VARIANT}@{builds[0].revision[:7]}") > 0
    assert [e.revision for e in zoo.cache_list()] == [builds[1].revision]


def test_publish_refuses_a_build_dir_that_does_not_match_its_manifest(
    zoo_home: Path, registry_file: Path, build_dir: Path
) -> None:
    registry_before = registry_file.read_bytes()
    (build_dir / "client.zip").write_bytes(b"tampered")
    (build_dir / "stray.bin").write_bytes(b"x")
    with pytest.raises(IntegrityError) as info:
        zoo.publish(build_dir, "local")
    assert "client.zip: manifest says" in str(info.value)
    assert "stray.bin: present but not in the manifest" in str(info.value)
    assert registry_file.read_bytes() == registry_before
    assert not (zoo_home / "hub").exists()


def test_publish_with_an_invalid_registry_changes_nothing(
    zoo_home: Path, registry_file: Path, build_dir: Path
) -> None:
    document = json.loads(registry_file.read_text())
    document["variants"][VARIANT]["num_classes"] = 11
    registry_file.write_text(json.dumps(document))
    before = registry_file.read_bytes()
    with pytest.raises(RegistryError, match=r"\$\.variants\['cifar10-split-tiny'\]\.num_classes"):
        zoo.publish(build_dir, "local")
    assert registry_file.read_bytes() == before
    assert not (zoo_home / "hub").exists()


def test_unknown_variant_in_manifest_is_refused_before_upload(
    zoo_home: Path, registry_file: Path, tmp_path: Path
) -> None:
    from conftest import make_build_dir

    other = make_build_dir(tmp_path / "other", variant="cifar10-split-huge")
    with pytest.raises(NotFoundError, match="no variant 'cifar10-split-huge'"):
        zoo.publish(other, "local")
    assert not (zoo_home / "hub").exists()


def test_a_build_for_another_runtime_is_not_pulled(
    zoo_home: Path, registry_file: Path, build_dir: Path
) -> None:
    build = zoo.publish(build_dir, "local")
    document = json.loads(registry_file.read_text())
    document["variants"][VARIANT]["builds"][0]["runtime"]["concrete-ml"] = "0.0.1"
    reg.save(document, registry_file)
    with pytest.raises(RuntimeMismatchError, match="concrete-ml 0.0.1") as info:
        zoo.pull(VARIANT)
    assert "pip install concrete-ml==0.0.1" in info.value.hint
    with pytest.raises(RuntimeMismatchError, match="concrete-ml: need 0.0.1"):
        zoo.pull(f"{VARIANT}@{build.revision[:10]}")
    assert not (zoo_home / "cache" / "builds").exists()


def test_cache_ls_rm_prune(zoo_home: Path, registry_file: Path, build_dir: Path) -> None:
    build = zoo.publish(build_dir, "local")
    zoo.pull(VARIANT)
    orphan = zoo_home / "cache" / "builds" / VARIANT / ("f" * 64)
    orphan.mkdir(parents=True)
    (orphan / "x.bin").write_bytes(b"123")
    stale = zoo_home / "cache" / "tmp" / f"{VARIANT}@{'e' * 64}-abc"
    stale.mkdir(parents=True)
    listing = {e.revision: e.status for e in zoo.cache_list()}
    assert listing == {build.revision: "ok", "f" * 64: "orphan"}
    report = zoo.cache_prune()  # another registry may pin the orphan: kept
    assert report["removed"] == [] and report["kept_orphans"] == [f"{VARIANT}@{'f' * 12}"]
    assert report["staging_removed"] == 1
    assert zoo.cache_prune(orphans=True)["removed"] == [f"{VARIANT}@{'f' * 12} (orphan)"]
    assert zoo.cache_remove(VARIANT) == build.download_bytes
    assert zoo.cache_list() == []


PULL_SCRIPT = """
import json, sys, zoo
r = zoo.pull(sys.argv[1], hub_dir=None)
print(json.dumps({"downloaded": r.downloaded}))
"""


def test_four_processes_pull_at_once(zoo_home: Path, registry_file: Path, tmp_path: Path) -> None:
    from conftest import make_build_dir

    build = zoo.publish(make_build_dir(tmp_path / "b", payload=32 << 20), "local")
    env = dict(os.environ)
    procs = [
        subprocess.Popen([sys.executable, "-c", PULL_SCRIPT, VARIANT], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=env)
        for _ in range(4)
    ]  # fmt: skip
    outputs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0, 0], outputs
    downloads = [json.loads(out)["downloaded"] for out, _ in outputs]
    assert sum(len(d) for d in downloads) == len(build.files)  # each file fetched exactly once
    assert all(status == "ok" for status in zoo.verify(VARIANT)[build.revision].values())
