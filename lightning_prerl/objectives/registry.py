"""The objective's replaceable parts, registered by name: advantage estimators, policy losses, aggregations
and the conditioning space (what a response is scored after: `objectives/spaces.py`).

A YAML names each part (`advantage: grpo`, `policy_loss: gspo`, `aggregation: seq-mean-token-mean`) and
sets its own parameters (`advantage_args`, `loss_args`, `aggregation_args`); `PolicyGradientObjective`
binds them once (`bind`), so a misspelt name or parameter fails before any compute. Adding a loss is one
file in `objectives/losses/` (every module there is imported, so its decorator runs) plus a YAML:

    @register_loss("my_loss")
    def my_loss(x: LossInputs, eps_high: float, beta: float = 1.0) -> LossOutput: ...

Parameters are filled by name: the objective's shared fields (`SHARED`: the PPO clip range of every
clipped loss, the GRPO epsilon and the signed estimator's weight) when the function names them, then
the `*_args` dict, whose keys must be parameters of the part and not shared fields.

Shape letters: B prompts, G samples per prompt, N = B * G samples, T response tokens.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch

KINDS = ("advantage", "policy_loss", "aggregation", "space")
SHARED = {
    "advantage": ("adv_eps", "positive_weight"),
    "policy_loss": ("eps_low", "eps_high", "clip_c"),
    "aggregation": (),
    "space": (),
}
ARGS_KEY = {
    "advantage": "advantage_args",
    "policy_loss": "loss_args",
    "aggregation": "aggregation_args",
    "space": "space_args",
}


@dataclass(frozen=True)
class LossInputs:
    """What every policy loss receives, in the objective's space (conditional or prompt-free).

    Attributes:
        logp: (N, T) log-probs under the policy being updated (differentiable).
        old_logp: (N, T) log-probs under the policy that produced the rollouts (detached).
        adv: (N,) sequence-level advantages.
        mask: (N, T) float loss mask: the response tokens of kept samples (sequence-level ratios use it).
    """

    logp: torch.Tensor
    old_logp: torch.Tensor
    adv: torch.Tensor
    mask: torch.Tensor


@dataclass(frozen=True)
class LossOutput:
    """A policy loss's result: loss (N, T) per token before masking and aggregation, and clipped (N, T)
    bool, the tokens whose clip (or selection) binds, logged as `train/clip_fraction`."""

    loss: torch.Tensor
    clipped: torch.Tensor


@dataclass(frozen=True)
class Registered:
    """One registered part: its function (or class), its keyword parameters, and for an advantage
    estimator whether it is measured against the group (a flat group then gets A = 0 exactly)."""

    fn: Callable
    params: tuple[str, ...]
    group_relative: bool = False


_REGISTRY: dict[str, dict[str, Registered]] = {kind: {} for kind in KINDS}


def _register(kind: str, name: str, group_relative: bool = False) -> Callable:
    def decorate(fn: Callable) -> Callable:
        if name in _REGISTRY[kind]:
            raise ValueError(f"{kind} {name!r} is registered twice")
        params = tuple(inspect.signature(fn).parameters)
        params = params if inspect.isclass(fn) else params[1:]  # a function's first argument is its input
        _REGISTRY[kind][name] = Registered(fn, params, group_relative)
        return fn

    return decorate


def register_advantage(name: str, group_relative: bool = False) -> Callable:
    """Register `fn(rewards (B, G), **params) -> advantages (B, G)` as estimator `name`."""
    return _register("advantage", name, group_relative)


def register_loss(name: str) -> Callable:
    """Register `fn(x: LossInputs, **params) -> LossOutput` as policy loss `name`."""
    return _register("policy_loss", name)


def register_aggregation(name: str) -> Callable:
    """Register a class with `weights(mask (N, T)) -> (N, T)` and `count(mask (N, T), rows (N,)) -> ()`
    as aggregation `name` (see `objectives/aggregation.py` for the contract)."""
    return _register("aggregation", name)


def register_space(name: str) -> Callable:
    """Register a class whose instances map `(parts, start_token_id)` to the left-padded context
    (ids (N, C), mask (N, C)) that replaces the prompt when a response is scored, as space `name`
    (see `objectives/spaces.py` for the contract)."""
    return _register("space", name)


def names(kind: str) -> list[str]:
    """Registered names of one kind, sorted."""
    return sorted(_REGISTRY[kind])


def lookup(kind: str, name: str) -> Registered:
    """The registered part; ValueError naming the key, the value and the registered names."""
    if name not in _REGISTRY[kind]:
        raise ValueError(f"objective.{kind}={name!r}: expected one of {names(kind)}")
    return _REGISTRY[kind][name]


def args_error(kind: str, name: str, args: dict) -> str | None:
    """`key=value: why` for the first `*_args` key the part does not take (or that is a shared field),
    then for a required parameter left out, then (a class part) for what its constructor refuses."""
    entry = lookup(kind, name)
    own = [p for p in entry.params if p not in SHARED[kind]]
    for key, value in args.items():
        if key in SHARED[kind]:
            return f"{key}={value!r}: set objective.{key} instead"
        if key not in own:
            return f"{key}={value!r}: {kind} {name!r} takes " + (f"one of {own}" if own else "none")
    signature = inspect.signature(entry.fn).parameters
    for key in own:
        if key not in args and signature[key].default is inspect.Parameter.empty:
            return f"{key}=<missing>: {kind} {name!r} requires it"
    if kind == "space":  # a space checks its parameters when built (`objectives/spaces.py`)
        try:
            entry.fn(**args)
        except ValueError as exc:
            return str(exc)
    return None


def check_args(kind: str, name: str, args: dict) -> None:
    """ValueError naming the key, the value and the parameters the part takes."""
    error = args_error(kind, name, args)
    if error:
        raise ValueError(f"objective.{ARGS_KEY[kind]}.{error}")


def bind(kind: str, name: str, shared: dict, args: dict) -> Callable:
    """The part with its parameters filled: shared fields it names, then `args` (checked)."""
    check_args(kind, name, args)
    entry = lookup(kind, name)
    kwargs = {k: v for k, v in shared.items() if k in entry.params} | dict(args)
    return entry.fn(**kwargs) if inspect.isclass(entry.fn) else partial(entry.fn, **kwargs)
