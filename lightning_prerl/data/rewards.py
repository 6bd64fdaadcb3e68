"""Verifiable rewards: plain callables `(prompt, completion) -> float`, and a safe way to run them.

A reward is any callable taking a `Prompt` (its `answer` holds the ground truth) and the decoded
completion. Rewards that can tell whether a completion *has* a final answer at all expose
`extract_answer(completion) -> str | None`; that drives the format-validity metric.

`RewardScorer` runs a reward over a whole rollout batch so that one bad completion can never stop
a run: a reward that raises, returns a non-finite value, or runs past `timeout_s` scores 0 and is
counted. Hangs are only recoverable in a separate process, so with a timeout the calls run in a
`pebble` process pool whose stuck worker is killed and replaced (math-verify's own timeouts use
`signal.alarm`, which works in a worker's main thread but not in a thread pool). The answer
extraction behind format validity runs in the same pool call, so a hang there is one timeout too.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Sequence
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field

BOXED = re.compile(r"\\boxed\{")
BRACES = re.compile(r"[{}]")
NUMBER = re.compile(r"-?\d+(?:\.\d+)?")  # a thousands separator is dropped before matching: 1,234 -> 1234
MESSAGE_CHARS = 300  # an error message may quote a 1 MB completion; the log needs only its head


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
    """Content of the last `\\boxed{...}` with balanced braces, or None.

    One left-to-right pass matches every brace with a stack, so the cost is linear in the text: rescanning
    from each `\\boxed{` was quadratic, seconds for a completion that repeats an unclosed `\\boxed{`.
    """
    boxes = {m.end() - 1 for m in BOXED.finditer(text)}  # positions of each box's opening brace
    if not boxes:
        return None
    stack: list[int] = []
    last: tuple[int, int] | None = None  # (open, close) of the latest-opening box that closes
    for m in BRACES.finditer(text):
        i = m.start()
        if text[i] == "{":
            stack.append(i)
        elif stack:  # a stray "}" closes nothing
            j = stack.pop()
            # boxes close in any order (a closed box can hold a later-opening one): keep the latest opener
            if j in boxes and (last is None or j > last[0]):
                last = (j, i)
    return None if last is None else text[last[0] + 1 : last[1]]


class BoxedExactMatch:
    """1.0 when the last `\\boxed{}` equals the ground truth after whitespace stripping (toy world)."""

    def extract_answer(self, completion: str) -> str | None:
        content = last_boxed(completion)
        return None if content is None else content.strip()

    def __call__(self, prompt: Prompt, completion: str) -> float:
        got = self.extract_answer(completion)
        return float(got is not None and got == str(prompt.answer).strip())


class LastNumberMatch:
    """1.0 when the completion's last number equals the ground truth as a number (a small chat model's
    arithmetic, `experiment=smollm2_learns`): "16+42=58. The answer is 58." scores 1 for 58, and so does
    "58.0"; thousands separators are ignored. No number at all: no answer (format validity)."""

    def extract_answer(self, completion: str) -> str | None:
        numbers = NUMBER.findall(completion.replace(",", ""))
        return numbers[-1] if numbers else None

    def __call__(self, prompt: Prompt, completion: str) -> float:
        got = self.extract_answer(completion)
        try:
            return float(got is not None and float(got) == float(str(prompt.answer).replace(",", "")))
        except ValueError:  # a ground truth that is not a number never matches
            return 0.0


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


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:MESSAGE_CHARS]


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


def _check_and_score(reward_fn: RewardFn, prompt: Prompt, completion: str) -> tuple[bool | None, float, str | None]:
    """(has_answer, reward, error message or None) of one completion.

    One call does both so that, in the pool, a hang in either is a single timeout; the error comes back as
    text because an exception raised in a worker may not survive pickling.
    """
    has = _has_answer(getattr(reward_fn, "extract_answer", None), completion)
    try:
        return has, _score_one(reward_fn, prompt, completion), None
    except Exception as exc:  # a bad completion must never stop the run
        return has, 0.0, _describe(exc)


def machine_cores() -> int:
    """Cores this process may run on: its affinity mask (a container's or a Slurm job's share)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def available_cores(ranks_per_node: int | None = None) -> int:
    """This process's share of the CPU cores: `machine_cores()` divided by the training ranks on this
    node, so 8 GPU ranks do not each start a pool as large as the whole node. `ranks_per_node` comes
    from the trainer (`Trainer.num_devices`); None reads torchrun's `LOCAL_WORLD_SIZE` (Lightning's own
    launcher sets only LOCAL_RANK, NODE_RANK and WORLD_SIZE: launchers/subprocess_script.py)."""
    ranks = ranks_per_node or int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(1, machine_cores() // max(1, ranks))


class RewardScorer:
    """Scores completions with a reward, turning exceptions and hangs into a counted 0.

    Args:
        reward_fn: the reward callable (must be picklable when `timeout_s` is set).
        timeout_s: per-completion limit on answer extraction plus reward; None runs both in-process with
            no limit (an extractor that raises still only makes `has_answer` None).
        workers: processes in the pool when `timeout_s` is set (None: this rank's share of the node's
            cores, `available_cores(ranks_per_node)`, resolved when the pool starts).
    """

    ranks_per_node: int | None = None  # training ranks on this node; the data module sets it at setup

    def __init__(self, reward_fn: RewardFn, timeout_s: float | None = None, workers: int | None = None):
        if workers is not None and workers < 1:
            raise ValueError(f"reward workers={workers}: must be >= 1 (or None for the cores available)")
        self.reward_fn = reward_fn
        self.timeout_s = timeout_s
        self._workers = workers
        self._pool = None

    @property
    def workers(self) -> int:
        return self._workers if self._workers is not None else available_cores(self.ranks_per_node)

    def _get_pool(self):
        if self._pool is None:
            import multiprocessing

            from pebble import ProcessPool

            # spawn: a forked child would inherit the trainer's threads and OpenMP state
            ctx = multiprocessing.get_context("spawn")
            # pebble kills a worker whose task timed out and starts a fresh one in the same pool
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
        """Scores `completions[i]` against `prompts[i]`; never raises for a bad completion.

        A timed-out or crashed call scores 0 with `has_answer` None (unknown) and is counted.
        """
        pairs = list(zip(prompts, completions, strict=True))
        result = ScoreResult(rewards=[0.0] * len(pairs), has_answer=[None] * len(pairs))
        timed_out: set[int] = set()
        if self.timeout_s is None:
            outcomes = [_check_and_score(self.reward_fn, p, c) for p, c in pairs]
        else:
            pool = self._get_pool()
            futures = [
                pool.schedule(_check_and_score, args=(self.reward_fn, p, c), timeout=self.timeout_s) for p, c in pairs
            ]
            outcomes = []
            for i, fut in enumerate(futures):
                try:
                    outcomes.append(fut.result())
                except FutureTimeout:
                    timed_out.add(i)
                    outcomes.append((None, 0.0, f"timeout after {self.timeout_s}s"))
                except Exception as exc:  # the worker died, or the result did not pickle
                    outcomes.append((None, 0.0, _describe(exc)))
        for i, (has, value, error) in enumerate(outcomes):
            result.has_answer[i], result.rewards[i] = has, value
            if error is not None:
                result.messages.append(error)  # in completion order
                if i in timed_out:
                    result.timeouts += 1
                else:
                    result.errors += 1
        return result
