"""Pure-torch pieces of every policy-gradient loss: PPO clipping, KL estimators, entropy.

Shape letters: N samples in the (micro-)batch, T response tokens, V vocabulary.
Nothing here knows about Lightning, rollouts or models.
"""

from __future__ import annotations

import torch


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

    Gathers the target logit and subtracts logsumexp instead of materialising a full (N, T, V)
    log-softmax: with 50k-150k-token vocabularies the logits dominate memory.

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
