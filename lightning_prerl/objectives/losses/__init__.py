"""Policy losses, one file each, registered with `@register_loss(name)` (`objectives/registry.py`).

Every module of this package is imported here, so a new file is a new `objective.policy_loss` without
an edit anywhere else. A loss maps `LossInputs` (log-probs, old log-probs, advantages, loss mask) to a
per-token loss (N, T) and the tokens its clip binds on; the aggregation, the coefficient, the KL and
entropy terms and the rollout-correction weights are the objective's, not the loss's.
"""

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
