"""Run a pulled build: clear head → quantize → encrypt → FHE circuit → decrypt → top-k.

    model = zoo.load("cifar10-split-tiny")
    model.predict(images_uint8_nhwc, fhe="execute", top_k=3)   # or "simulate", "disable"
    module = model.torch_module()                              # the Brevitas torch module

The client side (head, ``client.zip``, keys) and the server side (``server.zip``) load from the
verified cache; the zips pass :func:`zoo.store.gate.check_zip` (safe extraction, and only the
serialized types real builds hold) before concrete-ml opens them, and the runtime versions are
checked before concrete-ml would fail on them. Client keys are generated once per build and kept
under ``$ZOO_HOME/keys`` (folder 0700, files 0600); the secret key never leaves the client.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import tempfile
import time
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from zoo import api, config
from zoo.api import DEFAULT_FHE, ROLES, check_fhe_mode
from zoo.catalog import versions
from zoo.catalog.registry import Build
from zoo.cost import machine, progress
from zoo.cost import model as cost
from zoo.errors import InputError, RuntimeMismatchError
from zoo.fhe import head, sigpipe
from zoo.store import cache
from zoo.store.gate import check_zip

#: Images per call of the clear torch module (``fhe="disable"``).
CLEAR_BATCH = 500
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer",
                   "dog", "frog", "horse", "ship", "truck")  # fmt: skip


def as_images(images: Any) -> np.ndarray:
    """uint8 (N, 32, 32, 3) from an array, a PIL image, a path, or a list of those."""
    if _is_file_or_pil(images):
        return _one_image(images)[None]
    if (
        isinstance(images, (list, tuple))
        and images
        and all(_is_file_or_pil(i) or isinstance(i, np.ndarray) for i in images)
    ):
        return np.concatenate([as_images(i) for i in images])
    array = np.asarray(images)
    if array.ndim == 3:
        array = array[None]
    if array.dtype != np.uint8:
        raise InputError(
            f"images must be uint8 pixels (0-255), got {array.dtype}",
            hint="convert with (x * 255).round().astype(np.uint8) if they are floats in [0, 1]",
        )
    if array.ndim != 4 or array.shape[1:] != (32, 32, 3):
        hint = "the layout is NHWC (N, 32, 32, 3)"
        if array.ndim == 4 and array.shape[1] == 3:
            hint += "; these look channel-first: use x.transpose(0, 2, 3, 1)"
        raise InputError(f"images must have shape (N, 32, 32, 3), got {array.shape}", hint=hint)
    if not len(array):
        raise InputError("no images given", hint="give at least one (32, 32, 3) image")
    return np.ascontiguousarray(array)


def _is_file_or_pil(item: Any) -> bool:
    return isinstance(item, (str, Path)) or type(item).__module__.startswith("PIL")


def _one_image(item: Any) -> np.ndarray:
    """One 32x32 image file or PIL image as uint8 (32, 32, 3); a missing, unreadable,
    truncated or oversized file is an InputError."""
    from PIL import Image

    try:
        image = Image.open(item) if isinstance(item, (str, Path)) else item
        if image.size != (32, 32):
            raise InputError(
                f"image {getattr(image, 'filename', '') or ''} is {image.size[0]}x"
                f"{image.size[1]}, the models take 32x32",
                hint="resize it first, e.g. PIL's image.resize((32, 32))",
            )
        return np.asarray(image.convert("RGB"), dtype=np.uint8)  # decodes: may find it cut off
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as exc:
        raise InputError(f"{item} is not a readable image file ({exc})",
                         hint="give 32x32 PNG or JPEG files") from None  # fmt: skip


@dataclass
class Prediction:
    """Top-k classes of one image."""

    labels: list[int]
    names: list[str]
    scores: list[float]


@dataclass
class Model:
    """A loaded build: its head, FHE client and/or server, and manifest."""

    build: Build
    path: Path
    role: str
    meta: dict[str, Any]
    head_tensors: dict[str, Any]
    head_config: dict[str, Any]
    client: Any = None
    server: Any = None
    timings: dict[str, Any] = field(default_factory=dict)
    _simulator: Any = field(default=None, repr=False)
    _torch: Any = field(default=None, repr=False)

    def ensure_keys(self) -> None:
        """Load the client keys from ``$ZOO_HOME/keys``, generating them the first time."""
        if "keys_generated" in self.timings:
            return
        started, ticks = time.perf_counter(), machine.cpu_ticks()
        folder = keys_dir(self.build)
        generated = not any(p.name != "keys.json" for p in folder.iterdir())
        with progress.waiting("keys", self.build.metrics.get("keygen_seconds") if generated else 0):
            self.client.generate_private_and_evaluation_keys(force=False)
        _restrict(folder)
        seconds = time.perf_counter() - started
        self.timings["keygen_seconds" if generated else "keys_load_seconds"] = seconds
        self.timings["keys_generated"] = generated
        if generated:  # a keygen time is recorded only where nothing else ran (machine.alone)
            self.timings["keygen_cpu_others"] = machine.others(ticks, machine.cpu_ticks())

    def head(self, images: Any) -> np.ndarray:
        """Run the clear head: the float circuit inputs (N, C, H, W)."""
        return head.forward(self.head_tensors, self.head_config, as_images(images))

    def logits(self, images: Any, fhe: str = DEFAULT_FHE) -> np.ndarray:
        """Dequantized logits, one row per image, computed as ``fhe`` says (:data:`FHE_MODES`):
        ``disable`` (the clear Brevitas model), ``simulate`` or ``execute`` (real FHE)."""
        check_fhe_mode(fhe)
        x = self.head(images)
        if fhe == "disable":
            return self._clear(x)
        if self.client is None or self.server is None:
            raise InputError(
                f"fhe={fhe!r} needs the client and the server",
                hint="zoo.load(ref, role='all') with circuits=True (the default)",
            )
        if fhe == "simulate":
            if self.role == "client":  # the server runs on a `zoo serve` machine
                raise InputError("fhe='simulate' needs this build's server.zip, which a client "
                                 "loaded with server_url does not pull",
                                 hint="zoo.load(ref) (role 'all') to simulate here")  # fmt: skip
            return self._simulate(x)
        self.ensure_keys()
        keys = self.client.get_serialized_evaluation_keys()
        expected = cost.estimate_seconds(self.meta.get("circuit", {}))
        rows = []
        try:
            for i in range(len(x)):
                start = time.perf_counter()
                encrypted = self.client.quantize_encrypt_serialize(x[i : i + 1])
                with progress.waiting(f"real FHE, image {i + 1}/{len(x)}", expected):
                    result = self.server.run(encrypted, keys)
                rows.append(self.client.deserialize_decrypt_dequantize(result)[0])
                self.timings.setdefault("fhe_seconds", []).append(time.perf_counter() - start)
        finally:
            sigpipe.restore()
        return np.stack(rows)

    def torch_module(self) -> Any:
        """The build's Brevitas ``torch.nn.Module`` (eval mode), made by its recipe from the
        resolved config in ``manifest.json`` and ``weights.safetensors``: what the circuit
        computes, on the head's output (``model.head(images)`` as a float tensor) to logits.
        For fine-tuning or inspection; ``fhe="disable"`` runs it."""
        if self._torch is None:
            if self.role != "all":  # only then were the weights pulled and their hash checked
                raise InputError(f"{self.build.short_ref} was loaded without its weights",
                                 hint="load it with role='all'")  # fmt: skip
            weights = self.path / "weights.safetensors"
            from safetensors.torch import load_file

            from zoo.build.run import load_recipe

            recipe = load_recipe(self.meta["recipe"]["module"])
            self._torch = recipe.torch_module(self.meta["recipe"]["config"], load_file(weights))
        return self._torch

    def _clear(self, x: np.ndarray) -> np.ndarray:
        """The clear model on head outputs, in batches of :data:`CLEAR_BATCH`."""
        import torch

        module = self.torch_module()
        with torch.no_grad():
            rows = [module(torch.from_numpy(x[i : i + CLEAR_BATCH])).numpy()
                    for i in range(0, len(x), CLEAR_BATCH)]  # fmt: skip
        return np.concatenate(rows)

    def card(self, registry_path: Path | None = None) -> str:
        """The model card with what has been measured since the build (see ``zoo card``)."""
        return api.card(self.build.ref, registry_path=registry_path)

    def _simulate(self, x: np.ndarray) -> np.ndarray:
        """The circuit of server.zip compiled for simulation: same integers, no encryption."""
        if self._simulator is None:
            with circuit_tempdir(self):
                self._simulator = _simulator(self.path / "server.zip")
        server, client = self._simulator
        processing = self.client.model
        q = processing.quantize_input(x)
        try:
            rows = [client.simulate_decrypt(server.run(q[i : i + 1])) for i in range(len(q))]
        finally:
            sigpipe.restore()
        return processing.post_processing(processing.dequantize_output(np.concatenate(rows)))

    def predict(self, images: Any, fhe: str = DEFAULT_FHE, top_k: int = 3) -> list[Prediction]:
        """Top-k labels, class names and softmax scores per image."""
        if top_k < 1:
            raise InputError(f"top_k must be at least 1, got {top_k}")
        logits = self.logits(images, fhe)
        exp = np.exp(logits - logits.max(axis=1, keepdims=True))
        probs = exp / exp.sum(axis=1, keepdims=True)
        out = []
        for row in probs:
            order = np.argsort(-row, kind="stable")[:top_k]
            names = [CIFAR10_CLASSES[i] if len(row) == 10 else str(i) for i in order]
            out.append(Prediction([int(i) for i in order], names, [float(row[i]) for i in order]))
        return out


def _simulator(server_zip: Path) -> tuple[Any, Any]:
    """(simulated server, simulated client) from the MLIR that server.zip carries."""
    import zipfile

    import jsonpickle
    from concrete import fhe

    check_zip(server_zip)  # before jsonpickle reads its configuration
    with zipfile.ZipFile(server_zip) as archive:
        mlir = archive.read("circuit.mlir").decode()
        options = jsonpickle.loads(archive.read("configuration.json").decode())
    server = fhe.Server.create(mlir, fhe.Configuration().fork(**options), is_simulated=True)
    return server, fhe.Client(server.client_specs, is_simulated=True)


@contextlib.contextmanager
def circuit_tempdir(owner: Any) -> Iterator[str]:
    """Make concrete put the folders it unpacks and compiles a circuit into under one folder of
    ``owner``'s, removed once ``owner`` is collected or the process exits (concrete-python 2.10
    never removes them: its ``Server.cleanup`` does nothing)."""
    folder = tempfile.mkdtemp(prefix="zoo-circuit-")
    remove = weakref.finalize(owner, shutil.rmtree, folder, ignore_errors=True)
    # Also at exit, registered after concrete's own handler so that it runs first: once a
    # circuit ran, concrete's runtime teardown ends the process before weakref's exit hook.
    atexit.register(remove)
    saved, tempfile.tempdir = tempfile.tempdir, folder
    try:
        yield folder
    finally:
        tempfile.tempdir = saved


def keys_dir(build: Build) -> Path:
    """Where the client keys of a build live (created 0700)."""
    folder = config.keys_dir() / build.variant / build.revision
    folder.mkdir(parents=True, exist_ok=True)
    for part in (config.keys_dir(), folder.parent, folder):
        os.chmod(part, 0o700)
    return folder


def _restrict(folder: Path) -> None:
    for root, dirs, files in os.walk(folder):
        for d in dirs:
            os.chmod(Path(root) / d, 0o700)
        for f in files:
            os.chmod(Path(root) / f, 0o600)


@dataclass
class KeyInfo:
    """The client keys of one build, as :func:`keygen` found or made them."""

    variant: str
    revision: str
    path: Path
    generated: bool
    keygen_seconds: float | None  # None: keys made by an earlier load, time not recorded
    eval_key_bytes: int
    cpu_others: float | None = None  # machine.others during generation; None: unknown


def keygen_metrics(seconds: float | None, cpu_others: float | None) -> dict[str, float]:
    """The registry's ``keygen_seconds`` for a key generation that took ``seconds`` while other
    processes used ``cpu_others`` of the CPU: none unless timed here with nothing else running
    (:func:`zoo.cost.machine.alone`)."""
    if seconds is None or not machine.alone(cpu_others):
        return {}
    return {"keygen_seconds": round(seconds, 3)}


def keygen(ref: str, force: bool = False, **pull_kwargs: Any) -> KeyInfo:
    """Generate (or reuse) the client keys of a build and report the evaluation-key size.

    Keys live under ``$ZOO_HOME/keys/VARIANT/REVISION`` with a ``keys.json`` that records how
    long generation took and how large the serialized evaluation keys are (written again, the
    time unknown, if it is missing or unreadable).
    """
    import json

    from zoo.store.atomic import write_atomic

    model = load(ref, role="client", **pull_kwargs)  # keys are made lazily, not by load
    if force:
        shutil.rmtree(keys_dir(model.build))
    folder = keys_dir(model.build)
    record = folder / "keys.json"
    model.ensure_keys()
    generated = model.timings["keys_generated"]
    try:
        info = None if generated else json.loads(record.read_text())
    except (OSError, ValueError):  # absent, or torn by a crash of an older zoo
        info = None
    if not isinstance(info, dict):
        size = len(model.client.get_serialized_evaluation_keys())
        seconds = model.timings["keygen_seconds"] if generated else None
        busy = model.timings.get("keygen_cpu_others")
        info = {"keygen_seconds": seconds, "eval_key_bytes": size, "cpu_others": busy}
        write_atomic(record, json.dumps(info, sort_keys=True), mode=0o600)
    return KeyInfo(model.build.variant, model.build.revision, folder, generated,
                   info["keygen_seconds"], info["eval_key_bytes"],
                   info.get("cpu_others"))  # fmt: skip


def load(
    ref: str,
    role: str = "all",
    server_url: str | None = None,
    circuits: bool = True,
    **pull_kwargs: Any,
) -> Model:
    """Pull (if needed) and load a build for ``role`` (:data:`~zoo.api.ROLES`, as ``zoo pull``
    names them): ``client`` (head, FHE client), ``server`` (the circuit) or ``all``.

    With ``server_url`` (and ``role="client"``), the circuit runs on that `zoo serve` server:
    ``model.server`` is a :class:`zoo.fhe.remote.RemoteServer`. ``circuits=False`` loads no
    FHE client or server (loading a server compiles its circuit: minutes for VGG11), only what
    ``fhe="disable"`` runs: the head and, with ``role="all"``, the Brevitas module.
    """
    if role not in ROLES:
        raise InputError(
            f"unknown role {role!r}: the roles are {', '.join(ROLES)}",
            hint="as in `zoo pull --role`",
        )
    if server_url is not None and not circuits:
        raise InputError("server_url needs the FHE client: circuits=False loads none",
                         hint="leave circuits at True to run on a server")  # fmt: skip
    if server_url is not None and role != "client":
        raise InputError("server_url goes with role='client'", hint="load(ref, role='client', "
                         "server_url=URL): the server side runs on that server")  # fmt: skip
    import json

    pulled = api.pull(ref, role=role, **pull_kwargs)
    build, path = pulled.build, pulled.path
    cache.check_hashes(build, role, pull_kwargs.get("cache_root"))
    problems = versions.mismatches(build.runtime)
    if problems:
        raise RuntimeMismatchError(
            f"{build.variant} needs another runtime: {'; '.join(problems)}",
            hint=versions.install_hint(build.runtime),
        )
    meta = json.loads((path / "manifest.json").read_text())
    tensors, head_config = head.load(path / "head.safetensors") if role != "server" else ({}, {})
    model = Model(build, path, role, meta, tensors, head_config)
    if not circuits:
        return model
    from concrete.ml.deployment import FHEModelClient, FHEModelServer

    if role in ("client", "all"):
        started = time.perf_counter()
        check_zip(path / "client.zip")
        keys = keys_dir(build)
        model.client = FHEModelClient(str(path), key_dir=str(keys))
        model.timings["client_load_seconds"] = time.perf_counter() - started
    if role in ("server", "all"):
        started = time.perf_counter()
        check_zip(path / "server.zip")
        with circuit_tempdir(model):
            model.server = FHEModelServer(str(path))
        model.timings["server_load_seconds"] = time.perf_counter() - started
    if server_url is not None:
        from zoo.fhe.remote import RemoteServer

        model.server = RemoteServer(server_url, build)
    return model
