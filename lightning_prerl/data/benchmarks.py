"""The paper's evaluation benchmarks, by name: presets in conf/benchmark/*.yaml, files under data_root.

A preset declares the benchmark's file (relative to `data_root`), question field, answer field and
answer format (`prompts.ANSWER_FORMATS`); every benchmark is asked with the paper's system prompt.
Nothing is downloaded here: a missing file fails in one line naming the path, `data_root` and the
command that fetches it (experiments/prepare_data.py; sources in `sources.SOURCES`). Prompts keep
their benchmark's name in `Prompt.source`, which per-benchmark metrics group by.

`decontaminate` drops training problems whose normalised text appears in a benchmark (DAPO-Math-17k
holds 5 MATH-500, 6 AMC23 and 5 OlympiadBench problems verbatim).
"""

from __future__ import annotations

import logging
import re
from dataclasses import replace
from pathlib import Path

import torch
from omegaconf import OmegaConf

from lightning_prerl.data.prompts import load_prompts
from lightning_prerl.data.rewards import Prompt
from lightning_prerl.data.sources import missing_file
from lightning_prerl.evaluation.metrics import GenerationMetrics

PAPER_SYSTEM = "Please reason step by step, and put your final answer within \\boxed{}."
BENCHMARK_DIR = Path(__file__).resolve().parents[2] / "conf" / "benchmark"
log = logging.getLogger(__name__)


def benchmark_names() -> list[str]:
    return sorted(p.stem for p in BENCHMARK_DIR.glob("*.yaml"))


def benchmark_spec(name: str, data_root: str) -> dict:
    """The resolved preset of `name` (path made absolute against `data_root`)."""
    if name not in benchmark_names():
        raise ValueError(f"benchmark {name!r} is not a preset: choose from {benchmark_names()}")
    node = OmegaConf.merge({"data_root": str(data_root)}, OmegaConf.load(BENCHMARK_DIR / f"{name}.yaml"))
    spec = OmegaConf.to_container(node, resolve=True)
    spec.pop("data_root")
    return spec


def load_benchmark(
    name: str, data_root: str, limit: int | None = None, system: str | None = PAPER_SYSTEM
) -> list[Prompt]:
    """The problems of benchmark `name` (the first `limit` of them), tagged with its name."""
    spec = benchmark_spec(name, data_root)
    path = Path(spec["path"])
    if not path.is_file():
        raise FileNotFoundError(missing_file("benchmark", name, path, data_root))
    prompts = load_prompts(
        str(path), spec["question_key"], spec["answer_key"], spec["answer_format"], system=system, limit=limit
    )
    return [replace(p, source=name) for p in prompts]


def benchmark_suite(names: list[str], data_root: str, limit: int | None = None) -> list[Prompt]:
    """Several benchmarks as one held-out list (Hydra target of `data.eval_prompts`)."""
    if not names:
        raise ValueError("benchmark suite: no benchmark named")
    return [p for name in names for p in load_benchmark(name, data_root, limit)]


def normalise(text: str) -> str:
    """Problem text for exact-match comparison: no `$`, no whitespace, lower case."""
    return re.sub(r"\s+", "", text.replace("$", "")).lower()


def decontaminate(train: list[Prompt], names: list[str], data_root: str) -> list[Prompt]:
    """`train` without the problems whose normalised text appears in the benchmarks `names`."""
    if not names:
        return train
    seen: dict[str, str] = {}
    for name in names:
        for p in load_benchmark(name, data_root):
            seen.setdefault(normalise(p.question), name)
    kept, dropped = [], {}
    for p in train:
        hit = seen.get(normalise(p.question))
        if hit is None:
            kept.append(p)
        else:
            dropped[hit] = dropped.get(hit, 0) + 1
    log.info("decontamination: dropped %d training problems found in %s", len(train) - len(kept), dropped or names)
    return kept


class BenchmarkMetrics(torch.nn.ModuleDict):
    """One `GenerationMetrics` per benchmark preset among `prompts` (keys `val/<name>/...`).

    Built from the whole held-out list, not a rank's shard, so every rank holds the same metrics
    and makes the same collective calls when they are computed. (`record`, not `update`: that name
    is ModuleDict's own.)
    """

    def __init__(self, prompts: list[Prompt], pass_k, transition, reflection):
        names = sorted({p.source for p in prompts} & set(benchmark_names()))
        super().__init__({n: GenerationMetrics(f"val/{n}", tuple(pass_k), transition, reflection) for n in names})

    def record(self, rewards: torch.Tensor, lengths: torch.Tensor, texts, has_answer, sources) -> None:
        """rewards (B, G), lengths (B*G,), and per-sample texts, has_answer, sources."""
        g = rewards.shape[1]
        for name, metrics in self.items():
            rows = [i for i, source in enumerate(sources) if source == name]  # whole groups of g
            if rows:
                metrics.update(
                    rewards.reshape(-1)[rows].view(-1, g),
                    lengths[rows],
                    [texts[i] for i in rows],
                    [has_answer[i] for i in rows],
                )

    def compute(self, global_count) -> dict[str, float]:
        return {k: v for metrics in self.values() for k, v in metrics.compute(global_count).items()}

    def reset(self) -> None:
        for metrics in self.values():
            metrics.reset()
