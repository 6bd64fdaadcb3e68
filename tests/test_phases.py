"""Schedules of phases (`training/dsrl.py`'s `PhaseSchedule`): which phase at which step, by hand; the
three-phase YAML run with no code; bad schedules in one line; exact resume across both boundaries."""

from __future__ import annotations

import json
import logging
from types import SimpleNamespace

import pytest
import torch
from test_resume import kill_after_step, metrics, weights
from test_run import ROOT, read_rows, run_experiment

from lightning_prerl.objectives import PolicyGradientObjective as PG
from lightning_prerl.training.dsrl import Phase, PhaseSchedule


def drive(schedule: PhaseSchedule, values: list[float]) -> tuple[list[int], list]:
    """Step the schedule as Lightning does: batch start at global_step = step, the metric `m` observed at
    batch end, after the optimizer step (global_step = step + 1). Returns the active phase of each step
    and what the schedule asked of the module and the optimizer."""
    calls, phases = [], []
    module = SimpleNamespace(reference=None, phase=0)

    def set_objective(objective, phase):
        calls.append((objective.name, phase, objective.lr_scale, objective.coef))
        module.phase = phase

    module.set_objective, module.reset_reference = set_objective, lambda: calls.append("reset_reference")
    optimizer = SimpleNamespace(state={"moments": 1})
    trainer = SimpleNamespace(callback_metrics={}, global_step=0, optimizers=[optimizer], sanity_checking=False)
    for step, value in enumerate(values):
        trainer.global_step = step
        schedule.on_train_batch_start(trainer, module, None, 0)
        phases.append(module.phase)
        if not optimizer.state:
            calls.append(f"optimizer cleared at {step}")
            optimizer.state["moments"] = 1
        trainer.global_step, trainer.callback_metrics["m"] = step + 1, value
        schedule.on_train_batch_end(trainer, module, None, None, 0)
    return phases, calls


def four_phases(c_steps: int = 6) -> PhaseSchedule:
    plateau = {"monitor": "m", "patience": 1, "min_steps": 3}
    return PhaseSchedule(
        {
            "a": Phase(PG(name="a", space="marginal"), steps=2),
            "b": Phase(PG(name="b"), steps=0),  # 0 steps: skipped at the boundary it starts on
            "c": Phase(PG(name="c"), c_steps, **plateau, lr_scale=0.5, coef=0.2, reset_optimizer=True),
            "d": Phase(PG(name="d", kl_coef=0.1)),  # KL: the reference is reset to the policy at its start
        },
        name="abcd",
    )


def test_which_phase_at_which_step_by_hand(caplog):
    """a: steps 0-1 (steps=2). b has 0 steps: at step 2 the schedule passes b and starts c. c ends on a
    plateau of `m` (patience 1, at least 3 of its steps): m = 1.0 after step 2 is its best, 0.9 after
    step 3 is stale but c has run 2 steps only, 0.95 after step 4 is stale again with 3 steps run -> d
    trains from step 5, its reference reset first (KL on). c's lr_scale / coef replace its objective's
    own and its start clears the optimizer. With m rising (no plateau) c's `steps=3` ends it at step 5
    too; with `steps=4`, at step 6. Two monitored phases in a row: each starts with a fresh trigger
    (x plateaus after step 1; y starts at 2 with no best value yet, so it cannot end before step 4)."""
    rising = [float(i) for i in range(8)]
    with caplog.at_level(logging.INFO, logger="lightning_prerl.training.dsrl"):
        phases, calls = drive(four_phases(), [0.0, 0.0, 1.0, 0.9, 0.95, 2.0, 3.0])
    assert phases == [0, 0, 2, 2, 2, 3, 3]
    assert calls == [
        ("b", 1, 1.0, 1.0),
        ("c", 2, 0.5, 0.2),
        "optimizer cleared at 2",
        "reset_reference",  # before set_objective: it would otherwise load a base reference
        ("d", 3, 1.0, 1.0),
    ]
    assert caplog.messages == [
        "abcd: phase 1 (b): a -> b at step 2 (step)",
        "abcd: phase 2 (c): b -> c at step 2 (step)",
        "abcd: phase 3 (d): c -> d at step 5 (m plateau)",
    ]
    assert drive(four_phases(c_steps=3), rising)[0] == [0, 0, 2, 2, 2, 3, 3, 3]
    assert drive(four_phases(c_steps=4), rising)[0] == [0, 0, 2, 2, 2, 2, 3, 3]
    plateau = {"monitor": "m", "patience": 1, "min_steps": 1}
    twice = PhaseSchedule({"x": Phase(PG(), **plateau), "y": Phase(PG(), **plateau), "z": Phase(PG())})
    assert drive(twice, [1.0] * 6)[0] == [0, 0, 1, 1, 2, 2]

    schedule = four_phases()
    drive(schedule, [0.0, 0.0, 1.0, 0.9])  # stopped inside c, one stale value short of its plateau
    state = schedule.state_dict()
    assert state == {"phase": 2, "starts": [0, 2, 2], "best": 1.0, "stale": 1, "plateaued": False}
    resumed = four_phases()
    resumed.load_state_dict(state)
    assert (resumed.index, resumed.boundaries, resumed._best, resumed._stale) == (2, [2, 2], 1.0, 1)
    assert resumed.initial_objective.name == "a" and [p.objective.lr_scale for p in resumed.phases] == [0.1, 1, 0.5, 1]


@pytest.mark.parametrize(
    ("phases", "error"),
    [
        ({}, "objective.phases is empty: a schedule needs at least one phase"),
        ({"x": Phase(PG()), "y": Phase(PG())}, "objective.phases.x has steps=null and monitor=null: a phase before"),
        ({"x": Phase(PG(), steps=-1), "y": Phase(PG())}, "objective.phases.x.steps=-1: must be >= 0"),
        ({"x": Phase(PG(), steps=1, lr_scale=0.0), "y": Phase(PG())}, "objective.phases.x.lr_scale=0.0: must be > 0"),
        ({"x": Phase(PG(), steps=1), "y": Phase(PG(), monitor="m")}, "objective.phases.y.monitor=m: the last phase"),
    ],
)
def test_the_python_schedule_refuses_what_cannot_run(phases, error):
    with pytest.raises(ValueError) as err:
        PhaseSchedule(phases)
    assert str(err.value).startswith(error)


@pytest.mark.parametrize(
    ("overrides", "line"),
    [
        (
            ["~objective.phases.nsr", "~objective.phases.psr", "~objective.phases.grpo"],
            "objective.phases={}: must not be",
        ),
        (
            ["objective.phases.psr.steps=null"],
            "objective.phases.psr has steps=null and monitor=null: a phase before the",
        ),
        (
            ["objective.phases.grpo.steps=10"],
            "objective.phases.grpo.steps=10 ends at step 25 < trainer.max_steps=60: the",
        ),
        (["objective.phases.psr.steps=-1"], "objective.phases.psr.steps=-1: must be >= 0"),
        (["objective.phases.nsr.lr_scale=0"], "objective.phases.nsr.lr_scale=0: must be > 0"),
        (["objective.phases.grpo.monitor=val/accuracy"], "objective.phases.grpo.monitor=val/accuracy: the last phase"),
        (["objective.phases.nsr.steps=60"], "objective.phases.psr starts at step 60 >= trainer.max_steps=60: it would"),
        (
            ["module.mini_batches=2", "objective.phases.psr.steps=5"],
            "objective.phases.psr.steps=5 is not a multiple of",
        ),
        (["objective.phases.psr.objective.eps_high=2"], "objective.phases.psr.objective.eps_high=2: must be < 1"),
    ],
)
def test_bad_schedules_fail_in_one_line_before_any_compute(overrides, line):
    from hydra import compose, initialize_config_dir

    from lightning_prerl.config.checks import validate_config
    from lightning_prerl.errors import ConfigError

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        cfg = compose("config", overrides=["objective=nsr_psr_grpo", "run_dir=/tmp/x", *overrides])
    with pytest.raises(ConfigError) as err:
        validate_config(cfg)
    assert str(err.value).startswith(line) and "\n" not in str(err.value)
    for fine in (["objective.phases.grpo.steps=60"], ["objective.phases.nsr.monitor=rollout/mixed_groups"]):
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
            validate_config(compose("config", overrides=["objective=nsr_psr_grpo", "run_dir=/tmp/x", *fine]))


def test_an_unknown_objective_for_a_phase_is_one_line():
    from lightning_prerl.config.checks import check_group_choices
    from lightning_prerl.errors import ConfigError

    check_group_choices(["objective@objective.phases.psr.objective=gspo"], ROOT / "conf")
    with pytest.raises(ConfigError, match=r"^objective@objective.phases.psr.objective='nope' is not an option: choose"):
        check_group_choices(["objective@objective.phases.psr.objective=nope"], ROOT / "conf")


SMALL = [
    "eval_before_training=false",
    "trainer.check_val_every_n_epoch=100",
    "data.prompts_per_step=4",
    "data.samples_per_prompt=4",
    "data.sampling.max_new_tokens=48",
]


def phase_of_step(run_dir) -> list[int]:
    return [int(float(r["objective/phase"])) for r in read_rows(run_dir) if r.get("objective/phase")]


def test_the_three_phase_yaml_trains_with_no_code(tmp_path):
    """The shipped `objective=nsr_psr_grpo`, lengths shortened from the command line (2 + 1 steps, then
    GRPO to step 5), one phase's objective swapped for GSPO: each step's logged phase, the summary's
    boundaries and the switch lines, and the lr by hand: base 1e-4 x lr_scale (0.1 prompt-free, 1.0 for
    GSPO) x the 4-step warm-up min(1, (k + 1) / 4), k = steps since its start, restarted in GSPO's phase.
    `train/lr` is read after the step's scheduler step, so step s logs k + 1: 0.5e-5, 0.75e-5 (NSR),
    1e-5 (PSR), then GSPO from its own start 0.5e-4, 0.75e-4 (not restarted: 1e-4, 1e-4)."""
    lengths = ["objective.phases.nsr.steps=2", "objective.phases.psr.steps=1", "trainer.max_steps=5"]
    lengths += ["module.warmup_steps=4", "objective.phases.grpo.reset_lr_schedule=true"]
    run_dir = tmp_path / "run"
    proc = run_experiment(
        run_dir, "objective=nsr_psr_grpo", *lengths, *SMALL, "objective@objective.phases.grpo.objective=gspo"
    )
    assert phase_of_step(run_dir) == [0, 0, 1, 2, 2]
    lrs = [float(r["train/lr"]) for r in read_rows(run_dir) if r.get("train/lr")]
    assert lrs == pytest.approx([0.5e-5, 0.75e-5, 1e-5, 0.5e-4, 0.75e-4])
    phases = json.loads((run_dir / "summary.json").read_text())["phases"]
    assert [(p["name"], p["objective"], p["start_step"]) for p in phases] == [
        ("nsr", "nsr_prerl", 0),
        ("psr", "psr_prerl", 2),
        ("grpo", "gspo", 3),
    ]
    assert "phases: nsr (nsr_prerl) from step 0, psr (psr_prerl) from step 2, grpo (gspo) from step 3" in proc.stdout
    assert "nsr_psr_grpo: phase 2 (grpo): psr_prerl -> gspo at step 3 (step)" in proc.stdout + proc.stderr


RESUMABLE = [
    "objective=nsr_psr_grpo",
    "objective.phases.nsr.steps=2",
    "objective.phases.psr.steps=10",  # an upper bound: the plateau ends it first
    "objective.phases.psr.monitor=train/skipped_steps",  # stays 0: best at step 2, stale after 3 and 4
    "objective.phases.psr.patience=2",
    "objective.phases.psr.lr_scale=0.5",
    "objective.phases.grpo.objective.kl_coef=0.05",  # a reference, reset to the policy at GRPO's start
    "objective.phases.grpo.reset_optimizer=true",
    "objective.phases.grpo.reset_lr_schedule=true",  # the lr warm-up starts again with GRPO
    "module.warmup_steps=5",  # still warming up at the end: a resume that lost the restart logs another lr
    "callbacks.checkpoint.every_n_train_steps=1",
    "trainer.max_steps=7",
    *SMALL,
]


@pytest.mark.slow
def test_kill_and_resume_in_each_phase_is_exact_across_both_boundaries(tmp_path):
    """NSR-PreRL for 2 steps, PSR-PreRL until `train/skipped_steps` (always 0) plateaus with patience 2
    (observations after steps 2, 3, 4 -> GRPO from step 5), GRPO with KL, an optimizer reset and the
    lr warm-up restarted, to step 7. Killed once the
    checkpoint of 1 step (phase 1), 4 steps (phase 2, one stale observation: a resume that forgot the
    trigger's state would switch at step 7) and 6 steps (phase 3) exists: each resumed run ends with the
    uninterrupted run's metrics, weights and phase boundaries."""
    full = tmp_path / "uninterrupted"
    run_experiment(full, *RESUMABLE)
    assert phase_of_step(full) == [0, 0, 1, 1, 1, 2, 2]
    expected = metrics(full)
    for k in (1, 4, 6):
        run_dir = tmp_path / f"killed-after-{k}"
        kill_after_step(run_dir, k, *RESUMABLE)
        if k == 4:
            ckpt = torch.load(run_dir / "checkpoints" / "step000004.ckpt", map_location="cpu", weights_only=False)
            state = ckpt["callbacks"]["PhaseSchedule"]
            assert (state["phase"], state["starts"], state["best"], state["stale"]) == (1, [0, 2], 0.0, 1)
            assert ckpt["objective"]["phase"] == 1 and ckpt["objective"]["config"]["lr_scale"] == 0.5
        run_experiment(run_dir, *RESUMABLE, "ckpt_path=auto")
        assert metrics(run_dir) == expected, k
        assert weights(run_dir) == weights(full), k
        phases = json.loads((run_dir / "summary.json").read_text())["phases"]
        assert [p["start_step"] for p in phases] == [0, 2, 5], k


def test_a_dsrl_checkpoint_written_before_schedules_still_resumes():
    """DSRL's callback state before it was a schedule held only `switched_at` and the plateau tracking:
    it loads into the right phase (an `if` dropped or the old key misread would restart the warm-up)."""
    from lightning_prerl.training.dsrl import DSRLSwitch

    old = {"switched_at": 3, "best": 0.5, "stale": 1, "plateaued": True, "switch_step": 3}
    switch = DSRLSwitch(PG(name="nsr_prerl"), PG(name="grpo"), switch_step=3)
    switch.load_state_dict(old)
    assert (switch.index, switch.starts, switch.switched_at, switch._best, switch._stale) == (1, [0, 3], 3, 0.5, 1)
    before = DSRLSwitch(PG(), PG(), switch_step=3)
    before.load_state_dict({**old, "switched_at": None, "plateaued": False})
    assert (before.index, before.starts, before.switched_at) == (0, [0], None)
    assert set(switch.state_dict()) == {"phase", "starts", "best", "stale", "plateaued", "switched_at", "switch_step"}
