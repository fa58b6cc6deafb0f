"""The package's layers hold: the import-linter contract in pyproject.toml is kept, it names every
module, it breaks on an upward import, and no nbbatch import hides inside a function."""
import ast
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "nbbatch"

# Function-local imports of nbbatch modules that are allowed, as (file, imported module): the
# IPython extension hooks load the magics (and with them IPython) only when IPython asks.
ALLOWED_LOCAL = {("nbbatch/__init__.py", "nbbatch.magics")}

pytest.importorskip("importlinter", reason="import-linter is in the test extra")


def lint_imports(cwd: Path) -> subprocess.CompletedProcess:
    """``lint-imports`` (the console script's entry point) run with ``cwd`` first on the path."""
    code = "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"
    return subprocess.run([sys.executable, "-c", code, "--no-cache"], cwd=cwd, capture_output=True, text=True,
                          env={"PYTHONPATH": str(cwd), "PATH": "/usr/bin:/bin"}, timeout=300)


def contracts() -> list[dict]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]


def layer_modules(container: str | None = None) -> list[str]:
    """The modules the layers contract of ``container`` names (None: the package's own contract)."""
    (contract,) = [c for c in contracts() if c["type"] == "layers" and c.get("containers", [None]) == [container]]
    prefix = f"{container}." if container else ""
    return [prefix + m.strip() for layer in contract["layers"] for m in layer.split("|")]


def package_modules() -> set[str]:
    names = set()
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(ROOT).with_suffix("")
        parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
        if parts == ("nbbatch",):
            continue                      # the package itself re-exports every layer
        names.add(".".join(parts))
    return names


def test_the_layers_contract_is_kept():
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{len(contracts())} kept, 0 broken" in result.stdout


def test_every_module_has_a_layer():
    named = layer_modules()
    assert len(named) == len(set(named)), "a module is named in two layers"
    # a subpackage (nbbatch.ui) stands for its modules
    uncovered = {m for m in package_modules() if not any(m == n or m.startswith(n + ".") for n in named)}
    assert not uncovered, f"modules missing from [tool.importlinter] layers: {sorted(uncovered)}"
    assert not set(named) - package_modules(), "a layer names a module that does not exist"


# the subpackages with a layers contract of their own
SUBPACKAGES = ("nbbatch.memory", "nbbatch.norms", "nbbatch.runs", "nbbatch.trainer")


@pytest.mark.parametrize("package", SUBPACKAGES)
def test_every_module_of_a_subpackage_has_a_layer(package):
    named = layer_modules(package)
    inside = {m for m in package_modules() if m.startswith(package + ".")}
    assert len(named) == len(set(named)) and set(named) == inside


@pytest.mark.parametrize("package", SUBPACKAGES)
def test_a_subpackage_re_exports_its_names_and_no_module_shadows_one(package):
    import importlib

    module = importlib.import_module(package)
    missing = [name for name in module.__all__ if not hasattr(module, name)]
    assert not missing, f"{package}.__all__ names what it does not hold: {missing}"
    # a submodule named like a re-exported function would hide it after ``import package.name``
    submodules = {m.rpartition(".")[2] for m in package_modules() if m.startswith(package + ".")}
    assert not submodules & set(module.__all__), sorted(submodules & set(module.__all__))


def test_an_upward_import_breaks_the_contract(tmp_path):
    shutil.copytree(PACKAGE, tmp_path / "nbbatch", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    noise = tmp_path / "nbbatch" / "noise.py"
    noise.write_text(noise.read_text() + "\nfrom .trainer import Trainer  # noqa: E402\n")
    model = tmp_path / "nbbatch" / "memory" / "model.py"
    model.write_text(model.read_text() + "\nfrom .planner import plan  # noqa: E402\n")
    ghost = tmp_path / "nbbatch" / "norms" / "ghost.py"
    ghost.write_text(ghost.read_text() + "\nfrom .convert import convert_norm  # noqa: E402\n")
    result = lint_imports(tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "BROKEN" in result.stdout and "nbbatch.noise -> nbbatch.trainer" in result.stdout
    assert "nbbatch.memory.model -> nbbatch.memory.planner" in result.stdout
    assert "nbbatch.norms.ghost -> nbbatch.norms.convert" in result.stdout


def local_nbbatch_imports(path: Path, root: Path = ROOT) -> list[tuple[int, str]]:
    """(line, module) of every import of an nbbatch module that is not at module level."""
    tree = ast.parse(path.read_text())
    package = ".".join(path.relative_to(root).with_suffix("").parts[:-1])
    top = set()
    for node in tree.body:                            # module level, and its if/try blocks (TYPE_CHECKING)
        for sub in ast.walk(node) if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                            ast.ClassDef)) else ():
            top.add(id(sub))
    found = []
    for node in ast.walk(tree):
        if id(node) in top:
            continue
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if module == "nbbatch" or module.startswith("nbbatch."):
                found.append((node.lineno, module))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "nbbatch"]
    return found


def test_no_function_local_import_of_an_nbbatch_module():
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        found += [f"{rel}:{line}: {module}" for line, module in local_nbbatch_imports(path)
                  if (rel, module) not in ALLOWED_LOCAL]
    assert not found, "import these at the top of the module (a function-local import hides a cycle):\n" + \
        "\n".join(found)


def test_the_local_import_check_sees_one(tmp_path):
    probe = tmp_path / "nbbatch" / "ui" / "probe.py"
    probe.parent.mkdir(parents=True)
    probe.write_text("from ..config import TrainConfig\n\nif True:\n    from . import plots\n\n\n"
                     "def f():\n    from .controller import RunController\n    from ..trainer import Trainer\n"
                     "    import nbbatch.memory\n    import torch\n\n\n"
                     "class C:\n    def g(self):\n        from .. import data\n")
    assert local_nbbatch_imports(probe, tmp_path) == [
        (8, "nbbatch.ui.controller"), (9, "nbbatch.trainer"), (10, "nbbatch.memory"), (16, "nbbatch")]


def test_the_moved_names_are_still_importable_where_users_import_them():
    import nbbatch
    from nbbatch import diagnostics, losses, memory, noise, recompute, trainer

    for name in ("NoiseScale", "NoiseScaleEMA", "OnlineNoiseScale", "sampling_factor", "squared_grad_norm",
                 "two_batch_estimate"):
        assert getattr(diagnostics, name) is getattr(noise, name), name
    for name in ("checkpointed", "Checkpointed", "CheckpointedSequential"):
        assert getattr(memory, name) is getattr(recompute, name) and name in memory.__all__, name
    assert trainer.accuracy is nbbatch.accuracy is losses.accuracy and trainer.mse_loss is losses.mse_loss
