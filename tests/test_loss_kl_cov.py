"""KL-Cov (arXiv 2505.22617): a |log ratio| penalty on the tokens of highest covariance, by hand."""

from __future__ import annotations

import math

import pytest
import torch
from hydra.utils import instantiate

from tests.test_config import compose_cfg


def test_kl_cov_penalises_the_top_covariance_token_by_hand():
    """A = +1, -1; log pi = [[-1, -5], [-4, -2]]: mean A = 0, mean log pi = -3, cov = A (log pi + 3) =
    [[2, -2], [-1, 1]]. select_ratio 0.25 -> max(int(0.25 * 4), 1) = 1 token: (0, 0), cov 2.
    Old log-probs 0.1 lower everywhere: rho = e^0.1. loss_it = -A_i e^0.1, plus |0.1| at (0, 0);
    d/d log pi = -A_i e^0.1, plus sign(0.1) * 1 at (0, 0); the token mean divides by 4."""
    obj = instantiate(compose_cfg("objective=kl_cov", "objective.loss_args.select_ratio=0.25").objective)
    assert obj.loss_args == {"select_ratio": 0.25, "penalty_coef": 1.0} and obj.policy_loss == "kl_cov"
    logp = torch.tensor([[-1.0, -5.0], [-4.0, -2.0]], requires_grad=True)  # (2, 2)
    mask = torch.ones(2, 2)
    terms = obj.loss_terms(logp, logp.detach() - 0.1, torch.tensor([1.0, -1.0]), mask=mask)
    e = math.exp(0.1)
    assert terms.loss.flatten().tolist() == pytest.approx([-e + 0.1, -e, e, e])
    assert terms.clipped.tolist() == [[True, False], [False, False]]
    (terms.loss * mask).sum().div(4).backward()
    assert logp.grad.flatten().tolist() == pytest.approx([(-e + 1) / 4, -e / 4, e / 4, e / 4])
