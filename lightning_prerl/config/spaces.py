"""The conditioning spaces a config scores in, and their checks (`objectives/spaces.py`).

A run scores responses in each objective's space (every phase of a schedule) and, with
`diagnostics=alignment`, in both spaces of each `callbacks.alignment.pairs` entry. `compose` hands the
prompt parts those spaces read to the data module (`configured_spaces`); `check_spaces` refuses, in one
line and before anything is loaded, a pair that is not two registered spaces with valid parameters and
a `fixed` space with no `data.fixed_context`.
"""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from lightning_prerl.errors import ConfigError
from lightning_prerl.objectives import registry


def _pairs(cfg: DictConfig) -> list:
    alignment = (cfg.get("callbacks") or {}).get("alignment")
    pairs = alignment.get("pairs") if alignment else None
    return OmegaConf.to_container(pairs, resolve=True) if pairs else []


def configured_spaces(cfg: DictConfig) -> list[dict]:
    """Every space the run scores in, as `{space: name, space_args: {...}}`: each node of `objective`
    with a `space` (so every phase of a schedule) and each space of the alignment pairs."""
    found, nodes = [], [OmegaConf.to_container(cfg.objective, resolve=True)]
    while nodes:
        node = nodes.pop()
        if isinstance(node, dict):
            if isinstance(node.get("space"), str):
                found.append({"space": node["space"], "space_args": node.get("space_args") or {}})
            nodes.extend(node.values())
        elif isinstance(node, list):
            nodes.extend(node)
    for pair in _pairs(cfg):
        found.extend(space if isinstance(space, dict) else {"space": space} for space in pair)
    return found


def check_spaces(cfg: DictConfig) -> None:
    """ConfigError (one line) for an alignment pair that is not two registered spaces (a name, or
    `{space: name, space_args: {...}}`) with the parameters they take, or a `fixed` space without
    `data.fixed_context` (an empty text fails when it is tokenised)."""
    for pair in _pairs(cfg):
        if not isinstance(pair, list) or len(pair) != 2:
            raise ConfigError(f"callbacks.alignment.pairs={pair}: expected a pair of spaces, e.g. [marginal, question]")
        for space in pair:
            spec = space if isinstance(space, dict) else {"space": space}
            name, args = spec.get("space"), spec.get("space_args") or {}
            if name not in registry.names("space"):
                raise ConfigError(
                    f"callbacks.alignment.pairs={pair}: space {name!r}: expected one of {registry.names('space')}"
                )
            if error := registry.args_error("space", name, args):
                raise ConfigError(f"callbacks.alignment.pairs={pair}: {error}")
    fixed = any(spec["space"] == "fixed" for spec in configured_spaces(cfg))
    if fixed and cfg.data.get("fixed_context") is None:
        raise ConfigError("data.fixed_context=null: the fixed space needs the text that replaces every prompt")
