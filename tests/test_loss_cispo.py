"""CISPO (arXiv 2506.13585): the clipped, detached IS weight times A log pi; every token keeps a gradient."""

from __future__ import annotations

import math

import pytest
import torch
from hydra.utils import instantiate

from tests.test_config import compose_cfg


def test_cispo_clips_the_weight_not_the_token_by_hand():
    """Token 0: A = +1, log pi = -1.0, old -1.5: rho = e^0.5 = 1.649 > 1.28 -> w = 1.28 (clipped);
    loss = -1.28 * 1 * (-1.0) = 1.28 and d/d log pi = -1.28 (PPO-clip would give 0 here).
    Token 1: A = -1, log pi = -3.0, old -1.0: rho = e^-2 = 0.135, no lower bound -> w = e^-2;
    loss = -e^-2 * (-1) * (-3) = -3 e^-2 and d/d log pi = +e^-2. Token mean over 2 tokens halves both."""
    obj = instantiate(compose_cfg("objective=cispo").objective)
    assert obj.loss_args == {"eps_low_is": 1.0, "eps_high_is": 0.28} and obj.aggregation == "token-mean"
    logp = torch.tensor([[-1.0], [-3.0]], requires_grad=True)  # (2, 1)
    old = torch.tensor([[-1.5], [-1.0]])
    mask = torch.ones(2, 1)
    terms = obj.loss_terms(logp, old, torch.tensor([1.0, -1.0]), mask=mask)
    assert terms.loss.squeeze(1).tolist() == pytest.approx([1.28, -3 * math.exp(-2)])
    assert terms.clipped.squeeze(1).tolist() == [True, False]
    loss = (terms.loss * obj.loss_weights(mask)).sum() / obj.loss_count(mask, torch.ones(2, dtype=torch.bool))
    loss.backward()
    assert logp.grad.squeeze(1).tolist() == pytest.approx([-1.28 / 2, math.exp(-2) / 2])
