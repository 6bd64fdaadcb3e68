"""Rewards (real math-verify), the never-crash scorer, and the torchmetrics."""

from __future__ import annotations

import random
import re
import time
from pathlib import Path

import pytest
import torch

from lightning_prerl.data.rewards import (
    BoxedExactMatch,
    LastNumberMatch,
    MathVerifyReward,
    Prompt,
    RewardScorer,
    last_boxed,
)
from lightning_prerl.evaluation.metrics import (
    SEAL_REFLECTION,
    SEAL_TRANSITION,
    GenerationMetrics,
    KeywordRate,
    PassAtK,
    pass_at_k,
    split_thoughts,
)


def test_last_boxed_handles_nesting_and_picks_the_last():
    assert last_boxed(r"x \boxed{1} then \boxed{\frac{1}{2}} done") == r"\frac{1}{2}"
    assert last_boxed(r"\boxed{unclosed") is None
    assert last_boxed("no answer") is None


def _last_boxed_before(text: str) -> str | None:
    """The quadratic implementation `last_boxed` replaced: the reference for identical results."""
    starts = [m.end() for m in re.finditer(r"\\boxed\{", text)]
    for start in reversed(starts):
        depth, i = 1, start
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth == 0:
            return text[start : i - 1]
    return None


TRICKY_BOXES = {
    r"\boxed{1}": "1",
    r"\boxed{}": "",
    r"\boxed{ }": " ",
    r"a \boxed{1} b \boxed{2} c": "2",
    r"\boxed{1} then \boxed{2": "1",  # the last box is open: the one before it counts
    r"\boxed{\boxed{3}}": "3",  # the inner box opens last
    r"\boxed{\boxed{3}": "3",
    r"\boxed{a \boxed{b} c": "b",
    r"\boxed{x}}}} \boxed{y": "x",
    r"}}} \boxed{x}} {": "x",
    r"\boxed{{a}{b}}": "{a}{b}",
    r"\boxed{\{1\}}": r"\{1\}",  # an escaped brace still counts as a brace, as before
    r"\boxed{\}": "\\",  # so "\}" closes the box
    r"\boxed{{}": None,
    r"\boxed{1}\boxed{{2}": "1",
    r"\\boxed{5}": "5",
    r"\boxed {5}": None,
    r"\boxed{\text{a}}\boxed{": r"\text{a}",
    r"\boxed{\boxed{1}\boxed{2}}\boxed{": "2",
    r"\boxed{\frac{1}{2}} and \boxed{\sqrt{\boxed{}}}": "",
    "": None,
    "\\boxed{" * 50: None,
    "\\boxed{" * 50 + "}" * 3: "",
    "\\boxed{x" * 3 + "}" * 2: "x",  # boxes 3 and 2 close, box 1 does not
}


@pytest.mark.parametrize("text", list(TRICKY_BOXES))
def test_last_boxed_matches_the_old_quadratic_scan(text):
    assert last_boxed(text) == _last_boxed_before(text) == TRICKY_BOXES[text]


def test_last_boxed_matches_the_old_scan_on_random_strings():
    rng = random.Random(0)
    pieces = ["\\boxed{", "{", "}", "x", "\\"]
    for _ in range(3000):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 14)))
        assert last_boxed(text) == _last_boxed_before(text), text


@pytest.mark.parametrize(("text", "expected"), [("\\boxed{" * 4000, None), ("\\boxed{" * 4000 + "}", "")])
def test_last_boxed_is_linear_on_repeated_openings(text, expected):
    """28,000 characters of unclosed `\\boxed{` took 5.5 s with the old rescan from every opening."""
    start = time.perf_counter()
    assert last_boxed(text) == expected
    elapsed = time.perf_counter() - start
    print(f"last_boxed on {len(text)} characters: {elapsed * 1e3:.2f} ms")
    assert elapsed < 0.5


def test_boxed_exact_match():
    reward, p = BoxedExactMatch(), Prompt("Compute 1+2", "3")
    assert reward(p, r"1+2=3. The answer is \boxed{3}.") == 1.0
    assert reward(p, r"The answer is \boxed{4}.") == 0.0
    assert reward(p, "The answer is 3.") == 0.0
    assert reward.extract_answer("The answer is 3.") is None


def test_last_number_match_reads_the_last_number_only():
    reward, p = LastNumberMatch(), Prompt("Compute 16+42", "58")
    assert reward(p, "16+42=58. The answer is 58.") == 1.0
    assert reward(p, "The answer is 58.0") == 1.0  # equal as numbers
    assert reward(p, "58, no wait: 16+42=59") == 0.0  # the last number counts, not the first
    assert reward(p, "-58") == 0.0 and reward(p, "fifty-eight") == 0.0
    assert reward(Prompt("q", "1234"), "it is 1,234") == 1.0  # a thousands separator is dropped
    assert reward.extract_answer("x = -3.5 then 7") == "7" and reward.extract_answer("none") is None
    assert reward(Prompt("q", "n/a"), "3") == 0.0  # a ground truth that is no number never matches


def test_math_verify_reward_is_real():
    reward = MathVerifyReward()
    p = Prompt("half?", r"\frac{1}{2}")
    assert reward(p, r"so \boxed{0.5}") == 1.0
    assert reward(p, r"so \boxed{\dfrac{2}{4}}") == 1.0
    assert reward(p, r"so \boxed{0.6}") == 0.0
    assert reward(p, "no boxed answer 0.5") == 0.0


def test_math_verify_in_the_timeout_pool_still_scores_correct_answers():
    """math-verify's signal-based timeouts silently zeroed every reward in threaded workers elsewhere."""
    scorer = RewardScorer(MathVerifyReward(), timeout_s=10)
    try:
        result = scorer.score([Prompt("half?", r"\frac{1}{2}")] * 3, [r"\boxed{0.5}", r"\boxed{1/2}", r"\boxed{3}"])
    finally:
        scorer.close()
    assert result.rewards == [1.0, 1.0, 0.0] and result.errors == 0


def raising_reward(prompt: Prompt, completion: str) -> float:
    if "boom" in completion:
        raise RuntimeError("bad completion")
    return 1.0


def hanging_reward(prompt: Prompt, completion: str) -> float:
    if "hang" in completion:
        time.sleep(60)
    return 1.0


def test_scorer_counts_a_raising_reward_as_zero_and_goes_on():
    result = RewardScorer(raising_reward).score([Prompt("q", "a")] * 3, ["ok", "boom", "ok"])
    assert result.rewards == [1.0, 0.0, 1.0]
    assert result.errors == 1 and result.timeouts == 0


def test_scorer_kills_a_hanging_reward_and_goes_on():
    scorer = RewardScorer(hanging_reward, timeout_s=2.0)
    try:
        start = time.perf_counter()
        result = scorer.score([Prompt("q", "a")] * 3, ["ok", "hang", "ok"])
        assert time.perf_counter() - start < 30
        assert result.rewards == [1.0, 0.0, 1.0]
        assert result.timeouts == 1
        # the pool survives the killed worker
        assert scorer.score([Prompt("q", "a")], ["ok"]).rewards == [1.0]
    finally:
        scorer.close()


def test_pass_at_k_by_hand():
    # n=4, c=1: pass@1 = 1/4 ; pass@2 = 1 - C(3,2)/C(4,2) = 1 - 3/6 = .5
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5)
    assert pass_at_k(4, 0, 2) == 0.0 and pass_at_k(4, 3, 2) == 1.0
    metric = PassAtK(2)
    metric.update(torch.tensor([[1, 0, 0, 0], [1, 1, 1, 0]]))
    assert metric.compute().item() == pytest.approx((0.5 + 1.0) / 2)


def test_keyword_rate_counts_whole_words_longest_first():
    metric = KeywordRate([r"\bwait\b", r"\blet me\b", r"\blet me check\b", r"\bbut\b"])
    metric.update(["Wait, let me check: 1+1=2.", "Butter is not a transition.", "but no; but yes"])
    # response 1: "Wait" + "let me check" (one hit, not two) ; response 2: none ; response 3: 2
    out = metric.compute()
    assert out["per_response"].item() == pytest.approx(4 / 3)
    assert out["rate"].item() == pytest.approx(2 / 3)


def test_keyword_rate_plain_keywords_are_substrings_and_caret_keywords_start_a_segment():
    metric = KeywordRate(SEAL_REFLECTION)
    metric.update(["Wait, that's correct.\n\nWAIT again; let me check. We wait.", "Butter", "We wait.\nWait."])
    # 1: "^wait" + "'s correct" | "^wait" + "let me check" (the last "wait" starts no segment) = 4
    # 2: none ; 3: a single newline starts no segment: none
    out = metric.compute()
    assert out["per_response"].item() == pytest.approx(4 / 3) and out["rate"].item() == pytest.approx(1 / 3)
    assert KeywordRate(["but"]).count("Butter, but") == 2  # substring: the rule of SEAL's lists
    with pytest.raises(ValueError, match="not a regular expression"):
        KeywordRate(["("])


def test_split_thoughts_cuts_at_runs_of_newlines_and_strips_like_seal():
    assert split_thoughts("a\n\nb\n\n\n c \n\nd\n \ne") == ["a", "b", "c", "d\n \ne"]
    assert split_thoughts("one line") == ["one line"]


SEAL_RESPONSE = (
    "To solve it, first add. Wait, is that all?\n\n"  # before the first cut: no thought
    "Wait, 2+2=4.\n\n"  # reflection ("^wait")
    "Alternatively, we can verify by counting.\n\n"  # reflection: checked before transition
    "So that's correct.\n\n"  # reflection ("'s correct" after a letter)
    "Let me try another approach: count on fingers.\n\n"  # transition
    "ANOTHER WAY: HOLD ON.\n\n"  # reflection (upper case; "hold on" wins over "another way")
    "We wait here; we think differently.\n\n"  # execution: "wait" mid-thought, "think differenly" (sic)
    "Let me\n\ncheck it, then hold\n\non.\n\n"  # three thoughts, no keyword spans a blank line
    "The answer is 4."  # execution
)


def test_thought_counts_classify_as_seals_code():
    from lightning_prerl.evaluation.metrics import ThoughtCounts

    metric = ThoughtCounts(SEAL_TRANSITION, SEAL_REFLECTION)
    kinds = metric.classify(SEAL_RESPONSE)
    assert kinds == ["reflection", "reflection", "reflection", "transition", "reflection"] + ["execution"] * 5
    assert metric.classify("Wait, a first paragraph is no thought.") == []
    assert metric.classify("a\n\nAlternatively, b.\n\nc\n\n\n   \n\nWe verifying it; hold one.") == [
        "transition",  # "^alternatively"
        "execution",
        "execution",  # "   " (a whitespace-only segment between two cuts)
        "reflection",  # substrings: "verify" in "verifying", "hold on" in "hold one"
    ]
    metric.update([SEAL_RESPONSE, "Only one paragraph. Wait.", "x\n\nanother method\n\nanother strategy"])
    out = metric.compute()  # transition 1 + 0 + 2, reflection 4 + 0 + 0 over 3 responses
    assert out["transition"].item() == pytest.approx(3 / 3) and out["reflection"].item() == pytest.approx(4 / 3)


def test_the_defaults_are_seals_lists_and_the_config_groups_hold_the_same_lists():
    from hydra import compose, initialize_config_dir

    from lightning_prerl.evaluation import metrics

    assert metrics.DEFAULT_TRANSITION == SEAL_TRANSITION and metrics.DEFAULT_REFLECTION == SEAL_REFLECTION
    assert "'s correct" in SEAL_REFLECTION and "^alternatively" in SEAL_TRANSITION
    conf = Path(__file__).resolve().parents[1] / "conf"
    with initialize_config_dir(str(conf), version_base="1.3"):
        default = compose("config", overrides=["run_dir=/tmp/unused"])
        broad = compose("config", overrides=["run_dir=/tmp/unused", "behavior=broad"])
    assert list(default.module.transition) == SEAL_TRANSITION
    assert list(default.module.reflection) == SEAL_REFLECTION
    assert list(broad.module.transition) == metrics.BROAD_TRANSITION
    assert list(broad.module.reflection) == metrics.BROAD_REFLECTION
    m = GenerationMetrics("val", transition=broad.module.transition, reflection=broad.module.reflection)
    m.update(torch.zeros(2, 1), torch.ones(2), ["Butter.\n\nBut wait, check.", "x\n\nInstead, y."], [None, None])
    out = m.compute()  # whole words: "But" + "Instead" ; "wait" + "check" ; thoughts: reflection first
    assert out["val/transition_per_response"] == pytest.approx(1.0)
    assert out["val/reflection_per_response"] == pytest.approx(1.0)
    assert out["val/transition_thoughts"] == pytest.approx(0.5) and out["val/reflection_thoughts"] == pytest.approx(0.5)


def test_generation_metrics_bundle():
    m = GenerationMetrics("val", pass_k=(1, 2), transition=["but"], reflection=["wait"])
    m.update(
        torch.tensor([[1.0, 0.0], [0.0, 0.0]]),
        torch.tensor([3, 5, 7, 9]),
        ["a", "x\n\nbut b", "wait", "c"],  # a thought follows a blank line (SEAL): "wait" alone is none
        [True, True, False, None],
    )
    out = m.compute()
    assert out["val/accuracy"] == pytest.approx(0.25)
    assert out["val/pass@2"] == pytest.approx(0.5)
    assert out["val/response_length"] == pytest.approx(6.0)
    assert out["val/format_valid"] == pytest.approx(2 / 3)
    assert out["val/transition_rate"] == pytest.approx(0.25)
    assert out["val/transition_thoughts"] == pytest.approx(0.25)
