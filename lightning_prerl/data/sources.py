"""Where the math data sets live and where they come from: `data_root` and the Hub source of each file.

`data_root` (the config key) defaults to, in order: `$LIGHTNING_PRERL_DATA`; `<checkout>/data` when it
exists (what `experiments/prepare_data.py` writes, git-ignored); `<checkout>/../shared/data` when it
exists (the development machines and CI); else `<checkout>/data`, so that a missing file names the
folder the fetch command fills.

`SOURCES` is the one table of where each file under `data_root` comes from: a preset (a benchmark of
conf/benchmark/ or the training set of a conf/data/ preset) -> Hugging Face Hub dataset id, config,
split, record count, and the field renames that give the preset's layout. The file's path and the
fields it must hold are read from the preset itself, never repeated here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[2]
CONF = REPO / "conf"
ENV = "LIGHTNING_PRERL_DATA"
CHECKOUT_DATA = REPO / "data"
SHARED_DATA = REPO.parent / "shared" / "data"
PREPARE = "python experiments/prepare_data.py"


def default_data_root() -> str:
    """`data_root` when the command line does not set it (module docstring: the order)."""
    if os.environ.get(ENV):
        return os.environ[ENV]
    if CHECKOUT_DATA.is_dir() or not SHARED_DATA.is_dir():
        return str(CHECKOUT_DATA)
    return str(SHARED_DATA)


def prepare_root() -> Path:
    """Where `prepare_data.py` writes by default: `$LIGHTNING_PRERL_DATA`, else `<checkout>/data`."""
    return Path(os.environ.get(ENV) or CHECKOUT_DATA)


@dataclass(frozen=True)
class Source:
    """One file under `data_root`: the preset that reads it and the Hub dataset it is made from.

    `rename` maps Hub fields to the preset's; `keep` lists the fields written (after renaming; None: all).
    `shape`: "rows" (the records as they are), "boxed_solution" (a `solution` of `\\boxed{answer}` where
    the Hub has only an answer), "verl" (verl's parquet rows: `prompt` = [user message], `reward_model`
    = {ground_truth, style}; the ground truth is `answer`, else the last `\\boxed{}` of `solution`).
    """

    kind: str  # "benchmark" (conf/benchmark/<preset>.yaml) | "data" (conf/data/<preset>.yaml, train_prompts)
    preset: str
    hub: str
    split: str
    records: int
    config: str | None = None
    revision: str | None = None
    rename: dict[str, str] = field(default_factory=dict)
    keep: tuple[str, ...] | None = None
    shape: str = "rows"

    @property
    def label(self) -> str:
        return f"{self.kind} {self.preset}"

    def spec(self, data_root: str | Path) -> dict:
        """The preset's path (under `data_root`), question_key, answer_key and answer_format."""
        if self.kind == "benchmark":
            node = OmegaConf.load(CONF / "benchmark" / f"{self.preset}.yaml")
        else:  # a data preset's training file; a preset built on another (defaults: [math]) inherits its keys
            preset = OmegaConf.load(CONF / "data" / f"{self.preset}.yaml")
            parents = [d for d in preset.get("defaults", []) if isinstance(d, str) and d != "_self_"]
            nodes = [OmegaConf.load(CONF / "data" / f"{p}.yaml").get("train_prompts", {}) for p in parents]
            node = OmegaConf.merge(*nodes, preset.train_prompts)
        node = OmegaConf.merge({"data_root": str(data_root)}, node)
        spec = OmegaConf.to_container(node, resolve=True)
        return {
            "path": Path(spec["path"]),
            "question_key": spec.get("question_key", "problem"),
            "answer_key": spec.get("answer_key", "answer"),
            "answer_format": spec.get("answer_format", "plain"),
        }

    def relative_path(self) -> Path:
        return self.spec("ROOT")["path"].relative_to("ROOT")


# The same problems as the files of ../shared/data (its README: Qwen2.5-Math's evaluation files, the
# authors' MATH train parquet), from the Hub copies that open-r1/lighteval, verl and Qwen's evaluation use.
SOURCES: tuple[Source, ...] = (
    Source("benchmark", "math500", "HuggingFaceH4/MATH-500", "test", 500),
    Source("benchmark", "aime24", "HuggingFaceH4/aime_2024", "train", 30),
    Source("benchmark", "aime25", "math-ai/aime25", "test", 30, keep=("id", "problem", "answer"), shape="verl"),
    Source("benchmark", "amc23", "math-ai/amc23", "test", 40, rename={"question": "problem"}),
    Source(  # the Hub copy holds the final answers only: solution = \boxed{answer} (the preset reads the box)
        "benchmark",
        "minerva",
        "math-ai/minervamath",
        "test",
        272,
        rename={"question": "problem"},
        shape="boxed_solution",
    ),
    Source(  # OlympiadBench's open-ended, text-only, English maths competition problems (no images)
        "benchmark",
        "olympiadbench",
        "Hothan/OlympiadBench",
        "train",
        675,
        config="OE_TO_maths_en_COMP",
        keep=("id", "question", "solution", "final_answer", "is_multiple_answer", "unit", "answer_type", "subfield"),
    ),
    Source("benchmark", "gsm8k", "openai/gsm8k", "test", 1319, config="main"),
    Source("data", "gsm8k", "openai/gsm8k", "train", 7473, config="main"),
    Source(  # Hendrycks MATH train (the paper's math_train.parquet); ground truth: the solution's last \boxed{}
        "data",
        "math",
        "DigitalLearningGmbH/MATH-lighteval",
        "train",
        7500,
        keep=("problem", "solution", "level", "type"),
        shape="verl",
    ),
)


def source_names() -> list[str]:
    return sorted({s.preset for s in SOURCES})


def select(names: list[str] | None) -> list[Source]:
    """The sources of the presets `names` (every source when None); a name may select two (gsm8k)."""
    if not names:
        return list(SOURCES)
    unknown = sorted(set(names) - set(source_names()))
    if unknown:
        raise ValueError(f"no data set named {unknown}: choose from {source_names()}")
    return [s for s in SOURCES if s.preset in names]


def fetch_command(name: str, data_root: str | Path) -> str:
    """The command that fetches preset `name`'s files into `data_root`."""
    command = f"{PREPARE} --only {name}"
    if Path(data_root).resolve() != prepare_root().resolve():
        command += f" --data-root {data_root}"
    return command


def missing_file(kind: str, name: str, path: str | Path, data_root: str | Path) -> str:
    """One line for a data file that is not there: the path, data_root and how to get the file."""
    try:
        rel = Path(path).resolve().relative_to(Path(data_root).resolve())
    except ValueError:
        rel = None
    source = next((s for s in SOURCES if s.relative_path() == rel), None)
    how = f"fetch it: {fetch_command(source.preset, data_root)}" if source else "place the file there or set data_root"
    return f"{kind} {name}: {path} does not exist (data_root={data_root}; {how})"
