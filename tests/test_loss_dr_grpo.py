"""Dr.GRPO (arXiv 2503.20783): group-mean advantages, PPO-clip, a constant normaliser; by hand."""

from __future__ import annotations

import pytest
import torch
from hydra.utils import instantiate

from tests.test_config import compose_cfg


def test_dr_grpo_divides_the_token_sum_by_samples_times_the_budget_by_hand():
    """One group, rewards 1, 0, 0, 0: A = r - 0.25 = 0.75, -0.25, -0.25, -0.25 (no std division; GRPO's
    would be 1.5, -0.5, -0.5, -0.5). Lengths 1, 3, 2, 2, budget L = 4, on-policy (rho = 1):
    loss_it = -A_i, so loss = sum_i -A_i len_i / (4 samples x 4) = -(0.75 - 0.75 - 0.5 - 0.5) / 16 = 1/16,
    and d loss / d logp_it = -A_i / 16 on every kept token (-0.75/16 on sample 0), whatever its length."""
    cfg = compose_cfg("objective=dr_grpo", "data.sampling.max_new_tokens=4")
    obj = instantiate(cfg.objective)
    assert (obj.advantage, obj.aggregation, obj.aggregation_args) == ("group_mean", "constant", {"length": 4})
    adv, keep = obj.advantages(torch.tensor([1.0, 0.0, 0.0, 0.0]), 4)  # (4,)
    assert adv.tolist() == pytest.approx([0.75, -0.25, -0.25, -0.25]) and keep.all()
    mask = torch.tensor([[1, 0, 0, 0], [1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 0, 0]]).float()  # (4, 4)
    logp = torch.full((4, 4), -1.0, requires_grad=True)
    terms = obj.loss_terms(logp, logp.detach(), adv, mask=mask)
    loss = (terms.loss * obj.loss_weights(mask)).sum() / obj.loss_count(mask, keep)
    assert loss.item() == pytest.approx(1 / 16)
    loss.backward()
    assert logp.grad[0, 0].item() == pytest.approx(-0.75 / 16)
    assert logp.grad[1].tolist() == pytest.approx([0.25 / 16] * 3 + [0.0])
