"""`experiment=reproduce_recheck` (issue 24, part 3): its arms compose, and the report's additions (worlds,
shared base records, speed, switch sweep, power against the paper, the probe hook) on hand-made sweeps."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from lightning_prerl.evaluation.passk import PROBLEM_FIELDS, PROBLEMS_FILE
from lightning_prerl.reproduction.operating_point import PAPER_FINAL_SHARE, probe_lines, sped_up_gain
from lightning_prerl.reproduction.repairs import slip_stats
from lightning_prerl.reproduction.report import write_reproduction_report
from tests.test_config import CONF, ROOT, compose_cfg

ARMS = sorted(p.stem for p in (CONF / "arm").glob("*.yaml"))


def test_every_arm_composes_with_the_experiment_at_the_papers_operating_point():
    with initialize_config_dir(str(CONF), version_base="1.3"):
        sweep = compose("config", ["experiment=reproduce_recheck"], return_hydra_config=True).hydra.sweeper.params
    assert sorted(sweep["+arm"].split(",")) == ARMS and len(sweep["seed"].split(",")) >= 2
    switch = {}
    for arm in ARMS:
        cfg = compose_cfg("experiment=reproduce_recheck", f"+arm={arm}")
        world, _, label = arm.partition("_")
        assert cfg.model.path == f"toy-{world}" and cfg.data.name == f"toy_{world}"
        assert cfg.objective.name == label.removesuffix("_10").removesuffix("_20")
        assert cfg.trainer.check_val_every_n_epoch <= 3
        passk = instantiate(cfg.callbacks.pass_at_k)
        assert passk.samples == 16 and len(passk.prompts) == passk.problems >= 200
        assert passk.at_start == (label == "grpo")  # one measurement of the base policy per world and seed
        num_ops = (3, 4) if world == "recheck" else (2, 3)
        assert tuple(cfg.callbacks.pass_at_k.prompts.num_ops) == num_ops
        if cfg.objective.name == "dsrl":
            assert cfg.objective.nsr_weight == 1.0  # the paper's equal step sizes
            switch[arm] = cfg.objective.switch_step
    # 60 steps: the paper's 5.5 % -> 3, the sweep's 10 % and 20 % -> 6 and 12
    assert switch == {"recheck_dsrl": 3, "recheck_dsrl_10": 6, "recheck_dsrl_20": 12, "thoughts_dsrl": 3}


def _arm_job(root: Path, n: int, arm: str, seed: int, curve: list[float], phase: list[int], problems: dict) -> None:
    """A job dir as an arm's run writes it: held-out accuracy at steps 0, 10, 20, the DSRL phase, and per-problem
    (correct of 4 samples, transition, reflection) at the steps in `problems` (only GRPO arms measure step 0)."""
    d = root / str(n)
    (d / ".hydra").mkdir(parents=True)
    (d / ".hydra" / "overrides.yaml").write_text(f"- +arm={arm}\n- seed={seed}\n- experiment=reproduce_recheck\n")
    (d / "logs").mkdir()
    with open(d / "logs" / "metrics.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["step", "val/accuracy", "objective/phase", "passk/pass@1"])
        for i, (acc, ph) in enumerate(zip(curve, phase, strict=True)):
            w.writerow([10 * i, acc, ph, 0.5 if 0 in problems and i == 0 else 0.7 if i == 2 else ""])
    rows = [[step, p, 4, c, 0, 0] for step, per in problems.items() for p, c in enumerate(per)]
    lines = [",".join(PROBLEM_FIELDS)] + [",".join(map(str, r)) for r in rows]
    (d / "logs" / PROBLEMS_FILE).write_text("\n".join(lines) + "\n")


def test_report_pairs_arms_with_their_seeds_base_and_judges_against_the_papers_effects(tmp_path):
    """20 problems, 4 repeated 5 times: base 1, 2, 3, 2 of 4 correct (pass@1 0.5), measured by the GRPO arms
    only; GRPO ends at 2, 3, 4, 3 (0.75), DSRL at 3, 3, 4, 4 (0.875) on both seeds, DSRL at 10 % as GRPO.
    Held-out curves at steps 0, 10, 20: GRPO 0.4, 0.5, 0.6; DSRL 0.4, 0.6, 0.6 on both seeds."""
    base, grpo, dsrl = [1, 2, 3, 2] * 5, [2, 3, 4, 3] * 5, [3, 3, 4, 4] * 5
    arms = {  # arm: (curve, phase, final)
        "recheck_grpo": ([0.4, 0.5, 0.6], [0, 0, 0], grpo),
        "recheck_dsrl": ([0.4, 0.6, 0.6], [0, 1, 1], dsrl),
        "recheck_dsrl_10": ([0.4, 0.5, 0.6], [0, 0, 1], grpo),
        "thoughts_grpo": ([0.4, 0.5, 0.6], [0, 0, 0], grpo),
        "thoughts_dsrl": ([0.4, 0.5, 0.6], [0, 1, 1], grpo),
    }
    n = 0
    for arm, (curve, phase, final) in arms.items():
        for seed in (0, 1):
            problems = {0: base, 20: final} if arm.endswith("grpo") else {20: final}
            _arm_job(tmp_path, n, arm, seed, curve, phase, problems)
            n += 1
    probe = tmp_path / "probe.json"
    probe.write_text(json.dumps({"title": "SmolLM2", "header": ["opening", "log P"], "rows": [["Wait", -3.2]]}))
    write_reproduction_report(tmp_path, probe=probe)
    data = json.loads((tmp_path / "reproduction.json").read_text())
    assert data["world"] == "recheck" and list(data["controls"]) == ["thoughts"]
    assert data["objectives"] == ["grpo", "dsrl", "dsrl_10"] and data["base"]["seeds"] == 2
    pick = {(c["comparison"], c["metric"]): c for c in data["comparisons"] + data["speed"]}
    # DSRL never measured its base: it pairs with its seed's GRPO measurement (0.875 - 0.5)
    assert pick[("dsrl - base", "pass@1")]["estimate"] == pytest.approx(0.375)
    c = pick[("dsrl - grpo", "pass@1")]  # per problem 0.25, 0, 0, 0.25 on both seeds
    assert (c["estimate"], c["seeds"], c["problems"]) == (pytest.approx(0.125), 2, 20)
    # MDE: seed means equal; problem means var 20 x 0.125^2 / 19 = 0.0164474: 2.801585 x sqrt(0.0164474 / 20)
    assert c["mde"] == pytest.approx(2.801585 * math.sqrt(0.0164474 / 20), abs=1e-5)
    speed = pick[("dsrl - grpo", "val/accuracy curve mean")]  # after step 0: 0.6 vs 0.55 on both seeds
    assert (speed["estimate"], speed["low"], speed["high"]) == pytest.approx((0.05, 0.05, 0.05))
    assert pick[("dsrl_10 - grpo", "val/accuracy curve mean")]["estimate"] == pytest.approx(0.0)
    final, fast = data["paper_scale"]
    assert PAPER_FINAL_SHARE == pytest.approx(0.12044, abs=1e-5)  # 1.75 / 14.53
    assert final["effect"] == pytest.approx(PAPER_FINAL_SHARE * 0.25)
    assert final["powered"] is False  # MDE 0.080 > 0.030: an inconclusive final difference would not be a null
    # GRPO's curve 2.5x faster: steps 10, 20 -> g(20), g(20) = 0.6, 0.6; minus 0.5, 0.6: +0.05; MDE 0: powered
    assert fast["effect"] == pytest.approx(0.05) and fast["powered"] is True
    assert [(r["arm"], r["switch_step"]) for r in data["switch_sweep"]] == [("dsrl", 10), ("dsrl_10", 20)]
    assert data["switch_sweep"][0]["share"] == pytest.approx(0.5)  # of the 20 steps run
    findings = {f["finding"]: f["verdict"] for f in data["findings"]}
    assert findings["(c) DSRL ends above GRPO"] == findings["(c') DSRL learns faster (held-out curve)"] == "yes"
    control = {f["finding"]: f["verdict"] for f in data["controls"]["thoughts"]["findings"]}
    assert control["(c) DSRL ends above GRPO"] == "inconclusive"  # equal on every problem: a zero-width 0
    md = (tmp_path / "reproduction.md").read_text()
    for section in ("## Negative control", "## Power against the paper's", "## Switch-step sweep", "## Real-model"):
        assert section in md
    assert "| Wait | -3.2 |" in md and "| final pass@1 (avg@16) |" in md
    assert (tmp_path / "repro_thoughts_accuracy.png").is_file() and (tmp_path / "repro_accuracy.png").is_file()


def test_sped_up_curve_and_probe_hook_by_hand(tmp_path):
    steps, curve = np.array([0.0, 10, 20, 30]), np.array([0.3, 0.4, 0.5, 0.6])
    # 2x faster: steps 10, 20, 30 read g(20), g(30), g(30) = 0.5, 0.6, 0.6 (mean 0.5667) vs 0.5
    assert sped_up_gain(steps, curve, factor=2.0) == pytest.approx(0.5667 - 0.5, abs=1e-4)
    assert sped_up_gain(steps, curve, factor=1.0) == 0.0
    # a late dip is pooled: 0.5, 0.4 -> 0.45, 0.45; 2x faster 0.45, 0.6, 0.6 (0.55) vs 0.45, 0.45, 0.6 (0.5)
    assert sped_up_gain(steps, np.array([0.3, 0.5, 0.4, 0.6]), factor=2.0) == pytest.approx(0.05)
    assert probe_lines(None) == []
    (tmp_path / "probe.md").write_text("| a | b |\n|---|---|\n| 1 | 2 |\n")
    assert "| 1 | 2 |" in "\n".join(probe_lines(tmp_path / "probe.md"))


def test_successful_repairs_per_step_count_only_repairs_that_carry_the_value():
    # 2 steps, the first slips (69) and a recheck repairs it (68, carried on): 1 repair in 2 steps;
    # then the same slip left standing: 0 of 2
    fixed = "23+45=69.\n\nWait, let me check: 23+45=68, not 69.\n\n68-17=51.\n\nThe answer is \\boxed{51}."
    unfixed = "23+45=69.\n\n69-17=52.\n\nThe answer is \\boxed{52}."
    s = slip_stats([fixed, unfixed])
    assert s["fixed_per_step"] == pytest.approx(1 / 4) and s["thoughts_per_step"] == pytest.approx(1 / 4)
    assert s["fixed_share"] == pytest.approx(1 / 2)


@pytest.mark.slow
def test_reproduce_recheck_command_with_reduced_settings(tmp_path):
    """`experiment=reproduce_recheck` end to end on 4 arms x 2 seeds x 3 steps with small evaluations: both worlds
    reported, the DSRL arms pair with their seed's GRPO base record, the probe's table printed."""
    sweep, probe = tmp_path / "sweep", tmp_path / "probe.md"
    probe.write_text("| opening | log P |\n|---|---|\n| Wait | -3.2 |\n")
    cmd = [
        sys.executable, "experiments/run.py", "experiment=reproduce_recheck", f"hydra.sweep.dir={sweep}",
        "+arm=recheck_grpo,recheck_dsrl,thoughts_grpo,thoughts_dsrl", "seed=0,1", "trainer.max_steps=3",
        "data.prompts_per_step=4", "data.samples_per_prompt=4", "data.eval_prompts.count=8",
        "data.sampling.max_new_tokens=96", "callbacks.pass_at_k.samples=4", "callbacks.pass_at_k.problems=10",
        "callbacks.alignment.max_samples=2", "hydra.callbacks.reproduction_report.slip_problems=2",
        "hydra.callbacks.reproduction_report.slip_samples=2", f"hydra.callbacks.reproduction_report.probe={probe}",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((sweep / "reproduction.json").read_text())
    assert data["world"] == "recheck" and list(data["controls"]) == ["thoughts"]
    assert data["objectives"] == ["grpo", "dsrl"] and len(data["jobs"]) == 4 and data["ks"] == [1, 2, 4]
    for world in (data, data["controls"]["thoughts"]):
        dsrl_base = [c for c in world["comparisons"] if c["comparison"] == "dsrl - base"]
        # the GRPO arms' base records, on 10 problems of pass_at_k's own set (the curve's has 8)
        assert [(c["seeds"], c["problems"]) for c in dsrl_base] == [(2, 10), (2, 10)]
        assert {c["comparison"] for c in world["speed"]} == {"dsrl - grpo"}
    for job in data["jobs"]:
        rows = (Path(job["dir"]) / "logs" / "passk_problems.csv").read_text().splitlines()[1:]
        assert {r.split(",")[0] for r in rows} == ({"0", "3"} if job["objective"] == "grpo" else {"3"})
        assert job["final_step"] == 3
    md = (sweep / "reproduction.md").read_text()
    assert '## Negative control: the "thoughts" world' in md and "| Wait | -3.2 |" in md
    assert (sweep / "repro_thoughts_accuracy.png").is_file()


def test_probe_hook_reads_the_probes_own_json(tmp_path):
    """The JSON experiments/probe_smollm2.py writes becomes a table: one row per objective or pair, each
    measure as estimate [low, high]; a measure a row lacks prints as a dash."""
    one = {"estimate": 0.001, "low": -0.002, "high": 0.004, "n": 39}
    diff = {"estimate": 0.245, "low": 0.147, "high": 0.345, "n": 39}
    path = tmp_path / "probe.json"
    path.write_text(json.dumps({
        "nsr_prerl": {"reflection": one, "control": one, "excess": one},
        "nsr_prerl-grpo": {"reflection": diff},
        "design": {"problems": 39, "boundaries": 95},
    }))  # fmt: skip
    text = "\n".join(probe_lines(path))
    assert "| nsr_prerl | +0.001 [-0.002, +0.004] | +0.001 [-0.002, +0.004] | +0.001 [-0.002, +0.004] |" in text
    assert "| nsr_prerl-grpo | +0.245 [+0.147, +0.345] | – | – |" in text
    assert "95 held-out thought boundaries (39 problems)" in text
    assert "| design |" not in text  # the design block is not a row
