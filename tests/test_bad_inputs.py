"""A corpus of bad inputs, each with its exact outcome: data files -> one-line errors or counted skips,
model outputs -> a score of 0 that is counted, never a crash, a hang or an executed string.

Kept free of heavy imports: the reward pool's spawned workers import this module to unpickle its rewards.
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from lightning_prerl.data.prompts import load_prompts
from lightning_prerl.data.rewards import BoxedExactMatch, MathVerifyReward, Prompt, RewardScorer


def jsonl(*records) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in records).encode()


def good(i: int) -> dict:
    return {"problem": f"P{i}?", "answer": str(i)}


def parquet(rows: list[dict]):
    """A builder that writes `rows` as a parquet table (pyarrow is imported only when a case runs)."""

    def build(path: Path) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        schema = None if rows else pa.schema([("problem", pa.string()), ("answer", pa.string())])
        pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)

    return build


@dataclass
class DataCase:
    """A data file and what `load_prompts` must make of it: `error` (the message after "<file>: ") or the
    loaded answers, the skip count and the skip warning (after "<file>: ")."""

    content: bytes | object  # the bytes, or a builder `path -> None`
    name: str = "data.jsonl"
    kwargs: dict = field(default_factory=dict)
    error: str | None = None
    answers: list[str] | None = None
    skipped: int = 0
    warning: str | None = None


SKIPPED = "records with no usable question or answer (never scored without a ground truth); first: "
TOO_MANY = (
    "records have no usable question or answer, too many for messy data: check question_key/answer_key/answer_format"
)
EMPTY = "no records (the file is empty or holds only blank lines or [])"
GOOD_4 = jsonl(*(good(i) for i in range(4)))

DATA_CASES = {
    # -- files that cannot be read as records: the load stops ---------------------------------------------
    "json-line-truncated": DataCase(
        jsonl(good(0)) + b'{"problem": "P1?", "answer": "1"\n' + jsonl(good(2)),
        error="line 2: not valid JSON (Expecting ',' delimiter: column 33)",
    ),
    "json-line-trailing-garbage": DataCase(
        jsonl(good(0)) + b'{"problem": "P1?", "answer": "1"} xyz\n',
        error="line 2: not valid JSON (Extra data: column 35)",
    ),
    "python-dict-not-json": DataCase(
        b"{'problem': 'P?', 'answer': '1'}\n",
        error="line 1: not valid JSON (Expecting property name enclosed in double quotes: column 2)",
    ),
    "bom-mid-file": DataCase(
        jsonl(good(0)) + b"\xef\xbb\xbf" + jsonl(good(1)),  # two files concatenated
        error="line 2: not valid JSON (Unexpected UTF-8 BOM (decode using utf-8-sig): column 1)",
    ),
    "nesting-too-deep": DataCase(b"[" * 100_000 + b"\n", error="line 1: not valid JSON (nested too deeply)"),
    "huge-unterminated-line": DataCase(
        b'{"problem": "' + b"x" * 5_000_000 + b"\n",
        error="line 1: not valid JSON (Unterminated string starting at: column 13)",
    ),
    "non-utf8-byte": DataCase(  # line 1 is 34 bytes with its newline; '{"problem": "' is 13 more
        jsonl(good(0)) + b'{"problem": "\xff", "answer": "1"}\n',
        error="line 2: not UTF-8 at byte 47 (invalid start byte: b'\\xff')",
    ),
    "latin1-text": DataCase(
        b'{"problem": "caf\xe9?", "answer": "1"}\n',
        error="line 1: not UTF-8 at byte 16 (invalid continuation byte: b'\\xe9')",
    ),
    "empty-file": DataCase(b"", error=EMPTY),
    "blank-lines-only": DataCase(b"\n  \r\n\t\n\n", error=EMPTY),
    "json-empty-array": DataCase(b" [ ]\n", name="data.json", error=EMPTY),
    "parquet-no-rows": DataCase(parquet([]), name="data.parquet", error=EMPTY),
    "json-line-is-a-list": DataCase(jsonl(good(0), [1, 2]), error="line 2: not a JSON object (list: [1, 2])"),
    "json-line-is-a-number": DataCase(jsonl(good(0)) + b"42\n", error="line 2: not a JSON object (int: 42)"),
    "json-array-item-is-a-string": DataCase(
        json.dumps([good(0), "oops"]).encode(),
        name="data.json",
        error="record 1 (0-based): not a JSON object (str: 'oops')",
    ),
    "json-array-missing-comma": DataCase(
        b'[\n  {"problem": "P0?", "answer": "0"}\n  {"problem": "P1?", "answer": "1"}\n]\n',
        name="data.json",
        error="line 3: not valid JSON (Expecting ',' delimiter: column 3)",
    ),
    "json-pretty-dict": DataCase(
        b'{\n  "data": []\n}\n',
        name="data.json",
        error="line 1: not valid JSON (Expecting property name enclosed in double quotes: column 2) "
        "(read as JSON lines: the file does not start with '[')",
    ),
    "wrong-answer-key": DataCase(
        jsonl({"problem": "P?", "solution": "1"}, {"problem": "Q?", "solution": "2", "level": 3}),
        error="record 0 has no usable 'answer' field, nor does any other: no record has the key 'answer' "
        "(the records have ['level', 'problem', 'solution']); check data answer_key",
    ),
    "wrong-question-key": DataCase(
        parquet([{"question": "P?", "answer": "1"}]),
        name="data.parquet",
        error="record 0 has no usable 'problem' field, nor does any other: no record has the key 'problem' "
        "(the records have ['answer', 'question']); check data question_key",
    ),
    "all-answers-null": DataCase(
        jsonl({"problem": "P?", "answer": None}, {"problem": "Q?", "answer": None}),
        error=f"2 of 2 {TOO_MANY} (first: line 1: 'answer' is null; line 2: 'answer' is null)",
    ),
    "most-records-unusable": DataCase(
        jsonl(good(0), {"problem": "", "answer": "1"}, {"problem": "Q?", "answer": ""}, good(3), {"problem": 7}),
        error=f"3 of 5 {TOO_MANY} (first: line 2: 'problem' is empty; line 3: 'answer' is empty; "
        "line 5: 'problem' is not text (int: 7), 'answer' is missing)",
    ),
    # -- records with no usable question or answer: skipped and counted -----------------------------------
    "null-answer": DataCase(
        jsonl(good(0), good(1), {"problem": "P2?", "answer": None}, good(3)),
        answers=["0", "1", "3"],
        skipped=1,
        warning=f"skipped 1 of 4 {SKIPPED}line 3: 'answer' is null",
    ),
    "missing-and-blank-answers": DataCase(
        jsonl(good(0), {"problem": "P1?"}, good(2), {"problem": "P3?", "answer": " \t"}),
        answers=["0", "2"],
        skipped=2,
        warning=f"skipped 2 of 4 {SKIPPED}line 2: 'answer' is missing; line 4: 'answer' is empty",
    ),
    "number-and-list-questions": DataCase(
        jsonl(good(0), {"problem": 42, "answer": "1"}, {"problem": ["a", "b"], "answer": "2"}, good(3), good(4)),
        answers=["0", "3", "4"],
        skipped=2,
        warning=f"skipped 2 of 5 {SKIPPED}line 2: 'problem' is not text (int: 42); "
        "line 3: 'problem' is a list with no user message (list: ['a', 'b'])",
    ),
    "null-question": DataCase(
        jsonl({"problem": None, "answer": "0"}, good(1), good(2)),
        answers=["1", "2"],
        skipped=1,
        warning=f"skipped 1 of 3 {SKIPPED}line 1: 'problem' is null",
    ),
    "nested-dict-bool-and-empty-list-answers": DataCase(
        jsonl(*(good(i) for i in range(3)), {"problem": "P?", "answer": {"value": 3}})
        + jsonl({"problem": "P?", "answer": True}, {"problem": "P?", "answer": []}, good(6)),
        answers=["0", "1", "2", "6"],
        skipped=3,
        warning=f"skipped 3 of 7 {SKIPPED}line 4: 'answer' is a dict with no ground_truth or target "
        "(dict: {'value': 3}); line 5: 'answer' is not text or a number (bool: True); "
        "line 6: 'answer' is an empty list",
    ),
    "parquet-null-and-nan-answers": DataCase(
        parquet([{"problem": f"P{i}?", "answer": a} for i, a in enumerate([0.0, None, 2.0, math.nan, 4.0])]),
        name="data.parquet",
        answers=["0", "2", "4"],
        skipped=2,
        warning=f"skipped 2 of 5 {SKIPPED}record 1 (0-based): 'answer' is null; record 3 (0-based): 'answer' is nan",
    ),
    "gsm8k-answer-without-hashes": DataCase(
        jsonl({"question": "Q0?", "answer": "so #### 1,024"}, {"question": "Q1?", "answer": "so 5"}),
        kwargs={"question_key": "question", "answer_format": "gsm8k"},
        answers=["1024"],
        skipped=1,
        warning=f"skipped 1 of 2 {SKIPPED}line 2: 'answer' has no '#### <answer>' line (str: 'so 5')",
    ),
    "boxed-answer-unclosed-or-empty": DataCase(
        jsonl(
            *({"problem": "P?", "solution": s} for s in (r"\boxed{1}", r"\boxed{2", r"\boxed{}", r"\boxed{\frac12}"))
        ),
        kwargs={"answer_key": "solution", "answer_format": "boxed"},
        answers=["1", r"\frac12"],
        skipped=2,
        warning=f"skipped 2 of 4 {SKIPPED}line 2: 'solution' has no closed \\boxed{{}} (str: '\\\\boxed{{2'); "
        "line 3: 'solution' is empty",
    ),
    # -- messy but valid files: loaded in full -------------------------------------------------------------
    "utf8-bom": DataCase(b"\xef\xbb\xbf" + GOOD_4, answers=["0", "1", "2", "3"]),
    "crlf-line-ends": DataCase(GOOD_4.replace(b"\n", b"\r\n"), answers=["0", "1", "2", "3"]),
    "json-array-with-bom-and-crlf": DataCase(
        b"\xef\xbb\xbf" + json.dumps([good(0), good(1)], indent=1).replace("\n", "\r\n").encode(),
        name="data.json",
        answers=["0", "1"],
    ),
    "u2028-inside-a-question": DataCase(  # str.splitlines() would cut this record in two
        (json.dumps({"problem": "a\u2028b\x1cc", "answer": "1"}, ensure_ascii=False) + "\n").encode(), answers=["1"]
    ),
    "no-newline-at-end": DataCase(GOOD_4.rstrip(b"\n"), answers=["0", "1", "2", "3"]),
    "huge-question": DataCase(jsonl({"problem": "x" * 5_000_000, "answer": "7"}), answers=["7"]),
    "float-answers": DataCase(
        jsonl({"problem": "P?", "answer": 27.0}, {"problem": "Q?", "answer": 0.5}), answers=["27", "0.5"]
    ),
}


@pytest.mark.parametrize("case_id", list(DATA_CASES))
def test_bad_data_file(case_id, tmp_path, caplog):
    case = DATA_CASES[case_id]
    path = tmp_path / case.name
    if isinstance(case.content, bytes):
        path.write_bytes(case.content)
    else:
        case.content(path)
    caplog.set_level(logging.WARNING, logger="lightning_prerl.data.prompts")
    if case.error is not None:
        with pytest.raises(ValueError) as info:
            load_prompts(str(path), **case.kwargs)
        assert str(info.value) == f"{path}: {case.error}"
        return
    prompts = load_prompts(str(path), **case.kwargs)
    assert [p.answer for p in prompts] == case.answers
    assert prompts.skipped == case.skipped
    warnings = [r.getMessage() for r in caplog.records if r.name == "lightning_prerl.data.prompts"]
    assert warnings == ([f"{path}: {case.warning}"] if case.warning else [])


def test_questions_survive_bom_u2028_and_huge_lines(tmp_path):
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(DATA_CASES["utf8-bom"].content)
    assert [p.question for p in load_prompts(str(bom))] == ["P0?", "P1?", "P2?", "P3?"]
    sep = tmp_path / "sep.jsonl"
    sep.write_bytes(DATA_CASES["u2028-inside-a-question"].content)
    assert load_prompts(str(sep))[0].question == "a\u2028b\x1cc"
    huge = tmp_path / "huge.jsonl"
    huge.write_bytes(DATA_CASES["huge-question"].content)
    assert len(load_prompts(str(huge))[0].question) == 5_000_000


@pytest.mark.parametrize("content", [b"problem,answer\nP?,1\n", b""], ids=["csv-named-parquet", "zero-bytes"])
def test_a_file_that_is_not_parquet_is_one_line(tmp_path, content):
    path = tmp_path / "train.parquet"
    path.write_bytes(content)
    with pytest.raises(ValueError) as info:
        load_prompts(str(path))
    message = str(info.value)
    assert message.startswith(f"{path}: not a readable parquet file (") and "\n" not in message


# -- model outputs ---------------------------------------------------------------------------------------


class MarkerReward:
    """1.0 for any completion except the markers: HANG sleeps forever, NAN / INF / NONE return those, BOOM
    raises with the whole completion in the message, EXIT kills the process; in `extract_answer`, XHANG
    sleeps forever and XBOOM raises."""

    def extract_answer(self, completion: str) -> str | None:
        if "XHANG" in completion:
            threading.Event().wait()
        if "XBOOM" in completion:
            raise RuntimeError("extractor broke")
        return completion

    def __call__(self, prompt: Prompt, completion: str) -> float:
        if "XHANG" not in completion and "HANG" in completion:
            threading.Event().wait()
        if "BOOM" in completion and "XBOOM" not in completion:
            raise RuntimeError(completion)
        if "EXIT" in completion:
            os._exit(3)
        return {"NAN": math.nan, "INF": math.inf, "NONE": None}.get(completion, 1.0)


MEGABYTE = "x" * 1_000_000
INJECTIONS = {
    "python-import": "__import__('os').system('touch MARKER')",
    "boxed-python-import": r"\boxed{__import__('os').system('touch MARKER')}",
    "boxed-lambda": r"\boxed{(lambda: __import__('os').system('touch MARKER'))()}",
    "latex-input": r"\boxed{\input{/etc/passwd}}",
    "latex-write18": r"\boxed{\immediate\write18{touch MARKER}}",
    "sympy-eval": r"\boxed{eval(\"open('MARKER','w')\")}",
}


@pytest.mark.parametrize("case_id", list(INJECTIONS))
def test_code_in_a_completion_is_never_run(case_id, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a relative marker lands here too
    marker = tmp_path / "PWNED"
    completion = INJECTIONS[case_id].replace("MARKER", str(marker))
    prompt = Prompt("q", "2")
    result = RewardScorer(MathVerifyReward(parsing_timeout=1, verify_timeout=1)).score([prompt], [completion])
    assert (result.rewards, result.errors, result.timeouts) == ([0.0], 0, 0)
    assert BoxedExactMatch()(prompt, completion) == 0.0
    assert not marker.exists() and os.listdir(tmp_path) == []


@dataclass
class OutputCase:
    """A completion, the reward that scores it in-process, and the exact `ScoreResult` it must give."""

    reward: object
    completion: str
    answer: str = "2"
    rewards: float = 0.0
    has_answer: bool | None = False
    errors: int = 0
    message: str | None = None


MATH = MathVerifyReward(parsing_timeout=1, verify_timeout=1)  # math-verify's own timeouts: 0, not counted
OUTPUT_CASES = {
    "nested-braces-3000": OutputCase(MATH, r"\boxed{" + "{" * 3000 + "2" + "}" * 3000 + "}", has_answer=True),
    "frac-10k-flat": OutputCase(MATH, r"\boxed{" + r"\frac{1}{2}" * 10_000 + "}", has_answer=True),
    "frac-1k-nested": OutputCase(MATH, r"\boxed{" + r"\frac{1}{" * 1000 + "2" + "}" * 1000 + "}", has_answer=True),
    "megabyte-right-answer": OutputCase(BoxedExactMatch(), MEGABYTE + r"\boxed{2}", rewards=1.0, has_answer=True),
    "megabyte-no-answer": OutputCase(BoxedExactMatch(), MEGABYTE),
    "megabyte-math-verify": OutputCase(MATH, MEGABYTE + r"\boxed{2}", rewards=1.0, has_answer=True),
    "megabyte-of-open-boxes": OutputCase(BoxedExactMatch(), "\\boxed{" * 150_000),
    "reward-nan": OutputCase(
        MarkerReward(), "NAN", has_answer=True, errors=1, message="ValueError: reward returned nan"
    ),
    "reward-inf": OutputCase(
        MarkerReward(), "INF", has_answer=True, errors=1, message="ValueError: reward returned inf"
    ),
    "reward-none": OutputCase(
        MarkerReward(),
        "NONE",
        has_answer=True,
        errors=1,
        message="TypeError: float() argument must be a string or a real number, not 'NoneType'",
    ),
    "reward-raises-megabyte-message": OutputCase(
        MarkerReward(), "BOOM" + MEGABYTE, has_answer=True, errors=1, message=("RuntimeError: BOOM" + MEGABYTE)[:300]
    ),
    "extractor-raises": OutputCase(MarkerReward(), "XBOOM", rewards=1.0, has_answer=None),
}


@pytest.mark.parametrize("case_id", list(OUTPUT_CASES))
def test_bad_completion_scores_zero_and_is_counted(case_id):
    case = OUTPUT_CASES[case_id]
    start = time.perf_counter()
    result = RewardScorer(case.reward).score([Prompt("q", case.answer)], [case.completion])
    assert time.perf_counter() - start < 10
    assert (result.rewards, result.has_answer) == ([case.rewards], [case.has_answer])
    assert (result.errors, result.timeouts) == (case.errors, 0)
    assert result.messages == ([case.message] if case.message else [])


@pytest.mark.slow
def test_pool_counts_every_failure_and_replaces_the_hung_worker_in_the_same_pool():
    """One worker: after it hangs (in the reward, then in the extractor) and dies, the same pebble pool scores
    the next batch right and promptly, so the replacement worker was started without restarting the pool."""
    scorer = RewardScorer(MarkerReward(), timeout_s=1, workers=1)
    try:
        completions = ["ok", "HANG", "XHANG", "NAN", "BOOM", "EXIT", "XBOOM", "ok"]
        first = scorer.score([Prompt("q", "a")] * len(completions), completions)
        pool = scorer._pool
        assert first.rewards == [1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 1.0]
        assert first.has_answer == [True, None, None, True, True, None, None, True]
        assert (first.timeouts, first.errors) == (2, 3)
        assert first.messages[:3] == ["timeout after 1s"] * 2 + ["ValueError: reward returned nan"]
        assert first.messages[3] == "RuntimeError: BOOM" and first.messages[4].startswith("ProcessExpired: ")
        start = time.perf_counter()
        second = scorer.score([Prompt("q", "a")] * 3, ["a", "b", "c"])
        elapsed = time.perf_counter() - start
        print(f"second batch after the hang: {elapsed:.2f} s")
        assert scorer._pool is pool
        assert (second.rewards, second.has_answer, second.timeouts, second.errors) == ([1.0] * 3, [True] * 3, 0, 0)
        assert elapsed < 10
    finally:
        scorer.close()


def test_workers_default_to_the_cores_available():
    assert RewardScorer(BoxedExactMatch()).workers == len(os.sched_getaffinity(0))
    assert RewardScorer(BoxedExactMatch(), workers=3).workers == 3
    with pytest.raises(ValueError, match=r"reward workers=0: must be >= 1"):
        RewardScorer(BoxedExactMatch(), workers=0)
