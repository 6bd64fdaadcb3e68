"""The public API: names importable from the package, lazily, and the README's Python example runs."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from test_run import ROOT


def test_every_public_name_imports_from_the_package_and_the_package_import_stays_light():
    import lightning_prerl

    for name in lightning_prerl.__all__:
        assert getattr(lightning_prerl, name).__name__ == name
    probe = "import sys, lightning_prerl; print('torch' in sys.modules, 'lightning' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]  # reward worker processes import the package: it must not pull torch
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        lightning_prerl.Nope  # noqa: B018


@pytest.mark.slow
def test_the_readme_python_example_trains_dsrl_with_a_plain_trainer(tmp_path):
    readme = (ROOT / "README.md").read_text()
    # the snippet section that docs/how-to/python-api.md includes (pymdownx.snippets)
    code = re.search(r"\[start:api-example\] -->\n```python\n(.*?)```", readme, re.S).group(1)
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300, env=None
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.search(r"switched to grpo at step 2; val/accuracy \d\.\d{3}", proc.stdout)
