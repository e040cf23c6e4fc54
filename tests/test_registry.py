"""registry.json: schema, parsing of names, resolution by runtime versions, atomic saves."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from zoo.catalog import registry as reg
from zoo.catalog import versions
from zoo.errors import InputError, NotFoundError, RegistryError, RuntimeMismatchError

ROOT = Path(__file__).resolve().parent.parent
HAVE = {"concrete-ml": "1.9.0", "concrete-python": "2.10.0", "python": "3.11"}


def _build(revision: str, **runtime: str) -> dict:
    rt = {"concrete-ml": "1.9.0", "concrete-python": "2.10.0", "python": "3.11",
          "torch": "2.3.1", "brevitas": "0.10.2"}  # fmt: skip
    rt.update({k.replace("_", "-"): v for k, v in runtime.items()})
    return {
        "revision": revision,
        "hubs": [],
        "profile": "smoke",
        "files": [
            {"path": "manifest.json", "role": "manifest", "size": 3, "sha256": "sha256:" + "a" * 64}
        ],
        "runtime": rt,
        "metrics": {},
        "circuit": {"max_bit_width": 5, "pbs_count": 10},
    }  # fmt: skip


@pytest.fixture
def document() -> dict:
    doc = json.loads((ROOT / "registry.json").read_text())
    doc["variants"]["cifar10-split-tiny"]["builds"] = [
        _build("1" * 64, concrete_ml="1.8.0"),
        _build("2" * 64),
        _build("3" * 64, python="3.12"),
    ]
    return doc


def test_project_registry_is_valid() -> None:
    registry = reg.load(ROOT / "registry.json")
    assert "cifar10-split-8bit" in registry.variants
    assert "cifar10-split-tiny" in registry.variants


def test_every_problem_is_reported_with_its_json_path(document: dict, tmp_path: Path) -> None:
    bad = copy.deepcopy(document)
    tiny = bad["variants"]["cifar10-split-tiny"]
    tiny["dataset"] = "imagenet"
    tiny["builds"][1]["files"][0]["sha256"] = "md5:abc"
    tiny["builds"][1]["revision"] = "xyz"
    path = tmp_path / "registry.json"
    path.write_text(json.dumps(bad))
    with pytest.raises(RegistryError) as info:
        reg.load(path)
    message = str(info.value)
    assert "3 problem(s)" in message
    assert "$.variants['cifar10-split-tiny'].dataset" in message
    assert "$.variants['cifar10-split-tiny'].builds[1].files[0].sha256" in message
    assert "$.variants['cifar10-split-tiny'].builds[1].revision" in message


def test_what_the_patterns_alone_would_let_through_is_refused(
    document: dict, tmp_path: Path
) -> None:
    bad = copy.deepcopy(document)
    builds = bad["variants"]["cifar10-split-tiny"]["builds"]
    builds[0]["files"][0]["path"] = "manifest.json\n"  # Python's "$" matches before it
    builds[2]["revision"] = builds[1]["revision"]
    path = tmp_path / "registry.json"
    path.write_text(json.dumps(bad))
    with pytest.raises(RegistryError, match=r"builds\[0\]\.files\[0\]\.path: .* line break"):
        reg.load(path)
    builds[0]["files"][0]["path"] = "manifest.json"
    path.write_text(json.dumps(bad))
    with pytest.raises(RegistryError, match=r"builds\[2\]: revision 222222222222 is listed twice"):
        reg.load(path)


def test_invalid_json_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "registry.json"
    path.write_text('{"schema_version": 1,')
    with pytest.raises(RegistryError, match="not valid JSON: line 1"):
        reg.load(path)


def test_save_refuses_an_invalid_document_and_keeps_the_file(
    document: dict, tmp_path: Path
) -> None:
    path = tmp_path / "registry.json"
    reg.save(document, path)
    before = path.read_bytes()
    broken = copy.deepcopy(document)
    broken["variants"]["cifar10-split-tiny"]["builds"][0]["profile"] = "huge"
    with pytest.raises(RegistryError, match="profile"):
        reg.save(broken, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["registry.json"]  # no temp file left


def test_two_spellings_of_one_registry_share_its_lock(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    spelled = [tmp_path / "real" / "registry.json", tmp_path / "link" / "registry.json"]
    assert reg.lock(spelled[0]).lock_file == reg.lock(spelled[1]).lock_file


def test_save_is_canonical(document: dict, tmp_path: Path) -> None:
    path = tmp_path / "registry.json"
    reg.save(document, path)
    assert path.read_text() == reg.dumps(json.loads(path.read_text()))


@pytest.mark.parametrize(
    ("ref", "expected"),
    [("cifar10-split-tiny", ("cifar10-split-tiny", None)),
     ("cifar10-split-tiny@abcdef1", ("cifar10-split-tiny", "abcdef1"))],
)  # fmt: skip
def test_split_ref(ref: str, expected: tuple) -> None:
    assert reg.split_ref(ref) == expected


@pytest.mark.parametrize("ref", ["", "@abc", "x@", "x@a@b", "x@XYZ1234"])
def test_split_ref_rejects(ref: str) -> None:
    with pytest.raises(InputError):  # bad input: exit code 2
        reg.split_ref(ref)


def test_resolve_picks_the_build_matching_the_runtime(document: dict, tmp_path: Path) -> None:
    registry = reg.parse(document, tmp_path / "r.json")
    assert reg.resolve(registry, "cifar10-split-tiny", HAVE).revision == "2" * 64
    have_312 = dict(HAVE, python="3.12")
    assert reg.resolve(registry, "cifar10-split-tiny", have_312).revision == "3" * 64


def test_resolve_without_match_lists_builds_and_the_install_command(
    document: dict, tmp_path: Path
) -> None:
    registry = reg.parse(document, tmp_path / "r.json")
    with pytest.raises(RuntimeMismatchError) as info:
        reg.resolve(registry, "cifar10-split-tiny", dict(HAVE, **{"concrete-ml": "1.7.0"}))
    assert "111111111111 (concrete-ml 1.8.0" in str(info.value)
    assert "pip install concrete-ml==" in info.value.hint


def test_resolve_by_revision_prefix_checks_the_runtime(document: dict, tmp_path: Path) -> None:
    registry = reg.parse(document, tmp_path / "r.json")
    assert reg.resolve(registry, "cifar10-split-tiny@2222222", HAVE).revision == "2" * 64
    with pytest.raises(RuntimeMismatchError, match="concrete-ml: need 1.8.0, have 1.9.0"):
        reg.resolve(registry, "cifar10-split-tiny@1111111", HAVE)
    with pytest.raises(NotFoundError, match="no build 4444444"):
        reg.resolve(registry, "cifar10-split-tiny@4444444", HAVE)
    with pytest.raises(NotFoundError, match="too short"):
        reg.resolve(registry, "cifar10-split-tiny@22", HAVE)


def test_unknown_variant_suggests_close_names(document: dict, tmp_path: Path) -> None:
    registry = reg.parse(document, tmp_path / "r.json")
    with pytest.raises(NotFoundError) as info:
        reg.resolve(registry, "cifar10-split-tinyy", HAVE)
    assert "cifar10-split-tiny" in info.value.hint


def test_roles_select_files() -> None:
    files = tuple(
        reg.FileEntry(f"{r}.bin", r, 1, "sha256:" + "0" * 64)
        for r in ("head", "weights", "client", "server", "manifest", "card")
    )
    build = reg.Build("v", "0" * 64, (), "smoke", files, {}, {}, {})
    assert {f.role for f in build.files_for("client")} == {"head", "client", "manifest"}
    assert {f.role for f in build.files_for("server")} == {"server", "manifest"}
    assert len(build.files_for("all")) == 6


def test_installed_versions_are_read_without_importing_torch() -> None:
    import subprocess
    import sys

    code = "import sys, zoo.catalog.versions as v; v.installed(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
    assert versions.installed()["python"].count(".") == 1


def test_the_profile_names_agree_in_the_schema_the_cli_and_the_builder() -> None:
    """Three lists (the CLI keeps its own so that it loads no build module): one set of names."""
    from zoo.build.run import PROFILES
    from zoo.cli import main

    schema = json.loads(reg.SCHEMA_PATH.read_text())
    option = next(p for p in main.commands["build"].params if p.name == "profile")
    assert schema["$defs"]["profile"]["enum"] == list(PROFILES) == list(option.type.choices)
