"""DSRL across the switch: kill the real run after the switch, resume, check phase and step."""

from __future__ import annotations

import os
import signal
import time

import pytest
import torch
from test_run import ROOT, read_rows, run_experiment, start_run, steps_with

DSRL = [
    "objective=dsrl",
    "objective.switch_step=2",
    "eval_before_training=false",
    "trainer.check_val_every_n_epoch=100",
    "data.prompts_per_step=4",
    "data.samples_per_prompt=4",
    "data.sampling.max_new_tokens=48",
    "callbacks.checkpoint.every_n_train_steps=1",
    "callbacks.checkpoint.save_top_k=-1",
]


def phases(rows) -> dict[int, float]:
    return {int(r["step"]): float(r["objective/phase"]) for r in rows if r.get("objective/phase")}


@pytest.mark.slow
def test_dsrl_switches_mid_fit_and_resumes_on_both_sides(tmp_path):
    run_dir = tmp_path / "killed"
    target = run_dir / "checkpoints" / "step000003.ckpt"
    proc = start_run(run_dir, *DSRL, "trainer.max_steps=50")
    later = run_dir / "checkpoints" / "step000004.ckpt"  # once it exists, step 3's file is complete
    deadline = time.time() + 240
    while not later.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)  # the run dies after the switch, mid-training
    proc.wait()
    assert target.exists(), proc.stderr.read().decode()[-3000:]
    assert [phases(read_rows(run_dir))[s] for s in (0, 1, 2)] == [0, 0, 1]

    ckpt = torch.load(target, map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 3 and ckpt["objective"]["phase"] == 1
    assert ckpt["objective"]["config"]["name"] == "grpo"
    assert next(v for k, v in ckpt["callbacks"].items() if k.startswith("DSRLSwitch"))["switched_at"] == 2

    after = tmp_path / "resumed-after-switch"
    run_experiment(after, *DSRL, "trainer.max_steps=5", f"ckpt_path={target}")
    rows = read_rows(after)
    assert steps_with(rows, "train/loss") == [3, 4]
    assert set(phases(rows).values()) == {1.0}

    before = tmp_path / "resumed-before-switch"
    run_experiment(before, *DSRL, "trainer.max_steps=4", f"ckpt_path={run_dir / 'checkpoints' / 'step000001.ckpt'}")
    assert phases(read_rows(before)) == {1: 0.0, 2: 1.0, 3: 1.0}


def test_switch_swaps_objective_resets_reference_and_learning_rate(tiny_model_dir):
    """The switch happens at `switch_step`, not one step before; the reference becomes the trained policy,
    not the base model. Catches: `>=` turned into `>` or an off-by-one step, and `reset_reference` without
    the copy (the policy trains before the switch here, so base != policy)."""
    import lightning as L

    from lightning_prerl.objectives import PolicyGradientObjective as PG
    from lightning_prerl.training.dsrl import DSRLSwitch
    from lightning_prerl.training.policy import PolicyModule

    warm = PG(name="nsr_prerl", space="marginal", advantage="group_mean", samples="negative", lr_scale=0.1)
    main = PG(name="grpo", kl_coef=0.05)
    switch = DSRLSwitch(warm, main, switch_step=3, reset_optimizer=True)
    module = PolicyModule(switch.initial_objective, model_path=str(tiny_model_dir), lr=1e-3)
    module.configure_model()
    assert module.reference is None  # NSR-PreRL without KL: no reference model
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, max_steps=1)
    trainer.strategy.connect(module)
    module.trainer = trainer
    opt_cfg = module.configure_optimizers()
    trainer.optimizers = [opt_cfg["optimizer"]]
    from lightning.pytorch.core.optimizer import LRSchedulerConfig

    trainer.strategy.lr_scheduler_configs = [LRSchedulerConfig(opt_cfg["lr_scheduler"]["scheduler"])]
    assert opt_cfg["optimizer"].param_groups[0]["lr"] == pytest.approx(1e-4)  # warm-up phase: lr x 0.1
    base = {n: p.detach().clone() for n, p in module.policy.named_parameters()}
    loss = sum(p.square().sum() for p in module.policy.parameters())  # a stand-in warm-up step: the policy trains
    loss.backward()
    opt_cfg["optimizer"].step()
    assert any(not torch.equal(p, base[n]) for n, p in module.policy.named_parameters())
    progress = trainer.fit_loop.epoch_loop.manual_optimization.optim_step_progress.total
    progress.completed = 2  # global_step 2 = switch_step - 1: still the warm-up
    switch.on_train_batch_start(trainer, module, None, 0)
    assert module.objective is warm and module.phase == 0 and switch.switched_at is None
    progress.completed = 3  # global_step 3 = switch_step
    switch.on_train_batch_start(trainer, module, None, 0)
    assert module.objective is main and module.phase == 1 and switch.switched_at == 3
    assert opt_cfg["optimizer"].param_groups[0]["lr"] == pytest.approx(1e-3)  # main phase from this step on
    assert not opt_cfg["optimizer"].state  # reset_optimizer
    ref = dict(module.reference.named_parameters())
    assert all(torch.equal(p, ref[n]) for n, p in module.policy.named_parameters())  # reference = policy
    assert any(not torch.equal(ref[n], b) for n, b in base.items())  # ... the trained one, not the base
    assert not any(p.requires_grad for p in ref.values())


def test_metric_plateau_triggers_the_switch():
    from types import SimpleNamespace

    from lightning_prerl.objectives import PolicyGradientObjective as PG
    from lightning_prerl.training.dsrl import DSRLSwitch

    calls = []
    module = SimpleNamespace(reference=None, set_objective=lambda obj, phase: calls.append((obj.name, phase)))
    switch = DSRLSwitch(
        PG(name="warm"),
        PG(name="main"),
        switch_step=None,
        monitor="rollout/mixed_groups",
        patience=2,
        min_warmup_steps=3,
    )
    trainer = SimpleNamespace(callback_metrics={}, global_step=0, optimizers=[], sanity_checking=False)
    for step, value in enumerate([0.5, 0.6, 0.6, 0.55, 0.7]):
        trainer.global_step = step
        switch.on_train_batch_start(trainer, module, None, 0)
        trainer.callback_metrics["rollout/mixed_groups"] = value
        switch.on_train_batch_end(trainer, module, None, None, 0)
    # 0.6 at step 1 is the best; steps 2 and 3 do not improve -> plateau after step 3 (>= min_warmup_steps)
    assert calls == [("main", 1)] and switch.switched_at == 4
    with pytest.raises(ValueError, match="would never switch"):
        DSRLSwitch(PG(), PG(), switch_step=None, monitor=None)


def test_metric_plateau_switches_a_real_cpu_fit(tiny_model_dir):
    """`objective.monitor` on a real CPU Trainer: `train/skipped_steps` is logged every step through
    Lightning's callback metrics and stays 0, so with patience 2 it plateaus after step 2's batch and the
    main objective trains from step 3. Catches the monitor never reaching the callback (a metric logged
    only to the loggers), the observation hook not running, or a switch a step early or late."""
    import lightning as L
    from test_policy import quiet_cpu_trainer

    from lightning_prerl.data.prompts import toy_prompts
    from lightning_prerl.data.rewards import BoxedExactMatch
    from lightning_prerl.objectives import PolicyGradientObjective as PG
    from lightning_prerl.rollout.hf import HFEngine
    from lightning_prerl.training.datamodule import RolloutDataModule
    from lightning_prerl.training.dsrl import DSRLSwitch
    from lightning_prerl.training.policy import PolicyModule

    warm = PG(name="nsr_prerl", space="marginal", advantage="group_mean", samples="negative")
    switch = DSRLSwitch(warm, PG(name="grpo"), switch_step=None, monitor="train/skipped_steps", patience=2)
    module = PolicyModule(switch.initial_objective, model_path=str(tiny_model_dir), lr=1e-3)
    prompts = toy_prompts("train", 16)
    dm = RolloutDataModule(module.tokenizer, HFEngine, BoxedExactMatch(), prompts, None, 2, 2, {"max_new_tokens": 8})
    phases = []

    class Phases(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            phases.append(pl_module.phase)

    trainer = quiet_cpu_trainer(callbacks=[switch, Phases()], max_steps=5)
    trainer.fit(module, datamodule=dm)
    assert phases == [0, 0, 0, 1, 1] and switch.switched_at == 3


def test_the_nsr_weight_is_the_warmup_learning_rate_multiplier_and_the_loss_coef_is_separate():
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from lightning_prerl.config.checks import validate_config
    from lightning_prerl.config.schema import ConfigError
    from lightning_prerl.objectives import PolicyGradientObjective as PG
    from lightning_prerl.training.dsrl import DSRLSwitch

    warm = PG(name="nsr_prerl", space="marginal", advantage="group_mean", samples="negative", coef=0.01)
    switch = DSRLSwitch(warm, PG(), nsr_weight=0.3, nsr_loss_coef=0.05)
    assert (switch.warmup.lr_scale, switch.warmup.coef, switch.main.lr_scale) == (0.3, 0.05, 1.0)
    assert DSRLSwitch(warm, PG()).warmup.lr_scale == 0.1  # None keeps the warm-up's own (prompt-free rule)
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        weights = ["objective.nsr_weight=0.3", "objective.nsr_loss_coef=0.02"]
        cfg = compose("config", overrides=[*weights, "run_dir=/tmp/x"])
        switch = instantiate(cfg.objective)
        assert (switch.warmup.lr_scale, switch.warmup.coef) == (0.3, 0.02)  # sweepable: both reach the warm-up
        cfg = compose("config", overrides=["objective.warmup.lr_scale=0.5", "run_dir=/tmp/x"])
        with pytest.raises(ConfigError, match=r"objective.warmup.lr_scale=0.5 contradicts objective.nsr_weight=1.0"):
            validate_config(cfg)


@pytest.mark.parametrize(
    ("mode", "values", "stale"),
    [
        ("max", [1.0, 1.05, 1.2, 1.25], [0, 1, 0, 1]),  # improvements by more than min_delta only
        ("min", [1.0, 0.95, 0.8, 0.75], [0, 1, 0, 1]),
    ],
)
def test_plateau_counts_only_improvements_beyond_min_delta_in_either_mode(mode, values, stale):
    """`min_delta` 0.1: a step of 0.05 is no improvement, 0.15-0.2 is, in `mode: max` and `mode: min`
    (found untested by `make mutation`: the min branch and the sign of min_delta)."""
    from types import SimpleNamespace

    from lightning_prerl.objectives import PolicyGradientObjective as PG
    from lightning_prerl.training.dsrl import DSRLSwitch

    switch = DSRLSwitch(PG(), PG(), switch_step=None, monitor="m", mode=mode, min_delta=0.1, patience=5)
    seen = []
    for step, value in enumerate(values):
        switch._observe(SimpleNamespace(callback_metrics={"m": value}, global_step=step))
        seen.append(switch._stale)
    assert seen == stale


def test_switch_step_zero_is_grpo_from_the_first_step():
    """`objective.switch_step=0` is valid (no warm-up: GRPO throughout), negative is not."""
    from lightning_prerl.objectives import PolicyGradientObjective as PG
    from lightning_prerl.training.dsrl import DSRLSwitch

    assert DSRLSwitch(PG(), PG(), switch_step=0).switch_step == 0
    with pytest.raises(ValueError, match=r"objective.switch_step=-1"):
        DSRLSwitch(PG(), PG(), switch_step=-1)


def test_python_defaults_are_the_configs_and_the_paper_s():
    """`DSRLSwitch(warmup, main)` from Python means what `objective=dsrl` means (switch before step 20,
    reference reset, optimizer kept, plateau settings): a changed default in either place fails here."""
    import inspect

    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from lightning_prerl.config.checks import validate_config
    from lightning_prerl.errors import ConfigError
    from lightning_prerl.objectives import PolicyGradientObjective as PG
    from lightning_prerl.training.dsrl import DSRLSwitch

    yaml = OmegaConf.load(ROOT / "conf" / "objective" / "dsrl.yaml")
    keys = ("reset_reference", "reset_optimizer", "monitor", "mode", "patience", "min_delta", "min_warmup_steps")
    built = DSRLSwitch(PG(), PG())  # the values an instance gets (the signature alone can be bypassed)
    defaults = {k: p.default for k, p in inspect.signature(DSRLSwitch).parameters.items()}
    assert {k: getattr(built, k) for k in keys} == {k: defaults[k] for k in keys} == {k: yaml[k] for k in keys}
    # the paper's switch: 19 NSR-PreRL steps of 348; Python knows no run length and takes the paper's 20,
    # the YAML the paper's share of trainer.max_steps (5.5 %): 19 of 348, 3 of the toy's 60
    assert built.switch_step == 20 and "lp.share_of:0.055,${trainer.max_steps}," in OmegaConf.to_yaml(yaml)
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        for steps, updates, switch in ((60, 1, 3), (348, 1, 19), (10, 1, 1), (3, 1, 1), (60, 4, 4), (348, 4, 20)):
            batches = [f"module.mini_batches={updates}", f"data.prompts_per_step={4 * updates}"]  # whole batches
            cfg = compose("config", overrides=[f"trainer.max_steps={steps}", *batches, "run_dir=/tmp/x"])
            assert cfg.objective.switch_step == switch, (steps, updates)
        assert compose("config", overrides=["+dsrl.switch_step=7", "run_dir=/tmp/x"]).objective.switch_step == 7
        unbounded = compose("config", overrides=["trainer.max_steps=-1", "run_dir=/tmp/x"])
        with pytest.raises(ConfigError, match=r"objective.switch_step defaults to 5.5% of trainer.max_steps=-1"):
            validate_config(unbounded)  # one line before any compute: no share of an unbounded run
    assert yaml["nsr_weight"] == 1.0  # the paper: one learning rate for both phases
    assert built.name == yaml["name"] == "dsrl"


def test_plateau_observes_each_evaluation_once_and_nan_is_no_improvement():
    """A `val/` monitor is observed at validation end only: observing it again at every training batch
    end (the `and` of the routing test turned `or`, or the prefix test broken) would count one stale
    evaluation `patience` times and switch early. In `mode: min` an equal value is no improvement
    (`<` turned `<=` never plateaus). A NaN metric counts as no improvement from the first observation.
    Neither the sanity check nor a validation run observes a `rollout/` monitor."""
    from types import SimpleNamespace

    from lightning_prerl.objectives import PolicyGradientObjective as PG
    from lightning_prerl.training.dsrl import DSRLSwitch

    switch = DSRLSwitch(PG(), PG(), switch_step=None, monitor="val/accuracy", patience=2)
    trainer = SimpleNamespace(callback_metrics={"val/accuracy": 0.5}, global_step=5, sanity_checking=False)
    switch.on_validation_end(trainer, None)
    for _ in range(3):
        switch.on_train_batch_end(trainer, None, None, None, 0)
    assert (switch._best, switch._stale, switch._plateaued) == (0.5, 0, False)
    switch.on_validation_end(trainer, None)
    switch.on_validation_end(trainer, None)
    assert switch._plateaued

    trainer.sanity_checking = True  # Lightning's sanity check is no evaluation of the policy
    switch = DSRLSwitch(PG(), PG(), switch_step=None, monitor="val/accuracy", patience=1)
    switch.on_validation_end(trainer, None)
    assert switch._best == -float("inf")
    trainer.sanity_checking = False
    rollout = DSRLSwitch(PG(), PG(), switch_step=None, monitor="rollout/mixed_groups", patience=1)
    trainer.callback_metrics["rollout/mixed_groups"] = 0.5
    rollout.on_validation_end(trainer, None)  # a rollout/ monitor is observed after training batches only
    assert rollout._best == -float("inf")

    no_monitor = DSRLSwitch(PG(), PG(), switch_step=3)
    no_monitor.on_train_batch_end(trainer, None, None, None, 0)  # no monitor: nothing observed, no error
    assert no_monitor._stale == 0

    for mode, values, plateau_after in (("min", [1.0, 1.0, 1.0], 3), ("max", [float("nan")] * 3, 3)):
        switch = DSRLSwitch(PG(), PG(), switch_step=None, monitor="m", mode=mode, patience=plateau_after - 1)
        flags = []
        for step, value in enumerate(values):
            switch._observe(SimpleNamespace(callback_metrics={"m": value}, global_step=step + 1))
            flags.append(switch._plateaued)
        expected = [False] * (plateau_after - 1) + [True]
        if mode == "max":  # NaN never improves on -inf: stale from the first observation
            expected = [False, True, True]
        assert flags == expected, (mode, flags)


def test_the_switch_is_logged_with_its_phases_step_and_reason(caplog):
    """The one line a user reads to know when DSRL switched and why (step or plateau)."""
    import logging
    from types import SimpleNamespace

    from lightning_prerl.objectives import PolicyGradientObjective as PG
    from lightning_prerl.training.dsrl import DSRLSwitch

    module = SimpleNamespace(reference=None, set_objective=lambda obj, phase: None)
    trainer = SimpleNamespace(callback_metrics={}, global_step=4, optimizers=[], sanity_checking=False)
    with caplog.at_level(logging.INFO, logger="lightning_prerl.training.dsrl"):
        DSRLSwitch(PG(name="nsr_prerl"), PG(name="grpo"), switch_step=4).on_train_batch_start(trainer, module, None, 0)
        plateau = DSRLSwitch(PG(name="a"), PG(name="b"), switch_step=None, monitor="val/accuracy", patience=1)
        plateau._plateaued = True
        plateau.on_train_batch_start(trainer, module, None, 0)
    assert caplog.messages == [
        "DSRL: nsr_prerl -> grpo at step 4 (step)",
        "DSRL: a -> b at step 4 (val/accuracy plateau)",
    ]
    with pytest.raises(ValueError) as err:
        DSRLSwitch(PG(), PG(), switch_step=None, monitor=None)
    assert str(err.value) == "objective.switch_step=null and objective.monitor=null: DSRL would never switch"


@pytest.mark.parametrize("kl_in", ["warmup", "main"])
def test_a_reference_is_built_when_either_phase_needs_one(kl_in):
    """KL in only one phase still makes the module build the reference with the policy (FSDP2 shards to
    restore into on either side of the switch); `or` turned `and` would leave it to neither."""
    from types import SimpleNamespace

    from lightning_prerl.objectives import PolicyGradientObjective as PG
    from lightning_prerl.training.dsrl import DSRLSwitch

    phases = {"warmup": PG(), "main": PG(), kl_in: PG(kl_coef=0.1)}
    module = SimpleNamespace(reference_needed=False)
    DSRLSwitch(phases["warmup"], phases["main"]).setup(None, module, "fit")
    assert module.reference_needed
    module = SimpleNamespace(reference_needed=False)
    DSRLSwitch(PG(), PG()).setup(None, module, "fit")
    assert not module.reference_needed
