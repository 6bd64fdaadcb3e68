"""Verifiable rewards: plain callables `(prompt, completion) -> float`, and a safe way to run them.

A reward is any callable taking a `Prompt` (its `answer` holds the ground truth) and the decoded
completion. Rewards that can tell whether a completion *has* a final answer at all expose
`extract_answer(completion) -> str | None`; that drives the format-validity metric.

`RewardScorer` runs a reward over a whole rollout batch so that one bad completion can never stop
a run: a reward that raises, returns a non-finite value, or runs past `timeout_s` scores 0 and is
counted. Hangs are only recoverable in a separate process, so with a timeout the calls run in a
`pebble` process pool whose stuck worker is killed and replaced (math-verify's own timeouts use
`signal.alarm`, which works in a worker's main thread but not in a thread pool).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field

BOXED = re.compile(r"\\boxed\{")


@dataclass(frozen=True)
class Prompt:
    """One training or evaluation problem: the user turn, its ground truth, where it came from."""

    question: str
    answer: str
    source: str = ""
    system: str | None = None

    def messages(self) -> list[dict[str, str]]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + [{"role": "user", "content": self.question}]


RewardFn = Callable[[Prompt, str], float]


def last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` with balanced braces, or None."""
    starts = [m.end() for m in BOXED.finditer(text)]
    for start in reversed(starts):
        depth, i = 1, start
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth == 0:
            return text[start : i - 1]
    return None


class BoxedExactMatch:
    """1.0 when the last `\\boxed{}` equals the ground truth after whitespace stripping (toy world)."""

    def extract_answer(self, completion: str) -> str | None:
        content = last_boxed(completion)
        return None if content is None else content.strip()

    def __call__(self, prompt: Prompt, completion: str) -> float:
        got = self.extract_answer(completion)
        return float(got is not None and got == str(prompt.answer).strip())


class MathVerifyReward:
    """1.0 when math-verify judges the last `\\boxed{}` equivalent to the ground truth.

    Only the boxed answer is parsed (as the paper's verl reward does), so a number mentioned
    mid-solution is never graded. math-verify's signal-based timeouts need a main thread: run it
    in-process from the training loop or through `RewardScorer`'s process pool.
    """

    def __init__(self, parsing_timeout: int = 5, verify_timeout: int = 5):
        self.parsing_timeout = parsing_timeout
        self.verify_timeout = verify_timeout

    def extract_answer(self, completion: str) -> str | None:
        return last_boxed(completion)

    def __call__(self, prompt: Prompt, completion: str) -> float:
        from math_verify import parse, verify

        boxed = last_boxed(completion)
        if boxed is None:
            return 0.0
        gold = parse(f"${prompt.answer}$", parsing_timeout=self.parsing_timeout)
        pred = parse(f"\\boxed{{{boxed}}}", parsing_timeout=self.parsing_timeout)
        if not gold or not pred:
            return 0.0
        return float(verify(gold, pred, timeout_seconds=self.verify_timeout))


@dataclass
class ScoreResult:
    """Rewards for a batch plus what went wrong on the way."""

    rewards: list[float]
    has_answer: list[bool | None]
    errors: int = 0
    timeouts: int = 0
    messages: list[str] = field(default_factory=list)


def _score_one(reward_fn: RewardFn, prompt: Prompt, completion: str) -> float:
    value = float(reward_fn(prompt, completion))
    if not math.isfinite(value):
        raise ValueError(f"reward returned {value}")
    return value


def _has_answer(extract: Callable[[str], str | None] | None, completion: str) -> bool | None:
    """Does the completion hold a parseable final answer? None when the reward cannot tell."""
    if extract is None:
        return None
    try:
        return extract(completion) is not None
    except Exception:  # a broken extractor must not stop the run; the sample counts as unknown
        return None


class RewardScorer:
    """Scores completions with a reward, turning exceptions and hangs into a counted 0.

    Args:
        reward_fn: the reward callable (must be picklable when `timeout_s` is set).
        timeout_s: per-completion limit; None scores in-process with no limit.
        workers: processes in the pool when `timeout_s` is set.
    """

    def __init__(self, reward_fn: RewardFn, timeout_s: float | None = None, workers: int = 1):
        self.reward_fn = reward_fn
        self.timeout_s = timeout_s
        self.workers = workers
        self._pool = None

    def _get_pool(self):
        if self._pool is None:
            import multiprocessing

            from pebble import ProcessPool

            # spawn: a forked child would inherit the trainer's threads and OpenMP state
            ctx = multiprocessing.get_context("spawn")
            self._pool = ProcessPool(max_workers=self.workers, context=ctx)
        return self._pool

    def close(self) -> None:
        if self._pool is not None:
            self._pool.stop()
            self._pool.join()
            self._pool = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def __getstate__(self):
        return {**self.__dict__, "_pool": None}

    def score(self, prompts: Sequence[Prompt], completions: Sequence[str]) -> ScoreResult:
        """Scores `completions[i]` against `prompts[i]`; never raises for a bad completion."""
        extract = getattr(self.reward_fn, "extract_answer", None)
        result = ScoreResult(
            rewards=[0.0] * len(completions),
            has_answer=[_has_answer(extract, c) for c in completions],
        )
        if self.timeout_s is None:
            for i, (p, c) in enumerate(zip(prompts, completions, strict=True)):
                try:
                    result.rewards[i] = _score_one(self.reward_fn, p, c)
                except Exception as exc:  # a bad completion must never stop the run
                    result.errors += 1
                    result.messages.append(f"{type(exc).__name__}: {exc}")
            return result
        pool = self._get_pool()
        futures = [
            pool.schedule(_score_one, args=(self.reward_fn, p, c), timeout=self.timeout_s)
            for p, c in zip(prompts, completions, strict=True)
        ]
        for i, fut in enumerate(futures):
            try:
                result.rewards[i] = fut.result()
            except FutureTimeout:
                result.timeouts += 1
                result.messages.append(f"timeout after {self.timeout_s}s")
            except Exception as exc:
                result.errors += 1
                result.messages.append(f"{type(exc).__name__}: {exc}")
        return result
