"""GSPO (arXiv 2507.18071): the sequence-level geometric-mean ratio and its clip, by hand."""

from __future__ import annotations

import math

import pytest
import torch
from hydra.utils import instantiate

from tests.test_config import compose_cfg


def test_gspo_clips_whole_sequences_on_their_geometric_mean_ratio_by_hand():
    """Sample 0: A = +1, log-ratios 0.1, 0.3 -> s = exp(0.2) = 1.2214 > 1 + 4e-4: clipped, loss -1.0004 on
    both tokens, no gradient (token-level PPO would clip the tokens one by one).
    Sample 1: A = -1, log-ratios 1e-4, -3e-4 -> s = exp(-1e-4) in [1 - 3e-4, 1 + 4e-4]: loss +s, and
    d loss_1 / d logp_1t = s / |y_1| = s / 2 on each token (the 1/|y| of the geometric mean).
    seq-mean-token-mean: (-1.0004 + s) / 2 sequences; the token weights 1/2 make each sample's tokens
    sum to its sequence gradient, so d/d logp_1t = (s / 2) / 2."""
    obj = instantiate(compose_cfg("objective=gspo").objective)
    assert (obj.policy_loss, obj.aggregation, obj.eps_low, obj.eps_high) == ("gspo", "seq-mean-token-mean", 3e-4, 4e-4)
    old = torch.zeros(2, 3)
    logp = torch.tensor([[0.1, 0.3, 0.0], [1e-4, -3e-4, 0.0]], requires_grad=True)  # (2, 3)
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]])  # (2, 3): third token is padding
    adv = torch.tensor([1.0, -1.0])
    terms = obj.loss_terms(logp, old, adv, mask=mask)
    s = math.exp(-1e-4)
    assert terms.loss[0, :2].tolist() == pytest.approx([-1.0004] * 2)
    assert terms.loss[1, :2].tolist() == pytest.approx([s] * 2)
    assert terms.clipped[:, :2].tolist() == [[True, True], [False, False]]
    loss = (terms.loss * obj.loss_weights(mask)).sum() / obj.loss_count(mask, torch.ones(2, dtype=torch.bool))
    assert loss.item() == pytest.approx((-1.0004 + s) / 2, abs=1e-6)  # float32 sums
    loss.backward()
    assert torch.allclose(logp.grad, torch.tensor([[0.0, 0.0, 0.0], [s / 4, s / 4, 0.0]]))
