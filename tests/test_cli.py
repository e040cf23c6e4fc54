"""The `zoo` command: thin over the API, --json everywhere, one-line errors with exit codes, and
no torch / concrete-ml import on the paths that only read the registry and the cache."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from zoo.build import kernels
from zoo.cli import main

VARIANT = "cifar10-split-tiny"


def _run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.stdout, result.stderr


def test_publish_pull_info_list_verify_cache_as_json(
    zoo_home: Path, registry_file: Path, build_dir: Path
) -> None:
    code, out, _ = _run("publish", str(build_dir), "--hub", "local", "--json")
    assert code == 0
    revision = json.loads(out)["revision"]
    code, out, _ = _run("pull", f"{VARIANT}@{revision[:8]}", "--role", "client", "--json")
    assert code == 0 and sorted(json.loads(out)["downloaded"]) == [
        "client.zip", "head.safetensors", "manifest.json"]  # fmt: skip
    code, out, _ = _run("info", VARIANT, "--json")
    preview = json.loads(out)["resolved"]
    assert preview["revision"] == revision and preview["download_bytes"]["all"] > 0
    assert preview["est_fhe_seconds_per_image"] > 0
    code, out, _ = _run("list", "--json")
    row = next(r for r in json.loads(out) if r["variant"] == VARIANT)
    assert row["builds"] == 1 and row["max_bit_width"] == 5
    code, out, _ = _run("verify", VARIANT, "--json")
    assert code == 0 and set(json.loads(out)[revision].values()) == {"ok", "not cached"}
    code, out, _ = _run("cache", "ls", "--json")
    assert [e["status"] for e in json.loads(out)] == ["ok"]
    code, out, _ = _run("cache", "rm", VARIANT, "--json")
    assert code == 0 and json.loads(out)["freed_bytes"] > 0


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["info", "cifar10-split-tyni"], 3, "did you mean cifar10-split-tiny"),
        (["pull", "cifar10-split-tiny"], 3, "has no published build"),
        (["pull", "cifar10-split-tiny@zz"], 2, "not hexadecimal"),
        (["verify", "cifar10-split-8bit"], 3, "nothing of cifar10-split-8bit is cached"),
    ],
)
def test_errors_are_one_line_with_a_hint_and_an_exit_code(
    zoo_home: Path, registry_file: Path, args: list[str], code: int, message: str
) -> None:
    exit_code, _, err = _run(*args)
    assert exit_code == code
    assert message in err and err.startswith("error: ") and "\nhint: " in err
    exit_code, out, _ = _run(*args, "--json")
    assert exit_code == code and message in json.loads(out)["error"] + json.loads(out)["hint"]


def test_offline_pull_exit_code(zoo_home: Path, registry_file: Path, build_dir: Path) -> None:
    _run("publish", str(build_dir), "--hub", "local")
    code, _, err = _run("pull", VARIANT, "--offline")
    assert code == 6 and "offline" in err


def test_bad_registry_exit_code(zoo_home: Path, registry_file: Path) -> None:
    registry_file.write_text('{"schema_version": 3, "variants": {}}')
    code, _, err = _run("list")
    assert code == 3 and "$.schema_version" in err


def test_a_bad_recipe_parameter_is_one_line_before_any_training(
    zoo_home: Path, registry_file: Path, tmp_path: Path
) -> None:
    document = json.loads(registry_file.read_text())
    document["variants"][VARIANT]["recipe"]["params"]["widht"] = 8
    registry_file.write_text(json.dumps(document))
    out = tmp_path / "out"
    code, _, err = _run("build", VARIANT, "--profile", "smoke", "--out", str(out),
                        "--data-dir", str(tmp_path / "no-data"))  # fmt: skip
    assert code == 8, err
    assert "\nerror: unknown split-CNV parameter 'widht'\nhint: " in err and "registry.json" in err
    assert "Traceback" not in err and not list(out.glob("work/*.safetensors"))


def test_every_command_pins_the_kernels(
    zoo_home: Path, registry_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in kernels.PINS:  # set, then removed: monkeypatch puts back what was there
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    assert _run("list")[0] == 0
    assert {name: os.environ.get(name) for name in kernels.PINS} == kernels.PINS


LIGHT = """
import sys
from zoo.cli import main
try:
    main({args!r})
except SystemExit as exc:
    assert exc.code in (0, None), exc.code
heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'concrete', 'brevitas'))
print(heavy)
"""


@pytest.mark.parametrize("args", [["list"], ["info", VARIANT], ["pull", VARIANT]])
def test_registry_commands_do_not_import_torch_or_concrete(
    zoo_home: Path, registry_file: Path, build_dir: Path, args: list[str]
) -> None:
    _run("publish", str(build_dir), "--hub", "local")
    _run("pull", VARIANT)
    out = subprocess.run([sys.executable, "-c", LIGHT.format(args=args)], capture_output=True,
                         text=True, check=True)  # fmt: skip
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout
