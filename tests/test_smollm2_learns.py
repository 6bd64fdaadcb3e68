"""`experiment=smollm2_learns`, the README's real-model example: the table tool on a hand-built sweep, and the
preset's settings (the ones measured to learn, docs/results/smollm2.md), kept apart from the probe's."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from lightning_prerl.evaluation.passk import PROBLEM_FIELDS, PROBLEMS_FILE
from tests.test_config import ROOT, compose_cfg


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "experiments" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _job(root: Path, n: int, objective: str, seed: int, base: list[int], final: list[int]) -> None:
    """A job dir as the sweep writes it: config.yaml, training reward per step, and correct-of-4 per held-out
    problem at steps 0 and 30."""
    d = root / str(n)
    (d / "logs").mkdir(parents=True)
    (d / "config.yaml").write_text(f"seed: {seed}\nobjective:\n  name: {objective}\n")
    curve = [f"{step},{sum(final) / 16 * step / 29:.4f},0.1" for step in range(30)]
    (d / "logs" / "metrics.csv").write_text("\n".join(["step,rollout/reward_mean,rollout/truncated", *curve]) + "\n")
    rows = [[step, p, 4, c, 0, 0] for step, per in ((0, base), (30, final)) for p, c in enumerate(per)]
    lines = [",".join(PROBLEM_FIELDS)] + [",".join(map(str, r)) for r in rows]
    (d / "logs" / PROBLEMS_FILE).write_text("\n".join(lines) + "\n")


def test_table_pools_seeds_and_pairs_the_objectives_seed_by_seed(tmp_path):
    """4 problems x 4 samples. Base pass@1 0.25 on every seed; GRPO (seeds 0, 1) ends at 10/16 and 2/16 (mean
    0.375), DSRL at one more correct sample per problem on the same seed, and at 16/16 on a seed 2 GRPO did not
    run (mean 36/48 = 0.75). Paired on the common seeds 0 and 1, DSRL - GRPO is +0.25 on every (seed, problem):
    an interval of width 0. The job dirs are numbered against seed order, so pairing by directory or by
    position would mix the seeds and widen it."""
    _job(tmp_path, 0, "grpo", 1, [1, 1, 1, 1], [0, 1, 0, 1])
    _job(tmp_path, 1, "grpo", 0, [0, 1, 2, 1], [2, 2, 3, 3])
    _job(tmp_path, 2, "dsrl", 2, [1, 1, 1, 1], [4, 4, 4, 4])
    _job(tmp_path, 3, "dsrl", 0, [0, 1, 2, 1], [3, 3, 4, 4])
    _job(tmp_path, 5, "dsrl", 1, [1, 1, 1, 1], [1, 2, 1, 2])
    (tmp_path / "4" / "logs").mkdir(parents=True)  # an unfinished job: no config.yaml, not counted
    assert _tool("smollm2_learns").main([str(tmp_path)]) == 0
    result = json.loads((tmp_path / "smollm2_learns.json").read_text())
    assert result["grpo"]["base"]["estimate"] == 0.25 and result["grpo"]["final"]["estimate"] == 0.375
    assert result["dsrl"]["final"]["estimate"] == 0.75 and result["dsrl"]["seed_list"] == [0, 1, 2]
    assert result["grpo"]["change"]["estimate"] == 0.125 and result["dsrl"]["change"]["estimate"] == 0.5
    diff = result["dsrl_minus_grpo"]
    assert (diff["estimate"], diff["low"], diff["high"]) == (0.25, 0.25, 0.25)
    assert (diff["seeds"], diff["problems"], diff["seed_list"]) == (2, 4, [0, 1])
    md = (tmp_path / "smollm2_learns.md").read_text()
    assert "| DSRL − GRPO (trained) | | | +0.250 | 2 × 4 |" in md  # zero width: the estimate alone
    assert (tmp_path / "smollm2_learns.png").stat().st_size > 10_000  # the training curves


def test_preset_is_the_measured_setting_and_the_probe_keeps_its_own():
    """The preset's defaults are the setting measured to learn; experiments/probe_smollm2.py pins the setting
    its shipped figures were measured at (lr 5e-5, temperature 1.0), whatever the preset says."""
    cfg = compose_cfg("experiment=smollm2_learns", "objective=dsrl")
    assert cfg.module.lr == 1e-5 and cfg.data.sampling.temperature == 1.0 and cfg.trainer.max_steps == 30
    assert cfg.callbacks.pass_at_k.problems == cfg.data.eval_prompts.count == 128
    assert cfg.objective.nsr_weight == 1.0 and cfg.objective.switch_step == 2  # the paper's: 5.5 % of 30 steps
    probe = compose_cfg("experiment=smollm2_learns", "objective=grpo", *_tool("probe_smollm2").MEASURED_AT)
    assert probe.module.lr == 5e-5 and probe.data.sampling.temperature == 1.0
    assert probe.data.eval_prompts.count == 64
