"""What `experiment=reproduce_recheck` adds to the report: the speed finding, the switch sweep, the power of the
design against the paper's effect sizes, and an optional real-model probe's table.

- `speed`: every DSRL arm - GRPO, paired per seed, in the mean of a curve over the run (held-out accuracy at
  each evaluation after step 0, the every-3-steps curve; training-rollout accuracy at every step): the area
  under the curve divided by its length, so "reaches the same accuracy sooner" shows as a positive
  difference. Student's t over seeds (`stats.paired` on per-seed means) and its MDE.
- `paper_scale`: the paper's effects (PAPER-NOTES.md, Qwen3-4B) in this world's units: DSRL's final gain over
  GRPO is 1.75 points of avg@32 = 12.0 % of GRPO's gain over the base model (55.79 - 41.26), so here it is
  0.120 x (GRPO - base) measured on the same problems; the speed-up (2.5x fewer steps to 45 %) is GRPO's mean
  held-out curve (its non-decreasing fit) run 2.5x faster, g(min(2.5 t, T)), whose curve mean minus GRPO's
  is the difference that speed would give. A comparison is powered for the finding when its MDE is at most that effect.
- `switch_rows`: each DSRL arm's switch step (where `objective/phase` changes) with its final pass@1 and its
  differences from GRPO.
- `probe_lines`: the table of a real-model probe's result file (`.md`: included as it is; `.json`: either
  {"title", "header", "rows", "note"} or what `experiments/probe_smollm2.py` writes: per objective and per
  "a-b" pair, {"reflection", "control", "excess"} each {"estimate", "low", "high", "n"}); no file, no section.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from scipy.optimize import isotonic_regression

import lightning_prerl.reproduction.stats as stats
from lightning_prerl.reports.sweep import SEED_KEY, Job
from lightning_prerl.reproduction.plots import switch_steps

ACCURACY, ROLLOUT_ACCURACY = "val/accuracy", "rollout/accuracy"
CURVES = [ACCURACY, ROLLOUT_ACCURACY]
PAPER_FINAL_SHARE = (57.54 - 55.79) / (55.79 - 41.26)  # DSRL - GRPO over GRPO - base, avg@32, Qwen3-4B: 0.120
PAPER_SPEEDUP = 2.5  # DSRL reaches 45 % in 2.5x fewer steps than GRPO (PAPER-NOTES.md 5.4)


def curve_mean(job: Job, metric: str) -> float | None:
    """Mean of `metric` over the steps after 0 at which it was logged (None without any)."""
    values = [v for s, v in job.series.get(metric, []) if s > 0]
    return float(np.mean(values)) if values else None


def _seeds(jobs: list[Job]) -> dict[str | None, Job]:
    return {j.overrides.get(SEED_KEY): j for j in jobs}


def speed(by_label: dict[str, list[Job]]) -> list[dict]:
    """Every DSRL arm - GRPO in `curve_mean` of each of CURVES, paired per seed (seeds both ran)."""
    if "grpo" not in by_label:
        return []
    grpo, out = _seeds(by_label["grpo"]), []
    for arm in (a for a in by_label if a.startswith("dsrl")):
        dsrl = _seeds(by_label[arm])
        for metric in CURVES:
            pairs = [(curve_mean(grpo[s], metric), curve_mean(dsrl[s], metric)) for s in grpo if s in dsrl]
            pairs = [p for p in pairs if None not in p]
            if pairs:
                a, b = (np.array(v, dtype=np.float64) for v in zip(*pairs, strict=True))  # (S,) each
                diff = stats.paired(a, b, len(a), 0)
                out.append({"comparison": f"{arm} - grpo", "metric": f"{metric} curve mean", **diff})
    return out


def mean_curve(jobs: list[Job], metric: str = ACCURACY) -> tuple[np.ndarray, np.ndarray]:
    """(steps, mean over jobs) of `metric` at the steps every job logged it."""
    common = sorted(set.intersection(*({s for s, _ in j.series.get(metric, [])} for j in jobs)))
    values = np.array([[dict(j.series[metric])[s] for s in common] for j in jobs], dtype=np.float64)  # (S, E)
    return np.array(common, dtype=np.float64), values.mean(0)  # (E,), (E,)


def sped_up_gain(steps: np.ndarray, curve: np.ndarray, factor: float = PAPER_SPEEDUP) -> float:
    """Curve mean (steps > 0) of the curve run `factor` x faster, g(min(factor t, T)), minus that of g; g is the
    isotonic (non-decreasing) fit of `curve`, so that the noise of one late evaluation does not set the level
    the faster curve keeps (scipy.optimize.isotonic_regression, pool adjacent violators)."""
    later, trend = steps > 0, isotonic_regression(curve).x  # (E,)
    faster = np.interp(np.minimum(factor * steps, steps[-1]), steps, trend)  # (E,)
    return float(faster[later].mean() - trend[later].mean())


def paper_scale(data: dict, by_label: dict[str, list[Job]]) -> list[dict]:
    """The paper's effects in this world's units next to this design's MDE for them (module docstring)."""
    rows = []
    base, grpo = data["base"]["heldout"].get("pass@1"), data["objective"].get("grpo", {}).get("heldout", {})
    for c in data["comparisons"]:
        if c["comparison"] == "dsrl - grpo" and c["metric"] == "pass@1" and base and grpo.get("pass@1"):
            gain = grpo["pass@1"]["estimate"] - base["estimate"]
            effect = PAPER_FINAL_SHARE * gain
            paper = f"DSRL - GRPO +1.75 avg@32 points = {PAPER_FINAL_SHARE:.1%} of GRPO's gain over base"
            rows.append(_power_row("final pass@1 (avg@16)", paper, f"{PAPER_FINAL_SHARE:.3f} x {gain:.3f}", effect, c))
    if "grpo" in by_label and by_label["grpo"][0].series.get(ACCURACY):
        steps, curve = mean_curve(by_label["grpo"])
        effect = sped_up_gain(steps, curve)
        for c in data.get("speed", []):
            if c["comparison"] == "dsrl - grpo" and c["metric"] == f"{ACCURACY} curve mean":
                paper = f"{PAPER_SPEEDUP}x fewer steps to 45 %"
                rows.append(_power_row("held-out curve mean", paper, "GRPO's curve run 2.5x faster", effect, c))
    return rows


def _power_row(what: str, paper: str, derivation: str, effect: float, c: dict) -> dict:
    return {
        "measure": what,
        "paper": paper,
        "here": derivation,
        "effect": effect,
        "mde": c["mde"],
        "powered": c["mde"] <= abs(effect),
        "difference": {k: c[k] for k in ("estimate", "low", "high", "n")},
        "seeds": c["seeds"],
        "problems": c["problems"],
    }


def switch_step(jobs: list[Job]) -> float | None:
    """The first step at which `objective/phase` changed in any of `jobs` (DSRL's switch)."""
    return next(iter(switch_steps(jobs)), None)


def switch_rows(data: dict, by_label: dict[str, list[Job]], max_steps: float | None) -> list[dict]:
    """Each DSRL arm: switch step and share of the run, final pass@1, and its differences from GRPO."""
    rows, pick = [], {(c["comparison"], c["metric"]): c for c in data["comparisons"] + data.get("speed", [])}
    for arm in (a for a in data["objectives"] if a.startswith("dsrl")):
        step = switch_step(by_label[arm])
        rows.append(
            {
                "arm": arm,
                "switch_step": step,
                "share": step / max_steps if step is not None and max_steps else None,
                "pass@1": data["objective"][arm]["heldout"].get("pass@1"),
                "minus_grpo": pick.get((f"{arm} - grpo", "pass@1")),
                "curve_minus_grpo": pick.get((f"{arm} - grpo", f"{ACCURACY} curve mean")),
            }
        )
    return sorted(rows, key=lambda r: (r["switch_step"] is None, r["switch_step"]))


def probe_lines(path: str | Path | None) -> list[str]:
    """The markdown section of a real-model probe's result file ([] without one)."""
    if not path:
        return []
    path = Path(path)
    lines = ["## Real-model probe", "", f"From `{path}` (written by the probe, not by this sweep).", ""]
    if path.suffix == ".md":
        return lines + [path.read_text().strip(), ""]
    result = json.loads(path.read_text())
    if "header" not in result:
        result = _probe_table(result)
    header, rows = result["header"], result["rows"]
    table = ["| " + " | ".join(map(str, header)) + " |", "|" + "---|" * len(header)]
    table += ["| " + " | ".join(map(str, r)) + " |" for r in rows]
    title = [f"**{result['title']}**", ""] if result.get("title") else []
    note = ["", result["note"]] if result.get("note") else []
    return lines + title + table + note + [""]


PROBE_MEASURES = ("reflection", "control", "excess")  # experiments/probe_smollm2.py's measures, nats


def _probe_table(result: dict) -> dict:
    """{"header", "rows", "note"} from `experiments/probe_smollm2.py`'s JSON: one row per objective or
    paired difference, each measure "estimate [low, high]" (a measure a row lacks: "–")."""

    rows = [
        [name, *(stats.ci_text(value.get(m), sign="+") for m in PROBE_MEASURES)]
        for name, value in result.items()
        if isinstance(value, dict) and any(m in value for m in PROBE_MEASURES)
    ]
    design = result.get("design", {})
    note = (
        f"Change in log-probability (nats) of reflection / transition openings and of control openings at "
        f"{design.get('boundaries', '?')} held-out thought boundaries ({design.get('problems', '?')} problems) "
        f"after one optimizer step; excess = reflection - control; 95 % bootstrap intervals over problems."
    )
    return {"title": "SmolLM2-135M: one step of each objective", "header": ["", *PROBE_MEASURES], "rows": rows,
            "note": note}  # fmt: skip
