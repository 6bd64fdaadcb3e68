"""The reproduction report's text (`reproduction.py` gathers the numbers): the paper's findings next to the
measured ones, and the markdown of `reproduction.md`."""

from __future__ import annotations

import lightning_prerl.reproduction.stats as stats
from lightning_prerl.reproduction.operating_point import probe_lines
from lightning_prerl.reproduction.repairs import FIELDS as SLIP_FIELDS
from lightning_prerl.reproduction.stats import ci_text as _ci

ACCURACY = "val/accuracy"
THOUGHTS = ["val/transition_thoughts", "val/reflection_thoughts"]
FINALS = [ACCURACY, "val/format_valid", "val/response_length", *THOUGHTS, "val/transition_rate", "val/reflection_rate"]
PAPER = {  # arXiv 2604.14142 on Qwen3-4B (PAPER-NOTES.md)
    "alignment": "0 % negative inner products, mean cosine 0.44",
    "thoughts": "NSR-PreRL: transition thoughts 14.89x, reflection thoughts 6.54x the base policy",
    "dsrl": "DSRL above GRPO: avg@32 57.54 vs 55.79 (+1.75 points)",
    "speed": "DSRL reaches 45 % in 2.5x fewer steps than GRPO (58 %: 1.6x)",
    "psr": "PSR-PreRL collapses after a while",
}


VERDICT_RULE = (
    "Verdicts are judged from 95 % intervals, never from point estimates: **yes** when the interval of the"
    " effect excludes no effect (0 for a difference, 1 for a ratio) in the paper's direction, **no** when it"
    " excludes it in the other direction, **inconclusive** when it contains it. An inconclusive verdict is a"
    " null only where the minimum detectable effect (the power table) is below the effect that matters."
)


def comparison(data: dict, name: str) -> dict | None:
    """The first paired difference called `name` (its first metric: pass@1, else val/accuracy)."""
    return next((c for c in data["comparisons"] if c["comparison"] == name), None)


def _paired_text(c: dict) -> str:
    design = f"{c['seeds']} seeds" + (f" x {c['problems']} problems" if c["problems"] else "")
    return f"{c['metric']} {_ci(c, sign='+')} ({design}; detectable at 80 % power: {_num(c['mde'])})"


def findings(data: dict) -> list[dict[str, str]]:
    """The paper's four findings next to what the runs measured, with a verdict judged from the intervals."""
    obj, base, out = data["objective"], data["base"], []
    a, real = base["alignment"], data["real_model"]["alignment"]
    world = data.get("world", "toy")
    measured = f"{world} base policy: {_alignment_text(a)}"
    verdict = f"{world}: {stats.verdict(a['ci']['cosine_mean'], +1)}"
    if real["samples"]:
        measured += f"; real model: {_alignment_text(real)}"
        verdict += f"; real model: {stats.verdict(real['ci']['cosine_mean'], +1)}"
    out.append(_finding("(a) gradients align (mean cosine > 0)", PAPER["alignment"], measured, verdict))
    if nsr := obj.get("nsr_prerl"):
        t, r = (nsr["thought_ratio"][m] for m in THOUGHTS)
        measured = f"final / base thoughts per response: transition {_ci(t, 2)}, reflection {_ci(r, 2)}"
        verdict = f"transition: {stats.verdict(t, +1, 1.0)}; reflection: {stats.verdict(r, +1, 1.0)}"
        if nsr["slips"] and base["slips"]:
            b, n = base["slips"], nsr["slips"]
            measured += f"; share of slips followed by a repair attempt: base {_ci(b['ci']['repair_share'], 2)},"
            measured += f" NSR-PreRL {_ci(n['repair_share'], 2)}; repaired successfully: base"
            measured += f" {_ci(b['ci']['fixed_share'], 2)}, NSR-PreRL {_ci(n['fixed_share'], 2)}; successful repairs"
            measured += f" per step: base {_ci(b['ci']['fixed_per_step'])}, NSR-PreRL {_ci(n['fixed_per_step'])}"
        out.append(
            _finding("(b) NSR-PreRL raises transition / reflection thoughts", PAPER["thoughts"], measured, verdict)
        )
    if c := comparison(data, "dsrl - grpo"):
        measured = f"DSRL - GRPO {_paired_text(c)}"
        out.append(_finding("(c) DSRL ends above GRPO", PAPER["dsrl"], measured, stats.verdict(c, +1)))
    if c := next((c for c in data.get("speed", []) if c["comparison"] == "dsrl - grpo"), None):
        dsrl, grpo = obj["dsrl"], obj["grpo"]
        measured = f"DSRL - GRPO, {c['metric']} {_ci(c, sign='+')} ({c['seeds']} seeds; MDE {_num(c['mde'])});"
        measured += " mean steps to"
        for t, sd, sg in zip(data["thresholds"], dsrl["steps_to_threshold"], grpo["steps_to_threshold"], strict=True):
            measured += f" {_num(t)}: DSRL {_num(sd['mean'], 1)} ({sd['reached']}/{dsrl['seeds']} seeds),"
            measured += f" GRPO {_num(sg['mean'], 1)} ({sg['reached']}/{grpo['seeds']});"
        verdict = stats.verdict(c, +1)
        out.append(_finding("(c') DSRL learns faster (held-out curve)", PAPER["speed"], measured.rstrip(";"), verdict))
    if c := comparison(data, "psr_prerl - base"):
        measured = f"PSR-PreRL - base {_paired_text(c)}; its peak held-out accuracy"
        measured += f" {_ci(obj['psr_prerl']['peak_accuracy'])}"
        out.append(_finding("(d) PSR-PreRL collapses (ends below base)", PAPER["psr"], measured, stats.verdict(c, -1)))
    return out


def _alignment_text(a: dict) -> str:
    ci = a["ci"]
    return f"{_ci(ci['negative_share'], 2)} negative, mean cosine {_ci(ci['cosine_mean'])} ({a['samples']} rollouts)"


def _finding(name: str, paper: str, measured: str, verdict: str) -> dict[str, str]:
    return {"finding": name, "paper": paper, "measured": measured, "verdict": verdict}


def _num(value: float | None, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def markdown(data: dict, command: str) -> str:
    """The report's markdown: findings, final numbers, steps to threshold, pass@k, thoughts, alignment."""
    obj, base, ks = data["objective"], data["base"], data["ks"]
    names = ["base policy (step 0)", *data["objectives"]]
    lines = [
        f'# Reproduction on the toy "{data.get("world", "thoughts")}" world',
        "",
        f"Command: `{command}`  ",
        f"Sweep: `{data['sweep_dir']}`; {data['jobs_count']} runs, read from each run's `logs/metrics.csv`,"
        " `logs/passk_problems.csv` and `logs/alignment.csv`; the base policy's numbers once per seed. Every number"
        " is `estimate [95 % interval]`: per-problem results (pass@k, thoughts, paired differences) by the"
        " two-level bootstrap over seeds and problems, per-seed means (`val/*`, slips, steps) by Student's t over"
        " seeds, alignment by the bootstrap over rollouts.",
        "",
        "## The paper's findings",
        "",
        VERDICT_RULE,
        "",
        *_table(
            ["finding", "paper (Qwen3-4B)", "measured here", "verdict"],
            [list(f.values()) for f in findings(data)],
        ),
        "",
        *_control_section(data),
        *_paper_scale_section(data),
        *_power_section(data),
        *_switch_section(data),
        "## Final held-out numbers",
        "",
    ]
    short = {
        "val/accuracy": "accuracy",
        "val/format_valid": "format",
        "val/response_length": "length",
        "val/transition_thoughts": "transition thoughts",
        "val/reflection_thoughts": "reflection thoughts",
        "val/transition_rate": "transition rate",
        "val/reflection_rate": "reflection rate",
    }
    finals = [base["finals"]] + [obj[o]["finals"] for o in data["objectives"]]
    seeds = [str(base["seeds"])] + [str(obj[o]["seeds"]) for o in data["objectives"]]
    rows = [[n, s, *(_ci(f[m]) for m in FINALS)] for n, s, f in zip(names, seeds, finals, strict=True)]
    lines += _table(["", "seeds", *(short[m] for m in FINALS)], rows)
    lines += ["", f"## pass@k ({', '.join(map(str, ks))})", ""]
    heldout = [base["heldout"]] + [obj[o]["heldout"] for o in data["objectives"]]
    passk = [base["pass_at_k"]] + [obj[o]["pass_at_k"] for o in data["objectives"]]
    rows = [
        [n, *(_ci(h[f"pass@{k}"]) if h else _ci(p[k]) for k in ks)]
        for n, h, p in zip(names, heldout, passk, strict=True)
    ]
    lines += [
        "Over seeds x problems from the per-problem records (pass@1 is the accuracy per sample, avg@k); runs"
        " without them: t over the seeds' logged pass@k.",
        "",
        *_table(["", *(f"pass@{k}" for k in ks)], rows),
    ]
    lines += [
        "",
        "![pass@k](repro_pass_at_k.png)",
        "",
        "## Steps to a held-out accuracy (base + gain; first evaluation at or above it)",
        "",
    ]
    rows = []
    for o in data["objectives"]:
        for t, g, st in zip(data["thresholds"], data["threshold_gains"], obj[o]["steps_to_threshold"], strict=True):
            per_seed = ", ".join("never" if s is None else f"{s:.0f}" for s in st["per_seed"])
            rows.append([o, f"{_num(t)} (+{g})", per_seed, f"{st['reached']}/{obj[o]['seeds']}", _num(st["mean"], 1)])
    lines += _table(["objective", "threshold", "per seed", "reached", "mean over seeds that reached it"], rows)
    lines += [
        "",
        "![held-out accuracy](repro_accuracy.png)",
        "",
        "## Transition and reflection thoughts (SEAL counting)",
        "",
    ]
    rows = [[o, *(_ci(obj[o]["thought_ratio"][m], 2) for m in THOUGHTS)] for o in data["objectives"]]
    lines += _table(["objective", "transition thoughts: final / base", "reflection thoughts: final / base"], rows)
    lines += ["", "![thoughts](repro_thoughts.png)", ""]
    if base["slips"]:
        lines += _slip_section(data)
    lines += ["## Gradient alignment of log P(y) and log P(y|x)", ""]
    cols = [("toy base (step 0)", base["alignment"])] + [
        (f"{o} (after)", obj[o]["alignment_after"]) for o in data["objectives"]
    ]
    if data["real_model"]["alignment"]["samples"]:
        cols.append(("real model", data["real_model"]["alignment"]))
    rows = [
        [
            n,
            str(a["samples"]),
            _ci(a["ci"]["negative_share"], 2),
            _ci(a["ci"]["cosine_mean"]),
            _num(a["inner_mean"], 1),
            _num(a["logp_gap_mean"]),
        ]
        for n, a in cols
    ]
    lines += _table(
        [
            "policy",
            "rollouts",
            "share of negative inner products",
            "mean cosine",
            "mean inner product",
            "log-prob gap (nats/token)",
        ],
        rows,
    )
    lines += ["", "![alignment](repro_alignment.png)", ""]
    return "\n".join(lines + probe_lines(data.get("probe")))


def _slip_section(data: dict) -> list[str]:
    """What the policies do after a slip (`repairs.py`), base vs each objective's exported policies."""
    base, obj = data["base"]["slips"], data["objective"]
    head = [
        "policy",
        "slips per answer",
        "slips with a repair attempt",
        "slips repaired successfully",
        "attempts that succeed",
        "attempts by reflection",
        "attempts by transition",
        "correct steps checked",
        "thoughts per step",
        "successful repairs per step",
    ]
    rows = [["base policy", *(_ci(base["ci"][f]) for f in SLIP_FIELDS)]]
    rows += [[o, *(_ci(obj[o]["slips"][f]) for f in SLIP_FIELDS)] for o in data["objectives"] if obj[o]["slips"]]
    intro = (
        f"{base['answers']} answers per policy ({data['slip_problems']} held-out problems x {data['slip_samples']}"
        " samples, T = 1, the same seeds for every policy), sampled from each run's exported `policy/` when the"
        " report is written; each share is a ratio of sums over answers, its interval a bootstrap over seeds"
        " and answers. A slip is a computation thought with a wrong result; a"
        " repair attempt is a reflection (`Wait, ...`) or transition (`Alternatively, ...`) thought right after it;"
        " the repair succeeds when that thought states the step's right value and the answer goes on from it (the"
        " next computation starts from it, or the boxed answer is it)."
    )
    return ["## After a slip (the toy world's view of finding (b))", "", intro, "", *_table(head, rows), ""]


SIDE = {"yes": "above 0", "no": "below 0", "inconclusive": "contains 0"}
DIFFERENCE_HEAD = ["b - a", "metric", "seeds", "problems", "difference [95 %]", "interval", "MDE (80 % power)"]


def _power_section(data: dict) -> list[str]:
    """Every paired difference with its interval and the minimum detectable effect of its design."""
    rows = _difference_rows(data["comparisons"] + data.get("speed", []))
    intro = (
        "Paired differences (b - a on the same seeds and problems) and the power of each design: the minimum"
        " detectable effect (MDE) is the smallest true difference a two-sided test at alpha = 0.05 detects with"
        " 80 % power, (z_0.975 + z_0.8) x SE = 2.80 x SE, SE^2 = var(per-seed mean differences) / seeds +"
        " var(per-problem mean differences) / problems, from the observed differences (per-seed means only"
        " without per-problem records, with t quantiles). Curve means (the speed finding) are per-seed: the mean"
        " of held-out accuracy over the evaluations after step 0, or of training-rollout accuracy over every"
        " step. An interval that contains 0 with an MDE above the effect that matters is an underpowered"
        " comparison, not a null."
    )
    return ["## Paired differences and power", "", intro, "", *_table(DIFFERENCE_HEAD, rows), ""]


def _difference_rows(comparisons: list[dict]) -> list[list[str]]:
    return [
        [
            c["comparison"],
            c["metric"],
            str(c["seeds"]),
            str(c["problems"] or "–"),
            _ci(c, sign="+"),
            SIDE[stats.verdict(c, +1)],
            _num(c["mde"]),
        ]
        for c in comparisons
    ]


def _control_section(data: dict) -> list[str]:
    """Each other world's findings and paired differences (the negative control)."""
    out = []
    for world, control in data.get("controls", {}).items():
        intro = (
            f'The "{world}" world, same seeds, steps and evaluations: its prompt-free space was never trained'
            " (pretraining saw only prompt + answer), so PreRL has no surrogate gradient to follow there."
        )
        findings_rows = [list(f.values()) for f in control["findings"]]
        out += [f'## Negative control: the "{world}" world', "", intro, ""]
        out += _table(["finding", "paper (Qwen3-4B)", "measured here", "verdict"], findings_rows) + [""]
        out += _table(DIFFERENCE_HEAD, _difference_rows(control["comparisons"] + control["speed"])) + [""]
        out += [f"![{world} accuracy](repro_{world}_accuracy.png)", ""]
    return out


def _paper_scale_section(data: dict) -> list[str]:
    """The paper's effect sizes in this world's units and whether this design could detect them."""
    if not data.get("paper_scale"):
        return []
    intro = (
        "The paper's effects (Qwen3-4B, PAPER-NOTES.md) carried into this world's units, next to the minimum"
        " detectable effect this design reached (80 % power, measured seed and problem variance). **powered**: the"
        " MDE is at most the paper-sized effect, so an interval containing 0 is a null at that size."
    )
    rows = [
        [r["measure"], r["paper"], r["here"], _num(r["effect"]), _ci(r["difference"], sign="+"), _num(r["mde"]),
         "yes" if r["powered"] else "no"]
        for r in data["paper_scale"]
    ]  # fmt: skip
    head = ["measure", "paper", "paper-sized effect here", "effect", "measured difference", "MDE", "powered"]
    return ["## Power against the paper's effect sizes", "", intro, "", *_table(head, rows), ""]


def _switch_section(data: dict) -> list[str]:
    """DSRL's switch-step sweep: where each arm switched, its final pass@1 and its differences from GRPO."""
    if len(data.get("switch_sweep", [])) < 2:
        return []
    rows = [
        [r["arm"], _num(r["switch_step"], 0), "–" if r["share"] is None else f"{r['share']:.0%}", _ci(r["pass@1"]),
         _ci(r["minus_grpo"], sign="+"), _ci(r["curve_minus_grpo"], sign="+")]
        for r in data["switch_sweep"]
    ]  # fmt: skip
    head = ["arm", "switch step", "share of the run", "final pass@1", "pass@1 - GRPO", "held-out curve mean - GRPO"]
    intro = "DSRL's warm-up length (the paper: 19 of 348 steps, 5.5 %; recommended 10-25 steps, 3-7 %)."
    return ["## Switch-step sweep", "", intro, "", *_table(head, rows), ""]
