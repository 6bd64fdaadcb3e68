"""LoRA through peft: adapters on the policy, the merged policy for rollouts and export, and the
reference as the same network with other (or no) adapters -- never a second copy of the base model.

- `apply_lora` wraps the loaded policy in a `PeftModel` (base weights frozen, adapters trainable).
- `merged_weights` turns the policy's full weights into the merged ones, one tensor at a time:
  `W + scaling * B @ A` is computed per layer from the (gathered) tensors and nothing is merged
  in place, so rollouts never see the rounding drift of merge -> unmerge cycles.
- `AdapterView` scores with another adapter: `__base__` (the base model: the KL reference) or a
  frozen snapshot adapter (DSRL's reference reset), through peft's per-row `adapter_names`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from lightning_prerl.errors import ConfigError

BASE = "__base__"  # peft's name for "no adapter" in `adapter_names`
SNAPSHOT = "reference"  # the frozen copy of the trained adapter (DSRL reset_reference)


@dataclass(frozen=True)
class LoraSettings:
    """`model.lora`: r = 0 trains every weight (no adapters).

    Attributes:
        r: adapter rank.
        alpha: scaling numerator (scaling = alpha / r).
        dropout: dropout on the adapter input.
        target_modules: module names, or "all-linear" (every linear layer but the output head).
    """

    r: int = 0
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: str | tuple[str, ...] = "all-linear"

    def __post_init__(self) -> None:
        if self.r < 0:
            raise ValueError(f"model.lora.r={self.r}: must be >= 0 (0: no adapters)")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"model.lora.dropout={self.dropout}: must be in [0, 1)")

    @property
    def enabled(self) -> bool:
        return self.r > 0


def is_lora(model: torch.nn.Module) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


def apply_lora(model: torch.nn.Module, settings: LoraSettings) -> torch.nn.Module:
    """The policy wrapped in a peft `PeftModel` with one trainable adapter ("default")."""
    from peft import LoraConfig, get_peft_model

    targets = settings.target_modules if isinstance(settings.target_modules, str) else list(settings.target_modules)
    config = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=targets,
        task_type="CAUSAL_LM",
    )
    try:
        peft_model = get_peft_model(model, config)
    except ValueError as exc:  # e.g. target modules not found
        raise ConfigError(f"model.lora.target_modules={targets!r}: {' '.join(str(exc).split())}") from None
    for name, module in peft_model.named_modules():
        if hasattr(module, "lora_embedding_A") and module.lora_embedding_A:
            raise ConfigError(f"model.lora.target_modules: {name} is an embedding; only linear layers are supported")
    return peft_model


def _full(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def merged_weights(
    model: torch.nn.Module, items: Iterator[tuple[str, torch.Tensor]]
) -> Iterator[tuple[str, torch.Tensor]]:
    """The base model's weights with the active adapter merged, under the base model's own names.

    Args:
        model: the `PeftModel`.
        items: (name, full tensor) of `model`'s state dict (e.g. `models.full_weights`): adapter
            tensors are read from the live modules instead, base tensors of adapted layers get
            `scaling * B @ A` added (in float32, cast back), every name loses peft's prefixes.
    """
    prefix = "base_model.model."
    layers = {
        f"{prefix}{name}.base_layer.weight": module
        for name, module in model.base_model.model.named_modules()
        if hasattr(module, "lora_A") and "default" in module.lora_A
    }
    for name, tensor in items:
        if ".lora_" in name:
            continue
        layer = layers.get(name)
        if layer is not None:
            a, b = _full(layer.lora_A["default"].weight), _full(layer.lora_B["default"].weight)  # (r, in), (out, r)
            delta = (b.float() @ a.float()) * layer.scaling["default"]  # (out, in)
            if getattr(layer, "fan_in_fan_out", False):
                delta = delta.T
            tensor = (tensor.float() + delta.to(tensor.device)).to(tensor.dtype)
        yield name.removeprefix(prefix).replace(".base_layer.", "."), tensor


def _snapshot_pairs(model: torch.nn.Module) -> Iterator[tuple[torch.nn.Module, torch.nn.Module]]:
    """(snapshot, trained) adapter matrices of every adapted layer (its lora_A and its lora_B)."""
    for module in model.modules():
        for attr in ("lora_A", "lora_B"):
            layers = getattr(module, attr, None)
            if layers is not None and SNAPSHOT in layers:
                yield layers[SNAPSHOT], layers["default"]


def add_snapshot(model: torch.nn.Module) -> None:
    """A second, frozen adapter (`SNAPSHOT`) for the reference. Sharded policies (FSDP2) need it before
    sharding: adapters added later would be plain tensors among DTensors."""
    if SNAPSHOT not in model.peft_config:
        model.add_adapter(SNAPSHOT, model.peft_config["default"])
        model.set_adapter("default")  # re-marks what trains: the default adapter only
    for snapshot, _ in _snapshot_pairs(model):
        snapshot.weight.requires_grad_(False)


def snapshot_adapter(model: torch.nn.Module) -> None:
    """Copy the trained adapter into the frozen snapshot adapter: the reference becomes the current
    policy at the price of one more adapter, not one more model."""
    add_snapshot(model)
    with torch.no_grad():
        for snapshot, trained in _snapshot_pairs(model):
            snapshot.weight.copy_(trained.weight)


class AdapterView:
    """The policy network scored with another adapter (`__base__`: none) -- a reference without a copy.

    Quacks like the model for `logprobs.sequence_logprobs` (call, `get_decoder`, `get_output_embeddings`,
    `config`). peft takes per-row adapter names only in eval mode; the view is used without gradients.
    """

    def __init__(self, model: torch.nn.Module, adapter: str = BASE):
        self.model, self.adapter = model, adapter

    def __call__(self, **kwargs):
        was_training = self.model.training
        self.model.eval()
        try:
            return self.model(**kwargs, adapter_names=[self.adapter] * kwargs["input_ids"].shape[0])
        finally:
            self.model.train(was_training)

    def __getattr__(self, name: str):
        return getattr(self.model, name)


def export_adapter(model: torch.nn.Module, state: dict[str, torch.Tensor], out_dir: Path) -> Path:
    """The trained adapter in peft's format (`PeftModel.from_pretrained(base, out_dir)` loads it)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    adapter_state = {k: v for k, v in state.items() if ".lora_" in k and f".{SNAPSHOT}." not in k}
    model.save_pretrained(out_dir, state_dict=adapter_state, selected_adapters=["default"])
    return out_dir
