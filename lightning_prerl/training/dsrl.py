"""DSRL (Dual Space RL, "policy reincarnation", arXiv 2604.14142): NSR-PreRL, then CondRL, in one fit.

`DSRLSwitch` is a callback that owns the objective of each phase. The module starts with
`warmup` (NSR-PreRL); before the first training batch of step `switch_step` (or once a monitored
metric plateaus) the callback swaps the module's objective component for `main` (GRPO) on every
rank, optionally resets the reference model to the current policy (the authors' default; it only
matters when KL is on) and optionally clears the optimizer state (the authors keep it).

Phase and switch step are saved in checkpoints (here and in the module), so resuming on either
side of the switch continues in the right phase.

Departures from the authors' code: their `pretrain_loss_disable_step=20` with verl's 1-based step
counter gives 19 warm-up steps; here `switch_step=S` means exactly S warm-up optimizer steps
(0 .. S-1). "Never switch" is `switch_step: null` with no metric trigger, not a sentinel 99999.
"""

from __future__ import annotations

import logging
import math
from dataclasses import replace

import lightning as L

from lightning_prerl.objectives import PolicyGradientObjective

log = logging.getLogger(__name__)


class DSRLSwitch(L.Callback):
    """Swap the objective from `warmup` to `main` mid-fit.

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
        if nsr_weight is not None:
            warmup = replace(warmup, lr_scale=nsr_weight)
        if nsr_loss_coef is not None:
            warmup = replace(warmup, coef=nsr_loss_coef)
        self.warmup, self.main = warmup, main
        self.switch_step = switch_step
        self.reset_reference, self.reset_optimizer = reset_reference, reset_optimizer
        self.monitor, self.mode, self.patience = monitor, mode, patience
        self.min_delta, self.min_warmup_steps, self.name = min_delta, min_warmup_steps, name
        self.switched_at: int | None = None
        self._best = -math.inf if mode == "max" else math.inf
        self._stale = 0
        self._plateaued = False

    @property
    def initial_objective(self) -> PolicyGradientObjective:
        return self.warmup

    # -- triggers -----------------------------------------------------------------------------
    def _observe(self, trainer: L.Trainer) -> None:
        if self.monitor is None or self.switched_at is not None:
            return
        value = trainer.callback_metrics.get(self.monitor)
        if value is None:
            return
        value = float(value)
        better = value > self._best + self.min_delta if self.mode == "max" else value < self._best - self.min_delta
        if better:
            self._best, self._stale = value, 0
        else:
            self._stale += 1
        self._plateaued = self._stale >= self.patience and trainer.global_step >= self.min_warmup_steps

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.monitor is not None and not self.monitor.startswith("val/"):
            self._observe(trainer)

    def on_validation_end(self, trainer, pl_module) -> None:
        if self.monitor is not None and self.monitor.startswith("val/") and not trainer.sanity_checking:
            self._observe(trainer)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.switched_at is not None:
            return
        by_step = self.switch_step is not None and trainer.global_step >= self.switch_step
        if by_step or self._plateaued:
            self._switch(trainer, pl_module, "step" if by_step else f"{self.monitor} plateau")

    def _switch(self, trainer: L.Trainer, pl_module, reason: str) -> None:
        # reset first: set_objective would otherwise load a base reference only to overwrite it
        if self.reset_reference and (self.main.needs_reference or pl_module.reference is not None):
            pl_module.reset_reference()
        pl_module.set_objective(self.main, phase=1)
        if self.reset_optimizer:
            for opt in trainer.optimizers:
                opt.state.clear()
        self.switched_at = trainer.global_step
        log.info("DSRL: %s -> %s at step %d (%s)", self.warmup.name, self.main.name, self.switched_at, reason)

    # -- checkpoint state ---------------------------------------------------------------------
    def setup(self, trainer, pl_module, stage: str) -> None:
        if self.main.needs_reference or self.warmup.needs_reference:
            # built with the policy in `configure_model`, so a sharded (FSDP2) checkpoint has its shards
            # to restore into, whichever side of the switch it was written on
            pl_module.reference_needed = True

    def state_dict(self) -> dict:
        return {
            "switched_at": self.switched_at,
            "best": self._best,
            "stale": self._stale,
            "plateaued": self._plateaued,
            "switch_step": self.switch_step,
        }

    def load_state_dict(self, state_dict: dict) -> None:
        self.switched_at = state_dict["switched_at"]
        self._best, self._stale = state_dict["best"], state_dict["stale"]
        self._plateaued = state_dict.get("plateaued", False)
