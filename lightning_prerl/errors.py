"""The errors a user fixes in the config: raised in any layer, printed by the entry points as one line.

Most config mistakes are found before any compute (`config.checks`); a few only once the model is
loaded inside `Trainer.fit` (LoRA target modules that the model does not have). Both raise
`ConfigError`, whose message starts with the key the user typed and its value; `experiments/run.py`
and `experiments/evaluate.py` print it as `config error: ...` and exit without a traceback. This module
imports nothing of the package, so every layer may raise it.
"""


class ConfigError(ValueError):
    """A composed config that cannot run."""


class RunFault(RuntimeError):
    """A fault the run cannot recover from (e.g. out of memory after every retry): its message is the
    one line the entry points print before exiting; the last complete checkpoint stays usable."""
