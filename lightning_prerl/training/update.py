"""One rollout batch's updates: the log-probs an objective needs, micro-batch by micro-batch.

Pure torch over a Hugging Face causal LM (no Lightning): `PolicyModule.training_step` calls `prepare`
once per rollout batch (advantages, loss masks, rollout-correction weights, old log-probs), then
`backward_objective` once per optimizer step with Lightning's `manual_backward` and the strategy's
all-reduces (`Collectives`).

Log-probs come from `logprobs.sequence_logprobs` (never the (N, T, V) logits). Micro-batches are cut to
their own longest sequence; with a token budget every rank agrees on their number, so sharded (FSDP2)
ranks run the same collectives.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from lightning_prerl.data.batch import RolloutBatch
from lightning_prerl.objectives import PolicyGradientObjective
from lightning_prerl.objectives.correction import MismatchStats, RolloutCorrection
from lightning_prerl.training.logprobs import sequence_logprobs
from lightning_prerl.training.oom import micro_batch_guard

NO_CORRECTION = RolloutCorrection()


@dataclass
class BackwardResult:
    """What one (mini-)batch's backward pass produced (gradients are left in the parameters).

    `loss` is this rank's share of the global token mean; the sums are this rank's over the kept
    tokens it forwarded (the caller reduces them), `kept_tokens` (the loss's denominator) and
    `forwarded_tokens` (the sums' denominator) are already global.
    """

    loss: torch.Tensor
    kept_tokens: torch.Tensor
    forwarded_tokens: torch.Tensor
    entropy_sum: torch.Tensor
    clipped_sum: torch.Tensor
    ppo_kl_sum: torch.Tensor


@dataclass(frozen=True)
class MicroBatching:
    """How a rollout batch is cut for forward/backward (the update does not depend on it).

    Attributes:
        size: samples per micro-batch (None: no limit).
        max_tokens: padded tokens per micro-batch, verl's dynamic batch size (None: no limit).
        chunk_tokens: rows of the output-head chunks (None: `ops.head_logprobs`' 512 MiB default).
        skip_zero_advantage: do not forward samples with A = 0 when the objective has no KL or
            entropy term (they add exactly 0 to its loss and gradient: GRPO's flat groups); the
            logged entropy and PPO KL are then means over the samples that were forwarded.
        share_prompts: rows of a pass that share a prompt forward it once (`shared_prompt_hidden_states`).
    """

    size: int | None = None
    max_tokens: int | None = None
    chunk_tokens: int | None = None
    skip_zero_advantage: bool = True
    share_prompts: bool = True

    @property
    def scoring(self) -> dict:
        """The `sequence_logprobs` arguments every pass takes from here."""
        return {"chunk_tokens": self.chunk_tokens, "share_prompts": self.share_prompts}


@dataclass(frozen=True)
class Collectives:
    """The all-reduces an update needs (identity on one process). `max` takes ints or tensors."""

    world_size: int = 1
    sum: Callable[[torch.Tensor], torch.Tensor] = lambda x: x
    max: Callable = lambda x: x
    agree_oom: bool = False  # ranks learn after each forward whether any ran out of memory (`oom.py`)

    @property
    def oom_agree(self) -> Callable[[int], int] | None:
        return self.max if self.agree_oom else None


def _no_grad_logprobs(
    model: torch.nn.Module,
    batch: RolloutBatch,
    space: str | object,
    start_token_id: int,
    temperature: float,
    micro: MicroBatching,
    comm: Collectives,
) -> torch.Tensor:
    """(N, T) log-probs of the whole batch without gradients, micro-batch by micro-batch, zero-padded."""
    out = torch.zeros(batch.response_ids.shape, dtype=torch.float32, device=batch.response_ids.device)  # (N, T)
    with torch.no_grad():
        for rows, mb in batch.micro_batches(micro.size, micro.max_tokens, comm.max):
            with micro_batch_guard(mb, "forward", comm.world_size, comm.oom_agree):
                logp, _ = sequence_logprobs(model, mb, space, start_token_id, temperature, **micro.scoring)
            out[rows, : logp.shape[1]] = logp
    return out


def prepare(
    objective: PolicyGradientObjective,
    policy: torch.nn.Module,
    batch: RolloutBatch,
    start_token_id: int,
    temperature: float = 1.0,
    micro: MicroBatching = MicroBatching(),
    updates: int = 1,
    correction: RolloutCorrection = NO_CORRECTION,
    comm: Collectives = Collectives(),
) -> tuple[RolloutBatch, MismatchStats]:
    """Everything fixed for all of a rollout batch's updates, computed before the first one.

    Advantages over whole groups; the loss mask (response tokens of kept samples, `sample_mask`,
    correction masks); old log-probs in the objective's space when the batch feeds more than one
    update (with one update they equal the detached current log-probs, and no extra pass runs); the
    trainer's conditional log-probs for the rollout correction when it applies to this space.
    Mismatch statistics come from that pass, or, with no pass, from the first update's forward.
    """
    adv, keep = objective.advantages(batch.rewards, batch.group_size)  # (N,), (N,)
    if batch.sample_mask is not None:
        keep = keep & batch.sample_mask.to(keep.device)
    loss_mask = batch.response_mask.float() * keep[:, None].float()  # (N, T)
    stats, old, weights = MismatchStats(), None, None
    args = (start_token_id, temperature, micro, comm)
    if updates > 1:
        old = _no_grad_logprobs(policy, batch, objective.context, *args)  # (N, T)
    if batch.rollout_logprobs is not None and correction.applies_to(objective.space):
        cond = old if objective.space == "conditional" and old is not None else None
        if cond is None:
            cond = _no_grad_logprobs(policy, batch, "conditional", *args)  # (N, T)
        resp = batch.response_mask.float()  # (N, T)
        weights, kept = correction.weights(cond, batch.rollout_logprobs, resp)  # (N, T) or None, (N, T)
        loss_mask = loss_mask * kept
        stats.add(cond, batch.rollout_logprobs, resp, kept, weights)
    elif batch.rollout_logprobs is not None and old is not None and objective.space == "conditional":
        stats.add(old, batch.rollout_logprobs, batch.response_mask)
    out = replace(batch, advantages=adv, loss_mask=loss_mask, is_weights=weights, old_logprobs=old)
    return out, stats


def rows_with_loss(batch: RolloutBatch, skip_zero_advantage: bool = False) -> RolloutBatch:
    """Only the samples whose loss mask keeps a token (NSR/PSR-PreRL keep about half, sample masks
    drop some), and with `skip_zero_advantage` only those with A != 0: the others add nothing to the
    loss or its gradient, so they are not forwarded. A rank left with none keeps row 0 with an
    all-zero mask, so it still runs the passes the other ranks run (their collectives, FSDP2 / ZeRO-3)."""
    forward = batch.loss_mask.sum(1) > 0  # (N,)
    if skip_zero_advantage:
        forward &= batch.advantages != 0
    kept = forward.nonzero().squeeze(1)  # (n,)
    if len(kept) == len(batch):
        return batch
    if len(kept) == 0:
        first = batch.select(slice(0, 1))
        return replace(first, loss_mask=torch.zeros_like(first.loss_mask))
    return batch.select(kept)


def backward_objective(
    objective: PolicyGradientObjective,
    policy: torch.nn.Module,
    batch: RolloutBatch,
    start_token_id: int,
    temperature: float = 1.0,
    micro: MicroBatching = MicroBatching(),
    reference: torch.nn.Module | None = None,
    backward: Callable[[torch.Tensor, bool], None] = lambda loss, last: loss.backward(),
    comm: Collectives = Collectives(),
    mismatch: MismatchStats | None = None,
) -> BackwardResult:
    """Accumulate the gradient of `objective` over one (mini-)batch, micro-batch by micro-batch.

    The batch comes from `prepare` (called here when it was not). The aggregation's denominator (the
    token mean's: the number of loss tokens) is counted on the *whole* (mini-)batch on all ranks
    (`objective.loss_count`, `comm.sum`) and its per-token weights are row-local, so the gradient
    does not depend on the micro-batching or the world size (DDP and FSDP average gradients over
    ranks, hence the `* world_size`). The policy loss gets each micro-batch's loss mask (sequence-level
    ratios) and names the tokens it clips. Every rank runs the same number of micro-batches (`comm.max`),
    also when none of its tokens is kept; `backward(loss, last)` learns which pass is the step's last
    (DeepSpeed's gradient-accumulation boundary). The entropy of the scored distribution is computed on
    every step (logged; in the loss only with `entropy_coef > 0`). `mismatch` collects the
    rollout-vs-trainer statistics of a conditional update that had no separate old-log-prob pass.
    """
    if batch.advantages is None:
        batch, _ = prepare(objective, policy, batch, start_token_id, temperature, micro, comm=comm)
    zero = torch.zeros((), device=batch.response_ids.device)
    rows = batch.sample_mask if batch.sample_mask is not None else torch.ones(len(batch), dtype=torch.bool)  # (N,)
    local = torch.stack([batch.loss_mask.sum(), objective.loss_count(batch.loss_mask, rows.to(zero.device))])
    kept_tokens, normaliser = comm.sum(local)  # global: kept tokens, the aggregation's denominator
    result = BackwardResult(zero.clone(), kept_tokens, kept_tokens, zero.clone(), zero.clone(), zero.clone())
    if kept_tokens <= 0:  # the same on every rank: nobody runs a forward pass
        return result
    if mismatch is None or batch.rollout_logprobs is None:  # mismatch statistics read every sample
        batch = rows_with_loss(batch, micro.skip_zero_advantage and objective.inert_at_zero_advantage)
        result.forwarded_tokens = comm.sum(batch.loss_mask.sum())
    micro_batches = batch.micro_batches(micro.size, micro.max_tokens, comm.max)
    space, differentiable_entropy = objective.context, objective.needs_entropy  # the entropy: only in the loss
    for i, (_, mb) in enumerate(micro_batches):
        mask = mb.loss_mask  # (n, T')
        with micro_batch_guard(mb, "forward", comm.world_size, comm.oom_agree):  # failures known to every rank
            logp, entropy = sequence_logprobs(
                policy,
                mb,
                space,
                start_token_id,
                temperature,
                True,
                entropy_grad=differentiable_entropy,
                **micro.scoring,
            )  # (n, T'), (n, T')
            old = mb.old_logprobs if mb.old_logprobs is not None else logp.detach()  # (n, T')
            ref_logp = None
            if objective.needs_reference:
                with torch.no_grad():
                    ref_logp, _ = sequence_logprobs(reference, mb, space, start_token_id, temperature, **micro.scoring)
            terms = objective.loss_terms(logp, old, mb.advantages, ref_logp, entropy, mb.is_weights, mask)  # (n, T')
            loss = (terms.loss * objective.loss_weights(mask)).sum() / normaliser * comm.world_size
        if mismatch is not None and mb.rollout_logprobs is not None and objective.space == "conditional":
            mismatch.add(logp, mb.rollout_logprobs, mb.response_mask)
        with micro_batch_guard(mb, "backward", comm.world_size):
            backward(loss, i == len(micro_batches) - 1)
        result.loss += loss.detach() / comm.world_size
        log_ratio = logp.detach() - old  # (n, T')
        result.clipped_sum += (terms.clipped.float() * mask).sum()
        kl = torch.exp(log_ratio.clamp(-20.0, 20.0)) - 1.0 - log_ratio  # (n, T') k3 of KL(old || new)
        result.ppo_kl_sum += (kl * mask).sum()
        result.entropy_sum += (entropy.detach() * mask).sum()
    return result


class StepStats:
    """One rollout batch's updates summed into its `train/...` row.

    Token means are global: a rank adds its sums x world size / the global token count, and the
    logged row is the mean over ranks. Clip fraction and PPO KL count every update, entropy the first
    pass only (with one mini-batch, the policy on its own rollouts; mini-batch i > 1 of the first pass
    is scored after i - 1 updates), both over the kept tokens that were forwarded (not the skipped
    A = 0 samples, which never clip).
    """

    def __init__(self, updates: int, world_size: int):
        self.updates, self.w = updates, world_size
        keys = ("loss", "grad_norm", "kept", "forwarded", "clipped", "ppo_kl", "entropy", "entropy_tokens")
        self.sums = dict.fromkeys(keys, 0.0)

    def add(self, result: BackwardResult, grad_norm: torch.Tensor, first_pass: bool) -> None:
        s, forwarded = self.sums, float(result.forwarded_tokens)  # global
        s["loss"] += float(result.loss) * self.w / self.updates  # a rank's share of the global mean, x W
        s["grad_norm"] += float(grad_norm) / self.updates
        s["kept"] += float(result.kept_tokens)
        s["forwarded"] += forwarded
        s["clipped"] += float(result.clipped_sum) * self.w
        s["ppo_kl"] += float(result.ppo_kl_sum) * self.w
        if first_pass:
            s["entropy"] += float(result.entropy_sum) * self.w
            s["entropy_tokens"] += forwarded

    def row(self, batch: RolloutBatch) -> dict[str, float | torch.Tensor]:
        """The row of a prepared batch (`advantages` and `loss_mask` set)."""
        s = self.sums
        return {
            "train/loss": s["loss"],
            "train/grad_norm": s["grad_norm"],
            "train/kept_tokens": s["kept"] / self.updates,
            "train/kept_samples": (batch.loss_mask.sum(1) > 0).float().mean(),
            "train/forwarded_tokens": s["forwarded"] / self.updates,
            "train/adv_abs_mean": batch.advantages.abs().mean(),
            "train/entropy": s["entropy"] / max(s["entropy_tokens"], 1.0),
            "train/clip_fraction": s["clipped"] / max(s["forwarded"], 1.0),
            "train/ppo_kl": s["ppo_kl"] / max(s["forwarded"], 1.0),
        }
