"""The client's handle on a `zoo serve` server: it stands in for concrete-ml's FHEModelServer.

    model = zoo.fhe.runtime.load("cifar10-split-tiny", role="client", server_url="http://host:8000")
    model.predict(images, fhe="execute")        # encrypts here, runs there, decrypts here

:class:`RemoteServer` has ``run(serialized_input, serialized_eval_keys) -> bytes``, the same
call as ``FHEModelServer.run``, so :meth:`zoo.fhe.runtime.Model.logits` works unchanged. Only
evaluation keys and ciphertexts are sent; the secret key never leaves the client. The keys are
uploaded once (the server names them by their sha256, and is asked first whether it has them).
"""

from __future__ import annotations

import hashlib
import os
import re
from typing import Any

import requests

from zoo.catalog.registry import Build
from zoo.errors import ServerError

REVISION_HEADER = "X-Zoo-Revision"
SECONDS_HEADER = "X-Zoo-Seconds"
OCTETS = {"Content-Type": "application/octet-stream"}
HINTS = {
    400: "the server refused what this client sent; see the detail above",
    404: "check the URL (a `zoo serve` server answers GET /health)",
    409: "the client and the server must run the same build",
    401: "set ZOO_SERVE_TOKEN to a token the server accepts (its --token-file)",
    413: "the upload is over the server's limit (for evaluation keys: its --max-key-bytes)",
    503: "the server is busy with other clients: retry in a while",
}
TOKEN_ENV = "ZOO_SERVE_TOKEN"


class RemoteServer:
    """Runs a build's FHE circuit on a `zoo serve` server at ``url``."""

    def __init__(
        self, url: str, build: Build, *, timeout: float = 30.0, token: str | None = None
    ) -> None:
        self.url = url.rstrip("/")
        self.build = build
        self.timeout = timeout  # connect, and every request but /run (FHE takes minutes)
        self.session = requests.Session()
        self.session.headers[REVISION_HEADER] = build.revision
        token = token or os.environ.get(TOKEN_ENV, "").strip()
        if token:
            self.session.headers["Authorization"] = f"Bearer {token}"
        self.seconds: list[float] = []  # server-side FHE time of each run
        self._checked = False
        self._uploaded: set[str] = set()

    def _request(self, method: str, path: str, *, ok: tuple[int, ...] = (200,),
                 slow: bool = False, **kwargs: Any) -> requests.Response:  # fmt: skip
        """One request; ``slow``: no read timeout (uploads of keys, FHE runs)."""
        timeout = (self.timeout, None if slow else self.timeout)
        try:
            response = self.session.request(method, self.url + path, timeout=timeout, **kwargs)
        except requests.ReadTimeout:
            raise ServerError(
                f"the zoo server at {self.url} took the connection but did not answer in "
                f"{self.timeout:.0f} s",
                hint="it may still be loading its build (minutes for a large one): retry later",
            ) from None
        except requests.RequestException as exc:
            errno = re.search(r"\[Errno -?\d+\] [^'\")]*", str(exc))
            raise ServerError(
                f"cannot reach the zoo server at {self.url} ({errno[0] if errno else repr(exc)})",
                hint=f"start one with `zoo serve {self.build.variant} --port PORT`, "
                "or check --server",
            ) from None
        if response.status_code not in ok:
            raise ServerError(
                f"{method} {path} on {self.url}: {response.status_code} {_detail(response)}",
                hint=HINTS.get(response.status_code, "see the server's log"),
            )
        return response

    def _json(self, response: requests.Response) -> dict[str, Any]:
        try:
            data = response.json()
        except ValueError:
            data = None
        if not isinstance(data, dict):
            raise ServerError(
                f"{self.url} answered {response.request.path_url} with something other than JSON",
                hint="is it a `zoo serve` server? check --server",
            )
        return data

    def health(self) -> dict[str, Any]:
        """The server's ``/health``; refuses a server that runs another build."""
        data = self._json(self._request("GET", "/health"))
        served = f"{data.get('variant')}@{str(data.get('revision'))[:12]}"
        if (data.get("variant"), data.get("revision")) != (self.build.variant, self.build.revision):
            raise ServerError(
                f"{self.url} serves {served}, not {self.build.short_ref}",
                hint=f"predict with the build it serves ({data.get('variant')}@"
                f"{data.get('revision')}), or serve {self.build.ref} there",
            )
        self._checked = True
        return data

    def info(self) -> dict[str, Any]:
        """The served build's manifest and the server's limits."""
        return self._json(self._request("GET", "/info"))

    def upload_keys(self, serialized_eval_keys: bytes) -> str:
        """Make sure the server holds these evaluation keys; return their key id (sha256)."""
        key_id = hashlib.sha256(serialized_eval_keys).hexdigest()
        if key_id in self._uploaded:
            return key_id
        present = self._request("HEAD", f"/keys/{key_id}", ok=(200, 404)).status_code == 200
        if not present:
            limit = self.info().get("limits", {}).get("max_key_bytes")
            if limit is not None and len(serialized_eval_keys) > limit:
                raise ServerError(
                    f"the evaluation keys take {len(serialized_eval_keys):,} bytes, over the "
                    f"server's limit of {limit:,}",
                    hint=HINTS[413],
                )
            answer = self._json(self._request("POST", "/keys", data=serialized_eval_keys,
                                              headers=OCTETS, slow=True))  # fmt: skip
            if answer.get("key_id") != key_id:
                raise ServerError(
                    f"the server stored the keys as {answer.get('key_id')!r}, not {key_id}",
                    hint="the upload was altered on the way; retry, or check what is between "
                    "this client and the server",
                )
        self._uploaded.add(key_id)
        return key_id

    def run(self, serialized_input: bytes, serialized_eval_keys: bytes) -> bytes:
        """Run the circuit on the server: FHEModelServer.run's call, over HTTP."""
        if not self._checked:
            self.health()
        for _ in range(2):  # a second time if the server evicted the keys meanwhile
            key_id = self.upload_keys(serialized_eval_keys)
            response = self._request("POST", "/run", params={"key_id": key_id}, ok=(200, 404),
                                     slow=True, data=serialized_input, headers=OCTETS)  # fmt: skip
            if response.status_code == 200:
                self.seconds.append(float(response.headers.get(SECONDS_HEADER, "nan")))
                return response.content
            self._uploaded.discard(key_id)
        raise ServerError(f"POST /run on {self.url}: 404 {_detail(response)}",
                          hint="the server keeps evicting the keys: restart it with a larger "
                          "--max-keys")  # fmt: skip


def _detail(response: requests.Response) -> str:
    """The server's ``detail`` message, or the start of the body."""
    try:
        detail = response.json().get("detail")
    except (ValueError, AttributeError):
        detail = None
    return str(detail) if detail else (response.text.strip()[:300] or str(response.reason or ""))
