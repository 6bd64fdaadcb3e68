"""The reproduction report of `experiment=reproduce_toy`: the paper's four findings, over seeds, from the runs' logs.

Reads only what the sweep's jobs wrote: `logs/metrics.csv` (held-out `val/*` curves, `passk/pass@k`
from `passk.PassAtKCurve`, `align/*`) and `logs/alignment.csv` (one row per measured response, from
`alignment.GradientAlignment`), grouped by the swept `objective` and `seed`; the slip analysis
(`repairs.py`, optional) samples each job's exported `policy/`. Writes into the sweep dir:

| file | content |
|---|---|
| `reproduction.md` | findings vs the paper with a verdict from each interval, paired differences with their |
|  | minimum detectable effect, final numbers, steps to thresholds, pass@k, thoughts ratios, |
|  | what policies do after a slip, alignment (95 % intervals throughout, `stats.py`) |
| `reproduction.json` | every number of the markdown, per job too (what the test compares with the logs) |
| `repro_accuracy.png` | held-out and training-rollout accuracy over steps, 95 % t band over seeds per objective |
| `repro_pass_at_k.png` | pass@k for k = 1..64 of the base policy and after training |
| `repro_thoughts.png` | transition and reflection thoughts per response over steps |
| `repro_alignment.png` | histograms of <grad log P(y), grad log P(y|x)> and their cosine: base, after, real model |

The base policy's numbers are the step-0 values, one job per seed (jobs of one seed share the base
policy, the first rollout batch and every sampling seed, so their step-0 values are equal). Per-seed
logged means (`val/*`) get Student's t interval over seeds, slip shares a bootstrap over seeds and
answers; pass@k, thoughts and the paired differences come from each job's per-problem record
(`logs/passk_problems.csv`) with the two-level bootstrap over seeds and problems (`stats.py`).
Steps to a threshold: the first held-out evaluation at or above base accuracy + gain, for
each gain of `threshold_gains` (the evaluation interval is the resolution).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from hydra.experimental.callback import Callback

import lightning_prerl.reproduction.operating_point as operating_point
import lightning_prerl.reproduction.stats as stats
from lightning_prerl.evaluation import intervals
from lightning_prerl.reports.alignment import summarize
from lightning_prerl.reports.sweep import SEED_KEY, Job, find_jobs, mean_std
from lightning_prerl.reproduction.plots import plot_alignment, plot_over_steps, plot_pass_at_k
from lightning_prerl.reproduction.repairs import slip_intervals, sweep_slip_stats
from lightning_prerl.reproduction.text import ACCURACY, FINALS, THOUGHTS, findings, markdown

OBJECTIVE_KEY = "objective"
ARM_KEY = "arm"  # experiment=reproduce_recheck sweeps arms (conf/arm/<world>_<label>.yaml), not objectives
ROLLOUT_ACCURACY = "rollout/accuracy"  # every step, on the step's training rollouts
DEFAULT_WORLD = "thoughts"  # a sweep of objectives (experiment=reproduce_toy) runs on the "thoughts" world


def world_and_label(job: Job) -> tuple[str, str]:
    """(toy world, arm label) of a job: `arm=recheck_dsrl_10` -> ("recheck", "dsrl_10"); a sweep of objectives
    -> ("thoughts", the objective)."""
    arm = job.overrides.get(ARM_KEY)
    if arm is None:
        return DEFAULT_WORLD, job.overrides.get(OBJECTIVE_KEY, "")
    world, _, label = arm.partition("_")
    return world, label


def label(job: Job) -> str:
    return world_and_label(job)[1]


def read_alignment(job_dir: Path) -> list[dict[str, float]]:
    """The per-response rows of a run's `logs/alignment.csv` (the last measurement of a (step, sample) wins)."""
    path = Path(job_dir) / "logs" / "alignment.csv"
    if not path.is_file():
        return []
    with open(path, newline="") as fh:
        rows = {(r["step"], r["sample"]): {k: float(v) for k, v in r.items()} for r in csv.DictReader(fh)}
    return list(rows.values())


def first_value(job: Job, metric: str) -> float | None:
    points = job.series.get(metric)
    return points[0][1] if points and points[0][0] == 0 else None


def final_step(job: Job) -> float | None:
    points = job.series.get(ACCURACY)
    return points[-1][0] if points else None


def steps_to(job: Job, threshold: float) -> float | None:
    """The first evaluated step at which held-out accuracy reaches `threshold` (None: never)."""
    return next((s for s, v in job.series.get(ACCURACY, []) if v >= threshold), None)


def one_per_seed(jobs: list[Job]) -> list[Job]:
    """One job of every seed, the first (in job order) that measured the base policy's pass@k (step 0), else
    the first: the base policy's step-0 values, counted once per seed (only some arms measure pass@k there)."""
    seen: dict[str | None, Job] = {}
    for job in sorted(jobs, key=lambda j: first_value(j, "passk/pass@1") is None):  # stable: job order kept
        seen.setdefault(job.overrides.get(SEED_KEY), job)
    return list(seen.values())


def _pass_ks(jobs: list[Job]) -> list[int]:
    ks = {int(k.split("@")[1]) for job in jobs for k in job.series if k.startswith("passk/pass@")}
    return sorted(ks)


def _alignment_stats(rows: list[dict[str, float]]) -> dict:
    """The report's alignment numbers: `alignment.summarize`, as logged during training, of `rows`, and
    the intervals over rollouts of the negative share and the mean cosine (`ci`)."""
    keys = ("negative_share", "cosine_mean", "inner_mean", "logp_gap_mean")
    logged = summarize(rows) if rows else {}
    return {"samples": len(rows), **{k: logged.get(f"align/{k}") for k in keys}, "ci": stats.alignment_intervals(rows)}


def _without_answers(slips: dict) -> dict:
    """`repairs.slip_stats` without its per-answer counts (kept out of reproduction.json)."""
    return {k: v for k, v in slips.items() if k != "per_answer"}


def _over_seeds(values) -> dict | None:
    kept = [v for v in values if v is not None]
    return stats.as_dict(intervals.over_seeds(kept)) if kept else None


def _by_seed(members: list[Job]) -> dict[str | None, Job]:
    return {j.overrides.get(SEED_KEY): j for j in members}


def comparisons(by_objective: dict[str, list[Job]], problems: dict[Path, dict], ks: list[int]) -> list[dict]:
    """Paired differences: each objective's trained policy - the base policy (same seed), every DSRL arm - GRPO
    (same seed); on pass@1 and the largest pass@k from the per-problem records, else on the per-seed final
    `val/accuracy`."""
    pairs = [(f"{o} - base", [(j, "base", j, "final") for j in members]) for o, members in by_objective.items()]
    for dsrl_arm in (o for o in by_objective if o.startswith("dsrl") and "grpo" in by_objective):
        grpo, dsrl = _by_seed(by_objective["grpo"]), _by_seed(by_objective[dsrl_arm])
        pairs.append((f"{dsrl_arm} - grpo", [(grpo[s], "final", dsrl[s], "final") for s in grpo if s in dsrl]))
    out = []
    for name, matched in pairs:
        a = [problems[ja.dir].get(wa, {}) for ja, wa, _, _ in matched]
        b = [problems[jb.dir].get(wb, {}) for _, _, jb, wb in matched]
        metrics = [f"pass@{k}" for k in ks[:1] + ks[-1:]] if a and all(a) and all(b) else []
        for metric in dict.fromkeys(metrics):
            out.append({"comparison": name, "metric": metric, **stats.compare(a, b, metric)})
        if not metrics:
            values = [
                (first_value(ja, ACCURACY) if wa == "base" else ja.final(ACCURACY), jb.final(ACCURACY))
                for ja, wa, jb, _ in matched
            ]
            result = stats.compare_seed_means(*map(list, zip(*values, strict=True))) if values else None
            if result:
                out.append({"comparison": name, "metric": ACCURACY, **result})
    return out


def sweep_jobs(sweep_dir: Path) -> list[Job]:
    """The sweep's jobs that logged metrics (their `logs/metrics.csv` read once, for numbers and figures)."""
    jobs = [j for j in find_jobs(sweep_dir) if j.series]
    if not jobs:
        raise FileNotFoundError(f"no job with logs/metrics.csv under {sweep_dir}")
    return jobs


def collect(
    sweep_dir: Path,
    jobs: list[Job],
    real_model: Path | None = None,
    threshold_gains: tuple[float, ...] = (0.05, 0.1, 0.15),
    slip_problems: int = 0,
    slip_samples: int = 4,
) -> dict:
    """Every number of the report, from the logs of `jobs` (`sweep_jobs(sweep_dir)`); with `slip_problems` > 0
    also the slip/repair statistics (`repairs.py`) of the base policy and of every job's exported policy."""
    objectives = list(dict.fromkeys(label(j) for j in jobs))
    by_objective = {o: [j for j in jobs if label(j) == o] for o in objectives}
    ks, seeds = _pass_ks(jobs), one_per_seed(jobs)
    problems = {j.dir: stats.read_problems(j.dir) for j in jobs}
    base_of = {j.overrides.get(SEED_KEY): problems[j.dir].get("base") for j in seeds}
    for j in jobs:  # arms that did not measure the base policy pair with their seed's measurement of it
        if "base" not in problems[j.dir] and base_of.get(j.overrides.get(SEED_KEY)):
            problems[j.dir] = {"base": base_of[j.overrides.get(SEED_KEY)], **problems[j.dir]}
    measured = [f"pass@{k}" for k in ks] + stats.THOUGHT_KEYS
    base = {m: _over_seeds(first_value(j, m) for j in seeds) for m in FINALS}
    base_passk = {k: _over_seeds(first_value(j, f"passk/pass@{k}") for j in seeds) for k in ks}
    base_accuracy = base[ACCURACY]["estimate"] if base[ACCURACY] else None
    thresholds = [] if base_accuracy is None else [round(base_accuracy + g, 4) for g in threshold_gains]
    base_rows = [r for j in seeds for r in read_alignment(j.dir) if r["step"] == 0]
    slips_base, slips = (
        sweep_slip_stats([j.dir for j in jobs], slip_problems, slip_samples) if slip_problems else ({}, {})
    )
    per_job, per_objective = [], {}
    for objective, members in by_objective.items():
        records, after_rows = [], []
        for job in members:
            rows = read_alignment(job.dir)
            last = max((r["step"] for r in rows), default=0)
            after = [r for r in rows if last > 0 and r["step"] == last]  # the trained policy's rows
            after_rows += after
            record = {
                "dir": str(job.dir),
                "objective": objective,
                "seed": job.overrides.get(SEED_KEY),
                "final_step": final_step(job),
                "finals": {m: job.final(m) for m in FINALS},
                "base": {m: first_value(job, m) for m in FINALS},
                "pass_at_k": {k: job.final(f"passk/pass@{k}") for k in ks},
                "steps_to_threshold": [steps_to(job, t) for t in thresholds],
                "peak_accuracy": max((v for _, v in job.series.get(ACCURACY, [])), default=None),
                "alignment_after": _alignment_stats(after),
                "slips": _without_answers(slips.get(job.dir, {})),
            }
            for m in THOUGHTS:
                b, f = record["base"][m], record["finals"][m]
                record.setdefault("thought_ratio", {})[m] = f / b if b and f is not None else None
            records.append(record)
        per_job += records

        before, after = ([problems[j.dir].get(w, {}) for j in members] for w in ("base", "final"))
        ratios = {
            m: stats.thought_ratio(before, after, key) or stats.seed_ratio([r["thought_ratio"][m] for r in records])
            for m, key in zip(THOUGHTS, stats.THOUGHT_KEYS, strict=True)
        }
        per_objective[objective] = {
            "seeds": len(records),
            "finals": {m: _over_seeds(r["finals"][m] for r in records) for m in FINALS},
            "pass_at_k": {k: _over_seeds(r["pass_at_k"][k] for r in records) for k in ks},
            "heldout": stats.heldout(after, measured),
            "thought_ratio": ratios,
            "peak_accuracy": _over_seeds(r["peak_accuracy"] for r in records),
            "steps_to_threshold": [
                _reached([r["steps_to_threshold"][i] for r in records]) for i in range(len(thresholds))
            ],
            "alignment_after": _alignment_stats(after_rows),
            "alignment_after_rows": after_rows,
            "slips": slip_intervals([slips[j.dir] for j in members if j.dir in slips]) if slips else {},
        }
    real_rows = read_alignment(real_model) if real_model else []
    return {
        "sweep_dir": str(sweep_dir),
        "objectives": objectives,
        "ks": ks,
        "thresholds": thresholds,
        "slip_problems": slip_problems,
        "slip_samples": slip_samples,
        "threshold_gains": list(threshold_gains),
        "base": {
            "finals": base,
            "pass_at_k": base_passk,
            "heldout": stats.heldout([problems[j.dir].get("base", {}) for j in seeds], measured),
            "alignment": _alignment_stats(base_rows),
            "alignment_rows": base_rows,
            "seeds": len(seeds),
            "slips": _without_answers(slips_base) | ({"ci": slip_intervals([slips_base])} if slips_base else {}),
        },
        "jobs_count": len(jobs),
        "objective": per_objective,
        "comparisons": comparisons(by_objective, problems, ks),
        "jobs": per_job,
        "real_model": {
            "dir": str(real_model) if real_model else None,
            "alignment": _alignment_stats(real_rows),
            "alignment_rows": real_rows,
        },
    }


def _reached(per_seed: list[float | None]) -> dict:
    reached = [s for s in per_seed if s is not None]
    return {"reached": len(reached), "mean": mean_std(reached)[0], "per_seed": per_seed}


def _figures(data: dict, groups: dict[str, list[Job]], sweep_dir: Path, prefix: str = "repro") -> list[Path]:
    def png(name: str) -> Path:
        return sweep_dir / f"{prefix}_{name}.png"

    return [
        plot_over_steps(groups, [ACCURACY, ROLLOUT_ACCURACY], png("accuracy"), data["thresholds"]),
        plot_over_steps(groups, THOUGHTS, png("thoughts")),
        plot_pass_at_k(data, png("pass_at_k")),
        plot_alignment(data, png("alignment")),
    ]


def write_reproduction_report(
    sweep_dir: Path,
    real_model: Path | None = None,
    threshold_gains: tuple[float, ...] = (0.05, 0.1, 0.15),
    command: str = "",
    slip_problems: int = 0,
    slip_samples: int = 4,
    probe: Path | None = None,
) -> list[Path]:
    """Write reproduction.md, reproduction.json and the PNGs into `sweep_dir`: the full report of the main
    world ("recheck" when the sweep ran it, else its only world), the findings of every other world (the
    negative control) beside it, the speed curves, the switch sweep and the power against the paper."""
    sweep_dir = Path(sweep_dir)
    jobs = sweep_jobs(sweep_dir)
    worlds = list(dict.fromkeys(world_and_label(j)[0] for j in jobs))
    main = "recheck" if "recheck" in worlds else worlds[0]
    command = command or "python experiments/run.py experiment=reproduce_toy"
    out, written = {}, []
    for world in [main, *(w for w in worlds if w != main)]:
        members = [j for j in jobs if world_and_label(j)[0] == world]
        data = collect(sweep_dir, members, real_model, tuple(threshold_gains), slip_problems, slip_samples)
        groups = {o: [j for j in members if label(j) == o] for o in data["objectives"]}
        data["world"], data["speed"] = world, operating_point.speed(groups)
        data["paper_scale"] = operating_point.paper_scale(data, groups)
        data["switch_sweep"] = operating_point.switch_rows(data, groups, max(final_step(j) or 0 for j in members))
        data["findings"] = findings(data)
        out[world] = data
        written += _figures(data, groups, sweep_dir, "repro" if world == main else f"repro_{world}")
    top = {**out[main], "controls": {w: d for w, d in out.items() if w != main}}
    top["probe"] = str(probe) if probe else None
    md = sweep_dir / "reproduction.md"
    md.write_text(markdown(top, command))
    js = sweep_dir / "reproduction.json"
    js.write_text(json.dumps(top, indent=1, default=str))
    return [md, js, *written]


class ReproductionReport(Callback):
    """Hydra callback of `experiment=reproduce_recheck` (and `reproduce_toy`): writes the reproduction report
    when the multirun ends. `probe`: a real-model probe's result file, printed in its own section."""

    def __init__(
        self,
        real_model: str | None = None,
        threshold_gains: tuple[float, ...] = (0.05, 0.1, 0.15),
        slip_problems: int = 100,
        slip_samples: int = 4,
        probe: str | None = None,
    ):
        self.real_model, self.threshold_gains = real_model, tuple(threshold_gains)
        self.slip_problems, self.slip_samples, self.probe = slip_problems, slip_samples, probe

    def on_multirun_end(self, config, **kwargs) -> None:
        given = [o for o in config.hydra.overrides.hydra if not o.startswith("hydra.mode=")]
        overrides = " ".join([*config.hydra.overrides.task, *given])
        command = f"python experiments/run.py {overrides}".strip()
        real = Path(self.real_model) if self.real_model else None
        sweep = Path(config.hydra.sweep.dir)
        slips = (self.slip_problems, self.slip_samples)
        probe = Path(self.probe) if self.probe else None
        for path in write_reproduction_report(sweep, real, self.threshold_gains, command, *slips, probe=probe):
            print(f"reproduction report: {path}")
