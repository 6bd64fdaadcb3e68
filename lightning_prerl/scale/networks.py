"""The networks a `PolicyModule` trains and scores with: the policy, and the frozen reference of the KL term.

A mixin of `PolicyModule` (lightning_prerl/training/policy.py), split out to keep each file readable. The policy
is loaded in `configure_model`, so every strategy can shape it first: FSDP2 shards it over the mesh
(`models.shard_policy`), DeepSpeed ZeRO-3 loads it into partitions (`zero.zero3_loading`), LoRA wraps
it in peft adapters (`lora.apply_lora`). The reference is a frozen copy in the compute dtype, sharded
like the policy -- or, with LoRA, the policy network itself under another adapter (`lora.AdapterView`).
"""

from __future__ import annotations

import torch

from lightning_prerl.scale import zero
from lightning_prerl.scale.lora import SNAPSHOT, AdapterView, add_snapshot, apply_lora, snapshot_adapter
from lightning_prerl.scale.models import DTYPES, load_policy, shard_policy


class PolicyNetworks:
    """`configure_model` and the reference for a LightningModule with `hparams`, `lora`, `objective`,
    `policy`, `reference`, `reference_needed` and `reference_adapter` (see `PolicyModule`)."""

    def _load(self, dtype: str) -> torch.nn.Module:
        with zero.zero3_loading(zero.zero3_config(self._trainer)):  # ZeRO-3: load into the partitions
            return load_policy(self.hparams.model_path, dtype, self.hparams.gguf_file)

    def setup(self, stage: str) -> None:
        zero.set_gradient_clipping(self.trainer, self.hparams.max_grad_norm)  # DeepSpeed clips in its own step

    def configure_model(self) -> None:
        """Load the policy (and a reference if KL is on); under FSDP2 shard both over the mesh."""
        if self.policy is None:
            policy = self._load(self.hparams.param_dtype)
            if self.hparams.activation_checkpointing:
                policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            if self.lora.enabled:
                policy = apply_lora(policy, self.lora)
                if self.objective.needs_reference or self.reference_needed:
                    add_snapshot(policy)  # DSRL's reset reference: made now, sharded with the policy
            self.policy = self._prepare(policy, compute_dtype=self.hparams.dtype)
            self.policy.train()
        if (self.objective.needs_reference or self.reference_needed) and self.reference is None:
            self.reference = self._new_reference()

    def reference_model(self):
        """What the KL term scores with: the frozen reference, or with LoRA the policy network under
        another adapter (none: the base model)."""
        return AdapterView(self.policy, self.reference_adapter) if self.lora.enabled else self.reference

    def _new_reference(self) -> torch.nn.Module | None:
        """A frozen base model in the compute dtype (it needs no master weights), sharded like the policy;
        none with LoRA (the base is the policy with its adapters off)."""
        if self.lora.enabled:
            return None
        if self._trainer is not None and zero.engine_of(self.trainer) is not None:
            raise RuntimeError("under DeepSpeed the reference must be built in configure_model (reference_needed)")
        return self._frozen(self._prepare(self._load(self.hparams.dtype))).to(self.device)

    def _prepare(self, model: torch.nn.Module, compute_dtype: str | None = None) -> torch.nn.Module:
        """Under FSDP2 (trainer=fsdp) shard over the mesh, computing in `compute_dtype`."""
        mesh = self.device_mesh  # set by ModelParallelStrategy, else None
        if mesh is None:
            return model
        return shard_policy(model, mesh["data_parallel"], DTYPES[compute_dtype] if compute_dtype else None)

    @staticmethod
    def _frozen(model: torch.nn.Module) -> torch.nn.Module:
        model.eval()
        model.requires_grad_(False)
        return model

    def reset_reference(self) -> None:
        """Make the reference an exact frozen copy of the current policy (DSRL's reincarnation).

        The weights are copied into a model built like the policy (sharded the same way under FSDP2),
        rather than deep-copying the live, possibly sharded and hooked, policy module. With LoRA the
        trained adapter is copied into a frozen snapshot adapter instead.
        """
        if self.lora.enabled:
            snapshot_adapter(self.policy)
            self.reference_adapter = SNAPSHOT
            return
        if self.reference is None:
            self.reference = self._new_reference()
        zero.copy_weights(self.reference, self.policy)
