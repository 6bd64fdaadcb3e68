"""Benchmark presets, their file layouts, decontamination, per-benchmark metrics, reward fidelity."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from lightning_prerl.data.benchmarks import (
    PAPER_SYSTEM,
    BenchmarkMetrics,
    benchmark_names,
    benchmark_spec,
    decontaminate,
    load_benchmark,
)
from lightning_prerl.data.rewards import MathVerifyReward, Prompt


def _jsonl(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")


@pytest.fixture()
def data_root(tmp_path):
    """Two problems of every benchmark, each in its real layout."""
    _jsonl(
        tmp_path / "math500/test.jsonl",
        [{"problem": "P1 $x$?", "answer": "\\frac{1}{2}"}, {"problem": "P2", "answer": "3"}],
    )
    _jsonl(
        tmp_path / "aime24/test.jsonl",
        [{"id": 60, "problem": "A1", "answer": "025"}, {"id": 61, "problem": "A2", "answer": "7"}],
    )
    _jsonl(
        tmp_path / "amc23/test.jsonl",
        [{"id": 0, "problem": "C1", "answer": 27.0}, {"id": 1, "problem": "C2", "answer": 0.5}],
    )
    _jsonl(
        tmp_path / "minerva_math/test.jsonl",
        [{"problem": "M1", "solution": "so \\boxed{1.6} m"}, {"problem": "M2", "solution": "\\boxed{\\frac{3}{4}}"}],
    )
    _jsonl(
        tmp_path / "gsm8k/test.jsonl",
        [{"question": "G1", "answer": "x <<1+1=2>>\n#### 1,234"}, {"question": "G2", "answer": "#### 5"}],
    )
    _jsonl(  # Qwen2.5-Math's OlympiadBench: final_answer is a list of LaTeX strings in $...$
        tmp_path / "olympiadbench/test.jsonl",
        [
            {
                "question": "O1",
                "final_answer": ["$\\frac{1}{2}$"],
                "is_multiple_answer": False,
                "answer_type": "Numerical",
            },
            {"question": "O2", "final_answer": ["$1$", "$2$"], "is_multiple_answer": True, "answer_type": "Numerical"},
        ],
    )
    (tmp_path / "aime25").mkdir()
    pq.write_table(  # verl parquet: prompt = [one user message], reward_model.ground_truth.target
        pa.Table.from_pylist(
            [
                {"prompt": [{"role": "user", "content": f"Q{i}"}], "reward_model": {"ground_truth": {"target": t}}}
                for i, t in enumerate(["70", "588"])
            ]
        ),
        tmp_path / "aime25" / "test.parquet",
    )
    return tmp_path


EXPECTED = {
    "math500": (["P1 $x$?", "P2"], ["\\frac{1}{2}", "3"]),
    "aime24": (["A1", "A2"], ["025", "7"]),
    "aime25": (["Q0", "Q1"], ["70", "588"]),
    "amc23": (["C1", "C2"], ["27", "0.5"]),
    "minerva": (["M1", "M2"], ["1.6", "\\frac{3}{4}"]),
    "olympiadbench": (["O1", "O2"], ["\\frac{1}{2}", "1, 2"]),
    "gsm8k": (["G1", "G2"], ["1234", "5"]),
}


def test_every_preset_loads_its_layout_with_the_paper_system_prompt(data_root):
    assert benchmark_names() == sorted(EXPECTED)
    for name, (questions, answers) in EXPECTED.items():
        prompts = load_benchmark(name, str(data_root))
        assert [p.question for p in prompts] == questions, name
        assert [p.answer for p in prompts] == answers, name
        assert {p.system for p in prompts} == {PAPER_SYSTEM} and {p.source for p in prompts} == {name}
        assert len(load_benchmark(name, str(data_root), limit=1)) == 1
        assert benchmark_spec(name, str(data_root))["path"].startswith(str(data_root))


def test_a_missing_benchmark_or_file_fails_in_one_line(tmp_path):
    with pytest.raises(FileNotFoundError) as exc:
        load_benchmark("aime25", str(tmp_path))
    message = str(exc.value)
    assert message.startswith(f"benchmark aime25: {tmp_path}/aime25/test.parquet does not exist (data_root={tmp_path}")
    assert "\n" not in message
    with pytest.raises(ValueError, match=r"benchmark 'aime26' is not a preset: choose from \['aime24', 'aime25'"):
        load_benchmark("aime26", str(tmp_path))


def test_decontamination_drops_benchmark_problems_written_differently(data_root):
    train = [Prompt("P1  x?", "1/2"), Prompt("p2", "3"), Prompt("A fresh problem", "1"), Prompt("A1", "25")]
    kept = decontaminate(train, ["math500", "aime24"], str(data_root))
    assert [p.question for p in kept] == ["A fresh problem"]  # "$x$" vs "x", case and spaces do not matter
    assert decontaminate(train, [], str(data_root)) == train


def test_datamodule_counts_decontaminated_training_problems(data_root, tokenizer):
    from lightning_prerl.data.rewards import BoxedExactMatch
    from lightning_prerl.rollout.hf import HFEngine
    from lightning_prerl.training.datamodule import RolloutDataModule

    train = [Prompt("P2", "3"), Prompt("C1", "27"), Prompt("new", "1"), Prompt("newer", "2")]
    dm = RolloutDataModule(
        tokenizer,
        HFEngine,
        BoxedExactMatch(),
        train,
        None,
        2,
        2,
        decontaminate=["math500", "amc23"],
        data_root=str(data_root),
    )
    dm.setup("fit")
    assert dm.dropped_prompts["contaminated"] == 2 and [p.question for p in dm.train_prompts] == ["new", "newer"]


def test_benchmark_metrics_split_a_batch_by_source():
    prompts = [Prompt("a", "1", source="aime24"), Prompt("b", "1", source="amc23"), Prompt("c", "1", source="toy")]
    metrics = BenchmarkMetrics(prompts, (1, 2), ["but"], ["wait"])
    assert sorted(metrics) == ["aime24", "amc23"]  # only benchmark presets get their own keys
    rewards = torch.tensor([[1.0, 0.0], [0.0, 0.0], [1.0, 1.0]])  # (B=3 prompts, G=2)
    sources = ["aime24", "aime24", "amc23", "amc23", "aime24", "aime24"]
    metrics.record(
        rewards, torch.tensor([3, 4, 5, 6, 7, 8]), ["but x", "y", "z", "wait", "q", "r"], [True] * 6, sources
    )
    values = metrics.compute(lambda n: n)
    # aime24: prompts 0 and 2 -> samples 1,0,1,1 -> accuracy 3/4; pass@2 = mean(1, 1) = 1
    assert values["val/aime24/accuracy"] == pytest.approx(0.75) and values["val/aime24/pass@2"] == 1.0
    # amc23: prompt 1 -> 0,0; lengths 5, 6
    assert values["val/amc23/accuracy"] == 0.0 and values["val/amc23/response_length"] == 5.5
    assert values["val/aime24/transition_rate"] == 0.25 and values["val/amc23/reflection_rate"] == 0.5


# (ground truth, boxed prediction, equivalent?): the answer styles of these benchmarks
FIDELITY = [
    ("\\frac{1}{2}", "0.5", True),
    ("\\frac12", "1/2", True),
    ("\\dfrac{1}{2}", "\\frac{1}{2}", True),
    ("-\\frac{1}{3}", "\\frac{-1}{3}", True),
    ("2\\sqrt{3}", "\\sqrt{12}", True),
    ("\\sqrt{2}/2", "\\frac{\\sqrt{2}}{2}", True),
    ("2\\sqrt{3}", "3\\sqrt{2}", False),
    ("(1, 2]", "(1,2]", True),
    ("[1,2]", "(1,2)", False),
    ("(-\\infty, 3)", "(-\\infty,3)", True),
    ("\\left( 3, \\frac{\\pi}{2} \\right)", "(3, \\frac{\\pi}{2})", True),  # MATH-500's polar-coordinate tuple
    ("(3, \\frac{\\pi}{2})", "(\\frac{\\pi}{2}, 3)", False),
    ("1, 2", "2, 1", True),  # OlympiadBench multi-answer: order-free
    ("1, 2", "1, 3", False),
    ("5\\text{ cm}", "5", True),
    ("5", "5\\text{ cm}", True),
    ("90^\\circ", "90", True),
    ("90", "90^\\circ", True),
    ("25\\%", "25", True),
    ("025", "25", True),  # AIME24's leading zero
    ("25", "025", True),
    ("27.0", "27", True),  # AMC23's float answers
    ("1.6", "1.60", True),
    ("$\\frac{1}{2}$", "\\frac{1}{2}", True),  # answers already in $...$
    ("x^2+2x+1", "(x+1)^2", True),
    ("10^{-3}", "0.001", True),
    ("\\text{(C)}", "C", True),
    ("\\pi", "3.14159", False),
    ("204", "240", False),
    ("-2", "2", False),
]
# math-verify 0.9.0 reads "25\\%" as 25, so the fraction 0.25 is judged wrong; kept here so a change shows
KNOWN_MISJUDGED = [("25\\%", "0.25", False)]


@pytest.mark.parametrize(("gold", "pred", "equivalent"), FIDELITY + KNOWN_MISJUDGED)
def test_math_verify_reward_fidelity(gold, pred, equivalent):
    reward = MathVerifyReward()(Prompt("q", gold), f"So the answer is $\\boxed{{{pred}}}$.")
    assert reward == float(equivalent)
