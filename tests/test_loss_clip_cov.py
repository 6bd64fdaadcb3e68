"""Clip-Cov (arXiv 2505.22617): covariance-selected tokens lose their gradient, by hand."""

from __future__ import annotations

import torch
from hydra.utils import instantiate

from lightning_prerl.objectives import PolicyGradientObjective as PG
from tests.test_config import compose_cfg


def test_clip_cov_detaches_tokens_of_high_covariance_by_hand():
    """A = +1, -1; log pi = [[-1, -5], [-4, -2]], on-policy; mean A = 0, mean log pi = -3 over 4 tokens:
    cov = A (log pi + 3) = [[2, -2], [-1, 1]]. In (1, 5): token (0, 0) only (1 is not > 1).
    With select_ratio 0.5, max(int(0.5 * 4), 1) = 2 >= 1 candidate: (0, 0) is detached.
    loss_it = -A_i (rho = 1): [[-1, -1], [1, 1]], token mean 0; d/d log pi = -A_i / 4 except (0, 0): 0."""
    assert instantiate(compose_cfg("objective=clip_cov").objective).loss_args["select_ratio"] == 2e-4
    obj = PG(policy_loss="clip_cov", loss_args={"select_ratio": 0.5})
    logp = torch.tensor([[-1.0, -5.0], [-4.0, -2.0]], requires_grad=True)  # (2, 2)
    mask = torch.ones(2, 2)
    terms = obj.loss_terms(logp, logp.detach(), torch.tensor([1.0, -1.0]), mask=mask)
    assert terms.loss.tolist() == [[-1.0, -1.0], [1.0, 1.0]]  # detached, not zeroed
    assert terms.clipped.tolist() == [[True, False], [False, False]]
    (terms.loss * mask).sum().div(4).backward()
    assert logp.grad.tolist() == [[0.0, -0.25], [0.25, 0.25]]  # exact in binary


def test_clip_cov_draws_its_share_of_the_candidates_at_random():
    """cov = A (log pi - mean): [[2, -2], [2, -2]] has two candidates; select_ratio 0.25 -> one token,
    either, drawn from torch's generator (the same seed, the same token)."""
    obj = PG(policy_loss="clip_cov", loss_args={"select_ratio": 0.25})
    logp = torch.tensor([[-1.0, -5.0], [-5.0, -1.0]])
    picks = set()
    for seed in range(8):
        torch.manual_seed(seed)
        clipped = obj.loss_terms(logp, logp, torch.tensor([1.0, -1.0]), mask=torch.ones(2, 2)).clipped
        assert clipped.sum() == 1 and (clipped[0, 0] or clipped[1, 0])
        picks.add(tuple(clipped.flatten().tolist()))
    assert len(picks) == 2
