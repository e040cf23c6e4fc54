"""The Hugging Face protocol hub, end to end through huggingface_hub against real local servers:
olah (an independent implementation) for reads behind our commit server, and a fault-injecting
server for the error paths."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import make_build_dir

import zoo
from zoo.catalog import manifest
from zoo.catalog import registry as reg
from zoo.errors import HubError, IntegrityError, NotFoundError, OfflineError
from zoo.store import cache
from zoo.store.hub import content_revision

VARIANT = "cifar10-split-tiny"
REPO = "zoo-test/cifar10-split-tiny"


@pytest.fixture
def hf_env(hf_hub, zoo_home: Path, registry_file: Path, monkeypatch: pytest.MonkeyPatch):  # noqa: ANN001, ANN201
    monkeypatch.setenv("ZOO_HF_ENDPOINT", hf_hub.endpoint)
    monkeypatch.setenv("HF_TOKEN", hf_hub.token)
    return hf_hub


def test_publish_is_one_commit_and_pull_verifies(hf_env, build_dir: Path) -> None:  # noqa: ANN001
    build = zoo.publish(build_dir, f"hf://{REPO}")
    (hf,) = build.hubs
    assert hf.kind == "hf" and hf.repo == REPO and hf_env.head(REPO) == hf.revision
    assert build.revision == content_revision(list(build.files))  # the build's name: its content
    result = zoo.pull(VARIANT)
    assert sorted(result.downloaded) == sorted(e.path for e in build.files)
    for entry in build.files:
        assert manifest.entry_for(result.path / entry.path).sha256 == entry.sha256
    hf_env.clear_requests()
    assert zoo.pull(VARIANT).downloaded == []  # warm: no request at all
    assert hf_env.requests == []
    assert zoo.pull(VARIANT, offline=True).downloaded == []


def test_second_publish_replaces_files_and_old_revision_stays_pullable(
    hf_env,
    build_dir: Path,
    tmp_path: Path,  # noqa: ANN001
) -> None:
    first = zoo.publish(build_dir, f"hf://{REPO}")
    second = zoo.publish(make_build_dir(tmp_path / "b2", seed=7), f"hf://{REPO}")
    assert second.revision != first.revision
    old = zoo.pull(f"{VARIANT}@{first.revision}")
    assert manifest.entry_for(old.path / "server.zip").sha256 == first.file("server").sha256
    assert len(reg.load().variant(VARIANT).builds) == 2


def test_a_file_that_changed_since_its_check_is_not_committed(hf_env, build_dir: Path) -> None:  # noqa: ANN001
    """The bytes a commit would send are hashed and held to the pins first (here the server.zip
    was rewritten after the manifest's check read it)."""
    from zoo.store.hub import HfHub

    _, files = manifest.check(build_dir)
    (build_dir / "server.zip").write_bytes(b"rewritten after the check")
    hub = HfHub(hf_env.endpoint, hf_env.token)
    with pytest.raises(IntegrityError, match="server.zip changed while publishing"):
        hub.publish(REPO, files, "must not land")
    assert "server.zip" not in hf_env.api().list_repo_files(REPO)


def test_publish_fails_if_someone_pushed_meanwhile(
    hf_env,
    build_dir: Path,
    tmp_path: Path,  # noqa: ANN001
) -> None:
    from zoo.store.hub import HfHub

    hub = HfHub(hf_env.endpoint, hf_env.token)
    zoo.publish(build_dir, f"hf://{REPO}")
    api = hf_env.api()
    real_info = api.model_info(REPO, revision="main")
    hf_env.commit_files(REPO, {"other.txt": b"pushed by someone else"}, message="race")

    class StaleApi:
        def __getattr__(self, name: str):  # noqa: ANN204
            return getattr(api, name)

        def model_info(self, *args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            return real_info  # the head we saw before the other push

    hub._api = lambda: StaleApi()  # type: ignore[method-assign]
    _, files = manifest.check(make_build_dir(tmp_path / "b2", seed=3))
    with pytest.raises(HubError, match="412"):
        hub.publish(REPO, files, "stale")


def test_four_processes_pull_at_once(hf_env, tmp_path: Path) -> None:  # noqa: ANN001
    build = zoo.publish(make_build_dir(tmp_path / "b", payload=8 << 20), f"hf://{REPO}")
    code = "import json, sys, zoo; print(json.dumps(zoo.pull(sys.argv[1]).downloaded))"
    procs = [subprocess.Popen([sys.executable, "-c", code, VARIANT], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(4)]  # fmt: skip
    outputs = [p.communicate(timeout=180) for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, outputs
    assert sum(len(json.loads(out)) for out, _ in outputs) == len(build.files)
    assert set(zoo.verify(VARIANT)[build.revision].values()) == {"ok"}


# --- Faults, against the fault-injecting server -------------------------------------------


@pytest.fixture
def fault_env(fault_hub_factory, zoo_home: Path, registry_file: Path, tmp_path: Path,  # noqa: ANN001
              monkeypatch: pytest.MonkeyPatch):  # noqa: ANN201  # fmt: skip
    """A fault hub holding one build, pinned in the scratch registry."""
    return _pin_at_fault_hub(fault_hub_factory, registry_file, tmp_path, monkeypatch)


def _pin_at_fault_hub(fault_hub_factory, registry_file: Path, tmp_path: Path,  # noqa: ANN001, ANN202
                      monkeypatch: pytest.MonkeyPatch, lacking: str | None = None):  # fmt: skip
    """Pin a build at a fault hub whose commit holds its files (all but ``lacking``)."""
    build_dir = make_build_dir(tmp_path / "fault-build", payload=4 << 20)
    _, files = manifest.check(build_dir)
    served = {e.path: p.read_bytes() for p, e in files if e.path != lacking}
    hub = fault_hub_factory(served, repo_id=REPO)
    document = json.loads(registry_file.read_text())
    document["variants"][VARIANT]["builds"] = [
        {
            "revision": content_revision([e for _, e in files]), "profile": "smoke",
            "hubs": [{"kind": "hf", "repo": REPO, "revision": hub.revision}],
            "files": [e.__dict__ for _, e in files],
            "runtime": manifest.read(build_dir)["runtime"],
            "metrics": {}, "circuit": {"max_bit_width": 5, "pbs_count": 100},
        }
    ]  # fmt: skip
    reg.save(document, registry_file)
    monkeypatch.setenv("ZOO_HF_ENDPOINT", hub.endpoint)
    monkeypatch.setenv("HF_TOKEN", hub.token)
    return hub


def _cache_is_clean(home: Path) -> bool:
    builds = home / "cache" / "builds"
    tmp = home / "cache" / "tmp"
    files = [p for p in builds.rglob("*") if p.is_file()] if builds.exists() else []
    staged = list(tmp.iterdir()) if tmp.exists() else []
    return not staged and all(
        manifest.entry_for(p).sha256 == e.sha256
        for e in reg.load().variant(VARIANT).builds[0].files
        for p in files
        if p.name == e.path
    )


def _cached(variant: str) -> Path:
    """The cache folder of the build a pull of ``variant`` takes (named by its content revision,
    not by the hub's commit)."""
    return cache.build_path(reg.load().variant(variant).builds[-1])


def test_corrupt_bytes_from_the_hub_are_rejected(fault_env, zoo_home: Path) -> None:  # noqa: ANN001
    fault_env.corrupt("server.zip")
    with pytest.raises(IntegrityError, match="server.zip: hash mismatch: expected sha256:"):
        zoo.pull(VARIANT, role="server")
    assert _cache_is_clean(zoo_home)
    assert not any(p.name == "server.zip" for p in (zoo_home / "cache").rglob("*"))
    fault_env.clear_faults()
    assert "server.zip" in zoo.pull(VARIANT, role="server").downloaded


def test_a_file_the_pinned_commit_lacks_is_not_found(
    fault_hub_factory,
    zoo_home: Path,
    registry_file: Path,
    tmp_path: Path,  # noqa: ANN001
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _pin_at_fault_hub(fault_hub_factory, registry_file, tmp_path, monkeypatch, "server.zip")
    with pytest.raises(NotFoundError, match="has no file server.zip"):
        zoo.pull(VARIANT, role="server")
    assert _cache_is_clean(zoo_home)
    assert "client.zip" in zoo.pull(VARIANT, role="client").downloaded


def test_truncated_download_never_enters_the_cache(fault_env, zoo_home: Path) -> None:  # noqa: ANN001
    fault_env.truncate("server.zip", after_bytes=100_000)
    with pytest.raises((HubError, IntegrityError)):
        zoo.pull(VARIANT, role="server")
    assert _cache_is_clean(zoo_home)
    assert not (_cached(VARIANT) / "server.zip").exists()


def test_server_errors_500_and_404_leave_the_cache_clean(fault_env, zoo_home: Path) -> None:  # noqa: ANN001
    fault_env.fail("client.zip", status=500)
    with pytest.raises(HubError, match="client.zip|500|cannot reach"):
        zoo.pull(VARIANT, role="client")
    assert 1 <= fault_env.count(contains="client.zip") <= 10  # bounded retries
    fault_env.clear_faults()
    fault_env.fail("client.zip", status=404, error_code="EntryNotFound")
    with pytest.raises(NotFoundError, match="missing"):
        zoo.pull(VARIANT, role="client")
    assert _cache_is_clean(zoo_home)


def test_kill_9_during_a_pull_then_pull_again(fault_env, zoo_home: Path) -> None:  # noqa: ANN001
    fault_env.slow("server.zip", delay_s=0.05, chunk_size=16384)
    proc = subprocess.Popen([sys.executable, "-m", "zoo.cli", "pull", VARIANT, "--role", "server"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    assert fault_env.wait_for_bytes("server.zip", 200_000, timeout=60)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (_cached(VARIANT) / "server.zip").exists()  # nothing written straight there
    with pytest.raises(OfflineError, match="server.zip"):  # nothing counts as cached
        zoo.pull(VARIANT, role="server", offline=True)
    fault_env.clear_faults()
    result = zoo.pull(VARIANT, role="server")
    assert "server.zip" in result.downloaded
    assert _cache_is_clean(zoo_home)
