"""Pure-torch pieces of every policy-gradient loss: PPO clipping, KL estimators, entropy.

Shape letters: N samples in the (micro-)batch, T response tokens, V vocabulary.
Nothing here knows about Lightning, rollouts or models.
"""

from __future__ import annotations

import torch

LOGITS_CHUNK_BYTES = 512 * 2**20  # float32 logits of one output-head chunk (`head_logprobs`)


def ppo_clip_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    adv: torch.Tensor,
    eps_low: float,
    eps_high: float,
    clip_c: float | None,
) -> torch.Tensor:
    """Per-token PPO-clip surrogate with dual clip (as verl's `compute_policy_loss_vanilla`).

    Args:
        logp: (N, T) log-probs under the policy being updated.
        old_logp: (N, T) log-probs under the policy that produced the rollouts.
        adv: (N,) sequence-level advantages, broadcast over tokens.
        eps_low, eps_high: the ratio is clipped to [1 - eps_low, 1 + eps_high].
        clip_c: dual-clip bound (> 1) for negative advantages; None disables it.

    Returns:
        (N, T) per-token loss, not yet masked or averaged.
    """
    a = adv[:, None]  # (N, 1)
    ratio = torch.exp(torch.clamp(logp - old_logp, -20.0, 20.0))  # (N, T)
    unclipped = -a * ratio  # (N, T)
    clipped = -a * torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high)  # (N, T)
    loss = torch.maximum(unclipped, clipped)  # (N, T)
    if clip_c is not None:
        capped = torch.minimum(loss, -a * clip_c)  # (N, T)
        loss = torch.where(a < 0, capped, loss)
    return loss


def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-token KL(pi || pi_ref) estimate from sampled tokens (Schulman's k1/k2/k3).

    Args:
        logp, ref_logp: (N, T) log-probs of the sampled tokens.
        kind: "k1" (log-ratio), "k2" (half squared log-ratio) or "k3" (low-variance, clamped to
            [-10, 10] as in verl).

    Returns:
        (N, T) estimates.
    """
    log_ratio = logp - ref_logp  # (N, T)
    if kind == "k1":
        return log_ratio
    if kind == "k2":
        return 0.5 * log_ratio.square()
    if kind == "k3":
        return torch.clamp(torch.exp(-log_ratio) + log_ratio - 1.0, -10.0, 10.0)
    raise ValueError(f"kl estimator {kind!r}: expected one of k1, k2, k3")


def token_logprobs_and_entropy(
    logits: torch.Tensor, targets: torch.Tensor, temperature: float, with_entropy: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs of `targets` under temperature-scaled logits, and optionally the entropy.

    The unchunked reference: it needs the whole (N, T, V) logits. Training goes through
    `head_logprobs`, which never holds them; this one serves tests and small diagnostics.

    Args:
        logits: (N, T, V) logits that predict `targets`.
        targets: (N, T) token ids.

    Returns:
        logp (N, T) and entropy (N, T) or None.
    """
    logits = logits.float()  # (N, T, V); no copy when already float32
    if temperature != 1.0:
        logits = logits / temperature
    logp = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)  # (N, T)
    if not with_entropy:
        return logp, None
    logprobs = torch.log_softmax(logits, dim=-1)  # (N, T, V)
    entropy = -(logprobs.exp() * logprobs).sum(-1)  # (N, T)
    return logp, entropy


def _chunk_logp_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor):
    """One chunk: hidden (C, H), weight (V, H), targets (C,) -> logp (C,), entropy (C,), float32."""
    logits = (hidden @ weight.T).float()  # (C, V)
    lse = torch.logsumexp(logits, dim=-1)  # (C,)
    logp = logits.gather(-1, targets[:, None]).squeeze(-1) - lse  # (C,)
    probs = torch.exp(logits - lse[:, None])  # (C, V)
    entropy = lse - (probs * logits).sum(-1)  # (C,)
    return logp, entropy


def head_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 1.0,
    with_entropy: bool = False,
    chunk_tokens: int | None = None,
    entropy_grad: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs (and entropy) of `targets` through the output head, never holding (N, T, V).

    Log-probs go through PyTorch's chunked `linear_cross_entropy` (reduction "none": per-token
    -log p, logits recomputed chunk by chunk in backward, float32 accumulation for bf16 inputs, the
    head's weight gradient included: `lce_options`).
    The entropy has no library kernel: chunks of `chunk_tokens` rows run under activation
    checkpointing, so forward keeps no logits and backward recomputes one chunk at a time. An entropy
    that is only logged (`entropy_grad=False`) comes from the same chunk function without gradients,
    beside the library log-probs, so logging it never changes the update.
    Temperature scales the hidden states (logits / tau = (h / tau) W^T). Under autocast both
    operands are cast to the autocast dtype, as autocast does for the model's own head (the final
    norm hands back float32 when its weight is a float32 master weight).

    Args:
        hidden: (N, T, H) final hidden states that predict `targets` (after the final norm).
        weight: (V, H) output-head weight, unsharded.
        targets: (N, T) token ids.
        chunk_tokens: rows per chunk. None: as many rows as fit 512 MiB of float32 logits (883 rows
            at a 151,936-token vocabulary; the whole batch for small vocabularies). torch's own
            automatic choice is far smaller (4 rows at T = 1,024 on CPU): each chunk re-reads the
            whole weight, and that made it 7x slower than the unchunked head (benchmarks/logprob_memory.py).

    Returns:
        logp (N, T) float32 and entropy (N, T) float32 or None.
    """
    n, t, h = hidden.shape
    flat = hidden.reshape(n * t, h)  # (N*T, H)
    if temperature != 1.0:
        flat = flat / temperature
    if torch.is_autocast_enabled(flat.device.type):
        flat = flat.to(torch.get_autocast_dtype(flat.device.type))
    weight = weight.to(flat.dtype)  # (V, H)
    tgt = targets.reshape(n * t)  # (N*T,)
    size = chunk_tokens or max(256, LOGITS_CHUNK_BYTES // (4 * weight.shape[0]))
    if (not with_entropy or not entropy_grad) and hasattr(torch.nn.functional, "linear_cross_entropy"):
        options = lce_options(min(size, n * t), flat.device, flat.dtype)
        nll = torch.nn.functional.linear_cross_entropy(flat, weight, tgt, reduction="none", options=options)
        if not with_entropy:
            return -nll.float().view(n, t), None  # (N, T)
        with torch.no_grad():
            chunks = [
                _chunk_logp_entropy(flat[i : i + size], weight, tgt[i : i + size])[1] for i in range(0, n * t, size)
            ]
        return -nll.float().view(n, t), torch.cat(chunks).view(n, t)  # (N, T), (N, T)
    # the entropy's gradient, or a torch without `linear_cross_entropy` (< 2.13, e.g. the GPU image's 2.11)
    from torch.utils.checkpoint import checkpoint

    logps, entropies = [], []
    for start in range(0, n * t, size):
        rows = slice(start, start + size)
        logp, entropy = checkpoint(_chunk_logp_entropy, flat[rows], weight, tgt[rows], use_reentrant=False)
        logps.append(logp)
        entropies.append(entropy)
    logp, entropy = torch.cat(logps).view(n, t), torch.cat(entropies).view(n, t)  # (N, T), (N, T)
    if not with_entropy:
        return logp, None
    return logp, entropy if entropy_grad else entropy.detach()


def lce_options(chunk_rows: int, device: torch.device, dtype: torch.dtype):
    """`linear_cross_entropy` options: `chunk_rows` rows per chunk, float32 accumulation.

    torch's "auto" policy resolves per (device, dtype) (`linear_cross_entropy_options._AUTO_DEFAULTS`):
    on CUDA with bf16/fp16 inputs it picks "compact", which adds every chunk's weight gradient into the
    low-precision gradient tensor itself (`addmm_`), so the head's gradient is summed in bf16 across
    chunks. "balanced" keeps a float32 (V, H) scratch for that sum (1.56 GB for Qwen3-4B's 151,936 x
    2,560 head, 0.62 GB for Qwen3-0.6B's x 1,024); on CPU "accurate" is torch's own pick and the only
    policy whose weight-gradient matmul runs in float32 there. torch 2.14 (the GPU install's) has no
    "balanced" (`_VALID_ACC_POLICIES = ("auto", "accurate", "compact")` in linear_cross_entropy_options.py):
    there "accurate" is the one policy left with the float32 scratch. An explicit policy resolves
    `acc_dtype` None to the input dtype, so float32 is named here.
    """
    policy = "accurate" if device.type == "cpu" else "balanced"
    acc = torch.float32 if dtype in (torch.bfloat16, torch.float16) else None
    try:
        return torch.nn.LinearCrossEntropyOptions(batch_chunk_size=chunk_rows, acc_policy=policy, acc_dtype=acc)
    except ValueError:  # "invalid acc_policy: 'balanced'" (torch >= 2.14)
        return torch.nn.LinearCrossEntropyOptions(batch_chunk_size=chunk_rows, acc_policy="accurate", acc_dtype=acc)
