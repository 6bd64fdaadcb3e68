"""Prompt sets (the toy world, JSONL/parquet math datasets) and their chat-template rendering.

`load_prompts` turns a bad data file into one-line errors that name the file, the line or record, the
field and the value, and skips (and counts) a record with no usable question or ground truth.
"""

from __future__ import annotations

import json
import logging
import math
import random
import re
from pathlib import Path

import torch

from lightning_prerl.data.batch import PROMPT_PARTS, pad_left
from lightning_prerl.data.rewards import Prompt, last_boxed
from lightning_prerl.data.toyworld import generate_problems

ANSWER_FORMATS = ("plain", "gsm8k", "boxed", "latex")
log = logging.getLogger(__name__)


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
    split: str,
    count: int,
    seed: int = 0,
    num_ops: tuple[int, int] = (2, 3),
    max_operand: int = 99,
    system: str | None = None,
) -> list[Prompt]:
    """Problems of the embedded toy world; "heldout" never overlaps "train". `system`: a system prompt for
    every problem (a chat model's instructions and worked example: conf/experiment/smollm2_learns.yaml)."""
    problems = generate_problems(count, split=split, seed=seed, num_ops=tuple(num_ops), max_operand=max_operand)
    return [Prompt(p.question, str(p.answer), source=f"toy/{split}", system=system) for p in problems]


def _show(value) -> str:
    """A value for a one-line message: its type and repr, cut short (a field may hold a whole book)."""
    text = repr(value)
    return f"{type(value).__name__}: {text if len(text) <= 60 else text[:57] + '...'}"


def _question_of(record: dict, key: str) -> tuple[str | None, str | None]:
    """(question, None), or (None, why the record has no usable question)."""
    if key not in record:
        return None, f"'{key}' is missing"
    value = record[key]
    if isinstance(value, list):  # verl parquet: [{"role": "user", "content": ...}]
        user = [m for m in value if isinstance(m, dict) and m.get("role") == "user"]
        if not user:
            return None, f"'{key}' is a list with no user message ({_show(value)})"
        value = user[0].get("content")
    if value is None:
        return None, f"'{key}' is null"
    if not isinstance(value, str):  # str(42) would be a question nobody wrote
        return None, f"'{key}' is not text ({_show(value)})"
    if not value.strip():
        return None, f"'{key}' is empty"
    return value, None


def _answer_of(record: dict, key: str, answer_format: str) -> tuple[str | None, str | None]:
    """(ground truth, None), or (None, why the record has no usable ground truth)."""
    if key not in record:
        return None, f"'{key}' is missing"
    value = record[key]
    if isinstance(value, list):
        if not value:
            return None, f"'{key}' is an empty list"
        # OlympiadBench lists every answer of a multi-answer problem; elsewhere the first one counts
        value = ", ".join(map(str, value)) if answer_format == "latex" else value[0]
    if isinstance(value, dict):  # verl parquet: reward_model.ground_truth.target
        inner = value.get("ground_truth", value)
        inner = inner.get("target") if isinstance(inner, dict) else inner
        if inner is None:
            return None, f"'{key}' is a dict with no ground_truth or target ({_show(value)})"
        value = inner
    if value is None:
        return None, f"'{key}' is null"
    if isinstance(value, float) and not math.isfinite(value):  # pandas writes a missing value as NaN
        return None, f"'{key}' is {value}"
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        return None, f"'{key}' is not text or a number ({_show(value)})"
    text = str(value).strip()
    if answer_format == "gsm8k":
        m = re.search(r"####\s*(.+)$", text)
        if not m:
            return None, f"'{key}' has no '#### <answer>' line ({_show(value)})"
        text = m.group(1).strip().replace(",", "")
    elif answer_format == "latex":  # OlympiadBench: "$x^2$" (or "$1$, $2$") -> x^2 ("1, 2")
        text = ", ".join(part.strip().strip("$").strip() for part in text.split("$, $"))
    elif answer_format == "boxed":
        boxed = last_boxed(text)
        if boxed is None:
            return None, f"'{key}' has no closed \\boxed{{}} ({_show(value)})"
        text = boxed
    elif isinstance(value, float) and value.is_integer():
        text = str(int(value))
    if not text.strip():
        return None, f"'{key}' is empty"
    return text, None


class LoadedPrompts(list):
    """The prompts of a file (a plain list to its callers) plus `skipped`: records left out for want of a
    usable question or answer."""

    def __init__(self, prompts: list[Prompt], skipped: int = 0):
        super().__init__(prompts)
        self.skipped = skipped


def _decode(file: Path, data: bytes) -> str:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        bad = data[exc.start : exc.end]
        raise ValueError(f"{file}: line {line}: not UTF-8 at byte {exc.start} ({exc.reason}: {bad!r})") from None
    return text.removeprefix("\ufeff")  # a byte-order mark (Windows tools) is not part of the first record


def _json_lines(file: Path, text: str) -> list[tuple[str, object]]:
    # split("\n"), not splitlines(): JSON strings may hold U+2028 or \x1c raw, which splitlines() breaks on
    records = []
    for n, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            records.append((f"line {n}", json.loads(line)))
        except json.JSONDecodeError as exc:
            hint = " (read as JSON lines: the file does not start with '[')" if file.suffix == ".json" else ""
            raise ValueError(f"{file}: line {n}: not valid JSON ({exc.msg}: column {exc.colno}){hint}") from None
        except RecursionError:
            raise ValueError(f"{file}: line {n}: not valid JSON (nested too deeply)") from None
    return records


def _read_records(file: Path) -> list[tuple[str, object]]:
    """(position, record) pairs: "line N" (1-based) for JSON lines, "record N (0-based)" otherwise."""
    if file.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            rows = pq.read_table(file).to_pylist()
        except Exception as exc:  # ArrowInvalid / OSError: not parquet, truncated, or empty
            reason = " ".join(str(exc).split())
            raise ValueError(f"{file}: not a readable parquet file ({reason})") from None
        return [(f"record {i} (0-based)", row) for i, row in enumerate(rows)]
    text = _decode(file, file.read_bytes())
    if file.suffix != ".json" or not text.lstrip().startswith("["):
        return _json_lines(file, text)
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{file}: line {exc.lineno}: not valid JSON ({exc.msg}: column {exc.colno})") from None
    except RecursionError:
        raise ValueError(f"{file}: not valid JSON (nested too deeply)") from None
    return [(f"record {i} (0-based)", row) for i, row in enumerate(rows)]


def load_prompts(
    path: str,
    question_key: str = "problem",
    answer_key: str = "answer",
    answer_format: str = "plain",
    system: str | None = None,
    limit: int | None = None,
) -> list[Prompt]:
    """Reads a JSONL, JSON-array or parquet file of problems.

    A problem is never scored without a ground truth. A record with no usable answer (missing, null,
    NaN, empty, or not in `answer_format`) or no usable question (missing, null, empty, not text) is
    skipped and counted: one warning names the file, the count and the first 5 positions, and the result's
    `skipped` holds the count. If none is usable, or more than half are not, the load stops instead (a wrong
    key or format, not messy data), and so does a key that no record has. A file that cannot be read as
    records (not UTF-8, not JSON, not parquet, a record that is not an object, no records) stops the load.
    Every error is one line naming the file, the position (JSON lines: "line N", 1-based; JSON array or
    parquet: "record N (0-based)"), the field and the value.

    Args:
        path: the file.
        question_key: field with the problem text (or verl's chat-message list).
        answer_key: field with the ground truth (verl's `reward_model` dict is understood).
        answer_format: "plain", "gsm8k" (text after '####'), "boxed" (last \\boxed{} of the field) or
            "latex" (LaTeX in `$...$`, a list joined with ", ": OlympiadBench).
        system: optional system message for every prompt.
        limit: keep the first `limit` records.

    Returns:
        a `LoadedPrompts` list (with `.skipped`).

    Raises:
        FileNotFoundError: the file does not exist (one line).
        ValueError: an unreadable file or record, or too many unusable records (one line).
    """
    if answer_format not in ANSWER_FORMATS:
        raise ValueError(f"data answer_format={answer_format!r}: expected one of {list(ANSWER_FORMATS)}")
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"prompt file {file} does not exist")
    records = _read_records(file)
    records = records[:limit] if limit else records
    if not records:
        raise ValueError(f"{file}: no records (the file is empty or holds only blank lines or [])")
    for pos, rec in records:
        if not isinstance(rec, dict):
            raise ValueError(f"{file}: {pos}: not a JSON object ({_show(rec)})")
    for key, arg in ((question_key, "question_key"), (answer_key, "answer_key")):
        if not any(key in rec for _, rec in records):
            keys = sorted(set().union(*(rec for _, rec in records)))
            shown = keys if len(keys) <= 20 else [*keys[:20], "..."]
            raise ValueError(
                f"{file}: record 0 has no usable '{key}' field, nor does any other: no record has the key '{key}' "
                f"(the records have {shown}); check data {arg}"
            )
    kept, skipped = [], []
    for pos, rec in records:
        (question, q_why), (answer, a_why) = _question_of(rec, question_key), _answer_of(rec, answer_key, answer_format)
        if q_why or a_why:
            skipped.append(f"{pos}: " + ", ".join(w for w in (q_why, a_why) if w))
        else:
            kept.append(Prompt(question, answer, source=file.parent.name, system=system))
    first = "; ".join(skipped[:5])
    if not kept or 2 * len(skipped) > len(records):
        raise ValueError(
            f"{file}: {len(skipped)} of {len(records)} records have no usable question or answer, too many for "
            f"messy data: check question_key/answer_key/answer_format (first: {first})"
        )
    if skipped:
        log.warning(
            "%s: skipped %d of %d records with no usable question or answer (never scored without a ground "
            "truth); first: %s",
            file,
            len(skipped),
            len(records),
            first,
        )
    return LoadedPrompts(kept, skipped=len(skipped))


def render_prompt(tokenizer, prompt: Prompt, template_kwargs: dict | None = None) -> list[int]:
    """Token ids of the chat-templated prompt, ending with the assistant header."""
    text = tokenizer.apply_chat_template(
        prompt.messages(), add_generation_prompt=True, tokenize=False, **(template_kwargs or {})
    )
    return tokenizer(text, add_special_tokens=False)["input_ids"]


class PartTokens:
    """The prompt parts a conditioning space reads (`objectives/spaces.py`), as left-padded tokens.

    Each part is tokenised once per prompt, without the chat template or special tokens: `question`
    the user turn, `system` the system prompt (no tokens where a prompt has none), `fixed` one text
    for every prompt (`data.fixed_context`).

    Args:
        tokenizer: the policy's tokenizer.
        parts: the parts to carry (`batch.PROMPT_PARTS`).
        fixed_context: the `fixed` part's text (required, and at least one token, when carried).
    """

    def __init__(self, tokenizer, parts: list[str], fixed_context: str | None = None):
        unknown = [part for part in parts if part not in PROMPT_PARTS]
        if unknown:
            raise ValueError(f"data context_parts={unknown}: expected some of {list(PROMPT_PARTS)}")
        self.tokenizer, self.parts = tokenizer, list(parts)
        self.fixed = self.encode(fixed_context) if fixed_context is not None else []
        if "fixed" in self.parts and not self.fixed:
            raise ValueError(f"data.fixed_context={fixed_context!r}: the fixed space needs at least one token")
        self._cache: dict[tuple[Prompt, str], list[int]] = {}

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def ids(self, prompt: Prompt, part: str) -> list[int]:
        if part == "fixed":
            return self.fixed
        if (prompt, part) not in self._cache:
            text = prompt.question if part == "question" else prompt.system or ""
            self._cache[prompt, part] = self.encode(text)
        return self._cache[prompt, part]

    def tensors(self, prompts: list[Prompt], n: int) -> dict[str, torch.Tensor]:
        """`<part>_ids`, `<part>_mask` (B * n, W) for each carried part, each prompt repeated n times."""
        out = {}
        for part in self.parts:
            rows = [self.ids(p, part) for p in prompts for _ in range(n)]
            out[f"{part}_ids"], out[f"{part}_mask"] = pad_left(rows, self.tokenizer.pad_token_id)
        return out
