"""The wings of the package and the rule between them: the catalogue, the store and the cost
model never import torch, brevitas or concrete, nor the heavy wings (``zoo.fhe``, ``zoo.build``),
at any level of any function, so ``zoo list / info / pull / publish`` start without them."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ZOO = Path(__file__).resolve().parent.parent / "zoo"
HEAVY_LIBS = ("torch", "brevitas", "concrete", "safetensors.torch")
HEAVY_WINGS = ("zoo.fhe", "zoo.build")
LIGHT = sorted([*(ZOO / "catalog").glob("*.py"), *(ZOO / "store").glob("*.py"),
                ZOO / "cost" / "model.py", ZOO / "cost" / "machine.py", ZOO / "config.py",
                ZOO / "errors.py"])  # fmt: skip


def imported(path: Path) -> list[tuple[int, str]]:
    """Every module a file imports, at any depth, with its line (relative imports resolved)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            found += [(node.lineno, node.module)]
            found += [(node.lineno, f"{node.module}.{a.name}") for a in node.names]
    return found


def breaks_rule(module: str) -> bool:
    return any(module == h or module.startswith(h + ".") for h in HEAVY_LIBS + HEAVY_WINGS)


@pytest.mark.parametrize("path", LIGHT, ids=lambda p: str(p.relative_to(ZOO)))
def test_light_wings_import_nothing_heavy(path: Path) -> None:
    bad = [f"line {line}: {name}" for line, name in imported(path) if breaks_rule(name)]
    assert not bad, f"{path.relative_to(ZOO)} imports {bad}"


def test_the_rule_sees_a_lazy_import(tmp_path: Path) -> None:
    """The check itself: an import inside a function is found too."""
    sneaky = tmp_path / "sneaky.py"
    sneaky.write_text("def f():\n    from zoo.fhe import runtime\n    import torch.nn\n")
    assert [name for _, name in imported(sneaky) if breaks_rule(name)] == [
        "zoo.fhe", "zoo.fhe.runtime", "torch.nn"]  # fmt: skip


def test_light_entry_points_start_without_torch_or_concrete() -> None:
    """At run time too: the CLI, the API and every light module, imported in a fresh process."""
    modules = ["zoo.cli", "zoo.api"] + [
        ".".join(p.relative_to(ZOO.parent).with_suffix("").parts) for p in LIGHT
    ]
    code = (f"import importlib, sys\nfor m in {modules!r}: importlib.import_module(m)\n"
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'brevitas', "
            "'concrete'}))")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_every_wing_is_a_package_with_its_rule_written_down() -> None:
    for wing in ("catalog", "store", "fhe", "build", "cost"):
        init = ZOO / wing / "__init__.py"
        assert init.is_file() and ast.get_docstring(ast.parse(init.read_text()))
    flat = sorted(p.name for p in ZOO.glob("*.py"))
    assert flat == ["__init__.py", "__main__.py", "api.py", "cli.py", "config.py", "errors.py"]
