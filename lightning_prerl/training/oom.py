"""Out-of-memory backoff: a pass that runs out of memory is retried with half the token budget.

RL micro-batches vary in length from step to step: a budget that fit for a thousand steps can fail
on the step whose responses all hit `max_new_tokens`. `backward_objective` runs each micro-batch's
forward and backward inside `micro_batch_guard`, which turns an allocation failure into a
`PassOutOfMemory` naming the micro-batch's padded tokens. `PolicyModule` then drops the pass's
gradients, frees what it can (`free_memory`), lowers `module.micro_batch_tokens` to half the failed
micro-batch (`OOMBackoff.halve`) and runs the whole pass again (counted in `train/oom_retries`). The
token-mean normaliser is counted on the whole mini-batch and every per-token weight is row-local, so
the update does not depend on the cut: it equals the update without the failure up to the float
summation order of the micro-batches. The lower budget stays for the rest of the run (it is saved in
checkpoints, so a resumed run cuts its batches the same way).

Ranks must stay in lockstep. A forward pass on 1 process or under DDP runs no collective, so after
each micro-batch's forward every rank reports whether it failed (one max all-reduce, only on more
than one rank) and all of them retry together. A backward under DDP all-reduces gradients, and a
sharded forward (FSDP2, ZeRO-3) gathers parameters: a rank that fails there has left the others
waiting inside a collective, so the failure ends the run with one line (the hang watchdog ends the
waiting ranks) instead of being retried. Generation backs off the same way in the HF engine
(`rollout.hf`): a decoding call that runs out of memory is split in two; vLLM preempts and
recomputes sequences by itself when its KV cache is full.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Callable
from typing import TypeVar

import torch

from lightning_prerl.data.batch import RolloutBatch
from lightning_prerl.errors import RunFault
from lightning_prerl.scale.models import free_memory

log = logging.getLogger(__name__)
R = TypeVar("R")


class PassOutOfMemory(torch.OutOfMemoryError):
    """A micro-batch ran out of memory (on this rank, or, when ranks agree, on any rank).

    Attributes:
        tokens: padded tokens (prompt + response) of this rank's failed micro-batch.
        rows: its samples.
        stage: "forward" or "backward".
        retriable: every rank knows and no gradient was all-reduced: the pass can run again.
    """

    def __init__(self, tokens: int, rows: int, stage: str, retriable: bool):
        self.tokens, self.rows, self.stage, self.retriable = tokens, rows, stage, retriable
        super().__init__(f"out of memory in the {stage} of a micro-batch of {rows} samples, {tokens} padded tokens")


def padded_tokens(batch: RolloutBatch) -> int:
    """Tokens a pass over `batch` forwards, padding included (what `micro_batch_tokens` bounds)."""
    return batch.prompt_ids.numel() + batch.response_ids.numel()


@contextlib.contextmanager
def micro_batch_guard(mb: RolloutBatch, stage: str, world_size: int = 1, agree=None):
    """Run one micro-batch's `stage` ("forward" / "backward"); an allocation failure leaves as
    `PassOutOfMemory`. With `agree` (the max over ranks of an int; given for forward passes that run
    no collective), every rank learns whether any rank failed and all raise together.
    """
    failed = False
    try:
        yield
    except torch.OutOfMemoryError:
        failed = True
    if agree is not None and world_size > 1:
        failed = bool(agree(int(failed)))
    if failed:
        retriable = world_size == 1 or (stage == "forward" and agree is not None)
        raise PassOutOfMemory(padded_tokens(mb), len(mb), stage, retriable)


class OOMBackoff:
    """The run's token budget after out-of-memory retries, and how many there were.

    Args:
        max_retries: passes retried in a row before the run stops (0: the first failure stops it).
    """

    def __init__(self, max_retries: int):
        self.max_retries = max_retries
        self.lockstep = True  # a failed pass can run again on every rank (False: DeepSpeed, FSDP2)
        self.agree: Callable[[int], int] = lambda flag: flag  # max over ranks
        self.retries = 0  # over the run (logged as train/oom_retries)
        self.max_tokens: int | None = None  # the lowered budget, once a pass failed

    def budget(self, configured: int | None) -> int | None:
        """The token budget passes use now: the configured one, or the lowered one below it."""
        if self.max_tokens is None:
            return configured
        return self.max_tokens if configured is None else min(configured, self.max_tokens)

    def run(
        self,
        attempt: Callable[[int | None], R],
        configured: int | None,
        step: int,
        reset: Callable[[], None] = lambda: None,
        keep: object | None = None,
    ) -> R:
        """`attempt(token budget)`; after a `PassOutOfMemory`, `reset()` (drop the pass's gradients),
        put `keep`'s attributes back as they were (statistics the pass added to) and run it again with
        half the failed micro-batch's tokens, or raise `RunFault`. `agree` (max over ranks) makes the
        ranks stop together; `lockstep` is False where a failed rank cannot rejoin the others.
        """
        saved = copy.deepcopy(vars(keep)) if keep is not None else None
        in_a_row = 0
        while True:
            in_a_row += 1
            try:
                return attempt(self.budget(configured))
            except PassOutOfMemory as exc:
                err = PassOutOfMemory(exc.tokens, exc.rows, exc.stage, exc.retriable and self.lockstep)
            # out of the except block: the failed pass's frames (and their tensors) are unreferenced
            reset()
            if keep is not None:
                vars(keep).update(copy.deepcopy(saved))
            free_memory()
            why = self.why_stop(err, in_a_row, configured)
            if err.retriable and self.agree(int(why is not None)):  # every rank stops, or none does
                why = why or f"{err}: another rank could not retry"
            if why is not None:
                raise RunFault(f"run stopped at step {step}: {why}")
            self.halve(err)
            log.warning("%s at step %d: retrying with micro_batch_tokens=%d", err, step, self.max_tokens)

    def why_stop(self, err: PassOutOfMemory, in_a_row: int, configured: int | None) -> str | None:
        """None when the pass can run again with half the budget, else the run's one closing line."""
        where = f"{err} (module.micro_batch_tokens={self.budget(configured)})"
        if not err.retriable:
            return f"{where}: it failed inside a collective, so the ranks cannot retry together; lower the budget"
        if err.rows <= 1:
            return f"{where}: one sample does not fit; lower data.sampling.max_new_tokens"
        if in_a_row > self.max_retries:
            return f"{where}: still out of memory after {self.max_retries} halvings (module.oom_retries)"
        return None

    def halve(self, err: PassOutOfMemory) -> None:
        """Lower the budget to half the failed micro-batch (counted)."""
        self.max_tokens = max(1, err.tokens // 2)
        self.retries += 1

    def state_dict(self) -> dict:
        return {"retries": self.retries, "max_tokens": self.max_tokens}

    def load_state_dict(self, state: dict) -> None:
        self.retries, self.max_tokens = state.get("retries", 0), state.get("max_tokens")
