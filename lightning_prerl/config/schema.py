"""The config schema: every key's type and allowed range, declared once, checked before any compute.

`validate(cfg)` checks the whole resolved Hydra config against these pydantic models, then the
contradictions between keys, and raises `ConfigError` with one line naming the key, the value and
what is allowed (e.g. `objective.main.eps_high=1.5: must be < 1`). Nodes allow extra keys
(`_target_`, `_partial_`, options of other components): Hydra already rejects unknown override keys,
this checks the values of the known ones.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError

PosInt = Annotated[int, Field(ge=1)]
NonNegInt = Annotated[int, Field(ge=0)]
NonNeg = Annotated[float, Field(ge=0)]
Positive = Annotated[float, Field(gt=0)]
Probability = Annotated[float, Field(gt=0, le=1)]
ClipRange = Annotated[float, Field(ge=0, lt=1)]
Beta = Annotated[float, Field(ge=0, lt=1)]
Dtype = Literal["float32", "bfloat16", "float16"]


class ConfigError(ValueError):
    """A composed config that cannot run."""


class _Node(BaseModel):
    model_config = ConfigDict(extra="allow")


class Objective(_Node):
    name: str
    space: Literal["conditional", "marginal"]
    advantage: Literal["grpo", "group_mean", "signed"]
    samples: Literal["all", "negative", "positive"]
    positive_weight: NonNeg
    coef: NonNeg
    eps_low: ClipRange
    eps_high: ClipRange
    clip_c: Annotated[float, Field(gt=1)] | None
    kl_coef: NonNeg
    kl_estimator: Literal["k1", "k2", "k3"]
    entropy_coef: NonNeg
    adv_eps: Positive
    adv_tolerance: NonNeg = 1e-6
    lr_scale: Positive | None


class DSRL(_Node):
    warmup: Objective
    main: Objective
    switch_step: NonNegInt | None
    reset_reference: bool
    reset_optimizer: bool
    monitor: str | None
    mode: Literal["max", "min"]
    patience: PosInt
    min_delta: NonNeg
    min_warmup_steps: NonNegInt
    nsr_weight: Positive | None = None
    nsr_loss_coef: NonNeg | None = None


class Lora(_Node):
    r: NonNegInt = 0
    alpha: Positive = 16.0
    dropout: Annotated[float, Field(ge=0, lt=1)] = 0.0
    target_modules: str | Annotated[list[str], Field(min_length=1)] = "all-linear"


class Model(_Node):
    path: str
    dtype: Dtype
    param_dtype: Dtype
    activation_checkpointing: bool
    stop_token_ids: list[NonNegInt]
    gguf_file: str | None
    start_token: str | None
    lora: Lora = Lora()


class RolloutCorrection(_Node):
    tis: Literal["token", "sequence"] | None = None
    tis_cap: Annotated[float, Field(ge=1)] = 2.0
    mask: Literal["token", "sequence"] | None = None
    mask_low: Annotated[float, Field(ge=0, lt=1)] = 0.5
    mask_high: Annotated[float, Field(gt=1)] = 2.0
    prerl: bool = False


class Module(_Node):
    dtype: Dtype
    param_dtype: Dtype
    activation_checkpointing: bool
    lr: Positive
    betas: tuple[Beta, Beta]
    weight_decay: NonNeg
    warmup_steps: NonNegInt
    max_grad_norm: Positive | None
    max_bad_steps: PosInt
    micro_batch_size: PosInt | None
    micro_batch_tokens: PosInt | None
    logprob_chunk_tokens: PosInt | None
    skip_zero_advantage: bool = True
    share_prompts: bool = True
    temperature: Positive
    ppo_epochs: PosInt = 1
    mini_batches: PosInt = 1
    rollout_correction: RolloutCorrection = RolloutCorrection()
    pass_k: Annotated[list[PosInt], Field(min_length=1)]


class Sampling(_Node):
    temperature: NonNeg
    top_p: Probability
    top_k: PosInt | None
    max_new_tokens: PosInt
    seed: int | None = None


class Data(_Node):
    prompts_per_step: PosInt
    samples_per_prompt: PosInt
    sampling: Sampling
    eval_sampling: Sampling | None = None
    eval_samples: PosInt
    eval_prompts_per_batch: PosInt
    reward_timeout_s: Positive | None
    reward_workers: PosInt | None = None
    max_prompt_tokens: PosInt | None
    shuffle_seed: int | None
    seed: int
    overlong: Literal["keep", "mask", "penalty"] = "keep"
    overlong_buffer: PosInt | None = None
    overlong_factor: NonNeg = 1.0
    dynamic_sampling: bool = False
    max_extra_rounds: NonNegInt = 4


class Rollout(_Node):
    max_batch_sequences: PosInt | None = None
    max_model_len: PosInt | None = None
    gpu_memory_utilization: Probability | None = None
    kv_cache_gib: PosInt | None = None
    dtype: Literal["float32", "bfloat16", "float16", "auto"] | None = None
    return_logprobs: bool = False


class Trainer(_Node):
    max_steps: PosInt
    check_val_every_n_epoch: PosInt | None
    devices: PosInt | Literal["auto"]
    num_nodes: PosInt = 1


class Eval(_Node):
    """`experiments/evaluate.py`'s keys."""

    benchmarks: Annotated[list[str], Field(min_length=1)]
    samples: PosInt
    limit: PosInt | None
    temperature: NonNeg | None
    policies: Annotated[list[str], Field(min_length=1)] | None


class Behavior(_Node):
    """Behaviour keyword families (conf/behavior/*.yaml): case-insensitive regular expressions."""

    transition: Annotated[list[str], Field(min_length=1)]
    reflection: Annotated[list[str], Field(min_length=1)]


def _objective_kind(value: Any) -> str:
    return "dsrl" if isinstance(value, dict) and "warmup" in value else "single"


class RunConfig(_Node):
    seed: int
    threads: PosInt | None
    eval_before_training: bool
    ckpt_path: str | None
    objective: Annotated[
        Annotated[Objective, Tag("single")] | Annotated[DSRL, Tag("dsrl")], Discriminator(_objective_kind)
    ]
    model: Model
    module: Module
    data: Data
    rollout: Rollout
    trainer: Trainer
    eval: Eval | None = None
    behavior: Behavior | None = None


def _allowed(error: dict) -> str:
    """What is allowed, in the words of the key's declaration."""
    ctx, kind = error.get("ctx", {}), error["type"]
    bounds = {"greater_than_equal": ">=", "greater_than": ">", "less_than_equal": "<=", "less_than": "<"}
    if kind in bounds:
        return f"must be {bounds[kind]} {next(iter(ctx.values()))}"
    if kind == "literal_error":
        return f"expected one of {ctx.get('expected', '').replace(' or ', ', ')}"
    if kind in ("missing",):
        return "is required"
    if kind == "too_short":
        return "must not be empty"
    return error["msg"][0].lower() + error["msg"][1:]


def _first_error(exc: ValidationError) -> str:
    error = exc.errors()[0]
    # drop the names pydantic gives union members ("dsrl", "constrained-int", "literal['auto']")
    loc = [str(p) for p in error["loc"] if p not in ("single", "dsrl") and (str(p).isidentifier() or str(p).isdigit())]
    while loc and loc[-1].isdigit() and error["type"] not in ("missing",):  # list items: name the list
        loc.pop()
    key = ".".join(loc)
    value = error.get("input")
    shown = "<missing>" if error["type"] == "missing" else repr(value) if isinstance(value, str) else value
    return f"{key}={shown}: {_allowed(error)}"


def validate_schema(config: dict) -> RunConfig:
    """The resolved config as typed models; raises ConfigError on the first bad value."""
    try:
        return RunConfig.model_validate(config)
    except ValidationError as exc:
        raise ConfigError(_first_error(exc)) from None
