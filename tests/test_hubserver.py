"""The local Hub servers of tests/hubserver.py, exercised with raw huggingface_hub calls only."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx2
import pytest
from hubserver import FaultHub, HubServer
from huggingface_hub import (
    CommitOperationAdd,
    CommitOperationDelete,
    HfApi,
    hf_hub_download,
    snapshot_download,
)
from huggingface_hub.errors import (
    BadRequestError,
    EntryNotFoundError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

REPO = "zoo-test/roundtrip"
FILES: dict[str, bytes] = {
    "weights/model.bin": os.urandom(2_000_000),
    "config.json": json.dumps({"variant": "tiny", "classes": 10}).encode(),
    "notes.txt": b"trained for the hub server test\n",
}


def _tree_bytes(folder: str | Path) -> dict[str, bytes]:
    base = Path(folder)
    return {p.relative_to(base).as_posix(): p.read_bytes() for p in base.rglob("*") if p.is_file()}


def _publish(hub: HubServer, files: dict[str, bytes] = FILES) -> str:
    api = HfApi(endpoint=hub.endpoint, token=hub.token)
    api.create_repo(REPO)
    api.create_repo(REPO, exist_ok=True)
    ops = [CommitOperationAdd(path, data) for path, data in files.items()]
    return api.create_commit(REPO, ops, commit_message="publish").oid


# --------------------------------------------------------------------------------------------
# olah (reads) + publish/proxy server
# --------------------------------------------------------------------------------------------


def test_publish_then_pull_same_bytes(hf_hub: HubServer, tmp_path: Path) -> None:
    """create_repo + create_commit through B; snapshot/file downloads via B and olah agree."""
    sha = _publish(hf_hub)
    api = HfApi(endpoint=hf_hub.endpoint, token=hf_hub.token)
    assert len(sha) == 40
    assert api.list_repo_refs(REPO).branches[0].target_commit == sha
    info = api.model_info(REPO, revision=sha)
    assert info.sha == sha
    assert {s.rfilename for s in info.siblings or []} == {".gitattributes", *FILES}
    assert api.model_info(REPO).sha == sha  # no revision: served as .../revision/main

    snap = snapshot_download(
        REPO, revision=sha, endpoint=hf_hub.endpoint, token=hf_hub.token, cache_dir=tmp_path / "c1"
    )
    assert Path(snap).name == sha
    got = _tree_bytes(snap)
    got.pop(".gitattributes")
    assert got == FILES

    for endpoint in (hf_hub.endpoint, hf_hub.olah_endpoint):
        for path, data in FILES.items():
            local = hf_hub_download(
                REPO,
                path,
                revision="main",
                endpoint=endpoint,
                token=hf_hub.token,
                cache_dir=tmp_path / f"c-{endpoint.rsplit(':', 1)[1]}",
            )
            assert Path(local).read_bytes() == data
            assert sha in Path(local).parts

    # A pinned pull that is already cached makes no request at all.
    hf_hub.clear_requests()
    again = snapshot_download(
        REPO, revision=sha, endpoint=hf_hub.endpoint, token=hf_hub.token, cache_dir=tmp_path / "c1"
    )
    assert again == snap
    assert hf_hub.requests == []


def test_stale_parent_commit_is_rejected(hf_hub: HubServer) -> None:
    """A commit whose parent is not the head fails with 412; of racing commits exactly one wins."""
    first = _publish(hf_hub)
    api = HfApi(endpoint=hf_hub.endpoint, token=hf_hub.token)
    second = api.create_commit(
        REPO,
        [CommitOperationAdd("notes.txt", b"v2\n"), CommitOperationDelete("config.json")],
        commit_message="update",
        parent_commit=first,
    ).oid
    with pytest.raises(HfHubHTTPError) as err:
        api.create_commit(
            REPO,
            [CommitOperationAdd("notes.txt", b"v3\n")],
            commit_message="stale",
            parent_commit=first,
        )
    assert err.value.response.status_code == 412
    assert hf_hub.head(REPO) == second
    commits = api.list_repo_commits(REPO)
    assert [c.title for c in commits] == ["update", "publish", "initial commit"]

    def attempt(i: int) -> str | int:
        try:
            op = CommitOperationAdd(f"race/{i}.txt", b"%d\n" % i)
            info = api.create_commit(REPO, [op], commit_message=f"r{i}", parent_commit=second)
            return info.oid
        except HfHubHTTPError as exc:
            return exc.response.status_code

    with ThreadPoolExecutor(4) as pool:
        outcomes = list(pool.map(attempt, range(4)))
    winners = [o for o in outcomes if isinstance(o, str)]
    assert len(winners) == 1 and sorted(o for o in outcomes if isinstance(o, int)) == [412] * 3
    assert hf_hub.head(REPO) == winners[0]


def test_misses_refs_and_rejections_answer_like_the_hub(hf_hub: HubServer, tmp_path: Path) -> None:
    """Missing file/revision/repo raise the specific errors at once; tags resolve; bad input 400."""
    sha = _publish(hf_hub)
    api = HfApi(endpoint=hf_hub.endpoint, token=hf_hub.token)
    kwargs: dict[str, Any] = {
        "endpoint": hf_hub.endpoint,
        "token": hf_hub.token,
        "cache_dir": tmp_path / "c",
    }
    hf_hub.clear_requests()
    with pytest.raises(RemoteEntryNotFoundError):
        hf_hub_download(REPO, "absent.bin", revision=sha, **kwargs)
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(REPO, "notes.txt", revision="0" * 40, **kwargs)
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(REPO, "notes.txt", revision="no-such-branch", **kwargs)
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("zoo-test/absent", "notes.txt", **kwargs)
    assert len(hf_hub.requests) == 4  # one answer each (404, 404, 404, 401), no retries

    api.create_tag(REPO, tag="v1", revision=sha)
    api.create_branch(REPO, branch="dev", revision="v1")
    refs = api.list_repo_refs(REPO)
    assert {t.name: t.target_commit for t in refs.tags} == {"v1": sha}
    local = hf_hub_download(REPO, "notes.txt", revision="v1", **kwargs)
    assert Path(local).read_bytes() == FILES["notes.txt"]

    with pytest.raises(BadRequestError, match="not UTF-8"):
        api.create_commit(
            REPO, [CommitOperationAdd("tiny.bin", bytes(range(256))[:130])], commit_message="x"
        )


# --------------------------------------------------------------------------------------------
# Fault-injection server
# --------------------------------------------------------------------------------------------

BIG = os.urandom(1_000_000)
FAULT_FILES = {"big.bin": BIG, "config.json": b'{"a": 1}', "dir/small.txt": b"small\n"}


def _get(hub: FaultHub, path: str, cache: Path, **kwargs: Any) -> bytes:
    local = hf_hub_download(
        hub.repo_id,
        path,
        revision=hub.revision,
        endpoint=hub.endpoint,
        token=hub.token,
        cache_dir=cache,
        **kwargs,
    )
    return Path(local).read_bytes()


def test_fault_hub_serves_snapshots_and_404s(
    fault_hub_factory: Callable[..., FaultHub], tmp_path: Path
) -> None:
    """Clean snapshot; missing and injected 404 both raise EntryNotFoundError quickly."""
    hub = fault_hub_factory(FAULT_FILES, lfs_threshold=500_000)
    snap = snapshot_download(
        hub.repo_id,
        revision=hub.revision,
        endpoint=hub.endpoint,
        token=hub.token,
        cache_dir=tmp_path / "snap",
    )
    assert _tree_bytes(snap) == FAULT_FILES
    blobs = {p.name for p in (Path(snap).parents[1] / "blobs").iterdir()}
    assert hashlib.sha256(BIG).hexdigest() in blobs  # presented as LFS: blob named by sha256

    hub.clear_requests()
    with pytest.raises(RemoteEntryNotFoundError):
        _get(hub, "absent.txt", tmp_path / "c1")
    hub.fail("config.json", 404)
    with pytest.raises(EntryNotFoundError):
        _get(hub, "config.json", tmp_path / "c2")
    assert [r.status for r in hub.requests] == [404, 404]  # one answer each, no retries


def test_fault_hub_500_retries_are_bounded(
    fault_hub_factory: Callable[..., FaultHub], tmp_path: Path
) -> None:
    """A persistent 500 raises after the client's bounded retries; a transient one recovers."""
    hub = fault_hub_factory(FAULT_FILES)
    hub.fail("config.json", 500)
    with pytest.raises(LocalEntryNotFoundError) as err:
        _get(hub, "config.json", tmp_path / "c1")
    assert isinstance(err.value.__cause__, HfHubHTTPError)
    assert err.value.__cause__.response.status_code == 500
    heads = [r for r in hub.requests if r.method == "HEAD"]
    assert 2 <= len(heads) <= 10 and all(r.status == 500 for r in heads)

    hub.clear_requests()
    hub.fail("config.json", 500, times=2)
    assert _get(hub, "config.json", tmp_path / "c2") == FAULT_FILES["config.json"]
    assert [r.status for r in hub.requests if r.method == "HEAD"] == [500, 500, 200]


def test_fault_hub_truncation_and_corruption(
    fault_hub_factory: Callable[..., FaultHub], tmp_path: Path
) -> None:
    """Short bodies are retried then raise; one short body is recovered; corrupt bytes differ."""
    hub = fault_hub_factory(FAULT_FILES)
    hub.truncate("big.bin", 300_000)
    with pytest.raises(httpx2.RemoteProtocolError):
        _get(hub, "big.bin", tmp_path / "c1")
    assert not list((tmp_path / "c1").rglob("snapshots/*/big.bin"))

    hub.truncate("big.bin", 300_000, times=1)
    assert _get(hub, "big.bin", tmp_path / "c2") == BIG
    assert [r.method for r in hub.requests].count("GET") >= 2

    hub.corrupt("config.json", times=1)
    served = _get(hub, "config.json", tmp_path / "c3")
    assert len(served) == len(FAULT_FILES["config.json"]) and served != FAULT_FILES["config.json"]
    assert _get(hub, "config.json", tmp_path / "c3", force_download=True) == b'{"a": 1}'


def test_fault_hub_slow_download_survives_client_kill(
    fault_hub_factory: Callable[..., FaultHub], tmp_path: Path
) -> None:
    """A client killed (-9) mid-download leaves no complete file; the next pull is whole."""
    hub = fault_hub_factory(FAULT_FILES)
    hub.slow("big.bin", 0.02, chunk_size=20_000)
    cache = tmp_path / "cache"
    script = Path(__file__).with_name("hubserver.py")
    client = subprocess.Popen(
        [sys.executable, str(script), "download", hub.endpoint, hub.repo_id, hub.revision]
        + ["big.bin", str(cache)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert hub.wait_for_bytes("big.bin", 100_000, timeout=30)
    finally:
        client.kill()
        client.wait(10)
    assert hub.bytes_sent("big.bin") < len(BIG)
    assert not list(cache.rglob("snapshots/*/big.bin"))

    hub.clear_faults()
    assert _get(hub, "big.bin", cache) == BIG
