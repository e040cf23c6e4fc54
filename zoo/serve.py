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
The circuit runs in a child process (:mod:`zoo.fhe_worker`), one request at a time.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, HTTPException, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from zoo import config
from zoo.fhe_worker import FheWorker, WorkerCrashed, WorkerRefused, describe_exit
from zoo.keystore import KeyIdError, KeyStore, make_private

REVISION_HEADER = "X-Zoo-Revision"
SECONDS_HEADER = "X-Zoo-Seconds"
DEFAULT_MAX_KEY_BYTES = 4 << 30  # cifar10-split-tiny: 255 MiB serialized
DEFAULT_MAX_KEYS = 8
DEFAULT_MAX_INPUT_BYTES = 256 << 20  # cifar10-split-tiny: 75 KiB per image
DRAIN_BYTES = 64 << 20  # read this much past a limit so the client gets the 413, not a reset


def min_key_bytes(server: Any) -> int:
    """A lower bound on the serialized evaluation keys of a circuit (FHEModelServer).

    Every encoding of a bootstrap key stores at least the body polynomial of each of its GLWE
    ciphertexts, 64-bit coefficients: keys smaller than that are another circuit's, which
    concrete would not notice before it aborts.
    """
    info = server.server.client_specs.program_info.get_keyset_info()
    return sum(
        k.input_lwe_dimension() * k.level() * (k.glwe_dimension() + 1) * k.polynomial_size() * 8
        for k in info.bootstrap_keys()
    )


def default_key_store(variant: str, revision: str) -> Path:
    """``$ZOO_HOME/server-keys/VARIANT/REVISION``, created 0700."""
    root = config.server_keys_dir()
    return make_private(root / variant / revision, root, root / variant)


async def _receive(
    request: Request, limit: int, sink: Callable[[bytes], Any], what: str, hint: str
) -> int:
    """Feed the request body to ``sink`` chunk by chunk; 413 past ``limit`` bytes."""
    declared = request.headers.get("content-length", "")
    size = int(declared) if declared.isdigit() else 0
    over = size > limit
    if size <= limit + DRAIN_BYTES:
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


def _worker_call(function: Callable[..., Any], *args: Any) -> Any:
    """Call the FHE worker; its refusals and crashes become HTTP errors."""
    try:
        return function(*args)
    except WorkerRefused as exc:
        if exc.status == "missing_keys":
            raise HTTPException(404, f"{exc}: upload them again (POST /keys)") from None
        if exc.status in ("bad_keys", "bad_input"):
            hint = ("send what FHEModelClient.get_serialized_evaluation_keys() returns"
                    if exc.status == "bad_keys" else
                    "send what FHEModelClient.quantize_encrypt_serialize() returns, made with "
                    "the client of the build this server runs")  # fmt: skip
            raise HTTPException(400, f"{exc}: {hint}") from None
        raise HTTPException(500, f"the FHE worker failed: {exc}; see the server's log") from None
    except WorkerCrashed as exc:
        if exc.aborted:
            raise HTTPException(400, f"the FHE circuit aborted on this request "
                                     f"({describe_exit(exc.returncode)}): the evaluation keys or "
                                     "the ciphertext were not made by this build's client; the "
                                     "server has restarted its worker") from None  # fmt: skip
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
) -> FastAPI:
    """The HTTP app that runs the circuit of build ``ref`` (VARIANT or VARIANT@REV).

    Loads (pulling through the verified cache if needed) only the server side. Evaluation keys
    are kept in ``key_store`` (default ``$ZOO_HOME/server-keys/VARIANT/REVISION``), at most
    ``max_keys`` of at most ``max_key_bytes`` each; the worker keeps ``max_cached_keys``
    deserialized in memory.
    """
    from zoo import runtime

    model = runtime.load(ref, role="server", registry_path=registry_path)
    build = model.build
    if key_store is None:
        key_store = default_key_store(build.variant, build.revision)
    store = KeyStore(make_private(Path(key_store)), max_keys)
    worker = FheWorker(build.ref, registry_path, max_cached_keys)
    least_key_bytes = min_key_bytes(model.server)
    limits = {"max_key_bytes": max_key_bytes, "max_keys": max_keys,
              "max_input_bytes": max_input_bytes}  # fmt: skip

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await run_in_threadpool(worker.start)
        try:
            yield
        finally:
            worker.close()

    app = FastAPI(title=f"zoo serve {build.short_ref}", lifespan=lifespan)
    app.state.build, app.state.store, app.state.limits = build, store, limits

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
    def info() -> dict[str, Any]:
        return {**model.meta, "variant": build.variant, "revision": build.revision,
                "limits": limits}  # fmt: skip

    @app.post("/keys")
    async def upload_keys(request: Request) -> dict[str, Any]:
        check_revision(request)
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
    def key_status(key_id: str) -> dict[str, Any]:
        path = store.get(key_id)
        if path is None:
            raise HTTPException(
                404,
                f"no evaluation keys {key_id} here (never uploaded, or "
                "evicted): upload them with POST /keys",
            )
        return {"key_id": key_id, "bytes": path.stat().st_size}

    @app.post("/run")
    async def run(request: Request) -> Response:
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
        chunks: list[bytes] = []
        await _receive(request, max_input_bytes, chunks.append, "encrypted input",
                       "this server takes one encrypted image per request")  # fmt: skip
        body = b"".join(chunks)
        if not body:
            raise HTTPException(
                400, "empty body: send FHEModelClient.quantize_encrypt_serialize() of one image"
            )
        result, seconds = await run_in_threadpool(_worker_call, worker.run, key_id, path, body)
        return Response(result, media_type="application/octet-stream",
                        headers={SECONDS_HEADER: f"{seconds:.3f}"})  # fmt: skip

    return app


def describe(app: FastAPI, host: str, port: int) -> dict[str, Any]:
    """What `zoo serve` announces: URL, build and key store."""
    netloc = f"[{host}]" if ":" in host else host
    build = app.state.build
    return {"url": f"http://{netloc}:{port}", "variant": build.variant,
            "revision": build.revision, "key_store": str(app.state.store.folder),
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
    """Load build ``ref`` and serve it until interrupted (``kwargs`` go to :func:`create_app`)."""
    import uvicorn

    app = create_app(ref, **kwargs)
    if announce is not None:
        announce(describe(app, host, port))
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)
