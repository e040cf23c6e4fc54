"""The child process in which `zoo serve` runs a build's FHE circuit.

concrete does not check that evaluation keys belong to the circuit: keys made for another
circuit trip a C++ assertion and abort the whole process (SIGABRT). So the HTTP server keeps the
circuit in this child: a crash costs one request, and the next request starts a fresh child.
The two talk over the child's stdin/stdout in frames of a JSON header and raw bytes (no
pickle); whatever the child prints goes to stderr. The child keeps the deserialized evaluation
keys of the last few key ids in memory.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import IO, Any

from zoo.errors import ZooError
from zoo.fhe import sigpipe

log = logging.getLogger(__name__)

FRAME = struct.Struct(">IQ")  # header length, payload length
CRASH_SIGNALS = {signal.SIGABRT, signal.SIGSEGV, signal.SIGBUS, signal.SIGFPE, signal.SIGILL}


class WorkerRefused(Exception):
    """The child answered with an error: ``status`` is bad_keys, bad_input, missing_keys, error."""

    def __init__(self, status: str, message: str) -> None:
        super().__init__(message)
        self.status = status


class WorkerCrashed(Exception):
    """The child died while handling a request (``returncode`` < 0: killed by that signal)."""

    def __init__(self, returncode: int | None) -> None:
        self.returncode = returncode
        super().__init__(f"the FHE worker died ({describe_exit(returncode)})")

    @property
    def aborted(self) -> bool:
        """True when concrete aborted or faulted (bad input), not when it was killed."""
        return self.returncode is not None and -self.returncode in CRASH_SIGNALS


def describe_exit(returncode: int | None) -> str:
    """``signal SIGABRT`` or ``exit code 1``."""
    if returncode is not None and returncode < 0:
        try:
            return f"signal {signal.Signals(-returncode).name}"
        except ValueError:
            return f"signal {-returncode}"
    return f"exit code {returncode}"


def write_frame(stream: IO[bytes], header: dict[str, Any], payload: bytes = b"") -> None:
    """Send one frame: a JSON header and raw bytes."""
    data = json.dumps(header).encode()
    stream.write(FRAME.pack(len(data), len(payload)) + data)
    stream.write(payload)
    stream.flush()


def read_frame(stream: IO[bytes]) -> tuple[dict[str, Any], bytes] | None:
    """Receive one frame, or None at end of stream."""
    head = stream.read(FRAME.size)
    if len(head) < FRAME.size:
        return None
    header_size, payload_size = FRAME.unpack(head)
    header = stream.read(header_size)
    payload = stream.read(payload_size)
    if len(header) < header_size or len(payload) < payload_size:
        return None
    return json.loads(header), payload


class FheWorker:
    """The parent's handle on the child; one request at a time, restarted after a crash."""

    def __init__(self, ref: str, registry_path: Path | None = None, max_cached_keys: int = 2):
        self.ref = ref
        self.registry_path = registry_path
        self.max_cached_keys = max_cached_keys
        self._proc: subprocess.Popen[bytes] | None = None
        self._scratch: str | None = None  # the child's TMPDIR, removed once it has exited
        self._lock = threading.Lock()
        self._closed = False

    def start(self) -> None:
        """Start the child (if it is not running) and wait until it has loaded the build."""
        with self._lock:
            self._ensure()

    def _ensure(self) -> subprocess.Popen[bytes]:
        if self._closed:
            raise ZooError("the FHE worker is shut down")
        if self._proc is not None and self._proc.poll() is None:
            return self._proc
        self._reap()  # a child that exited between requests
        # -P (Python 3.11+): `-m` would put the current folder first on the child's import path,
        # so a zoo/ or numpy.py lying there would run as the server; it imports what we import.
        safe = ["-P"] if sys.version_info >= (3, 11) else []
        command = [sys.executable, *safe, "-m", "zoo.fhe.worker", self.ref,
                   "--max-cached-keys", str(self.max_cached_keys)]  # fmt: skip
        if self.registry_path is not None:
            command += ["--registry", str(self.registry_path)]
        # concrete unpacks and compiles the circuit under TMPDIR and never removes it; a child
        # that dies by a signal cannot either, so the parent removes the folder it gave it
        self._scratch = tempfile.mkdtemp(prefix="zoo-worker-")
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p),
               "TMPDIR": self._scratch}  # fmt: skip
        proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
        self._proc = proc
        assert proc.stdout is not None
        reply = read_frame(proc.stdout)
        if reply is None or reply[0]["status"] != "ok":
            message = reply[0]["message"] if reply else describe_exit(proc.wait())
            proc.kill()
            self._reap()
            raise ZooError(f"the FHE worker could not load {self.ref}: {message}",
                           hint="see the server's log above")  # fmt: skip
        return proc

    def _reap(self) -> None:
        """Wait for the child (if any) to exit, then remove its TMPDIR."""
        proc, self._proc = self._proc, None
        if proc is not None:
            proc.wait()
        if self._scratch is not None:
            shutil.rmtree(self._scratch, ignore_errors=True)
            self._scratch = None

    def _call(self, header: dict[str, Any], payload: bytes = b"") -> tuple[dict[str, Any], bytes]:
        with self._lock:
            proc = self._ensure()
            assert proc.stdin is not None and proc.stdout is not None
            try:
                write_frame(proc.stdin, header, payload)
                reply = read_frame(proc.stdout)
            except OSError:  # the pipe broke: the child is gone
                reply = None
            if reply is None:
                returncode = proc.wait()  # its own: close() may have reaped it meanwhile
                self._reap()
                raise WorkerCrashed(returncode)
        if reply[0]["status"] != "ok":
            raise WorkerRefused(reply[0]["status"], reply[0]["message"])
        return reply

    def check_keys(self, key_id: str, path: Path) -> None:
        """Deserialize the evaluation keys in ``path`` and keep them under ``key_id``."""
        self._call({"op": "check_keys", "key_id": key_id, "path": str(path)})

    def run(self, key_id: str, path: Path, ciphertext: bytes) -> tuple[bytes, float]:
        """Run the circuit on a serialized encrypted input: (serialized result, seconds)."""
        header, result = self._call({"op": "run", "key_id": key_id, "path": str(path)}, ciphertext)
        return result, header["seconds"]

    def close(self) -> None:
        """Stop the child (a request in progress fails with :class:`WorkerCrashed`)."""
        self._closed = True
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
        self._reap()


# --- the child ------------------------------------------------------------------------------


class _Refused(Exception):
    def __init__(self, status: str, message: str) -> None:
        super().__init__(message)
        self.status = status


def _first(exc: BaseException) -> str:
    """The first line of concrete's message (the rest is a native stack trace)."""
    lines = str(exc).strip().splitlines()
    return (lines[0] if lines else type(exc).__name__)[:300]


class _Keys:
    """Deserialized evaluation keys of the most recently used key ids."""

    def __init__(self, size: int) -> None:
        self.size = max(1, size)
        self._cache: OrderedDict[str, Any] = OrderedDict()

    def get(self, key_id: str, path: str) -> Any:
        from concrete import fhe

        if key_id in self._cache:
            self._cache.move_to_end(key_id)
            return self._cache[key_id]
        try:
            data = Path(path).read_bytes()
        except FileNotFoundError:
            raise _Refused("missing_keys", f"evaluation keys {key_id} are gone") from None
        try:
            keys = fhe.EvaluationKeys.deserialize(data)
        except RuntimeError as exc:
            raise _Refused(
                "bad_keys", f"these bytes are not evaluation keys ({_first(exc)})"
            ) from None
        del data
        while len(self._cache) >= self.size:
            self._cache.popitem(last=False)
        self._cache[key_id] = keys
        return keys


def _serve(model: Any, keys: _Keys, header: dict[str, Any], payload: bytes) -> tuple[dict, bytes]:
    evaluation_keys = keys.get(header["key_id"], header["path"])
    if header["op"] == "check_keys":
        return {"status": "ok"}, b""
    started = time.perf_counter()
    try:
        result = model.server.run(payload, evaluation_keys)
    except (RuntimeError, AssertionError, ValueError) as exc:
        raise _Refused(
            "bad_input", f"not an encrypted input of this build ({_first(exc)})"
        ) from None
    finally:
        sigpipe.restore()
    seconds = time.perf_counter() - started
    log.info("ran the circuit for key %s in %.1f s", header["key_id"][:12], seconds)
    return {"status": "ok", "seconds": seconds}, result


def main(argv: list[str] | None = None) -> int:
    """Child entry point: load the build's server side, then answer frames until stdin ends."""
    parser = argparse.ArgumentParser(prog="python -m zoo.fhe.worker")
    parser.add_argument("ref")
    parser.add_argument("--registry", type=Path, default=None)
    parser.add_argument("--max-cached-keys", type=int, default=2)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")  # to stderr
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the server decides when the worker stops
    requests = os.fdopen(os.dup(0), "rb")
    replies = os.fdopen(os.dup(1), "wb")
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    os.dup2(2, 1)  # prints from concrete or torch must not corrupt the frames
    from zoo.fhe import runtime

    try:
        model = runtime.load(args.ref, role="server", registry_path=args.registry, offline=True)
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which raises it
        write_frame(replies, {"status": "error", "message": f"{type(exc).__name__}: {exc}"})
        return 1
    write_frame(replies, {"status": "ok"})
    keys = _Keys(args.max_cached_keys)
    while (frame := read_frame(requests)) is not None:
        try:
            header, payload = _serve(model, keys, *frame)
        except _Refused as exc:
            header, payload = {"status": exc.status, "message": str(exc)}, b""
        except Exception as exc:  # noqa: BLE001 - one failed request, not a dead worker
            header, payload = (
                {"status": "error", "message": f"{type(exc).__name__}: {_first(exc)}"},
                b"",
            )
        write_frame(replies, header, payload)
    return 0


if __name__ == "__main__":
    sys.exit(main())
