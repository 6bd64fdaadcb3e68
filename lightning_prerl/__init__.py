"""lightning-prerl: RL with verifiable rewards in the conditional (log P(y|x)) and pre-train (log P(y)) spaces.

Entry points: `experiments/run.py` (train), `experiments/evaluate.py` (avg@k / pass@k),
`experiments/report.py` (sweep report), `experiments/pretrain_toy.py` (rebuild the shipped toy policy).

Python API, importable from the package itself (README "Python API" trains DSRL with a plain
`lightning.Trainer`)::

    from lightning_prerl import CondRL, PreRL, NSRPreRL, PSRPreRL, DSRLSwitch, RolloutDataModule
    from lightning_prerl import PolicyGradientObjective, HFEngine, VLLMEngine, BoxedExactMatch, MathVerifyReward

The names are imported on first use (PEP 562): reward worker processes import this package and
must start fast, so importing it loads neither torch nor Lightning.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_API = {
    "PolicyModule": "lightning_prerl.policy",
    "CondRL": "lightning_prerl.policy",
    "PreRL": "lightning_prerl.policy",
    "NSRPreRL": "lightning_prerl.policy",
    "PSRPreRL": "lightning_prerl.policy",
    "DSRLSwitch": "lightning_prerl.dsrl",
    "RolloutDataModule": "lightning_prerl.datamodule",
    "RolloutBatch": "lightning_prerl.batch",
    "PolicyGradientObjective": "lightning_prerl.objectives",
    "RolloutCorrection": "lightning_prerl.correction",
    "HFEngine": "lightning_prerl.rollout.hf",
    "VLLMEngine": "lightning_prerl.rollout.vllm",
    "SamplingConfig": "lightning_prerl.rollout.engine",
    "Prompt": "lightning_prerl.rewards",
    "BoxedExactMatch": "lightning_prerl.rewards",
    "MathVerifyReward": "lightning_prerl.rewards",
    "toy_prompts": "lightning_prerl.prompts",
    "load_prompts": "lightning_prerl.prompts",
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
