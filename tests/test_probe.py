"""The real-model probe's arithmetic (lightning_prerl.reproduction.probe) on a hand-built bigram model."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import torch

from lightning_prerl.reproduction.probe import boundaries, continuation_logprobs, per_problem


class Bigram(torch.nn.Module):
    """Next-token logits read from a table by the current token: P(b | ..., a) = softmax(table[a])[b]."""

    def __init__(self, probs: list[list[float]]):
        super().__init__()
        self.table = torch.nn.Parameter(torch.tensor(probs).log())  # (V, V)

    def forward(self, input_ids, attention_mask=None):
        return SimpleNamespace(logits=self.table[input_ids])  # (B, T, V)


def test_continuation_logprobs_by_hand_across_padded_rows():
    model = Bigram([[0.25, 0.5, 0.25], [0.25, 0.25, 0.5], [1 / 3, 1 / 3, 1 / 3]])
    rows = [([0], [1, 2]), ([2, 2, 1], [2]), ([1, 0], [0])]
    got = continuation_logprobs(model, rows, batch_size=2)  # two batches, the first padded to 4 tokens
    # P(1|0) P(2|1) = 1/2 * 1/2; P(2|1) = 1/2 (the context's own tokens never count); P(0|0) = 1/4
    assert torch.allclose(got, torch.tensor([math.log(0.25), math.log(0.5), math.log(0.25)], dtype=torch.float64))


def test_boundaries_and_per_problem_means():
    assert boundaries("12+7=19. The answer is 19.") == [(8, " ")]
    assert boundaries("a\n\nb: c") == [(1, "\n\n"), (5, " ")]  # contexts "a" and "a\n\nb:"
    assert boundaries("no end. ") == []  # a sentence end that nothing follows is no boundary
    change = np.array([1.0, 3.0, 5.0, 7.0, 10.0, 10.0])  # 3 boundaries x 2 openings
    assert per_problem(change, [2, 1], openings=2).tolist() == [4.0, 10.0]  # (2 + 6) / 2, 10
