"""`make mutation`'s report: mutmut's results per core module, and every surviving mutant's diff.

    .venv/bin/python tests/mutation_report.py [--out mutation.md]

Reads mutmut 3's per-file results (mutants/<path>.meta, written by `mutmut run`); score = killed /
(killed + survived + timeout + suspicious): mutants no test covers are counted apart ("no tests").
A survivor that is equivalent code (no input tells it from the original) or that changes only a logged
statistic is noted in tests/mutation_equivalent/<module>.txt by its content, not its number (mutmut
renumbers a function's mutants whenever its code or its covered lines change): the function, the
line as it was (`  - `), the line as mutated (`  + `) and one line saying why. The report counts a
survivor whose function and lines match a note as "noted", and lists every note that matches no
survivor (stale: killed now, or the code changed).
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


Note = tuple[str, tuple[str, ...], tuple[str, ...]]  # (function, lines as they were, lines as mutated)


def notes() -> dict[Note, str]:
    """{(function, - lines, + lines): why} from tests/mutation_equivalent/*.txt (blocks apart by blank lines)."""
    out = {}
    for path in sorted(NOTES.glob("*.txt")):
        for block in path.read_text().split("\n\n"):
            lines = [line for line in block.splitlines() if line.strip() and not line.startswith("#")]
            if not lines:
                continue
            minus = tuple(line[4:].strip() for line in lines[1:] if line.startswith("  - "))
            plus = tuple(line[4:].strip() for line in lines[1:] if line.startswith("  + "))
            why = " ".join(line.strip() for line in lines[1:] if not line.startswith(("  - ", "  + ")))
            out[(lines[0].strip(), minus, plus)] = why
    return out


def content(name: str, diff: str) -> Note:
    """The note key of mutant `name` with diff `diff`."""
    changed = [line for line in diff.splitlines() if line[:1] in "+-" and line[:3] not in ("+++", "---")]
    minus = tuple(line[1:].strip() for line in changed if line.startswith("-"))
    plus = tuple(line[1:].strip() for line in changed if line.startswith("+"))
    return name.rsplit("__mutmut_", 1)[0], minus, plus


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "mutants" / "mutation.md")
    args = ap.parse_args()
    by_module = results()
    if not by_module:
        sys.exit("no mutmut results under mutants/: run `make mutation` (mutmut run) first")
    from mutmut.mutation.diff_apply import get_diff_for_mutant  # in-process: `mutmut show` takes ~2 s each

    noted = notes()
    header = "| module | mutants | killed | survived | noted | timeout | no tests | score |"
    lines = [header, "|---|---|---|---|---|---|---|---|"]
    survivors, matched = [], set()
    for module, statuses in by_module.items():
        n = Counter(statuses.values())
        judged = n["killed"] + n["survived"] + n["timeout"] + n["suspicious"]
        score = f"{n['killed'] / judged:.1%}" if judged else "n/a"
        alive = [(name, get_diff_for_mutant(name, path=module)) for name, s in statuses.items() if s == "survived"]
        keys = {name: content(name, diff) for name, diff in alive}
        matched |= {key for key in keys.values() if key in noted}
        explained = sum(key in noted for key in keys.values())
        counts = f"{len(statuses)} | {n['killed']} | {n['survived'] - explained} | {explained}"
        lines.append(f"| {module} | {counts} | {n['timeout']} | {n['no tests']} | {score} |")
        survivors += [(name, diff) for name, diff in alive if keys[name] not in noted]
    stale = [key for key in noted if key not in matched]
    if stale:
        lines += ["", f"{len(stale)} stale notes (killed now, or the code changed):"]
        lines += [f"- {func}: {' / '.join(plus)}" for func, _, plus in stale]
    text = "\n".join(lines) + "\n"
    print(text)
    details = [f"### {name}\n```diff\n{diff}\n```\n" for name, diff in survivors]
    args.out.write_text(text + f"\n## {len(survivors)} surviving mutants\n\n" + "\n".join(details))
    print(f"{len(survivors)} surviving mutants without a note, diffs in {args.out}")


if __name__ == "__main__":
    main()
