"""Several updates per rollout batch, the rollout-vs-trainer correction, tolerance masks, entropy and
the learning-rate rule: hand-derived numbers on written tensors and on the tiny real model."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from lightning_prerl.objectives import PolicyGradientObjective as PG
from lightning_prerl.objectives.correction import MismatchStats, RolloutCorrection
from lightning_prerl.objectives.policy_gradient import PRETRAIN_LR_SCALE
from lightning_prerl.training.logprobs import sequence_logprobs
from lightning_prerl.training.update import Collectives, MicroBatching, backward_objective, prepare
from tests.test_policy import make_batch

CONF = str(Path(__file__).resolve().parents[1] / "conf")


# -- tolerance masks and partial credit --------------------------------------------------------------
@pytest.mark.parametrize("advantage", ["grpo", "group_mean"])
def test_a_flat_group_of_non_binary_rewards_has_zero_advantage_and_no_negatives(advantage):
    rewards = torch.full((8,), 0.1)  # float32 mean of eight 0.1s is not 0.1: A was -7.45e-9 before
    adv, keep = PG(advantage=advantage, samples="negative").advantages(rewards, 8)
    assert torch.equal(adv, torch.zeros(8)) and not keep.any()
    _, keep = PG(advantage=advantage, samples="positive").advantages(rewards, 8)
    assert not keep.any()


def test_partial_credit_rewards_by_hand():
    rewards = torch.tensor([0.2, 0.5, 0.5, 0.8, 0.3, 0.3, 0.3, 0.3])  # group 2 is flat
    adv, keep = PG(advantage="group_mean", samples="negative").advantages(rewards, 4)
    # group 1: mean 0.5 -> A = -0.3, 0, 0, +0.3; the two A = 0 samples are neither sign
    assert adv.tolist() == pytest.approx([-0.3, 0.0, 0.0, 0.3, 0, 0, 0, 0], abs=1e-6)
    assert keep.tolist() == [True, False, False, False, False, False, False, False]
    adv, keep = PG(advantage="grpo", samples="positive").advantages(rewards, 4)
    std = math.sqrt((0.09 + 0.09) / 3)  # unbiased: two deviations of 0.3 over G - 1 = 3
    assert adv[:4].tolist() == pytest.approx([-0.3 / std, 0, 0, 0.3 / std], rel=1e-5)
    assert keep.tolist() == [False, False, False, True, False, False, False, False]


def test_signed_advantage_is_not_group_relative_so_a_flat_wrong_group_stays_negative():
    adv, keep = PG(advantage="signed", samples="negative").advantages(torch.zeros(4), 4)
    assert adv.tolist() == [-1.0] * 4 and keep.all()


# -- one learning-rate rule --------------------------------------------------------------------------
def test_the_lr_scale_rule_is_the_same_for_classes_and_yaml():
    from lightning_prerl.training.policy import CondRL, NSRPreRL, PreRL, PSRPreRL

    assert PG(space="marginal").lr_scale == PRETRAIN_LR_SCALE == 0.1 and PG().lr_scale == 1.0
    for cls, scale in ((CondRL, 1.0), (PreRL, 0.1), (NSRPreRL, 0.1), (PSRPreRL, 0.1)):
        assert PG(**cls.preset).lr_scale == scale
    marginal = {"prerl", "nsr_prerl", "psr_prerl", "zhu_nsr_prerl", "zhu_psr_prerl", "w_reinforce_prerl"}
    with initialize_config_dir(config_dir=CONF, version_base=None):
        for name in [p.stem for p in Path(CONF, "objective").glob("*.yaml") if "training.dsrl." not in p.read_text()]:
            cfg = compose("config", overrides=[f"objective={name}"])
            from hydra.utils import instantiate

            objective = instantiate(cfg.objective)
            assert objective.lr_scale == (0.1 if name in marginal else 1.0), name
            assert (objective.space == "marginal") == (name in marginal), name


# -- rollout correction by hand ----------------------------------------------------------------------
RATIOS = torch.tensor([[2.0, 0.5, 4.0], [1.0, 1.0, 1.0]])  # trainer / engine per token
MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])  # sample 2 has two tokens


def _logps():
    rollout = torch.full((2, 3), -1.0)
    return rollout + torch.log(RATIOS), rollout


def test_token_and_sequence_tis_weights_by_hand():
    train, rollout = _logps()
    w, keep = RolloutCorrection(tis="token", tis_cap=2.0).weights(train, rollout, MASK)
    assert w[0].tolist() == pytest.approx([2.0, 0.5, 2.0]) and w[1, :2].tolist() == pytest.approx([1.0, 1.0])
    assert torch.equal(keep, torch.ones(2, 3))
    w, _ = RolloutCorrection(tis="sequence", tis_cap=3.0).weights(train, rollout, MASK)
    assert w[0].tolist() == pytest.approx([3.0] * 3)  # product 2 * 0.5 * 4 = 4, capped at 3
    assert w[1].tolist() == pytest.approx([1.0] * 3)


def test_token_and_sequence_masks_by_hand():
    train, rollout = _logps()
    _, keep = RolloutCorrection(mask="token", mask_low=0.5, mask_high=2.0).weights(train, rollout, MASK)
    assert keep[0].tolist() == [1.0, 1.0, 0.0]  # 4 leaves [0.5, 2]; the bounds themselves stay
    _, keep = RolloutCorrection(mask="sequence", mask_low=0.5, mask_high=1.5).weights(train, rollout, MASK)
    # geometric mean of sample 1: 4 ** (1/3) = 1.587 > 1.5 -> dropped whole; sample 2: 1 -> kept
    assert keep.tolist() == [[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]]


def test_mismatch_statistics_by_hand():
    train, rollout = _logps()
    stats = MismatchStats()
    stats.add(train, rollout, MASK)
    out = {k: float(v) for k, v in stats.result(lambda x: x, lambda x: x).items()}
    logs = [math.log(2), math.log(0.5), math.log(4), 0.0, 0.0]
    assert out["rollout_corr/abs_diff"] == pytest.approx(sum(map(abs, logs)) / 5, rel=1e-6)
    k3 = [math.exp(x) - 1 - x for x in logs]  # KL(engine || trainer) from the engine's samples
    assert out["rollout_corr/kl"] == pytest.approx(sum(k3) / 5, rel=1e-6)
    assert out["rollout_corr/ratio_max"] == pytest.approx(4.0)


def test_bad_correction_values_name_the_key():
    with pytest.raises(ValueError, match=r"rollout_correction.tis='seq'"):
        RolloutCorrection(tis="seq")
    with pytest.raises(ValueError, match="mask_low=1.2"):
        RolloutCorrection(mask_low=1.2)


# -- updates on the tiny real model (`policy`: conftest) ------------------------------------------------
def test_one_update_per_batch_runs_no_extra_pass_and_takes_old_logprobs_from_the_forward(policy, tokenizer):
    batch = make_batch(tokenizer)
    calls = []
    handle = policy.register_forward_hook(lambda *a: calls.append(1))
    prepared, stats = prepare(PG(), policy, batch, 0, updates=1)
    assert calls == [] and prepared.old_logprobs is None and not stats.sums
    prepared, _ = prepare(PG(), policy, batch, 0, micro=MicroBatching(share_prompts=False), updates=4)
    handle.remove()
    assert len(calls) == 1 and prepared.old_logprobs is not None  # one [prompt | response] pass
    logp, _ = sequence_logprobs(policy, batch, "conditional", 0)
    assert torch.equal(prepared.old_logprobs * batch.response_mask, logp.detach() * batch.response_mask)


def test_the_second_update_sees_a_clipped_ratio_by_hand(policy, tokenizer):
    """After a large step, the PPO loss of the next update is -sum(A * clip(ratio)) / tokens with
    ratio = exp(logp - old) against the old log-probs fixed before the first update."""
    obj = PG(eps_low=0.2, eps_high=0.2, clip_c=None)
    batch, _ = prepare(obj, policy, make_batch(tokenizer), 0, updates=2)
    backward_objective(obj, policy, batch, 0)
    with torch.no_grad():
        for p in policy.parameters():
            p -= 0.05 * p.grad.sign()  # a big step: many ratios leave [0.8, 1.2]
            p.grad = None
    result = backward_objective(obj, policy, batch, 0)
    logp, _ = sequence_logprobs(policy, batch, "conditional", 0)
    ratio = torch.exp(logp.detach() - batch.old_logprobs)  # (N, T)
    a = batch.advantages[:, None]
    per_token = torch.maximum(-a * ratio, -a * ratio.clamp(0.8, 1.2))
    mask = batch.loss_mask
    assert float(result.loss) == pytest.approx(float((per_token * mask).sum() / mask.sum()), rel=1e-5)
    binds = torch.where(a > 0, ratio > 1.2, ratio < 0.8) & (a != 0)
    assert float(result.clipped_sum) == float((binds.float() * mask).sum()) > 0
    assert float(result.ppo_kl_sum) > 0


def test_tis_weights_scale_the_policy_gradient_term_only(policy, tokenizer):
    """With engine log-probs ln 2 below the trainer's on every token, token TIS (cap 3) doubles the
    PPO term; masking [0.5, 1.5] drops every token."""
    batch = make_batch(tokenizer)
    logp, _ = sequence_logprobs(policy, batch, "conditional", 0)
    engine = (logp.detach() - math.log(2.0)) * batch.response_mask
    batch = replace(batch, rollout_logprobs=engine)
    plain, _ = prepare(PG(), policy, batch, 0)
    base = backward_objective(PG(), policy, plain, 0).loss
    fixed, stats = prepare(PG(), policy, batch, 0, correction=RolloutCorrection(tis="token", tis_cap=3.0))
    assert torch.allclose(fixed.is_weights * batch.response_mask, 2.0 * batch.response_mask.float())
    assert float(backward_objective(PG(), policy, fixed, 0).loss) == pytest.approx(2 * float(base), rel=1e-5)
    assert float(stats.result(lambda x: x, lambda x: x)["rollout_corr/ratio_max"]) == pytest.approx(2.0, rel=1e-4)
    masked, _ = prepare(PG(), policy, batch, 0, correction=RolloutCorrection(mask="token", mask_high=1.5))
    assert masked.loss_mask.sum() == 0


def test_prerl_correction_is_off_unless_asked_and_then_uses_conditional_ratios(policy, tokenizer):
    batch = make_batch(tokenizer)
    cond, _ = sequence_logprobs(policy, batch, "conditional", 0)
    batch = replace(batch, rollout_logprobs=(cond.detach() - math.log(2.0)) * batch.response_mask)
    nsr = PG(space="marginal", advantage="group_mean", samples="negative", coef=0.01)
    off, stats = prepare(nsr, policy, batch, 0, correction=RolloutCorrection(tis="token", tis_cap=3.0))
    assert off.is_weights is None and not stats.sums
    on, _ = prepare(nsr, policy, batch, 0, correction=RolloutCorrection(tis="token", tis_cap=3.0, prerl=True))
    assert torch.allclose(on.is_weights * batch.response_mask, 2.0 * batch.response_mask.float())


def test_sample_mask_removes_samples_from_the_loss_not_from_the_advantage(policy, tokenizer):
    batch = replace(make_batch(tokenizer), sample_mask=torch.tensor([True, False, True, True]))
    prepared, _ = prepare(PG(advantage="group_mean"), policy, batch, 0)
    assert prepared.advantages.tolist() == [0.5, -0.5, -0.5, 0.5]  # sample 2 still sets its group's mean
    assert prepared.loss_mask[1].sum() == 0 and prepared.loss_mask[0].sum() == batch.response_mask[0].sum()


def test_entropy_is_measured_on_every_step_without_an_entropy_bonus(policy, tokenizer):
    batch = make_batch(tokenizer)
    result = backward_objective(PG(entropy_coef=0.0), policy, batch, 0)
    logits = policy(
        input_ids=torch.cat([batch.prompt_ids, batch.response_ids], 1),
        attention_mask=torch.cat([batch.prompt_mask, batch.response_mask], 1),
        position_ids=(torch.cat([batch.prompt_mask, batch.response_mask], 1).cumsum(1) - 1).clamp(min=0),
    ).logits[:, batch.prompt_ids.shape[1] - 1 : -1]  # (N, T, V): position j predicts response token j
    logprobs = logits.float().log_softmax(-1)
    entropy = -(logprobs.exp() * logprobs).sum(-1)  # (N, T)
    mask = batch.response_mask.float()
    assert float(result.entropy_sum) == pytest.approx(float((entropy.detach() * mask).sum()), rel=1e-4)
    assert float(result.kept_tokens) == float(mask.sum())


def test_mini_batches_split_whole_groups_and_refuse_uneven_splits(tokenizer):
    batch = make_batch(tokenizer)
    halves = batch.split(2)
    assert [len(h) for h in halves] == [2, 2] and all(h.group_size == 2 for h in halves)
    with pytest.raises(ValueError, match="module.mini_batches=4: this rank's 2 prompts do not split evenly"):
        batch.split(4)  # the count of whole groups, an int (found by `make mutation`: `/` printed 2.0)


def test_collectives_default_to_one_process():
    comm = Collectives()
    assert comm.world_size == 1 and comm.max(3) == 3 and torch.equal(comm.sum(torch.ones(2)), torch.ones(2))


def test_one_update_per_batch_is_plain_policy_gradient_bit_for_bit(policy, tokenizer):
    """ppo_epochs = mini_batches = 1 (and the entropy now measured on every step) leave the gradient
    exactly that of -sum(A * exp(logp - sg(logp))) / tokens on the library log-probs."""
    batch = make_batch(tokenizer)
    backward_objective(PG(), policy, batch, 0)
    grads = [p.grad.clone() for p in policy.parameters()]
    policy.zero_grad(set_to_none=True)
    adv, _ = PG().advantages(batch.rewards, batch.group_size)
    logp, _ = sequence_logprobs(policy, batch, "conditional", 0, share_prompts=True)  # as the update's forward
    mask = batch.response_mask.float()
    loss = (-adv[:, None] * torch.exp(logp - logp.detach()) * mask).sum() / mask.sum()
    loss.backward()
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, policy.parameters(), strict=True))


def test_each_rank_holds_its_share_of_every_global_mini_batch(tokenizer):
    from lightning_prerl.data.rewards import BoxedExactMatch
    from lightning_prerl.training.datamodule import RolloutDataModule

    def positions(mini_batches, world):
        dm = RolloutDataModule(tokenizer, lambda **_: None, BoxedExactMatch(), [], prompts_per_step=8)
        dm.mini_batches = mini_batches
        return [dm.train_positions(epoch=1, rank=r, world=world) for r in range(world)]

    assert positions(1, 2) == [[8, 9, 10, 11], [12, 13, 14, 15]]  # M = 1: as before, the r-th half
    assert positions(2, 2) == [[8, 9, 12, 13], [10, 11, 14, 15]]  # global mini-batch 0 = 8..11, 1 = 12..15
    assert positions(2, 1) == [list(range(8, 16))]


@pytest.mark.slow
@pytest.mark.vllm
def test_two_epochs_of_two_mini_batches_with_vllm_and_tis_end_to_end(vllm, tmp_path):
    """The real script: 2 rollout batches x (2 passes x 2 mini-batches) = 8 optimizer steps, vLLM
    rollouts with token TIS; mismatch, clipping and entropy logged on every rollout batch. Catches an
    engine not synced after the first step (abs_diff 4.5e-4 against a 1e-5 bound)."""
    from test_run import read_rows, run_experiment, steps_with

    run_dir = tmp_path / "run"
    run_experiment(
        run_dir,
        "objective=dsrl",
        "objective.switch_step=4",
        "rollout=vllm",
        "module.ppo_epochs=2",
        "module.mini_batches=2",
        "module.rollout_correction.tis=token",
        "trainer.max_steps=8",
        "callbacks.checkpoint.every_n_train_steps=4",
        "eval_before_training=false",
        "trainer.check_val_every_n_epoch=100",
        "data.prompts_per_step=8",
        "data.sampling.max_new_tokens=64",
        timeout=400,
    )
    rows = read_rows(run_dir)
    assert steps_with(rows, "train/loss") == [0, 4]  # a row per rollout batch, at its first update
    assert steps_with(rows, "objective/phase") == [0, 4]
    assert [float(r["objective/phase"]) for r in rows if r.get("objective/phase")] == [0.0, 1.0]
    train = [r for r in rows if r.get("train/loss")]
    for row in train:
        assert float(row["train/ppo_kl"]) > 0  # later updates see a ratio != 1
        assert float(row["train/entropy"]) > 0
    assert not train[0].get("rollout_corr/abs_diff")  # NSR-PreRL: no correction (rollout_correction.prerl=false)
    # GRPO: corrected. float32 vLLM synced with the same weights differs from the trainer by float32
    # noise (1.4e-7 measured); an engine left on older weights by 4e-3 to 1.2e-2: the bounds tell them apart
    assert float(train[1]["rollout_corr/abs_diff"]) < 1e-5, train[1]["rollout_corr/abs_diff"]
    assert float(train[1]["rollout_corr/is_weight_mean"]) == pytest.approx(1.0, abs=1e-5)
    assert (run_dir / "checkpoints" / "step000008.ckpt").exists()


def test_step_intervals_must_be_multiples_of_the_updates_per_batch():
    from lightning_prerl.config.checks import validate_config
    from lightning_prerl.config.schema import ConfigError

    with initialize_config_dir(config_dir=CONF, version_base=None):
        cfg = compose("config", overrides=["module.ppo_epochs=2", "module.mini_batches=2", "run_dir=/tmp/x"])
        with pytest.raises(ConfigError, match=r"callbacks.checkpoint.every_n_train_steps=10 is not a multiple .* = 4"):
            validate_config(cfg)
        cfg = compose("config", overrides=["module.mini_batches=3", "objective.switch_step=21", "run_dir=/tmp/x"])
        with pytest.raises(ConfigError, match=r"prompts_per_step=16 does not divide by world size 1 x module.mini"):
            validate_config(cfg)
        cfg = compose("config", overrides=["data.sampling.top_p=0.9", "run_dir=/tmp/x"])
        with pytest.raises(ConfigError, match=r"data.sampling.top_p=0.9, top_k=None: rollouts would come"):
            validate_config(cfg)
        cfg = compose("config", overrides=["module.rollout_correction.tis=token", "run_dir=/tmp/x"])
        with pytest.raises(ConfigError, match=r"needs the engine's log-probs: rollout.return_logprobs=false"):
            validate_config(cfg)


# -- what `make mutation` found untested in backward_objective ------------------------------------------
def _grads(policy) -> list[torch.Tensor]:
    return [p.grad.clone() for p in policy.parameters() if p.grad is not None]


def test_backward_is_the_same_update_per_micro_batch_and_per_world_size(policy, tokenizer):
    """One batch, three ways: one pass; one-row micro-batches (`backward` told which pass is the step's
    last, DeepSpeed's accumulation boundary; the loss and the logged sums add up over passes); and one of
    two ranks that hold the same batch (`comm.sum` doubles the token count, `* world_size` and DDP's
    averaging cancel it). Same gradient each time. Catches `/ world_size` for `* world_size`, a wrong
    boundary flag, and sums overwritten instead of added (found by `make mutation`)."""
    objective = PG(kl_coef=0.0)
    batch, _ = prepare(objective, policy, make_batch(tokenizer), 0, updates=2)  # old log-probs kept
    torch.manual_seed(0)
    batch = replace(batch, old_logprobs=batch.old_logprobs + 0.5 * torch.randn_like(batch.old_logprobs))
    one = backward_objective(objective, policy, batch, 0)
    assert one.clipped_sum > 0  # a later update: ratios away from 1, some clipped
    logp, _ = sequence_logprobs(policy, batch, "conditional", 0)  # (N, T)
    log_ratio = logp.detach() - batch.old_logprobs  # (N, T) log new/old
    k3 = ((torch.exp(log_ratio) - 1 - log_ratio) * batch.loss_mask).sum()  # KL(old || new), by hand
    assert torch.allclose(one.ppo_kl_sum, k3, rtol=1e-4)
    ref = _grads(policy)
    policy.zero_grad(set_to_none=True)
    flags = []
    micro = MicroBatching(size=1, skip_zero_advantage=False)
    backward = lambda loss, last: (flags.append(last), loss.backward())  # noqa: E731
    many = backward_objective(objective, policy, batch, 0, micro=micro, backward=backward)
    assert flags == [False, False, False, True]
    for g, r in zip(_grads(policy), ref, strict=True):
        assert torch.allclose(g, r, atol=1e-6)
    for field in ("loss", "entropy_sum", "clipped_sum", "ppo_kl_sum"):
        assert torch.allclose(getattr(many, field), getattr(one, field), atol=1e-5), field
    policy.zero_grad(set_to_none=True)
    two = Collectives(world_size=2, sum=lambda x: 2 * x, max=lambda x: x)  # the other rank: the same batch
    backward_objective(objective, policy, batch, 0, comm=two)
    for g, r in zip(_grads(policy), ref, strict=True):
        assert torch.allclose(g, r, atol=1e-6)  # this rank's gradient = the global one before DDP's mean


def test_the_entropy_bonus_reaches_the_gradient_and_an_empty_batch_runs_no_pass(policy, tokenizer):
    """`entropy_coef > 0` with every advantage 0 (all rewards equal): the only gradient is the entropy's,
    so it must not be zero; and a batch with no loss token (NSR with no wrong sample) calls no backward.
    Catches the entropy computed without its gradient or dropped from the loss, and `kept_tokens <= 0`
    loosened (found by `make mutation`)."""
    flat = make_batch(tokenizer, rewards=(1.0, 1.0, 1.0, 1.0))
    backward_objective(PG(entropy_coef=0.01), policy, flat, 0)
    assert sum(float(g.abs().sum()) for g in _grads(policy)) > 0
    policy.zero_grad(set_to_none=True)
    calls = []
    nsr = PG(space="marginal", advantage="group_mean", samples="negative")
    result = backward_objective(nsr, policy, flat, 0, backward=lambda loss, last: calls.append(last))
    assert calls == [] and float(result.kept_tokens) == 0.0 and float(result.loss) == 0.0


# -- what `make mutation` found untested in prepare, the passes and the logged statistics ---------------
def _forward_calls(model) -> tuple[list[int], Callable[[], None]]:
    calls: list[int] = []
    handle = model.register_forward_pre_hook(lambda m, a, kw: calls.append(kw["input_ids"].shape[0]), with_kwargs=True)
    return calls, handle.remove


def test_the_no_grad_passes_use_the_space_start_token_temperature_and_micro_batching(policy, tokenizer):
    """The old log-probs (several updates per batch) are the objective's own log-probs: prompt-free
    ones start from the start token, at the sampling temperature; the pass runs micro-batch by micro-
    batch (`size`, `max_tokens`, the count all ranks agree on through `comm.max`), prompts shared. The
    same for the backward passes. Catches an argument of either pass dropped or shifted (found by
    `make mutation`)."""
    batch, start = make_batch(tokenizer), tokenizer.convert_tokens_to_ids("<|im_start|>")
    mask = batch.response_mask.float()
    marginal = PG(space="marginal")
    calls, done = _forward_calls(policy)
    prepared, _ = prepare(marginal, policy, batch, start, 0.7, MicroBatching(size=1), updates=2)
    done()
    assert calls == [1, 1, 1, 1]  # four one-row passes
    logp, _ = sequence_logprobs(policy, batch, "marginal", start, 0.7)
    assert torch.allclose(prepared.old_logprobs * mask, logp * mask, atol=1e-5)
    budget = 2 * (batch.prompt_mask.sum(1) + batch.response_mask.sum(1)).max().item()  # two rows a pass
    cut = len(batch.micro_batches(None, budget))
    assert cut > 1
    for micro, comm, passes in (
        (MicroBatching(max_tokens=budget), Collectives(), cut),
        (MicroBatching(), Collectives(max=lambda count: 5), 5),  # another rank needs five passes
    ):
        calls, done = _forward_calls(policy)
        prepared, _ = prepare(PG(), policy, batch, 0, micro=micro, updates=2, comm=comm)
        done()
        assert len(calls) == 2 * passes  # prompts shared: two forward calls a pass
        flags: list[bool] = []
        count = lambda loss, last, flags=flags: flags.append(last)  # noqa: E731  no gradient kept
        backward_objective(PG(), policy, prepared, 0, micro=micro, comm=comm, backward=count)
        assert len(flags) == passes


def test_the_reference_pass_scores_the_same_space_start_token_and_temperature(policy, tokenizer):
    """A reference equal to the policy gives KL = 0 (k3 and its gradient vanish at ratio 1): the loss is
    the one without the KL term, also prompt-free from the start token at temperature 0.7, and the
    reference shares prompts like the policy. Catches the reference pass scoring another start token or
    temperature (found by `make mutation`)."""
    import copy

    batch, start = make_batch(tokenizer), tokenizer.convert_tokens_to_ids("<|im_start|>")
    reference = copy.deepcopy(policy)
    for space in ("marginal", "conditional"):
        plain = backward_objective(PG(space=space), policy, batch, start, 0.7).loss
        calls, done = _forward_calls(reference)
        with_kl = backward_objective(PG(space=space, kl_coef=0.5), policy, batch, start, 0.7, reference=reference)
        done()
        assert float(with_kl.loss) == pytest.approx(float(plain), rel=1e-5, abs=1e-7), space
        assert len(calls) == (1 if space == "marginal" else 2), space  # one micro-batch; prompts shared


def test_the_correction_reads_conditional_log_probs_once_and_logs_its_masks_and_weights(policy, tokenizer):
    """With several updates a conditional objective's old-log-prob pass doubles as the correction's
    (one pass); a prompt-free one must not reuse its marginal log-probs for the correction (a second,
    conditional pass). Masked share and mean weight are logged by hand; without a correction the
    mismatch is still logged from the old pass, in the conditional space only. Catches the reuse test
    inverted or dropped and the statistics fed the wrong tensors (found by `make mutation`)."""
    batch = make_batch(tokenizer)
    cond, _ = sequence_logprobs(policy, batch, "conditional", 0)
    mask = batch.response_mask.float()
    engine = cond.detach() * mask
    engine[0] -= math.log(2.0) * mask[0]  # row 0: trainer / engine = 2; the others 1
    batch = replace(batch, rollout_logprobs=engine)
    correction = RolloutCorrection(tis="token", tis_cap=3.0, mask="token", mask_high=1.5)
    unshared = MicroBatching(share_prompts=False)  # one forward call a pass
    calls, done = _forward_calls(policy)
    prepared, stats = prepare(PG(), policy, batch, 0, micro=unshared, updates=2, correction=correction)
    done()
    assert len(calls) == 1  # the old-log-prob pass serves the correction
    out = {k: float(v) for k, v in stats.result(lambda x: x, lambda x: x).items()}
    n0, total = float(mask[0].sum()), float(mask.sum())
    assert out["rollout_corr/masked_tokens"] == pytest.approx(n0 / total, rel=1e-4)  # ratio 2 > 1.5
    assert out["rollout_corr/is_weight_mean"] == pytest.approx((2 * n0 + total - n0) / total, rel=1e-4)
    assert out["rollout_corr/abs_diff"] == pytest.approx(math.log(2.0) * n0 / total, rel=1e-4)
    assert prepared.loss_mask[0].sum() == 0 and torch.equal(prepared.loss_mask[1:], mask[1:])
    nsr = PG(space="marginal", advantage="group_mean", samples="negative")
    calls, done = _forward_calls(policy)
    prepared, _ = prepare(nsr, policy, batch, 0, micro=unshared, updates=2, correction=replace(correction, prerl=True))
    done()
    assert len(calls) == 2  # marginal old log-probs, then conditional ones for the correction
    assert torch.allclose(prepared.is_weights[0] * mask[0], 2.0 * mask[0], rtol=1e-4)
    assert torch.allclose(prepared.is_weights[1:] * mask[1:], mask[1:], rtol=1e-4)
    _, stats = prepare(PG(), policy, batch, 0, updates=2)  # no correction: mismatch from the old pass
    out = {k: float(v) for k, v in stats.result(lambda x: x, lambda x: x).items()}
    assert out["rollout_corr/abs_diff"] == pytest.approx(math.log(2.0) * n0 / total, rel=1e-4)
    assert not prepare(nsr, policy, batch, 0, updates=2)[1].sums  # marginal old log-probs: no mismatch


def test_backward_logs_mismatch_on_every_sample_and_forwards_only_samples_with_loss(policy, tokenizer):
    """With no old-log-prob pass the update's forward yields the mismatch: then every sample is forwarded
    (A = 0 ones too) and measured; without `mismatch` the flat group's samples are skipped (forwarded
    tokens < kept). Prompt-free updates log no mismatch. Catches the filter condition or the space test
    inverted (found by `make mutation`)."""
    from lightning_prerl.objectives.correction import MismatchStats

    batch = make_batch(tokenizer, rewards=(1.0, 1.0, 0.0, 1.0))  # group 1 flat: A = 0
    cond, _ = sequence_logprobs(policy, batch, "conditional", 0)
    mask = batch.response_mask.float()
    batch = replace(batch, rollout_logprobs=(cond.detach() - math.log(2.0)) * mask)
    prepared, _ = prepare(PG(), policy, batch, 0)
    mismatch = MismatchStats()
    backward_objective(PG(), policy, prepared, 0, mismatch=mismatch)
    assert float(mismatch.sums["tokens"]) == float(mask.sum())
    assert float(mismatch.sums["abs_diff"]) == pytest.approx(math.log(2.0) * float(mask.sum()), rel=1e-4)
    result = backward_objective(PG(), policy, prepared, 0)
    assert float(result.forwarded_tokens) == float(mask[2:].sum()) < float(result.kept_tokens)
    mismatch = MismatchStats()
    marginal, _ = prepare(PG(space="marginal"), policy, batch, 5)
    backward_objective(PG(space="marginal"), policy, marginal, 5, mismatch=mismatch)
    assert not mismatch.sums


def test_a_single_kept_token_is_trained_on_and_a_rank_with_none_forwards_no_token(policy, tokenizer):
    """One loss token in the whole batch is still a loss: -A * ratio / 1 = 1 for A = -1, with a gradient.
    With every A = 0 the filler row forwards no token (logged forwarded tokens and entropy 0). Catches
    `kept_tokens <= 0` and `loss_mask.sum(1) > 0` loosened by one, and the filler keeping its mask
    (found by `make mutation`)."""
    batch, _ = prepare(PG(advantage="signed"), policy, make_batch(tokenizer), 0)  # A = +1, -1, -1, +1
    one = torch.zeros_like(batch.loss_mask)
    one[1, 2] = 1.0
    result = backward_objective(PG(advantage="signed"), policy, replace(batch, loss_mask=one), 0)
    assert float(result.loss) == pytest.approx(1.0) and float(result.kept_tokens) == 1.0
    assert sum(float(p.grad.abs().sum()) for p in policy.parameters() if p.grad is not None) > 0
    flat = make_batch(tokenizer, rewards=(1.0, 1.0, 1.0, 1.0))
    result = backward_objective(PG(), policy, flat, 0)
    assert float(result.forwarded_tokens) == 0.0 and float(result.entropy_sum) == 0.0
    assert float(result.kept_tokens) == float(flat.response_mask.sum())


def test_clip_fraction_ppo_kl_and_the_logged_loss_by_hand(policy, tokenizer):
    """Signed advantages (A = +-1) with log-ratios +0.5 (A > 0: clipped above), -0.5 (A < 0: clipped
    below) and +25 on one A < 0 token (not clipped, its k3 KL uses exp of the ratio clamped at 20); and
    on two ranks holding the same batch the logged loss is this rank's half. Catches `a != 0` changed,
    the KL clamp moved or dropped, and `* world_size` in the logged loss (found by `make mutation`)."""
    obj = PG(advantage="signed")
    batch, _ = prepare(obj, policy, make_batch(tokenizer), 0, updates=2)
    mask = batch.loss_mask
    shift = torch.zeros_like(mask)
    shift[0], shift[1], shift[2, 0] = 0.5, -0.5, 25.0
    batch = replace(batch, old_logprobs=batch.old_logprobs - shift * mask)  # log new/old = shift
    result = backward_objective(obj, policy, batch, 0)
    assert float(result.clipped_sum) == float(mask[0].sum() + mask[1].sum())
    k3 = lambda x, clamped: math.exp(clamped) - 1 - x  # noqa: E731
    expected = (k3(0.5, 0.5) * mask[0].sum() + k3(-0.5, -0.5) * mask[1].sum() + k3(25.0, 20.0)).item()
    assert float(result.ppo_kl_sum) == pytest.approx(expected, rel=1e-4)
    policy.zero_grad(set_to_none=True)
    two = Collectives(world_size=2, sum=lambda x: 2 * x, max=lambda x: x)
    assert float(backward_objective(obj, policy, batch, 0, comm=two).loss) == pytest.approx(float(result.loss) / 2)


def test_step_stats_row_by_hand():
    """The logged `train/...` row of three updates on two ranks: loss and grad norm averaged over the
    updates (the loss a rank's share x W), token counts per update, entropy over the first pass only,
    clip fraction and PPO KL over every forwarded token; sample share and |A| from the batch; a one-token
    batch divides by its one token. Catches every sum overwritten or subtracted, a `* W` / `/ updates`
    swapped, a guard moved and a key misspelled (found by `make mutation`)."""
    from lightning_prerl.training.update import BackwardResult, StepStats

    def result(loss, kept, forwarded, entropy, clipped, kl):
        return BackwardResult(*(torch.tensor(float(x)) for x in (loss, kept, forwarded, entropy, clipped, kl)))

    stats = StepStats(updates=3, world_size=2)
    stats.add(result(0.3, 6, 4, 2.0, 1.0, 0.5), torch.tensor(3.0), first_pass=True)
    stats.add(result(0.6, 6, 2, 1.0, 0.5, 0.25), torch.tensor(6.0), first_pass=True)
    stats.add(result(0.9, 6, 3, 7.0, 1.5, 1.0), torch.tensor(9.0), first_pass=False)
    loss_mask = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    batch = replace(make_batch_like(loss_mask), advantages=torch.tensor([0.5, -1.0, 2.0, 0.0]), loss_mask=loss_mask)
    row = {k: float(v) for k, v in stats.row(batch).items()}
    assert row == pytest.approx(
        {
            "train/loss": (0.3 + 0.6 + 0.9) * 2 / 3,
            "train/grad_norm": (3 + 6 + 9) / 3,
            "train/kept_tokens": 6.0,
            "train/kept_samples": 0.75,  # rows with >= 1 loss token; one has exactly one
            "train/forwarded_tokens": (4 + 2 + 3) / 3,
            "train/adv_abs_mean": 3.5 / 4,
            "train/entropy": (2.0 + 1.0) * 2 / (4 + 2),
            "train/clip_fraction": (1.0 + 0.5 + 1.5) * 2 / 9,
            "train/ppo_kl": (0.5 + 0.25 + 1.0) * 2 / 9,
        }
    )
    single = StepStats(updates=1, world_size=1)
    single.add(result(0.1, 1, 1, 0.5, 1.0, 0.2), torch.tensor(1.0), first_pass=True)
    row = single.row(batch)
    logged = (float(row["train/entropy"]), float(row["train/clip_fraction"]), float(row["train/ppo_kl"]))
    assert logged == pytest.approx((0.5, 1.0, 0.2))


def make_batch_like(loss_mask: torch.Tensor):
    """A RolloutBatch of len(loss_mask) one-token prompts and zero responses (StepStats reads only the
    loss mask and the advantages)."""
    from lightning_prerl.data.batch import RolloutBatch

    n, t = loss_mask.shape
    ones, zeros = torch.ones((n, 1), dtype=torch.long), torch.zeros((n, t), dtype=torch.long)
    return RolloutBatch(ones, ones, zeros, zeros, torch.zeros(n), n, texts=[""] * n, has_answer=[True] * n)


def test_rollout_correction_bounds_and_the_sequence_mask_by_hand():
    """The correction's own arithmetic, by hand (found untested by `make mutation` once correction.py
    moved into objectives/): tis_cap 1 is the least cap allowed, mask_low 0 allowed, mask_low 1 and
    mask_high 1 refused; the sequence mask keeps a geometric-mean ratio exactly at either bound and
    divides the summed log-ratio by the response length (a 1-token response of ratio 3 leaves, two
    tokens of ratio 1.5 stay); MismatchStats accumulates over micro-batches, keeps a ratio_max below 1,
    divides by the token count (1 token: not 2), and logs exactly its five keys."""
    from lightning_prerl.objectives.correction import MismatchStats, RolloutCorrection

    RolloutCorrection(tis_cap=1.0), RolloutCorrection(tis_cap=1.5), RolloutCorrection(mask_low=0.0)
    for bad, key in ((dict(tis_cap=0.99), "tis_cap=0.99"), (dict(mask_low=1.0), "mask_low=1.0"),
                     (dict(mask_high=1.0), "mask_high=1.0")):  # fmt: skip
        with pytest.raises(ValueError, match=key):
            RolloutCorrection(**bad)

    ln = torch.log
    rows = [  # (N, T=2) trainer log-probs with the engine's at 0: log ratio = trainer log-prob
        [ln(torch.tensor(2.0)), 0.0],  # one token at exactly hi = ln 2: kept
        [ln(torch.tensor(0.5)), 0.0],  # one token at exactly lo = ln 0.5: kept
        [ln(torch.tensor(3.0)), 0.0],  # one token of ratio 3: out (half of it, ln 1.73, would be in)
        [ln(torch.tensor(1.5)), ln(torch.tensor(1.5))],  # two tokens of 1.5: geometric mean 1.5, in
    ]
    train = torch.tensor([[float(a), float(b)] for a, b in rows])  # (4, 2)
    mask = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [1.0, 1.0]])
    weights, keep = RolloutCorrection(mask="sequence").weights(train, torch.zeros(4, 2), mask)
    assert weights is None and keep[:, 0].tolist() == [1.0, 1.0, 0.0, 1.0]

    stats = MismatchStats()
    below = torch.log(torch.tensor([[0.5, 0.25]]))  # every ratio < 1: ratio_max 0.5, not a starting 1
    stats.add(below[:, :1], torch.zeros(1, 1), torch.ones(1, 1), keep=torch.ones(1, 1), weights=torch.ones(1, 1))
    got = stats.result(lambda t: t, lambda t: t)
    assert sorted(got) == ["rollout_corr/abs_diff", "rollout_corr/is_weight_mean", "rollout_corr/kl",
                           "rollout_corr/masked_tokens", "rollout_corr/ratio_max"]  # fmt: skip
    assert got["rollout_corr/abs_diff"].item() == pytest.approx(math.log(2))  # one token: divided by 1
    assert got["rollout_corr/ratio_max"].item() == pytest.approx(0.5)
    stats.add(below[:, 1:], torch.zeros(1, 1), torch.ones(1, 1), keep=torch.zeros(1, 1), weights=torch.ones(1, 1))
    got = stats.result(lambda t: t, lambda t: t)  # two micro-batches: sums over both
    assert got["rollout_corr/abs_diff"].item() == pytest.approx((math.log(2) + math.log(4)) / 2)
    assert got["rollout_corr/masked_tokens"].item() == pytest.approx(0.5)
    assert got["rollout_corr/kl"].item() == pytest.approx((0.5 - 1 + math.log(2) + 0.25 - 1 + math.log(4)) / 2)
