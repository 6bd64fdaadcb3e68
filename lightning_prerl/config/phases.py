"""The schema of a schedule of phases (`objective=nsr_psr_grpo`, `training/dsrl.py`'s `PhaseSchedule`).

Generic over the objective node so that this module needs nothing from `schema.py`, which uses it
as `Schedule[Objective]`. `schedule_contradictions` checks what one phase cannot see alone: the
phase order, the last phase against `trainer.max_steps`, `steps` against the updates per batch.
"""

from __future__ import annotations

from typing import Annotated, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from lightning_prerl.errors import ConfigError

ObjectiveT = TypeVar("ObjectiveT")


class _Node(BaseModel):
    model_config = ConfigDict(extra="allow", use_attribute_docstrings=True)


class Phase(_Node, Generic[ObjectiveT]):
    """One phase: an objective, its length or trigger, its lr and loss multipliers, its start resets."""

    objective: ObjectiveT
    """The objective trained in this phase (`objective@objective.phases.<name>.objective=<option>`)."""
    steps: Annotated[int, Field(ge=0)] | None = None
    """Optimizer steps of the phase (an upper bound with `monitor`); null: until `monitor` plateaus
    (the last phase: to the end of the fit)."""
    monitor: str | None = None
    """Metric whose plateau ends the phase (e.g. `rollout/mixed_groups`); null: `steps` only."""
    mode: Literal["max", "min"] = "max"
    """Which direction of `monitor` counts as an improvement."""
    patience: Annotated[int, Field(ge=1)] = 3
    """Observations of `monitor` without improvement before the phase ends."""
    min_delta: Annotated[float, Field(ge=0)] = 0.0
    """Smallest change of `monitor` that counts as an improvement."""
    min_steps: Annotated[int, Field(ge=0)] = 1
    """The plateau never ends the phase before this many of its steps."""
    lr_scale: Annotated[float, Field(gt=0)] | None = None
    """Learning-rate multiplier in this phase; null: the objective's own `lr_scale`."""
    coef: Annotated[float, Field(ge=0)] | None = None
    """Loss multiplier in this phase; null: the objective's own `coef`."""
    reset_reference: bool = True
    """At the phase's start the reference model becomes the current policy (matters with KL on only)."""
    reset_optimizer: bool = False
    """At the phase's start AdamW's moments are cleared (the paper keeps them)."""
    reset_lr_schedule: bool = False
    """At the phase's start the learning-rate warm-up (`module.warmup_steps`) starts again."""


class Schedule(_Node, Generic[ObjectiveT]):
    """A schedule of phases in one `Trainer.fit` (`conf/objective/nsr_psr_grpo.yaml`)."""

    name: str
    """Label in logs, reports and checkpoints."""
    phases: Annotated[dict[str, Phase[ObjectiveT]], Field(min_length=1)]
    """The phases by name, in the order written; the last one runs to the end of the fit."""


def schedule_contradictions(phases: dict, max_steps: int, updates_per_batch: int) -> None:
    """Raise ConfigError with one line when the phases cannot run as written.

    Args:
        phases: {name: Phase} of a validated schedule, in order.
        max_steps: `trainer.max_steps`.
        updates_per_batch: optimizer steps per rollout batch (`module.ppo_epochs` x `module.mini_batches`).
    """
    from lightning_prerl.training.dsrl import schedule_error  # the callback's own guard, same words

    if error := schedule_error(list(phases.values()), list(phases)):
        raise ConfigError(error)
    start, exact = 0, True  # the step the phase starts at by `steps` (an upper bound once a trigger came before)
    for i, (name, phase) in enumerate(phases.items()):
        key, last = f"objective.phases.{name}", i == len(phases) - 1
        if phase.steps and phase.steps % updates_per_batch:
            raise ConfigError(
                f"{key}.steps={phase.steps} is not a multiple of module.ppo_epochs x module.mini_batches = "
                f"{updates_per_batch}: a rollout batch never spans two phases"
            )
        if i > 0 and exact and start >= max_steps:
            raise ConfigError(
                f"objective.phases.{name} starts at step {start} >= trainer.max_steps={max_steps}: it would never "
                f"run (shorten the phases before it, or raise trainer.max_steps)"
            )
        if last and phase.steps is not None and start is not None and start + phase.steps < max_steps:
            raise ConfigError(
                f"{key}.steps={phase.steps} ends at step {start + phase.steps} < trainer.max_steps={max_steps}: "
                f"the last phase runs to the end of the fit (set it to null)"
            )
        exact = exact and phase.monitor is None
        start = None if start is None or phase.steps is None else start + phase.steps
