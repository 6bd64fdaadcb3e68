"""Checks on the composed Hydra config, run before anything is loaded or computed.

Types and ranges of every key are declared in `schema.py`; this adds the contradictions between
keys and the config resolvers of conf/trainer. Each failure is one line naming the key, the value
and what is allowed.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import InterpolationResolutionError, MissingMandatoryValue

from lightning_prerl.config.async_rollout import check_async
from lightning_prerl.config.phases import Schedule, schedule_contradictions
from lightning_prerl.config.schema import DSRL, ConfigError, RunConfig, validate_schema
from lightning_prerl.config.spaces import check_spaces
from lightning_prerl.data.sources import default_data_root, missing_file
from lightning_prerl.objectives import registry
from lightning_prerl.scale.models import resolve_model_path

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


def _devices(cpu_processes: int) -> int:
    """Every visible GPU when CUDA is present, else `cpu_processes` CPU processes."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else int(cpu_processes)


def _precision(dtype: str, param_dtype: str) -> str:
    """Lightning's precision for (compute dtype, parameter dtype): bf16 compute over float32 weights is
    bf16-mixed (autocast); equal dtypes need no autocast (the weights are loaded in that dtype)."""
    if dtype == "float16":
        raise ConfigError(
            "model.dtype=float16: fp16 compute needs loss scaling, which this manual-optimization loop does "
            "not do; use bfloat16"
        )
    return "bf16-mixed" if dtype == "bfloat16" and param_dtype != "bfloat16" else "32-true"


def _share_of(share, total, multiple=1) -> int:
    """DSRL's default switch step: the paper's share of the run (19 of 348 steps), rounded to whole
    rollout batches (`multiple` optimizer steps each), at least one."""
    share, total, multiple = float(share), int(total), int(multiple)
    if total <= 0:
        raise ConfigError(
            f"objective.switch_step defaults to {share:.1%} of trainer.max_steps={total}: set objective.switch_step"
        )
    return max(1, round(share * total / multiple)) * multiple


# `${lp.devices:2}`, `${lp.mul:a,b}`, `${lp.precision:dtype,param_dtype}` in conf/trainer/*.yaml;
# `${lp.data_root:}` in conf/config.yaml (lightning_prerl/data/sources.py: the order it looks in);
# `${lp.share_of:share,total,multiple}` in conf/objective/dsrl.yaml
for _name, _fn in (
    ("lp.devices", _devices),
    ("lp.mul", lambda a, b: int(a) * int(b)),
    ("lp.precision", _precision),
    ("lp.data_root", default_data_root),
    ("lp.share_of", _share_of),
):
    if not OmegaConf.has_resolver(_name):
        OmegaConf.register_new_resolver(_name, _fn)


def _phases(run: RunConfig) -> list:
    """The objective of each phase: DSRL's warm-up and main, a schedule's phases, else the one objective."""
    if isinstance(run.objective, Schedule):
        return [phase.objective for phase in run.objective.phases.values()]
    return [run.objective.warmup, run.objective.main] if isinstance(run.objective, DSRL) else [run.objective]


def uses_deepspeed(cfg: DictConfig) -> bool:
    """True for trainer=deepspeed_zero2|deepspeed_zero3 (Lightning's DeepSpeedStrategy)."""
    strategy = cfg.trainer.get("strategy")
    target = strategy.get("_target_", "") if isinstance(strategy, DictConfig) else str(strategy)
    return "deepspeed" in target.lower()


def _contradictions(run: RunConfig, cfg: DictConfig) -> None:
    """Values that are each allowed but cannot work together."""
    data, g = run.data, run.data.samples_per_prompt
    for obj in _phases(run):
        if g == 1 and registry.lookup("advantage", obj.advantage).group_relative:  # any registered one
            raise ConfigError(
                f"data.samples_per_prompt=1 with objective advantage '{obj.advantage}': group advantages "
                f"need >= 2 samples per prompt (or use objective advantage 'signed')"
            )
    for k in run.module.pass_k:
        if k > data.eval_samples:
            raise ConfigError(
                f"module.pass_k contains {k} > data.eval_samples={data.eval_samples}: "
                f"pass@k needs at least k samples per prompt"
            )
    if run.model.lora.r > 0 and uses_deepspeed(cfg):
        raise ConfigError(
            f"model.lora.r={run.model.lora.r} with trainer strategy DeepSpeed: LoRA runs under trainer=ddp or "
            f"trainer=fsdp (adapters are small: ZeRO has little to partition)"
        )
    if isinstance(run.objective, DSRL):
        warm = run.objective.warmup
        for key, field in (("nsr_weight", "lr_scale"), ("nsr_loss_coef", "coef")):
            value = getattr(run.objective, key)
            if value is not None and getattr(warm, field) != value:
                raise ConfigError(
                    f"objective.warmup.{field}={getattr(warm, field)} contradicts objective.{key}={value}: "
                    f"set objective.{key} (it is the warm-up's {field})"
                )
        switch, max_steps = run.objective.switch_step, run.trainer.max_steps
        if switch is None and run.objective.monitor is None:
            raise ConfigError("objective.switch_step=null with objective.monitor=null: DSRL would never switch")
        if switch is not None and switch >= max_steps and run.objective.monitor is None:
            raise ConfigError(
                f"objective.switch_step={switch} >= trainer.max_steps={max_steps}: DSRL would never leave its "
                f"warm-up (for the warm-up objective alone use objective={run.objective.warmup.name})"
            )
    if isinstance(run.objective, Schedule):
        updates = run.module.ppo_epochs * run.module.mini_batches
        schedule_contradictions(run.objective.phases, run.trainer.max_steps, updates)
    strategy = cfg.trainer.get("strategy")
    tp = strategy.get("tensor_parallel_size", 1) if isinstance(strategy, DictConfig) else 1
    if tp != 1:
        raise ConfigError(
            f"trainer.strategy.tensor_parallel_size={tp}: only 1 is supported (the loss normaliser and the "
            f"rollout split assume pure data parallelism); shard with FSDP2 over data_parallel_size instead"
        )
    world = run.trainer.devices * run.trainer.num_nodes if isinstance(run.trainer.devices, int) else None
    if world is not None and data.prompts_per_step % world:
        raise ConfigError(
            f"data.prompts_per_step={data.prompts_per_step} does not divide by the world size {world} "
            f"(trainer.devices x trainer.num_nodes): it is the global number of prompts per step"
        )
    minis = run.module.mini_batches
    if data.prompts_per_step % ((world or 1) * minis):
        raise ConfigError(
            f"data.prompts_per_step={data.prompts_per_step} does not divide by world size {world or 1} x "
            f"module.mini_batches={minis}: each rank's mini-batches hold whole prompt groups"
        )
    if data.overlong == "penalty" and (data.overlong_buffer or 0) > data.sampling.max_new_tokens:
        raise ConfigError(
            f"data.overlong_buffer={data.overlong_buffer} > data.sampling.max_new_tokens="
            f"{data.sampling.max_new_tokens}: the overlong penalty interval must fit in the generation budget"
        )
    if data.overlong == "penalty" and data.overlong_buffer is None:
        raise ConfigError("data.overlong_buffer=null with data.overlong=penalty: set the penalty interval in tokens")
    budget = data.sampling.max_new_tokens + (data.max_prompt_tokens or 0)
    max_len = run.rollout.max_model_len
    if max_len is not None and max_len < budget:
        raise ConfigError(
            f"rollout.max_model_len={max_len} < data.sampling.max_new_tokens + data.max_prompt_tokens = {budget}: "
            f"the engine could not hold a full prompt and completion"
        )


def _update_contradictions(run: RunConfig, cfg: DictConfig) -> None:
    """Several updates per rollout batch, rollout correction and sampling truncation."""
    module, sampling = run.module, run.data.sampling
    updates = module.ppo_epochs * module.mini_batches
    if updates > 1:  # Lightning counts optimizer steps: these must fall between rollout batches
        steps = {"trainer.max_steps": run.trainer.max_steps}
        if isinstance(run.objective, DSRL):
            steps["objective.switch_step"] = run.objective.switch_step
        for name, callback in (cfg.get("callbacks") or {}).items():
            if isinstance(callback, DictConfig):
                for key in ("every_n_train_steps", "every_n_steps"):
                    steps[f"callbacks.{name}.{key}"] = callback.get(key)
        for key, value in steps.items():
            if isinstance(value, int) and value > 0 and value % updates:
                raise ConfigError(
                    f"{key}={value} is not a multiple of module.ppo_epochs x module.mini_batches = {updates}: "
                    f"steps count optimizer steps, and a rollout batch makes {updates} of them"
                )
    engine_logprobs = run.rollout.return_logprobs
    fix = module.rollout_correction
    if (fix.tis or fix.mask) and not engine_logprobs:
        raise ConfigError(
            f"module.rollout_correction (tis={fix.tis}, mask={fix.mask}) needs the engine's log-probs: "
            f"rollout.return_logprobs=false (rollout=vllm returns them; the transformers engine with true)"
        )
    if sampling.top_p < 1 or sampling.top_k is not None:
        vllm = str(cfg.rollout.get("_target_", "")).endswith("VLLMEngine")
        every_phase = fix.prerl or all(phase.space == "conditional" for phase in _phases(run))
        if not (vllm and engine_logprobs and (fix.tis or fix.mask) and every_phase):
            raise ConfigError(
                f"data.sampling.top_p={sampling.top_p}, top_k={sampling.top_k}: rollouts would come from a "
                f"truncated distribution while training scores the full softmax (silently off-policy); keep "
                f"top_p=1.0 and top_k=null, or correct it with rollout=vllm and module.rollout_correction.tis "
                f"or .mask (vLLM's log-probs see the truncation; .prerl=true for prompt-free objectives)"
            )


def validate_config(cfg: DictConfig) -> RunConfig:
    """The config checked against the schema (`schema.py`: every key's type and range), then for
    contradictions between keys; raises ConfigError with one line on the first problem."""
    _precision(cfg.model.dtype, cfg.model.get("param_dtype", "float32"))  # its message says why fp16 cannot train
    try:
        resolved = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except MissingMandatoryValue as exc:
        raise ConfigError(f"{exc.full_key}=???: required (set it on the command line)") from None
    except InterpolationResolutionError as exc:
        missing = re.search(r"Missing mandatory value: (\S+)", str(exc))
        if missing:
            raise ConfigError(f"{missing.group(1)}=???: required (set it on the command line)") from None
        raise ConfigError(" ".join(str(exc).split())[:300]) from None
    try:
        run = validate_schema(resolved)
    except ConfigError as exc:
        raise ConfigError(_as_typed(cfg, str(exc))) from None
    _contradictions(run, cfg)
    _update_contradictions(run, cfg)
    check_spaces(cfg)
    check_async(run, cfg)
    try:
        resolve_model_path(run.model.path)
    except FileNotFoundError as exc:
        raise ConfigError(str(exc)) from None
    _data_files(resolved)
    return run


def typed_key(cfg: DictConfig, key: str) -> str:
    """The key a value was set under: `module.temperature` is `${data.sampling.temperature}` in
    conf/config.yaml, so a bad temperature was typed as `data.sampling.temperature` (followed through
    chains of whole-value absolute interpolations; anything else is its own key)."""
    raw = OmegaConf.to_container(cfg, resolve=False)
    for _ in range(8):  # a chain, never a cycle (OmegaConf rejects those when resolving)
        node = raw
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        source = re.fullmatch(r"\$\{([A-Za-z_][\w.]*)\}", node) if isinstance(node, str) else None
        if source is None:
            return key
        key = source.group(1)
    return key


def _as_typed(cfg: DictConfig, message: str) -> str:
    """`module.temperature=-1: ...` -> `data.sampling.temperature=-1: ... (module.temperature reads it)`."""
    head = re.match(r"([A-Za-z_][\w.]*)=", message)
    if head is None:
        return message
    typed = typed_key(cfg, head.group(1))
    if typed == head.group(1):
        return message
    return f"{typed}{message[len(head.group(1)) :]} ({head.group(1)} reads it)"


def _data_files(resolved: dict) -> None:
    """Every file the data config reads under `data_root` exists: the training set and the benchmarks it
    evaluates on or decontaminates against; a missing one names the command that fetches it."""
    from lightning_prerl.data.benchmarks import benchmark_names, benchmark_spec

    data, root = resolved["data"], resolved["data_root"]
    train, held_out = data.get("train_prompts") or {}, data.get("eval_prompts") or {}
    if str(train.get("_target_", "")).endswith(".load_prompts") and not Path(train["path"]).is_file():
        raise ConfigError(missing_file("data", data.get("name", "?"), train["path"], root))
    names = list(data.get("decontaminate") or [])
    if str(held_out.get("_target_", "")).endswith(".benchmark_suite"):
        names += held_out.get("names") or []
        root = held_out.get("data_root", root)
    for name in dict.fromkeys(n for n in names if n in benchmark_names()):
        path = benchmark_spec(name, root)["path"]
        if not Path(path).is_file():
            raise ConfigError(missing_file("benchmark", name, path, root))


def check_group_choices(overrides: list[str], conf_dir: Path) -> None:
    """Reject `group=option` overrides naming an option that does not exist, in one line.

    Hydra would reject them too, but over several lines with its search path; this names the key,
    the value and the allowed options. Sweeps (`objective=grpo,dsrl`) are checked option by option.
    """
    for arg in overrides:
        key, sep, value = arg.partition("=")
        group = conf_dir / key.lstrip("+~").partition("@")[0]  # objective@objective.main=gspo: the objective group
        # Hydra's own groups also hold its plugins' options (hydra/launcher=joblib): Hydra checks those
        if not sep or not group.is_dir() or value in ("null", "") or key.lstrip("+~").startswith("hydra/"):
            continue
        allowed = sorted(p.stem for p in group.glob("*.yaml"))
        for option in value.split(","):
            if option not in allowed:
                raise ConfigError(f"{key.lstrip('+~')}={option!r} is not an option: choose one of {allowed}")


def check_command_line(argv: list[str], conf_dir: Path = CONF_DIR) -> None:
    """Exit with one line when a `group=option` override names no existing option.

    Runs before Hydra (and before Lightning is imported, so Lightning keeps Hydra's log handlers).
    """
    try:
        check_group_choices(argv, conf_dir)
    except ConfigError as exc:
        sys.exit(f"config error: {exc}")
