"""Gradient-alignment diagnostic: does pushing log P(y) move log P(y|x) the same way?

For each sampled response y of prompt x, with s the start token,
    g_marg = grad_theta sum_t log P(y_t | s, y_<t)        g_cond = grad_theta sum_t log P(y_t | x, y_<t)
and we report <g_marg, g_cond>, cos(g_marg, g_cond) and the token-mean log-prob gap
log P(y|x) - log P(y). Any two conditioning spaces compare the same way (`pairs`: (a, b) gives
<g_a, g_b> and log P(y|c_b) - log P(y|c_a); `objectives/spaces.py`); (marginal, conditional) is the
paper's pair and keeps the plain `align/*` keys. A first-order step of PreRL on y changes log P(y|x) by
eta * R(y) * <g_marg, g_cond> (arXiv 2604.14142, Sec. 2), so a positive inner product is what makes
PreRL a surrogate for conditional RL. The paper reports, on Qwen3-4B / AMC23, mean inner product
+9.23, 0 % negative, mean cosine 0.44. Gradients are over all trainable parameters of the policy
(the paper does not say which parameters it used).
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import lightning as L
import torch

from lightning_prerl.data.batch import RolloutBatch
from lightning_prerl.objectives.spaces import bind_space, space_label
from lightning_prerl.scale.models import is_sharded
from lightning_prerl.training.logprobs import sequence_logprobs

log = logging.getLogger(__name__)


def _flat_grad(value: torch.Tensor, params: list[torch.nn.Parameter]) -> torch.Tensor:
    grads = torch.autograd.grad(value, params, allow_unused=True)
    return torch.cat(
        [(g if g is not None else torch.zeros_like(p)).flatten() for g, p in zip(grads, params, strict=True)]
    )


SAMPLE_FIELDS = ["step", "sample", "reward", "inner", "cosine", "logp_gap"]
PAPER_PAIR = ("marginal", "conditional")  # PreRL's gradient against GRPO's: the plain align/* keys


def pairs_samples(
    policy: torch.nn.Module,
    batch: RolloutBatch,
    start_token_id: int,
    max_samples: int = 8,
    temperature: float = 1.0,
    pairs: list[tuple] = (PAPER_PAIR,),
) -> list[list[dict[str, float]]]:
    """Per pair of spaces (names, `{space: name, space_args: {...}}` mappings or bound spaces), per
    response, for the first `max_samples` responses of `batch` (no .grad is touched): {reward, inner,
    cosine, logp_gap}, inner <g_a, g_b> and logp_gap the token-mean log P(y|c_b) - log P(y|c_a). Each
    space's gradient is computed once per response, however many pairs hold it."""
    params = [p for p in policy.parameters() if p.requires_grad]
    labelled = [tuple(space_label(space) for space in pair) for pair in pairs]  # last_k with k 8: last_k8
    bound = {}  # label -> bound space, each space once
    for pair, labels in zip(pairs, labelled, strict=True):
        for space, label in zip(pair, labels, strict=True):
            bound.setdefault(label, bind_space(space))
    out = [[] for _ in pairs]
    for i in range(min(max_samples, len(batch))):
        one = batch.select(slice(i, i + 1))
        mask = one.response_mask.float()  # (1, T)
        per_space = {}  # label -> (flat gradient (P,), token-mean log-prob)
        for label, space in bound.items():
            logp, _ = sequence_logprobs(policy, one, space, start_token_id, temperature)  # (1, T)
            total = (logp * mask).sum()
            per_space[label] = (_flat_grad(total, params), total.detach() / mask.sum())
        for rows, (a, b) in zip(out, labelled, strict=True):
            (g_a, lp_a), (g_b, lp_b) = per_space[a], per_space[b]
            dot = torch.dot(g_a, g_b)
            rows.append(
                {
                    "reward": one.rewards[0].item(),
                    "inner": dot.item(),
                    "cosine": (dot / (g_a.norm() * g_b.norm()).clamp(min=1e-12)).item(),
                    "logp_gap": (lp_b - lp_a).item(),
                }
            )
    return out


def alignment_samples(
    policy: torch.nn.Module,
    batch: RolloutBatch,
    start_token_id: int,
    max_samples: int = 8,
    temperature: float = 1.0,
    pair: tuple = PAPER_PAIR,
) -> list[dict[str, float]]:
    """`pairs_samples` of one pair: its rows."""
    return pairs_samples(policy, batch, start_token_id, max_samples, temperature, [pair])[0]


def pair_prefix(pair: tuple) -> str:
    """`align/` for the paper's pair, else `align/<a>_vs_<b>/` (`last_k` with k 8: `last_k8`)."""
    labels = tuple(space_label(space) for space in pair)
    return "align/" if labels == PAPER_PAIR else f"align/{labels[0]}_vs_{labels[1]}/"


def summarize(rows: list[dict[str, float]], prefix: str = "align/") -> dict[str, float]:
    """<prefix>{inner,cosine,logp_gap}_{mean,min,max} and <prefix>negative_share of `alignment_samples` rows."""
    out = {f"{prefix}negative_share": sum(r["inner"] < 0 for r in rows) / max(1, len(rows))}
    for name in ("inner", "cosine", "logp_gap"):
        t = torch.tensor([r[name] for r in rows], dtype=torch.float64)  # Python floats, kept at their precision
        out.update(
            {
                f"{prefix}{name}_mean": t.mean().item(),
                f"{prefix}{name}_min": t.min().item(),
                f"{prefix}{name}_max": t.max().item(),
            }
        )
    return out


def gradient_alignment(
    policy: torch.nn.Module,
    batch: RolloutBatch,
    start_token_id: int,
    max_samples: int = 8,
    temperature: float = 1.0,
    pair: tuple = PAPER_PAIR,
) -> dict[str, float]:
    """`summarize(alignment_samples(...))`: the statistics of `pair` over the first `max_samples` responses."""
    rows = alignment_samples(policy, batch, start_token_id, max_samples, temperature, pair)
    return summarize(rows, pair_prefix(pair))


class GradientAlignment(L.Callback):
    """Every `every_n_steps` steps, measure gradient alignment on `max_samples` fresh rollouts.

    Runs on single-device and DDP runs (each rank measures its own rollouts; the logged values are
    rank means). Under FSDP2 or ZeRO-3 the per-sample full gradients would need gathering; it is skipped there
    with a warning. Every measured response is also a row of `<log dir>/alignment.csv` (SAMPLE_FIELDS;
    rank 0's responses): the histograms of the reproduction report; a pair other than the paper's
    writes `alignment_<a>_vs_<b>.csv`. `at_end`: measure once more on a fresh rollout batch of the
    trained policy, logged at the final step. `pairs`: the (a, b) space pairs compared, each a
    registered name or `{space: name, **args}` (default: the paper's (marginal, conditional)).
    """

    def __init__(self, every_n_steps: int = 10, max_samples: int = 8, at_end: bool = False, pairs: list | None = None):
        if every_n_steps < 1 or max_samples < 1:
            raise ValueError(f"alignment every_n_steps={every_n_steps}, max_samples={max_samples}: must be >= 1")
        self.every_n_steps, self.max_samples, self.at_end = every_n_steps, max_samples, at_end
        self.pairs = [tuple(pair) for pair in (pairs or [PAPER_PAIR])]
        for pair in self.pairs:
            if len(pair) != 2:
                raise ValueError(f"alignment pairs: {list(pair)} is not a pair of spaces")
            for space in pair:
                bind_space(space)  # an unknown space or a bad parameter fails here, before any compute

    def on_train_batch_start(self, trainer: L.Trainer, pl_module, batch: RolloutBatch, batch_idx: int) -> None:
        if trainer.global_step % self.every_n_steps == 0:
            self.measure(trainer, pl_module, batch)

    def on_train_end(self, trainer: L.Trainer, pl_module) -> None:
        if self.at_end:  # the final step's weights never start a training batch
            batch = trainer.datamodule.train_batch(trainer.current_epoch + 1)  # prompts no step trained on
            self.measure(trainer, pl_module, batch)

    def measure(self, trainer: L.Trainer, pl_module, batch: RolloutBatch) -> None:
        if is_sharded(pl_module.policy):  # FSDP2 shards, ZeRO-3 partitions: per-sample full gradients needed
            log.warning("gradient alignment is not measured under sharded strategies (FSDP2, ZeRO-3)")
            return
        policy, start, temperature = pl_module.policy, pl_module.start_token_id, pl_module.hparams.temperature
        every = pairs_samples(policy, batch, start, self.max_samples, temperature, self.pairs)
        for pair, rows in zip(self.pairs, every, strict=True):
            prefix, step = pair_prefix(pair), trainer.global_step
            stats = summarize(rows, prefix)
            if trainer.world_size > 1:  # rank means, as self.log(sync_dist=True) would give
                stats = {k: trainer.strategy.reduce(torch.tensor(v), reduce_op="mean").item() for k, v in stats.items()}
            if trainer.is_global_zero:
                for logger in trainer.loggers:  # logged against the step, also outside a training batch (at_end)
                    logger.log_metrics(stats, step=step)
                name = "alignment.csv" if prefix == "align/" else f"alignment_{prefix.split('/')[1]}.csv"
                self._write_samples(trainer, [{"step": step, "sample": i, **r} for i, r in enumerate(rows)], name)

    @staticmethod
    def _write_samples(trainer: L.Trainer, rows: list[dict[str, float]], name: str) -> None:
        from lightning_prerl.reports.callbacks import csv_logger

        logger = csv_logger(trainer)
        if logger is None:
            return
        path = Path(logger.log_dir) / name
        path.parent.mkdir(parents=True, exist_ok=True)
        new = not path.is_file()
        with open(path, "a", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=SAMPLE_FIELDS)
            if new:
                writer.writeheader()
            writer.writerows(rows)
