"""`zoo serve`: a build's server side over HTTP (FastAPI + uvicorn).

    zoo serve cifar10-split-tiny --port 8000          # then: zoo predict ... --server URL

The server loads only ``server.zip`` (``runtime.load(ref, role="server")``) and receives only
evaluation keys and ciphertexts: it never sees a secret key, an image or a result in the clear.

| endpoint | what |
|---|---|
| ``GET /health`` | ``{"status": "ok", "variant", "revision"}`` |
| ``GET /info`` | the build's manifest, its variant and revision, and the server's limits |
| ``POST /keys`` | body: serialized evaluation keys; returns ``{"key_id"}`` (their sha256) |
| ``GET/HEAD /keys/{key_id}`` | 200 if the server holds those keys, else 404 |
| ``POST /run?key_id=`` | body: a serialized encrypted input; returns the encrypted result |

``POST`` requests carry ``X-Zoo-Revision: <full revision>`` (409 if it is not the served build).
Errors are JSON ``{"detail": "what went wrong: what to do"}`` with a 4xx status for bad requests.
The circuit runs in a child process (:mod:`zoo.fhe.worker`), one request at a time.

Access: with tokens (``--token-file``, one per line, and/or ``$ZOO_SERVE_TOKEN``) every endpoint
but ``/health`` needs ``Authorization: Bearer TOKEN`` (401 otherwise; compared in constant
time), and each token has its own key store and quota of ``max_keys``, so one client cannot
evict another's keys. Without tokens the server binds loopback addresses only. Uploads and runs
are bounded (``max_concurrent`` at once, 503 with ``Retry-After`` past it; a 503 or 413 comes
before the body to a client that sends ``Expect: 100-continue``); key uploads are streamed to
files, and an encrypted input is held in memory only by the requests in a slot (at most
``max_concurrent`` × ``max_input_bytes``). TLS: put it in front
(uvicorn's ``--ssl-keyfile``/``--ssl-certfile`` through ``serve(..., ssl_*)``, or a reverse
proxy).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import ipaddress
import os
import socket
import ssl
import tempfile
import zipfile
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, HTTPException, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from zoo import config
from zoo.errors import InputError, KeyIdError, ServerError, ZooError
from zoo.fhe.keystore import KeyStore, make_private
from zoo.fhe.remote import TOKEN_ENV
from zoo.fhe.worker import FheWorker, WorkerCrashed, WorkerRefused, describe_exit
from zoo.store.gate import check_zip

REVISION_HEADER = "X-Zoo-Revision"
SECONDS_HEADER = "X-Zoo-Seconds"
DEFAULT_MAX_KEY_BYTES = 4 << 30  # cifar10-split-tiny: 255 MiB serialized
DEFAULT_MAX_KEYS = 8
DEFAULT_MAX_INPUT_BYTES = 256 << 20  # cifar10-split-tiny: 75 KiB per image
DRAIN_BYTES = 64 << 20  # read this much past a limit so the client gets the 413, not a reset
DEFAULT_MAX_CONCURRENT = 2  # uploads and runs at once: one circuit runs, one request waits
RETRY_AFTER_SECONDS = 30
MIN_TOKEN_CHARS = 16


def load_tokens(token_file: Path | None = None) -> list[str]:
    """The bearer tokens: lines of ``token_file`` (``#`` comments and blank lines skipped) and
    ``$ZOO_SERVE_TOKEN``; each at least 16 characters."""
    lines = Path(token_file).read_text().splitlines() if token_file else []
    tokens = [t.strip() for t in lines if t.strip() and not t.lstrip().startswith("#")]
    if os.environ.get(TOKEN_ENV, "").strip():
        tokens.append(os.environ[TOKEN_ENV].strip())
    short = [i + 1 for i, t in enumerate(tokens) if len(t) < MIN_TOKEN_CHARS]
    if short:
        raise InputError(
            f"token(s) {short} are shorter than {MIN_TOKEN_CHARS} characters",
            hint="make them with `python -c 'import secrets; print(secrets.token_urlsafe(32))'`",
        )
    return tokens


def is_loopback(host: str) -> bool:
    """Whether ``host`` is a loopback address (or ``localhost``)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_exposure(host: str, tokens: list[str]) -> None:
    """Refuse to serve on a non-loopback address without tokens."""
    if tokens or is_loopback(host):
        return
    raise InputError(
        f"refusing to serve on {host} without a token: anyone who reaches it could upload keys "
        "and run circuits",
        hint=f"pass --token-file FILE (or set {TOKEN_ENV}), or bind 127.0.0.1",
    )


def min_key_bytes(server_zip: Path) -> int:
    """A lower bound on the serialized evaluation keys of the circuit in ``server_zip`` (which
    passed :func:`~zoo.store.gate.check_zip`), read from its client specs: nothing compiled.

    Every encoding of a bootstrap key stores at least the body polynomial of each of its GLWE
    ciphertexts, 64-bit coefficients: keys smaller than that are another circuit's, which
    concrete would not notice before it aborts.
    """
    from concrete import fhe

    with zipfile.ZipFile(server_zip) as archive:
        specs = fhe.ClientSpecs.deserialize(archive.read("client.specs.json"))
    info = specs.program_info.get_keyset_info()
    return sum(
        k.input_lwe_dimension() * k.level() * (k.glwe_dimension() + 1) * k.polynomial_size() * 8
        for k in info.bootstrap_keys()
    )


def default_key_store(variant: str, revision: str) -> Path:
    """``$ZOO_HOME/server-keys/VARIANT/REVISION``, created 0700."""
    root = config.server_keys_dir()
    return make_private(root / variant / revision, root, root / variant)


def _holds_body(request: Request) -> bool:
    """Whether the client sent ``Expect: 100-continue``: it sends its body only once the server
    starts reading it (uvicorn answers ``100 Continue`` then), so a refusal needs no drain."""
    return request.headers.get("expect", "").lower() == "100-continue"


async def _receive(
    request: Request, limit: int, sink: Callable[[bytes], Any], what: str, hint: str
) -> int:
    """Feed the request body to ``sink`` chunk by chunk; 413 past ``limit`` bytes."""
    declared = request.headers.get("content-length", "")
    size = int(declared) if declared.isdigit() else 0
    over = size > limit
    if size <= limit + DRAIN_BYTES and not (over and _holds_body(request)):
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            over = over or size > limit
            if size > limit + DRAIN_BYTES:
                break
            if not over:
                sink(chunk)
    if over:
        raise HTTPException(413, f"{what}: {size:,} bytes is over this server's limit of "
                                 f"{limit:,} bytes: {hint}")  # fmt: skip
    return size


def _worker_call(function: Callable[..., Any], *args: Any, stored: Path | None = None) -> Any:
    """Call the FHE worker; its refusals and crashes become HTTP errors. Stored keys
    (``stored``) that the worker cannot read, or that the circuit aborts on, are removed, so
    that the client uploads them again instead of failing (or crashing the worker) again."""
    forgot = ""
    try:
        return function(*args)
    except WorkerRefused as exc:
        if exc.status == "missing_keys":
            raise HTTPException(404, f"{exc}: upload them again (POST /keys)") from None
        if exc.status in ("bad_keys", "bad_input"):
            if exc.status == "bad_keys" and stored is not None:
                stored.unlink(missing_ok=True)
                forgot = " (the stored keys were removed)"
            hint = ("send what FHEModelClient.get_serialized_evaluation_keys() returns"
                    if exc.status == "bad_keys" else
                    "send what FHEModelClient.quantize_encrypt_serialize() returns, made with "
                    "the client of the build this server runs")  # fmt: skip
            raise HTTPException(400, f"{exc}{forgot}: {hint}") from None
        raise HTTPException(500, f"the FHE worker failed: {exc}; see the server's log") from None
    except WorkerCrashed as exc:
        if exc.aborted:
            if stored is not None:
                stored.unlink(missing_ok=True)
                forgot = "; the keys were removed: upload this build's keys again"
            raise HTTPException(400, f"the FHE circuit aborted on this request "
                                     f"({describe_exit(exc.returncode)}): the evaluation keys or "
                                     "the ciphertext were not made by this build's client; the "
                                     f"server restarted its worker{forgot}") from None  # fmt: skip
        raise HTTPException(500, f"{exc}; see the server's log") from None


def create_app(
    ref: str,
    *,
    registry_path: Path | None = None,
    key_store: Path | None = None,
    max_key_bytes: int = DEFAULT_MAX_KEY_BYTES,
    max_keys: int = DEFAULT_MAX_KEYS,
    max_input_bytes: int = DEFAULT_MAX_INPUT_BYTES,
    max_cached_keys: int = 2,
    tokens: list[str] | None = None,
    max_concurrent: int = DEFAULT_MAX_CONCURRENT,
) -> FastAPI:
    """The HTTP app that runs the circuit of build ``ref`` (VARIANT or VARIANT@REV).

    Pulls (through the verified cache) only the server side and passes it through the gate; the
    circuit is compiled once, in the worker. Evaluation keys
    are kept in ``key_store`` (default ``$ZOO_HOME/server-keys/VARIANT/REVISION``), at most
    ``max_keys`` of at most ``max_key_bytes`` each; the worker keeps ``max_cached_keys``
    deserialized in memory. With ``tokens``, each token is a client with a key store of its own
    (``key_store/<sha256 of the token, 16 hex>``); without, one client (``key_store/local``).
    """
    from zoo.fhe import runtime

    # the worker compiles the circuit; here, only what is pinned and what the gate lets through
    model = runtime.load(ref, role="server", registry_path=registry_path, circuits=False)
    server_zip = model.path / "server.zip"
    check_zip(server_zip)
    build = model.build
    if key_store is None:
        key_store = default_key_store(build.variant, build.revision)
    root = make_private(Path(key_store))
    clients = {hashlib.sha256(t.encode()).hexdigest()[:16]: t.encode() for t in tokens or []}
    stores: dict[str, KeyStore] = {}
    worker = FheWorker(build.ref, registry_path, max_cached_keys)
    least_key_bytes = min_key_bytes(server_zip)
    if max_key_bytes < least_key_bytes:
        raise InputError(
            f"a key limit of {max_key_bytes:,} bytes refuses every upload: {build.ref}'s "
            f"evaluation keys take at least {least_key_bytes:,} bytes",
            hint=f"give --max-key-bytes {least_key_bytes:,} or more, or leave it at its default",
        )
    slots = asyncio.Semaphore(max_concurrent)
    limits = {"max_key_bytes": max_key_bytes, "max_keys": max_keys,
              "max_input_bytes": max_input_bytes, "max_concurrent": max_concurrent,
              "tokens": len(clients)}  # fmt: skip

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        try:
            await run_in_threadpool(worker.start)
        except ZooError as exc:  # serve() raises it once uvicorn gives up
            app.state.startup_error = exc
            raise
        try:
            yield
        finally:
            worker.close()

    app = FastAPI(title=f"zoo serve {build.short_ref}", lifespan=lifespan,
                  docs_url=None, redoc_url=None, openapi_url=None)  # fmt: skip
    app.state.build, app.state.key_store, app.state.limits = build, root, limits

    def client_store(request: Request) -> KeyStore:
        """The key store of the request's client; 401 without a known bearer token."""
        client = "local"
        if clients:
            scheme, _, sent = request.headers.get("authorization", "").partition(" ")
            given = sent.strip().encode() if scheme.lower() == "bearer" else b""
            matches = [c for c, token in clients.items() if hmac.compare_digest(given, token)]
            if not matches:
                raise HTTPException(
                    401, "missing or unknown bearer token: send Authorization: Bearer TOKEN "
                    f"(zoo predict reads it from {TOKEN_ENV})",
                    headers={"WWW-Authenticate": "Bearer"},
                )  # fmt: skip
            client = matches[0]
        if client not in stores:
            stores[client] = KeyStore(make_private(root / client, root), max_keys)
        return stores[client]

    @asynccontextmanager
    async def slot(request: Request) -> AsyncIterator[None]:
        """One of the ``max_concurrent`` upload/run slots, or a 503 at once (the body read and
        dropped first, so that the client gets the answer, not a reset, unless it holds the
        body back with ``Expect: 100-continue``)."""
        if slots.locked():
            if not _holds_body(request):
                seen = 0
                async for chunk in request.stream():
                    seen += len(chunk)
                    if seen > max(max_key_bytes, max_input_bytes) + DRAIN_BYTES:
                        break
            raise HTTPException(
                503, f"busy: {max_concurrent} uploads or runs are in progress; retry later",
                headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
            )  # fmt: skip
        async with slots:
            yield

    @app.exception_handler(KeyIdError)
    async def bad_key_id(request: Request, exc: KeyIdError) -> JSONResponse:
        return JSONResponse({"detail": f"{exc}: {exc.hint}"}, status_code=400)

    @app.exception_handler(Exception)
    async def failure(request: Request, exc: Exception) -> JSONResponse:
        detail = f"the server failed: {type(exc).__name__}: {exc}; see the server's log"
        return JSONResponse({"detail": detail}, status_code=500)

    def check_revision(request: Request) -> None:
        sent = request.headers.get(REVISION_HEADER)
        if not sent:
            raise HTTPException(
                400,
                f"missing {REVISION_HEADER} header: send the full revision "
                f"of the client's build; this server runs {build.ref}",
            )
        if sent != build.revision:
            raise HTTPException(
                409,
                f"this server runs {build.ref}, the request is for revision "
                f"{sent[:64]!r}: use the client of {build.ref} (zoo predict "
                f"{build.ref} ... --server URL) or serve the client's build",
            )

    @app.get("/health")
    def health() -> dict[str, Any]:
        return {"status": "ok", "variant": build.variant, "revision": build.revision}

    @app.get("/info")
    def info(request: Request) -> dict[str, Any]:
        client_store(request)
        return {**model.meta, "variant": build.variant, "revision": build.revision,
                "limits": limits}  # fmt: skip

    @app.post("/keys")
    async def upload_keys(request: Request) -> dict[str, Any]:
        store = client_store(request)
        check_revision(request)
        async with slot(request):
            return await _store_keys(request, store)

    async def _store_keys(request: Request, store: KeyStore) -> dict[str, Any]:
        incoming = store.begin()
        try:
            await _receive(request, max_key_bytes, incoming.write, "evaluation keys",
                           "start the server with a larger --max-key-bytes")  # fmt: skip
            incoming.close()
            key_id = incoming.key_id
            if store.get(key_id) is not None:  # the same bytes were checked before
                return {"key_id": key_id, "bytes": incoming.size, "new": False}
            if incoming.size < least_key_bytes:
                raise HTTPException(400, f"{incoming.size:,} bytes are not evaluation keys of "
                                         f"{build.ref}: its keys take at least "
                                         f"{least_key_bytes:,} bytes; send the keys of this "
                                         "build's client")  # fmt: skip
            await run_in_threadpool(_worker_call, worker.check_keys, key_id, incoming.path)
            store.commit(incoming)
            return {"key_id": key_id, "bytes": incoming.size, "new": True}
        finally:
            store.discard(incoming)  # no-op once committed

    @app.api_route("/keys/{key_id}", methods=["GET", "HEAD"])
    def key_status(key_id: str, request: Request) -> dict[str, Any]:
        path = client_store(request).get(key_id)
        if path is None:
            raise HTTPException(
                404,
                f"no evaluation keys {key_id} here (never uploaded, or "
                "evicted): upload them with POST /keys",
            )
        return {"key_id": key_id, "bytes": path.stat().st_size}

    @app.post("/run")
    async def run(request: Request) -> Response:
        store = client_store(request)
        check_revision(request)
        key_id = request.query_params.get("key_id")
        if not key_id:
            raise HTTPException(
                400,
                "missing ?key_id=: upload the evaluation keys with POST "
                "/keys and pass the key_id it returns",
            )
        path = store.get(key_id)
        if path is None:
            raise HTTPException(
                404,
                f"no evaluation keys {key_id} here (never uploaded, or "
                "evicted): upload them with POST /keys, then retry",
            )
        async with slot(request):
            with tempfile.TemporaryFile(dir=store.incoming) as spool:
                await _receive(request, max_input_bytes, spool.write, "encrypted input",
                               "this server takes one encrypted image per request")  # fmt: skip
                spool.seek(0)
                body = spool.read()
            if not body:
                raise HTTPException(
                    400, "empty body: send FHEModelClient.quantize_encrypt_serialize() of one image"
                )
            result, seconds = await run_in_threadpool(
                lambda: _worker_call(worker.run, key_id, path, body, stored=path)
            )
        return Response(result, media_type="application/octet-stream",
                        headers={SECONDS_HEADER: f"{seconds:.3f}"})  # fmt: skip

    return app


def describe(app: FastAPI, host: str, port: int, scheme: str = "http") -> dict[str, Any]:
    """What `zoo serve` announces: URL, build and key store."""
    netloc = f"[{host}]" if ":" in host else host
    build = app.state.build
    return {"url": f"{scheme}://{netloc}:{port}", "variant": build.variant,
            "revision": build.revision, "key_store": str(app.state.key_store),
            **app.state.limits}  # fmt: skip


def serve(
    ref: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    announce: Callable[[dict[str, Any]], None] | None = None,
    log_level: str = "info",
    **kwargs: Any,
) -> None:
    """Load build ``ref`` and serve it until interrupted (``kwargs`` go to :func:`create_app`;
    ``ssl_keyfile`` / ``ssl_certfile`` among them go to uvicorn, for HTTPS). The address is
    taken before the build is loaded (port 0: any free one, announced); a server that cannot
    listen or start raises instead of leaving through uvicorn's own exit code."""
    import uvicorn

    check_exposure(host, kwargs.get("tokens") or [])
    tls = _tls(kwargs.pop("ssl_keyfile", None), kwargs.pop("ssl_certfile", None))
    sock = _listen(host, port)
    try:
        app = create_app(ref, **kwargs)
        if announce is not None:
            announce(describe(app, host, sock.getsockname()[1], "https" if tls else "http"))
        server = uvicorn.Server(uvicorn.Config(app, log_level=log_level,
                                               timeout_graceful_shutdown=5, **tls))  # fmt: skip
        with contextlib.suppress(SystemExit):  # how uvicorn says that the app did not start
            server.run(sockets=[sock])
    finally:
        sock.close()
    if not server.started:
        raise getattr(app.state, "startup_error", None) or ServerError(
            f"zoo serve {ref} did not start", hint="see uvicorn's log above"
        )


def _tls(keyfile: Path | None, certfile: Path | None) -> dict[str, Path]:
    """uvicorn's TLS options, once the key and certificate are known to load together."""
    if keyfile is None and certfile is None:
        return {}
    if keyfile is None or certfile is None:
        raise InputError("--ssl-keyfile and --ssl-certfile go together",
                         hint="give both (PEM files) to serve HTTPS, or neither")  # fmt: skip
    try:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(certfile, keyfile, password=lambda: b"")  # never a prompt
    except (ssl.SSLError, OSError) as exc:
        raise InputError(
            f"cannot serve HTTPS with {certfile} and {keyfile}: {exc}",
            hint="pass a PEM certificate and its own private key, unencrypted",
        ) from None
    return {"ssl_keyfile": keyfile, "ssl_certfile": certfile}


def _listen(host: str, port: int) -> socket.socket:
    """A TCP socket listening on ``host:port``, handed to uvicorn: a second server on the
    same port fails here, before it loads its build."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen()
    except OSError as exc:
        sock.close()
        raise ServerError(
            f"cannot listen on {host}:{port}: {exc.strerror or exc}",
            hint="pick another --port (0 takes any free one), or stop what listens there",
        ) from None
    return sock
