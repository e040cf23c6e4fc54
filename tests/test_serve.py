"""`zoo serve` + `zoo predict --server`: a real server process, real HTTP, real FHE on CIFAR-10.

One smoke build of cifar10-split-tiny is published to a local hub, and a `zoo serve` process
with its own ZOO_HOME (a copy of that hub, nothing else: the "server machine") serves it for
the whole module. The client side uses another ZOO_HOME. Those two homes and the registry are
module-scoped versions of the ``zoo_home`` / ``registry_file`` fixtures of conftest.py (those
are per test; one server per test would cost a build and a keygen each). One image runs in real
FHE (about 1-2 minutes here); every other request is refused before any FHE runs, or aborts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import requests
from click.testing import CliRunner

import zoo
from zoo.build import run as builder
from zoo.build.data import load_cifar10
from zoo.catalog import manifest
from zoo.catalog.registry import Build
from zoo.cli import main
from zoo.errors import InputError, KeyIdError, ServerError, ZooError
from zoo.fhe import runtime, serve
from zoo.fhe.keystore import KeyStore
from zoo.fhe.remote import REVISION_HEADER, RemoteServer

TINY = "cifar10-split-tiny"
ROOT = Path(__file__).resolve().parent.parent
MAX_KEY_BYTES = 300_000_000  # the tiny build's evaluation keys take about 255 MiB


@dataclasses.dataclass
class Served:
    """The module's server and the two sides' homes."""

    url: str
    build: Build
    root: Path
    client_home: Path
    server_home: Path
    log: Path

    @property
    def key_store(self) -> Path:
        """The key store of the token-less client (the only one of this server)."""
        return self.server_home / "server-keys" / TINY / self.build.revision / "local"

    def stored(self) -> list[Path]:
        return sorted(p for p in self.key_store.iterdir() if p.is_file())


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_for_health(url: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"zoo serve exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if requests.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except (requests.ConnectionError, requests.Timeout):  # refused, or queued while loading
            pass
        time.sleep(0.5)
    pytest.fail(f"zoo serve did not answer /health in 180 s:\n{log.read_text()[-3000:]}")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the server's process group (server + FHE worker), SIGKILL if it lingers."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, cifar_dir: Path) -> Iterator[Served]:
    """Build + publish the tiny variant, then run `zoo serve` on it for the module."""
    root = tmp_path_factory.mktemp("serve")
    client_home, server_home = root / "client-home", root / "server-home"
    registry = root / "registry.json"
    document = json.loads((ROOT / "registry.json").read_text())
    for variant in document["variants"].values():
        variant["builds"] = []
    registry.write_text(json.dumps(document))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ZOO_HOME", str(client_home))
        patch.setenv("ZOO_REGISTRY", str(registry))
        patch.delenv("ZOO_OFFLINE", raising=False)
        out = builder.build(TINY, profile="smoke", data_dir=cifar_dir, out_dir=root / "build")
        build = zoo.publish(out, "local")
        shutil.copytree(client_home / "hub", server_home / "hub")  # the server's own machine
        with _server(server_home, root / "server.log") as (url, _):
            yield Served(url, build, root, client_home, server_home, root / "server.log")


@contextlib.contextmanager
def _server(home: Path, log: Path, *args: str) -> Iterator[tuple[str, subprocess.Popen]]:
    """A `zoo serve` process of the tiny build (from the hub of ``home``): its URL and process."""
    url = f"http://127.0.0.1:{_free_port()}"
    command = [sys.executable, "-m", "zoo.cli", "serve", TINY, "--port", url.rsplit(":", 1)[1],
               "--max-key-bytes", str(MAX_KEY_BYTES), *args]  # fmt: skip
    with log.open("wb") as sink:
        (home / "tmp").mkdir(exist_ok=True)
        env = {**os.environ, "ZOO_HOME": str(home), "TMPDIR": str(home / "tmp")}
        env.pop("ZOO_SERVE_TOKEN", None)
        proc = subprocess.Popen(
            command, env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        _wait_for_health(url, proc, log)
        yield url, proc
    finally:
        _stop(proc)
    leftovers = list((home / "tmp").iterdir())
    assert not leftovers, f"zoo serve left {leftovers} in its TMPDIR"


@pytest.fixture(scope="module")
def client(served: Served) -> runtime.Model:
    """The client side of the build, loaded in this process (keys under the client's home)."""
    return runtime.load(TINY, role="client", server_url=served.url)


def _key_id(client: runtime.Model) -> str:
    """Upload the client's evaluation keys (skipped if the server has them): their key id."""
    return client.server.upload_keys(client.client.get_serialized_evaluation_keys())


def test_predict_over_the_network_agrees_with_local_simulation(
    served: Served, cifar_dir: Path, tmp_path: Path
) -> None:
    from PIL import Image

    images, _ = load_cifar10(cifar_dir, "test")
    png = tmp_path / "test-0.png"
    Image.fromarray(images[0]).save(png)
    command = [sys.executable, "-m", "zoo.cli", "predict", TINY, str(png), "--server", served.url,
               "--fhe", "execute", "--json"]  # fmt: skip
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    remote = json.loads(done.stdout)
    print(f"zoo predict --server: {time.perf_counter() - started:.1f} s")  # shown with -s

    local = runtime.load(TINY).predict(png, fhe="simulate")  # server.zip here, on the client
    assert remote[0]["image"] == str(png)
    assert remote[0]["labels"][0] == local[0].labels[0]
    assert remote[0]["names"][0] == runtime.CIFAR10_CLASSES[local[0].labels[0]]
    assert "POST /run" in served.log.read_text()
    assert not (served.server_home / "keys").exists()  # no client keys on the server machine


def test_server_holds_only_the_evaluation_keys(served: Served, client: runtime.Model) -> None:
    key_id = _key_id(client)
    stored = served.stored()
    assert [p.name for p in stored] == [key_id]
    data = stored[0].read_bytes()
    assert hashlib.sha256(data).hexdigest() == key_id
    assert data == client.client.get_serialized_evaluation_keys()
    assert oct(stored[0].stat().st_mode & 0o777) == "0o600"
    for folder in (served.server_home / "server-keys", served.key_store.parent, served.key_store):
        assert oct(folder.stat().st_mode & 0o777) == "0o700"
    # The client's secret keys (concrete writes them as secretKey_N) appear nowhere on the server.
    secrets = list((served.client_home / "keys").rglob("secretKey*"))
    assert secrets
    server_files = [
        p for p in served.server_home.rglob("*") if p.is_file() and "hub" not in p.parts
    ]
    for secret in secrets:
        needle = secret.read_bytes()[-4096:]
        assert not any(needle in p.read_bytes() for p in server_files), secret.name


def test_bad_requests_get_4xx_and_the_server_lives_on(
    served: Served, client: runtime.Model, cifar_dir: Path
) -> None:
    url, revision = served.url, served.build.revision
    key_id = _key_id(client)
    pulled = runtime.load(TINY, role="server", circuits=False)
    least = serve.min_key_bytes(pulled.path / "server.zip")
    good = {REVISION_HEADER: revision}

    def check(response: requests.Response, status: int, words: str) -> None:
        assert response.status_code == status, response.text
        assert words in response.json()["detail"], response.text
        assert requests.get(f"{url}/health", timeout=10).json()["status"] == "ok"

    run = f"{url}/run"
    check(requests.post(run, params={"key_id": "ab" * 32}, data=b"x", headers=good), 404,
          "no evaluation keys")  # fmt: skip
    check(requests.post(run, params={"key_id": key_id}, data=b"garbage", headers=good), 400,
          "not an encrypted input of this build")  # fmt: skip
    check(requests.post(run, params={"key_id": key_id}, data=b"x", headers={REVISION_HEADER: "0"}),
          409, f"this server runs {TINY}@{revision}")  # fmt: skip
    check(requests.post(run, params={"key_id": key_id}, data=b"x"), 400, "missing X-Zoo-Revision")
    check(requests.post(run, params={"key_id": "../../x"}, data=b"x", headers=good), 400,
          "malformed key id")  # fmt: skip
    check(requests.get(f"{url}/keys/{'A' * 64}"), 400, "malformed key id")
    assert requests.get(f"{url}/keys/..%2F..%2Fetc%2Fpasswd").status_code == 404
    assert requests.head(f"{url}/keys/{key_id}").status_code == 200

    keys = f"{url}/keys"
    check(requests.post(keys, data=b"garbage", headers=good), 400, "are not evaluation keys")
    big_garbage = np.random.default_rng(0).bytes(least + 1000)  # passes the size bound
    check(requests.post(keys, data=big_garbage, headers=good), 400, "not evaluation keys (")
    del big_garbage
    check(requests.post(keys, data=bytes(MAX_KEY_BYTES + 1), headers=good), 413,
          "over this server's limit")  # fmt: skip
    check(requests.post(keys, data=b"x", headers={REVISION_HEADER: "f" * 64}), 409,
          "this server runs")  # fmt: skip
    assert [p.name for p in served.stored()] == [key_id]  # nothing refused was kept
    assert not any((served.key_store / ".incoming").iterdir())

    # Keys of another circuit, put in the store behind the upload check's back: concrete
    # aborts on them; the server answers 400 and restarts its FHE worker.
    from concrete import fhe

    @fhe.compiler({"x": "encrypted"})
    def plus_one(x: np.ndarray) -> np.ndarray:
        return x + 1

    circuit = plus_one.compile([np.array([i, i]) for i in range(4)])
    circuit.keygen()
    other = circuit.keys.evaluation.serialize()
    other_id = hashlib.sha256(other).hexdigest()
    (served.key_store / other_id).write_bytes(other)
    images, _ = load_cifar10(cifar_dir, "test")
    ciphertext = client.client.quantize_encrypt_serialize(client.head(images[:1]))
    check(requests.post(run, params={"key_id": other_id}, data=ciphertext, headers=good), 400,
          "the FHE circuit aborted")  # fmt: skip
    assert not (served.key_store / other_id).exists()  # not kept to abort it again
    check(requests.post(run, params={"key_id": other_id}, data=ciphertext, headers=good), 404,
          "upload them with POST /keys")  # fmt: skip
    check(
        requests.post(run, params={"key_id": key_id}, data=b"garbage", headers=good),
        400,
        "not an encrypted input",
    )  # fmt: skip  (answered by a fresh worker)
    # What concrete unpacked for the crashed worker is gone; the server keeps no circuit folder.
    scratch = [p.name for p in (served.server_home / "tmp").iterdir()]
    assert len(scratch) == 1 and scratch[0].startswith("zoo-worker-"), scratch


def test_client_refuses_another_build_and_unreachable_servers(
    served: Served, client: runtime.Model, cifar_dir: Path
) -> None:
    other = dataclasses.replace(served.build, revision="0" * 64)
    with pytest.raises(ServerError, match=f"serves {TINY}@{served.build.revision[:12]}") as info:
        RemoteServer(served.url, other).run(b"x", b"y")
    assert served.build.revision in info.value.hint
    with pytest.raises(ServerError, match="cannot reach the zoo server") as info:
        RemoteServer(f"http://127.0.0.1:{_free_port()}", served.build).health()
    assert "zoo serve" in info.value.hint
    with serve._listen("127.0.0.1", 0) as loading:  # a server that is still loading its build
        url = f"http://127.0.0.1:{loading.getsockname()[1]}"
        with pytest.raises(ServerError, match="took the connection but did not answer") as info:
            RemoteServer(url, served.build, timeout=1).health()
    assert "still be loading" in info.value.hint
    images, _ = load_cifar10(cifar_dir, "test")
    with pytest.raises(InputError, match="needs this build's server.zip"):  # not a raw zip error
        client.logits(images[:1], "simulate")

    result = CliRunner().invoke(
        main,
        ["predict", TINY, str(ROOT / "README.md"), "--server", served.url, "--fhe", "simulate"],
    )
    assert result.exit_code == 2 and "--server runs real FHE" in result.output


def test_key_store_is_content_addressed_and_evicts_the_least_recently_used(
    tmp_path: Path,
) -> None:
    store = KeyStore(tmp_path / "store", max_keys=2)
    ids = []
    for body in (b"first", b"second", b"third"):
        incoming = store.begin()
        incoming.write(body)
        ids.append(store.commit(incoming))
        assert ids[-1] == hashlib.sha256(body).hexdigest()
        if len(ids) == 2:
            assert store.get(ids[0]) is not None  # used: "second" is now the oldest
    assert store.key_ids() == [ids[0], ids[2]]
    assert store.get(ids[1]) is None
    assert (tmp_path / "store" / ids[2]).read_bytes() == b"third"
    assert oct((tmp_path / "store" / ids[2]).stat().st_mode & 0o777) == "0o600"
    assert oct((tmp_path / "store").stat().st_mode & 0o777) == "0o700"
    for bad in ("../" + "a" * 61, "A" * 64, "a" * 63, ""):
        with pytest.raises(KeyIdError, match="malformed key id"):
            store.get(bad)
    refused = store.begin()
    refused.write(b"garbage")
    store.discard(refused)
    assert not any(store.incoming.iterdir())


# --- access control and bounds (issue #20) --------------------------------------------------

TOKENS = ("alice-" + "a" * 26, "bob-" + "b" * 28)


@pytest.fixture(scope="module")
def guarded(served: Served) -> Iterator[str]:
    """A second server of the same build with two tokens, one key per client, one slot."""
    home = served.root / "guarded-home"
    shutil.copytree(served.server_home / "hub", home / "hub")
    tokens = served.root / "tokens.txt"
    tokens.write_text("# one per client\n" + "\n".join(TOKENS) + "\n")
    with _server(home, served.root / "guarded.log", "--token-file", str(tokens),
                 "--max-keys", "1", "--max-concurrent", "1") as (url, _):  # fmt: skip
        yield url


def _remote(url: str, build: Build, token: str | None) -> RemoteServer:
    return RemoteServer(url, build, token=token)


def test_tokens_are_required_and_each_client_has_its_own_keys(
    guarded: str, served: Served, client: runtime.Model
) -> None:
    keys = client.client.get_serialized_evaluation_keys()
    assert requests.get(f"{guarded}/health", timeout=10).status_code == 200
    for page in ("/docs", "/redoc", "/openapi.json"):  # FastAPI's own pages: not served
        assert requests.get(guarded + page, timeout=10).status_code == 404
    for method, path in (("GET", "/info"), ("POST", "/keys"), ("POST", "/run?key_id=" + "a" * 64),
                         ("HEAD", "/keys/" + "a" * 64)):  # fmt: skip
        for auth in ({}, {"Authorization": "Bearer " + "x" * 32}, {"Authorization": TOKENS[0]}):
            headers = {REVISION_HEADER: served.build.revision, **auth}
            response = requests.request(method, guarded + path, data=b"x", headers=headers,
                                        timeout=10)  # fmt: skip
            assert response.status_code == 401, (method, path, auth, response.text)
            assert response.headers["WWW-Authenticate"] == "Bearer"
    with pytest.raises(ServerError, match="401") as info:
        _remote(guarded, served.build, None).upload_keys(keys)
    assert "ZOO_SERVE_TOKEN" in info.value.hint

    def held(token: str, key_id: str) -> bool:
        auth = {"Authorization": f"Bearer {token}"}
        return requests.head(f"{guarded}/keys/{key_id}", headers=auth, timeout=10).ok

    alice, bob = (_remote(guarded, served.build, t) for t in TOKENS)
    key_id = alice.upload_keys(keys)
    assert not held(TOKENS[1], key_id)  # another client's store
    assert bob.upload_keys(keys) == key_id  # bob's own copy, in bob's store (max 1 key each)
    assert held(TOKENS[0], key_id) and held(TOKENS[1], key_id)  # bob evicted nothing of alice's


@contextlib.contextmanager
def _slot_taken(url: str, headers: dict[str, str]) -> Iterator[None]:
    """The guarded server's one slot held by an upload that stalls after its first chunk."""
    started, release = threading.Event(), threading.Event()

    def slow_body() -> Iterator[bytes]:
        yield b"x" * 1024
        started.set()
        release.wait(60)
        yield b"x" * 1024

    holder = threading.Thread(target=lambda: requests.post(
        f"{url}/keys", data=slow_body(), headers=headers, timeout=120))  # fmt: skip
    holder.start()
    try:
        assert started.wait(30)
        time.sleep(1)  # the server has the first chunk: the slot is taken
        yield
    finally:
        release.set()
        holder.join(120)


def test_one_slot_past_the_bound_is_a_503_with_retry_after(guarded: str, served: Served) -> None:
    headers = {REVISION_HEADER: served.build.revision, "Authorization": f"Bearer {TOKENS[0]}"}
    with _slot_taken(guarded, headers):
        busy = requests.post(f"{guarded}/keys", data=b"y" * 4096, headers=headers, timeout=30)
        assert busy.status_code == 503 and busy.headers["Retry-After"].isdigit()
        assert "busy" in busy.json()["detail"]


def _held_body_answer(url: str, headers: dict[str, str], declared: int) -> tuple[int, str]:
    """POST /keys with ``Expect: 100-continue`` and a declared size, sending no body: the status
    and detail of the server's answer (http.client skips a ``100 Continue`` and would then wait
    for a body that never comes: a timeout, not a pass)."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        conn.putrequest("POST", "/keys")
        for name, value in {**headers, "Content-Length": str(declared),
                            "Expect": "100-continue"}.items():  # fmt: skip
            conn.putheader(name, value)
        conn.endheaders()
        response = conn.getresponse()
        return response.status, json.loads(response.read())["detail"]
    finally:
        conn.close()


def test_a_client_that_holds_its_body_back_is_refused_before_sending_it(
    guarded: str, served: Served
) -> None:
    """With ``Expect: 100-continue`` (what curl sends for large bodies), a busy server's 503 and
    an over-limit 413 come before the body: gigabytes of keys are not uploaded to be dropped."""
    headers = {REVISION_HEADER: served.build.revision, "Authorization": f"Bearer {TOKENS[0]}"}
    status, detail = _held_body_answer(guarded, headers, MAX_KEY_BYTES + 1)
    assert status == 413 and "over this server's limit" in detail
    with _slot_taken(guarded, headers):
        status, detail = _held_body_answer(guarded, headers, 200 << 20)
        assert status == 503 and "busy" in detail


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def test_memory_stays_bounded_under_eight_concurrent_uploads(
    served: Served, client: runtime.Model, tmp_path: Path
) -> None:
    """8 clients send 32 MiB bodies to /run at once: with two slots and bodies streamed to
    files, the server's resident memory grows by a few bodies, not eight of them twice."""
    home = tmp_path / "home"
    shutil.copytree(served.server_home / "hub", home / "hub")
    with _server(home, tmp_path / "log", "--max-concurrent", "2") as (url, proc):
        remote = RemoteServer(url, served.build)
        key_id = remote.upload_keys(client.client.get_serialized_evaluation_keys())
        body = np.random.default_rng(1).bytes(32 << 20)
        baseline, peak, done = _rss_kib(proc.pid), [0], threading.Event()

        def sample() -> None:
            while not done.is_set():
                peak[0] = max(peak[0], _rss_kib(proc.pid))
                time.sleep(0.02)

        def post() -> int:
            return requests.post(f"{url}/run", params={"key_id": key_id}, data=body,
                                 headers={REVISION_HEADER: served.build.revision},
                                 timeout=300).status_code  # fmt: skip

        sampler = threading.Thread(target=sample)
        sampler.start()
        codes: list[int] = []
        threads = [threading.Thread(target=lambda: codes.append(post())) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(300)
        done.set()
        sampler.join()
    grown_mib = (peak[0] - baseline) / 1024
    print(f"8 concurrent 32 MiB /run bodies: server RSS +{grown_mib:.0f} MiB, codes {codes}")
    assert set(codes) <= {400, 503} and 503 in codes
    assert grown_mib < 4 * 32, f"resident memory grew by {grown_mib:.0f} MiB"


def test_a_worker_that_cannot_start_is_its_error_not_uvicorns_exit(
    served: Served, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A server.zip that passes the gate and its pins but holds a circuit concrete cannot
    parse: the real child fails to load it, and serve says so (not uvicorn's SystemExit(3))."""
    broken = tmp_path / "build"
    shutil.copytree(served.root / "build", broken, ignore=shutil.ignore_patterns("work"))
    with zipfile.ZipFile(served.root / "build" / "server.zip") as source, \
            zipfile.ZipFile(broken / "server.zip", "w") as target:  # fmt: skip
        for item in source.infolist():
            mlir = item.filename == "circuit.mlir"
            target.writestr(item, b"this is not MLIR" if mlir else source.read(item))
    manifest.write(broken, manifest.read(broken))  # pinned as it now is
    registry = tmp_path / "registry.json"
    shutil.copy(served.root / "registry.json", registry)
    monkeypatch.setenv("ZOO_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("ZOO_REGISTRY", str(registry))
    build = zoo.publish(broken, "local")
    with pytest.raises(ZooError, match=f"FHE worker could not load {TINY}@{build.revision[:7]}"):
        serve.serve(f"{TINY}@{build.revision}", port=0, log_level="critical")


def test_a_key_limit_below_the_builds_keys_is_refused_at_start(
    served: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ZOO_HOME", str(served.server_home))
    monkeypatch.setenv("ZOO_REGISTRY", str(served.root / "registry.json"))
    with pytest.raises(InputError, match="refuses every upload") as info:  # not 413s at run time
        serve.create_app(TINY, max_key_bytes=1_000, key_store=served.root / "small-keys")
    assert "--max-key-bytes" in info.value.hint
