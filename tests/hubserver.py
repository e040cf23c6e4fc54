"""Local HTTP servers that speak the Hugging Face Hub protocol, for end-to-end tests without mocks.

Three servers are provided, all bound to ``127.0.0.1`` on free ports and driven by plain context
managers (usable from pytest fixtures, benchmarks or scripts):

**A: olah (reads, independent implementation).** ``olah_hub`` starts the third-party mirror server
`olah <https://pypi.org/project/olah/>`_ (``olah-cli``) in offline mode on a directory of plain git
repositories (``ROOT/mirrors/models/ORG/REPO``).  It answers the read routes that
``huggingface_hub`` uses: ``HEAD``/``GET /ORG/REPO/resolve/REV/PATH``,
``/api/models/ORG/REPO/revision/REV``, ``/tree/REV?recursive=``, ``/refs``, ``/paths-info/REV``,
``/commits/REV``.  The ``olah-cli`` executable is looked up in ``$ZOO_OLAH_CLI``, then in
``<repo>/.venv-olah/bin`` (olah has its own virtualenv because it would downgrade ``psutil`` in the
project venv), then next to ``sys.executable``, then on ``$PATH``.

**B: publish server + reverse proxy (the endpoint handed to tests).** ``HubServer.endpoint`` is a
small stdlib ``ThreadingHTTPServer`` of ours that implements the write side on the same git
repositories, with the git CLI (bare repositories, commits built with plumbing commands and
published with a compare-and-swap ``git update-ref``, under a per-repository lock):

- ``POST /api/repos/create`` (``HfApi.create_repo``; 409 if it exists, so ``exist_ok=True`` works;
  the new repo gets an ``initial commit`` with a ``.gitattributes`` like the real Hub) and
  ``DELETE /api/repos/delete``;
- ``POST /api/models/ORG/REPO/preupload/REV``: every file is ``regular`` (inlined base64, no
  LFS/Xet), with the ``oid`` of the file already at that path so unchanged files are skipped like
  on the Hub;
- ``POST /api/models/ORG/REPO/commit/REV`` (``HfApi.create_commit`` / ``upload_file`` /
  ``upload_folder``): NDJSON ``header`` / ``file`` / ``deletedFile`` / ``deletedFolder`` lines; a
  ``parentCommit`` that is not the branch head gets ``412 Precondition Failed`` like the Hub;
- ``POST``/``DELETE /api/models/ORG/REPO/branch/BRANCH`` and ``.../tag/REV`` (create/delete
  branch and tag);
- ``GET /api/models/ORG/REPO/commits/REV`` (``list_repo_commits``: olah's answer lacks
  ``authors[].user``) and ``POST /api/validate-yaml`` (sent by ``create_commit`` for a README.md).

Every other request is reverse-proxied to olah (bodies streamed, headers such as ``X-Repo-Commit``,
``ETag``, ``Content-Length``, ``Location``, ``X-Error-Code`` passed through; olah's absolute URLs
already point at B because its ``mirror-netloc`` is B's address).  Before proxying a read, B checks
the repository, revision and file against git itself and answers misses like the Hub does, because
olah answers every miss with ``401 RepoNotFound`` and an unknown commit SHA with ``500`` (that the
client retries for ~23 s): missing repo -> ``401 RepoNotFound``, unknown revision -> ``404
RevisionNotFound``, missing file -> ``404 EntryNotFound`` (with ``X-Repo-Commit``).  ``GET
/api/models/ORG/REPO`` (``model_info`` without a revision, which olah does not serve) is forwarded
as ``.../revision/main``.

**C: fault injection (our own minimal read implementation).** ``fault_hub`` serves one model repo
from memory: ``HEAD``/``GET /ORG/REPO/resolve/REV/PATH`` (``X-Repo-Commit``, quoted ``ETag`` = git
blob oid, or sha256 for files presented as LFS, ``Content-Length``, single ``Range`` requests),
``/api/models/ORG/REPO[/revision/REV]``, ``/tree/REV[/PATH]`` and ``/refs``.  Faults are set per
target at runtime (``fail``, ``truncate``, ``corrupt``, ``slow``), optionally for the first ``n``
requests only; a target is a file path, or ``FaultHub.REVISION_API`` / ``FaultHub.TREE_API``.

Both servers keep a request log (``.requests``, ``.clear_requests()``), e.g. to assert that a pull
pinned to a cached commit makes no request.  ``python tests/hubserver.py download ENDPOINT REPO REV
PATH CACHE_DIR`` is a one-file ``hf_hub_download`` client to run as a subprocess and ``kill -9``
while server C sends a ``slow`` body (``FaultHub.wait_for_bytes`` tells when it is mid-download).

Usage::

    with olah_hub(tmp_path / "hub") as hub:
        api = HfApi(endpoint=hub.endpoint, token=hub.token)
        api.create_repo("org/model")
        sha = api.create_commit("org/model", ops, commit_message="publish").oid
        snapshot_download("org/model", revision=sha, endpoint=hub.endpoint, token=hub.token,
                          cache_dir=tmp_path / "cache")

    with fault_hub({"w.bin": data}) as hub:
        hub.fail("w.bin", 500, times=2)      # or truncate / corrupt / slow
        hf_hub_download(hub.repo_id, "w.bin", revision=hub.revision, endpoint=hub.endpoint,
                        token=hub.token, cache_dir=tmp_path / "cache")

What the servers do NOT cover:

- LFS and Xet uploads or downloads (the preupload answer is always ``regular``, so files of any size
  are inlined in the commit payload; the real Hub forces LFS/Xet above ~10 MB and for binaries);
- authentication, private/gated repositories, tokens (any token or none is accepted), rate limits;
- pull requests (``create_pr``), spaces, ``CommitOperationCopy`` of LFS files, repo settings,
  ``whoami``, search/listing routes (``list_models``), pagination of very large trees;
- olah limitations that show through B: a file of 121-149 bytes that is not UTF-8 (or that looks
  like an LFS pointer) breaks olah's file and tree routes, so B rejects such a file at commit time
  with ``400`` and a clear message; ``README.md`` must be UTF-8 (olah parses its model card);
- server C only knows what is in memory: one repo, no writes.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Literal
from urllib.parse import parse_qs, unquote, urlsplit

if TYPE_CHECKING:
    from huggingface_hub import HfApi

__all__ = [
    "DEFAULT_TOKEN",
    "Fault",
    "FaultHub",
    "HubServer",
    "OlahNotAvailableError",
    "RequestRecord",
    "fault_hub",
    "find_olah_cli",
    "git_blob_oid",
    "olah_hub",
]

DEFAULT_TOKEN = "test-token"
"""Token to pass to ``huggingface_hub`` calls: the servers accept any token."""

_HOST = "127.0.0.1"
_CHUNK = 64 * 1024
_GIT_IDENTITY = {
    "GIT_AUTHOR_NAME": "zoo-test-hub",
    "GIT_AUTHOR_EMAIL": "zoo-test-hub@localhost",
    "GIT_COMMITTER_NAME": "zoo-test-hub",
    "GIT_COMMITTER_EMAIL": "zoo-test-hub@localhost",
}
_HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
}
_INITIAL_GITATTRIBUTES = b"""\
*.bin filter=lfs diff=lfs merge=lfs -text
*.npy filter=lfs diff=lfs merge=lfs -text
*.npz filter=lfs diff=lfs merge=lfs -text
*.onnx filter=lfs diff=lfs merge=lfs -text
*.pt filter=lfs diff=lfs merge=lfs -text
*.pth filter=lfs diff=lfs merge=lfs -text
*.safetensors filter=lfs diff=lfs merge=lfs -text
*.zip filter=lfs diff=lfs merge=lfs -text
"""
_LFS_POINTER_RE = re.compile(
    rb"version https://git-lfs\.github\.com/spec/v[0-9]\n"
    rb"oid sha256:([0-9a-z]{64})\nsize ([0-9]+?)\n"
)
_SHA_RE = re.compile(r"[0-9a-f]{40}")


# --------------------------------------------------------------------------------------------
# Small shared helpers
# --------------------------------------------------------------------------------------------


def git_blob_oid(data: bytes) -> str:
    """Git blob id (sha1 of ``b"blob <len>\\0" + data``), which the Hub uses as oid and ETag."""
    return hashlib.sha1(b"blob %d\x00" % len(data) + data).hexdigest()


def _free_port() -> int:
    """Return a port that was free on 127.0.0.1 a moment ago (bind to port 0, then release)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((_HOST, 0))
        return int(sock.getsockname()[1])


def _olah_unservable_reason(data: bytes) -> str | None:
    """Say why olah 0.5.x cannot serve ``data`` as a plain git file, or ``None`` if it can.

    olah reads every blob of 121-149 bytes as UTF-8 to check for an LFS pointer: a non-UTF-8 blob of
    that size crashes its file and tree routes, and a real pointer is looked up in ``.git/lfs``.
    """
    if not 120 < len(data) < 150:
        return None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return (
            f"a {len(data)}-byte file that is not UTF-8: olah (the read side of this test hub) "
            "cannot serve non-UTF-8 files of 121-149 bytes; pad or resize it"
        )
    if _LFS_POINTER_RE.match(text.encode("utf-8")):
        return "an LFS pointer file: this test hub does not support LFS"
    return None


@dataclass(frozen=True)
class RequestRecord:
    """One request seen by a server: method, raw path with query, status answered, Range."""

    method: str
    path: str
    status: int
    range: str | None = None


class _HubError(Exception):
    """An error answered the way the Hub does: status, ``X-Error-Code`` and a message."""

    def __init__(
        self,
        status: int,
        message: str,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.headers = dict(headers or {})
        self.extra = dict(extra or {})


class _Server(ThreadingHTTPServer):
    """``ThreadingHTTPServer`` that can stop promptly: it tracks and closes live connections."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, handler: type[BaseHTTPRequestHandler]) -> None:
        super().__init__((_HOST, 0), handler)
        self.stopping = threading.Event()
        self._lock = threading.Lock()
        self._conns: set[socket.socket] = set()
        self._handler_threads: set[threading.Thread] = set()
        self._records: list[RequestRecord] = []
        self._serve_thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        """The port the server listens on."""
        return int(self.server_address[1])

    def get_request(self) -> tuple[socket.socket, Any]:
        """Accept a connection and remember it so that ``stop`` can close it."""
        sock, addr = super().get_request()
        with self._lock:
            self._conns.add(sock)
        return sock, addr

    def shutdown_request(self, request: Any) -> None:
        """Forget and close a finished connection."""
        with self._lock:
            self._conns.discard(request)
        super().shutdown_request(request)

    def process_request(self, request: Any, client_address: Any) -> None:
        """Serve each connection in a tracked daemon thread."""
        thread = threading.Thread(
            target=self._run_request, args=(request, client_address), daemon=True
        )
        with self._lock:
            self._handler_threads.add(thread)
        thread.start()

    def _run_request(self, request: Any, client_address: Any) -> None:
        try:
            self.process_request_thread(request, client_address)
        finally:
            with self._lock:
                self._handler_threads.discard(threading.current_thread())

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Stay quiet about clients that went away (killed downloads, closed pools)."""
        exc = sys.exc_info()[1]
        if isinstance(exc, OSError) or self.stopping.is_set():
            return
        super().handle_error(request, client_address)

    def record(self, rec: RequestRecord) -> None:
        """Append a request to the log."""
        with self._lock:
            self._records.append(rec)

    def records(self) -> list[RequestRecord]:
        """A copy of the request log."""
        with self._lock:
            return list(self._records)

    def clear_records(self) -> None:
        """Empty the request log."""
        with self._lock:
            self._records.clear()

    def start(self) -> None:
        """Serve in a background thread."""
        self._serve_thread = threading.Thread(
            target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._serve_thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop accepting, close every open connection and wait (bounded) for handler threads."""
        self.stopping.set()
        if self._serve_thread is not None:
            self.shutdown()
            self._serve_thread.join(timeout)
        with self._lock:
            conns = list(self._conns)
            threads = list(self._handler_threads)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        self.server_close()
        deadline = time.monotonic() + timeout
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))


class _Handler(BaseHTTPRequestHandler):
    """Common plumbing: HTTP/1.1 keep-alive, quiet logs, JSON/error replies, request records."""

    protocol_version = "HTTP/1.1"
    server: _Server
    _started: bool = False

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        """Do not print one line per request; the servers keep a request log instead."""

    def send_response(self, code: int, message: str | None = None) -> None:
        """Record the request (before its response goes out, so tests see it at once) and reply."""
        self._started = True
        headers = getattr(self, "headers", None)
        self.server.record(
            RequestRecord(
                method=getattr(self, "command", None) or "",
                path=getattr(self, "path", ""),
                status=code,
                range=headers.get("Range") if headers is not None else None,
            )
        )
        super().send_response(code, message)

    def handle_one_request(self) -> None:
        """Handle one request; a client that disconnects just ends the connection."""
        try:
            super().handle_one_request()
        except (ConnectionError, TimeoutError, OSError):
            self.close_connection = True

    def do_GET(self) -> None:  # noqa: N802 - stdlib naming
        """Dispatch GET."""
        self._dispatch()

    def do_HEAD(self) -> None:  # noqa: N802 - stdlib naming
        """Dispatch HEAD."""
        self._dispatch()

    def do_POST(self) -> None:  # noqa: N802 - stdlib naming
        """Dispatch POST."""
        self._dispatch()

    def do_PUT(self) -> None:  # noqa: N802 - stdlib naming
        """Dispatch PUT."""
        self._dispatch()

    def do_DELETE(self) -> None:  # noqa: N802 - stdlib naming
        """Dispatch DELETE."""
        self._dispatch()

    def _dispatch(self) -> None:
        self._started = False
        try:
            self.route()
        except _HubError as err:
            if self._started:
                raise
            self.send_hub_error(err)
        except OSError:
            raise
        except Exception as exc:
            # A bug or an unexpected git failure: answer a visible 500 rather than a dropped
            # connection (which clients retry as a network error).
            if self._started:
                raise
            self.send_hub_error(_HubError(500, f"test hub internal error: {exc!r}"))

    def route(self) -> None:
        """Answer the current request (implemented by subclasses)."""
        raise NotImplementedError

    def read_body(self) -> bytes:
        """Read the request body (``Content-Length`` or chunked)."""
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            parts: list[bytes] = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(parts)
                parts.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def read_json(self) -> Any:
        """Read and decode a JSON body (``{}`` when empty)."""
        body = self.read_body()
        if not body:
            return {}
        try:
            return json.loads(body)
        except ValueError as exc:
            raise _HubError(400, f"invalid JSON body: {exc}", "BadRequest") from exc

    def send_bytes(
        self,
        status: int,
        body: bytes,
        headers: Mapping[str, str] | None = None,
        content_type: str = "application/json",
    ) -> None:
        """Send a complete response (no body for HEAD, but the same ``Content-Length``)."""
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def send_json(self, status: int, obj: Any, headers: Mapping[str, str] | None = None) -> None:
        """Send a JSON response."""
        self.send_bytes(status, json.dumps(obj).encode(), headers)

    def send_hub_error(self, err: _HubError) -> None:
        """Send an error like the Hub: ``{"error": ...}``, ``X-Error-Code``, ``X-Error-Message``."""
        headers = dict(err.headers)
        if err.code:
            headers["X-Error-Code"] = err.code
        headers["X-Error-Message"] = err.message.encode("ascii", "replace").decode()
        # The request body may not have been read: do not reuse the connection.
        self.close_connection = True
        headers["Connection"] = "close"
        self.send_json(err.status, {"error": err.message, **err.extra}, headers)


def _split_path(raw_path: str) -> tuple[list[str], dict[str, list[str]]]:
    """Split a request target into unquoted path segments and parsed query."""
    url = urlsplit(raw_path)
    segs = [unquote(s) for s in url.path.split("/")[1:]]
    return segs, parse_qs(url.query)


# --------------------------------------------------------------------------------------------
# Server B: git-backed publishing + reverse proxy to olah
# --------------------------------------------------------------------------------------------


class _GitRepos:
    """Bare git repositories laid out as olah expects: ``MIRRORS/{type}s/ORG/REPO``."""

    def __init__(self, mirrors: Path) -> None:
        self.mirrors = mirrors
        self._locks: dict[Path, threading.RLock] = {}
        self._global = threading.Lock()

    def path(self, repo_type: str, repo_id: str) -> Path:
        """Directory of a repository (``repo_type`` is ``model`` or ``dataset``)."""
        if repo_type not in ("model", "dataset"):
            raise _HubError(400, f"repo type {repo_type!r} is not supported by the test hub")
        org, sep, name = repo_id.partition("/")
        if not sep or not org or not name or "/" in name or ".." in (org, name):
            raise _HubError(400, f"invalid repo id {repo_id!r}: expected ORG/NAME")
        return self.mirrors / f"{repo_type}s" / org / name

    def lock(self, repo: Path) -> threading.RLock:
        """The (reentrant) lock that serialises writes to one repository."""
        with self._global:
            return self._locks.setdefault(repo, threading.RLock())

    @staticmethod
    def exists(repo: Path) -> bool:
        """Whether ``repo`` is an initialised (bare) repository."""
        return (repo / "HEAD").is_file()

    @staticmethod
    def env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
        """Environment for git: fixed identity, no user/system config."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
        env.update(_GIT_IDENTITY)
        env.update({"GIT_CONFIG_NOSYSTEM": "1", "GIT_CONFIG_GLOBAL": os.devnull, "LC_ALL": "C"})
        env.update(extra or {})
        return env

    def git(
        self,
        repo: Path,
        *args: str,
        input: bytes | None = None,  # noqa: A002 - mirrors subprocess
        env: Mapping[str, str] | None = None,
        check: bool = True,
    ) -> subprocess.CompletedProcess[bytes]:
        """Run ``git -C repo ARGS`` and return the completed process."""
        proc = subprocess.run(
            ["git", "-C", str(repo), *args],
            input=input,
            capture_output=True,
            env=self.env(env),
            timeout=120,
            check=False,
        )
        if check and proc.returncode != 0:
            raise RuntimeError(
                f"git {' '.join(args)} failed in {repo}: {proc.stderr.decode(errors='replace')}"
            )
        return proc

    def resolve(self, repo: Path, rev: str) -> str | None:
        """Commit sha of ``rev`` (branch, tag or sha), or ``None``."""
        if not rev or rev.startswith("-") or any(c in rev for c in " \t\n:"):
            return None
        proc = self.git(repo, "rev-parse", "--verify", "-q", f"{rev}^{{commit}}", check=False)
        out = proc.stdout.decode().strip()
        return out if proc.returncode == 0 and _SHA_RE.fullmatch(out) else None

    def branch_head(self, repo: Path, branch: str) -> str | None:
        """Commit sha at the tip of ``refs/heads/<branch>``, or ``None``."""
        if not branch or branch.startswith("-"):
            return None
        return self.resolve(repo, f"refs/heads/{branch}")

    def ls_tree(
        self, repo: Path, commit: str, path: str | None = None
    ) -> dict[str, tuple[str, str]]:
        """``{path: (type, oid)}`` for the whole tree of ``commit`` (or one path in it)."""
        args = ["ls-tree", "-r", "-t", "-z", "--full-tree", commit]
        if path is not None:
            args = ["ls-tree", "-z", "--full-tree", commit, "--", path]
        out = self.git(repo, *args).stdout.decode("utf-8", "surrogateescape")
        entries: dict[str, tuple[str, str]] = {}
        for item in out.split("\x00"):
            if not item:
                continue
            meta, _, name = item.partition("\t")
            _mode, kind, oid = meta.split()
            entries[name] = (kind, oid)
        return entries

    def create(self, repo: Path, gitattributes: bytes | None) -> str:
        """Create a bare repository with an ``initial commit`` on ``main``; return its sha."""
        repo.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            ["git", "init", "-q", "--bare", "-b", "main", str(repo)],
            check=True,
            capture_output=True,
            env=self.env(),
            timeout=60,
        )
        files = {".gitattributes": gitattributes} if gitattributes is not None else {}
        return self.commit(repo, "main", files, [], "initial commit", "", None, create_branch=True)

    def commit(
        self,
        repo: Path,
        branch: str,
        files: Mapping[str, bytes],
        deletions: list[tuple[str, bool]],
        summary: str,
        description: str,
        parent: str | None,
        *,
        create_branch: bool = False,
    ) -> str:
        """Commit ``files`` and ``deletions`` ``(path, is_folder)`` on ``branch``; return the sha.

        Raises ``_HubError`` 404 for an unknown branch or deleted path, 412 if ``parent`` is not the
        branch head, 400 for paths or contents the test hub cannot serve.
        """
        for path, data in files.items():
            _check_repo_path(path)
            reason = _olah_unservable_reason(data)
            if path == "README.md" and reason is None:
                try:
                    data.decode("utf-8")
                except UnicodeDecodeError:
                    reason = "README.md must be UTF-8 (olah parses it to answer model_info)"
            if reason is not None:
                raise _HubError(400, f"cannot commit {path!r}: {reason}", "BadRequest")
        with self.lock(repo):
            head = self.branch_head(repo, branch)
            if head is None and not create_branch:
                raise _HubError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
            if parent is not None and head is not None:
                parent_sha = self.resolve(repo, parent)
                if parent_sha != head:
                    raise _HubError(
                        412,
                        f"A commit has happened since. Please refresh and try again. "
                        f"(parent commit {parent} is not the head {head} of {branch})",
                    )
            with tempfile.TemporaryDirectory(prefix="hubserver-index-") as tmp:
                index_env = {"GIT_INDEX_FILE": str(Path(tmp) / "index")}
                if head is not None:
                    self.git(repo, "read-tree", head, env=index_env)
                tree_now = self.ls_tree(repo, head) if head is not None else {}
                current = {p for p, (kind, _oid) in tree_now.items() if kind == "blob"}
                lines: list[str] = []
                removed: set[str] = set()
                for path, is_folder in deletions:
                    path = path.rstrip("/")
                    prefix = path + "/"
                    if is_folder:
                        doomed = [p for p in current if p.startswith(prefix)]
                    else:
                        doomed = [path] if path in current else []
                    if not doomed:
                        what = "folder" if is_folder else "file"
                        raise _HubError(
                            404, f"A {what} with this name doesn't exist: {path}", "EntryNotFound"
                        )
                    lines.extend(f"0 {'0' * 40}\t{p}" for p in doomed)
                    removed.update(doomed)
                _check_file_dir_conflicts((current - removed) | set(files), files)
                for path, data in files.items():
                    oid = self.git(repo, "hash-object", "-w", "--stdin", input=data)
                    lines.append(f"100644 {oid.stdout.decode().strip()}\t{path}")
                if lines:
                    self.git(
                        repo,
                        "update-index",
                        "--index-info",
                        input=("\n".join(lines) + "\n").encode(),
                        env=index_env,
                    )
                tree = self.git(repo, "write-tree", env=index_env).stdout.decode().strip()
            message = summary + (f"\n\n{description}" if description else "") + "\n"
            parents = ["-p", head] if head is not None else []
            new = self.git(repo, "commit-tree", tree, *parents, "-F", "-", input=message.encode())
            sha = new.stdout.decode().strip()
            self.git(repo, "update-ref", f"refs/heads/{branch}", sha, head or "0" * 40)
            return sha


def _check_file_dir_conflicts(all_files: set[str], added: Mapping[str, bytes]) -> None:
    """Reject a file whose path is also a folder (git would silently replace one by the other)."""
    folders = {p.rsplit("/", i)[0] for p in all_files for i in range(1, p.count("/") + 1)}
    for path in added:
        if path in folders:
            raise _HubError(400, f"{path!r} is a folder in the repo, cannot add a file there")
        for i in range(1, path.count("/") + 1):
            parent = path.rsplit("/", i)[0]
            if parent in all_files:
                raise _HubError(400, f"cannot add {path!r}: {parent!r} is a file in the repo")


def _check_repo_path(path: str) -> None:
    """Reject paths the Hub would reject (absolute, ``..``, ``.git``)."""
    parts = path.split("/")
    if not path or path.startswith("/") or any(p in ("", ".", "..", ".git") for p in parts):
        raise _HubError(400, f"invalid path in repo: {path!r}", "BadRequest")


@dataclass
class _PublishState:
    repos: _GitRepos
    namespace: str
    gitattributes: bytes | None
    endpoint: str = ""
    upstream: tuple[str, int] | None = None


class _PublishHandler(_Handler):
    """Server B: write routes on git, read routes validated then proxied to olah."""

    state: ClassVar[_PublishState]

    def route(self) -> None:
        """Dispatch to the write routes, the Hub-like miss checks, or the olah proxy."""
        segs, _query = _split_path(self.path)
        method = self.command
        if segs == ["api", "repos", "create"] and method == "POST":
            return self._create_repo()
        if segs == ["api", "repos", "delete"] and method == "DELETE":
            return self._delete_repo()
        if segs == ["api", "validate-yaml"] and method == "POST":
            return self._validate_yaml()
        if len(segs) >= 4 and segs[0] == "api" and segs[1] in ("models", "datasets"):
            repo_type, repo_id = segs[1][:-1], f"{segs[2]}/{segs[3]}"
            action, rest = (segs[4], segs[5:]) if len(segs) > 4 else ("", [])
            if method == "POST" and action == "preupload" and rest:
                return self._preupload(repo_type, repo_id, "/".join(rest))
            if method == "POST" and action == "commit" and rest:
                return self._commit(repo_type, repo_id, "/".join(rest))
            if action == "branch" and rest and method in ("POST", "DELETE"):
                return self._branch(repo_type, repo_id, "/".join(rest))
            if action == "tag" and rest and method in ("POST", "DELETE"):
                return self._tag(repo_type, repo_id, "/".join(rest))
            if method == "GET" and action == "commits" and rest:
                return self._commits(repo_type, repo_id, rest[0])
            if method in ("GET", "HEAD"):
                self._check_api_read(repo_type, repo_id, action, rest)
                if action == "":
                    url = urlsplit(self.path)
                    target = url.path.rstrip("/") + "/revision/main"
                    return self._proxy(target + (f"?{url.query}" if url.query else ""))
        elif method in ("GET", "HEAD"):
            self._check_resolve(segs)
        return self._proxy(self.path)

    # -- helpers ---------------------------------------------------------------------------

    def _repo(self, repo_type: str, repo_id: str) -> Path:
        repo = self.state.repos.path(repo_type, repo_id)
        if not self.state.repos.exists(repo):
            raise _HubError(401, "Repository not found", "RepoNotFound")
        return repo

    def _rev(self, repo: Path, rev: str) -> str:
        sha = self.state.repos.resolve(repo, rev)
        if sha is None:
            raise _HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        return sha

    def _repo_url(self, repo_type: str, repo_id: str) -> str:
        prefix = "" if repo_type == "model" else f"{repo_type}s/"
        return f"{self.state.endpoint}/{prefix}{repo_id}"

    # -- read-side checks (olah answers every miss with 401 and unknown SHAs with 500) --------

    def _check_api_read(self, repo_type: str, repo_id: str, action: str, rest: list[str]) -> None:
        repo = self._repo(repo_type, repo_id)
        if action in ("revision", "tree", "paths-info", "commits") and rest and rest[0]:
            self._rev(repo, rest[0])

    def _check_resolve(self, segs: list[str]) -> None:
        if segs and segs[0] == "datasets":
            repo_type, segs = "dataset", segs[1:]
        else:
            repo_type = "model"
        if len(segs) < 5 or segs[2] != "resolve":
            return
        repo = self._repo(repo_type, f"{segs[0]}/{segs[1]}")
        sha = self._rev(repo, segs[3])
        path = "/".join(segs[4:])
        kind = self.state.repos.ls_tree(repo, sha, path).get(path, ("", ""))[0]
        if kind != "blob":
            raise _HubError(
                404, f"Entry not found: {path}", "EntryNotFound", {"X-Repo-Commit": sha}
            )

    def _commits(self, repo_type: str, repo_id: str, rev: str) -> None:
        """``list_repo_commits`` (olah's answer lacks ``authors[].user``), newest first."""
        repo = self._repo(repo_type, repo_id)
        sha = self._rev(repo, rev)
        fmt = "%H%x00%an%x00%cd%x00%s%x00%b%x1e"
        out = self.state.repos.git(
            repo,
            "log",
            f"--format={fmt}",
            "--date=format-local:%Y-%m-%dT%H:%M:%S.000Z",
            sha,
            env={"TZ": "UTC"},
        ).stdout.decode("utf-8", "replace")
        items = []
        for record in out.split("\x1e"):
            fields = record.strip("\n").split("\x00")
            if len(fields) < 5:
                continue
            oid, author, date, title, body = fields[:5]
            items.append(
                {
                    "id": oid,
                    "title": title,
                    "message": body.strip(),
                    "date": date,
                    "authors": [{"user": author}],
                }
            )
        self.send_json(200, items)

    # -- write routes -----------------------------------------------------------------------

    def _create_repo(self) -> None:
        body = self.read_json()
        repo_type = body.get("type") or "model"
        org = body.get("organization") or self.state.namespace
        repo_id = f"{org}/{body.get('name', '')}"
        repo = self.state.repos.path(repo_type, repo_id)
        url = self._repo_url(repo_type, repo_id)
        with self.state.repos.lock(repo):
            if self.state.repos.exists(repo):
                raise _HubError(
                    409,
                    f"You already created this {repo_type} repo: {repo_id}",
                    extra={"url": url},
                )
            self.state.repos.create(repo, self.state.gitattributes)
        self.send_json(200, {"url": url, "name": repo_id, "id": repo_id})

    def _validate_yaml(self) -> None:
        """Check a README's YAML front matter (olah parses it to answer ``model_info``)."""
        content = str(self.read_json().get("content", ""))
        match = re.match(r"\s*---(.*?)---", content, flags=re.S)
        if match is not None:
            try:
                import yaml

                yaml.safe_load(match.group(1))
            except ImportError:
                pass
            except yaml.YAMLError as exc:
                errors = [{"message": f"invalid YAML front matter: {exc}"}]
                return self.send_json(400, {"errors": errors, "warnings": []})
        self.send_json(200, {"errors": [], "warnings": []})

    def _delete_repo(self) -> None:
        body = self.read_json()
        org = body.get("organization") or self.state.namespace
        repo = self._repo(body.get("type") or "model", f"{org}/{body.get('name', '')}")
        with self.state.repos.lock(repo):
            shutil.rmtree(repo)
        self.send_json(200, {})

    def _preupload(self, repo_type: str, repo_id: str, rev: str) -> None:
        repo = self._repo(repo_type, repo_id)
        body = self.read_json()
        head = self.state.repos.branch_head(repo, rev)
        if head is None:
            raise _HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        existing = self.state.repos.ls_tree(repo, head)
        answer = []
        for item in body.get("files", []):
            entry: dict[str, Any] = {
                "path": item["path"],
                "uploadMode": "regular",
                "shouldIgnore": False,
            }
            kind, oid = existing.get(item["path"], ("", ""))
            if kind == "blob":
                entry["oid"] = oid
            answer.append(entry)
        self.send_json(200, {"files": answer, "commitOid": head})

    def _commit(self, repo_type: str, repo_id: str, rev: str) -> None:
        repo = self._repo(repo_type, repo_id)
        _segs, query = _split_path(self.path)
        if query.get("create_pr", ["0"])[0] not in ("0", "false", ""):
            raise _HubError(400, "pull requests are not supported by the test hub", "BadRequest")
        header: dict[str, Any] = {}
        files: dict[str, bytes] = {}
        deletions: list[tuple[str, bool]] = []
        for line in self.read_body().splitlines():
            if not line.strip():
                continue
            try:
                item = json.loads(line)
                key, value = item["key"], item["value"]
            except (ValueError, KeyError, TypeError) as exc:
                raise _HubError(400, f"invalid NDJSON line: {exc}", "BadRequest") from exc
            if key == "header":
                header = value
            elif key == "file":
                content = value.get("content", "")
                if value.get("encoding") == "base64":
                    files[value["path"]] = base64.b64decode(content)
                else:
                    files[value["path"]] = str(content).encode("utf-8")
            elif key in ("deletedFile", "deletedFolder"):
                deletions.append((value["path"], key == "deletedFolder"))
            else:
                raise _HubError(400, f"{key!r} operations are not supported by the test hub")
        sha = self.state.repos.commit(
            repo,
            rev,
            files,
            deletions,
            str(header.get("summary") or "commit"),
            str(header.get("description") or ""),
            header.get("parentCommit"),
        )
        self.send_json(
            200,
            {
                "success": True,
                "commitOid": sha,
                "commitUrl": f"{self._repo_url(repo_type, repo_id)}/commit/{sha}",
                "hookOutput": "",
            },
        )

    def _check_ref_name(self, repo: Path, name: str) -> None:
        proc = self.state.repos.git(repo, "check-ref-format", "--branch", name, check=False)
        if proc.returncode != 0 or name.startswith("-"):
            raise _HubError(400, f"invalid ref name {name!r}", "BadRequest")

    def _branch(self, repo_type: str, repo_id: str, branch: str) -> None:
        repo = self._repo(repo_type, repo_id)
        repos = self.state.repos
        body = self.read_json() if self.command == "POST" else {}
        with repos.lock(repo):
            head = repos.branch_head(repo, branch)
            if self.command == "DELETE":
                if head is None:
                    raise _HubError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
                if branch == "main":
                    raise _HubError(403, "cannot delete the default branch")
                repos.git(repo, "update-ref", "-d", f"refs/heads/{branch}", head)
            else:
                self._check_ref_name(repo, branch)
                if head is not None:
                    raise _HubError(409, f"Reference already exists: {branch}")
                start = self._rev(repo, body.get("startingPoint") or "main")
                repos.git(repo, "update-ref", f"refs/heads/{branch}", start, "0" * 40)
        self.send_json(200, {})

    def _tag(self, repo_type: str, repo_id: str, rev_or_tag: str) -> None:
        repo = self._repo(repo_type, repo_id)
        repos = self.state.repos
        with repos.lock(repo):
            if self.command == "DELETE":
                if repos.resolve(repo, f"refs/tags/{rev_or_tag}") is None:
                    raise _HubError(404, f"Invalid rev id: {rev_or_tag}", "RevisionNotFound")
                repos.git(repo, "update-ref", "-d", f"refs/tags/{rev_or_tag}")
            else:
                body = self.read_json()
                tag = str(body.get("tag", ""))
                self._check_ref_name(repo, tag)
                sha = self._rev(repo, rev_or_tag)
                if repos.resolve(repo, f"refs/tags/{tag}") is not None:
                    raise _HubError(409, f"Tag already exists: {tag}")
                message = body.get("message")
                args = ["tag", "-m", str(message)] if message else ["tag"]
                repos.git(repo, *args, tag, sha)
        self.send_json(200, {})

    # -- reverse proxy ----------------------------------------------------------------------

    def _proxy(self, target: str) -> None:
        upstream = self.state.upstream
        if upstream is None:
            raise _HubError(503, "olah is not running")
        body = self.read_body() if self.command not in ("GET", "HEAD") else None
        headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
        conn = http.client.HTTPConnection(*upstream, timeout=120)
        try:
            try:
                conn.request(self.command, target, body=body, headers=headers)
                resp = conn.getresponse()
            except OSError as exc:
                raise _HubError(502, f"olah unreachable: {exc}") from exc
            self.send_response(resp.status, resp.reason)
            olah_netloc = f"{upstream[0]}:{upstream[1]}"
            own_netloc = f"{_HOST}:{self.server.port}"
            length = resp.getheader("Content-Length")
            for key, value in resp.getheaders():
                lower = key.lower()
                if lower in _HOP_BY_HOP or lower in ("date", "server", "content-length"):
                    continue
                if lower == "location":
                    value = value.replace(olah_netloc, own_netloc)
                self.send_header(key, value)
            no_body = self.command == "HEAD" or resp.status in (204, 304) or resp.status < 200
            chunked = length is None and not no_body
            if length is not None:
                self.send_header("Content-Length", length)
            elif chunked:
                self.send_header("Transfer-Encoding", "chunked")
            elif no_body:
                self.send_header("Content-Length", "0")
            self.end_headers()
            if no_body:
                return
            while True:
                chunk = resp.read1(_CHUNK) if chunked else resp.read(_CHUNK)
                if not chunk:
                    break
                if chunked:
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                else:
                    self.wfile.write(chunk)
            if chunked:
                self.wfile.write(b"0\r\n\r\n")
        finally:
            conn.close()


class OlahNotAvailableError(RuntimeError):
    """Raised when no ``olah-cli`` executable can be found."""


def find_olah_cli() -> str | None:
    """Locate ``olah-cli``: ``$ZOO_OLAH_CLI``, ``.venv-olah``, next to python, then ``$PATH``."""
    candidates = [
        os.environ.get("ZOO_OLAH_CLI", ""),
        str(Path(__file__).resolve().parents[1] / ".venv-olah" / "bin" / "olah-cli"),
        str(Path(sys.executable).parent / "olah-cli"),
        shutil.which("olah-cli") or "",
    ]
    for cand in candidates:
        if cand and os.path.isfile(cand) and os.access(cand, os.X_OK):
            return cand
    return None


@dataclass
class HubServer:
    """A running olah (A) + publish/proxy server (B) pair; hand ``endpoint`` to ``huggingface_hub``.

    Attributes:
        endpoint: URL of server B, the only URL tests need (``HfApi(endpoint=...)``,
            ``hf_hub_download(..., endpoint=...)``).
        olah_endpoint: URL of olah itself (reads only, with olah's raw error behaviour).
        root: directory holding everything (``mirrors/``, ``olah/`` config, cache and log).
        mirrors: ``root / "mirrors"``; repositories live in ``mirrors/models/ORG/REPO`` (bare git).
        token: a token to pass to ``huggingface_hub`` (any value is accepted).
        namespace: organisation used by ``create_repo("name")`` without a namespace.
    """

    endpoint: str
    olah_endpoint: str
    root: Path
    mirrors: Path
    token: str
    namespace: str
    _server: _Server = field(repr=False)
    _repos: _GitRepos = field(repr=False)
    _gitattributes: bytes | None = field(repr=False, default=None)
    _log_path: Path | None = field(repr=False, default=None)

    def api(self) -> HfApi:
        """An ``HfApi`` bound to this hub's endpoint and token."""
        from huggingface_hub import HfApi

        return HfApi(endpoint=self.endpoint, token=self.token)

    def repo_path(self, repo_id: str, repo_type: str = "model") -> Path:
        """Directory of the bare git repository behind ``repo_id``."""
        return self._repos.path(repo_type, repo_id)

    def git(self, repo_id: str, *args: str, repo_type: str = "model") -> str:
        """Run a git command in the repository and return its stdout (``"log", "--oneline"``)."""
        proc = self._repos.git(self.repo_path(repo_id, repo_type), *args)
        return proc.stdout.decode()

    def create_repo(self, repo_id: str, repo_type: str = "model") -> str:
        """Create a repository directly (no HTTP); return the sha of its initial commit."""
        repo = self.repo_path(repo_id, repo_type)
        with self._repos.lock(repo):
            if self._repos.exists(repo):
                raise FileExistsError(repo)
            return self._repos.create(repo, self._gitattributes)

    def commit_files(
        self,
        repo_id: str,
        files: Mapping[str, bytes],
        *,
        message: str = "seed files",
        branch: str = "main",
        delete: tuple[str, ...] = (),
        repo_type: str = "model",
    ) -> str:
        """Commit files directly with git (no HTTP), creating the repo if needed; return the sha.

        Raises ``ValueError`` for contents the hub cannot serve (see the module docstring).
        """
        repo = self.repo_path(repo_id, repo_type)
        if not self._repos.exists(repo):
            self.create_repo(repo_id, repo_type)
        try:
            return self._repos.commit(
                repo, branch, dict(files), [(p, False) for p in delete], message, "", None
            )
        except _HubError as err:
            raise ValueError(err.message) from err

    def head(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> str | None:
        """Commit sha that ``revision`` resolves to, or ``None``."""
        return self._repos.resolve(self.repo_path(repo_id, repo_type), revision)

    @property
    def requests(self) -> list[RequestRecord]:
        """Requests server B has answered so far (oldest first)."""
        return self._server.records()

    def clear_requests(self) -> None:
        """Forget the request log."""
        self._server.clear_records()

    def olah_log(self) -> str:
        """olah's stdout/stderr so far."""
        if self._log_path is None or not self._log_path.exists():
            return ""
        return self._log_path.read_text(errors="replace")


def _stop_process(proc: subprocess.Popen[bytes], timeout: float = 5.0) -> None:
    """Terminate a process we started, then kill it if it lingers."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout)


def _die_with_parent() -> None:
    """In the olah child (Linux): get SIGKILL if the process that started it dies uncleanly.

    Covers a test run killed by a timeout or ``kill -9``, where ``olah_hub``'s cleanup never runs.
    Linux sends the signal when the *thread* that started olah exits, so keep the context manager
    in one thread.
    """
    if sys.platform.startswith("linux"):
        with contextlib.suppress(Exception):
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _toml_str(value: str) -> str:
    return json.dumps(value)


def _wait_olah_ready(
    proc: subprocess.Popen[bytes], port: int, deadline: float
) -> Literal["ready", "exited"]:
    """Poll olah until any HTTP answer on a repo API route (``/`` is a 500 in olah 0.5)."""
    url = f"http://{_HOST}:{port}/api/models/hubserver-probe/probe/revision/main"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return "exited"
        try:
            with urllib.request.urlopen(url, timeout=1.0):
                return "ready"
        except urllib.error.HTTPError as err:
            if err.code < 500:
                return "ready"
        except OSError:
            pass
        time.sleep(0.1)
    raise TimeoutError


@contextlib.contextmanager
def olah_hub(
    root: Path,
    *,
    startup_timeout: float = 20.0,
    olah_cli: str | None = None,
    token: str = DEFAULT_TOKEN,
    namespace: str = "zoo-test",
    initial_gitattributes: bytes | None = _INITIAL_GITATTRIBUTES,
) -> Iterator[HubServer]:
    """Start olah (A) and the publish/proxy server (B) under ``root``; stop both on exit.

    Args:
        root: working directory (created if needed): ``mirrors/`` holds the git repos,
            ``olah/`` the generated config, olah's cache and ``olah.log``.
        startup_timeout: seconds to wait for olah to answer before giving up.
        olah_cli: path to ``olah-cli`` (default: ``find_olah_cli()``).
        token: token exposed as ``HubServer.token`` (not checked).
        namespace: organisation for repos created without one.
        initial_gitattributes: content of ``.gitattributes`` in each new repo's initial commit,
            or ``None`` for an initial commit with no file.

    Raises:
        OlahNotAvailableError: if ``olah-cli`` cannot be found.
        RuntimeError: if olah does not become ready in time (the message has its log tail).
    """
    cli = olah_cli or find_olah_cli()
    if cli is None:
        raise OlahNotAvailableError(
            "olah-cli not found: install it with `python -m venv .venv-olah && "
            ".venv-olah/bin/pip install olah==0.5.4`, or set ZOO_OLAH_CLI"
        )
    root = Path(root).resolve()
    mirrors = root / "mirrors"
    olah_dir = root / "olah"
    (mirrors / "models").mkdir(parents=True, exist_ok=True)
    (olah_dir / "cache").mkdir(parents=True, exist_ok=True)
    log_path = olah_dir / "olah.log"

    repos = _GitRepos(mirrors)
    state = _PublishState(repos=repos, namespace=namespace, gitattributes=initial_gitattributes)
    handler = type("PublishHandler", (_PublishHandler,), {"state": state})
    server = _Server(handler)
    state.endpoint = f"http://{_HOST}:{server.port}"
    server.start()
    proc: subprocess.Popen[bytes] | None = None
    try:
        for _attempt in range(3):
            port = _free_port()
            config = olah_dir / "olah.toml"
            config.write_text(
                "[basic]\n"
                f"host = {_toml_str(_HOST)}\n"
                f"port = {port}\n"
                f"repos-path = {_toml_str(str(olah_dir / 'cache'))}\n"
                f"mirrors-path = [{_toml_str(str(mirrors))}]\n"
                f"mirror-netloc = {_toml_str(f'{_HOST}:{server.port}')}\n"
                f"mirror-lfs-netloc = {_toml_str(f'{_HOST}:{server.port}')}\n"
                "metadata-cache-ttl = 0\n"
                "\n[accessibility]\noffline = true\n"
            )
            env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "OLAH_"))}
            env["PYTHONUNBUFFERED"] = "1"
            with open(log_path, "ab") as log:
                proc = subprocess.Popen(
                    [cli, "-c", str(config)],
                    cwd=olah_dir,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=env,
                    start_new_session=True,
                    preexec_fn=_die_with_parent,  # noqa: PLW1509 - single-threaded child setup
                )
            outcome: str
            try:
                outcome = _wait_olah_ready(proc, port, time.monotonic() + startup_timeout)
            except TimeoutError:
                outcome = "timeout"
            if outcome == "ready":
                break
            _stop_process(proc)
            tail = log_path.read_text(errors="replace")[-3000:]
            if outcome == "exited" and "already in use" in tail:
                continue  # lost the race for the free port: try another one
            raise RuntimeError(
                f"olah did not become ready ({outcome} after <= {startup_timeout:.0f}s); "
                f"log tail ({log_path}):\n{tail}"
            )
        else:
            raise RuntimeError(f"olah could not bind a free port; see {log_path}")
        state.upstream = (_HOST, port)
        yield HubServer(
            endpoint=state.endpoint,
            olah_endpoint=f"http://{_HOST}:{port}",
            root=root,
            mirrors=mirrors,
            token=token,
            namespace=namespace,
            _server=server,
            _repos=repos,
            _gitattributes=initial_gitattributes,
            _log_path=log_path,
        )
    finally:
        state.upstream = None
        if proc is not None:
            _stop_process(proc)
        server.stop()


# --------------------------------------------------------------------------------------------
# Server C: minimal in-memory read server with injectable faults
# --------------------------------------------------------------------------------------------


FaultKind = Literal["status", "truncate", "corrupt", "slow"]


@dataclass
class Fault:
    """A fault applied to the requests for one target (file path or API route).

    Attributes:
        kind: ``status`` (answer ``status`` instead), ``truncate`` (announce the full
            ``Content-Length`` but close after ``after_bytes`` body bytes), ``corrupt`` (serve
            ``data``, or the true bytes with every byte flipped, instead of the true bytes) or
            ``slow`` (sleep ``delay_s`` before each ``chunk_size`` chunk of the body).
        times: apply to the first ``times`` matching requests only; ``None`` means always.
        status: HTTP status for ``status`` faults.
        error_code: ``X-Error-Code`` for ``status`` faults (404 on a file defaults to
            ``EntryNotFound``).
        retry_after: ``Retry-After`` seconds sent with 429/5xx ``status`` faults (``None``: no
            header, the client then backs off 1, 2, 4, 8, 8 s; with ``0`` it waits 1 s per retry).
        methods: HTTP methods the fault applies to (body faults only ever apply to GET).
    """

    kind: FaultKind
    times: int | None = None
    status: int = 500
    error_code: str | None = None
    retry_after: int | None = 0
    after_bytes: int = 0
    data: bytes | None = None
    delay_s: float = 0.0
    chunk_size: int = 16 * 1024
    methods: tuple[str, ...] = ("HEAD", "GET")


@dataclass
class _Revision:
    sha: str
    files: dict[str, bytes]


@dataclass
class _FaultState:
    repo_id: str
    lfs_threshold: int | None
    lock: threading.Lock = field(default_factory=threading.Lock)
    cond: threading.Condition = field(init=False)
    revisions: dict[str, _Revision] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    faults: dict[str, Fault] = field(default_factory=dict)
    sent: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.cond = threading.Condition(self.lock)

    def take_fault(self, target: str, method: str, body: bool) -> Fault | None:
        """Return (and count down) the fault for ``target`` if it applies to this request."""
        with self.lock:
            fault = self.faults.get(target)
            if fault is None or method not in fault.methods or (body and method != "GET"):
                return None
            if (fault.kind != "status") != body:
                return None
            if fault.times is not None:
                fault.times -= 1
                if fault.times <= 0:
                    del self.faults[target]
            return replace(fault)


def _revision_sha(files: Mapping[str, bytes], parent: str | None) -> str:
    digest = hashlib.sha1(b"zoo-fault-hub\x00" + (parent or "").encode())
    for path in sorted(files):
        digest.update(f"{path}\x00{git_blob_oid(files[path])}\x00".encode())
    return digest.hexdigest()


class _FaultHandler(_Handler):
    """Server C: read-only Hub routes from memory, with the faults configured in ``state``."""

    state: ClassVar[_FaultState]

    def route(self) -> None:
        """Dispatch resolve and API routes."""
        segs, query = _split_path(self.path)
        repo_id = self.state.repo_id
        org, name = repo_id.split("/", 1)
        if self.command not in ("GET", "HEAD"):
            raise _HubError(405, "the fault hub is read-only")
        if len(segs) >= 4 and segs[:2] == ["api", "models"]:
            if segs[2:4] != [org, name]:
                raise _HubError(401, "Repository not found", "RepoNotFound")
            action, rest = (segs[4], segs[5:]) if len(segs) > 4 else ("revision", ["main"])
            if action == "revision" and rest:
                return self._revision(rest[0])
            if action == "tree" and rest:
                recursive = query.get("recursive", ["false"])[0].lower() in ("1", "true")
                return self._tree(rest[0], "/".join(p for p in rest[1:] if p), recursive)
            if action == "refs":
                return self._refs()
            raise _HubError(404, f"route not served by the fault hub: {self.path}")
        if len(segs) >= 5 and segs[2] == "resolve":
            if segs[:2] != [org, name]:
                raise _HubError(401, "Repository not found", "RepoNotFound")
            return self._resolve(segs[3], "/".join(segs[4:]))
        raise _HubError(404, f"route not served by the fault hub: {self.path}")

    # -- helpers ---------------------------------------------------------------------------

    def _lookup(self, rev: str) -> _Revision:
        with self.state.lock:
            sha = self.state.branches.get(rev, rev)
            revision = self.state.revisions.get(sha)
        if revision is None:
            raise _HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        return revision

    def _is_lfs(self, data: bytes) -> bool:
        threshold = self.state.lfs_threshold
        return threshold is not None and len(data) >= threshold

    def _status_fault(self, target: str, default_code: str | None = None) -> None:
        fault = self.state.take_fault(target, self.command, body=False)
        if fault is None:
            return
        headers: dict[str, str] = {}
        if fault.retry_after is not None and (fault.status == 429 or fault.status >= 500):
            headers["Retry-After"] = str(fault.retry_after)
        code = fault.error_code or (default_code if fault.status == 404 else None)
        raise _HubError(fault.status, f"injected fault: {fault.status}", code, headers)

    def _file_entry(self, path: str, data: bytes) -> dict[str, Any]:
        entry: dict[str, Any] = {
            "type": "file",
            "oid": git_blob_oid(data),
            "size": len(data),
            "path": path,
        }
        if self._is_lfs(data):
            pointer = (
                "version https://git-lfs.github.com/spec/v1\n"
                f"oid sha256:{hashlib.sha256(data).hexdigest()}\nsize {len(data)}\n"
            ).encode()
            entry["oid"] = git_blob_oid(pointer)
            entry["lfs"] = {
                "oid": hashlib.sha256(data).hexdigest(),
                "size": len(data),
                "pointerSize": len(pointer),
            }
        return entry

    # -- routes ------------------------------------------------------------------------------

    def _revision(self, rev: str) -> None:
        self._status_fault(FaultHub.REVISION_API)
        revision = self._lookup(rev)
        siblings = []
        for path, data in sorted(revision.files.items()):
            entry = self._file_entry(path, data)
            sibling: dict[str, Any] = {"rfilename": path, "size": len(data)}
            sibling["blobId"] = entry["oid"]
            if "lfs" in entry:
                lfs = entry["lfs"]
                sibling["lfs"] = {"sha256": lfs["oid"], "size": len(data), "pointerSize": 0}
            siblings.append(sibling)
        info = {
            "_id": revision.sha[:24],
            "id": self.state.repo_id,
            "modelId": self.state.repo_id,
            "author": self.state.repo_id.split("/")[0],
            "sha": revision.sha,
            "lastModified": "2024-01-01T00:00:00.000Z",
            "createdAt": "2024-01-01T00:00:00.000Z",
            "private": False,
            "gated": False,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "siblings": siblings,
        }
        self._send_body(FaultHub.REVISION_API, json.dumps(info).encode(), "application/json", {})

    def _tree(self, rev: str, base: str, recursive: bool) -> None:
        self._status_fault(FaultHub.TREE_API)
        revision = self._lookup(rev)
        prefix = f"{base}/" if base else ""
        if base and not any(p.startswith(prefix) for p in revision.files):
            raise _HubError(404, f"Entry not found: {base}", "EntryNotFound")
        entries: list[dict[str, Any]] = []
        dirs: set[str] = set()
        for path, data in sorted(revision.files.items()):
            if not path.startswith(prefix):
                continue
            rel = path[len(prefix) :].split("/")
            for depth in range(1, len(rel)):
                directory = prefix + "/".join(rel[:depth])
                if directory not in dirs and (recursive or depth == 1):
                    dirs.add(directory)
                    oid = hashlib.sha1(f"tree:{revision.sha}:{directory}".encode()).hexdigest()
                    entries.append({"type": "directory", "oid": oid, "size": 0, "path": directory})
            if recursive or len(rel) == 1:
                entries.append(self._file_entry(path, data))
        self._send_body(FaultHub.TREE_API, json.dumps(entries).encode(), "application/json", {})

    def _refs(self) -> None:
        with self.state.lock:
            branches = [
                {"name": n, "ref": f"refs/heads/{n}", "targetCommit": s}
                for n, s in sorted(self.state.branches.items())
            ]
        self.send_json(200, {"branches": branches, "tags": [], "converts": []})

    def _resolve(self, rev: str, path: str) -> None:
        self._status_fault(path, default_code="EntryNotFound")
        revision = self._lookup(rev)
        data = revision.files.get(path)
        if data is None:
            raise _HubError(
                404, f"Entry not found: {path}", "EntryNotFound", {"X-Repo-Commit": revision.sha}
            )
        if self._is_lfs(data):
            sha256 = hashlib.sha256(data).hexdigest()
            headers = {"ETag": f'"{sha256}"', "X-Linked-Etag": f'"{sha256}"'}
            headers["X-Linked-Size"] = str(len(data))
        else:
            headers = {"ETag": f'"{git_blob_oid(data)}"'}
        headers["X-Repo-Commit"] = revision.sha
        headers["Accept-Ranges"] = "bytes"
        self._send_body(path, data, "application/octet-stream", headers, allow_range=True)

    def _send_body(
        self,
        target: str,
        data: bytes,
        content_type: str,
        headers: dict[str, str],
        allow_range: bool = False,
    ) -> None:
        """Send ``data`` honouring a single ``Range`` and the body fault for ``target``."""
        fault = self.state.take_fault(target, self.command, body=True)
        if fault is not None and fault.kind == "corrupt":
            data = fault.data if fault.data is not None else bytes(b ^ 0xFF for b in data)
        status, start, end = 200, 0, len(data)
        range_header = self.headers.get("Range") if allow_range else None
        match = re.fullmatch(r"bytes=(\d*)-(\d*)", (range_header or "").strip())
        if match and (match.group(1) or match.group(2)):
            first, last = match.group(1), match.group(2)
            if first:
                start, end = int(first), min(len(data), int(last) + 1 if last else len(data))
            else:
                start, end = max(0, len(data) - int(last)), len(data)
            if start >= len(data) and len(data) > 0:
                raise _HubError(
                    416, "Range Not Satisfiable", None, {"Content-Range": f"*/{len(data)}"}
                )
            status = 206
            content_range = f"bytes {start}-{max(start, end - 1)}/{len(data)}"
            headers = {**headers, "Content-Range": content_range}
        body = data[start:end]
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in headers.items():
            self.send_header(key, value)
        if fault is not None and fault.kind == "truncate":
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command == "HEAD":
            return
        limit = len(body)
        if fault is not None and fault.kind == "truncate":
            limit = min(limit, fault.after_bytes)
            self.close_connection = True
        chunk_size = fault.chunk_size if fault is not None and fault.kind == "slow" else _CHUNK
        offset = 0
        while offset < limit:
            slow = fault is not None and fault.kind == "slow"
            if slow and fault is not None and self.server.stopping.wait(fault.delay_s):
                break
            if self.server.stopping.is_set():
                break
            chunk = body[offset : min(limit, offset + max(1, chunk_size))]
            self.wfile.write(chunk)
            offset += len(chunk)
            with self.state.cond:
                self.state.sent[target] = self.state.sent.get(target, 0) + len(chunk)
                self.state.cond.notify_all()
        if offset < len(body):
            self.close_connection = True
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_RDWR)


class FaultHub:
    """Handle on a running fault-injection server (C); see ``fault_hub``.

    Attributes:
        endpoint: URL to pass as ``endpoint=`` to ``huggingface_hub``.
        repo_id: the only repository served.
        revision: 40-hex commit sha of the initial files (also the head of ``main``).
        token: a token to pass to ``huggingface_hub`` (any value is accepted).
    """

    REVISION_API: ClassVar[str] = "@api/revision"
    """Fault target for ``/api/models/ORG/REPO[/revision/REV]`` (``model_info``)."""
    TREE_API: ClassVar[str] = "@api/tree"
    """Fault target for ``/api/models/ORG/REPO/tree/REV`` (``list_repo_tree``, snapshots)."""

    def __init__(self, server: _Server, state: _FaultState, revision: str, token: str) -> None:
        """Wrap a started server; use ``fault_hub`` rather than calling this directly."""
        self._server = server
        self._state = state
        self.endpoint = f"http://{_HOST}:{server.port}"
        self.repo_id = state.repo_id
        self.revision = revision
        self.token = token

    # -- content -----------------------------------------------------------------------------

    def files(self, revision: str | None = None) -> dict[str, bytes]:
        """The true files of ``revision`` (default: the head of ``main``)."""
        with self._state.lock:
            sha = self._state.branches.get(revision or "main", revision or "")
            return dict(self._state.revisions[sha].files)

    def add_revision(self, files: Mapping[str, bytes], *, branch: str | None = "main") -> str:
        """Add a revision (parent: head of ``branch``), move ``branch`` to it; return its sha."""
        with self._state.lock:
            parent = self._state.branches.get(branch) if branch else None
            sha = _revision_sha(files, parent)
            self._state.revisions[sha] = _Revision(sha, dict(files))
            if branch:
                self._state.branches[branch] = sha
        return sha

    def set_branch(self, branch: str, sha: str) -> None:
        """Point ``branch`` at an existing revision."""
        with self._state.lock:
            if sha not in self._state.revisions:
                raise KeyError(sha)
            self._state.branches[branch] = sha

    # -- faults ------------------------------------------------------------------------------

    def set_fault(self, target: str, fault: Fault) -> None:
        """Install ``fault`` for ``target`` (a file path, ``REVISION_API`` or ``TREE_API``)."""
        if fault.times is not None and fault.times <= 0:
            raise ValueError("times must be positive or None")
        with self._state.lock:
            self._state.faults[target] = replace(fault)

    def fail(
        self,
        target: str,
        status: int = 500,
        *,
        times: int | None = None,
        error_code: str | None = None,
        retry_after: int | None = 0,
        methods: tuple[str, ...] = ("HEAD", "GET"),
    ) -> None:
        """Answer ``status`` for ``target`` (always, or the first ``times`` requests)."""
        self.set_fault(
            target,
            Fault(
                "status",
                times=times,
                status=status,
                error_code=error_code,
                retry_after=retry_after,
                methods=methods,
            ),
        )

    def truncate(self, target: str, after_bytes: int, *, times: int | None = None) -> None:
        """Send the full ``Content-Length`` but close after ``after_bytes`` bytes of each body.

        ``huggingface_hub`` 2.4 retries a short body up to 5 times, ~1 s apart, resuming with a
        ``Range`` request from the bytes it already wrote; it writes in 10 MB chunks, so a smaller
        file restarts from 0 and a truncation on every request raises
        ``httpx2.RemoteProtocolError`` (a bigger file may creep forward and complete), while
        ``times=1`` is recovered on the first retry.
        """
        self.set_fault(target, Fault("truncate", times=times, after_bytes=after_bytes))

    def corrupt(self, target: str, data: bytes | None = None, *, times: int | None = None) -> None:
        """Serve ``data`` (default: the true bytes, each flipped); HEAD still tells the truth."""
        self.set_fault(target, Fault("corrupt", times=times, data=data))

    def slow(
        self,
        target: str,
        delay_s: float,
        *,
        chunk_size: int = 16 * 1024,
        times: int | None = None,
    ) -> None:
        """Sleep ``delay_s`` before each ``chunk_size`` chunk of the body (interrupted on stop)."""
        self.set_fault(target, Fault("slow", times=times, delay_s=delay_s, chunk_size=chunk_size))

    def clear_faults(self, target: str | None = None) -> None:
        """Remove the fault of ``target``, or all faults."""
        with self._state.lock:
            if target is None:
                self._state.faults.clear()
            else:
                self._state.faults.pop(target, None)

    # -- observation -------------------------------------------------------------------------

    @property
    def requests(self) -> list[RequestRecord]:
        """Requests answered so far (oldest first)."""
        return self._server.records()

    def clear_requests(self) -> None:
        """Forget the request log."""
        self._server.clear_records()

    def count(self, method: str | None = None, contains: str = "") -> int:
        """Count logged requests with ``method`` (any if ``None``) whose path has ``contains``."""
        return sum(
            1
            for r in self.requests
            if (method is None or r.method == method) and contains in r.path
        )

    def bytes_sent(self, target: str) -> int:
        """Body bytes sent so far for ``target`` (all requests together)."""
        with self._state.lock:
            return self._state.sent.get(target, 0)

    def wait_for_bytes(self, target: str, at_least: int, timeout: float = 10.0) -> bool:
        """Block until ``bytes_sent(target) >= at_least``; ``False`` on timeout."""
        with self._state.cond:
            return self._state.cond.wait_for(
                lambda: self._state.sent.get(target, 0) >= at_least, timeout
            )


@contextlib.contextmanager
def fault_hub(
    files: Mapping[str, bytes],
    repo_id: str = "zoo-test/fault",
    *,
    lfs_threshold: int | None = None,
    token: str = DEFAULT_TOKEN,
) -> Iterator[FaultHub]:
    """Serve ``files`` as the ``main`` revision of ``repo_id`` on a fault-injection server (C).

    Args:
        files: ``{path_in_repo: content}`` of the initial revision.
        repo_id: ``ORG/NAME`` of the only repository served (others answer ``RepoNotFound``).
        lfs_threshold: files of at least this many bytes are presented as LFS files (ETag is the
            sha256, tree entries carry ``lfs``), like the Hub does for large binaries.
        token: token exposed as ``FaultHub.token`` (not checked).
    """
    if "/" not in repo_id:
        raise ValueError("repo_id must be ORG/NAME")
    state = _FaultState(repo_id=repo_id, lfs_threshold=lfs_threshold)
    sha = _revision_sha(files, None)
    state.revisions[sha] = _Revision(sha, dict(files))
    state.branches["main"] = sha
    handler = type("FaultHandler", (_FaultHandler,), {"state": state})
    server = _Server(handler)
    server.start()
    try:
        yield FaultHub(server, state, sha, token)
    finally:
        server.stop()


def _download_cli(argv: list[str]) -> int:
    """``python hubserver.py download ENDPOINT REPO REV PATH CACHE``: a killable client process."""
    from huggingface_hub import hf_hub_download

    endpoint, repo_id, revision, filename, cache_dir = argv
    path = hf_hub_download(
        repo_id,
        filename,
        revision=revision,
        endpoint=endpoint,
        cache_dir=cache_dir,
        token=DEFAULT_TOKEN,
    )
    print(path)
    return 0


_COMMANDS: dict[str, Callable[[list[str]], int]] = {"download": _download_cli}

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in _COMMANDS:
        sys.exit(f"usage: {sys.argv[0]} {{{','.join(_COMMANDS)}}} ARGS...")
    sys.exit(_COMMANDS[sys.argv[1]](sys.argv[2:]))
