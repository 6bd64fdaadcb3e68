"""`make mutation`'s report: mutmut's results per core module, and every surviving mutant's diff.

    .venv/bin/python tests/mutation_report.py [--out mutation.md]

Reads mutmut 3's per-file results (mutants/<path>.meta, written by `mutmut run`); score = killed /
(killed + survived + timeout + suspicious): mutants no test covers are counted apart ("no tests").
A survivor that is equivalent code (no input tells it from the original) or that changes only a logged
statistic is noted, one line each, in tests/mutation_equivalent/<module>.txt as `<mutant name>  <why>`:
the report counts it apart ("noted") and lists every note whose mutant no longer survives (stale).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NOTES = ROOT / "tests" / "mutation_equivalent"
STATUS = {1: "killed", 3: "killed", 0: "survived", 5: "no tests", 33: "no tests", 34: "skipped", 36: "timeout"}
STATUS |= {-24: "timeout", 24: "timeout", 152: "timeout", 255: "timeout", None: "not checked"}


def results() -> dict[str, dict[str, str]]:
    """{module: {mutant name: status}} from mutants/**/*.py.meta."""
    out = {}
    for meta in sorted((ROOT / "mutants").rglob("*.py.meta")):
        module = str(meta.relative_to(ROOT / "mutants")).removesuffix(".meta")
        codes = json.loads(meta.read_text())["exit_code_by_key"]
        out[module] = {name: STATUS.get(code, "suspicious") for name, code in codes.items()}
    return out


def notes() -> dict[str, str]:
    """{mutant name: why it may survive} from tests/mutation_equivalent/*.txt (# comments, blank lines skipped)."""
    out = {}
    for path in sorted(NOTES.glob("*.txt")):
        for line in path.read_text().splitlines():
            if line.strip() and not line.startswith("#"):
                name, _, why = line.strip().partition(" ")
                out[name] = why.strip()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "mutants" / "mutation.md")
    args = ap.parse_args()
    by_module = results()
    if not by_module:
        sys.exit("no mutmut results under mutants/: run `make mutation` (mutmut run) first")
    noted = notes()
    header = "| module | mutants | killed | survived | noted | timeout | no tests | score |"
    lines = [header, "|---|---|---|---|---|---|---|---|"]
    survivors, surviving = [], set()
    for module, statuses in by_module.items():
        n = Counter(statuses.values())
        judged = n["killed"] + n["survived"] + n["timeout"] + n["suspicious"]
        score = f"{n['killed'] / judged:.1%}" if judged else "n/a"
        alive = [name for name, status in statuses.items() if status == "survived"]
        surviving |= set(alive)
        explained = sum(name in noted for name in alive)
        counts = f"{len(statuses)} | {n['killed']} | {n['survived'] - explained} | {explained}"
        lines.append(f"| {module} | {counts} | {n['timeout']} | {n['no tests']} | {score} |")
        survivors += [(module, name) for name in alive if name not in noted]
    stale = sorted(set(noted) - surviving)
    if stale:
        lines += ["", f"{len(stale)} stale notes (killed now, or renamed): " + ", ".join(stale)]
    text = "\n".join(lines) + "\n"
    print(text)
    from mutmut.mutation.diff_apply import get_diff_for_mutant  # in-process: `mutmut show` takes ~2 s each

    details = [f"### {name}\n```diff\n{get_diff_for_mutant(name, path=module)}\n```\n" for module, name in survivors]
    args.out.write_text(text + f"\n## {len(survivors)} surviving mutants\n\n" + "\n".join(details))
    print(f"{len(survivors)} surviving mutants without a note, diffs in {args.out}")


if __name__ == "__main__":
    main()
