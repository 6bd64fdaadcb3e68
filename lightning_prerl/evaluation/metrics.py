"""torchmetrics for RL on reasoning: accuracy, unbiased pass@k, length, format, behaviour keywords.

All of them accumulate across batches and ranks (torchmetrics syncs their states), so an
evaluation split over many batches or processes reports one exact number. Majority voting (maj@k:
`answer_groups`, `majority_winner`, `majority_correct`) is plain Python: it needs the answers themselves.

Behaviour keywords (`KeywordRate`, `ThoughtCounts`) are case-insensitive regular expressions
searched in the lower-cased text. A plain phrase is therefore a substring ("'s correct" matches
"that's correct", "verify" matches "verifying"), `^phrase` only matches at the start of a thought
(a blank-line segment), and `\\bword\\b` a whole word.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence

import torch
from torchmetrics import MeanMetric, Metric

# SEAL's thought taxonomy (Chen et al. 2025, arXiv 2504.07986), as its code classifies thoughts:
# `generate_index` in hidden_analysis.py of github.com/VITA-Group/SEAL (read in the identical copies
# Andwwy/SEAL, Zemelee/SEAL and esther119/SEAL). `switch_prefix` / `check_prefix` ("Alternatively",
# "Wait") are tested with str.startswith on the thought, hence `^`; the other words with `in`.
# "think differenly" is SEAL's own spelling (sic), kept verbatim: it never matches "think differently".
SEAL_TRANSITION = [
    "^alternatively",
    "think differenly",
    "another way",
    "another approach",
    "another method",
    "another solution",
    "another strategy",
    "another technique",
]
SEAL_REFLECTION = [
    "^wait",
    "verify",
    "make sure",
    "hold on",
    "think again",
    "'s correct",
    "'s incorrect",
    "let me check",
    "seems right",
]
# The broader whole-word lists this project used before (`behavior=broad`).
BROAD_TRANSITION = [
    r"\bbut\b",
    r"\bhowever\b",
    r"\balternatively\b",
    r"\binstead\b",
    r"\bon the other hand\b",
    r"\banother way\b",
    r"\banother approach\b",
    r"\bthink differently\b",
]
BROAD_REFLECTION = [
    r"\bwait\b",
    r"\bverify\b",
    r"\bcheck\b",
    r"\blet me\b",
    r"\bdouble-check\b",
    r"\bmake sure\b",
    r"\bhold on\b",
    r"\bthink again\b",
    r"\bseems right\b",
]
DEFAULT_TRANSITION = SEAL_TRANSITION
DEFAULT_REFLECTION = SEAL_REFLECTION


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k = 1 - C(n-c, k) / C(n, k) for n samples of which c are correct."""
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples per prompt, got {n}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


class PassAtK(Metric):
    """Mean unbiased pass@k over prompts. `update(correct)` takes (B, n) 0/1 correctness."""

    full_state_update = False

    def __init__(self, k: int):
        super().__init__()
        self.k = k
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, correct: torch.Tensor) -> None:
        n = correct.shape[1]
        for c in (correct > 0.5).sum(dim=1).tolist():
            self.total += pass_at_k(n, int(c), self.k)
        self.count += correct.shape[0]

    def compute(self) -> torch.Tensor:
        return (self.total / self.count.clamp(min=1)).float()


def keyword_pattern(keywords: Sequence[str]) -> re.Pattern:
    """One case-insensitive alternation of the keyword regexes, longest first ("let me check" before "let me")."""
    words = sorted(dict.fromkeys(keywords), key=len, reverse=True)
    for word in words:
        try:
            re.compile(word)
        except re.error as exc:
            raise ValueError(f"behaviour keyword {word!r} is not a regular expression: {exc}") from None
    return re.compile("|".join(f"(?:{w})" for w in words), re.IGNORECASE)


def split_thoughts(text: str) -> list[str]:
    """The blank-line segments of a response, each stripped as SEAL strips it (spaces, then newlines).

    SEAL cuts the token sequence at every token that contains "\\n\\n" (the tokenizer's "ĊĊ"); on
    text that is a cut at every run of two or more newlines. The first segment (the text before the
    first cut) is included here; `ThoughtCounts` drops it, as SEAL does.
    """
    return [segment.strip(" ").strip("\n") for segment in re.split(r"\n{2,}", text)]


class KeywordRate(Metric):
    """Behaviour counter: how often responses use a family of keywords (e.g. reflection words).

    Hits are the non-overlapping matches of the family's alternation (`keyword_pattern`) in each
    blank-line segment of the lower-cased response (`split_thoughts`, the first segment included), so
    a `^` keyword counts where a segment starts with it. compute() returns {"rate": share of
    responses with at least one hit, "per_response": mean number of hits per response}.
    """

    full_state_update = False

    def __init__(self, keywords: Sequence[str]):
        super().__init__()
        if not keywords:
            raise ValueError("KeywordRate needs at least one keyword")
        self.pattern = keyword_pattern(keywords)
        for name in ("hits", "responses_with_hit", "responses"):
            self.add_state(name, default=torch.tensor(0.0), dist_reduce_fx="sum")

    def count(self, text: str) -> int:
        return sum(len(self.pattern.findall(segment.lower())) for segment in split_thoughts(text))

    def update(self, texts: Sequence[str]) -> None:
        counts = [self.count(t) for t in texts]
        self.hits += sum(counts)
        self.responses_with_hit += sum(c > 0 for c in counts)
        self.responses += len(texts)

    def compute(self) -> dict[str, torch.Tensor]:
        n = self.responses.clamp(min=1)
        return {"rate": self.responses_with_hit / n, "per_response": self.hits / n}


class ThoughtCounts(Metric):
    """Transition and reflection thoughts per response, classified as SEAL's code classifies them.

    Source: `generate_index` in hidden_analysis.py of SEAL (Chen et al. 2025, arXiv 2504.07986,
    github.com/VITA-Group/SEAL; read in its copies Andwwy/SEAL, Zemelee/SEAL, esther119/SEAL):
    - thoughts: the response is cut at every "\\n\\n" token; each thought is the text after a cut up to
      the next cut (or the end), stripped of spaces then newlines. The text before the first cut is
      no thought (SEAL anchors each thought at the "\\n\\n" token in front of it), so a response
      without a blank line has no thoughts. SEAL restricts this to the <think> block for
      DeepSeek-R1 models and takes the whole text otherwise; here it is always the whole response.
    - classification, in this order on the lower-cased thought: reflection if any reflection keyword
      is found, else transition if any transition keyword is found, else execution. (Reflection is
      checked first in SEAL's code; the EasySteer replication, replications/seal/data_construction.ipynb
      of github.com/xiaoooobai/EasySteer, checks transition first and matches "wait" and
      "alternatively" anywhere: a different rule.)
    With `SEAL_TRANSITION` / `SEAL_REFLECTION` this is SEAL's rule exactly (plain keywords: substring,
    `^` keywords: str.startswith). Whether the PreRL paper's 14.89x / 6.54x used this code is not
    stated there. compute() returns the mean number of transition and reflection thoughts per response.
    """

    full_state_update = False

    def __init__(self, transition: Sequence[str], reflection: Sequence[str]):
        super().__init__()
        self.transition, self.reflection = keyword_pattern(transition), keyword_pattern(reflection)
        for name in ("transition_thoughts", "reflection_thoughts", "responses"):
            self.add_state(name, default=torch.tensor(0.0), dist_reduce_fx="sum")

    def classify(self, text: str) -> list[str]:
        """The kind of each thought of one response: transition, reflection or execution."""
        kinds = []
        for thought in split_thoughts(text)[1:]:
            thought = thought.lower()
            if self.reflection.search(thought):
                kinds.append("reflection")
            elif self.transition.search(thought):
                kinds.append("transition")
            else:
                kinds.append("execution")
        return kinds

    def update(self, texts: Sequence[str]) -> None:
        for text in texts:
            kinds = self.classify(text)
            self.transition_thoughts += kinds.count("transition")
            self.reflection_thoughts += kinds.count("reflection")
        self.responses += len(texts)

    def compute(self) -> dict[str, torch.Tensor]:
        n = self.responses.clamp(min=1)
        return {"transition": self.transition_thoughts / n, "reflection": self.reflection_thoughts / n}


class GenerationMetrics(torch.nn.Module):
    """Everything measured on a set of scored generations, under one metric-key prefix.

    Args:
        prefix: key prefix, e.g. "val" or "rollout".
        pass_k: the k values of pass@k (each needs that many samples per prompt).
        transition, reflection: behaviour keyword lists (from the config).
    """

    def __init__(
        self,
        prefix: str,
        pass_k: Sequence[int] = (),
        transition: Sequence[str] = DEFAULT_TRANSITION,
        reflection: Sequence[str] = DEFAULT_REFLECTION,
    ):
        super().__init__()
        self.prefix = prefix
        self.accuracy, self.length, self.format_valid = MeanMetric(), MeanMetric(), MeanMetric()
        self.pass_k = torch.nn.ModuleDict({str(k): PassAtK(k) for k in pass_k})
        self.transition, self.reflection = KeywordRate(transition), KeywordRate(reflection)
        self.thoughts = ThoughtCounts(transition, reflection)

    def update(
        self, correct: torch.Tensor, lengths: torch.Tensor, texts: Sequence[str], has_answer: Sequence[bool | None]
    ) -> None:
        """correct: (B, n) rewards in [0, 1]; lengths: (B*n,) response tokens; texts: B*n strings."""
        self.accuracy.update(correct.float().reshape(-1))
        self.length.update(lengths.float())
        known = [float(h) for h in has_answer if h is not None]
        if known:
            self.format_valid.update(torch.tensor(known))
        for k, metric in self.pass_k.items():
            if correct.shape[1] >= int(k):
                metric.update(correct)
        self.transition.update(texts)
        self.reflection.update(texts)
        self.thoughts.update(texts)

    def compute(self, global_count: Callable[[int], int] = lambda count: count) -> dict[str, float]:
        """The metrics under `prefix`. `global_count` turns this rank's update count into the largest
        over ranks: whether a metric is computed (a collective) must be the same decision everywhere."""
        p = self.prefix
        out = {f"{p}/accuracy": self.accuracy.compute(), f"{p}/response_length": self.length.compute()}
        if global_count(int(self.format_valid.update_count)):
            out[f"{p}/format_valid"] = self.format_valid.compute()
        for k, metric in self.pass_k.items():
            if global_count(int(metric.update_count)):
                out[f"{p}/pass@{k}"] = metric.compute()
        for name, metric in (("transition", self.transition), ("reflection", self.reflection)):
            values = metric.compute()
            out[f"{p}/{name}_rate"] = values["rate"]
            out[f"{p}/{name}_per_response"] = values["per_response"]
        for name, value in self.thoughts.compute().items():
            out[f"{p}/{name}_thoughts"] = value
        return {k: float(v) for k, v in out.items()}

    def reset(self) -> None:
        for m in self.modules():
            if isinstance(m, Metric):
                m.reset()


def answer_groups(answers: Sequence[str | None], equivalent: Callable[[str, str], bool]) -> list[int | None]:
    """Group id of each sample's final answer; equivalent answers share an id, None has no answer.

    A new answer joins the first existing group (in order of creation) whose first answer it is
    `equivalent` to, else it opens a new group. Sample i's id depends only on samples before it,
    so the ids of the first k samples are the ids of `answers[:k]` (maj@k for every k in one pass).

    Args:
        answers: extracted final answers in sample order (None: the sample has none).
        equivalent: `(group's first answer, new answer) -> bool`.
    Returns:
        one id per sample (0, 1, ... in order of first appearance) or None.
    """
    heads: list[str] = []  # the first answer of each group
    ids: list[int | None] = []
    for answer in answers:
        if answer is None:
            ids.append(None)
            continue
        match = next((g for g, head in enumerate(heads) if head == answer or equivalent(head, answer)), None)
        if match is None:
            heads.append(answer)
            match = len(heads) - 1
        ids.append(match)
    return ids


def majority_winner(groups: Sequence[int | None]) -> int | None:
    """Index of the earliest sample of the most voted group; ties go to the group seen first.

    Samples without an answer (None) do not vote; None when no sample voted.
    """
    votes: dict[int, int] = {}
    first: dict[int, int] = {}
    for i, g in enumerate(groups):
        if g is not None:
            votes[g] = votes.get(g, 0) + 1
            first.setdefault(g, i)
    if not votes:
        return None
    best = max(votes.values())
    return min(first[g] for g, v in votes.items() if v == best)


def majority_correct(
    answers: Sequence[str | None], correct: Sequence[bool], equivalent: Callable[[str, str], bool]
) -> bool:
    """maj@k of one problem: is the majority answer of these k samples right?

    Args:
        answers: the k samples' extracted final answers (None: no answer, no vote).
        correct: the k samples' verdicts (reward > 0.5); the winning group is judged by its
            earliest sample's verdict.
        equivalent: answer equivalence (math-verify in the evaluator).
    Returns:
        False when no sample has an answer.
    """
    winner = majority_winner(answer_groups(answers, equivalent))
    return winner is not None and bool(correct[winner])
