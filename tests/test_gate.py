"""The artifact gate: every pinned build passes it, and a build whose zips carry a jsonpickle or
skops payload is refused by every command that would load it, before anything runs.

The payloads are real: the first test shows that plain ``jsonpickle.loads`` of them writes the
marker file. Each refusal is then checked by the marker's absence, not only by the exception.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import ROOT

import zoo
from zoo import api
from zoo.catalog import manifest
from zoo.catalog import registry as reg
from zoo.cli import main
from zoo.errors import BuildError, IntegrityError, ZooError
from zoo.fhe.worker import FheWorker
from zoo.store import bundle, cache
from zoo.store.gate import UnsafeArtifactError, check_zip
from zoo.store.releases import ReleaseStore

TINY = "cifar10-split-tiny"
PROJECT = reg.load(ROOT / "registry.json")
STORE = ReleaseStore(ROOT / "releases")


def _marker_call(marker: Path) -> dict:
    code = f"open({str(marker)!r}, 'w').write('pwned')"
    return {"py/reduce": [{"py/function": "builtins.exec"}, {"py/tuple": [code]}]}


def _payloads(marker: Path) -> dict[str, dict]:
    """Edits of server.zip's configuration.json, each a way in."""
    rounding = "concrete.fhe.compilation.configuration.ApproximateRoundingConfig"
    return {
        "reduce": {"verbose": _marker_call(marker)},
        "object": {"verbose": {"py/object": "subprocess.Popen", "args": ["true"]}},
        "function": {"verbose": {"py/function": "os.system"}},
        "nested": {"approximate_rounding_config": {"py/object": rounding,
                                                    "logical_clipping": _marker_call(marker)}},
        "enum-with-call": {"security_level": {"py/reduce": [
            {"py/type": "concrete.fhe.compilation.configuration.SecurityLevel"},
            {"py/tuple": [_marker_call(marker)]}]}},
    }  # fmt: skip


def _tiny_dir(target: Path) -> Path:
    """The pinned tiny build's files (from the project's store) as a build directory."""
    build = reg.resolve(PROJECT, TINY, check_runtime=False)
    target.mkdir(parents=True)
    for entry in build.files:
        shutil.copy(STORE.blob(entry.sha256), target / entry.path)
    return target


def _rewrite(zip_path: Path, member: str, edit) -> None:  # noqa: ANN001 - a callable
    with zipfile.ZipFile(zip_path) as src:
        members = {i.filename: src.read(i) for i in src.infolist()}
    members[member] = edit(members[member])
    with zipfile.ZipFile(zip_path, "w") as dst:
        for name, data in members.items():
            dst.writestr(name, data)


def _hostile_dir(target: Path, payload: dict) -> Path:
    """The tiny build with ``payload`` merged into server.zip's configuration.json, and its
    manifest rewritten to match (as a hostile publisher would)."""
    folder = _tiny_dir(target)
    _rewrite(folder / "server.zip", "configuration.json",
             lambda data: json.dumps({**json.loads(data), **payload}).encode())  # fmt: skip
    document = manifest.read(folder)
    document.pop("files")
    manifest.write(folder, document)
    return folder


def _pin(folder: Path, registry_file: Path) -> reg.Build:
    """Pin a build directory in the scratch registry and store it, bypassing `zoo publish`."""
    document, files = manifest.check(folder)
    ReleaseStore.beside(registry_file).publish("", files, "hostile")
    raw = json.loads(registry_file.read_text())
    raw["variants"][TINY]["builds"].append(api.catalog_entry(document, [e for _, e in files]))
    return reg.save(raw, registry_file).variant(TINY).builds[-1]


def test_every_pinned_build_passes_the_gate() -> None:
    live = [b for v in PROJECT.variants.values() for b in v.live]
    for build in live:
        for entry in build.files:
            if entry.role in cache.GATED_ROLES:
                check_zip(STORE.blob(entry.sha256))  # raises on anything not allowed


def test_the_payloads_are_live_and_the_gate_refuses_each(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    probe = f"import jsonpickle, json; jsonpickle.loads(json.dumps({_marker_call(marker)!r}))"
    subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True)
    assert marker.exists(), "the payload must really run under plain jsonpickle"
    marker.unlink()
    for name, payload in _payloads(marker).items():
        folder = _hostile_dir(tmp_path / name, payload)
        with pytest.raises(UnsafeArtifactError, match="server.zip: configuration.json: jsonpickle"):
            check_zip(folder / "server.zip")
    assert not marker.exists()


def test_skops_and_type_names_outside_real_builds_are_refused(tmp_path: Path) -> None:
    folder = _tiny_dir(tmp_path / "b")

    def swap_type(data: bytes) -> bytes:
        document = json.loads(data)
        blob = io.BytesIO()
        with zipfile.ZipFile(blob, "w") as skops:
            schema = {"__class__": "Popen", "__module__": "subprocess", "__loader__": "TypeNode"}
            skops.writestr("schema.json", json.dumps(schema))
        document["model_type"]["serialized_value"] = blob.getvalue().hex()
        return json.dumps(document).encode()

    _rewrite(folder / "client.zip", "serialized_processing.json", swap_type)
    with pytest.raises(UnsafeArtifactError, match="skops blob of type subprocess.Popen"):
        check_zip(folder / "client.zip")
    _rewrite(folder / "client.zip", "serialized_processing.json",
             lambda d: json.dumps({"x": {"type_name": "sklearn_model",
                                         "serialized_value": "00"}}).encode())  # fmt: skip
    with pytest.raises(UnsafeArtifactError, match="type_name 'sklearn_model'"):
        check_zip(folder / "client.zip")


def _skops(
    schema: dict, method: int = zipfile.ZIP_STORED, prefix: bytes = b"", extra_size: int = 0
) -> str:
    """A skops type blob (hex) holding ``schema``, as concrete-ml writes it unless told
    (``extra_size``: its central directory claims that many more bytes than it holds)."""
    blob = io.BytesIO()
    with zipfile.ZipFile(blob, "w", method) as skops:
        skops.writestr("schema.json", json.dumps(schema))
    data = bytearray(blob.getvalue())
    central = data.find(b"PK\x01\x02")
    for offset in (20, 24):  # compressed and uncompressed sizes
        size = struct.unpack_from("<I", data, central + offset)[0]
        struct.pack_into("<I", data, central + offset, size + extra_size)
    return (prefix + bytes(data)).hex()


def _model_type(folder: Path, edit) -> None:  # noqa: ANN001 - a callable
    """Edit the ``model_type`` node of client.zip's serialized_processing.json."""

    def rewrite(data: bytes) -> bytes:
        document = json.loads(data)
        edit(document["model_type"])
        return json.dumps(document).encode()

    _rewrite(folder / "client.zip", "serialized_processing.json", rewrite)


GOOD_SCHEMA = {"__class__": "QuantizedModule", "__loader__": "TypeNode",
               "__module__": "concrete.ml.quantization.quantized_module"}  # fmt: skip
HOSTILE_TYPES = {  # what is put into the model_type node -> what the refusal says
    "call beside it": ({"evil": {"py/reduce": [{"py/function": "os.system"}, {"py/tuple": []}]}},
                       r"keys \['evil'\] beside a type"),
    "pickle before the zip": ({"serialized_value": _skops(GOOD_SCHEMA, prefix=b"\x80\x04N.")},
                              "not a zip from its first byte"),
    "bzip2": ({"serialized_value": _skops(GOOD_SCHEMA, zipfile.ZIP_BZIP2)}, "method 12"),
    "a big schema": ({"serialized_value": _skops({**GOOD_SCHEMA, "pad": "x" * 9000})},
                     "skops schema of 9.* bytes"),
    "a size that lies": ({"serialized_value": _skops(GOOD_SCHEMA, extra_size=1000)},
                         "skops blob that does not parse"),
}  # fmt: skip


@pytest.mark.parametrize("case", HOSTILE_TYPES)
def test_a_type_node_holds_only_the_skops_blob_of_a_small_schema(tmp_path: Path, case: str) -> None:
    folder = _tiny_dir(tmp_path / "b")
    _model_type(folder, lambda node: node.update({"serialized_value": _skops(GOOD_SCHEMA)}))
    check_zip(folder / "client.zip")  # the blob as concrete-ml writes it passes
    change, problem = HOSTILE_TYPES[case]
    _model_type(folder, lambda node: node.update(change))
    with pytest.raises(UnsafeArtifactError, match=f"serialized_processing.json: .*{problem}"):
        check_zip(folder / "client.zip")


def test_a_jsonpickle_encoded_key_is_refused(tmp_path: Path) -> None:
    folder = _tiny_dir(tmp_path / "b")
    key = 'json://{"py/object": "x"}'
    _rewrite(folder / "server.zip", "configuration.json",
             lambda data: json.dumps({**json.loads(data), key: 1}).encode())  # fmt: skip
    with pytest.raises(UnsafeArtifactError, match="jsonpickle-encoded key"):
        check_zip(folder / "server.zip")


@pytest.mark.parametrize("change", ["add sharedlib.so", "drop circuit.mlir", "drop is_simulated"])
def test_a_zip_holds_exactly_the_members_concrete_ml_writes(tmp_path: Path, change: str) -> None:
    """Without circuit.mlir, concrete would load a shared library from the archive instead."""
    folder = _tiny_dir(tmp_path / "b")
    with zipfile.ZipFile(folder / "server.zip") as src:
        members = {name: src.read(name) for name in src.namelist()}
    verb, name = change.split()
    if verb == "add":
        members[name] = b"\x7fELF"
    else:
        members.pop(name)
    with zipfile.ZipFile(folder / "server.zip", "w") as dst:
        for name, data in members.items():
            dst.writestr(name, data)
    with pytest.raises(UnsafeArtifactError, match="server.zip: members: "):
        check_zip(folder / "server.zip")


def test_every_command_refuses_a_pinned_hostile_build(
    zoo_home: Path, registry_file: Path, tmp_path: Path
) -> None:
    marker = tmp_path / "marker"
    folder = _hostile_dir(tmp_path / "hostile", _payloads(marker)["reduce"])
    build = _pin(folder, registry_file)
    runner = CliRunner()

    result = runner.invoke(main, ["pull", TINY])  # after hashing: the pins match
    assert result.exit_code == 4 and "py/reduce" in result.stderr
    assert not (cache.build_path(build) / "server.zip").exists()

    result = runner.invoke(main, ["publish", str(folder)])
    assert result.exit_code == 4

    # A file that reached the cache some other way (an older zoo, a shared cache):
    shutil.copytree(folder, cache.build_path(build), dirs_exist_ok=True)
    with pytest.raises(UnsafeArtifactError):
        zoo.load(TINY, role="server")
    result = runner.invoke(main, ["serve", TINY, "--port", "0"])
    assert result.exit_code == 4, result.output
    with pytest.raises(ZooError, match="could not load .* UnsafeArtifactError"):
        FheWorker(f"{TINY}@{build.revision}").start()  # the server's child, on its own
    result = runner.invoke(main, ["verify", TINY, "--json"])
    assert result.exit_code == 4, result.output
    assert json.loads(result.stdout)[build.revision]["server.zip"].startswith("unsafe (removed)")
    assert not (cache.build_path(build) / "server.zip").exists()

    # A bundle of it (made by hand: export would refuse to pull it).
    path = tmp_path / "hostile.zip"
    with zipfile.ZipFile(path, "w") as archive:
        index = {"format": bundle.FORMAT, "version": bundle.VERSION,
                 "builds": [{"variant": TINY, "build": build.raw}]}  # fmt: skip
        archive.writestr(bundle.INDEX, json.dumps(index))
        for entry in build.files:
            archive.write(folder / entry.path, "sha256/" + entry.sha256.split(":")[1])
    shutil.rmtree(zoo_home / "cache")
    result = runner.invoke(main, ["bundle", "import", str(path)])
    assert result.exit_code == 4
    assert not (cache.build_path(build) / "server.zip").exists()
    assert not marker.exists()


def test_a_zip_bomb_within_the_size_limits_is_refused(tmp_path: Path) -> None:
    folder = _tiny_dir(tmp_path / "b")
    with zipfile.ZipFile(folder / "server.zip", "a", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("padding.bin", bytes(64 * 1024**2))  # 64 MiB of zeros in ~64 kB
    assert (folder / "server.zip").stat().st_size < 1024**2
    with pytest.raises(IntegrityError, match="padding.bin.* it expands 1[0-9]{3}-fold"):
        check_zip(folder / "server.zip")


@pytest.fixture
def real_tiny(zoo_home: Path, registry_file: Path, monkeypatch: pytest.MonkeyPatch) -> reg.Build:
    """The pinned tiny build in the scratch registry, pulled from the project's store (read)."""
    raw = json.loads(registry_file.read_text())
    pinned = reg.resolve(PROJECT, TINY, check_runtime=False)
    raw["variants"][TINY]["builds"] = [pinned.raw]
    reg.save(raw, registry_file)
    monkeypatch.setenv("ZOO_RELEASES", str(STORE.root))
    zoo.pull(TINY)
    return pinned


def test_a_cached_file_changed_in_place_is_not_used(real_tiny: reg.Build) -> None:
    head = cache.build_path(real_tiny) / "head.safetensors"
    data = bytearray(head.read_bytes())
    data[-1] ^= 1  # same size: a warm pull does not notice
    head.write_bytes(bytes(data))
    assert zoo.pull(TINY).downloaded == []
    with pytest.raises(IntegrityError, match="head.safetensors changed since it was pulled"):
        zoo.load(TINY, role="client")
    assert not head.exists()
    assert zoo.pull(TINY).downloaded == ["head.safetensors"]  # the repair is a pull
    head.unlink()  # removed between the pull and the check (a concurrent `zoo cache rm`)
    with pytest.raises(IntegrityError, match="head.safetensors is gone since it was pulled"):
        cache.check_hashes(real_tiny, "client")


@pytest.mark.parametrize("name", ["manifest.json", "server.zip"])
def test_card_and_bundle_export_do_not_pass_on_a_changed_cached_file(
    real_tiny: reg.Build, tmp_path: Path, name: str
) -> None:
    path = cache.build_path(real_tiny) / name
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 1  # same size: a warm pull does not notice
    path.write_bytes(bytes(data))
    use = (lambda: api.card(TINY)) if name == "manifest.json" else (
        lambda: bundle.export([TINY], tmp_path / "tiny.zoo.zip"))  # fmt: skip
    with pytest.raises(IntegrityError, match=f"{name} changed since it was pulled"):
        use()
    assert not path.exists() and not (tmp_path / "tiny.zoo.zip").exists()


@pytest.mark.parametrize("module", ["/tmp/evil.py", "recipes/../tests/evil.py", "recipes/x.py\n"])
def test_a_manifest_cannot_name_a_file_to_run(real_tiny: reg.Build, module: str) -> None:
    model = zoo.load(TINY, circuits=False)
    model.meta["recipe"]["module"] = module  # as a manifest from elsewhere would say
    with pytest.raises(BuildError, match="is not a recipe of this project"):
        model.torch_module()


def test_loading_leaves_no_temporary_folder_behind(real_tiny: reg.Build, tmp_path: Path) -> None:
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    code = (
        "import numpy as np, zoo; m = zoo.load('cifar10-split-tiny');"
        "m.logits(np.zeros((1, 32, 32, 3), np.uint8), 'simulate')"
    )
    env = {**os.environ, "TMPDIR": str(scratch)}
    subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True)
    assert list(scratch.iterdir()) == []
