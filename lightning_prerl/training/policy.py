"""PolicyModule: the policy (plus an optional frozen reference) trained by a swappable objective.

`CondRL`, `PreRL`, `NSRPreRL` and `PSRPreRL` are one-level subclasses that only fix the
objective: each is a plain LightningModule for `Trainer.fit`. The objective is a component held by
the module, not the module itself, so the DSRL callback can swap it mid-fit without re-creating
the module: replacing a LightningModule from a callback detaches it from the Trainer and leaves the
optimizer bound to stale parameters (measured, shared/DESIGN.md), while swapping a component
survives DDP/FSDP wrapping and checkpointing. The active objective and its phase are saved in
every checkpoint and restored before the weights are loaded. Loading and the reference live in
`networks.PolicyNetworks`, held-out evaluation in `heldout.HeldOutEvaluation` (mixins of this class).

One training step = one rollout batch = `ppo_epochs x mini_batches` optimizer steps (manual
optimization; Lightning's `global_step`, `max_steps`, DSRL's `switch_step` and checkpoint intervals
count optimizer steps). Advantages, loss masks, rollout-correction weights and (with more than one
update) old log-probs in the objective's space are fixed once per rollout batch (`update.prepare`);
each mini-batch's micro-batches are then forwarded and back-propagated with the loss divided by that
mini-batch's global kept-token count, so neither micro-batch size nor world size changes an update.
Only the log-probs the objective needs are computed: the conditional forward for `space:
conditional`, the prompt-free one for `space: marginal` (or the context of any other registered
space, `objectives/spaces.py`), the reference forward only when `kl_coef > 0`. With one update per
rollout batch (the paper's setting) old log-probs equal the detached current ones (ratio 1) and no
extra pass runs.
"""

from __future__ import annotations

import logging
import time
import warnings
from dataclasses import asdict, replace
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info

from lightning_prerl.data.batch import RolloutBatch, keep_rollout_dtypes
from lightning_prerl.data.benchmarks import BenchmarkMetrics
from lightning_prerl.evaluation.metrics import DEFAULT_REFLECTION, DEFAULT_TRANSITION, GenerationMetrics
from lightning_prerl.objectives import PolicyGradientObjective
from lightning_prerl.objectives.correction import RolloutCorrection
from lightning_prerl.scale import zero
from lightning_prerl.scale.lora import BASE, SNAPSHOT, LoraSettings, snapshot_adapter
from lightning_prerl.scale.models import DTYPES, is_sharded, load_tokenizer, resolve_start_token_id
from lightning_prerl.scale.networks import PolicyNetworks
from lightning_prerl.training.heldout import HeldOutEvaluation
from lightning_prerl.training.oom import OOMBackoff
from lightning_prerl.training.update import Collectives, MicroBatching, StepStats, backward_objective, prepare

log = logging.getLogger(__name__)


class PolicyModule(PolicyNetworks, HeldOutEvaluation, L.LightningModule):
    """Policy, optional reference, optimizer and metrics around a swappable `objective`.

    Args:
        objective: the loss component (see `lightning_prerl.objectives`).
        model_path: local HF directory, or "toy" for the shipped toy policy.
        dtype: compute dtype of forward/backward (bf16 autocast, or FSDP2's mixed-precision policy).
        param_dtype: dtype of the policy's parameters and optimizer state (master weights). Lower
            than float32 only when asked for: AdamW steps of lr 1e-6 mostly round away in bf16.
        activation_checkpointing: recompute each transformer block in backward (long sequences).
        gguf_file: a GGUF file inside `model_path` to load instead of safetensors.
        lora: `lora.LoraSettings` fields (r > 0: train peft LoRA adapters only; the KL reference is
            the base network with adapters off, DSRL's reset reference a frozen adapter snapshot).
        start_token: token replacing the prompt in prompt-free scoring (None: BOS, else the chat
            template's first special token).
        lr, betas, weight_decay, warmup_steps: AdamW with linear warm-up, then constant.
        max_grad_norm: gradient clipping by global norm (None: off).
        max_bad_steps: a step whose loss or gradient is not finite is skipped (weights and optimizer
            state untouched, counted in `train/skipped_steps`); this many in a row stop the run, with
            a checkpoint of the weights from before the fault.
        oom_retries: an out-of-memory micro-batch drops its pass's gradients and the pass runs again
            with half that micro-batch's tokens as `micro_batch_tokens` (`oom.py`), at most this many
            times in a row (0: the first failure stops the run); counted in `train/oom_retries`.
        micro_batch_size: samples per forward/backward (None: the whole rollout batch).
        micro_batch_tokens: padded tokens per forward/backward instead of (or besides) a fixed
            count, as verl's dynamic batch size (None: off); a cut batch is cut into rows of similar
            length. 4,096 halved the toy GRPO step on a CPU against one whole-batch pass
            (`benchmarks/objective_cost.py`); GPU recipes raise it.
        logprob_chunk_tokens: token rows per output-head chunk (None: 512 MiB of float32 logits).
        skip_zero_advantage: samples with A = 0 (GRPO's all-right / all-wrong groups) are not
            forwarded when the objective has no KL or entropy term: they add exactly 0 to the loss and
            its gradient. Logged entropy and PPO KL are then means over the forwarded samples.
        share_prompts: the samples of a prompt in one forward pass forward their prompt once and
            attend to its keys and values (same log-probs; not under activation checkpointing).
        temperature: logits temperature of training log-probs (match the rollout temperature).
        ppo_epochs: passes over each rollout batch (verl's ppo_epochs, TRL's num_iterations).
        mini_batches: optimizer steps per pass, each on 1/mini_batches of the batch's prompts.
        rollout_correction: `correction.RolloutCorrection` fields (TIS / masking of the
            rollout-vs-trainer mismatch; needs an engine that returns its log-probs).
        pass_k: k values for validation pass@k.
        transition, reflection: behaviour keyword lists.
    """

    preset: dict = {"name": "grpo"}  # the objective when none is given (each subclass fixes its own)

    def __init__(
        self,
        objective: PolicyGradientObjective | None = None,
        model_path: str = "toy",
        dtype: str = "float32",
        param_dtype: str = "float32",
        activation_checkpointing: bool = False,
        gguf_file: str | None = None,
        start_token: str | None = None,
        lora: dict | None = None,
        lr: float = 1e-5,
        betas: tuple[float, float] = (0.9, 0.999),
        weight_decay: float = 0.01,
        warmup_steps: int = 0,
        max_grad_norm: float | None = 1.0,
        max_bad_steps: int = 3,
        oom_retries: int = 3,
        micro_batch_size: int | None = None,
        micro_batch_tokens: int | None = 4096,
        logprob_chunk_tokens: int | None = None,
        skip_zero_advantage: bool = True,
        share_prompts: bool = True,
        temperature: float = 1.0,
        ppo_epochs: int = 1,
        mini_batches: int = 1,
        rollout_correction: dict | None = None,
        pass_k: tuple[int, ...] = (1,),
        transition: tuple[str, ...] = tuple(DEFAULT_TRANSITION),
        reflection: tuple[str, ...] = tuple(DEFAULT_REFLECTION),
    ):
        super().__init__()
        if lr <= 0:
            raise ValueError(f"module.lr={lr}: must be > 0")
        for key in ("ppo_epochs", "mini_batches"):
            if locals()[key] < 1:
                raise ValueError(f"module.{key}={locals()[key]}: must be >= 1")
        if temperature <= 0:
            raise ValueError(f"module.temperature={temperature}: must be > 0 (greedy rollouts still score at 1)")
        for key in ("dtype", "param_dtype"):
            if locals()[key] not in DTYPES:
                raise ValueError(f"model.{key}={locals()[key]!r}: expected one of {list(DTYPES)}")
        if param_dtype != "float32":
            warnings.warn(
                f"model.param_dtype={param_dtype}: parameters and AdamW state in {param_dtype}; small updates "
                f"(lr 1e-6) mostly round away. Keep float32 master weights unless this is what you want.",
                stacklevel=2,
            )
        self.save_hyperparameters(ignore=["objective"])
        self.automatic_optimization = False
        self.objective = objective or PolicyGradientObjective(**self.preset)
        self.correction = RolloutCorrection(**(rollout_correction or {}))
        self.lora = LoraSettings(**(lora or {}))
        self.reference_adapter = BASE  # with LoRA: the adapter the reference scores with
        self.strict_loading = not self.lora.enabled  # LoRA checkpoints hold the adapters only
        self.updates_per_batch = ppo_epochs * mini_batches
        self.phase = 0
        self.lr_start = 0  # the step the lr warm-up counts from (a schedule's phase may restart it)
        self.skipped_steps, self.bad_in_row = 0, 0
        self.fault: str | None = None  # set when the run stopped on non-finite steps
        self.oom = OOMBackoff(oom_retries)
        self.reference_needed = False  # a later phase (DSRL) needs the reference: build it up front
        self.benchmark_metrics: BenchmarkMetrics | None = None  # built at the first evaluation
        self.eval_k = 1
        self.policy: torch.nn.Module | None = None
        self.reference: torch.nn.Module | None = None
        self.tokenizer = load_tokenizer(model_path, gguf_file)
        self.start_token_id = resolve_start_token_id(self.tokenizer, start_token)
        self.val_metrics = GenerationMetrics("val", tuple(pass_k), transition, reflection)
        self.rollout_metrics = GenerationMetrics("rollout", (), transition, reflection)

    def set_objective(self, objective: PolicyGradientObjective, phase: int) -> None:
        """Swap the loss component; loads a reference model if the new objective needs one."""
        self.objective, self.phase = objective, phase
        if objective.needs_reference and self.reference is None:
            self.reference = self._new_reference()
        if self._trainer is not None and self.trainer.lr_scheduler_configs:
            # re-evaluate this step's learning rate so the new lr_scale applies from this step on
            for config in self.trainer.lr_scheduler_configs:
                sched = config.scheduler
                for group, base, factor in zip(
                    sched.optimizer.param_groups, sched.base_lrs, sched.lr_lambdas, strict=True
                ):
                    group["lr"] = base * factor(sched.last_epoch)

    def setup(self, stage: str) -> None:
        super().setup(stage)
        keep_rollout_dtypes(self.trainer.precision_plugin)

    def on_fit_start(self) -> None:
        t, hp = self.trainer, self.hparams
        rank_zero_info(
            f"run: accelerator={type(t.accelerator).__name__.removesuffix('Accelerator').lower()} "
            f"devices={t.num_devices} nodes={t.num_nodes} world={t.world_size} strategy={type(t.strategy).__name__} "
            f"precision={t.precision} compute={hp.dtype} params={hp.param_dtype} "
            f"activation_checkpointing={hp.activation_checkpointing}"
        )

    # -- optimisation -------------------------------------------------------------------------
    def configure_optimizers(self):
        hp = self.hparams
        trainable = [p for p in self.policy.parameters() if p.requires_grad]  # LoRA: the adapters
        adamw = torch.optim.AdamW
        if zero.offloads_optimizer(self._trainer):  # ZeRO-Offload: DeepSpeed's CPU AdamW (the same update)
            from deepspeed.ops.adam import DeepSpeedCPUAdam as adamw
        opt = adamw(trainable, lr=hp.lr, betas=tuple(hp.betas), weight_decay=hp.weight_decay)
        warmup = max(0, hp.warmup_steps)

        def factor(step: int) -> float:  # read at every step: the active objective's lr_scale applies
            since = step - self.lr_start
            return (min(1.0, (since + 1) / warmup) if warmup else 1.0) * self.objective.lr_scale

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def _global_sum(self, value: torch.Tensor) -> torch.Tensor:
        if self.trainer.world_size > 1:  # a copy: the all-reduce works in place
            value = self.trainer.strategy.reduce(value.detach().float().clone(), reduce_op="sum")
        return value

    def _global_max(self, value):
        """Max over ranks of an int (returned as int) or a float tensor."""
        if self.trainer.world_size == 1:
            return value
        if isinstance(value, torch.Tensor):
            return self.trainer.strategy.reduce(value.detach().float().clone().to(self.device), reduce_op="max")
        return int(self.trainer.strategy.reduce(torch.tensor(float(value), device=self.device), reduce_op="max"))

    def _grad_norm(self) -> torch.Tensor:
        """Global L2 norm of the gradients (DTensor shards under FSDP2 are reduced over ranks)."""
        grads = [p.grad for p in self.policy.parameters() if p.grad is not None]
        if not grads:
            return torch.zeros(())
        norm = torch.nn.utils.get_total_norm(grads)
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm

    def training_step(self, batch: RolloutBatch, batch_idx: int) -> torch.Tensor:
        t0, step, hp, w = time.perf_counter(), self.trainer.global_step, self.hparams, self.trainer.world_size
        micro = MicroBatching(
            hp.micro_batch_size,
            hp.micro_batch_tokens,
            hp.logprob_chunk_tokens,
            hp.skip_zero_advantage,
            hp.share_prompts,
        )
        self.oom.lockstep, self.oom.agree = self._can_retry_oom(), self._global_max
        comm = Collectives(w, self._global_sum, self._global_max, agree_oom=w > 1 and self.oom.lockstep)
        args = (self.start_token_id, hp.temperature, micro)  # what every pass over the batch shares
        prep = lambda tokens: prepare(  # noqa: E731  (no gradients: nothing to reset after a failure)
            self.objective, self.policy, batch, *args[:2], replace(micro, max_tokens=tokens),
            self.updates_per_batch, self.correction, comm,
        )  # fmt: skip
        batch, mismatch = self.oom.run(prep, micro.max_tokens, step)
        in_loop = None if mismatch.sums else mismatch  # no separate pass: the first update measures it
        totals = StepStats(self.updates_per_batch, w)
        for epoch in range(hp.ppo_epochs):
            for mini in batch.split(hp.mini_batches):
                if not self.fault:
                    totals.add(*self._update(mini, args, comm, in_loop if epoch == 0 else None), first_pass=epoch == 0)
        stats = {**totals.row(batch), **mismatch.result(self._global_sum, self._global_max)}
        self._log_step(step, batch, stats, time.perf_counter() - t0)
        return torch.tensor(stats["train/loss"])

    def _update(self, batch: RolloutBatch, args: tuple, comm: Collectives, mismatch):
        """One optimizer step on a (mini-)batch: backward, finite check, clipping, step."""
        opt, sched = self.optimizers(), self.lr_schedulers()
        opt.zero_grad(set_to_none=True)
        engine = zero.engine_of(self.trainer)
        start_token_id, temperature, micro = args
        pieces = (self.reference_model(), self._backward, comm, mismatch)
        passes = lambda tokens: backward_objective(  # noqa: E731
            self.objective, self.policy, batch, start_token_id, temperature, replace(micro, max_tokens=tokens), *pieces
        )
        reset = lambda: opt.zero_grad(set_to_none=True)  # noqa: E731
        result = self.oom.run(passes, micro.max_tokens, self.trainer.global_step, reset, keep=mismatch)
        grad_norm, bad = torch.zeros(()), False
        if result.kept_tokens > 0 and engine is None:
            grad_norm = self._grad_norm()  # global: every rank takes the same decision below
            bad = not (bool(torch.isfinite(grad_norm)) and bool(torch.isfinite(self._global_sum(result.loss))))
            if bad:
                opt.zero_grad(set_to_none=True)  # gradients dropped: the step below changes nothing
                self._count_bad_step()
            elif self.hparams.max_grad_norm is not None:  # through the precision plugin, like automatic optimization
                self.clip_gradients(opt, gradient_clip_val=self.hparams.max_grad_norm, gradient_clip_algorithm="norm")
        # every update counts as a step, also one with nothing to learn from (e.g. NSR with no mixed
        # group) or a skipped one (AdamW leaves parameters without gradients and their state alone):
        # global_step stays rollout batches x updates, so step intervals keep falling between batches
        opt.step()
        sched.step()
        if result.kept_tokens > 0 and engine is not None:
            # DeepSpeed clipped (config gradient_clipping) and skipped a non-finite step by itself
            grad_norm = torch.tensor(float(engine.get_global_grad_norm() or 0.0))
            bad = not engine.was_step_applied()
            if bad:
                self._count_bad_step()  # known only after DeepSpeed's step, whose number it then carries
        self.bad_in_row = self.bad_in_row if bad else 0
        return result, grad_norm

    def _can_retry_oom(self) -> bool:
        """A failed pass can run again where no rank's forward or backward runs a collective the others
        would wait in: 1 process or DDP (DeepSpeed counts micro-steps itself; FSDP2 gathers in forward)."""
        return zero.engine_of(self.trainer) is None and not is_sharded(self.policy)

    def _backward(self, loss: torch.Tensor, last: bool) -> None:
        engine = zero.engine_of(self.trainer)
        if engine is not None:  # micro-batches are DeepSpeed micro-steps; the last one reduces and steps
            zero.micro_step(engine, last)
        self.manual_backward(loss)

    def _count_bad_step(self) -> None:
        """A non-finite loss or gradient: the step was a no-op (still counted); too many in a row stop the run."""
        self.skipped_steps += 1
        self.bad_in_row += 1
        step = self.trainer.global_step
        log.warning("non-finite loss or gradient at step %d: step skipped (%d in a row)", step, self.bad_in_row)
        if self.bad_in_row >= self.hparams.max_bad_steps:
            path = Path(self.trainer.default_root_dir) / "checkpoints" / f"fault-step{step:06d}.ckpt"
            self.trainer.save_checkpoint(path)  # the weights are still those from before the fault
            self.fault = (
                f"run stopped: {self.bad_in_row} steps in a row had a non-finite loss or gradient "
                f"(module.max_bad_steps={self.hparams.max_bad_steps}) at step {step}; weights from before "
                f"the fault: {path}"
            )
            self.trainer.should_stop = True

    def _log_step(self, step: int, batch: RolloutBatch, train_stats: dict, train_time: float) -> None:
        g = batch.group_size
        grouped = batch.rewards.view(-1, g)  # (B, G)
        mixed = (grouped.max(1).values > grouped.min(1).values).float().mean()
        lengths = batch.response_mask.sum(1)  # (N,)
        self.rollout_metrics.update(grouped, lengths, batch.texts, batch.has_answer)
        stats = {
            **train_stats,
            "train/lr": self.optimizers().param_groups[0]["lr"],
            "train/skipped_steps": float(self.skipped_steps),
            "train/oom_retries": float(self.oom.retries),
            "objective/phase": float(self.phase),
            "rollout/reward_mean": batch.rewards.mean(),
            "rollout/mixed_groups": mixed,
            "time/train": train_time,
            **batch.stats,
        }
        stats.update(self.rollout_metrics.compute(self._global_max))  # ranks agree on which metrics exist
        self.rollout_metrics.reset()
        keys = list(stats)
        values = torch.stack([torch.as_tensor(stats[k], dtype=torch.float32, device=self.device) for k in keys])  # (K,)
        if self.trainer.world_size > 1:
            values = self.trainer.strategy.reduce(values, reduce_op="mean")  # one all-reduce for every stat
        row = dict(zip(keys, values.tolist(), strict=True))
        # written now, inside the step: the step's checkpoint (saved at batch end) never precedes its row
        if self.trainer.is_global_zero:
            for logger in self.trainer.loggers:
                logger.log_metrics(row, step=step)
        self.log_dict(row, on_step=True, on_epoch=False, logger=False, batch_size=len(batch))  # callbacks, progress

    # -- checkpoints --------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["objective"] = {"config": asdict(self.objective), "phase": self.phase, "lr_start": self.lr_start}
        checkpoint["faults"] = {"skipped_steps": self.skipped_steps, "bad_in_row": self.bad_in_row}
        checkpoint["faults"]["oom"] = self.oom.state_dict()
        checkpoint["lora"] = {"reference_adapter": self.reference_adapter}
        state = checkpoint.get("state_dict")
        if self.lora.enabled and isinstance(state, dict) and not is_sharded(self.policy):
            # the frozen base is the model on disk: keep the adapters (and other trainable tensors);
            # FSDP2's distributed checkpoints keep every shard (its loader asks for every key)
            weights = self.policy.state_dict(keep_vars=True)  # tied weights under each of their names
            frozen = {f"policy.{n}" for n, v in weights.items() if not v.requires_grad}
            checkpoint["state_dict"] = {k: v for k, v in state.items() if k not in frozen or ".lora_" in k}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        saved = checkpoint.get("objective")
        if saved is not None:
            self.objective = PolicyGradientObjective(**saved["config"])
            self.phase, self.lr_start = saved["phase"], saved.get("lr_start", 0)
        faults = checkpoint.get("faults", {})
        self.skipped_steps, self.bad_in_row = faults.get("skipped_steps", 0), faults.get("bad_in_row", 0)
        self.oom.load_state_dict(faults.get("oom", {}))
        state = checkpoint.get("state_dict")
        if self.reference is None and isinstance(state, dict) and any(k.startswith("reference.") for k in state):
            self.reference = self._new_reference()
        self.reference_adapter = checkpoint.get("lora", {}).get("reference_adapter", BASE)
        if self.reference_adapter == SNAPSHOT:  # the snapshot adapter must exist before its weights load
            snapshot_adapter(self.policy)


PRERL = {"space": "marginal", "advantage": "group_mean", "coef": 0.01}  # lr_scale 0.1 by the prompt-free rule


class CondRL(PolicyModule):
    """Standard RLVR (GRPO) on log P(y|x)."""

    preset = {"name": "grpo"}


class PreRL(PolicyModule):
    """PreRL: policy gradient on the prompt-free log P(y), both signs (advantage r - group mean)."""

    preset = {"name": "prerl", **PRERL}


class NSRPreRL(PolicyModule):
    """NSR-PreRL: PreRL restricted to negative-advantage samples."""

    preset = {"name": "nsr_prerl", **PRERL, "samples": "negative"}


class PSRPreRL(PolicyModule):
    """PSR-PreRL: PreRL restricted to positive-advantage samples."""

    preset = {"name": "psr_prerl", **PRERL, "samples": "positive"}
