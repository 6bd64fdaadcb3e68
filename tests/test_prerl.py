"""PreRL family, Zhu et al. variants and the alignment diagnostic, with hand-derived numbers.

Batch: 2 prompts x 4 samples. Group 1 rewards [1, 0, 0, 0] (mean .25), group 2 all wrong.
Response lengths L = [2, 3, 1, 2 | 1, 2, 3, 4]. On-policy (ratio 1) the per-token loss is -A.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from lightning_prerl.data.batch import RolloutBatch
from lightning_prerl.objectives import PolicyGradientObjective as PG
from lightning_prerl.reports.alignment import gradient_alignment
from lightning_prerl.training.logprobs import sequence_logprobs
from lightning_prerl.training.policy import NSRPreRL, PreRL, PSRPreRL
from lightning_prerl.training.update import MicroBatching, backward_objective

REWARDS = torch.tensor([1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0])
LENGTHS = [2, 3, 1, 2, 1, 2, 3, 4]
MASK = torch.tensor([[1.0] * n + [0.0] * (4 - n) for n in LENGTHS])  # (8, 4)

NSR_PRERL = PG(space="marginal", advantage="group_mean", samples="negative", coef=0.01)
PSR_PRERL = PG(space="marginal", advantage="group_mean", samples="positive", coef=0.01)
PRERL = PG(space="marginal", advantage="group_mean", coef=0.01)


def batch_loss(obj: PG) -> float:
    adv, keep = obj.advantages(REWARDS, group_size=4)
    mask = MASK * keep[:, None]
    logp = torch.full((8, 4), -0.5)
    return ((obj.token_loss(logp, logp.detach(), adv) * mask).sum() / mask.sum()).item()


def test_nsr_prerl_by_hand():
    adv, keep = NSR_PRERL.advantages(REWARDS, 4)
    # group 1: wrong answers get -(success rate) = -.25 ; group 2 (all wrong): A = 0, not kept
    assert adv.tolist() == pytest.approx([0.75, -0.25, -0.25, -0.25, 0, 0, 0, 0])
    assert keep.tolist() == [False, True, True, True, False, False, False, False]
    # kept tokens 3 + 1 + 2 = 6, each costs -A = .25 -> mean .25, x coef .01
    assert batch_loss(NSR_PRERL) == pytest.approx(0.0025)


def test_psr_and_full_prerl_by_hand():
    # PSR: only sample 0 (A = .75, 2 tokens): -.75 x .01
    assert batch_loss(PSR_PRERL) == pytest.approx(-0.0075)
    # full PreRL: all 18 tokens count; (-.75*2 + .25*(3+1+2) + 0) / 18 = 0 / 18 = 0
    assert batch_loss(PRERL) == pytest.approx(0.0, abs=1e-9)


def test_zhu_variants_by_hand():
    nsr = PG(advantage="signed", samples="negative")
    psr = PG(advantage="signed", samples="positive")
    w = PG(advantage="signed", positive_weight=0.1)
    # NSR: 7 wrong samples, A = -1 on each of their 16 tokens -> mean +1
    assert batch_loss(nsr) == pytest.approx(1.0)
    # PSR: sample 0 only, A = +1 -> -1
    assert batch_loss(psr) == pytest.approx(-1.0)
    # W-REINFORCE: (-.1*2 + 1*16) / 18 = 15.8 / 18 = .877778
    assert batch_loss(w) == pytest.approx(15.8 / 18)


def test_nsr_weight_grows_with_group_success_rate():
    rewards = torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0])
    adv, _ = NSR_PRERL.advantages(rewards, 4)
    assert adv[3].item() == pytest.approx(-0.75) and adv[5].item() == pytest.approx(-0.25)


def toy_batch(tokenizer, rewards: list[float], group_size: int) -> RolloutBatch:
    enc = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    n = len(rewards)
    prompt = enc("<|im_start|>user\nCompute 1+2+3<|im_end|>\n<|im_start|>assistant\n")
    texts = ["1+2=3. 3+3=6.", "1+2=4. 4+3=7.", "1+2=3. 3+3=7.", "1+2=3."] * (n // 4 + 1)
    responses = [enc(t) + [tokenizer.eos_token_id] for t in texts[:n]]
    width = max(map(len, responses))
    response_ids = torch.full((n, width), tokenizer.pad_token_id)
    response_mask = torch.zeros((n, width), dtype=torch.long)
    for i, r in enumerate(responses):
        response_ids[i, : len(r)], response_mask[i, : len(r)] = torch.tensor(r), 1
    return RolloutBatch(
        torch.tensor([prompt] * n),
        torch.ones((n, len(prompt)), dtype=torch.long),
        response_ids,
        response_mask,
        torch.tensor(rewards),
        group_size,
        texts=texts[:n],
        has_answer=[True] * n,
    )


@pytest.fixture()
def policy(tiny_model_dir):
    from lightning_prerl.scale.models import load_policy

    torch.manual_seed(0)
    return load_policy(str(tiny_model_dir))


def grads(policy) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in policy.parameters()])


def test_all_wrong_group_contributes_nothing(policy, tokenizer):
    start = tokenizer.convert_tokens_to_ids("<|im_start|>")
    mixed = toy_batch(tokenizer, [1, 0, 0, 1], 4)
    with_dead = toy_batch(tokenizer, [1, 0, 0, 1, 0, 0, 0, 0], 4)
    policy.zero_grad()
    backward_objective(NSR_PRERL, policy, mixed, start)
    g_mixed = grads(policy)
    policy.zero_grad()
    result = backward_objective(NSR_PRERL, policy, with_dead, start)
    # neither the numerator nor the token-mean denominator sees the all-wrong group
    assert result.kept_tokens.item() == mixed.response_mask[1:3].sum().item()
    assert torch.allclose(grads(policy), g_mixed, atol=1e-7)


def test_descending_nsr_prerl_lowers_prompt_free_logp_of_negatives(policy, tokenizer):
    start = tokenizer.convert_tokens_to_ids("<|im_start|>")
    batch = toy_batch(tokenizer, [1, 0, 0, 1], 4)
    before, _ = sequence_logprobs(policy, batch, "marginal", start)
    policy.zero_grad()
    backward_objective(NSR_PRERL, policy, batch, start)
    with torch.no_grad():
        for p in policy.parameters():
            p -= 10.0 * p.grad  # plain gradient descent (the 0.01 coefficient makes the gradient small)
    after, _ = sequence_logprobs(policy, batch, "marginal", start)
    mask = batch.response_mask.float()
    seq = lambda lp: (lp * mask).sum(1)  # noqa: E731
    assert (seq(after)[1:3] < seq(before)[1:3]).all()


def test_prerl_runs_only_prompt_free_forward_passes(policy, tokenizer):
    start = tokenizer.convert_tokens_to_ids("<|im_start|>")
    batch = toy_batch(tokenizer, [1, 0, 0, 1], 4)
    seen = []
    handle = policy.register_forward_pre_hook(lambda m, a, kw: seen.append(kw), with_kwargs=True)
    try:
        backward_objective(PRERL, policy, batch, start, micro=MicroBatching(size=2))  # keeps every sample
    finally:
        handle.remove()
    assert len(seen) == 2  # one forward per micro-batch, none conditional
    # rows by length (row 3's response is the short one), ties in batch order
    assert [r.tolist() for r, _ in batch.micro_batches(size=2)] == [[3, 0], [1, 2]]
    for kw, rows in zip(seen, ([3, 0], [1, 2]), strict=True):
        resp, mask = batch.response_ids[rows], batch.response_mask[rows]
        t = resp.shape[1]
        # ids = [s] + y (no prompt token anywhere), positions 0..T, mask = [1] + response mask
        assert torch.equal(kw["input_ids"], torch.cat([torch.full((2, 1), start), resp], dim=1))
        assert torch.equal(kw["position_ids"], torch.arange(t + 1).expand(2, -1))
        assert torch.equal(kw["attention_mask"], torch.cat([torch.ones(2, 1, dtype=mask.dtype), mask], dim=1))
        # the EOS that ends each response is inside the mask, so it is scored
        last = mask.sum(1) - 1
        assert (resp[torch.arange(2), last] == tokenizer.eos_token_id).all()


def test_nsr_prerl_forwards_only_its_negatives_with_the_same_gradient(policy, tokenizer, monkeypatch):
    """Rows whose loss mask is empty are never forwarded; the gradient is the all-rows one."""
    import lightning_prerl.training.update as update

    start = tokenizer.convert_tokens_to_ids("<|im_start|>")
    batch = toy_batch(tokenizer, [1, 0, 0, 1, 1, 1, 0, 1], 4)  # negatives: rows 1, 2, 6
    seen = []
    handle = policy.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["input_ids"]), with_kwargs=True)
    try:
        policy.zero_grad()
        kept_only = backward_objective(NSR_PRERL, policy, batch, start)
        g_kept = grads(policy)
        monkeypatch.setattr(update, "rows_with_loss", lambda b, skip: b)  # the previous behaviour: every row
        policy.zero_grad()
        every_row = backward_objective(NSR_PRERL, policy, batch, start)
    finally:
        handle.remove()
    negatives = batch.response_ids[[1, 2, 6]]
    assert torch.equal(seen[0][:, 1:], negatives[:, : seen[0].shape[1] - 1])  # 3 rows, trimmed to their longest
    assert seen[0].shape[1] - 1 == int(batch.response_mask[[1, 2, 6]].sum(1).max())
    assert seen[1].shape[0] == 8
    assert kept_only.kept_tokens == every_row.kept_tokens
    assert torch.allclose(kept_only.loss, every_row.loss, atol=1e-8)
    assert torch.allclose(g_kept, grads(policy), atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("kl_coef", [0.0, 0.1])
def test_grpo_skips_flat_groups_only_when_their_loss_is_zero(policy, tokenizer, kl_coef):
    """A flat group's samples (A = 0) add 0 to the PPO loss and are not forwarded; with a KL term they
    count and are. The gradient, loss and denominator are the every-row ones either way; the logged
    entropy is the mean over the forwarded tokens."""
    import copy

    start = tokenizer.convert_tokens_to_ids("<|im_start|>")
    batch = toy_batch(tokenizer, [1, 1, 1, 1, 1, 0, 0, 1], 4)  # group 0 all right: A = 0
    grpo = PG(kl_coef=kl_coef)
    reference = copy.deepcopy(policy) if kl_coef else None
    seen = []
    handle = policy.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["input_ids"]), with_kwargs=True)
    results = {}
    try:
        for skip in (True, False):
            policy.zero_grad()
            micro = MicroBatching(skip_zero_advantage=skip, share_prompts=False)  # one pass per micro-batch
            results[skip] = (
                backward_objective(grpo, policy, batch, start, micro=micro, reference=reference),
                grads(policy),
            )
    finally:
        handle.remove()
    (skipped, g_skipped), (every, g_every) = results[True], results[False]
    assert [ids.shape[0] for ids in seen] == ([8, 8] if kl_coef else [4, 8])
    assert skipped.kept_tokens == every.kept_tokens == batch.response_mask.sum()  # the loss's denominator
    assert int(skipped.forwarded_tokens) == int(batch.response_mask[4:].sum() if not kl_coef else every.kept_tokens)
    assert torch.allclose(skipped.loss, every.loss, atol=1e-8)
    assert torch.allclose(g_skipped, g_every, atol=1e-7, rtol=1e-5)
    with torch.no_grad():
        _, entropy = sequence_logprobs(policy, batch.select(slice(4, 8)), "conditional", start, with_entropy=True)
    mixed = batch.response_mask[4:].float()  # (4, T)
    if not kl_coef:  # the mean over the forwarded tokens: the mixed group's
        expected = (entropy * mixed[:, : entropy.shape[1]]).sum() / mixed.sum()
        assert torch.allclose(skipped.entropy_sum / skipped.forwarded_tokens, expected, rtol=1e-5)


def test_micro_batches_hold_rows_of_similar_length(tokenizer):
    """Rows are ordered by length before the batch is cut, so a micro-batch pads only to rows like its own."""
    batch = toy_batch(tokenizer, [1, 0, 0, 1, 1, 1, 0, 1], 4)  # responses of 14 tokens, rows 3 and 7: 7
    p = batch.prompt_ids.shape[1]
    assert batch.response_mask.sum(1).tolist() == [14, 14, 14, 7, 14, 14, 14, 7]
    parts = batch.micro_batches(size=2)
    assert [rows.tolist() for rows, _ in parts] == [[3, 7], [0, 1], [2, 4], [5, 6]]
    assert [mb.response_ids.shape[1] for _, mb in parts] == [7, 14, 14, 14]  # 98 padded response tokens, not 112
    rows, short = parts[0]
    assert torch.equal(short.response_ids, batch.response_ids[rows, :7])  # trimmed to its own longest
    # a budget of two short rows: they share a pass, every long row needs its own
    parts = batch.micro_batches(max_tokens=2 * (p + 7))
    assert [rows.tolist() for rows, _ in parts] == [[3, 7], [0], [1], [2], [4], [5], [6]]
    assert len(batch.micro_batches()) == 1 and batch.micro_batches()[0][0] == slice(0, 8)  # uncut: batch order


def test_a_rank_with_fewer_kept_rows_fills_the_agreed_micro_batch_count(tokenizer):
    from lightning_prerl.training.update import rows_with_loss

    batch = toy_batch(tokenizer, [1, 0, 0, 1, 1, 1, 1, 1], 4)
    adv, keep = NSR_PRERL.advantages(batch.rewards, 4)
    prepared = dataclasses.replace(batch, loss_mask=batch.response_mask.float() * keep[:, None])
    kept = rows_with_loss(prepared)
    assert len(kept) == 2  # rows 1 and 2
    parts = kept.micro_batches(size=1, agree=lambda count: 4)  # another rank needs 4 passes
    assert len(parts) == 4 and [len(mb) for _, mb in parts] == [1, 1, 1, 1]
    assert [rows for rows, _ in parts[2:]] == [slice(0, 0)] * 2  # fillers map to no row and learn nothing
    assert all(mb.loss_mask.sum() == 0 for _, mb in parts[2:]) and all(mb.loss_mask.sum() > 0 for _, mb in parts[:2])
    nothing = rows_with_loss(dataclasses.replace(prepared, loss_mask=0 * prepared.loss_mask))
    assert len(nothing) == 1 and nothing.loss_mask.sum() == 0  # a rank with no kept sample still takes part


def test_lightning_modules_fix_their_objective(tiny_model_dir):
    assert PreRL(model_path=str(tiny_model_dir)).objective.samples == "all"
    nsr = NSRPreRL(model_path=str(tiny_model_dir))
    assert (nsr.objective.space, nsr.objective.samples, nsr.objective.coef) == ("marginal", "negative", 0.01)
    assert PSRPreRL(model_path=str(tiny_model_dir)).objective.samples == "positive"


def test_start_token_resolution(tokenizer):
    from lightning_prerl.scale.models import resolve_start_token_id

    # no BOS in the toy (Qwen-like) tokenizer: the chat template's first special token
    assert resolve_start_token_id(tokenizer) == tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert resolve_start_token_id(tokenizer, "<|im_end|>") == tokenizer.eos_token_id
    with pytest.raises(ValueError, match="not a single token"):
        resolve_start_token_id(tokenizer, "<not-a-token>")


def test_gradient_alignment_matches_a_manual_computation(policy, tokenizer):
    start = tokenizer.convert_tokens_to_ids("<|im_start|>")
    batch = toy_batch(tokenizer, [1, 0, 0, 1], 4)
    stats = gradient_alignment(policy, batch, start, max_samples=1)
    one = batch.select(slice(0, 1))
    flat = []
    for space in ("marginal", "conditional"):
        policy.zero_grad()
        logp, _ = sequence_logprobs(policy, one, space, start)
        (logp * one.response_mask).sum().backward()
        flat.append(grads(policy).clone())
    dot = torch.dot(flat[0], flat[1]).item()
    assert stats["align/inner_mean"] == pytest.approx(dot, rel=1e-4)
    assert stats["align/cosine_mean"] == pytest.approx(dot / (flat[0].norm() * flat[1].norm()).item(), rel=1e-4)
    assert stats["align/negative_share"] in (0.0, 1.0)


def _rows(p_lens: list[int], r_lens: list[int]) -> RolloutBatch:
    """Rows with prompts and responses of the given real lengths (padding: 0)."""
    from lightning_prerl.data.batch import pad_left, pad_right

    (p_ids, p_mask) = pad_left([[5] * n for n in p_lens], 0)
    (r_ids, r_mask) = pad_right([[7] * n for n in r_lens], 0)
    return RolloutBatch(p_ids, p_mask, r_ids, r_mask, torch.zeros(len(p_lens)), 1)


def _cuts(batch: RolloutBatch, **kwargs) -> list:
    """`micro_batches`' rows: a slice, or the index list."""
    return [r.tolist() if isinstance(r, torch.Tensor) else r for r, _ in batch.micro_batches(**kwargs)]


def test_micro_batch_bounds_on_hand_built_lengths():
    """Exact cuts of `micro_batches` (rows sorted by prompt + response length, shortest first): a size
    of 0 means no row limit; a token budget counts the open slice's rows x (its longest prompt + its
    longest response), each row alone when it is over budget, never an empty micro-batch; an agreed
    count splits multi-row slices down to single rows before adding fillers; empty prompts or
    responses add nothing to the width. Catches the first row skipped or its prompt read as a
    response length, a row count of end + start, single over-budget rows cut into empty slices,
    splitting that stops at two-row slices, and non-zero starting widths (found by `make mutation`)."""
    four = _rows([1] * 4, [1] * 4)
    assert _cuts(four, size=0) == [slice(0, 4)]  # size <= 0: no row limit
    assert _cuts(_rows([5, 1], [1, 6]), max_tokens=20) == [[0], [1]]  # together: 2 x (5 + 6) = 22 tokens
    assert _cuts(four, max_tokens=4) == [[0, 1], [2, 3]]
    assert _cuts(_rows([1, 1], [1, 1]), max_tokens=1) == [[0], [1]]  # every row over budget: one each
    assert _cuts(four, agree=lambda count: 4) == [[0], [1], [2], [3]]  # another rank needs 4 passes
    assert _cuts(_rows([0, 0], [3, 3]), max_tokens=6) == [slice(0, 2)]  # 2 x (0 + 3) fits exactly
    assert _cuts(_rows([3, 3], [0, 0]), max_tokens=6) == [slice(0, 2)]


def test_an_agreed_count_splits_the_costliest_multi_row_slice_first():
    """Another rank needs more passes: the slice that costs the most padded tokens (rows x (longest
    prompt + longest response)) is halved first, a single row is never split into an empty slice.
    Rows (prompt, response) (1,1) x 3 and (1,9) x 2 under a 10-token budget: [0,3) costs 3 x 2 = 6, the
    long rows 10 each, alone. Asking for 4 passes halves [0,3), the only multi-row slice, never a
    costlier single row; with two multi-row slices, the costlier one goes first. Catches the cost
    formula's operators, `max` without the cost key, and `b - a >= 1` / `b + a > 1` (found by `make mutation`)."""
    five = _rows([1, 1, 1, 1, 1], [1, 1, 1, 9, 9])
    assert _cuts(five, max_tokens=10) == [[0, 1, 2], [3], [4]]
    assert _cuts(five, max_tokens=10, agree=lambda count: 4) == [[0], [1, 2], [3], [4]]
    # two multi-row slices: [0,2) costs 2 x (1 + 1) = 4, [2,4) costs 2 x (1 + 4) = 10: the second is halved
    two_pairs = _rows([1, 1, 1, 1], [1, 1, 4, 4])
    assert _cuts(two_pairs, max_tokens=10) == [[0, 1], [2, 3]]
    assert _cuts(two_pairs, max_tokens=10, agree=lambda count: 3) == [[0, 1], [2], [3]]
    # the costliest slice need not be the last: 4 x (1 + 1) = 8 before 2 x (1 + 2) = 6
    four_then_two = _rows([1] * 6, [1, 1, 1, 1, 2, 2])
    assert _cuts(four_then_two, max_tokens=8) == [[0, 1, 2, 3], [4, 5]]
    assert _cuts(four_then_two, max_tokens=8, agree=lambda count: 3) == [[0, 1], [2, 3], [4, 5]]
    # a wider prompt makes the first pair the costlier one: 2 x (6 + 1) = 14 > 2 x (1 + 4) = 10
    assert _cuts(_rows([6, 6, 1, 1], [1, 1, 4, 4]), max_tokens=14, agree=lambda count: 3) == [[2, 3], [0], [1]]
