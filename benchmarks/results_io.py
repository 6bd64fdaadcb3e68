"""Where the benchmarks write their tables: benchmarks/results/<name>.json (git-ignored)."""

from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def write_json(name: str, **payload) -> Path:
    """Write `payload` (the arguments and the rows of the printed table) to results/<name>.json."""
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2))
    return path
