"""DAPO's training-batch shaping: overlong penalty / mask, dynamic sampling (group filtering)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from lightning_prerl.data.batch import RolloutBatch, concat_batches, pad_left, pad_right, take_groups
from lightning_prerl.data.prompts import toy_prompts
from lightning_prerl.data.rewards import BoxedExactMatch, Prompt
from lightning_prerl.data.shaping import OverlongShaping, overlong_penalty
from lightning_prerl.rollout.hf import HFEngine
from lightning_prerl.training.datamodule import RolloutDataModule

CONF = Path(__file__).resolve().parents[1] / "conf"


# -- overlong penalty: the pure function ------------------------------------------------------
def test_overlong_penalty_hand_derived():
    # L = 10, C = 4: no penalty up to L - C = 6 tokens, then -(|y| - 6) / 4 per token over, -1 at L
    lengths = torch.tensor([5, 6, 7, 8, 9, 10])
    expected = torch.tensor([0.0, 0.0, -0.25, -0.5, -0.75, -1.0])
    assert torch.allclose(overlong_penalty(lengths, 10, 4), expected)
    # factor 0.5 halves it; a length past L (never generated) stays at -factor
    assert torch.allclose(overlong_penalty(torch.tensor([7, 10, 12]), 10, 4, 0.5), torch.tensor([-0.125, -0.5, -0.5]))
    # C = L: every token counts, 5 of 10 tokens -> -5/10
    assert torch.allclose(overlong_penalty(torch.tensor([0, 5, 10]), 10, 10), torch.tensor([0.0, -0.5, -1.0]))


def _batch(lengths: list[int], rewards: list[float], group_size: int = 2) -> RolloutBatch:
    """Responses of `lengths` tokens (id 7, the stop id 2 last when the length is under 10)."""
    responses = [[7] * (n - 1) + [2] if n < 10 else [7] * n for n in lengths]
    (p_ids, p_mask), (r_ids, r_mask) = pad_left([[5, 6]] * len(lengths), 0), pad_right(responses, 0)
    texts = [str(n) for n in lengths]
    return RolloutBatch(p_ids, p_mask, r_ids, r_mask, torch.tensor(rewards), group_size, texts=texts)


def test_overlong_modes_on_a_batch():
    batch = _batch([5, 7, 8, 10, 10, 3], [1.0, 0.0, 1.0, 1.0, 0.0, 0.0])
    truncated = torch.tensor([False, False, False, True, True, False])  # the two that hit L = 10
    keep = OverlongShaping("keep", 10).apply(batch, truncated)
    assert keep is batch and keep.sample_mask is None
    masked = OverlongShaping("mask", 10).apply(batch, truncated)
    assert masked.sample_mask.tolist() == [True, True, True, False, False, True]
    assert torch.equal(masked.rewards, batch.rewards)  # rewards (and so advantages) unchanged
    stats = OverlongShaping("mask", 10).stats(masked, truncated, world=2)
    assert stats == {"rollout/truncated": pytest.approx(2 / 6), "rollout/overlong_masked": 4.0}  # 2 here, x2 ranks
    shaping = OverlongShaping("penalty", 10, buffer=4)
    penalised = shaping.apply(batch, truncated)
    assert penalised.rewards.tolist() == [1.0, -0.25, 0.5, 0.0, -1.0, 0.0]  # + [0, -.25, -.5, -1, -1, 0]
    assert penalised.sample_mask is None
    stats = shaping.stats(penalised, truncated)
    assert stats["rollout/overlong_penalty"] == pytest.approx(-2.75 / 6)
    assert stats["rollout/verifier_reward_mean"] == pytest.approx(0.5)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"mode": "drop"}, "data.overlong='drop': expected one of ['keep', 'mask', 'penalty']"),
        ({"mode": "penalty"}, "data.overlong_buffer=None: data.overlong=penalty needs 0 < buffer <= "),
        ({"mode": "penalty", "buffer": 11}, "data.overlong_buffer=11: data.overlong=penalty needs 0 < buffer <= "),
        ({"mode": "keep", "factor": -1}, "data.overlong_factor=-1: must be >= 0"),
    ],
)
def test_overlong_bad_values_name_the_key(kwargs, message):
    with pytest.raises(ValueError) as exc:
        OverlongShaping(max_len=10, **kwargs)
    assert message in str(exc.value)


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["data.overlong=cut"], "data.overlong='cut': expected one of 'keep', 'mask', 'penalty'"),
        (["data.overlong=penalty"], "data.overlong_buffer=null with data.overlong=penalty"),
        (["data.overlong=penalty", "data.overlong_buffer=200"], "data.overlong_buffer=200 > data.sampling.max_new"),
        (["data.overlong_buffer=0"], "data.overlong_buffer=0: must be >= 1"),
        (["data.max_extra_rounds=-1"], "data.max_extra_rounds=-1: must be >= 0"),
        (["data.overlong_factor=-0.5"], "data.overlong_factor=-0.5: must be >= 0"),
    ],
)
def test_bad_shaping_config_fails_in_one_line(overrides, message):
    from hydra import compose, initialize_config_dir

    from lightning_prerl.config.checks import ConfigError, validate_config

    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=["run_dir=/tmp/unused", *overrides])
    with pytest.raises(ConfigError) as exc:
        validate_config(cfg)
    assert message in str(exc.value) and "\n" not in str(exc.value)


def test_take_groups_and_concat_keep_groups_contiguous():
    a, b = _batch([5, 7, 8, 10], [1.0, 0.0, 1.0, 1.0]), _batch([3, 3], [0.0, 1.0])
    b = RolloutBatch(b.prompt_ids[:, 1:], b.prompt_mask[:, 1:], b.response_ids, b.response_mask, b.rewards, 2)
    out = concat_batches([take_groups(a, [1]), b], pad=0)
    assert out.rewards.tolist() == [1.0, 1.0, 0.0, 1.0]
    assert out.response_ids.shape == (4, 10) and out.response_mask.sum(1).tolist() == [8, 10, 3, 3]
    assert out.prompt_mask.tolist() == [[1, 1], [1, 1], [0, 1], [0, 1]]  # left-padded to the widest prompt
    assert out.sample_mask is None


# -- the real data module on the toy policy ---------------------------------------------------
class MarkedPrompts:
    """A reward that only the marked prompts' completions can vary on: on a marked prompt it
    alternates 0, 1 over its calls (so with G = 2 each marked group scores [0, 1]), elsewhere 0."""

    def __init__(self, marked: set[str]):
        self.marked, self.calls = marked, 0

    def __call__(self, prompt: Prompt, completion: str) -> float:
        if prompt.question not in self.marked:
            return 0.0
        self.calls += 1
        return float(self.calls % 2 == 0)


def _datamodule(tokenizer, policy, reward=None, world: int = 1, others_short: bool = False, **kwargs):
    dm = RolloutDataModule(
        tokenizer,
        HFEngine,
        reward or BoxedExactMatch(),
        toy_prompts("train", 2000),
        toy_prompts("heldout", 4),
        **{"prompts_per_step": 4 * world, "samples_per_prompt": 2, "sampling": {"max_new_tokens": 12}, **kwargs},
    )
    # with world > 1 the other ranks are simulated by the reduce: it reports "some rank is short"
    strategy = SimpleNamespace(root_device=torch.device("cpu"), reduce=lambda t, reduce_op: torch.tensor(others_short))
    dm.trainer = SimpleNamespace(
        lightning_module=SimpleNamespace(policy=policy),
        strategy=strategy,
        global_rank=0,
        world_size=world,
        global_step=0,
        current_epoch=0,
    )
    dm.setup("fit")
    return dm


@pytest.fixture(scope="module")
def policy(tiny_model_dir):
    from lightning_prerl.scale.models import load_policy

    return load_policy(str(tiny_model_dir))


def test_overlong_modes_in_the_data_module_touch_training_batches_only(tokenizer, policy):
    base = _datamodule(tokenizer, policy)
    kept = base.train_batch(0)
    truncated = [
        int(m.sum()) == 12 and ids[11] != tokenizer.eos_token_id
        for ids, m in zip(kept.response_ids, kept.response_mask, strict=True)
    ]
    assert 0 < sum(truncated) < len(kept)  # the random policy: some stop, some run out of tokens
    assert kept.sample_mask is None and kept.stats["rollout/truncated"] == pytest.approx(sum(truncated) / len(kept))
    masked = _datamodule(tokenizer, policy, overlong="mask").train_batch(0)
    assert masked.texts == kept.texts and torch.equal(masked.rewards, kept.rewards)
    assert masked.sample_mask.tolist() == [not t for t in truncated]
    assert masked.stats["rollout/overlong_masked"] == sum(truncated)
    dm = _datamodule(tokenizer, policy, overlong="penalty", overlong_buffer=4, overlong_factor=2.0)
    penalised = dm.train_batch(0)
    lengths = kept.response_mask.sum(1)  # (N,)
    expected = kept.rewards + (-(lengths - 8) / 4 * 2.0).clamp(-2.0, 0.0)  # 0 up to 8 tokens, -2 at 12
    assert torch.allclose(penalised.rewards, expected) and penalised.rewards.min() == -2.0
    assert torch.equal(dm.eval_batch(0).rewards, base.eval_batch(0).rewards)  # evaluation never shaped


def _marked_setup(tokenizer, policy, informative: dict[tuple[int, int], list[int]], **kwargs):
    """Marks prompt i of round r (0 = the main stream) for each (epoch 0, r): [i, ...] in `informative`."""
    probe = _datamodule(tokenizer, policy)
    rounds = [probe.train_set.take(0, 4)] + [probe.extra_set.take(probe.extra_positions(0, r)[0], 4) for r in (1, 2)]
    questions = [p.question for rnd in rounds for p in rnd]
    assert len(set(questions)) == len(questions)  # the streams draw distinct problems here
    marked = {rounds[r][i].question for (_, r), idx in informative.items() for i in idx}
    dm = _datamodule(tokenizer, policy, MarkedPrompts(marked), dynamic_sampling=True, max_extra_rounds=2, **kwargs)
    return dm, rounds


def test_dynamic_sampling_refills_flat_groups_up_to_the_cap(tokenizer, policy):
    # main round: group 0 informative; extra round 1: groups 1, 2; extra round 2: none -> one fill group
    informative = {(0, 0): [0], (0, 1): [1, 2], (0, 2): []}
    dm, rounds = _marked_setup(tokenizer, policy, informative)
    batch = dm.train_batch(0)
    assert len(batch) == 4 * 2 and batch.group_size == 2
    s = batch.stats
    assert s["rollout/extra_rounds"] == 2 and s["rollout/extra_prompts"] == 8
    assert s["rollout/filtered_groups"] == 3 + 2 + 4 and s["rollout/unfilled_groups"] == 1
    # kept: main 0, extra-1 1 and 2 (in generation order), then the first flat group (main 1) as fill
    want = [rounds[0][0], rounds[1][1], rounds[1][2], rounds[0][1]]
    got = tokenizer.batch_decode(batch.prompt_ids[::2], skip_special_tokens=True)
    assert [w.question in g for w, g in zip(want, got, strict=True)] == [True] * 4
    assert batch.rewards.tolist() == [0.0, 1.0] * 3 + [0.0, 0.0]
    assert batch.sample_mask.tolist() == [True] * 6 + [False] * 2
    assert s["rollout/reward_mean_generated"] == pytest.approx(3 / 24)  # 3 ones in 3 rounds x 8 samples
    # the same seed gives the same batch
    again = _marked_setup(tokenizer, policy, informative)[0].train_batch(0)
    assert again.texts == batch.texts and torch.equal(again.rewards, batch.rewards)
    assert torch.equal(again.sample_mask, batch.sample_mask)


def test_dynamic_sampling_filters_on_the_verifier_reward_not_the_overlong_penalty(tokenizer, policy):
    informative = {(0, 0): [0], (0, 1): [1, 2], (0, 2): []}
    dm, _ = _marked_setup(tokenizer, policy, informative, overlong="penalty", overlong_buffer=12)
    batch = dm.train_batch(0)
    penalty = -batch.response_mask.sum(1) / 12  # (N,) buffer = budget: every token costs 1/12
    # the fill group, flat for the verifier, is not flat with its penalty: the filter did not read that
    assert batch.rewards[6] != batch.rewards[7] and batch.sample_mask.tolist() == [True] * 6 + [False] * 2
    s = batch.stats
    assert (s["rollout/filtered_groups"], s["rollout/unfilled_groups"], s["rollout/extra_prompts"]) == (9, 1, 8)
    assert torch.allclose(batch.rewards - penalty, torch.tensor([0.0, 1.0] * 3 + [0.0, 0.0]))


def test_dynamic_sampling_stops_once_full_unless_another_rank_is_short(tokenizer, policy):
    informative = {(0, 0): [1, 3], (0, 1): [0, 2, 3], (0, 2): [0]}  # full after round 1, one surplus group
    dm, rounds = _marked_setup(tokenizer, policy, informative)
    batch = dm.train_batch(0)
    s = batch.stats
    assert (s["rollout/extra_rounds"], s["rollout/extra_prompts"], s["rollout/unfilled_groups"]) == (1, 4, 0)
    assert s["rollout/filtered_groups"] == 2 + 1 and batch.sample_mask is None
    assert batch.rewards.tolist() == [0.0, 1.0] * 4
    # this rank is full, but another is short: it keeps generating, in lockstep, and keeps its own groups
    lockstep, _ = _marked_setup(tokenizer, policy, informative, world=2, others_short=True)
    out = lockstep.train_batch(0)
    assert out.stats["rollout/extra_rounds"] == 2 and out.stats["rollout/extra_prompts"] == 2 * 4 * 2  # x2 ranks


def test_extra_prompt_positions_are_disjoint_and_apart_from_the_main_stream(tokenizer, policy):
    dm = _datamodule(tokenizer, policy, dynamic_sampling=True, max_extra_rounds=3)
    blocks = [dm.extra_positions(e, r) for e in range(3) for r in (1, 2, 3)]
    flat = [p for blk in blocks for p in blk]
    assert flat == list(range(3 * 3 * 4))  # each (epoch, round) owns its own block, no overlap, no gap
    # 2 ranks, 8 prompts per step, 4 rounds per epoch: epoch 1, round 2 owns positions 40..47, rank 0 the first 4
    assert _datamodule(tokenizer, policy, world=2, dynamic_sampling=True).extra_positions(1, 2) == [40, 41, 42, 43]
    main_seeds = set(dm._seeds("train", 0, list(range(1000))))
    assert not main_seeds & set(dm._seeds("train_extra", 0, flat))
    assert dm.extra_set.take(0, 50) != dm.train_set.take(0, 50)  # a separately shuffled stream


def test_concat_keeps_every_optional_tensor_after_a_sample_mask():
    """Dynamic sampling concatenates batches that carry a sample mask and the engine's log-probs: every
    optional tensor is concatenated, the missing sample mask counts as all True. Catches the loop that
    stops at the sample mask (`break` for `continue`: TIS would silently lose its log-probs; found by
    `make mutation`)."""
    from dataclasses import replace

    a, b = _batch([5, 7, 8, 10], [1.0, 0.0, 1.0, 1.0]), _batch([3, 3], [0.0, 1.0])
    a = replace(a, sample_mask=torch.tensor([True, False, True, True]), rollout_logprobs=-a.response_mask.float())
    b = replace(b, rollout_logprobs=-2 * b.response_mask.float())
    out = concat_batches([a, b], pad=0)
    assert out.sample_mask.tolist() == [True, False, True, True, True, True]
    assert out.rollout_logprobs is not None and out.rollout_logprobs.shape == out.response_ids.shape
    assert out.rollout_logprobs.sum(1).tolist() == [-5.0, -7.0, -8.0, -10.0, -6.0, -6.0]


# -- the batch helpers the shaping builds on: exact rows, widths, padding and bookkeeping ------
def _rows(prompts: list[list[int]], responses: list[list[int]], pad: int = 9, **kwargs) -> RolloutBatch:
    """A hand-built batch, padded with `pad`: rewards 0, 1, 2, ... and texts "t0", "t1", ..."""
    (p_ids, p_mask), (r_ids, r_mask) = pad_left(prompts, pad), pad_right(responses, pad)
    n = len(prompts)
    lists = {"texts": [f"t{i}" for i in range(n)], "has_answer": [i % 2 == 0 for i in range(n)]}
    return RolloutBatch(p_ids, p_mask, r_ids, r_mask, torch.arange(n, dtype=torch.float32), **{**lists, **kwargs})


def test_select_trims_to_its_rows_and_picks_every_per_sample_list():
    """`select` (micro-batches, mini-batches) keeps exactly the padding columns its rows use and the
    texts / answer flags / sources of those rows, with stats and lockstep padding dropped. Catches: the
    trim widened (max(2, ...), the whole batch's token count), index selections that keep every text,
    and lists, stats or `padding_prompts` left as the parent's (found by `make mutation`)."""
    batch = _rows(
        [[5], [5], [5, 6, 7], [5, 6, 7]],
        [[2], [7, 2], [7, 7, 7, 2], [7, 2]],
        group_size=2,
        sources=["a", "b", "c", "d"],
        stats={"rollout/x": 1.0},
        padding_prompts=1,
    )
    head = batch.select(slice(0, 2))  # one-token prompts, responses of 1 and 2 tokens
    assert head.prompt_ids.tolist() == [[5], [5]] and head.prompt_mask.tolist() == [[1], [1]]
    assert head.response_ids.tolist() == [[2, 9], [7, 2]] and head.group_size == 2
    assert (head.texts, head.has_answer, head.sources) == (["t0", "t1"], [True, False], ["a", "b"])
    assert head.stats == {} and head.padding_prompts == 0
    one = batch.select(torch.tensor([0]))
    assert one.prompt_ids.tolist() == [[5]] and one.response_ids.tolist() == [[2]]
    assert one.response_mask.tolist() == [[1]]
    picked = batch.select(torch.tensor([3, 0]))  # an index selection, in that order
    assert picked.prompt_ids.tolist() == [[5, 6, 7], [9, 9, 5]] and picked.response_ids.tolist() == [[7, 2], [2, 9]]
    assert (picked.texts, picked.has_answer, picked.sources) == (["t3", "t0"], [False, True], ["d", "a"])
    assert picked.rewards.tolist() == [3.0, 0.0] and picked.group_size == 1
    assert picked.stats == {} and picked.padding_prompts == 0
    assert batch.select(torch.tensor([1, 2])).texts == ["t1", "t2"]
    bare = _rows([[5], [5]], [[2], [2]], group_size=2, texts=[], has_answer=[])
    assert bare.select(torch.tensor([1])).texts == []  # lists left empty stay empty


def test_take_groups_picks_whole_groups_with_their_lists():
    """`take_groups` (dynamic sampling's kept and fill groups) returns the groups asked for, in that
    order, with their own texts, answer flags and sources; stats stay, lockstep padding goes. Catches
    a list left whole or emptied, and `padding_prompts` kept (found by `make mutation`)."""
    batch = _rows(
        [[5]] * 6, [[2]] * 6, group_size=2, sources=list("abcdef"), stats={"rollout/x": 1.0}, padding_prompts=1
    )
    out = take_groups(batch, [2, 0])
    assert out.rewards.tolist() == [4.0, 5.0, 0.0, 1.0] and out.group_size == 2
    assert out.texts == ["t4", "t5", "t0", "t1"] and out.sources == ["e", "f", "a", "b"]
    assert out.has_answer == [True, False, True, False]
    assert out.stats == {"rollout/x": 1.0} and out.padding_prompts == 0
    bare = take_groups(_rows([[5]] * 4, [[2]] * 4, group_size=2, texts=[], has_answer=[]), [1])
    assert (bare.texts, bare.has_answer, bare.sources) == ([], [], [])


def test_concat_pads_with_the_pad_id_and_keeps_every_part():
    """`concat_batches` (dynamic sampling's kept + fill groups): prompts left-padded and responses
    right-padded with the pad id (the policy embeds those ids), a bool sample mask (a missing one
    counts as all True), per-sample tensors such as advantages stacked, every list concatenated, the
    first part's stats and group size, no lockstep padding; one part alone works. Catches padding with
    0 instead of `pad`, a float sample mask, advantages padded like (N, T) tensors, lists from one part,
    the second part taken as the template (found by `make mutation`)."""
    from dataclasses import replace

    a = _rows([[5, 6]] * 4, [[7, 7, 2], [2], [7, 2], [2]], group_size=2, sources=list("abcd"))
    a = replace(a, stats={"rollout/x": 1.0}, padding_prompts=1, advantages=torch.tensor([1.0, -1.0, 0.5, -0.5]))
    b = _rows([[4, 5, 6]] * 2, [[2], [8, 2]], group_size=2, sources=["e", "f"], texts=["u0", "u1"])
    b = replace(b, stats={"rollout/y": 2.0}, sample_mask=torch.tensor([True, False]), advantages=torch.zeros(2))
    out = concat_batches([a, b], pad=9)
    assert out.prompt_ids.tolist() == [[9, 5, 6]] * 4 + [[4, 5, 6]] * 2
    assert out.prompt_mask.tolist() == [[0, 1, 1]] * 4 + [[1, 1, 1]] * 2
    assert out.response_ids.tolist() == [[7, 7, 2], [2, 9, 9], [7, 2, 9], [2, 9, 9], [2, 9, 9], [8, 2, 9]]
    assert out.response_mask.sum(1).tolist() == [3, 1, 2, 1, 1, 2]
    assert out.sample_mask.dtype == torch.bool and out.sample_mask.tolist() == [True] * 5 + [False]
    assert out.advantages.tolist() == [1.0, -1.0, 0.5, -0.5, 0.0, 0.0]
    assert out.texts == ["t0", "t1", "t2", "t3", "u0", "u1"] and out.sources == list("abcdef")
    assert out.has_answer == [True, False, True, False, True, False]
    assert out.stats == {"rollout/x": 1.0} and out.group_size == 2 and out.padding_prompts == 0
    alone = concat_batches([b], pad=9)
    assert alone.texts == ["u0", "u1"] and alone.stats == {"rollout/y": 2.0} and alone.padding_prompts == 0


def test_pad_right_and_truncated_flags_on_hand_built_rows():
    """`pad_right` is exactly as wide as its longest row (at least 1, also for no rows), and a completion
    is truncated unless its last real token is a stop id: a lone EOS has stopped, an empty one has not,
    even when the pad id is itself a stop id (Qwen pads with <|endoftext|>). Catches a minimum width of
    2, no default for no rows, and the last-token index / empty-row tests shifted (found by `make
    mutation`); `overlong` masks and penalises by these flags."""
    from lightning_prerl.data.batch import truncated_flags

    ids, mask = pad_right([[5]], 9)
    assert ids.tolist() == [[5]] and mask.tolist() == [[1]]
    ids, mask = pad_right([], 9)
    assert ids.shape == mask.shape == (0, 1)
    assert truncated_flags(*pad_right([[2], [7, 7], [7, 2]], 0), [2]) == [False, True, False]
    assert truncated_flags(*pad_right([[2], [7, 7], []], 2), [2]) == [False, True, True]  # pad id = stop id


def test_a_batch_refuses_rows_or_widths_that_do_not_match():
    """Every per-sample tensor has one row per reward and the response-aligned ones the responses'
    shape: a mismatch fails where the batch is built, not as a broadcast in the loss. Catches either
    check skipped (found by `make mutation`)."""
    from dataclasses import replace

    batch = _rows([[5]] * 2, [[2], [7, 2]], group_size=2)
    with pytest.raises(ValueError, match="prompt_ids has 3 rows, rewards has 2"):
        RolloutBatch(
            torch.ones(3, 1, dtype=torch.long), torch.ones(3, 1), batch.response_ids, batch.response_mask,
            batch.rewards, 2,
        )  # fmt: skip
    with pytest.raises(ValueError, match=r"rollout_logprobs has shape \(2, 1\), response_ids \(2, 2\)"):
        replace(batch, rollout_logprobs=torch.zeros(2, 1))


def test_per_sample_seeds_follow_select_take_groups_and_concat():
    """A rollout record stores each sample's seed: selecting rows, taking groups and concatenating parts
    keep them aligned with their samples (found untested by `make mutation`)."""

    def rows(n: int, seeds: list[int]) -> RolloutBatch:
        (p_ids, p_mask), (r_ids, r_mask) = pad_left([[5]] * n, 0), pad_right([[7, 7]] * n, 0)
        return RolloutBatch(p_ids, p_mask, r_ids, r_mask, torch.zeros(n), 2, seeds=seeds)

    four = rows(4, [10, 10, 11, 11])
    assert four.select(slice(2, 4)).seeds == [11, 11]
    assert four.select(torch.tensor([3, 0])).seeds == [11, 10]
    assert take_groups(four, [1]).seeds == [11, 11]
    assert concat_batches([four, rows(2, [12, 12])], 0).seeds == [10, 10, 11, 11, 12, 12]
    assert take_groups(rows(2, []), [0]).seeds == []  # a batch without seeds stays without
