"""SAPO (arXiv 2511.20347): the soft gate sigmoid(tau (rho - 1)) * 4 / tau, by hand."""

from __future__ import annotations

import math

import pytest
import torch
from hydra.utils import instantiate

from tests.test_config import compose_cfg


def _sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z))


def test_sapo_gates_the_ratio_softly_by_hand():
    """Token 0: A = +1, rho = e^0.5 = 1.6487, tau_pos = 1: sigma = sigmoid(0.6487) = 0.6567;
    loss = -4 sigma = -2.627; d loss / d log pi = -4 sigma (1 - sigma) rho = -1.487 (PPO-clip: 0).
    Token 1: A = -1, rho = 1, tau_neg = 1.05: loss = +0.5 * 4 / 1.05 = 1.905; the gradient weight
    4 * 0.5 * 0.5 * 1 = 1: on-policy SAPO is the plain policy gradient.
    seq-mean-token-mean over two one-token sequences halves both gradients."""
    obj = instantiate(compose_cfg("objective=sapo").objective)
    assert obj.loss_args == {"tau_pos": 1.0, "tau_neg": 1.05} and obj.aggregation == "seq-mean-token-mean"
    logp = torch.tensor([[0.5], [-2.0]], requires_grad=True)  # (2, 1)
    old = torch.tensor([[0.0], [-2.0]])
    mask = torch.ones(2, 1)
    terms = obj.loss_terms(logp, old, torch.tensor([1.0, -1.0]), mask=mask)
    sigma, rho = _sigmoid(math.exp(0.5) - 1.0), math.exp(0.5)
    assert terms.loss.squeeze(1).tolist() == pytest.approx([-4 * sigma, 2 / 1.05])
    assert not terms.clipped.any()
    loss = (terms.loss * obj.loss_weights(mask)).sum() / obj.loss_count(mask, torch.ones(2, dtype=torch.bool))
    loss.backward()
    assert logp.grad.squeeze(1).tolist() == pytest.approx([-4 * sigma * (1 - sigma) * rho / 2, 1.0 / 2])
