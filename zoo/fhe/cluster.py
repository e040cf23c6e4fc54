"""Run a build's encrypted circuit on a Ray cluster (``zoo eval --backend ray``).

The driver is the client: it encrypts and decrypts, and the secret key stays with it. Workers
get only ``server.zip`` and the evaluation keys, put once in Ray's object store and loaded once
per worker: each worker is an actor that unpacks the circuit and deserializes the keys in its
constructor. A worker that dies is restarted by Ray (``max_restarts``) and the task it was
running is retried (``max_task_retries``); results are handed back as each one finishes, so a
failure costs at most the images in flight.

Without ``address`` (or ``RAY_ADDRESS``) a local Ray instance is started with ``workers`` CPUs
(one actor each). Each worker checks its own concrete-ml / concrete-python / Python against the
build's before it loads the circuit: a cluster node set up otherwise is refused, not used.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from zoo.catalog import versions
from zoo.errors import IntegrityError, RuntimeMismatchError, ZooError
from zoo.fhe import sigpipe

#: How often Ray may restart a crashed worker, and retry the task it was running.
RETRIES = 3


@functools.lru_cache(maxsize=1)
def _worker_class() -> Any:
    import ray

    @ray.remote(num_cpus=1, max_restarts=RETRIES, max_task_retries=RETRIES)
    class CircuitWorker:
        """One circuit and one set of evaluation keys, loaded once."""

        def __init__(
            self, server_zip: bytes, sha256: str, eval_keys: bytes, runtime: dict[str, str]
        ) -> None:
            self.problems = versions.mismatches(runtime)
            if self.problems:
                return  # the driver asks mismatches() and refuses; nothing of the build is loaded
            from concrete import fhe
            from concrete.ml.deployment import FHEModelServer

            from zoo.fhe.runtime import circuit_tempdir
            from zoo.store.gate import check_zip

            if hashlib.sha256(server_zip).hexdigest() != sha256:
                raise IntegrityError("server.zip changed on its way to the worker")
            with tempfile.TemporaryDirectory(prefix="zoo-ray-") as folder:
                path = Path(folder) / "server.zip"
                path.write_bytes(server_zip)
                check_zip(path)
                with circuit_tempdir(self) as self.circuit_folder:  # what concrete unpacks
                    self.server = FHEModelServer(folder)  # loads server.zip at once
            self.keys = fhe.EvaluationKeys.deserialize(eval_keys)

        def close(self) -> None:
            """Remove what concrete unpacked (an actor that Ray ends runs no exit hook)."""
            if getattr(self, "circuit_folder", None):  # not set where the runtime mismatched
                shutil.rmtree(self.circuit_folder, ignore_errors=True)

        def pid(self) -> int:
            return os.getpid()

        def mismatches(self) -> list[str]:
            return self.problems

        def run(self, ciphertext: bytes) -> tuple[bytes, float]:
            start = time.perf_counter()
            try:
                result = self.server.run(ciphertext, self.keys)
            finally:
                sigpipe.restore()  # a no-op unless Ray runs this on the main thread
            return result, time.perf_counter() - start

    return CircuitWorker


def cluster_address(address: str | None) -> str | None:
    """The Ray cluster to join: ``address``, else ``RAY_ADDRESS``; None: start one here."""
    return address or os.environ.get("RAY_ADDRESS") or None


def run(
    build_dir: Path,
    eval_keys: bytes,
    ciphertexts: Iterable[tuple[int, bytes]],
    *,
    runtime: dict[str, str],
    address: str | None = None,
    workers: int | None = None,
) -> Iterator[tuple[int, bytes, float]]:
    """Run each ``(index, ciphertext)`` on the cluster; yield ``(index, result, seconds)``.

    Results come in the order they finish; ``seconds`` is the circuit's time on its worker.
    ``runtime`` is the build's (``Build.runtime``): a worker with other versions is refused.
    """
    try:
        import ray
    except ImportError as exc:
        raise ZooError("the ray backend needs Ray", hint="pip install 'ray>=2.9'") from exc

    started_here = not ray.is_initialized()
    joins = cluster_address(address)
    if started_here:
        ray.init(
            address=joins or "local",  # "local": a new instance, not one `ray start` left running
            num_cpus=None if joins else (workers or os.cpu_count()),
            include_dashboard=False,
            log_to_driver=False,
            configure_logging=False,
            # Ray nices workers to 15 by default; here the workers are the work.
            _system_config=None if joins else {"worker_niceness": 0},
        )
    actors: list[Any] = []
    try:
        server_zip = (Path(build_dir) / "server.zip").read_bytes()
        digest = hashlib.sha256(server_zip).hexdigest()
        zip_ref, keys_ref = ray.put(server_zip), ray.put(eval_keys)
        count = workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
        worker = _worker_class()
        idle = [worker.remote(zip_ref, digest, keys_ref, runtime) for _ in range(count)]
        actors = list(idle)
        for problems in ray.get([actor.mismatches.remote() for actor in idle]):
            if problems:
                raise RuntimeMismatchError(
                    f"a Ray worker has another runtime than the build: {'; '.join(problems)}",
                    hint="on every node of the cluster, " + versions.install_hint(runtime),
                )
        in_flight: dict[Any, tuple[int, Any]] = {}
        items = iter(ciphertexts)
        exhausted = False
        while True:
            while idle and not exhausted:
                item = next(items, None)
                if item is None:
                    exhausted = True
                    break
                actor = idle.pop()
                in_flight[actor.run.remote(item[1])] = (item[0], actor)
            if not in_flight:
                return
            (done,), _ = ray.wait(list(in_flight), num_returns=1)
            index, actor = in_flight.pop(done)
            result, seconds = ray.get(done)
            idle.append(actor)
            yield index, result, seconds
    finally:
        with contextlib.suppress(Exception):  # an actor that died took nothing more to remove
            ray.get([actor.close.remote() for actor in actors], timeout=60)
        if started_here:
            ray.shutdown()
