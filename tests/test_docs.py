"""The documentation site: `mkdocs build --strict` passes (no broken link, anchor, snippet or API
reference), and the configuration reference it generates from the schema covers every key.

Needs the `docs` extra (installed by `make setup` on CPU machines). Without it the tests skip, except
under CI=true, where a missing mkdocs fails them.
"""

from __future__ import annotations

import html
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import get_args

import pytest
from pydantic import BaseModel

from lightning_prerl.config.schema import RunConfig

ROOT = Path(__file__).resolve().parents[1]
CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """The site built once, strictly, into a temporary directory."""
    missing = [m for m in ("mkdocs", "material", "mkdocstrings_handlers.python") if not _importable(m)]
    if missing:
        message = f"the docs extra is missing ({', '.join(missing)}): pip install -e .[docs]"
        pytest.fail(message) if CI else pytest.skip(message)
    out = tmp_path_factory.mktemp("site")
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert "WARNING" not in log, log[-4000:]
    return out


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def _text(path: Path) -> str:
    return html.unescape(path.read_text())


def test_the_site_builds_strict_with_every_page_and_the_api_reference(site):
    for page in ("index.html", "getting-started/index.html", "concepts/index.html", "how-to/data/index.html"):
        assert (site / page).is_file(), page
    assert not (site / "hooks").exists()  # the build hook is not published
    api = _text(site / "reference/api/training/index.html")
    assert 'id="lightning_prerl.training.policy.PolicyModule"' in api  # mkdocstrings rendered the class
    assert "Policy, optional reference, optimizer and metrics" in api  # with its docstring
    python_api = re.sub(r"<[^>]+>", "", _text(site / "how-to/python-api/index.html"))  # code is highlighted
    assert "DSRLSwitch(warmup=module.objective" in python_api  # the README's example, included


def _paths(model: type[BaseModel], prefix: str) -> list[tuple[str, object]]:
    """(dotted key, field) of every key below `model`, each member of a union of nodes expanded."""
    out = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        nodes = [a for a in (field.annotation, *_flat_args(field.annotation)) if _is_node(a)]
        out.append((key, field))
        for node in dict.fromkeys(nodes):
            out += _paths(node, f"{key}.")
    return out


def _flat_args(annotation) -> list:
    args = []
    for arg in get_args(annotation):
        args += [arg, *_flat_args(arg)]
    return args


def _is_node(annotation) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def test_the_config_reference_lists_every_schema_key_with_its_meaning(site):
    page = _text(site / "reference/config/index.html")
    rows = {
        re.sub(r"<[^>]+>", "", cells[0]): [re.sub(r"<[^>]+>", "", c) for c in cells[1:]]
        for cells in (re.findall(r"<td>(.*?)</td>", row, re.S) for row in re.findall(r"<tr>(.*?)</tr>", page, re.S))
        if cells
    }
    for key, field in _paths(RunConfig, ""):
        assert field.description, f"{key}: no one-line meaning (an attribute docstring in config/schema.py)"
        if _is_node(field.annotation) or any(_is_node(a) for a in _flat_args(field.annotation)):
            continue  # a node: its keys have rows (or one row `node` / `node.*` that covers them)
        parents = [key.rsplit(".", i)[0] for i in range(1, key.count(".") + 1)]
        covering = [key, *parents, *(f"{p}.*" for p in parents)]
        assert any(k in rows for k in covering), f"{key} is not in the configuration reference"
        if key in rows:
            assert " ".join(field.description.replace("`", "").split()) in " ".join(rows[key][3].split()), key
    # defaults come from the composed default config, interpolations resolved where they can be
    # the paper's 19 of 348 steps: 3 of the toy's 60, in whole rollout batches
    share = "${lp.share_of:0.055,${trainer.max_steps},${lp.mul:${module.ppo_epochs},${module.mini_batches}}}"
    assert rows["objective.switch_step"][2] == "${oc.select:dsrl.switch_step," + share + "} = 3"
    assert rows["data.prompts_per_step"][2] == "16"
    assert "objective=nsr_prerl" in page  # what each option of a group changes
