"""Prompt sets (the toy world, JSONL/parquet math datasets) and their chat-template rendering."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

from lightning_prerl.rewards import Prompt, last_boxed
from lightning_prerl.toyworld import generate_problems

ANSWER_FORMATS = ("plain", "gsm8k", "boxed")


class PromptSet:
    """An endless, deterministic stream over a finite list of prompts.

    Pass k over the list uses its own seeded permutation, so `take(start, count)` is a pure
    function of `start`: a resumed run draws exactly the prompts it would have drawn.
    """

    def __init__(self, prompts: list[Prompt], shuffle_seed: int | None = 0):
        if not prompts:
            raise ValueError("empty prompt set")
        self.prompts = prompts
        self.shuffle_seed = shuffle_seed
        self._orders: dict[int, list[int]] = {}

    def __len__(self) -> int:
        return len(self.prompts)

    def _order(self, epoch: int) -> list[int]:
        if epoch not in self._orders:
            idx = list(range(len(self.prompts)))
            if self.shuffle_seed is not None:
                random.Random(self.shuffle_seed * 100_003 + epoch).shuffle(idx)
            self._orders = {epoch: idx}
        return self._orders[epoch]

    def take(self, start: int, count: int) -> list[Prompt]:
        out = []
        for i in range(start, start + count):
            epoch, pos = divmod(i, len(self.prompts))
            out.append(self.prompts[self._order(epoch)[pos]])
        return out


def toy_prompts(
    split: str, count: int, seed: int = 0, num_ops: tuple[int, int] = (2, 3), max_operand: int = 99
) -> list[Prompt]:
    """Problems of the embedded toy world; "heldout" never overlaps "train"."""
    problems = generate_problems(count, split=split, seed=seed, num_ops=tuple(num_ops), max_operand=max_operand)
    return [Prompt(p.question, str(p.answer), source=f"toy/{split}") for p in problems]


def _answer_of(record: dict, answer_key: str, answer_format: str) -> str | None:
    value = record.get(answer_key)
    if isinstance(value, list):
        value = value[0] if value else None
    if isinstance(value, dict):  # verl parquet: reward_model.ground_truth.target
        value = value.get("ground_truth", value)
        value = value.get("target") if isinstance(value, dict) else value
    if value is None:
        return None
    text = str(value).strip()
    if answer_format == "gsm8k":
        m = re.search(r"####\s*(.+)$", text)
        return m.group(1).strip().replace(",", "") if m else None
    if answer_format == "boxed":
        return last_boxed(text)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return text or None


def _question_of(record: dict, question_key: str) -> str | None:
    value = record.get(question_key)
    if isinstance(value, list):  # verl parquet: [{"role": "user", "content": ...}]
        value = next((m.get("content") for m in value if isinstance(m, dict) and m.get("role") == "user"), None)
    return str(value) if value else None


def load_prompts(
    path: str,
    question_key: str = "problem",
    answer_key: str = "answer",
    answer_format: str = "plain",
    system: str | None = None,
    limit: int | None = None,
) -> list[Prompt]:
    """Reads a JSONL, JSON-array or parquet file of problems.

    Args:
        path: the file.
        question_key: field with the problem text (or verl's chat-message list).
        answer_key: field with the ground truth (verl's `reward_model` dict is understood).
        answer_format: "plain", "gsm8k" (text after '####') or "boxed" (last \\boxed{} of the field).
        system: optional system message for every prompt.
        limit: keep the first `limit` records.

    Raises:
        FileNotFoundError / ValueError naming the file, the record and the field.
    """
    if answer_format not in ANSWER_FORMATS:
        raise ValueError(f"data answer_format={answer_format!r}: expected one of {list(ANSWER_FORMATS)}")
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"prompt file {file} does not exist")
    if file.suffix == ".parquet":
        import pyarrow.parquet as pq

        records = pq.read_table(file).to_pylist()
    elif file.suffix == ".json":
        records = json.loads(file.read_text())
    else:
        records = [json.loads(line) for line in file.read_text().splitlines() if line.strip()]
    out = []
    for i, rec in enumerate(records[:limit] if limit else records):
        question, answer = _question_of(rec, question_key), _answer_of(rec, answer_key, answer_format)
        if question is None or answer is None:
            missing = question_key if question is None else answer_key
            raise ValueError(f"{file}: record {i} has no usable '{missing}' field (keys: {sorted(rec)})")
        out.append(Prompt(question, answer, source=file.parent.name, system=system))
    return out


def render_prompt(tokenizer, prompt: Prompt, template_kwargs: dict | None = None) -> list[int]:
    """Token ids of the chat-templated prompt, ending with the assistant header."""
    text = tokenizer.apply_chat_template(
        prompt.messages(), add_generation_prompt=True, tokenize=False, **(template_kwargs or {})
    )
    return tokenizer(text, add_special_tokens=False)["input_ids"]
