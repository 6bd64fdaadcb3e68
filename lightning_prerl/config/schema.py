"""The config schema: every key's type and allowed range, declared once, checked before any compute.

`validate(cfg)` checks the whole resolved Hydra config against these pydantic models, then the
contradictions between keys, and raises `ConfigError` with one line naming the key, the value and
what is allowed (e.g. `objective.main.eps_high=1.5: must be < 1`). Nodes allow extra keys
(`_target_`, `_partial_`, options of other components): Hydra already rejects unknown override keys,
this checks the values of the known ones. Each key's one-line meaning is its attribute docstring: the
docs' configuration reference is generated from this file (docs/hooks/config_reference.py).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    ValidationInfo,
    field_validator,
)
from pydantic_core import PydanticCustomError

from lightning_prerl.config.async_rollout import AsyncRollout
from lightning_prerl.config.phases import Schedule
from lightning_prerl.errors import ConfigError
from lightning_prerl.objectives import registry

PosInt = Annotated[int, Field(ge=1)]
NonNegInt = Annotated[int, Field(ge=0)]
NonNeg = Annotated[float, Field(ge=0)]
Positive = Annotated[float, Field(gt=0)]
Probability = Annotated[float, Field(gt=0, le=1)]
ClipRange = Annotated[float, Field(ge=0, lt=1)]
Beta = Annotated[float, Field(ge=0, lt=1)]
Dtype = Literal["float32", "bfloat16", "float16"]


def _registered(kind: str) -> AfterValidator:
    """A name registered as `kind` (`objectives/registry.py`): the error lists the registered names."""

    def check(value: str) -> str:
        if value not in registry.names(kind):
            names = ", ".join(repr(n) for n in registry.names(kind))
            raise PydanticCustomError("registered", "expected one of {names}", {"names": names})
        return value

    return AfterValidator(check)


class _Node(BaseModel):
    # attribute docstrings are the keys' one-line meanings: docs/hooks/config_reference.py prints them
    model_config = ConfigDict(extra="allow", use_attribute_docstrings=True)


class Objective(_Node):
    """One policy-gradient objective (`conf/objective/*.yaml`; DSRL's `warmup` and `main`)."""

    name: str
    """Label in logs, reports and checkpoints."""
    space: Annotated[str, _registered("space")]
    """Context a response is scored after (`objectives/spaces.py`): conditional (the prompt, log P(y|x)), marginal
    (the start token, log P(y)), system, question, fixed (`data.fixed_context`) or last_k (`space_args.k`)."""
    advantage: Annotated[str, _registered("advantage")]
    """Registered estimator: grpo (r - mean)/(std + adv_eps), group_mean r - mean, signed -1 / +positive_weight."""
    samples: Literal["all", "negative", "positive"]
    """Samples that enter the loss, by the sign of their advantage."""
    positive_weight: NonNeg
    """lambda of the `signed` estimator: the advantage of a right answer (W-REINFORCE: 0.1)."""
    coef: NonNeg
    """Loss multiplier (PreRL family: 0.01, the authors' `pretrain_loss_coef`)."""
    eps_low: ClipRange
    """PPO ratio clip: lower bound 1 - eps_low."""
    eps_high: ClipRange
    """PPO ratio clip: upper bound 1 + eps_high (the paper's GRPO baseline: 0.28, clip-higher)."""
    clip_c: Annotated[float, Field(gt=1)] | None
    """Dual-clip bound c on the loss of negative-advantage tokens; null: off."""
    kl_coef: NonNeg
    """Weight of the KL-to-reference term; 0: no reference model is loaded."""
    kl_estimator: Literal["k1", "k2", "k3"]
    """KL estimator of the KL term."""
    entropy_coef: NonNeg
    """Weight of the entropy bonus; 0: off."""
    adv_eps: Positive
    """Epsilon of GRPO's std normalisation."""
    adv_tolerance: NonNeg = 1e-6
    """|A| at most this counts as 0: flat groups get A = 0, never 'negative' by rounding."""
    lr_scale: Positive | None
    """Learning-rate multiplier while active; null: 1.0 in the conditional space, else 0.1 (the prompt-free rule)."""
    policy_loss: Annotated[str, _registered("policy_loss")] = "ppo_clip"
    """Registered per-token loss (`objectives/losses/`): ppo_clip, gspo, cispo, sapo, clip_cov, kl_cov, ..."""
    aggregation: Annotated[str, _registered("aggregation")] = "token-mean"
    """token-mean, seq-mean-token-sum, seq-mean-token-mean or constant (Dr.GRPO), over the global batch."""
    advantage_args: dict[str, Any] = {}
    """Parameters of the estimator beyond the shared `adv_eps` and `positive_weight`."""
    loss_args: dict[str, Any] = {}
    """Parameters of the policy loss beyond the shared `eps_low`, `eps_high` and `clip_c`."""
    aggregation_args: dict[str, Any] = {}
    """Parameters of the aggregation (constant: `length`, the response budget)."""
    space_args: dict[str, Any] = Field(default={}, validate_default=True)
    """Parameters of the space (last_k: `k`, the prompt tokens kept)."""

    @field_validator("advantage_args", "loss_args", "aggregation_args", "space_args")
    @classmethod
    def _part_args(cls, args: dict, info: ValidationInfo) -> dict:
        kind = {v: k for k, v in registry.ARGS_KEY.items()}[info.field_name]
        name = info.data.get(kind)  # absent when the name itself failed: that error is the one reported
        if name is not None and (error := registry.args_error(kind, name, args)):
            raise PydanticCustomError("registered", error)
        return args


class DSRL(_Node):
    """`objective=dsrl`: NSR-PreRL warm-up, then GRPO, in one `Trainer.fit`."""

    warmup: Objective
    """Objective of the first phase (NSR-PreRL)."""
    main: Objective
    """Objective after the switch (GRPO)."""
    switch_step: NonNegInt | None
    """Warm-up optimizer steps (default: the paper's 5.5 % of `max_steps`); null: switch on `monitor` only."""
    reset_reference: bool
    """Reset the reference model to the policy at the switch (matters with KL on only)."""
    reset_optimizer: bool
    """Clear AdamW's moments at the switch (the paper keeps them)."""
    monitor: str | None
    """Metric whose plateau triggers the switch (e.g. `val/accuracy`); null: step trigger only."""
    mode: Literal["max", "min"]
    """Which direction of `monitor` counts as an improvement."""
    patience: PosInt
    """Observations of `monitor` without improvement before the switch."""
    min_delta: NonNeg
    """Smallest change of `monitor` that counts as an improvement."""
    min_warmup_steps: NonNegInt
    """Never switch on the metric before this many steps."""
    nsr_weight: Positive | None = None
    """The NSR weight: the warm-up's learning-rate multiplier (`warmup.lr_scale`)."""
    nsr_loss_coef: NonNeg | None = None
    """The warm-up's loss multiplier (`warmup.coef`, the authors' 0.01); Adam mostly normalises it away."""


class Lora(_Node):
    """LoRA adapters through peft."""

    r: NonNegInt = 0
    """Adapter rank; 0: no adapters, every weight trains."""
    alpha: Positive = 16.0
    """LoRA alpha: the adapters' update is scaled by alpha / r."""
    dropout: Annotated[float, Field(ge=0, lt=1)] = 0.0
    """Dropout on the adapters' input."""
    target_modules: str | Annotated[list[str], Field(min_length=1)] = "all-linear"
    """Modules that get adapters: `all-linear` (every linear layer but the output head) or a list of names."""


class Model(_Node):
    """The policy (`conf/model/*.yaml`)."""

    path: str
    """`toy`, `toy-thoughts`, `toy-recheck` (shipped policies) or a local Hugging Face directory; nothing is
    downloaded."""
    dtype: Dtype
    """Compute dtype of forward and backward (bfloat16: bf16 compute over `param_dtype` weights)."""
    param_dtype: Dtype
    """Dtype of the parameters and AdamW state (master weights); lower than float32 only on purpose."""
    activation_checkpointing: bool
    """Recompute each transformer block in backward (long responses)."""
    stop_token_ids: list[NonNegInt]
    """Extra token ids that end a completion (the tokenizer's EOS and generation_config's always do)."""
    gguf_file: str | None
    """A GGUF file inside `path` to load instead of safetensors."""
    start_token: str | None
    """Token replacing the prompt in prompt-free scoring; null: BOS, else the chat template's first special one."""
    lora: Lora = Lora()
    """LoRA adapters."""


class RolloutCorrection(_Node):
    """Correction of the rollout-vs-trainer mismatch (needs the engine's log-probs)."""

    tis: Literal["token", "sequence"] | None = None
    """Truncated importance sampling of the policy-gradient term, per token or per sequence; null: off."""
    tis_cap: Annotated[float, Field(ge=1)] = 2.0
    """C of TIS: weights min(ratio, C)."""
    mask: Literal["token", "sequence"] | None = None
    """Drop tokens (or whole sequences) whose ratio leaves [mask_low, mask_high]; null: off."""
    mask_low: Annotated[float, Field(ge=0, lt=1)] = 0.5
    """Lower bound of the kept ratios."""
    mask_high: Annotated[float, Field(gt=1)] = 2.0
    """Upper bound of the kept ratios."""
    prerl: bool = False
    """Also correct the prompt-free losses (the authors do not; costs a conditional pass)."""


class Module(_Node):
    """The LightningModule `PolicyModule`: optimizer, update and held-out metrics."""

    dtype: Dtype
    """Compute dtype (from `model.dtype`)."""
    param_dtype: Dtype
    """Parameter and optimizer-state dtype (from `model.param_dtype`)."""
    activation_checkpointing: bool
    """From `model.activation_checkpointing`."""
    lr: Positive
    """AdamW learning rate (times the active objective's `lr_scale`)."""
    betas: tuple[Beta, Beta]
    """AdamW betas."""
    weight_decay: NonNeg
    """AdamW weight decay."""
    warmup_steps: NonNegInt
    """Linear learning-rate warm-up in optimizer steps, then constant."""
    max_grad_norm: Positive | None
    """Clip gradients by their global norm; null: off."""
    max_bad_steps: PosInt
    """Non-finite steps are skipped and counted; this many in a row stop the run."""
    oom_retries: NonNegInt = 3
    """Out of memory in a micro-batch: the pass reruns with half its tokens as budget, this many times in a row."""
    micro_batch_size: PosInt | None
    """Rows per forward/backward; null: no row limit."""
    micro_batch_tokens: PosInt | None
    """Padded tokens per forward/backward, rows of similar length together (verl's dynamic batch size); null: off."""
    logprob_chunk_tokens: PosInt | None
    """Token rows per output-head chunk; null: as many as fit 512 MiB of float32 logits."""
    skip_zero_advantage: bool = True
    """Do not forward A = 0 samples when there is no KL or entropy term (same gradient)."""
    share_prompts: bool = True
    """The samples of a prompt in one pass forward the prompt once (same log-probs)."""
    temperature: Positive
    """Logits temperature of the training log-probs (from `data.sampling.temperature`)."""
    ppo_epochs: PosInt = 1
    """Passes over each rollout batch (verl ppo_epochs, TRL num_iterations)."""
    mini_batches: PosInt = 1
    """Optimizer steps per pass; steps, `max_steps` and `switch_step` count optimizer steps."""
    rollout_correction: RolloutCorrection = RolloutCorrection()
    """TIS / masking of the rollout-vs-trainer mismatch."""
    pass_k: Annotated[list[PosInt], Field(min_length=1)]
    """k values of the held-out pass@k."""


class Sampling(_Node):
    """How completions are sampled (`data.sampling`, `data.eval_sampling`)."""

    temperature: NonNeg
    """Sampling temperature; 0: greedy."""
    top_p: Probability
    """Nucleus mass; 1.0: off (anything else needs `rollout=vllm` with a rollout correction)."""
    top_k: PosInt | None
    """Keep the k most likely tokens; null: off (true temperature sampling)."""
    max_new_tokens: PosInt
    """Completion budget; a completion that hits it is truncated (`rollout/truncated`)."""
    seed: int | None = None
    """Base of the per-prompt sampling seeds; null: `data.seed`."""


class Data(_Node):
    """Prompts, rewards and rollout shape (`conf/data/*.yaml`, the data module)."""

    prompts_per_step: PosInt
    """B: prompts per rollout batch, global over all ranks (must divide by the world size)."""
    samples_per_prompt: PosInt
    """G: samples per prompt (the group of the group-relative advantage)."""
    sampling: Sampling
    """Training sampling."""
    eval_sampling: Sampling | None = None
    """Held-out sampling; null: the training sampling."""
    eval_samples: PosInt
    """k samples per held-out problem (avg@k, pass@k)."""
    eval_prompts_per_batch: PosInt
    """Held-out problems generated per validation batch."""
    reward_timeout_s: Positive | None
    """Per-completion reward limit, in a process pool (a hung one is killed and scores 0); null: in-process."""
    reward_workers: PosInt | None = None
    """Reward processes with `reward_timeout_s`; null: this rank's share of the cores."""
    max_prompt_tokens: PosInt | None
    """Longer prompts are dropped at load time and counted; null: no limit."""
    shuffle_seed: int | None
    """Seed of the training prompt order; null: file order."""
    seed: int
    """Base of the per-prompt sampling seeds."""
    overlong: Literal["keep", "mask", "penalty"] = "keep"
    """Truncated training samples: keep, mask (never in a loss) or penalty (DAPO's soft punishment)."""
    overlong_buffer: PosInt | None = None
    """Penalty: tokens before `sampling.max_new_tokens` where it ramps from 0 to -`overlong_factor`."""
    overlong_factor: NonNeg = 1.0
    """Penalty at `sampling.max_new_tokens`."""
    dynamic_sampling: bool = False
    """Drop groups whose rewards are all equal and generate extra prompts instead (DAPO)."""
    max_extra_rounds: NonNegInt = 4
    """Dynamic sampling: extra rounds of prompts per step at most, then flat groups fill the gap."""
    record_rollouts: bool = False
    """Write every step's training rollouts to `run_dir/rollouts/` (parquet per step and rank): replay.py."""
    fixed_context: str | None = None
    """Text every prompt is replaced by in the `fixed` space (after the start token); null: none."""


class Rollout(_Node):
    """The rollout engine (`conf/rollout/*.yaml`: `hf`, `vllm`)."""

    max_batch_sequences: PosInt | None = None
    """transformers engine: prompts x samples per decoding call (bounds memory)."""
    max_model_len: PosInt | None = None
    """vLLM: prompt + completion budget of the engine."""
    gpu_memory_utilization: Probability | None = None
    """vLLM on GPU: share of GPU memory vLLM may take."""
    kv_cache_gib: PosInt | None = None
    """vLLM on CPU: KV-cache size in GiB (VLLM_CPU_KVCACHE_SPACE)."""
    dtype: Literal["float32", "bfloat16", "float16", "auto"] | None = None
    """Generation dtype (vLLM: its weights; transformers: autocast over the master weights)."""
    return_logprobs: bool = False
    """Hand the batch the engine's sampling log-probs (mismatch metrics, rollout correction)."""


class Trainer(_Node):
    """Lightning's Trainer (`conf/trainer/*.yaml`); only the keys checked here."""

    max_steps: PosInt
    """Optimizer steps of the run."""
    check_val_every_n_epoch: PosInt | None
    """Held-out evaluation every this many rollout batches; null: never."""
    devices: PosInt | Literal["auto"]
    """Devices (processes) per node."""
    num_nodes: PosInt = 1
    """Nodes; world size = devices x nodes."""


class Eval(_Node):
    """`experiments/evaluate.py`'s keys."""

    benchmarks: Annotated[list[str], Field(min_length=1)]
    """Benchmark presets (`conf/benchmark/`); `heldout`: the data config's held-out set with its reward."""
    samples: PosInt
    """k samples per problem: avg@k, pass@1..k, maj@1..k."""
    limit: PosInt | None
    """Only the first N problems of each benchmark; null: all."""
    temperature: NonNeg | None
    """Sampling temperature; null: the data config's eval_sampling (else sampling) temperature."""
    policies: Annotated[list[str], Field(min_length=1)] | None
    """Policy directories evaluated one after the other, each replacing `model.path`; null: `model.path`."""


class Behavior(_Node):
    """Behaviour keyword families (conf/behavior/*.yaml): case-insensitive regular expressions."""

    transition: Annotated[list[str], Field(min_length=1)]
    """Keywords of a transition thought (`^`: at the thought's start)."""
    reflection: Annotated[list[str], Field(min_length=1)]
    """Keywords of a reflection thought (checked first)."""


def _objective_kind(value: Any) -> str:
    kinds = {"warmup": "dsrl", "phases": "schedule"}
    return next((kind for key, kind in kinds.items() if isinstance(value, dict) and key in value), "single")


class RunConfig(_Node):
    """The whole resolved config of a run (`conf/config.yaml` and its groups)."""

    seed: int
    """Seed of the training prompts and all sampling."""
    threads: PosInt | None
    """torch intra-op threads; null: torch's default (`OMP_NUM_THREADS`)."""
    eval_before_training: bool
    """Held-out evaluation at step 0 (skipped when resuming)."""
    ckpt_path: str | None
    """Resume from this checkpoint; `auto`: the newest complete one in `run_dir`, else a fresh start."""
    objective: Annotated[
        Annotated[Objective, Tag("single")]
        | Annotated[DSRL, Tag("dsrl")]
        | Annotated[Schedule[Objective], Tag("schedule")],
        Discriminator(_objective_kind),
    ]
    """The objective: one `PolicyGradientObjective`, DSRL's two phases, or a schedule of phases."""
    model: Model
    """The policy."""
    module: Module
    """Optimizer and update."""
    data: Data
    """Prompts, rewards and rollout shape."""
    rollout: Rollout
    """Rollout engine."""
    trainer: Trainer
    """Lightning Trainer."""
    eval: Eval | None = None
    """`experiments/evaluate.py`."""
    behavior: Behavior | None = None
    """Behaviour keywords."""
    async_rollout: AsyncRollout = AsyncRollout()
    """Asynchronous rollouts: generation ahead of training, in a worker process."""


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
    tags = ("single", "dsrl", "schedule")
    loc = [str(p) for p in error["loc"] if p not in tags and (str(p).isidentifier() or str(p).isdigit())]
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
