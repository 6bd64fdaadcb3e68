"""Reproduction (layer 9): the analysis of `experiment=reproduce_recheck` (and `reproduce_toy`), apart from the
library.

Owns the report of the paper's findings from a sweep's logs (`report`), its text and figures (`text`,
`plots`), the speed, switch-sweep and power-against-the-paper tables (`operating_point`), the intervals
(`stats`), the slip analysis of the toy worlds (`repairs`), the base-policy gate (`base_profile`) and the
real-model probe of mechanism (b) (`probe`, `experiments/probe_smollm2.py`). Nothing in the library imports
it. May import: every other subpackage.
"""

from lightning_prerl import _moved


def __getattr__(name: str):  # names of the 0.1 module `lightning_prerl.reproduction`, now `.report`
    return _moved.forward_old_names(__name__, name)
