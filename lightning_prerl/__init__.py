"""lightning-prerl: RL with verifiable rewards in the conditional (log P(y|x)) and pre-train (log P(y)) spaces.

Entry points: `experiments/run.py` (train), `experiments/evaluate.py` (avg@k / pass@k),
`experiments/pretrain_toy.py` (rebuild the shipped toy policy). Python API: `policy.CondRL`, `policy.PreRL`,
`policy.NSRPreRL`, `policy.PSRPreRL`, `datamodule.RolloutDataModule`, `dsrl.DSRLSwitch`.

Kept import-free on purpose: reward worker processes import this package and must start fast.
"""

__version__ = "0.1.0"
