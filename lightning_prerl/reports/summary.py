"""The end-of-run summary: held-out metrics before -> after, seconds per step, skipped steps, artefacts.

Everything is read back from the run's own `metrics.csv`, so a resumed run (whose CSV keeps the rows
logged before the interruption) is summarised whole, and the numbers are the ones the report plots.
`build_summary` makes the dict written as `summary.json`; `print_summary` prints it on the terminal.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from rich.console import Console
from rich.table import Table

from lightning_prerl import atomic
from lightning_prerl.reports.logs import read_metrics

# val/<metric> and val/<benchmark>/<metric>: avg@k is the paper's accuracy (mean over k samples)
HELDOUT = re.compile(
    r"^val/(?:(?P<bench>[^/]+)/)?(?P<name>accuracy|avg@\d+|pass@\d+|format_valid|\w+_thoughts|\w+_rate)$"
)
TIMES = ("time/generate", "time/score", "time/train", "time/sync")


def _heldout_order(key: str) -> tuple:
    """Aggregate metrics before per-benchmark ones; accuracy, avg@k, pass@k by k, format, behaviour."""
    m = HELDOUT.match(key)
    name, _, k = m["name"].partition("@")
    kind = {"accuracy": 0, "avg": 1, "pass": 2, "format_valid": 3}.get(name, 4)  # 4: behaviour, by name
    return (m["bench"] is not None, m["bench"] or "", kind, int(k or 0), name)


def _value_at(points: list[tuple[float, float]], step: float | None) -> float | None:
    values = [v for s, v in points if s == step]
    return values[-1] if values else None  # a step logged twice: its latest value


def heldout(series: dict[str, list[tuple[float, float]]]) -> dict:
    """Held-out metrics at the first and the last evaluation.

    "before" is the first evaluation when it ran at step 0 or when a later one followed it; "after" is
    the last one when it came after training started. A single evaluation at step 0 has no "after",
    a single one after training no "before".

    Returns:
        {"before_step", "after_step", "metrics": {key: {"before", "after"}}}; steps and values None
        where there is no such evaluation.
    """
    keys = sorted((k for k in series if HELDOUT.match(k)), key=_heldout_order)
    steps = sorted({s for k in keys for s, _ in series[k]})
    if not steps:
        return {"before_step": None, "after_step": None, "metrics": {}}
    first, last = steps[0], steps[-1]
    before = first if first == 0 or last != first else None
    after = last if last != first or last > 0 else None
    metrics = {k: {"before": _value_at(series[k], before), "after": _value_at(series[k], after)} for k in keys}
    return {
        "before_step": None if before is None else int(before),
        "after_step": None if after is None else int(after),
        "metrics": metrics,
    }


def phase_starts(series: dict[str, list[tuple[float, float]]]) -> list[dict]:
    """[{"phase", "start_step"}] of each phase a schedule (DSRL) ran, from the logged `objective/phase`."""
    starts: dict[int, int] = {}
    for step, phase in sorted(series.get("objective/phase", [])):
        starts.setdefault(int(phase), int(step))
    return [{"phase": phase, "start_step": step} for phase, step in starts.items()]


def build_summary(metrics_csv: Path, artefacts: dict[str, str] | None = None) -> dict:
    """The run summary from a Lightning CSVLogger `metrics.csv`.

    Args:
        metrics_csv: the run's metrics file (rows keyed by `step`).
        artefacts: {what: path} of the run's outputs, copied into the summary as given.

    Returns:
        {"heldout": see `heldout`, "seconds_per_step": {time/*: mean over rollout steps, "total": sum},
        "rollout_steps": rows with timings, "skipped_steps": the last `train/skipped_steps`,
        "oom_retries": the last `train/oom_retries`,
        "phases": see `phase_starts`, "artefacts": artefacts}.
    """
    series = read_metrics(metrics_csv)
    time_keys = [k for k in TIMES if k in series] + sorted(
        k for k in series if k.startswith("time/") and k not in TIMES
    )
    seconds = {k: sum(v for _, v in series[k]) / len(series[k]) for k in time_keys}
    if seconds:
        seconds["total"] = sum(seconds.values())
    skipped, oom = series.get("train/skipped_steps"), series.get("train/oom_retries")
    return {
        "heldout": heldout(series),
        "seconds_per_step": seconds,
        "rollout_steps": max((len(series[k]) for k in time_keys), default=0),
        "skipped_steps": int(skipped[-1][1]) if skipped else 0,
        "oom_retries": int(oom[-1][1]) if oom else 0,
        "phases": phase_starts(series),
        "artefacts": dict(artefacts or {}),
    }


def write_summary(summary: dict, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic.write_text(path, json.dumps(summary, indent=2) + "\n")  # a failed write keeps the old file


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" if abs(value) < 100 else f"{value:.1f}"


def summary_table(summary: dict) -> Table | None:
    """Held-out metrics as a rich table: before, after, change (None when no evaluation was logged)."""
    held = summary["heldout"]
    if not held["metrics"]:
        return None
    table = Table(title="Run summary: held-out metrics", title_justify="left")
    table.add_column("metric")
    for step, label in ((held["before_step"], "before"), (held["after_step"], "after")):
        table.add_column(label if step is None else f"{label} (step {step})", justify="right")
    table.add_column("change", justify="right")
    for key, v in held["metrics"].items():
        if key.endswith("_thoughts") and not v["before"] and not v["after"]:
            continue  # no thought of this kind at either end (a world without thoughts): kept in summary.json
        change = None if v["before"] is None or v["after"] is None else v["after"] - v["before"]
        table.add_row(key, _fmt(v["before"]), _fmt(v["after"]), "-" if change is None else f"{change:+.3f}")
    return table


def summary_lines(summary: dict) -> list[str]:
    """Seconds per step split by stage, skipped steps and one line per artefact path."""
    seconds = summary["seconds_per_step"]
    split = " + ".join(f"{k.removeprefix('time/')} {v:.2f}" for k, v in seconds.items() if k != "total")
    timing = f"{split} = {seconds['total']:.2f}" if seconds else "not logged"
    phases = summary.get("phases", [])
    named = [f"{p['name']} ({p['objective']})" if "objective" in p else str(p["phase"]) for p in phases]
    starts = ", ".join(f"{label} from step {p['start_step']}" for label, p in zip(named, phases, strict=True))
    return [
        f"seconds per step (mean of {summary['rollout_steps']}): {timing}",
        f"skipped steps: {summary['skipped_steps']}, out-of-memory retries: {summary.get('oom_retries', 0)}",
        *([f"phases: {starts}"] if len(phases) > 1 else []),
        *(f"{what.replace('_', ' ')}: {path}" for what, path in summary["artefacts"].items()),
    ]


def print_summary(summary: dict) -> None:
    """The table, then the lines unwrapped and uncropped (paths stay whole in a narrow terminal)."""
    console = Console()
    table = summary_table(summary)
    console.print(table if table is not None else "Run summary: no held-out evaluation logged", soft_wrap=True)
    for line in summary_lines(summary):
        console.print(line, soft_wrap=True, markup=False, highlight=False)
