"""Schedules of objectives in one fit: DSRL (Dual Space RL, arXiv 2604.14142) and any chain of phases.

`PhaseSchedule` is a callback that owns an ordered list of `Phase`s. Each phase has an objective (any
registered objective, in any space), a length -- `steps` optimizer steps, or a plateau of a
monitored metric (`monitor`, `patience`, `min_delta`, `min_steps`; `steps` then stays an upper
bound) --, an optional learning-rate multiplier and loss coefficient that replace the objective's own
(`lr_scale`, `coef`), and what is reset at its start (`reset_reference`: the reference model becomes
the current policy, `reset_optimizer`: AdamW's moments are cleared, `reset_lr_schedule`: the
learning-rate warm-up starts again). The last phase runs to the end of
the fit. `DSRLSwitch` is the paper's two-phase instance, NSR-PreRL for `switch_step` steps then GRPO,
kept with its own keys (`switch_step`, `nsr_weight`, `monitor`, ...) so that `objective=dsrl` means
what it always meant.

The boundary rule. A phase's steps are counted in optimizer steps from its start. Before the first
training batch of step S, the callback checks whether the active phase is over (S - start >= steps, or
its monitor plateaued by the last observation) and, if so, starts the next one; several phases can
end at the same step (a phase of 0 steps is skipped). The rollout batch of step S was generated
before that check, by the policy after step S - 1 and while the old phase was active (the rollout
record's `phase` says so), and it is trained with the NEW phase's objective, learning rate and
resets: a boundary changes how a batch is scored, never how it was drawn. With several optimizer
steps per rollout batch (`module.ppo_epochs` x `module.mini_batches`), every `steps` must be a
multiple of that count (checked with the config), so one rollout batch never spans two phases.

The phase index, the start step of every phase reached and the active trigger's state (best value,
observations without improvement, plateau flag) are saved in checkpoints (the module saves the active
objective), so a resume on any side of any boundary continues exactly as the uninterrupted run.

Departures from the authors' code: their `pretrain_loss_disable_step=20` with verl's 1-based step
counter gives 19 warm-up steps; here `switch_step=S` means exactly S warm-up optimizer steps
(0 .. S-1). "Never switch" is `switch_step: null` with no metric trigger, not a sentinel 99999.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, replace

import lightning as L

from lightning_prerl.objectives import PolicyGradientObjective

log = logging.getLogger(__name__)


@dataclass
class Phase:
    """One phase of a `PhaseSchedule`.

    Args:
        objective: the objective trained while the phase is active.
        steps: optimizer steps of the phase; None: until `monitor` plateaus (the last phase: the end).
        monitor: metric whose plateau ends the phase (e.g. "val/accuracy", "rollout/mixed_groups");
            None: `steps` only. With both, `steps` is an upper bound.
        mode: "max" or "min": which direction counts as improvement of `monitor`.
        patience: observations without improvement before the plateau.
        min_delta: smallest change that counts as an improvement.
        min_steps: the plateau never ends the phase before this many of its steps.
        lr_scale: learning-rate multiplier in this phase; None: the objective's own.
        coef: loss multiplier in this phase; None: the objective's own.
        reset_reference: at the phase's start, the reference model becomes the current policy (only
            matters with KL on; the first phase has no start boundary).
        reset_optimizer: at the phase's start, AdamW's moments are cleared.
        reset_lr_schedule: at the phase's start, the learning-rate warm-up (`module.warmup_steps`)
            starts again.
    """

    objective: PolicyGradientObjective
    steps: int | None = None
    monitor: str | None = None
    mode: str = "max"
    patience: int = 3
    min_delta: float = 0.0
    min_steps: int = 1
    lr_scale: float | None = None
    coef: float | None = None
    reset_reference: bool = True
    reset_optimizer: bool = False
    reset_lr_schedule: bool = False

    def weighted(self) -> Phase:
        """This phase with its `lr_scale` and `coef` written into its objective."""
        weights = {key: value for key in ("lr_scale", "coef") if (value := getattr(self, key)) is not None}
        return replace(self, objective=replace(self.objective, **weights)) if weights else self


def schedule_error(phases: list[Phase], names: list[str]) -> str | None:
    """The one-line reason a list of phases cannot run, else None (a phase named by its config key)."""
    if not phases:
        return "objective.phases is empty: a schedule needs at least one phase"
    for i, (name, phase) in enumerate(zip(names, phases, strict=True)):
        key, last = f"objective.phases.{name}", i == len(phases) - 1
        if phase.steps is not None and phase.steps < 0:
            return f"{key}.steps={phase.steps}: must be >= 0"
        if phase.lr_scale is not None and phase.lr_scale <= 0:
            return f"{key}.lr_scale={phase.lr_scale}: must be > 0"
        if phase.mode not in ("max", "min"):
            return f"{key}.mode={phase.mode!r}: expected 'max' or 'min'"
        if not last and phase.steps is None and phase.monitor is None:
            return f"{key} has steps=null and monitor=null: a phase before the last needs a length or a trigger"
        if last and phase.monitor is not None:
            return f"{key}.monitor={phase.monitor}: the last phase runs to the end of the fit (no trigger)"
    return None


class PhaseSchedule(L.Callback):
    """Train each phase's objective in turn, in one fit (see the module docstring).

    Args:
        phases: {name: Phase or the Phase's keyword arguments}, in order (a list: named by index).
        name: label in logs.
    """

    label = "schedule"

    def __init__(self, phases: Mapping | list, name: str = "schedule"):
        if not isinstance(phases, Mapping):
            phases = {str(i): phase for i, phase in enumerate(phases)}
        self.phase_names = [str(n) for n in phases]
        given = [p if isinstance(p, Phase) else Phase(**{k: p[k] for k in p}) for p in phases.values()]
        if error := schedule_error(given, self.phase_names):
            raise ValueError(error)
        self.phases = [phase.weighted() for phase in given]
        self.name = name
        self.index = 0  # the active phase
        self.starts = [0]  # the step each phase reached so far started at
        self._reset_trigger()

    @property
    def initial_objective(self) -> PolicyGradientObjective:
        return self.phases[0].objective

    @property
    def boundaries(self) -> list[int]:
        """The steps at which a phase after the first started (so far)."""
        return self.starts[1:]

    # -- triggers -----------------------------------------------------------------------------
    def _reset_trigger(self) -> None:
        mode = self.phases[self.index].mode
        self._best = -math.inf if mode == "max" else math.inf
        self._stale = 0
        self._plateaued = False

    def _observe(self, trainer: L.Trainer) -> None:
        phase = self.phases[self.index]
        if phase.monitor is None or self.index == len(self.phases) - 1:
            return
        value = trainer.callback_metrics.get(phase.monitor)
        if value is None:
            return
        value = float(value)
        delta = phase.min_delta
        better = value > self._best + delta if phase.mode == "max" else value < self._best - delta
        if better:
            self._best, self._stale = value, 0
        else:
            self._stale += 1
        ran = trainer.global_step - self.starts[self.index]
        self._plateaued = self._stale >= phase.patience and ran >= phase.min_steps

    def _monitor(self) -> str | None:
        return self.phases[self.index].monitor

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._monitor() is not None and not self._monitor().startswith("val/"):
            self._observe(trainer)

    def on_validation_end(self, trainer, pl_module) -> None:
        if self._monitor() is not None and self._monitor().startswith("val/") and not trainer.sanity_checking:
            self._observe(trainer)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        while self.index < len(self.phases) - 1:
            phase, ran = self.phases[self.index], trainer.global_step - self.starts[self.index]
            by_step = phase.steps is not None and ran >= phase.steps
            if not (by_step or self._plateaued):
                return
            self._advance(trainer, pl_module, "step" if by_step else f"{phase.monitor} plateau")

    def _advance(self, trainer: L.Trainer, pl_module, reason: str) -> None:
        before = self.phases[self.index].objective
        self.index += 1
        self.starts.append(trainer.global_step)
        phase = self.phases[self.index]
        # reset first: set_objective would otherwise load a base reference only to overwrite it
        if phase.reset_reference and (phase.objective.needs_reference or pl_module.reference is not None):
            pl_module.reset_reference()
        if phase.reset_lr_schedule:  # before set_objective, which re-evaluates this step's learning rate
            pl_module.lr_start = trainer.global_step
        pl_module.set_objective(phase.objective, phase=self.index)
        if phase.reset_optimizer:
            for opt in trainer.optimizers:
                opt.state.clear()
        self._reset_trigger()
        self._log_switch(before, phase.objective, trainer.global_step, reason)

    def _log_switch(self, before, after, step: int, reason: str) -> None:
        name = self.phase_names[self.index]
        args = (self.name, self.index, name, before.name, after.name, step, reason)
        log.info("%s: phase %d (%s): %s -> %s at step %d (%s)", *args)

    # -- checkpoint state ---------------------------------------------------------------------
    def setup(self, trainer, pl_module, stage: str) -> None:
        if any(phase.objective.needs_reference for phase in self.phases):
            # built with the policy in `configure_model`, so a sharded (FSDP2) checkpoint has its shards
            # to restore into, whichever phase it was written in
            pl_module.reference_needed = True

    def state_dict(self) -> dict:
        return {
            "phase": self.index,
            "starts": list(self.starts),
            "best": self._best,
            "stale": self._stale,
            "plateaued": self._plateaued,
        }

    def load_state_dict(self, state_dict: dict) -> None:
        self.index, self.starts = state_dict["phase"], list(state_dict["starts"])
        self._best, self._stale = state_dict["best"], state_dict["stale"]
        self._plateaued = state_dict["plateaued"]


class DSRLSwitch(PhaseSchedule):
    """DSRL: swap the objective from `warmup` to `main` mid-fit (a two-phase `PhaseSchedule`).

    Args:
        warmup: the phase-0 objective (NSR-PreRL in the paper).
        main: the phase-1 objective (GRPO in the paper).
        switch_step: switch before optimizer step S (S warm-up steps); None: only the metric trigger.
        reset_reference: reset the reference model to the current policy at the switch (paper: true).
        reset_optimizer: clear AdamW's moments at the switch (paper: false).
        monitor: metric key that triggers the switch when it plateaus (e.g. "val/accuracy" or
            "rollout/mixed_groups"); None: step trigger only. `switch_step` stays an upper bound.
        mode: "max" or "min": which direction counts as improvement of `monitor`.
        patience: observations without improvement before the switch.
        min_delta: smallest change that counts as an improvement.
        min_warmup_steps: never switch on the metric before this many steps.
        name: label in logs.
        nsr_weight: the NSR weight a sweep means: the warm-up's learning-rate multiplier (its
            `lr_scale`). Under AdamW this is what sets the size of the NSR-PreRL updates (None: keep
            the warm-up objective's own).
        nsr_loss_coef: the authors' `pretrain_loss_coef` (0.01), the warm-up's loss multiplier (its
            `coef`). Adam normalises the gradient scale away, so on its own it barely changes a step;
            it matters against other terms of the same loss (KL, entropy) and for the Adam moments
            carried across the switch (None: keep the warm-up objective's own).
    """

    def __init__(
        self,
        warmup: PolicyGradientObjective,
        main: PolicyGradientObjective,
        switch_step: int | None = 20,
        reset_reference: bool = True,
        reset_optimizer: bool = False,
        monitor: str | None = None,
        mode: str = "max",
        patience: int = 3,
        min_delta: float = 0.0,
        min_warmup_steps: int = 1,
        name: str = "dsrl",
        nsr_weight: float | None = None,
        nsr_loss_coef: float | None = None,
    ):
        if switch_step is None and monitor is None:
            raise ValueError("objective.switch_step=null and objective.monitor=null: DSRL would never switch")
        if switch_step is not None and switch_step < 0:
            raise ValueError(f"objective.switch_step={switch_step}: must be >= 0")
        if mode not in ("max", "min"):
            raise ValueError(f"objective.mode={mode!r}: expected 'max' or 'min'")
        trigger = {"monitor": monitor, "mode": mode, "patience": patience, "min_delta": min_delta}
        weights = {"lr_scale": nsr_weight, "coef": nsr_loss_coef}
        first = Phase(warmup, switch_step, **trigger, min_steps=min_warmup_steps, **weights)
        then = Phase(main, reset_reference=reset_reference, reset_optimizer=reset_optimizer)
        super().__init__({"warmup": first, "main": then}, name=name)
        self.switch_step = switch_step
        self.reset_reference, self.reset_optimizer = reset_reference, reset_optimizer
        self.monitor, self.mode, self.patience = monitor, mode, patience
        self.min_delta, self.min_warmup_steps = min_delta, min_warmup_steps

    @property
    def warmup(self) -> PolicyGradientObjective:
        return self.phases[0].objective

    @property
    def main(self) -> PolicyGradientObjective:
        return self.phases[1].objective

    @property
    def switched_at(self) -> int | None:
        return self.starts[1] if len(self.starts) > 1 else None

    def _log_switch(self, before, after, step: int, reason: str) -> None:
        log.info("DSRL: %s -> %s at step %d (%s)", before.name, after.name, step, reason)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "switched_at": self.switched_at, "switch_step": self.switch_step}

    def load_state_dict(self, state_dict: dict) -> None:
        if "phase" in state_dict:
            super().load_state_dict(state_dict)
        else:  # written before DSRL was a schedule: the switch step is the whole phase state
            switched = state_dict["switched_at"]
            self.index, self.starts = (0, [0]) if switched is None else (1, [0, switched])
            self._best, self._stale = state_dict["best"], state_dict["stale"]
            self._plateaued = state_dict.get("plateaued", False)
