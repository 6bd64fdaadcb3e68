"""The conditioning-space study's table (`experiment=spaces_toy`, `experiment=spaces_smollm2`).

Per measured pair of spaces (each run's `logs/alignment*.csv`, `GradientAlignment`) and step: the mean
cosine of the two gradients, the share of negative inner products, the mean inner product and the
log-prob gap, each with a 95 % interval from a two-level bootstrap, prompts then their samples
(`intervals.over_seeds_and_problems`): a prompt's G responses are not independent. Each row adds the
run's held-out accuracy at that step, where it was evaluated. `spaces.md` (the table, the command) and
`spaces.csv` go into the sweep or run directory: the `SpacesReport` Hydra callback at the end of a
multirun, or `experiments/report.py DIR --spaces` afterwards.
"""

from __future__ import annotations

import csv
from pathlib import Path

from hydra.experimental.callback import Callback

from lightning_prerl.evaluation import intervals
from lightning_prerl.reports.sweep import find_jobs

ACCURACY = "val/accuracy"
COLUMNS = ["run", "pair", "step", "rollouts", "cosine", "negative_share", "inner", "logp_gap", "accuracy"]
HEADERS = ["run", "pair (a vs b)", "step", "rollouts", "mean cosine", "negative share", "mean inner", "log-prob gap"]
HEADERS += ["val/accuracy"]


def read_pairs(log_dir: Path) -> dict[str, list[dict[str, float]]]:
    """`alignment.csv` (the paper's pair) and `alignment_<a>_vs_<b>.csv` rows of one run, by pair."""
    out = {}
    for path in sorted(Path(log_dir).glob("alignment*.csv")):
        pair = "marginal_vs_conditional" if path.stem == "alignment" else path.stem.removeprefix("alignment_")
        with open(path, newline="") as fh:
            out[pair] = [{k: float(v) for k, v in row.items()} for row in csv.DictReader(fh)]
    return out


def pair_rows(run: str, pair: str, rows: list[dict[str, float]], group_size: int) -> list[dict]:
    """One table row per measured step: each statistic with its interval over prompts and samples."""
    out = []
    for step in sorted({r["step"] for r in rows}):
        at = sorted((r for r in rows if r["step"] == step), key=lambda r: r["sample"])
        g = group_size if len(at) % group_size == 0 else 1  # whole prompts, else every response its own unit
        row = {"run": run, "pair": pair, "step": int(step), "rollouts": len(at)}
        for name, value in (
            ("cosine", lambda r: r["cosine"]),
            ("negative_share", lambda r: float(r["inner"] < 0)),
            ("inner", lambda r: r["inner"]),
            ("logp_gap", lambda r: r["logp_gap"]),
        ):
            values = [[value(r) for r in at[i : i + g]] for i in range(0, len(at), g)]  # (prompts, G)
            row[name] = intervals.over_seeds_and_problems(values)
        out.append(row)
    return out


def spaces_table(directory: Path, group_size: int) -> list[dict]:
    """The rows of a sweep directory (every job) or of one run directory."""
    jobs = find_jobs(directory)
    runs = [(job.dir, job.overrides.get("objective.space", job.dir.name), job.series.get(ACCURACY, [])) for job in jobs]
    if not runs:
        runs = [(Path(directory), Path(directory).name, [])]
    table = []
    for run_dir, name, accuracy in runs:
        at_step = dict(accuracy)  # step -> held-out accuracy, where evaluated
        for pair, rows in read_pairs(run_dir / "logs").items():
            table += [{**row, "accuracy": at_step.get(row["step"])} for row in pair_rows(name, pair, rows, group_size)]
    return table


def _cell(value, digits: int = 3) -> str:
    if isinstance(value, intervals.Interval):
        return value.text(digits)
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return "" if value is None else str(value)


def write_spaces_report(directory: Path, group_size: int, command: str = "") -> list[Path]:
    """`spaces.md` and `spaces.csv` in `directory` (nothing when no run measured alignment)."""
    table = spaces_table(Path(directory), group_size)
    if not table:
        return []
    md, flat = Path(directory) / "spaces.md", Path(directory) / "spaces.csv"
    lines = [
        "# Gradient alignment across conditioning spaces",
        "",
        f"Command: `{command}`" if command else "",
        "",
        "cos and <g_a, g_b> of grad log P(y|c_a) and grad log P(y|c_b) per rollout; gap: token-mean "
        "log P(y|c_b) - log P(y|c_a); [95 % interval, bootstrap over prompts then their samples].",
        "",
        "| " + " | ".join(HEADERS) + " |",
        "|" + "---|" * len(HEADERS),
    ]
    lines += ["| " + " | ".join(_cell(row[c]) for c in COLUMNS) + " |" for row in table]
    md.write_text("\n".join(lines) + "\n")
    with open(flat, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(
            [f"{c}{suffix}" for c in COLUMNS for suffix in (("", "_low", "_high") if c in COLUMNS[4:8] else ("",))]
        )
        for row in table:
            cells = []
            for c in COLUMNS:
                v = row[c]
                cells += [v.estimate, v.low, v.high] if isinstance(v, intervals.Interval) else [v]
            writer.writerow(cells)
    return [md, flat]


class SpacesReport(Callback):
    """Hydra callback of `experiment=spaces_toy`: writes the table when the multirun ends."""

    def __init__(self, group_size: int):
        self.group_size = group_size

    def on_multirun_end(self, config, **kwargs) -> None:
        overrides = " ".join(config.hydra.overrides.task)
        command = f"python experiments/run.py {overrides}".strip()
        for path in write_spaces_report(Path(config.hydra.sweep.dir), self.group_size, command):
            print(f"spaces report: {path}")
