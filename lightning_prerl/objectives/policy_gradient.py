"""One policy-gradient objective, parameterised by the space it updates and the samples it keeps.

    loss = coef * aggregate_{kept samples} [ policy_loss(A_i, rho_it) + kl_coef * KL_it - entropy_coef * H_it ]

The advantage estimator, the policy loss and the aggregation are registered parts chosen by name
(`objectives/registry.py`; defaults: `grpo`, `ppo_clip` -- PPO-clip with dual clip --, `token-mean`).

- `space: conditional` scores log P(y_t | x, y_<t): GRPO / CondRL, Zhu et al.'s NSR, PSR, W-REINFORCE.
- `space: marginal` scores log P(y_t | s, y_<t) with the whole prompt replaced by one start token s
  (arXiv 2604.14142, PreRL). The policy module computes only the log-probs of the active space, so
  a PreRL step never pays for a conditional forward pass.
- the other registered spaces (`objectives/spaces.py`: system, question, fixed, last_k) score the
  response after another context c that replaces the prompt: log P(y_t | c, y_<t).
- `samples: negative | positive` keeps samples with A < -tol / A > tol by masking the *response
  mask*: the token mean then runs over the kept samples' tokens only (NSR-PreRL, PSR-PreRL). A group
  whose rewards are all equal (within `adv_tolerance`) gets a group-relative A = 0 exactly, so
  all-wrong, all-right and all-0.1 groups contribute nothing and floating-point noise never makes a
  "negative" (the signed estimator is not group-relative: a wrong answer is -1 in any group).

Departures from the authors' verl code, all deliberate: the PreRL loss is not added to a
zero-weighted conditional loss (its forward pass is skipped instead); the start token comes from the
tokenizer, not a fixed id; the normaliser counts kept tokens over the whole rollout batch and all
ranks, so micro-batch size and world size do not change the update.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from lightning_prerl.objectives import aggregation, losses, registry, spaces  # noqa: F401 (importing registers the parts)
from lightning_prerl.objectives.advantages import REWARD_TOLERANCE, flat_groups
from lightning_prerl.objectives.ops import kl_estimate
from lightning_prerl.objectives.registry import LossInputs, LossOutput

SAMPLES = ("all", "negative", "positive")
PRETRAIN_LR_SCALE = 0.1  # the learning-rate rule of the prompt-free (marginal) family, see `lr_scale`


@dataclass
class PolicyGradientObjective:
    """Config and math of one objective (see the module docstring).

    Attributes:
        name: label used in logs and reports.
        space: registered conditioning space (`objectives/spaces.py`): "conditional" (log P(y|x)),
            "marginal" (prompt-free log P(y)), "system", "question", "fixed" or "last_k".
        advantage: registered estimator (`objectives/advantages.py`): grpo, group_mean or signed.
        samples: which samples enter the loss: all, negative or positive advantage.
        positive_weight: lambda of the signed estimator (W-REINFORCE: 0.1).
        coef: loss multiplier (the authors use 0.01 for PreRL's `pretrain_loss_coef`).
        eps_low, eps_high: PPO ratio clip range [1 - eps_low, 1 + eps_high].
        clip_c: dual-clip bound for negative advantages (null: off).
        kl_coef: KL-to-reference weight; 0 means no reference model is ever loaded.
        kl_estimator: k1, k2 or k3.
        entropy_coef: entropy bonus weight (0: entropy is not computed).
        adv_eps: epsilon of the GRPO std normalisation.
        adv_tolerance: |A| <= this counts as zero: such samples are neither negative nor positive,
            and groups whose rewards span no more than this get A = 0 exactly.
        lr_scale: multiplier of the optimizer's learning rate while this objective is active. None
            applies the one rule: 1.0 in the conditional space, 0.1 (`PRETRAIN_LR_SCALE`) in the
            prompt-free one and every other space that drops part of the prompt. With Adam a loss
            coefficient barely changes the step size (the update is normalised), so the PreRL
            family's 0.01 `coef` alone does not make its steps smaller.
        policy_loss: registered loss (`objectives/losses/`); `ppo_clip` takes eps_low, eps_high, clip_c.
        aggregation: registered aggregation (`objectives/aggregation.py`), default the global token mean.
        advantage_args, loss_args, aggregation_args, space_args: the parts' own parameters
            (`registry.bind`; `last_k` takes `k`).
    """

    name: str = "grpo"
    space: str = "conditional"
    advantage: str = "grpo"
    samples: str = "all"
    positive_weight: float = 1.0
    coef: float = 1.0
    eps_low: float = 0.2
    eps_high: float = 0.2
    clip_c: float | None = 10.0
    kl_coef: float = 0.0
    kl_estimator: str = "k3"
    entropy_coef: float = 0.0
    adv_eps: float = 1e-6
    adv_tolerance: float = REWARD_TOLERANCE
    lr_scale: float | None = None
    policy_loss: str = "ppo_clip"
    aggregation: str = "token-mean"
    advantage_args: dict = field(default_factory=dict)
    loss_args: dict = field(default_factory=dict)
    aggregation_args: dict = field(default_factory=dict)
    space_args: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        choices = {"samples": SAMPLES, "kl_estimator": ("k1", "k2", "k3")}
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ValueError(f"objective.{key}={getattr(self, key)!r}: expected one of {list(allowed)}")
        if self.lr_scale is None:
            self.lr_scale = 1.0 if self.space == "conditional" else PRETRAIN_LR_SCALE
        if self.lr_scale <= 0:
            raise ValueError(f"objective.lr_scale={self.lr_scale}: must be > 0")
        for key in ("coef", "eps_low", "eps_high", "kl_coef", "entropy_coef", "adv_tolerance"):
            if getattr(self, key) < 0:
                raise ValueError(f"objective.{key}={getattr(self, key)}: must be >= 0")
        if self.clip_c is not None and self.clip_c <= 1:
            raise ValueError(f"objective.clip_c={self.clip_c}: must be > 1 (or null to disable)")
        parts = {}
        for kind in registry.KINDS:  # a Hydra DictConfig becomes a plain dict (checkpoints, equality)
            args = {str(k): v for k, v in (getattr(self, registry.ARGS_KEY[kind]) or {}).items()}
            setattr(self, registry.ARGS_KEY[kind], args)
            shared = {k: getattr(self, k) for k in registry.SHARED[kind]}
            parts[kind] = registry.bind(kind, getattr(self, kind), shared, args)
        self._advantage_fn, self._loss_fn, self._aggregate, self.context = (
            parts["advantage"],
            parts["policy_loss"],
            parts["aggregation"],
            parts["space"],
        )

    @property
    def needs_reference(self) -> bool:
        return self.kl_coef > 0

    @property
    def needs_entropy(self) -> bool:
        return self.entropy_coef > 0

    @property
    def inert_at_zero_advantage(self) -> bool:
        """A sample with A = 0 adds exactly 0 to this loss and its gradient (no KL or entropy term)."""
        return not (self.needs_reference or self.needs_entropy)

    def advantages(self, rewards: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Advantages and the kept-sample mask for a batch of whole groups.

        Args:
            rewards: (N,) rewards, N = B * G, groups contiguous.
            group_size: G.

        Returns:
            adv (N,) and keep (N,) bool.
        """
        grouped = rewards.float().view(-1, group_size)  # (B, G)
        adv = self._advantage_fn(grouped)  # (B, G)
        if registry.lookup("advantage", self.advantage).group_relative:  # a flat group's A is 0, not noise
            adv = torch.where(flat_groups(grouped, self.adv_tolerance)[:, None], 0.0, adv)
        adv = adv.reshape(-1)  # (N,)
        if self.samples == "negative":
            keep = adv < -self.adv_tolerance
        elif self.samples == "positive":
            keep = adv > self.adv_tolerance
        else:
            keep = torch.ones_like(adv, dtype=torch.bool)
        return adv, keep

    def loss_weights(self, mask: torch.Tensor) -> torch.Tensor:
        """(N, T) per-token weights of the aggregation, row by row (any micro-batch of rows)."""
        return self._aggregate.weights(mask)

    def loss_count(self, mask: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """This rank's share of the aggregation's normaliser over its whole (mini-)batch: mask (N, T)
        loss mask, rows (N,) bool real samples. The update sums it over ranks."""
        return self._aggregate.count(mask, rows)

    def loss_terms(
        self,
        logp: torch.Tensor,
        old_logp: torch.Tensor,
        adv: torch.Tensor,
        ref_logp: torch.Tensor | None = None,
        entropy: torch.Tensor | None = None,
        is_weights: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> LossOutput:
        """Per-token loss (N, T) before masking and aggregation, and the tokens where the loss clips.

        Args:
            logp, old_logp: (N, T) log-probs in this objective's space.
            adv: (N,) advantages.
            ref_logp: (N, T) reference log-probs, required when kl_coef > 0.
            entropy: (N, T) policy entropy, required when entropy_coef > 0.
            is_weights: (N, T) rollout-correction weights of the policy-gradient term (None: 1), as
                verl's `rollout_is`: the KL and entropy terms are not reweighted.
            mask: (N, T) loss mask, for losses with sequence-level quantities (None: every token).
        """
        mask = torch.ones_like(old_logp) if mask is None else mask  # (N, T)
        out = self._loss_fn(LossInputs(logp, old_logp, adv, mask))
        loss = out.loss  # (N, T)
        if is_weights is not None:
            loss = loss * is_weights
        if self.needs_reference:
            if ref_logp is None:
                raise ValueError("objective.kl_coef > 0 but no reference log-probs were computed")
            loss = loss + self.kl_coef * kl_estimate(logp, ref_logp, self.kl_estimator)
        if self.needs_entropy:
            if entropy is None:
                raise ValueError("objective.entropy_coef > 0 but no entropy was computed")
            loss = loss - self.entropy_coef * entropy
        return LossOutput(self.coef * loss, out.clipped)

    def token_loss(
        self, logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor, *args, **kwargs
    ) -> torch.Tensor:
        """(N, T): `loss_terms`' loss alone (same arguments)."""
        return self.loss_terms(logp, old_logp, adv, *args, **kwargs).loss
