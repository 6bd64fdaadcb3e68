"""Per-token log-probs of responses under a context space, without ever holding the (N, T, V) logits.

The final hidden states come from the model's own forward with no logits computed (`final_hidden_states`),
then the output head runs chunk by chunk (`ops.head_logprobs`). Rows that share a context (GRPO's G samples
of a prompt) can forward it once (`shared_context_hidden_states`). Pure torch over a Hugging Face causal LM;
`update.py` calls it micro-batch by micro-batch, `reports.alignment` for gradients.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache

from lightning_prerl.data.batch import RolloutBatch
from lightning_prerl.objectives.ops import head_logprobs
from lightning_prerl.objectives.spaces import bind_space
from lightning_prerl.scale.zero import through_own_call


def final_hidden_states(model: torch.nn.Module, ids, attn, pos, keep: int, cache=None) -> torch.Tensor:
    """(N, keep, H) final-norm hidden states of the last `keep` positions, via the model's own forward
    (after the cached positions of `cache`, a transformers `Cache` the pass extends, when given).

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
            past_key_values=cache,
            use_cache=cache is not None,
        )
    finally:
        handle.remove()
    return captured[-1][:, -keep:]  # (N, keep, H)


def context_sharing(ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(U,) the first row of each distinct context and (N,) each row's distinct context, from the
    (N, C) context ids and mask (GRPO's G samples of a prompt share it, wherever a micro-batch holds them)."""
    rows = torch.cat([ids, mask], dim=1)  # (N, 2C): same ids, same padding
    _, inverse = torch.unique(rows, dim=0, return_inverse=True)  # (N,)
    n, u = len(inverse), int(inverse.max()) + 1
    order = torch.arange(n, device=inverse.device)
    first = torch.full((u,), n, device=inverse.device).scatter_reduce(0, inverse, order, "amin")  # (U,)
    return first, inverse


def shared_context_hidden_states(
    model: torch.nn.Module, ctx_ids: torch.Tensor, ctx_mask: torch.Tensor, batch: RolloutBatch
) -> torch.Tensor:
    """(N, T, H) hidden states that predict the responses, each distinct context forwarded once.

    The contexts' (N, C) keys and values (with their autograd graph) are computed on the U distinct
    contexts, indexed out to the N rows and extended by the responses' pass: the same causal attention
    as one [context | response] pass, with the context tokens' share of the compute divided by the rows
    per prompt. The last context position (which predicts the first response token) comes from the
    first pass. Always two forward calls, also when no context repeats: sharded (FSDP2, ZeRO-3) ranks
    must gather parameters in lockstep whatever their rows hold.
    """
    first, inverse = context_sharing(ctx_ids, ctx_mask)  # (U,), (N,)
    c_ids, c_mask = ctx_ids[first], ctx_mask[first]  # (U, C)
    cache = DynamicCache(config=model.config)
    last = final_hidden_states(model, c_ids, c_mask, (c_mask.cumsum(1) - 1).clamp(min=0), 1, cache)  # (U, 1, H)
    cache.batch_select_indices(inverse)  # (U, ...) -> (N, ...) in every layer, differentiably
    attn = torch.cat([ctx_mask, batch.response_mask], dim=1)  # (N, C + T)
    pos = (attn.cumsum(1) - 1).clamp(min=0)[:, ctx_ids.shape[1] :]  # (N, T)
    t = batch.response_ids.shape[1]
    responses = final_hidden_states(model, batch.response_ids, attn, pos, t, cache)  # (N, T, H)
    return torch.cat([last[inverse], responses[:, :-1]], dim=1)  # (N, T, H)


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
    space: str | object,
    start_token_id: int,
    temperature: float = 1.0,
    with_entropy: bool = False,
    chunk_tokens: int | None = None,
    entropy_grad: bool = True,
    share_prompts: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token log-probs (N, T) of the responses after the context of `space` (and the entropy,
    differentiable or only measured: `entropy_grad`).

    `space` is a registered space's name (default parameters), a `{space, space_args}` mapping or a
    bound space (`objective.context`): it maps the batch to the left-padded (N, C) context that
    replaces the prompt (`objectives/spaces.py`): conditional, the whole prompt; marginal, the start
    token alone; system, question, fixed, last_k, in between. The sequence is [context | response],
    positions count real tokens from 0 (marginal: 0..C+T-1 through the response padding, as always).
    With `share_prompts`, rows with the same context share one forward of it
    (`shared_context_hidden_states`; not for marginal's one-token context, and not under activation
    checkpointing, which drops the cache).
    Either way the EOS token of a finished response is scored (it is inside `response_mask`).
    The logits are never materialised: the head runs chunk by chunk (`ops.head_logprobs`).
    """
    context = bind_space(space)
    ctx_ids, ctx_mask = context(batch, start_token_id)  # (N, C), (N, C)
    resp, resp_mask = batch.response_ids, batch.response_mask  # (N, T)
    t = resp.shape[1]
    checkpointing = getattr(model, "is_gradient_checkpointing", False)
    if share_prompts and getattr(context, "shares_context", True) and not checkpointing:
        hidden = shared_context_hidden_states(model, ctx_ids, ctx_mask, batch)  # (N, T, H)
    else:
        ids = torch.cat([ctx_ids, resp], dim=1)  # (N, C + T)
        attn = torch.cat([ctx_mask, resp_mask], dim=1)  # (N, C + T)
        pos = (attn.cumsum(1) - 1).clamp(min=0)  # (N, C + T) real tokens counted from 0
        if getattr(context, "positions_through_padding", False):  # marginal: 0..C+T-1, padding too
            pos = torch.arange(ids.shape[1], device=ids.device).expand(ids.shape[0], -1)  # (N, C + T)
        hidden = final_hidden_states(model, ids, attn, pos, t + 1)[:, :-1]  # (N, T, H): position j predicts token j

    def score(weight: torch.Tensor):  # weight (V, H)
        return head_logprobs(hidden, weight, resp, temperature, with_entropy, chunk_tokens, entropy_grad)

    head = model.get_output_embeddings()
    if hasattr(head.weight, "ds_id"):  # ZeRO-3 released it after the forward: the head's hooks gather it
        return through_own_call(head, score)
    return score(output_head_weight(model))
