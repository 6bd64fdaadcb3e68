"""A reward for runs of random-init models, whose completions never hold a right answer: 1 for an
even number of characters, so groups are mixed and every objective has something to learn from."""

from __future__ import annotations


class LengthParity:
    def __call__(self, prompt, completion: str) -> float:
        return float(len(completion) % 2 == 0)
