"""Config (layer 8): from a Hydra config to live objects, with every check before any compute.

Owns the schema of every key (`schema`), the checks across keys and of the command line (`checks`)
and the composition of a run (`compose`: config -> trainer, module, data, callbacks; `replay`: a
recorded run's config checked against its rollout record), which the entry points in `experiments/`
call. May import: every lower layer (`objectives` ... `reports`).
"""

from lightning_prerl import _moved


def __getattr__(name: str):  # names of the 0.1 module `lightning_prerl.config`, now `.checks`
    return _moved.forward_old_names(__name__, name)
