"""lightning-prerl: RL with verifiable rewards in the conditional (log P(y|x)) and pre-train (log P(y)) spaces.

Entry points: `experiments/run.py` (train), `experiments/evaluate.py` (avg@k / pass@k),
`experiments/report.py` (sweep report), `experiments/prepare_data.py` (the paper's data sets),
`experiments/pretrain_toy.py` (rebuild the shipped toy policies), `experiments/replay.py` (train
from a run's rollout record).

Subpackages, in layers along the data path; a module imports only from its own layer and lower ones
(`LAYERS`, checked by tests/test_layout.py)::

    objectives    1  the losses as pure tensor math: PPO clip, KL, advantages, PreRL/NSR/PSR, TIS
    evaluation    2  scoring samples: torchmetrics, pass@k / avg@k, the evaluator's files
    data          3  rollout batch, rewards, prompt sets, toy world, benchmarks, batch shaping
    scale         4  model loading, FSDP2 / DeepSpeed ZeRO / LoRA
    rollout       5  engines: transformers (live policy), vLLM (colocated)
    training      6  RolloutDataModule, the update, the LightningModules, DSRL switch, checkpoints
    reports       7  callbacks, logs, PNG reports, summary, sweeps, the gradient-alignment diagnostic
    config        8  schema, checks before compute, config -> live objects
    reproduction  9  the toy-world reproduction analysis (nothing imports it)

Python API, importable from the package itself (the docs' "Python API" page trains DSRL with a plain
`lightning.Trainer`)::

    from lightning_prerl import CondRL, PreRL, NSRPreRL, PSRPreRL, DSRLSwitch, RolloutDataModule
    from lightning_prerl import PhaseSchedule, Phase
    from lightning_prerl import PolicyGradientObjective, HFEngine, VLLMEngine, BoxedExactMatch, MathVerifyReward

The names are imported on first use (PEP 562): reward worker processes import this package and
must start fast, so importing it loads neither torch nor Lightning. Module paths of the flat 0.1
layout (`lightning_prerl.policy`, ...) still import, with one FutureWarning (`_moved`).
"""

from __future__ import annotations

import importlib

from lightning_prerl import _moved

__version__ = "0.1.0"
LAYERS = ("objectives", "evaluation", "data", "scale", "rollout", "training", "reports", "config", "reproduction")
_moved.install()

_API = {
    "PolicyModule": "lightning_prerl.training.policy",
    "CondRL": "lightning_prerl.training.policy",
    "PreRL": "lightning_prerl.training.policy",
    "NSRPreRL": "lightning_prerl.training.policy",
    "PSRPreRL": "lightning_prerl.training.policy",
    "DSRLSwitch": "lightning_prerl.training.dsrl",
    "PhaseSchedule": "lightning_prerl.training.dsrl",
    "Phase": "lightning_prerl.training.dsrl",
    "RolloutDataModule": "lightning_prerl.training.datamodule",
    "RolloutBatch": "lightning_prerl.data.batch",
    "PolicyGradientObjective": "lightning_prerl.objectives",
    "RolloutCorrection": "lightning_prerl.objectives.correction",
    "HFEngine": "lightning_prerl.rollout.hf",
    "VLLMEngine": "lightning_prerl.rollout.vllm",
    "SamplingConfig": "lightning_prerl.rollout.engine",
    "Prompt": "lightning_prerl.data.rewards",
    "BoxedExactMatch": "lightning_prerl.data.rewards",
    "MathVerifyReward": "lightning_prerl.data.rewards",
    "toy_prompts": "lightning_prerl.data.prompts",
    "load_prompts": "lightning_prerl.data.prompts",
}
__all__ = sorted(_API)


def __getattr__(name: str):
    if name not in _API:
        raise AttributeError(f"module 'lightning_prerl' has no attribute {name!r}")
    value = getattr(importlib.import_module(_API[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_API])
