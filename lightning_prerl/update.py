"""One rollout batch's gradient: the log-probs an objective needs, micro-batch by micro-batch.

Pure torch over a Hugging Face causal LM (no Lightning): `PolicyModule.training_step` calls
`backward_objective` with Lightning's `manual_backward` and the strategy's all-reduces.

Log-probs never hold the (N, T, V) logits: the final hidden states come from the model's own forward
with no logits computed, then the output head runs chunk by chunk (`ops.head_logprobs`). Micro-batches
are cut to their own longest sequence; with a token budget every rank agrees on their number, so
sharded (FSDP2) ranks run the same collectives.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from lightning_prerl.batch import RolloutBatch
from lightning_prerl.objectives import PolicyGradientObjective
from lightning_prerl.objectives.ops import head_logprobs


def final_hidden_states(model: torch.nn.Module, ids, attn, pos, keep: int) -> torch.Tensor:
    """(N, keep, H) final-norm hidden states of the last `keep` positions, via the model's own forward.

    The root module is called (not its decoder), so FSDP2's hooks gather and reduce the root's
    parameters; `logits_to_keep` with no index makes the model compute no logits at all. The decoder's
    output is taken by a forward hook rather than `output_hidden_states`, which would keep every
    layer's hidden states alive (at 8 x 8,192 tokens of Qwen3-4B, 12 GB in a no-grad reference pass).
    """
    captured: list[torch.Tensor] = []

    def grab(module, args, output) -> None:
        captured.append(output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0])

    handle = model.get_decoder().register_forward_hook(grab)
    try:
        model(
            input_ids=ids,
            attention_mask=attn,
            position_ids=pos,
            logits_to_keep=torch.empty(0, dtype=torch.long, device=ids.device),
            use_cache=False,
        )
    finally:
        handle.remove()
    return captured[-1][:, -keep:]  # (N, keep, H)


def output_head_weight(model: torch.nn.Module) -> torch.Tensor:
    """(V, H) weight of the output head as the forward pass just used it (tied or not).

    Under FSDP2 the root keeps its parameters unsharded from forward to backward
    (`models.shard_policy`), so this is the full weight and its gradient flows into the shards.
    """
    if getattr(model.config, "final_logit_softcapping", None):
        raise ValueError(f"{type(model).__name__} soft-caps its logits: chunked log-probs do not support it")
    weight = model.get_output_embeddings().weight
    if hasattr(weight, "full_tensor"):
        raise RuntimeError("the output head is sharded after forward: shard the root with reshard_after_forward=False")
    return weight


def sequence_logprobs(
    model: torch.nn.Module,
    batch: RolloutBatch,
    space: str,
    start_token_id: int,
    temperature: float = 1.0,
    with_entropy: bool = False,
    chunk_tokens: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token log-probs (N, T) of the responses, with or without their prompts.

    conditional: [prompt (left-padded) | response], positions count real tokens from 0.
    marginal: [start token | response], the prompt removed entirely; positions restart at 0.
    Either way the EOS token of a finished response is scored (it is inside `response_mask`).
    The logits are never materialised: the head runs chunk by chunk (`ops.head_logprobs`).
    """
    resp, resp_mask = batch.response_ids, batch.response_mask  # (N, T)
    n, t = resp.shape
    if space == "conditional":
        ids = torch.cat([batch.prompt_ids, resp], dim=1)  # (N, P + T)
        attn = torch.cat([batch.prompt_mask, resp_mask], dim=1)  # (N, P + T)
        pos = (attn.cumsum(1) - 1).clamp(min=0)  # (N, P + T)
    elif space == "marginal":
        start = torch.full((n, 1), start_token_id, dtype=resp.dtype, device=resp.device)
        ids = torch.cat([start, resp], dim=1)  # (N, 1 + T)
        attn = torch.cat([torch.ones_like(start), resp_mask], dim=1)  # (N, 1 + T)
        pos = torch.arange(t + 1, device=resp.device).expand(n, -1)  # (N, 1 + T)
    else:
        raise ValueError(f"space={space!r}: expected 'conditional' or 'marginal'")
    hidden = final_hidden_states(model, ids, attn, pos, t + 1)[:, :-1]  # (N, T, H): position j predicts token j
    weight = output_head_weight(model)  # (V, H)
    return head_logprobs(hidden, weight, resp, temperature, with_entropy, chunk_tokens)


@dataclass
class BackwardResult:
    """What one rollout batch's backward pass produced (gradients are left in the parameters)."""

    loss: torch.Tensor
    adv: torch.Tensor
    keep: torch.Tensor
    kept_tokens: torch.Tensor
    entropy: torch.Tensor | None = None


@dataclass(frozen=True)
class MicroBatching:
    """How a rollout batch is cut for forward/backward (the update does not depend on it).

    Attributes:
        size: samples per micro-batch (None: no limit).
        max_tokens: padded tokens per micro-batch, verl's dynamic batch size (None: no limit).
        chunk_tokens: rows of the output-head chunks (None: `ops.head_logprobs`' 512 MiB default).
    """

    size: int | None = None
    max_tokens: int | None = None
    chunk_tokens: int | None = None


def backward_objective(
    objective: PolicyGradientObjective,
    policy: torch.nn.Module,
    batch: RolloutBatch,
    start_token_id: int,
    temperature: float = 1.0,
    micro: MicroBatching = MicroBatching(),
    reference: torch.nn.Module | None = None,
    backward: Callable[[torch.Tensor], None] = torch.Tensor.backward,
    world_size: int = 1,
    global_sum: Callable[[torch.Tensor], torch.Tensor] = lambda x: x,
    global_max: Callable[[int], int] = lambda x: x,
) -> BackwardResult:
    """Accumulate the gradient of `objective` over a whole rollout batch, micro-batch by micro-batch.

    The token-mean denominator is the number of kept response tokens of the *whole* batch on all
    ranks (`global_sum`), so the gradient does not depend on the micro-batching or `world_size`
    (DDP and FSDP average gradients over ranks, hence the `* world_size`). Every rank runs the
    same number of micro-batches (`global_max`), also when none of its tokens is kept.
    """
    adv, keep = objective.advantages(batch.rewards, batch.group_size)  # (N,), (N,)
    mask = batch.response_mask.float() * keep[:, None].float()  # (N, T)
    kept_tokens = global_sum(mask.sum())
    total = torch.zeros((), device=mask.device)
    if kept_tokens <= 0:  # the same on every rank: nobody runs a forward pass
        return BackwardResult(total, adv, keep, kept_tokens)
    entropy_sum = torch.zeros((), device=mask.device)
    for rows, mb in batch.micro_batches(micro.size, micro.max_tokens, global_max):
        mb_mask = mb.response_mask.float() * keep[rows, None].float()  # (n, T')
        logp, entropy = sequence_logprobs(
            policy, mb, objective.space, start_token_id, temperature, objective.needs_entropy, micro.chunk_tokens
        )  # (n, T'), (n, T') or None
        ref_logp = None
        if objective.needs_reference:
            with torch.no_grad():
                ref_logp, _ = sequence_logprobs(
                    reference, mb, objective.space, start_token_id, temperature, chunk_tokens=micro.chunk_tokens
                )
        token_loss = objective.token_loss(logp, logp.detach(), adv[rows], ref_logp, entropy)  # (n, T')
        loss = (token_loss * mb_mask).sum() / kept_tokens * world_size
        backward(loss)
        total += loss.detach() / world_size
        if entropy is not None:
            entropy_sum += (entropy.detach() * mb_mask).sum()
    entropy_mean = global_sum(entropy_sum) / kept_tokens if objective.needs_entropy else None
    return BackwardResult(total, adv, keep, kept_tokens, entropy_mean)
