"""Benchmark evaluation: metrics of one benchmark's scored samples, and the evaluator's output files.

Everything here is a pure function of the samples (no model, no engine), so the numbers can be
recomputed from `evaluation.json` or reused on samples from elsewhere. Per benchmark, with k samples
per problem: avg@k (mean correctness), unbiased pass@j and maj@j for j = 1, 2, 4, ... up to k (and
k itself), mean response length in tokens, the truncation rate (completions that ended without a
stop token), format validity (share of completions with an extracted final answer), the behaviour
rates of `GenerationMetrics`, and the problems whose ground truth math-verify cannot parse (they
stay in the denominator and can never be scored correct: listed, never a silent 0). Across policies:
the ratio of each policy's transition and reflection thoughts per response to the first policy's
(`add_thought_ratios`, the paper's "14.89x / 6.54x" statistic).
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lightning_prerl import atomic
from lightning_prerl.evaluation import intervals
from lightning_prerl.evaluation.metrics import (
    DEFAULT_REFLECTION,
    DEFAULT_TRANSITION,
    KeywordRate,
    ThoughtCounts,
    answer_groups,
    majority_winner,
    pass_at_k,
)


def pass_ks(samples: int) -> list[int]:
    """1, 2, 4, ... up to `samples`, plus `samples` itself when it is not a power of two."""
    ks = [2**i for i in range(int(math.log2(samples)) + 1)] if samples >= 1 else []
    return ks + ([samples] if ks and ks[-1] != samples else [])


class MathEquivalence:
    """`(a, b) -> bool`: math-verify equivalence of two extracted answers, each parsed once.

    Answers are parsed as `\\boxed{answer}`, as `MathVerifyReward` parses completions; an answer
    math-verify cannot parse is only equal to the same string.
    """

    def __init__(self, timeout_s: int = 5):
        self.timeout_s = timeout_s
        self._parsed: dict[str, list] = {}

    def parse(self, answer: str) -> list:
        if answer not in self._parsed:
            from math_verify import parse

            try:
                self._parsed[answer] = parse(f"\\boxed{{{answer}}}", parsing_timeout=self.timeout_s)
            except Exception:  # a pathological answer is compared as a string
                self._parsed[answer] = []
        return self._parsed[answer]

    def __call__(self, a: str, b: str) -> bool:
        from math_verify import verify

        pa, pb = self.parse(a), self.parse(b)
        if not pa or not pb:
            return a.strip() == b.strip()
        try:
            return bool(verify(pa, pb, timeout_seconds=self.timeout_s))
        except Exception:
            return False


def unparsable_ground_truths(gold: Sequence[str]) -> list[int]:
    """Indices of the ground truths math-verify parses to nothing (as `MathVerifyReward` parses them)."""
    from math_verify import parse

    return [i for i, g in enumerate(gold) if not parse(f"${g}$")]


@dataclass
class BenchmarkSamples:
    """k scored samples of each problem of one benchmark; sample j of problem i is entry i * k + j.

    Attributes:
        name: the benchmark.
        k: samples per problem.
        gold: (P,) ground truths.
        rewards: (P*k,) verifier rewards (> 0.5: correct).
        answers: (P*k,) extracted final answers (None: no answer).
        lengths: (P*k,) response tokens (the stop token included).
        truncated: (P*k,) ended without a stop token.
        texts: (P*k,) decoded completions (behaviour rates).
    """

    name: str
    k: int
    gold: list[str] = field(default_factory=list)
    rewards: list[float] = field(default_factory=list)
    answers: list[str | None] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)
    truncated: list[bool] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)

    def problem(self, i: int, values: list) -> list:
        return values[i * self.k : (i + 1) * self.k]


def benchmark_metrics(
    s: BenchmarkSamples,
    equivalent: Callable[[str, str], bool],
    unparsable: Sequence[int] = (),
    transition: Sequence[str] = DEFAULT_TRANSITION,
    reflection: Sequence[str] = DEFAULT_REFLECTION,
) -> tuple[dict[str, float], list[dict]]:
    """(metrics, per-problem details) of one benchmark.

    Args:
        s: the scored samples.
        equivalent: answer equivalence for maj@k (`MathEquivalence` in the evaluator).
        unparsable: indices of unparsable ground truths (counted under `unparsable_ground_truths`).
        transition, reflection: behaviour keyword lists.
    Returns:
        metrics keyed `avg@k`, `pass@j`, `maj@j`, `response_length`, `truncated`, `format_valid`,
        `unparsable_ground_truths` and the behaviour rates; one dict per problem with its samples'
        rewards, answers, lengths and majority answer.
    """
    problems, k, ks = len(s.gold), s.k, pass_ks(s.k)
    if problems == 0 or len(s.rewards) != problems * k:
        raise ValueError(f"{s.name}: {len(s.rewards)} samples for {problems} problems x {k}")
    correct = torch.tensor(s.rewards, dtype=torch.float64).view(problems, k) > 0.5  # (P, k)
    counts = correct.sum(1).tolist()  # (P,) correct samples per problem
    groups = [answer_groups(s.problem(i, s.answers), equivalent) for i in range(problems)]
    metrics = {f"avg@{k}": correct.double().mean().item()}
    metrics |= intervals.over_problems([c / k for c in counts]).as_dict(f"avg@{k}")  # bootstrap over problems
    for j in ks:
        metrics[f"pass@{j}"] = sum(pass_at_k(k, c, j) for c in counts) / problems
        metrics |= intervals.over_problems([pass_at_k(k, c, j) for c in counts]).as_dict(f"pass@{j}")
    for j in ks:
        wins = [majority_winner(g[:j]) for g in groups]
        metrics[f"maj@{j}"] = sum(w is not None and bool(correct[i, w]) for i, w in enumerate(wins)) / problems
    metrics["response_length"] = sum(s.lengths) / len(s.lengths)
    metrics["truncated"] = sum(s.truncated) / len(s.truncated)
    metrics["format_valid"] = sum(a is not None for a in s.answers) / len(s.answers)
    metrics["unparsable_ground_truths"] = len(unparsable)
    rates = {"transition": KeywordRate(transition), "reflection": KeywordRate(reflection)}
    for name, metric in rates.items():
        metric.update(s.texts)
        values = metric.compute()
        metrics[f"{name}_rate"] = float(values["rate"])
        metrics[f"{name}_per_response"] = float(values["per_response"])
    thoughts = ThoughtCounts(transition, reflection)
    thoughts.update(s.texts)
    metrics.update({f"{name}_thoughts": float(v) for name, v in thoughts.compute().items()})
    details = []
    for i in range(problems):
        winner = majority_winner(groups[i])
        answers = s.problem(i, s.answers)
        details.append(
            {
                "index": i,
                "ground_truth": s.gold[i],
                "correct": int(counts[i]),
                "rewards": s.problem(i, s.rewards),
                "answers": answers,
                "majority_answer": None if winner is None else answers[winner],
                "lengths": s.problem(i, s.lengths),
                "truncated": s.problem(i, s.truncated),
            }
        )
    return metrics, details


def add_thought_ratios(results: Sequence[dict]) -> Sequence[dict]:
    """The paper's "N x" behaviour statistic: each policy's mean transition and reflection thoughts per
    response divided by the first policy's on the same benchmark.

    Adds `transition_thoughts_ratio` and `reflection_thoughts_ratio` to every result's metrics (1.0
    for the first policy; None where the first policy's mean is 0). Results are the evaluator's
    dicts (policy, benchmark, metrics); the first policy is the policy of the first result.
    """
    base: dict[str, dict] = {}
    for r in results:
        if r["policy"] == results[0]["policy"]:
            base.setdefault(r["benchmark"], dict(r["metrics"]))
    for r in results:
        for kind in ("transition", "reflection"):
            reference = base[r["benchmark"]][f"{kind}_thoughts"]
            ratio = r["metrics"][f"{kind}_thoughts"] / reference if reference else None
            r["metrics"][f"{kind}_thoughts_ratio"] = ratio
    return results


def per_problem(result: dict, metric: str) -> list[float]:
    """(P,) the per-problem values whose mean is `metric` ("avg@k" or "pass@j") in an evaluator result."""
    k, name, j = result["samples"], *metric.partition("@")[::2]
    correct = [p["correct"] for p in result["problems_detail"]]
    return [c / k for c in correct] if name == "avg" else [pass_at_k(k, c, int(j)) for c in correct]


def add_paired_differences(results: Sequence[dict]) -> Sequence[dict]:
    """Each policy minus the first on the same benchmark's problems: avg@k and pass@k (largest k) with a
    paired bootstrap interval (`intervals.paired_difference`), as `delta_<metric>` and its `_ci_low/high`.
    The first policy's own results get none."""
    first = results[0]["policy"]
    base = {r["benchmark"]: r for r in results if r["policy"] == first}
    for r in results:
        if r["policy"] == first:
            continue
        k = r["samples"]
        for metric in (f"avg@{k}", f"pass@{k}"):
            diff = intervals.paired_difference(per_problem(base[r["benchmark"]], metric), per_problem(r, metric))
            r["metrics"][f"delta_{metric}"] = diff.estimate
            r["metrics"] |= diff.as_dict(f"delta_{metric}")
    return results


def _with_interval(m: dict, key: str) -> str:
    if f"{key}_ci_low" not in m:
        return f"{m[key]:+.3f}" if key.startswith("delta_") else f"{m[key]:.3f}"
    sign = "+" if key.startswith("delta_") else ""
    return f"{m[key]:{sign}.3f} [{m[f'{key}_ci_low']:{sign}.3f}, {m[f'{key}_ci_high']:{sign}.3f}]"


# -- outputs ------------------------------------------------------------------------------------
def _row(result: dict) -> dict:
    head = {key: result[key] for key in ("policy", "benchmark", "problems", "samples")}
    return {**head, **result["metrics"], "seconds": round(result.get("seconds", 0.0), 2)}


def write_csv(results: Sequence[dict], path: Path) -> Path:
    """One row per (policy, benchmark): policy, benchmark, problems, samples, every metric, seconds."""
    rows = [_row(r) for r in results]
    columns = list(dict.fromkeys(key for row in rows for key in row))
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return path


def _dumps(value, indent: int = 0) -> str:
    """JSON with nested objects indented and lists of scalars on one line (per-sample lists stay short)."""
    pad = " " * (indent + 1)
    if isinstance(value, dict) and value:
        items = [f"{pad}{json.dumps(str(k))}: {_dumps(v, indent + 1)}" for k, v in value.items()]
        return "{\n" + ",\n".join(items) + "\n" + " " * indent + "}"
    if isinstance(value, list | tuple) and any(isinstance(v, dict | list | tuple) for v in value):
        return "[\n" + ",\n".join(pad + _dumps(v, indent + 1) for v in value) + "\n" + " " * indent + "]"
    return json.dumps(value)


def write_json(report: dict, path: Path) -> Path:
    return atomic.write_text(path, _dumps(report) + "\n")


def format_table(results: Sequence[dict]) -> str:
    """The results as an aligned Markdown table: one row per (policy, benchmark).

    avg@k with its 95 % bootstrap interval over problems; with `add_paired_differences`, each policy's
    avg@k minus the first policy's on the same problems, with its paired interval.

    `transition/resp` / `reflection/resp`: mean thoughts of that kind per response; with `add_thought_ratios`,
    `transition x` / `reflection x`: those means relative to the first policy's (`-`: its mean is 0).
    """
    several = len({r["policy"] for r in results}) > 1 or len({r["benchmark"] for r in results}) < len(results)
    ratios = all("transition_thoughts_ratio" in r["metrics"] for r in results)
    k = results[0]["samples"]
    ks = pass_ks(k)
    deltas = any(f"delta_avg@{k}" in r["metrics"] for r in results)
    header = (["policy"] if several else []) + ["benchmark", "problems", f"avg@{k} [95% CI]"]
    header += [f"avg@{k} - first [95% CI]"] if deltas else []
    header += [f"pass@{j}" for j in ks] + [f"maj@{k}", "length", "truncated", "format", "unparsable"]
    header += ["transition/resp", "reflection/resp"] + (["transition x", "reflection x"] if ratios else [])
    rows = []
    for r in results:
        m = r["metrics"]
        cells = ([r["policy"]] if several else []) + [r["benchmark"], str(r["problems"]), _with_interval(m, f"avg@{k}")]
        cells += [_with_interval(m, f"delta_avg@{k}") if f"delta_avg@{k}" in m else "-"] if deltas else []
        cells += [f"{m[f'pass@{j}']:.3f}" for j in ks] + [f"{m[f'maj@{k}']:.3f}", f"{m['response_length']:.1f}"]
        cells += [f"{m['truncated']:.3f}", f"{m['format_valid']:.3f}", str(m["unparsable_ground_truths"])]
        cells += [f"{m['transition_thoughts']:.3f}", f"{m['reflection_thoughts']:.3f}"]
        if ratios:
            cells += [
                "-" if m[f"{kind}_thoughts_ratio"] is None else f"{m[f'{kind}_thoughts_ratio']:.2f}x"
                for kind in ("transition", "reflection")
            ]
        rows.append(cells)
    widths = [max(len(row[c]) for row in [header, *rows]) for c in range(len(header))]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(cell.ljust(w) for cell, w in zip(cells, widths, strict=True)) + " |"

    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(header), rule, *(line(row) for row in rows)])


def plot_pass_at_k(results: Sequence[dict], path: Path, title: str = "") -> Path:
    """pass@k (solid) and maj@k (dashed) over k, log2 axis: one panel per benchmark, one colour per policy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    benchmarks = list(dict.fromkeys(r["benchmark"] for r in results))
    policies = list(dict.fromkeys(r["policy"] for r in results))
    cols = min(3, len(benchmarks))
    rows = math.ceil(len(benchmarks) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False, constrained_layout=True)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, bench in zip(axes.flat, benchmarks, strict=False):
        mine = [r for r in results if r["benchmark"] == bench]
        for r in mine:
            ks = pass_ks(r["samples"])
            colour = colours[policies.index(r["policy"]) % len(colours)]
            label = r["policy"] if len(policies) > 1 else "pass@k"
            ax.plot(ks, [r["metrics"][f"pass@{j}"] for j in ks], marker="o", color=colour, label=label)
            maj_label = f"maj@k {r['policy']}" if len(policies) > 1 else "maj@k"
            ax.plot(ks, [r["metrics"][f"maj@{j}"] for j in ks], ls="--", marker=".", color=colour, label=maj_label)
        ax.set_xscale("log", base=2)
        ax.set_xticks(ks, [str(j) for j in ks])
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(f"{bench} ({mine[0]['problems']} problems)")
        ax.set_xlabel("k")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(benchmarks) :]:
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
