"""Conditioning spaces: what a response is scored after when the policy is updated (`objective.space`).

    log P(y | c) = sum_t log P(y_t | c, y_<t),   c = space(the prompt and its parts)

The paper's two spaces are the ends of a range (arXiv 2604.14142): `conditional`, c = the whole
chat-templated prompt x (GRPO), and `marginal`, c = one start token s (PreRL). The others place the
context between them, for a study of where RL updates the model:

- `system`: s + the system prompt's tokens, no template (s alone for a prompt with none);
- `question`: s + the question's tokens, no template and no system prompt;
- `fixed`: s + one user-given context for every prompt (`data.fixed_context`, e.g. a generic instruction);
- `last_k`: the last `k` tokens of the templated prompt (at small k, the assistant header).

Every prompt-free context starts with s, as the marginal one does: a part that is empty gives the
marginal space, not a sequence with no first token. The texts are tokenised once on the data side
(`RolloutBatch.question_ids`, `system_ids`, `fixed_ids`); a space only picks and joins token ids, so it
runs in any pass (micro-batches, prompt sharing, the reference model, the alignment diagnostic).

A space is a registered class (`registry.register_space`), its parameters the `objective.space_args`
(the class attributes are optional, shown with their defaults):

    @register_space("my_space")
    @dataclass(frozen=True)
    class MySpace:
        shares_context: ClassVar[bool] = True  # samples of a prompt forward their context once (prompt sharing)
        reads: ClassVar[tuple[str, ...]] = ()  # prompt parts the batch must carry (`RolloutBatch.question_ids`, ...)
        positions_through_padding: ClassVar[bool] = False  # else positions count real tokens only
        def __call__(self, parts: PromptParts, start_token_id: int) -> tuple[Tensor, Tensor]: ...

Shapes: N samples, P prompt tokens, W part tokens, C context tokens; every tensor left-padded
(real tokens end at the last column) with a 0/1 mask of the same shape.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import ClassVar, Protocol

import torch

from lightning_prerl.objectives import registry
from lightning_prerl.objectives.registry import register_space


class PromptParts(Protocol):
    """What a space reads (a `RolloutBatch` is one): the templated prompt and its parts as tokens.

    prompt_ids, prompt_mask: (N, P) the chat-templated prompt; question_*, system_*, fixed_*: (N, W)
    the bare question, the system prompt and `data.fixed_context`, or None when the batch has none.
    """

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    question_ids: torch.Tensor | None
    question_mask: torch.Tensor | None
    system_ids: torch.Tensor | None
    system_mask: torch.Tensor | None
    fixed_ids: torch.Tensor | None
    fixed_mask: torch.Tensor | None


def after_start(start_token_id: int, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[s] + each row's real tokens, still left-padded: (N, W) -> (N, W + 1), s right before the first
    real token (in the last column for an empty row)."""
    rows = torch.arange(ids.shape[0], device=ids.device)  # (N,)
    first = ids.shape[1] - mask.sum(1)  # (N,) the column of s once one column is added on the left
    out_ids = torch.cat([ids[:, :1], ids], dim=1)  # (N, W + 1): a padded row's new column holds its padding
    out_mask = torch.nn.functional.pad(mask, (1, 0), value=0)  # (N, W + 1)
    out_ids[rows, first] = start_token_id
    out_mask[rows, first] = 1
    return out_ids, out_mask


def parts_read(spaces) -> list[str]:
    """The prompt parts (`question`, `system`, `fixed`) that a collection of space specs reads, in order."""
    read = {part for space in spaces for part in getattr(type(bind_space(space)), "reads", ())}
    return [part for part in ("question", "system", "fixed") if part in read]


def _part(parts: PromptParts, name: str, hint: str) -> tuple[torch.Tensor, torch.Tensor]:
    ids, mask = getattr(parts, f"{name}_ids"), getattr(parts, f"{name}_mask")
    if ids is None:
        raise ValueError(f"objective.space={name!r}: the rollout batch carries no {name} tokens ({hint})")
    return ids, mask


@register_space("conditional")
@dataclass(frozen=True)
class Conditional:
    """The whole chat-templated prompt x: log P(y|x), the engine's own distribution."""

    shares_context: ClassVar[bool] = True

    def __call__(self, parts: PromptParts, start_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        return parts.prompt_ids, parts.prompt_mask  # (N, P), (N, P)


@register_space("marginal")
@dataclass(frozen=True)
class Marginal:
    """One start token s: the prompt-free log P(y) of PreRL (one token: nothing to share). Its positions
    run 0..T through the response padding too, as they always have (the padding's log-probs, never
    counted, stay bit-identical to the runs before spaces were registered)."""

    shares_context: ClassVar[bool] = False
    positions_through_padding: ClassVar[bool] = True

    def __call__(self, parts: PromptParts, start_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        start = torch.full((parts.prompt_ids.shape[0], 1), start_token_id, dtype=parts.prompt_ids.dtype)
        start = start.to(parts.prompt_ids.device)  # (N, 1)
        return start, torch.ones_like(start)  # (N, 1), (N, 1)


@register_space("last_k")
@dataclass(frozen=True)
class LastK:
    """The last `k` tokens of the templated prompt (a shorter prompt whole)."""

    k: int
    shares_context: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ValueError(f"k={self.k}: must be >= 1 (the last k prompt tokens)")

    def __call__(self, parts: PromptParts, start_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        return parts.prompt_ids[:, -self.k :], parts.prompt_mask[:, -self.k :]  # (N, min(k, P)) each


def _after_start_space(part: str, doc: str, hint: str) -> type:
    """Register space `part`: s + the `<part>` tokens the batch carries (`after_start`)."""

    @dataclass(frozen=True)
    class AfterStart:
        reads: ClassVar[tuple[str, ...]] = (part,)
        shares_context: ClassVar[bool] = True

        def __call__(self, parts: PromptParts, start_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
            return after_start(start_token_id, *_part(parts, part, hint))  # (N, W + 1) each

    AfterStart.__name__ = AfterStart.__qualname__ = part.capitalize()
    AfterStart.__doc__ = doc
    return register_space(part)(AfterStart)


HAND_BUILT = "a recorded or hand-built batch"
Question = _after_start_space("question", "s + the question's tokens, no chat template, no system prompt.", HAND_BUILT)
System = _after_start_space("system", "s + the system prompt's tokens, no template (s alone without one).", HAND_BUILT)
Fixed = _after_start_space(
    "fixed", "s + `data.fixed_context`, the same text for every prompt.", "set data.fixed_context"
)


def bind_space(space) -> object:
    """A space instance from a registered name (default parameters), a mapping `{space: name,
    space_args: {...}}` as in an objective's config (`{space: last_k, space_args: {k: 8}}`), or an
    instance (returned as is)."""
    if isinstance(space, str):
        return registry.bind("space", space, {}, {})
    if isinstance(space, Mapping):
        return registry.bind(
            "space", space["space"], {}, {str(k): v for k, v in (space.get("space_args") or {}).items()}
        )
    return space


def space_label(space) -> str:
    """A short name of a space for metric keys and file names: `last_k` with k 8 -> `last_k8`."""
    space = bind_space(space)
    name = next(n for n in registry.names("space") if registry.lookup("space", n).fn is type(space))
    return name + "".join(str(getattr(space, f.name)) for f in fields(space))
