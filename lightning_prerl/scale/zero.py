"""DeepSpeed ZeRO-2/3 (`trainer=deepspeed_zero2|deepspeed_zero3`): the few places where the policy
code must know that DeepSpeed owns the parameters.

- Loading under ZeRO-3 (`zero3_loading`): Lightning runs `configure_model` inside `deepspeed.zero.Init`,
  which partitions parameters as they are created; `from_pretrained` then has to initialise and load
  through DeepSpeed's gathers, which transformers does only while an `HfDeepSpeedConfig` is alive.
  Without it transformers treats the empty partitions as whole tensors (measured on the toy policy:
  an IndexError in its `_init_weights`).
- Output head outside its module (`through_own_call`): the chunked log-probs read the head weight
  after the model's forward, when ZeRO-3 has released it; calling the function *as the head's own
  forward* lets DeepSpeed's module hooks gather the weight for it and gather it again in backward.
- Reference reset (`copy_weights`): ZeRO-3 partitions of two identically built models have the same
  layout, so each rank copies its own partitions -- no gather (tensors kept whole, such as those under
  `stage3_param_persistence_threshold`, are copied whole too).
- Gradient accumulation (`micro_step`): several micro-batches per optimizer step are DeepSpeed
  micro-steps whose boundary is the last one. DeepSpeed counts micro-steps in the engine's forward,
  which runs once per training step here (the micro-batches call the policy inside it): without
  counting them, ZeRO-3 overwrites instead of accumulating the partitioned gradients of every
  micro-batch but the last (measured: 2-rank weights off by 2 x lr).
- Non-finite steps: DeepSpeed's bf16 optimizer checks gradients itself (`check_grad_overflow`) and
  skips the step; the module counts `engine.was_step_applied()` being false as a skipped step.
Gathering full weights for vLLM and export is in `models.full_weights`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch


def _deepspeed_strategy(trainer):
    """Lightning's DeepSpeedStrategy of `trainer` (its config formatted, as Lightning's own zero.Init
    uses it), else None. By class name: the deepspeed package may not be installed."""
    strategy = getattr(trainer, "strategy", None)
    if type(strategy).__name__ != "DeepSpeedStrategy":
        return None
    strategy._init_config_if_needed()
    return strategy


def engine_of(trainer) -> object | None:
    """The DeepSpeed engine once Lightning's DeepSpeedStrategy has built it, else None (before
    `deepspeed.initialize`, e.g. in `configure_model`, the strategy's model is still the LightningModule)."""
    strategy = getattr(trainer, "strategy", None)
    engine = getattr(strategy, "model", None) if type(strategy).__name__ == "DeepSpeedStrategy" else None
    return engine if hasattr(engine, "set_gradient_accumulation_boundary") else None


def zero3_config(trainer) -> dict | None:
    """The DeepSpeed config when the strategy shards parameters (ZeRO-3), else None."""
    strategy = _deepspeed_strategy(trainer)
    return strategy.config if strategy is not None and strategy.zero_stage_3 else None


def set_gradient_clipping(trainer, max_norm: float | None) -> None:
    """DeepSpeed clips inside its step (`gradient_clipping`, 0: off); Lightning would take the value from
    `Trainer(gradient_clip_val)`, which manual optimization forbids. Call before the config is used."""
    strategy = _deepspeed_strategy(trainer)
    if strategy is not None:
        strategy.config["gradient_clipping"] = float(max_norm or 0.0)


def offloads_optimizer(trainer) -> bool:
    """True when the DeepSpeed config puts optimizer state on the CPU (it then needs DeepSpeedCPUAdam)."""
    strategy = _deepspeed_strategy(trainer)
    if strategy is None:
        return False
    offload = strategy.config.get("zero_optimization", {}).get("offload_optimizer") or {}
    return offload.get("device", "none") not in ("none", None)


@contextlib.contextmanager
def zero3_loading(config: dict | None) -> Iterator[None]:
    """`from_pretrained` inside this context loads into ZeRO-3 partitions (rank 0 reads the files,
    DeepSpeed scatters); a no-op without a config."""
    if config is None:
        yield
        return
    from transformers.integrations import HfDeepSpeedConfig

    keep_alive = HfDeepSpeedConfig(config)  # transformers holds only a weak reference
    try:
        yield
    finally:
        del keep_alive


def micro_step(engine, last: bool) -> None:
    """Before each micro-batch's `engine.backward`: a new DeepSpeed micro-step (ZeRO-3 accumulates
    gradients from the second one on), reducing and stepping only after the `last`."""
    engine.set_gradient_accumulation_boundary(last)
    if hasattr(engine.optimizer, "clear_backward_seen_flag"):
        engine.optimizer.clear_backward_seen_flag()  # counts the previous backward, as engine.forward would


def through_own_call(module: torch.nn.Module, fn: Callable[[torch.Tensor], object]):
    """`fn(module.weight)` run as `module`'s forward, so the strategy's module hooks gather the weight
    (ZeRO-3) for the call and again for its backward. Returns what `fn` returns."""
    module.forward = lambda: fn(module.weight)  # an instance attribute shadows the class method
    try:
        return module()
    finally:
        del module.forward


@torch.no_grad()
def copy_weights(dst: torch.nn.Module, src: torch.nn.Module) -> None:
    """Make `dst` (built like `src`) hold `src`'s weights: partition by partition under ZeRO-3,
    else through the state dict (FSDP2 DTensors copy shard to shard)."""
    pairs = list(zip(dst.parameters(), src.parameters(), strict=True))
    if pairs and hasattr(pairs[0][1], "ds_id"):
        for d, s in pairs:
            d.ds_tensor.copy_(s.ds_tensor)  # the local partitions: same shapes, same layout
            if d.data.numel() == d.ds_numel and s.data.numel() == s.ds_numel:
                d.data.copy_(s.data)  # gathered right now, or persistent (small tensors stay whole)
        for d, s in zip(dst.buffers(), src.buffers(), strict=True):
            d.copy_(s)
        return
    dst.load_state_dict(src.state_dict())
