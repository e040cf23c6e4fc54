"""The interfaces users already know: Concrete ML's fhe modes with one default, the same role names
in pull and load, the Brevitas module back from a build, a card that tells the FHE truth, the
serialized evaluation-key size, and CLI habits (-h, python -m zoo, completion, human output,
logging). Real builds: the pinned cifar10-split-tiny from the project's release store."""

from __future__ import annotations

import inspect
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import ROOT

import zoo
from zoo import api, cli
from zoo.build.data import load_split
from zoo.catalog import registry as reg
from zoo.errors import InputError
from zoo.fhe import evaluate, runtime

VARIANT = "cifar10-split-tiny"


@pytest.fixture
def project_store(zoo_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The project's release store and a scratch copy of its registry (for --record)."""
    monkeypatch.setenv("ZOO_RELEASES", str(ROOT / "releases"))
    registry = tmp_path / "registry.json"
    shutil.copy(ROOT / "registry.json", registry)
    monkeypatch.setenv("ZOO_REGISTRY", str(registry))
    return registry


def _run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli.main, list(args))
    return result.exit_code, result.stdout, result.stderr


def _default(command: str, option: str) -> object:
    return next(p.default for p in cli.main.commands[command].params if p.name == option)


def test_one_set_of_fhe_modes_with_one_default_everywhere() -> None:
    assert api.FHE_MODES == ("disable", "simulate", "execute")  # Concrete ML's names
    defaults = {
        "Model.predict": inspect.signature(runtime.Model.predict).parameters["fhe"].default,
        "Model.logits": inspect.signature(runtime.Model.logits).parameters["fhe"].default,
        "evaluate": inspect.signature(evaluate.evaluate).parameters["fhe"].default,
        "zoo predict": _default("predict", "fhe"),
        "zoo eval": _default("eval", "fhe"),
    }
    assert api.DEFAULT_FHE == "disable"  # Concrete ML's default: the clear model
    assert set(defaults.values()) == {api.DEFAULT_FHE}, defaults
    for command in ("predict", "eval"):
        fhe = next(p for p in cli.main.commands[command].params if p.name == "fhe")
        assert tuple(fhe.type.choices) == api.FHE_MODES
    with pytest.raises(InputError, match="disable, simulate, execute"):
        api.check_fhe_mode("clear")


def test_roles_are_named_the_same_in_pull_and_load(project_store: Path) -> None:
    role = next(p for p in cli.main.commands["pull"].params if p.name == "role")
    assert tuple(role.type.choices) == api.ROLES == ("client", "server", "all")
    assert inspect.signature(runtime.load).parameters["role"].default == "all"
    assert inspect.signature(api.pull).parameters["role"].default == "all"
    with pytest.raises(InputError, match="client, server, all"):
        runtime.load(VARIANT, role="both")


def test_the_brevitas_module_comes_back_and_reproduces_the_clear_accuracy(
    project_store: Path, cifar_dir: Path
) -> None:
    """zoo.load(...).torch_module() is the build's Brevitas module, rebuilt by its recipe from
    weights.safetensors; fhe="disable" runs it and gives the build's recorded clear top-1."""
    import torch

    model = zoo.load(VARIANT)
    module = model.torch_module()
    assert isinstance(module, torch.nn.Module) and not module.training
    assert any("brevitas" in type(m).__module__ for m in module.modules())
    n = model.meta["metrics"]["n_test_images"]
    images, labels = load_split(cifar_dir, "cifar10", "test")
    logits = model.logits(images[:n], "disable")
    top1 = float((logits.argmax(1) == labels[:n]).mean())
    assert top1 == model.meta["metrics"]["clear_top1"]  # 0.215 on the first 200
    with torch.no_grad():
        direct = module(torch.from_numpy(model.head(images[:4]))).numpy()
    np.testing.assert_array_equal(direct, logits[:4])
    assert [p.labels[0] for p in model.predict(images[:4])] == list(logits[:4].argmax(1))
    client_only = zoo.load(VARIANT, role="client")
    with pytest.raises(InputError, match="without its weights"):
        client_only.torch_module()


def test_the_card_tells_the_fhe_truth(project_store: Path) -> None:
    build = reg.resolve(reg.load(project_store), VARIANT)
    text = zoo.load(VARIANT, role="client").card(project_store)
    truth = text.split("## FHE truth", 1)[1]
    n = build.metrics["fhe_execute_n_images"]
    assert f"on {n} test images" in truth and "95 % interval" in truth
    assert f"{build.metrics['fhe_execute_seconds_per_image']:,.0f} on AMD" in truth
    assert f"{build.circuit['pbs_count']:,}" in truth
    assert f"Top-1 (real FHE, {n} images)" in text  # the model-index names its image count
    code, out, _ = _run("card", VARIANT)
    assert code == 0 and out.strip() == text.strip()


def test_keygen_records_the_serialized_key_size_that_list_and_info_show(
    project_store: Path,
) -> None:
    code, out, err = _run("keygen", VARIANT, "--record", "--json")
    assert code == 0, err
    size = json.loads(out)["eval_key_bytes"]
    keys = runtime.load(VARIANT, role="client")
    keys.ensure_keys()
    assert size == len(keys.client.get_serialized_evaluation_keys())  # what a client uploads
    build = reg.resolve(reg.load(project_store), VARIANT)
    assert build.metrics["eval_key_bytes_serialized"] == size
    assert size < build.circuit["eval_key_bytes"]  # concrete's in-memory figure is larger
    row = next(r for r in api.list_variants() if r["variant"] == VARIANT)
    assert row["eval_key_bytes_serialized"] == size
    _, info, _ = _run("info", VARIANT)
    assert f"{size / 2**20:,.0f} MiB serialized" in info


def test_eval_speaks_to_people_unless_asked_for_json(project_store: Path, cifar_dir: Path) -> None:
    args = ("eval", VARIANT, "-n", "20", "--data-dir", str(cifar_dir))
    code, out, err = _run(*args)
    assert code == 0, err
    assert "fhe=disable, 20 test images (first)" in out and "disable  top-1/2/3" in out
    code, out, _ = _run(*args, "--fhe", "simulate", "--json")
    assert code == 0 and json.loads(out)["fhe"] == "simulate"


def test_cli_habits_help_defaults_module_and_completion(project_store: Path) -> None:
    code, out, _ = _run("-h")
    assert code == 0 and "Shell completion" in out
    code, out, _ = _run("predict", "-h")
    assert code == 0 and "[default: disable]" in out
    run = subprocess.run([sys.executable, "-m", "zoo", "list"], capture_output=True, text=True,
                         env=os.environ.copy())  # fmt: skip
    assert run.returncode == 0 and VARIANT in run.stdout
    env = {**os.environ, "_ZOO_COMPLETE": "bash_complete", "COMP_WORDS": "zoo pull cifar10-split-t",
           "COMP_CWORD": "2"}  # fmt: skip
    run = subprocess.run([sys.executable, "-m", "zoo"], capture_output=True, text=True, env=env)
    offered = {line.split(",", 1)[1] for line in run.stdout.splitlines()}
    assert offered == {"cifar10-split-tiny", "cifar10-split-tiny-r4"}


def test_messages_go_through_logging(project_store: Path) -> None:
    """What zoo says along the way is logged under ``zoo.*``; -q keeps only warnings."""
    code, _, err = _run("pull", VARIANT, "--role", "client")
    assert code == 0 and f"{VARIANT}@" in err and "release store" in err
    shutil.rmtree(Path(os.environ["ZOO_HOME"]) / "cache")
    code, _, err = _run("-q", "pull", VARIANT, "--role", "client")
    assert code == 0 and err == ""


def test_a_failure_after_a_circuit_ran_keeps_its_exit_status(project_store: Path) -> None:
    """concrete's exit hook ends a process with status 0 once a circuit has run in it; a zoo
    command that fails afterwards must still exit with its own code (3: not found)."""
    code = (
        "import numpy as np\n"
        "from zoo import cli, load\n"
        f"load({VARIANT!r}).predict(np.zeros((1, 32, 32, 3), np.uint8), fhe='simulate')\n"
        "cli.main(['info', 'no-such-variant'])\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 3, run.stderr[-2000:]
    assert "no-such-variant" in run.stderr
