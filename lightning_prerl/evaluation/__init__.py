"""Evaluation (layer 2): how samples are scored into numbers, with no model and no engine.

Owns the torchmetrics (accuracy, unbiased pass@k, maj@k, length, format validity, transition and
reflection thoughts: `metrics`), the benchmark evaluator's arithmetic and output files (`scoring`) and
the pass@k-curve callback (`passk`). May import: `objectives`.
"""

from lightning_prerl import _moved


def __getattr__(name: str):  # names of the 0.1 module `lightning_prerl.evaluation`, now `.scoring`
    return _moved.forward_old_names(__name__, name)
