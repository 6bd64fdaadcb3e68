"""The embedded toy reasoning world: multi-step integer arithmetic with a `\\boxed{}` answer.

Everything the default run needs without a download lives here: a deterministic problem
generator with seeded train / held-out splits, a character-level tokenizer with a ChatML chat
template, the tiny Qwen3 architecture of the shipped base policy, and the synthetic pretraining
corpus that rebuilds it (`experiments/pretrain_toy.py`).

Design (measured in shared/TOY-NOTES.md): problems "Compute 23+45-17" with 2-3 operations on
operands 1-99 and non-negative intermediates. The corpus mixes correct traces, traces with a
propagated slip, and slips followed by a self-correction ("Wait, let me check: ..."), with
transition words ("But", "Alternatively,") sprinkled in. A perfect imitator of that mix solves
about 80 % at temperature 1, which keeps the base policy inside the band where RL sees both
positive and negative samples.

Three worlds (`WORLDS`) share the problems, tokenizer and architecture: "arith" (one-paragraph answers,
the default run's), "thoughts" (one thought per step, repairs aimed at slips: the negative control, whose
pretraining never saw the prompt-free space) and "recheck" (3-4 steps, blind rechecks and switches of
method that pay on average, low base rates, and 40 % of its pretraining in the prompt-free space).
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Callable
from dataclasses import astuple, dataclass
from pathlib import Path

SPECIAL_TOKENS = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>"]
CHARS = ["\n"] + [chr(c) for c in range(32, 127)]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
ASSETS = Path(__file__).resolve().parents[1] / "assets"  # the shipped toy policies
SHIPPED_MODEL_DIR = ASSETS / "toy-base"
THOUGHTS_MODEL_DIR = ASSETS / "toy-thoughts"  # the "thoughts" world's base policy
RECHECK_MODEL_DIR = ASSETS / "toy-recheck"  # the "recheck" world's base policy
MAX_MISSES = 100_000  # draws in a row that add no new problem before generate_problems gives up


@dataclass(frozen=True)
class ToyProblem:
    """One arithmetic problem: `operands[0] ops[0] operands[1] ...`, evaluated left to right."""

    operands: tuple[int, ...]
    ops: tuple[str, ...]

    @property
    def expression(self) -> str:
        parts = [str(self.operands[0])]
        for op, x in zip(self.ops, self.operands[1:], strict=True):
            parts += [op, str(x)]
        return "".join(parts)

    @property
    def question(self) -> str:
        return f"Compute {self.expression}"

    def partials(self) -> list[int]:
        """Running results after each operation."""
        acc, out = self.operands[0], []
        for op, x in zip(self.ops, self.operands[1:], strict=True):
            acc = acc + x if op == "+" else acc - x
            out.append(acc)
        return out

    @property
    def answer(self) -> int:
        return self.partials()[-1]


def is_held_out(question: str, held_out_percent: int = 5) -> bool:
    """Stable split on the question text: the same problem is always on the same side."""
    digest = hashlib.sha1(question.encode()).digest()
    return int.from_bytes(digest[:4], "little") % 100 < held_out_percent


def sample_problem(rng: random.Random, num_ops: tuple[int, int], max_operand: int) -> ToyProblem:
    """Draw until every running result is non-negative (measured design, TOY-NOTES §1)."""
    while True:
        n = rng.randint(*num_ops)
        problem = ToyProblem(
            operands=tuple(rng.randint(1, max_operand) for _ in range(n + 1)),
            ops=tuple(rng.choice("+-") for _ in range(n)),
        )
        if min(problem.partials()) >= 0:
            return problem


def generate_problems(
    count: int,
    *,
    split: str,
    seed: int,
    num_ops: tuple[int, int] = (2, 3),
    max_operand: int = 99,
    held_out_percent: int = 5,
) -> list[ToyProblem]:
    """Deterministic list of distinct problems from one split ("train" or "heldout")."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split={split!r}: expected 'train' or 'heldout'")
    rng, seen, out = random.Random(f"{split}-{seed}"), set(), []
    want_held_out, misses = split == "heldout", 0
    while len(out) < count:
        p = sample_problem(rng, num_ops, max_operand)
        q = p.question
        if q in seen or is_held_out(q, held_out_percent) != want_held_out:
            misses += 1
            if misses > MAX_MISSES:  # the split holds fewer problems than asked for: it would draw forever
                raise ValueError(
                    f"toy problems count={count}: the {split} split of num_ops={num_ops}, max_operand={max_operand} "
                    f"gave only {len(out)} distinct problems in {MAX_MISSES} draws; ask for fewer"
                )
            continue
        seen.add(q)
        out.append(p)
        misses = 0
    return out


def _slip(value: int, rng: random.Random) -> int:
    wrong = value + rng.choice([-10, -2, -1, 1, 2, 10])
    return wrong if wrong >= 0 else value + 1


def solution_trace(
    problem: ToyProblem,
    rng: random.Random,
    *,
    p_slip: float = 0.20,
    p_correction: float = 0.15,
    p_but: float = 0.08,
    p_alternatively: float = 0.05,
) -> str:
    """One assistant answer: correct, slipped (wrong answer) or slipped-then-corrected."""
    kind = rng.random()
    mode = "slip" if kind < p_slip else "fix" if kind < p_slip + p_correction else "ok"
    bad_step = rng.randrange(len(problem.ops)) if mode != "ok" else -1
    acc, steps = problem.operands[0], []
    for i, (op, x) in enumerate(zip(problem.ops, problem.operands[1:], strict=True)):
        true = acc + x if op == "+" else acc - x
        prefix = ""
        r = rng.random()
        if r < p_but:
            prefix = "But "
        elif r < p_but + p_alternatively:
            prefix = "Alternatively, "
        if i == bad_step:
            wrong = _slip(true, rng)
            step = f"{prefix}{acc}{op}{x}={wrong}."
            if mode == "fix":
                step += f" Wait, let me check: {acc}{op}{x}={true}, not {wrong}."
            else:
                true = wrong  # the slip propagates
        else:
            step = f"{prefix}{acc}{op}{x}={true}."
        steps.append(step)
        acc = true
    return " ".join(steps) + f" The answer is \\boxed{{{acc}}}."


def _alternative(acc: int, op: str, x: int, true: int) -> str:
    """A second route to `acc op x`: split x into tens and units, else check by the inverse operation."""
    tens, units = x - x % 10, x % 10
    if tens and units:
        mid = acc + tens if op == "+" else acc - tens
        return f"Alternatively, {acc}{op}{tens}={mid} and {mid}{op}{units}={true}."
    inverse = "-" if op == "+" else "+"
    return f"Alternatively, {true}{inverse}{x}={acc}, so {acc}{op}{x}={true}."


def thought_trace(
    problem: ToyProblem,
    rng: random.Random,
    *,
    p_slip: float = 0.20,
    p_repair: float = 0.50,
    p_reflect: float = 0.50,
    p_vacuous: float = 0.05,
) -> str:
    """One answer of the "thoughts" world: one thought per step, thoughts separated by blank lines.

    Each step slips with probability `p_slip` (off by 1, 2 or 10). A slip is repaired with
    probability `p_repair`, by a reflection thought ("Wait, let me check: ...") with probability
    `p_reflect`, else by a transition thought ("Alternatively, ..." recomputing it another way);
    an unrepaired slip propagates to a wrong answer. A correct step is followed by a vacuous
    reflection and, independently, a vacuous transition with probability `p_vacuous` each.
    """
    acc, thoughts = problem.operands[0], []
    for op, x in zip(problem.ops, problem.operands[1:], strict=True):
        true = acc + x if op == "+" else acc - x
        if rng.random() < p_slip:
            wrong = _slip(true, rng)
            thoughts.append(f"{acc}{op}{x}={wrong}.")
            if rng.random() >= p_repair:
                acc = wrong  # the slip propagates
                continue
            if rng.random() < p_reflect:
                thoughts.append(f"Wait, let me check: {acc}{op}{x}={true}, not {wrong}.")
            else:
                thoughts.append(_alternative(acc, op, x, true))
        else:
            thoughts.append(f"{acc}{op}{x}={true}.")
            if rng.random() < p_vacuous:
                thoughts.append(f"Wait, let me check: {acc}{op}{x}={true}.")
            if rng.random() < p_vacuous:
                thoughts.append(_alternative(acc, op, x, true))
        acc = true
    thoughts.append(f"The answer is \\boxed{{{acc}}}.")
    return "\n\n".join(thoughts)


def recheck_trace(
    problem: ToyProblem,
    rng: random.Random,
    *,
    p_slip: float = 0.18,
    p_reflect: float = 0.04,
    p_switch: float = 0.015,
) -> str:
    """One answer of the "recheck" world: one thought per step, where checking pays without knowing where.

    Each step slips with probability `p_slip`. Independently of whether it slipped, it is followed by a
    recheck ("Wait, let me check: 68-17=51.") with probability `p_reflect`, else by a recomputation in
    another way ("Alternatively, 68-10=58 and 58-7=51.") with probability `p_switch`. Both are always right
    and their value is the one carried forward: a check never harms a correct step and repairs a slipped
    one, but the corpus places it blind, so a policy can only raise its rate, not aim it.
    """
    acc, thoughts = problem.operands[0], []
    for op, x in zip(problem.ops, problem.operands[1:], strict=True):
        true = acc + x if op == "+" else acc - x
        shown = _slip(true, rng) if rng.random() < p_slip else true
        thoughts.append(f"{acc}{op}{x}={shown}.")
        r = rng.random()
        if r < p_reflect:
            thoughts.append(f"Wait, let me check: {acc}{op}{x}={true}.")
        elif r < p_reflect + p_switch:
            thoughts.append(_alternative(acc, op, x, true))
        else:
            true = shown  # unchecked: a slip propagates
        acc = true
    thoughts.append(f"The answer is \\boxed{{{acc}}}.")
    return "\n\n".join(thoughts)


_STEP = re.compile(r"^(\d+)([+-])(\d+)=(-?\d+)\.$")  # a computation thought: "23+45=68."


@dataclass(frozen=True)
class SlipCounts:
    """What a "thoughts"-world answer does after each computation: `slips` wrong results, of which
    `reflected` / `switched` are followed by a reflection ("Wait...") / transition ("Alternatively...")
    thought (repair attempts) and `fixed` are repaired successfully: the repair thought's last stated
    value is the step's right result and the answer carries that value on (the next computation starts
    from it, or the boxed answer is it when no computation follows); `steps` computations in all,
    `checks` reflection or transition thoughts after a correct one."""

    steps: int = 0
    slips: int = 0
    reflected: int = 0
    switched: int = 0
    checks: int = 0
    fixed: int = 0

    def __add__(self, other: SlipCounts) -> SlipCounts:
        return SlipCounts(*(a + b for a, b in zip(astuple(self), astuple(other), strict=True)))


_STATED = re.compile(r"=(-?\d+)")  # a value a thought states: "Wait, let me check: 23+45=68, not 69." -> 68
_BOXED = re.compile(r"\\boxed\{(-?\d+)\}")


def _carried(thoughts: list[str]) -> int | None:
    """The value the rest of an answer goes on from: the first operand of its next computation thought,
    else its boxed answer (None: neither)."""
    for thought in thoughts:
        if m := _STEP.match(thought):
            return int(m[1])
        if m := _BOXED.search(thought):
            return int(m[1])
    return None


def slip_counts(answer: str) -> SlipCounts:
    """Slips and what follows them in one answer of the "thoughts" world (thoughts split at blank lines;
    anything that is not a computation, a "Wait" or an "Alternatively" thought is ignored)."""
    thoughts = [t.strip() for t in answer.split("\n\n")]
    steps = slips = reflected = switched = checks = fixed = 0
    for i, thought in enumerate(thoughts):
        if not (m := _STEP.match(thought)):
            continue
        a, op, b, result = int(m[1]), m[2], int(m[3]), int(m[4])
        right = a + b if op == "+" else a - b
        after = thoughts[i + 1] if i + 1 < len(thoughts) else ""
        follows = "reflect" if after.startswith("Wait") else "switch" if after.startswith("Alternatively") else None
        steps += 1
        if result != right:
            slips += 1
            reflected += follows == "reflect"
            switched += follows == "switch"
            stated = _STATED.findall(after)
            fixed += follows is not None and bool(stated) and int(stated[-1]) == right == _carried(thoughts[i + 2 :])
        else:
            checks += follows is not None
    return SlipCounts(steps, slips, reflected, switched, checks, fixed)


@dataclass(frozen=True)
class World:
    """A toy world's pretraining recipe: `trace` writes the answers, `model_dir` holds its shipped base
    policy, `max_new_tokens` bounds an answer, `num_ops` the operations per problem; `marginal_share` of
    the pretraining sequences are `start token + answer` with the loss on the whole sequence (PreRL's
    prompt-free space, trained), the rest chat-formatted with the loss on the assistant turn."""

    trace: Callable[..., str]
    model_dir: Path
    max_new_tokens: int
    num_ops: tuple[int, int] = (2, 3)
    marginal_share: float = 0.0


WORLDS = {
    "arith": World(solution_trace, SHIPPED_MODEL_DIR, 120),
    "thoughts": World(thought_trace, THOUGHTS_MODEL_DIR, 200),
    "recheck": World(recheck_trace, RECHECK_MODEL_DIR, 240, num_ops=(3, 4), marginal_share=0.4),
}


def build_tokenizer():
    """Character-level tokenizer (one token per character) with a ChatML chat template.

    Like Qwen's, it has no BOS token and ends turns (and generations) with `<|im_end|>`.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS + CHARS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(SPECIAL_TOKENS)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<pad>",
        unk_token="<unk>",
        clean_up_tokenization_spaces=False,
    )
    hf.chat_template = CHAT_TEMPLATE
    hf.padding_side = "left"
    return hf


def build_model(tokenizer, *, hidden: int = 128, layers: int = 2, heads: int = 2, ffn: int = 384):
    """The toy policy architecture: a tiny Qwen3 with head_dim 64 (vLLM's CPU backend needs >= 32).

    Qwen3 rather than Qwen2: transformers 5 forces its own Qwen2Tokenizer onto any `qwen2` model
    directory, which would silently replace the character-level tokenizer saved beside it.
    """
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=ffn,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        head_dim=hidden // heads,
        max_position_embeddings=512,
        rope_theta=1e4,
        tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )
    return Qwen3ForCausalLM(config)
