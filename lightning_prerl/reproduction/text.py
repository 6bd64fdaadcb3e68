"""The reproduction report's text (`reproduction.py` gathers the numbers): the paper's findings next to the
measured ones, and the markdown of `reproduction.md`."""

from __future__ import annotations

import math

from lightning_prerl.reproduction.repairs import FIELDS as SLIP_FIELDS

ACCURACY = "val/accuracy"
THOUGHTS = ["val/transition_thoughts", "val/reflection_thoughts"]
FINALS = [ACCURACY, "val/format_valid", "val/response_length", *THOUGHTS, "val/transition_rate", "val/reflection_rate"]
PAPER = {  # arXiv 2604.14142 on Qwen3-4B (PAPER-NOTES.md)
    "alignment": "0 % negative inner products, mean cosine 0.44",
    "thoughts": "NSR-PreRL: transition thoughts 14.89x, reflection thoughts 6.54x the base policy",
    "dsrl": "DSRL above GRPO; 2.5x fewer steps to 45 %",
    "psr": "PSR-PreRL collapses after a while",
}


def _fmt(mean: float | None, std: float | None, digits: int = 3) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "–"
    return f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if std is not None else "")


def findings(data: dict) -> list[dict[str, str]]:
    """The paper's four findings next to what the runs measured, and whether the direction agrees."""
    obj, base, out = data["objective"], data["base"], []
    a, real = base["alignment"], data["real_model"]["alignment"]
    measured = f"toy base policy: {_pct(a['negative_share'])} negative, mean cosine {_num(a['cosine_mean'])}"
    measured += f" ({a['samples']} rollouts)"
    if real["samples"]:
        measured += f"; real model: {_pct(real['negative_share'])} negative"
        measured += f", cosine {_num(real['cosine_mean'])} ({real['samples']})"
    aligned = f"toy: {_aligned(a)}" + (f"; real model: {_aligned(real)}" if real["samples"] else "")
    out.append(_finding("(a) gradients align", PAPER["alignment"], measured, aligned))
    if nsr := obj.get("nsr_prerl"):
        t, r = (nsr["thought_ratio"][m][0] for m in THOUGHTS)
        measured = f"transition {_num(t, 2)}x, reflection {_num(r, 2)}x the base policy"
        measured += " (final vs step 0, mean over seeds)"
        more = t is not None and r is not None and t > 1 and r > 1
        if nsr["slips"] and base["slips"]:
            b_share, n_share = base["slips"]["repair_share"], nsr["slips"]["repair_share"][0]
            measured += f"; slips repaired: base {_pct(b_share)}, NSR-PreRL {_pct(n_share)}"
            measured += f" (slips per answer {_num(base['slips']['slips_per_answer'], 2)}"
            measured += f" → {_num(nsr['slips']['slips_per_answer'][0], 2)})"
        out.append(_finding("(b) NSR-PreRL raises transition / reflection thoughts", PAPER["thoughts"], measured, more))
    dsrl, grpo = obj.get("dsrl"), obj.get("grpo")
    if dsrl and grpo:
        d, g = dsrl["finals"][ACCURACY], grpo["finals"][ACCURACY]
        measured = f"final accuracy DSRL {_fmt(*d)} vs GRPO {_fmt(*g)}; mean steps to"
        for t, sd, sg in zip(data["thresholds"], dsrl["steps_to_threshold"], grpo["steps_to_threshold"], strict=True):
            measured += f" {_num(t)}: DSRL {_num(sd['mean'], 1)} ({sd['reached']}/{dsrl['seeds']} seeds),"
            measured += f" GRPO {_num(sg['mean'], 1)} ({sg['reached']}/{grpo['seeds']});"
        measured = measured.rstrip(";")
        ahead = d[0] is not None and g[0] is not None and d[0] > g[0]
        out.append(_finding("(c) DSRL beats GRPO", PAPER["dsrl"], measured, ahead))
    if psr := obj.get("psr_prerl"):
        f, peak, b0 = psr["finals"][ACCURACY][0], psr["peak_accuracy"][0], base["finals"][ACCURACY][0]
        measured = f"PSR-PreRL final {_num(f)}, its peak {_num(peak)}, base {_num(b0)}"
        out.append(
            _finding("(d) PSR-PreRL collapses", PAPER["psr"], measured, f is not None and b0 is not None and f < b0)
        )
    return out


def _aligned(stats: dict) -> str:
    """yes: positive inner product on every rollout (the paper's finding); partly: positive on average."""
    if stats["negative_share"] is None:
        return "no"
    if stats["negative_share"] == 0 and stats["cosine_mean"] > 0:
        return "yes"
    return "partly" if stats["negative_share"] < 0.5 and stats["cosine_mean"] > 0 else "no"


def _finding(name: str, paper: str, measured: str, agrees: bool | str) -> dict[str, str]:
    agrees = agrees if isinstance(agrees, str) else "yes" if agrees else "no"
    return {"finding": name, "paper": paper, "measured": measured, "same direction": agrees}


def _num(value: float | None, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.0f} %"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def markdown(data: dict, command: str) -> str:
    """The report's markdown: findings, final numbers, steps to threshold, pass@k, thoughts, alignment."""
    obj, base, ks = data["objective"], data["base"], data["ks"]
    names = ["base policy (step 0)", *data["objectives"]]
    lines = [
        '# Reproduction on the toy "thoughts" world',
        "",
        f"Command: `{command}`  ",
        f"Sweep: `{data['sweep_dir']}`; {data['jobs_count']} runs; numbers are mean ± std over seeds (n - 1), read"
        " from each run's `logs/metrics.csv` and `logs/alignment.csv`; the base policy's, once per seed.",
        "",
        "## The paper's findings",
        "",
        *_table(
            ["finding", "paper (Qwen3-4B)", "measured here", "same direction"],
            [list(f.values()) for f in findings(data)],
        ),
        "",
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
    rows = [[n, s, *(_fmt(*f[m]) for m in FINALS)] for n, s, f in zip(names, seeds, finals, strict=True)]
    lines += _table(["", "seeds", *(short[m] for m in FINALS)], rows)
    lines += ["", f"## pass@k ({', '.join(map(str, ks))})", ""]
    passk = [base["pass_at_k"]] + [obj[o]["pass_at_k"] for o in data["objectives"]]
    lines += _table(
        ["", *(f"pass@{k}" for k in ks)], [[n, *(_fmt(*p[k]) for k in ks)] for n, p in zip(names, passk, strict=True)]
    )
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
    rows = [[o, *(_fmt(*obj[o]["thought_ratio"][m], 2) for m in THOUGHTS)] for o in data["objectives"]]
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
            _pct(a["negative_share"]),
            _num(a["cosine_mean"]),
            _num(a["inner_mean"], 1),
            _num(a["logp_gap_mean"]),
        ]
        for n, a in cols
    ]
    lines += _table(
        [
            "policy",
            "rollouts",
            "negative inner products",
            "mean cosine",
            "mean inner product",
            "log-prob gap (nats/token)",
        ],
        rows,
    )
    lines += ["", "![alignment](repro_alignment.png)", ""]
    return "\n".join(lines)


def _slip_section(data: dict) -> list[str]:
    """What the policies do after a slip (`repairs.py`), base vs each objective's exported policies."""
    base, obj = data["base"]["slips"], data["objective"]
    head = ["policy", "slips per answer", "slips repaired", "by reflection", "by transition", "correct steps checked"]
    rows = [["base policy", *(_num(base[f]) for f in SLIP_FIELDS)]]
    rows += [[o, *(_fmt(*obj[o]["slips"][f]) for f in SLIP_FIELDS)] for o in data["objectives"] if obj[o]["slips"]]
    intro = (
        f"{base['answers']} answers per policy ({data['slip_problems']} held-out problems x {data['slip_samples']}"
        " samples, T = 1, the same seeds for every policy), sampled from each run's exported `policy/` when the"
        " report is written. A slip is a computation thought with a wrong result; it is repaired when the next"
        " thought is a reflection (`Wait, ...`) or a transition (`Alternatively, ...`)."
    )
    return ["## After a slip (the toy world's view of finding (b))", "", intro, "", *_table(head, rows), ""]
