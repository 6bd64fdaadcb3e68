"""The package's layout is its architecture: layers along the data path, no cycles, old paths still resolve."""

from __future__ import annotations

import ast
import importlib
import pkgutil
import warnings
from pathlib import Path

import pytest

import lightning_prerl
from lightning_prerl import LAYERS, _moved

PACKAGE = Path(lightning_prerl.__file__).parent


def _modules() -> dict[str, Path]:
    """{dotted name: file} of every module of the package."""
    names = {}
    for p in sorted(PACKAGE.rglob("*.py")):
        parts = p.relative_to(PACKAGE).with_suffix("").parts
        names[".".join(("lightning_prerl", *parts[: -1 if parts[-1] == "__init__" else None]))] = p
    return names


def _imports(path: Path, name: str) -> set[str]:
    """Package modules `path` imports anywhere in its body (function-level imports included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("lightning_prerl.")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lightning_prerl"):
            found |= {f"{node.module}.{a.name}" for a in node.names} | {node.module}
    modules = set(_modules())
    # `from pkg import name` counts as importing pkg.name only where that is a module
    return {m for m in found if m in modules and m != name}


def _layer(module: str) -> int:
    parts = module.split(".")
    if len(parts) < 2 or parts[1] not in LAYERS:  # the package root and its own modules (`atomic`, `_moved`)
        return -1
    return LAYERS.index(parts[1])


def test_every_subpackage_is_a_layer_and_documents_what_it_may_import():
    subpackages = sorted(p.parent.name for p in PACKAGE.glob("*/__init__.py"))
    assert sorted(LAYERS) == subpackages
    for sub in LAYERS:
        doc = importlib.import_module(f"lightning_prerl.{sub}").__doc__
        assert doc and f"(layer {LAYERS.index(sub) + 1})" in doc and "May import" in doc, sub


def test_a_lower_layer_never_imports_a_higher_one():
    """Breaks when e.g. `data/batch.py` imports from `training`: the offending import is named."""
    wrong = [
        f"{name} (layer {LAYERS[_layer(name)]}) imports {dep} (layer {LAYERS[_layer(dep)]})"
        for name, path in _modules().items()
        if _layer(name) >= 0
        for dep in _imports(path, name)
        if _layer(dep) > _layer(name)
    ]
    assert not wrong, "\n".join(wrong)


def test_root_modules_import_no_subpackage():
    """`atomic`, `_moved`: importable from every layer because they import nothing of the package."""
    roots = {name: path for name, path in _modules().items() if _layer(name) < 0 and name != "lightning_prerl"}
    assert set(roots) >= {"lightning_prerl.atomic", "lightning_prerl._moved"}
    assert {name: _imports(path, name) for name, path in roots.items()} == dict.fromkeys(roots, set())


def test_no_import_cycles():
    """Depth-first search over every import, lazy ones included; a cycle is printed module by module."""
    modules = _modules()
    graph = {name: {d for d in _imports(path, name) if not name.startswith(d + ".")} for name, path in modules.items()}
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                pytest.fail("import cycle: " + " -> ".join([*stack[stack.index(dep) :], dep]))
            if dep not in state:
                visit(dep, [*stack, dep])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


def test_every_module_imports():
    names = [m.name for m in pkgutil.walk_packages(lightning_prerl.__path__, "lightning_prerl.")]
    assert len(names) == len(_modules()) - 1  # all but the root
    for name in names:
        importlib.import_module(name)


def test_old_module_paths_resolve_to_the_same_objects_with_one_warning():
    """0.1's flat paths (`lightning_prerl.policy`, a Hydra `_target_`) import the moved module itself."""
    from hydra.utils import get_class

    from lightning_prerl.training import policy

    _moved._warned.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        old = importlib.import_module("lightning_prerl.policy")
        assert old is policy
        assert get_class("lightning_prerl.datamodule.RolloutDataModule") is lightning_prerl.RolloutDataModule
        from lightning_prerl.config import validate_config  # the old module `config` is now `config.checks`
        from lightning_prerl.config.checks import validate_config as new_validate_config

        assert validate_config is new_validate_config
        importlib.import_module("lightning_prerl.policy")
    messages = [str(w.message) for w in caught if issubclass(w.category, FutureWarning)]
    assert messages == [
        "lightning_prerl.policy moved to lightning_prerl.training.policy; the old path will be removed",
        "lightning_prerl.datamodule moved to lightning_prerl.training.datamodule; the old path will be removed",
        "lightning_prerl.config.validate_config moved to lightning_prerl.config.checks.validate_config;"
        " the old path will be removed",
    ]
    for old, new in _moved.MOVED.items():
        assert (PACKAGE / (new.replace(".", "/") + ".py")).is_file(), old
    with pytest.raises(AttributeError):
        lightning_prerl.config.no_such_name  # noqa: B018


def test_a_renamed_package_s_own_submodules_import_without_its_old_module():
    """`from lightning_prerl.reproduction import stats` names a submodule: the old-name forwarder must let
    the import system load it, not import `reproduction.report` first (report imports repairs, which
    imports stats that way: a cycle when repairs is imported first). A fresh interpreter sees the order."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from lightning_prerl.reproduction import stats\n"
        "assert stats.__name__ == 'lightning_prerl.reproduction.stats'\n"
        "assert 'lightning_prerl.reproduction.report' not in sys.modules\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
