"""Module paths from before the package had subpackages (0.1's flat layout) keep importing, with one warning.

`import lightning_prerl.policy` and a Hydra `_target_: lightning_prerl.datamodule.RolloutDataModule` in an
old config resolve to the module's new home (`lightning_prerl.training.policy`, ...): the same module
object, so patches and isinstance checks see one class. Three old modules share their name with a new
subpackage (`config`, `evaluation`, `reproduction`); their names are forwarded by `forward_old_names`.
Nothing imports this but the package's `__init__`; it imports nothing of the package eagerly.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

MOVED = {
    "correction": "objectives.correction",
    "batch": "data.batch",
    "rewards": "data.rewards",
    "prompts": "data.prompts",
    "toyworld": "data.toyworld",
    "benchmarks": "data.benchmarks",
    "shaping": "data.shaping",
    "metrics": "evaluation.metrics",
    "passk": "evaluation.passk",
    "models": "scale.models",
    "lora": "scale.lora",
    "zero": "scale.zero",
    "networks": "scale.networks",
    "datamodule": "training.datamodule",
    "update": "training.update",
    "policy": "training.policy",
    "heldout": "training.heldout",
    "dsrl": "training.dsrl",
    "checkpoints": "training.checkpoints",
    "report": "reports.plots",
    "sweep": "reports.sweep",
    "summary": "reports.summary",
    "callbacks": "reports.callbacks",
    "alignment": "reports.alignment",
    "schema": "config.schema",
    "compose": "config.compose",
    "repro_text": "reproduction.text",
    "repro_plots": "reproduction.plots",
    "repairs": "reproduction.repairs",
}
# old module -> new module, for the old modules whose name is now a subpackage's
RENAMED_IN_PLACE = {
    "config": "config.checks",
    "evaluation": "evaluation.scoring",
    "reproduction": "reproduction.report",
}
_warned: set[str] = set()


def _warn_once(old: str, new: str) -> None:
    if old not in _warned:
        _warned.add(old)
        warnings.warn(f"{old} moved to {new}; the old path will be removed", FutureWarning, stacklevel=3)


class _OldPathFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds `lightning_prerl.<old>` and hands back the module at its new path."""

    def find_spec(self, fullname, path=None, target=None):
        prefix, _, name = fullname.partition(".")
        if prefix == "lightning_prerl" and name in MOVED:
            return importlib.util.spec_from_loader(fullname, self)
        return None

    def create_module(self, spec):
        new = f"lightning_prerl.{MOVED[spec.name.partition('.')[2]]}"
        _warn_once(spec.name, new)
        return importlib.import_module(new)  # keeps its own __name__ and __spec__

    def exec_module(self, module) -> None:
        pass  # already executed under its new name


def install() -> None:
    if not any(isinstance(f, _OldPathFinder) for f in sys.meta_path):
        sys.meta_path.append(_OldPathFinder())


def forward_old_names(package: str, name: str):
    """Module `__getattr__` of the subpackages that took an old module's name: its names, with a warning."""
    old = package.rpartition(".")[2]
    new = f"lightning_prerl.{RENAMED_IN_PLACE[old]}"
    if name.startswith("__") or importlib.util.find_spec(f"{package}.{name}") is not None:
        # a submodule of the package (`from package import submodule`): the import system loads it;
        # importing the old module's new home here could close a cycle through the submodule
        raise AttributeError(f"module {package!r} has no attribute {name!r}")
    module = importlib.import_module(new)
    if not hasattr(module, name):
        raise AttributeError(f"module {package!r} has no attribute {name!r}")
    _warn_once(f"{package}.{name}", f"{new}.{name}")
    return getattr(module, name)
