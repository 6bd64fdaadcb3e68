"""The objective's registered parts (issue 25): names and parameters checked before compute, the four
aggregations by hand, and every aggregation's global normaliser independent of micro-batching and
world size on the tiny real model."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from lightning_prerl.config.checks import ConfigError, validate_config
from lightning_prerl.objectives import PolicyGradientObjective as PG
from lightning_prerl.objectives import registry
from lightning_prerl.training.update import Collectives, MicroBatching, backward_objective, prepare
from tests.test_config import compose_cfg
from tests.test_policy import make_batch
from tests.test_updates import _grads


def test_unknown_names_and_parameters_fail_in_one_line_naming_the_key_the_value_and_the_choices():
    with pytest.raises(ValueError, match=r"^objective.policy_loss='nope': expected one of \[.*'ppo_clip'"):
        PG(policy_loss="nope")
    with pytest.raises(ValueError, match=r"^objective.aggregation='mean': expected one of \['constant', "):
        PG(aggregation="mean")
    with pytest.raises(ValueError, match=r"^objective.loss_args.beta=2: policy_loss 'ppo_clip' takes none$"):
        PG(loss_args={"beta": 2})
    with pytest.raises(ValueError, match=r"^objective.loss_args.eps_high=0.3: set objective.eps_high instead$"):
        PG(loss_args={"eps_high": 0.3})
    with pytest.raises(ValueError, match=r"^objective.aggregation_args.length=0: must be >= 1$"):
        PG(aggregation="constant", aggregation_args={"length": 0})
    cases = {
        "+objective.policy_loss=nope": "objective.policy_loss='nope': expected one of 'ppo_clip'",
        "objective.advantage=rloo": "objective.advantage='rloo': expected one of 'group_mean', 'grpo', 'signed'",
        "+objective.loss_args={beta: 1}": "objective.loss_args={'beta': 1}: beta=1: policy_loss 'ppo_clip' takes none",
        "+objective.aggregation=sum": "objective.aggregation='sum': expected one of 'constant', 'seq-mean-token-mean'",
    }
    for override, message in cases.items():
        with pytest.raises(ConfigError) as err:
            validate_config(compose_cfg("objective=grpo", override))
        assert str(err.value).startswith(message.split(" 'ppo_clip'")[0]), (override, str(err.value))
        assert "\n" not in str(err.value)


def test_a_registered_part_is_found_by_name_with_its_parameters_filled_by_name():
    assert {"ppo_clip"} <= set(registry.names("policy_loss"))
    assert registry.names("aggregation") == ["constant", "seq-mean-token-mean", "seq-mean-token-sum", "token-mean"]
    assert registry.lookup("advantage", "grpo").group_relative
    assert not registry.lookup("advantage", "signed").group_relative
    loss = registry.bind("policy_loss", "ppo_clip", {"eps_low": 0.2, "eps_high": 0.28, "clip_c": None}, {})
    assert loss.keywords == {"eps_low": 0.2, "eps_high": 0.28, "clip_c": None}  # shared fields it names
    adv = registry.bind("advantage", "group_mean", {"adv_eps": 1e-6, "positive_weight": 1.0}, {})
    assert adv.keywords == {}  # group_mean names neither


def test_the_four_aggregations_by_hand():
    """Two samples: row 0 keeps 3 tokens with losses 1, 2, 3; row 1 keeps 1 token with loss 4; a third,
    real but dropped sample (NSR drops positives) keeps none.
    token-mean:          (1 + 2 + 3 + 4) / 4 tokens                     = 2.5
    seq-mean-token-sum:  ((1 + 2 + 3) + 4) / 2 kept sequences            = 5
    seq-mean-token-mean: ((1 + 2 + 3) / 3 + 4 / 1) / 2 kept sequences    = 3
    constant (L = 8):    (1 + 2 + 3 + 4) / (3 real samples x 8)          = 10 / 24"""
    loss = torch.tensor([[1.0, 2.0, 3.0, 9.0], [4.0, 9.0, 9.0, 9.0], [9.0, 9.0, 9.0, 9.0]])  # (3, 4)
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])  # (3, 4)
    rows = torch.ones(3, dtype=torch.bool)
    expected = {"token-mean": 2.5, "seq-mean-token-sum": 5.0, "seq-mean-token-mean": 3.0, "constant": 10 / 24}
    for mode, value in expected.items():
        obj = PG(aggregation=mode, aggregation_args={"length": 8} if mode == "constant" else {})
        got = (loss * obj.loss_weights(mask)).sum() / obj.loss_count(mask, rows)
        assert got.item() == pytest.approx(value), mode


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "constant"])
def test_every_aggregation_gives_the_same_gradient_per_micro_batch_and_per_world_size(policy, tokenizer, mode):
    """As the token mean's test in test_updates.py: one pass; one-row micro-batches with A = 0 rows
    forwarded; A = 0 rows skipped; one of two ranks that hold the same batch (`comm.sum` doubles the
    count, `* world_size` and DDP's mean cancel it). Same gradient and logged loss each time. The
    rewards make the second group flat (A = 0) so skipping changes the rows, not the count."""
    objective = PG(aggregation=mode, aggregation_args={"length": 16} if mode == "constant" else {})
    batch, _ = prepare(objective, policy, make_batch(tokenizer, rewards=(1.0, 0.0, 1.0, 1.0)), 0, updates=2)
    torch.manual_seed(0)
    batch = replace(batch, old_logprobs=batch.old_logprobs + 0.5 * torch.randn_like(batch.old_logprobs))
    one = backward_objective(objective, policy, batch, 0, micro=MicroBatching(skip_zero_advantage=False))
    ref = _grads(policy)
    assert ref and any(g.abs().sum() > 0 for g in ref)
    runs = {
        "one-row micro-batches": {"micro": MicroBatching(size=1, skip_zero_advantage=False)},
        "A = 0 rows skipped": {"micro": MicroBatching(size=1, skip_zero_advantage=True)},
        "two ranks": {"comm": Collectives(world_size=2, sum=lambda x: 2 * x, max=lambda x: x)},
    }
    for name, kwargs in runs.items():
        policy.zero_grad(set_to_none=True)
        other = backward_objective(objective, policy, batch, 0, **kwargs)
        for g, r in zip(_grads(policy), ref, strict=True):
            assert torch.allclose(g, r, atol=1e-6), name
        factor = 2 if name == "two ranks" else 1  # a rank's share of the global mean
        assert torch.allclose(other.loss * factor, one.loss, atol=1e-6), name


@pytest.mark.parametrize(
    ("loss", "aggregation"),
    [("gspo", "seq-mean-token-mean"), ("ppo_clip", "seq-mean-token-mean"), ("ppo_clip", "constant")],
)
def test_a_sequence_level_loss_sees_each_rows_own_tokens_in_a_padded_pass(policy, tokenizer, loss, aggregation):
    """Responses of different lengths in one padded pass vs one-row micro-batches (each trimmed to its
    own row: no padding), with a sample masked out of the loss: the same gradient only if the loss mask
    reaches the loss (GSPO's geometric mean over each row's own tokens) and the aggregation's count
    skips the masked row. Catches the mask not passed to `loss_terms` or replaced by ones, and the rows
    not passed to `loss_count`, or the sample mask ignored by the constant normaliser's sample count
    (found by `make mutation`)."""
    objective = PG(
        policy_loss=loss, aggregation=aggregation, aggregation_args={"length": 8} if aggregation == "constant" else {}
    )
    raw = make_batch(tokenizer, rewards=(1.0, 0.0, 0.0, 1.0))

    def prepared(sample_mask):
        batch, _ = prepare(objective, policy, replace(raw, sample_mask=sample_mask), 0, updates=2)
        torch.manual_seed(1)
        return replace(batch, old_logprobs=batch.old_logprobs + 0.1 * torch.randn_like(batch.old_logprobs))

    batch = prepared(torch.tensor([True, False, True, True]))
    assert batch.response_mask.sum(1).unique().numel() > 1  # rows of different lengths: padding in one pass
    one = backward_objective(objective, policy, batch, 0, micro=MicroBatching(skip_zero_advantage=False))
    ref = _grads(policy)
    policy.zero_grad(set_to_none=True)
    rows = backward_objective(objective, policy, batch, 0, micro=MicroBatching(size=1, skip_zero_advantage=False))
    for g, r in zip(_grads(policy), ref, strict=True):
        assert torch.allclose(g, r, atol=1e-6)
    assert torch.allclose(rows.loss, one.loss, atol=1e-6)
    policy.zero_grad(set_to_none=True)  # a sample masked out of the loss is a sample that is not there
    absent = replace(batch.select(torch.tensor([0, 2, 3])), sample_mask=None)
    gone = backward_objective(objective, policy, absent, 0, micro=MicroBatching(skip_zero_advantage=False))
    assert torch.allclose(gone.loss, one.loss, atol=1e-6)
    policy.zero_grad(set_to_none=True)  # the masked row counted: another loss
    other = backward_objective(objective, policy, prepared(None), 0, micro=MicroBatching(skip_zero_advantage=False))
    assert not torch.allclose(other.loss, one.loss, atol=1e-6)


def test_the_constant_normaliser_takes_any_budget_from_one_token():
    """Dr.GRPO's `length` is a token budget: 1 is allowed, 0 is refused (found by `make mutation`)."""
    from lightning_prerl.objectives.aggregation import Constant

    assert Constant(length=1).count(torch.ones(2, 3), torch.tensor([True, False])).item() == 1.0
    with pytest.raises(ValueError, match="length"):
        Constant(length=0)


def test_registering_a_part_at_runtime_records_its_function_parameters_and_kind():
    """What a user's own file does on import, here at run time (the package's own parts register when it
    is imported, before any test): each kind under its own name, the keyword parameters after a
    function's input (a class's constructor parameters), `group_relative`, and a second registration
    of a name refused."""
    from lightning_prerl.objectives.registry import Registered

    def my_loss(x, alpha: float, beta: float = 1.0):
        return None

    def my_advantage(rewards, scale: float = 1.0):
        return rewards

    class MyAggregation:
        def __init__(self, length: int):
            self.length = length

    try:
        assert registry.register_loss("test_only")(my_loss) is my_loss
        assert registry.register_advantage("test_only", group_relative=True)(my_advantage) is my_advantage
        assert registry.register_advantage("test_only_plain")(my_advantage) is my_advantage
        assert registry.lookup("advantage", "test_only_plain").group_relative is False  # the default
        assert registry.register_aggregation("test_only")(MyAggregation) is MyAggregation
        assert registry.lookup("policy_loss", "test_only") == Registered(my_loss, ("alpha", "beta"), False)
        assert registry.lookup("advantage", "test_only") == Registered(my_advantage, ("scale",), True)
        assert registry.lookup("aggregation", "test_only") == Registered(MyAggregation, ("length",), False)
        with pytest.raises(ValueError, match="^policy_loss 'test_only' is registered twice$"):
            registry.register_loss("test_only")(my_loss)
        assert registry.args_error("policy_loss", "test_only", {"gamma": 1}) == (
            "gamma=1: policy_loss 'test_only' takes one of ['alpha', 'beta']"
        )
    finally:
        for kind in registry.KINDS:
            registry._REGISTRY[kind].pop("test_only", None)
            registry._REGISTRY[kind].pop("test_only_plain", None)
    assert "test_only" not in registry.names("policy_loss")


def test_token_loss_passes_every_argument_and_a_missing_mask_means_every_token():
    """`token_loss` (the pre-registry entry point) forwards positional arguments (the reference
    log-probs of the KL term), and a loss that reads the mask gets all ones when none is given."""
    torch.manual_seed(0)
    logp, old, ref = torch.randn(3, 4), torch.randn(3, 4), torch.randn(3, 4)
    adv = torch.tensor([1.0, -1.0, 0.5])
    kl = PG(kl_coef=0.5)
    assert torch.equal(kl.token_loss(logp, old, adv, ref), kl.loss_terms(logp, old, adv, ref).loss)
    with pytest.raises(ValueError) as err:  # what dropping them would mean
        kl.token_loss(logp, old, adv)
    assert str(err.value) == "objective.kl_coef > 0 but no reference log-probs were computed"
    gspo = PG(policy_loss="gspo")
    assert torch.equal(gspo.token_loss(logp, old, adv), gspo.token_loss(logp, old, adv, mask=torch.ones(3, 4)))


def test_clip_cov_token_covariance_by_hand():
    """cov_it = (A_i - mean A)(log pi_it - mean log pi), means over the kept tokens only. Kept tokens
    (A, log pi): (1, 0), (1, -1), (-1, -2): mean A = 1/3, mean log pi = -1, so the covariances are 2/3,
    0 and 4/3; padding (log pi 5) never enters a mean. One kept token covariates 0 with itself."""
    from lightning_prerl.objectives.losses.clip_cov import token_covariance
    from lightning_prerl.objectives.registry import LossInputs

    logp = torch.tensor([[0.0, -1.0, 5.0], [-2.0, 5.0, 5.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    cov = token_covariance(LossInputs(logp, logp, torch.tensor([1.0, -1.0]), mask))  # (2, 3)
    assert cov[mask > 0].tolist() == pytest.approx([2 / 3, 0.0, 4 / 3])
    single = torch.tensor([[-1.0, 5.0, 5.0]])
    one = token_covariance(LossInputs(single, single, torch.tensor([2.0]), torch.tensor([[1.0, 0.0, 0.0]])))
    assert one[0, 0].item() == 0.0


def test_a_registered_group_relative_estimator_needs_two_samples_per_prompt():
    """The config check asks the registry, not a list of names: a new group-relative estimator gets
    the same one-line refusal with one sample per prompt as GRPO."""
    registry.register_advantage("test_group", group_relative=True)(lambda rewards: rewards)
    try:
        cfg = compose_cfg("objective=grpo", "data.samples_per_prompt=1", "objective.advantage=test_group")
        with pytest.raises(ConfigError, match="data.samples_per_prompt=1 with objective advantage 'test_group'"):
            validate_config(cfg)
    finally:
        registry._REGISTRY["advantage"].pop("test_group", None)
