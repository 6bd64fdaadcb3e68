"""RolloutDataModule with the real transformers engine on a tiny policy."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from lightning_prerl.data.prompts import PromptSet, toy_prompts
from lightning_prerl.data.rewards import BoxedExactMatch
from lightning_prerl.rollout.hf import HFEngine
from lightning_prerl.training.datamodule import RolloutDataModule


def make_datamodule(tokenizer, policy, **kwargs) -> RolloutDataModule:
    dm = RolloutDataModule(
        tokenizer,
        HFEngine,
        BoxedExactMatch(),
        toy_prompts("train", 50),
        toy_prompts("heldout", 6),
        **{
            "prompts_per_step": 3,
            "samples_per_prompt": 2,
            "sampling": {"max_new_tokens": 12},
            "eval_samples": 2,
            "eval_prompts_per_batch": 4,
            **kwargs,
        },
    )
    dm.trainer = SimpleNamespace(
        lightning_module=SimpleNamespace(policy=policy), global_rank=0, world_size=1, global_step=0, current_epoch=0
    )
    return dm


def test_train_batch_shapes_masks_and_stats(tiny_model_dir, tokenizer):
    from lightning_prerl.scale.models import load_policy

    dm = make_datamodule(tokenizer, load_policy(str(tiny_model_dir)))
    batch = next(iter(dm.train_dataloader()))
    n = 3 * 2
    assert len(batch) == n and batch.group_size == 2
    assert batch.prompt_ids.shape[0] == batch.response_ids.shape[0] == n
    # prompts left-padded (last column real), responses right-padded (first column real)
    assert batch.prompt_mask[:, -1].all() and batch.response_mask[:, 0].all()
    # samples of one group share the prompt
    assert torch.equal(batch.prompt_ids[0], batch.prompt_ids[1])
    # a finished response ends with EOS inside the mask; an unfinished one was cut at max_new_tokens
    for ids, mask in zip(batch.response_ids, batch.response_mask, strict=True):
        length = int(mask.sum())
        assert ids[length - 1] == tokenizer.eos_token_id or length == 12
    assert len(batch.texts) == n and set(batch.rewards.tolist()) <= {0.0, 1.0}
    assert {"time/generate", "time/score", "rollout/truncated"} <= set(batch.stats)


def test_prompt_slices_depend_only_on_epoch_rank_and_world(tiny_model_dir, tokenizer):
    ps = PromptSet(toy_prompts("train", 10), shuffle_seed=3)
    assert ps.take(4, 8) == PromptSet(toy_prompts("train", 10), shuffle_seed=3).take(4, 8)
    first_pass = ps.take(0, 10)
    assert len(set(first_pass)) == 10  # a pass visits every prompt once
    assert ps.take(10, 10) != first_pass  # the next pass is reshuffled


def test_eval_batches_cover_the_held_out_set(tiny_model_dir, tokenizer):
    from lightning_prerl.scale.models import load_policy

    dm = make_datamodule(tokenizer, load_policy(str(tiny_model_dir)))
    batches = list(dm.val_dataloader())
    assert [len(b) for b in batches] == [4 * 2, 2 * 2]


def test_prompts_over_the_length_limit_are_dropped_once_at_load(tiny_model_dir, tokenizer):
    import pytest

    from lightning_prerl.data.prompts import render_prompt
    from lightning_prerl.scale.models import load_policy

    policy = load_policy(str(tiny_model_dir))
    lengths = [len(render_prompt(tokenizer, p)) for p in toy_prompts("train", 50)]
    limit = sorted(lengths)[len(lengths) // 2]  # about half the prompts are longer
    dm = make_datamodule(tokenizer, policy, max_prompt_tokens=limit)
    dm.setup("fit")
    assert dm.dropped_prompts["train"] == sum(n > limit for n in lengths) > 0
    assert all(len(render_prompt(tokenizer, p)) <= limit for p in dm.train_prompts)
    batch = dm.train_batch(0)  # a full batch of kept prompts: no rank ever draws fewer
    assert len(batch) == 3 * 2 and batch.stats["rollout/dropped_prompts"] == dm.dropped_prompts["train"]
    with pytest.raises(ValueError, match="max_prompt_tokens=10: every train prompt is longer"):
        make_datamodule(tokenizer, policy, max_prompt_tokens=10).setup("fit")


def test_load_prompts_reads_each_answer_format(tmp_path):
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq
    import pytest

    from lightning_prerl.data.prompts import load_prompts

    gsm = tmp_path / "gsm.jsonl"
    gsm.write_text(json.dumps({"question": "Q?", "answer": "3+4=<<3+4=7>>7\n#### 1,234"}))
    assert load_prompts(str(gsm), "question", "answer", "gsm8k")[0].answer == "1234"
    boxed = tmp_path / "minerva.jsonl"
    boxed.write_text(json.dumps({"problem": "P?", "solution": r"so \boxed{\frac{1}{2}} m"}))
    assert load_prompts(str(boxed), "problem", "solution", "boxed")[0].answer == r"\frac{1}{2}"
    amc = tmp_path / "amc.jsonl"
    amc.write_text(json.dumps({"problem": "P?", "answer": 27.0}))
    assert load_prompts(str(amc))[0].answer == "27"
    verl = tmp_path / "train.parquet"
    pq.write_table(
        pa.Table.from_pylist(
            [{"prompt": [{"role": "user", "content": "1+1?"}], "reward_model": {"ground_truth": {"target": "2"}}}]
        ),
        verl,
    )
    (p,) = load_prompts(str(verl), "prompt", "reward_model", system="Think.")
    assert (p.question, p.answer, p.messages()[0]) == ("1+1?", "2", {"role": "system", "content": "Think."})
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"problem": "P?"}))
    with pytest.raises(ValueError, match=r"bad.jsonl: record 0 has no usable 'answer' field"):
        load_prompts(str(bad))


def test_hf_engine_samples_the_policy_itself_not_the_checkpoint_defaults(tiny_model_dir, tokenizer):
    """Checkpoint generation defaults (top_k, repetition penalty) must not distort the samples."""
    import torch

    from lightning_prerl.data.batch import RolloutBatch, pad_left, pad_right
    from lightning_prerl.data.prompts import render_prompt
    from lightning_prerl.rollout.engine import SamplingConfig
    from lightning_prerl.scale.models import load_policy
    from lightning_prerl.training.logprobs import sequence_logprobs

    policy = load_policy(str(tiny_model_dir))
    policy.generation_config.top_k = 1
    policy.generation_config.repetition_penalty = 3.0
    engine = HFEngine(tokenizer)
    engine.sync(policy)
    prompts = [render_prompt(tokenizer, p) for p in toy_prompts("heldout", 3)]
    torch.manual_seed(0)
    gen = engine.generate(prompts, 2, SamplingConfig(temperature=1.0, max_new_tokens=16), return_logprobs=True)
    rows = [p for p in prompts for _ in range(2)]
    (prompt_ids, prompt_mask), (resp_ids, resp_mask) = pad_left(rows, 0), pad_right(gen.completions, 0)
    batch = RolloutBatch(prompt_ids, prompt_mask, resp_ids, resp_mask, torch.zeros(6), 2)
    with torch.no_grad():
        logp, _ = sequence_logprobs(policy, batch, "conditional", 0)
    engine_logp = pad_right([[0] * len(c) for c in gen.completions], 0)[0].float()
    for i, lps in enumerate(gen.logprobs):
        engine_logp[i, : len(lps)] = torch.tensor(lps)
    assert torch.allclose(engine_logp * resp_mask, logp * resp_mask, atol=1e-4)
    assert (logp * resp_mask).min() < -1.0  # real sampling: unlikely tokens were drawn (top_k=1 would forbid it)


def test_hf_engine_decode_loop_draws_what_transformers_generate_draws():
    """The engine's loop (finished rows leave the batch) samples exactly what `generate` over the same
    seeded Gumbel noise samples (the path sharded policies take), greedy and with top-k: the shipped toy
    policy, whose answers end at different lengths."""
    from transformers import GenerationConfig, LogitsProcessorList

    from lightning_prerl.data.batch import pad_left
    from lightning_prerl.data.prompts import render_prompt
    from lightning_prerl.rollout.engine import SamplingConfig, cut_at_eos, derive_seed
    from lightning_prerl.rollout.hf import SeededGumbel
    from lightning_prerl.scale.models import load_policy, load_tokenizer

    policy, tokenizer = load_policy("toy").eval(), load_tokenizer("toy")
    engine = HFEngine(tokenizer)
    engine.sync(policy)
    prompts = [render_prompt(tokenizer, p) for p in toy_prompts("heldout", 4)]
    ids, mask = pad_left([p for p in prompts for _ in range(3)], tokenizer.pad_token_id)
    stop = {tokenizer.eos_token_id}
    settings = [dict(temperature=1.0), dict(temperature=0.0), dict(temperature=0.7, top_k=5)]
    for sampling in [SamplingConfig(max_new_tokens=80, **kw) for kw in settings]:
        gen = engine.generate(prompts, 3, sampling, seeds=[11, 12, 13, 14])
        noise = SeededGumbel([derive_seed(s, j) for s in (11, 12, 13, 14) for j in range(3)], sampling, "cpu")
        config = GenerationConfig(max_new_tokens=80, do_sample=False, eos_token_id=[tokenizer.eos_token_id],
                                  pad_token_id=tokenizer.pad_token_id)  # fmt: skip
        processors = LogitsProcessorList([noise] if sampling.temperature else [])
        out = policy.generate(input_ids=ids, attention_mask=mask, logits_processor=processors, generation_config=config)
        expected = [cut_at_eos(row, stop, tokenizer.pad_token_id) for row in out[:, ids.shape[1] :].tolist()]
        assert gen.completions == expected, sampling
        assert len({len(c) for c in gen.completions}) > 1  # rows finished at different steps


def _on_rank(dm: RolloutDataModule, rank: int, world: int) -> RolloutDataModule:
    dm.trainer = SimpleNamespace(**{**vars(dm.trainer), "global_rank": rank, "world_size": world})
    return dm


def test_global_batch_is_split_over_ranks_with_the_same_samples(tiny_model_dir, tokenizer):
    """prompts_per_step is global: 2 ranks draw the 1-process batch's prompts, in halves, and the
    seeded engine gives them the same completions (a sample depends on its prompt's seed only)."""
    import pytest

    from lightning_prerl.scale.models import load_policy

    policy = load_policy(str(tiny_model_dir))
    whole = make_datamodule(tokenizer, policy, prompts_per_step=4).train_batch(1)
    halves = [_on_rank(make_datamodule(tokenizer, policy, prompts_per_step=4), r, 2).train_batch(1) for r in (0, 1)]
    assert whole.texts == halves[0].texts + halves[1].texts
    assert torch.equal(whole.rewards, torch.cat([h.rewards for h in halves]))
    assert len(set(whole.texts)) > 1  # sampled, not greedy
    with pytest.raises(ValueError, match="prompts_per_step=3 does not divide by the world size 2"):
        _on_rank(make_datamodule(tokenizer, policy), 0, 2).setup("fit")


def test_every_held_out_prompt_is_scored_once_over_uneven_shards(tiny_model_dir, tokenizer):
    from lightning_prerl.scale.models import load_policy

    policy = load_policy(str(tiny_model_dir))
    world, seen, calls = 4, [], set()
    for rank in range(world):  # 6 held-out prompts over 4 ranks: shards of 2, 2, 1 (+1 repeat), 1 (+1 repeat)
        dm = _on_rank(make_datamodule(tokenizer, policy), rank, world)
        batches = list(dm.val_dataloader())
        calls.add(len(batches))
        for b in batches:
            assert len(b) == 2 * 2  # same shard length on every rank: the same generate calls
            real = len(b) // b.group_size - b.padding_prompts
            seen += b.texts[: real * b.group_size : b.group_size]
    assert calls == {1}
    assert len(seen) == 6


def test_reward_pool_takes_this_ranks_share_of_the_node(tokenizer, monkeypatch):
    """Lightning's launcher sets no LOCAL_WORLD_SIZE (launchers/subprocess_script.py): the pool size
    comes from the trainer's devices, so 2 ranks on an 8-core node start 4 reward processes each, not 8."""
    import lightning as L

    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(8)))
    dm = make_datamodule(tokenizer, None, prompts_per_step=4, reward_timeout_s=5.0)
    assert dm.scorer.workers == 8  # no trainer yet: the whole machine
    dm.trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False)
    dm.setup("fit")
    assert dm.scorer.workers == 4


def test_the_engine_is_synced_once_per_optimizer_step(tiny_model_dir, tokenizer):
    """Weights change only at optimizer steps: the engine takes the policy before the first batch of every
    step (training or held-out) and not again within a step. Catches a data module that syncs only once
    (the vLLM tests could not see it: their engine started from the same weights)."""
    from lightning_prerl.scale.models import load_policy

    class Counting(HFEngine):
        syncs: list[int] = []

        def sync(self, policy):
            Counting.syncs.append(dm.trainer.global_step)
            super().sync(policy)

    dm = make_datamodule(tokenizer, load_policy(str(tiny_model_dir)))
    dm._engine_arg = Counting
    for step in (0, 0, 1, 2):
        dm.trainer.global_step = step
        dm.train_batch(step)
    next(iter(dm.val_dataloader()))  # held-out batch at step 2: same weights, no sync
    dm.trainer.global_step = 3
    next(iter(dm.val_dataloader()))
    assert Counting.syncs == [0, 1, 2, 3]


def test_engine_logprobs_reach_the_training_batch(tiny_model_dir, tokenizer):
    """`rollout.return_logprobs`: the engine's log-probs of its own samples travel in the training batch
    (aligned with the response tokens, 0 on padding) and equal the policy's at temperature 1; the
    rollout correction reads them. Catches them dropped in `make_batch` (found by `make mutation`)."""
    from functools import partial

    from lightning_prerl.scale.models import load_policy
    from lightning_prerl.training.logprobs import sequence_logprobs

    policy = load_policy(str(tiny_model_dir))
    dm = make_datamodule(tokenizer, policy, sampling={"max_new_tokens": 12, "temperature": 1.0})
    dm._engine_arg = partial(HFEngine, return_logprobs=True)
    batch = dm.train_batch(0)
    assert batch.rollout_logprobs is not None and batch.rollout_logprobs.shape == batch.response_ids.shape
    assert bool((batch.rollout_logprobs[batch.response_mask == 0] == 0).all())
    with torch.no_grad():
        logp, _ = sequence_logprobs(policy, batch, "conditional", 0)  # (N, T)
    real = batch.response_mask.bool()
    assert torch.allclose(batch.rollout_logprobs[real], logp[real], atol=1e-4)


def test_training_prompts_are_shuffled_by_their_own_seeds(tokenizer):
    """`shuffle_seed` orders the training stream, and dynamic sampling's extra prompts come from a second
    stream shuffled apart from it; None keeps file order. Catches either seed dropped (found by
    `make mutation`)."""
    file_order = make_datamodule(tokenizer, None, shuffle_seed=None)
    seeded = make_datamodule(tokenizer, None, shuffle_seed=0)
    for dm in (file_order, seeded):
        dm._load_prompts()
    questions = lambda s: [p.question for p in s.take(0, 20)]  # noqa: E731
    assert questions(file_order.train_set) == [p.question for p in toy_prompts("train", 50)[:20]]
    assert questions(seeded.train_set) != questions(file_order.train_set)
    assert questions(seeded.extra_set) not in (questions(seeded.train_set), questions(file_order.train_set))


# -- a recording stand-in engine: exact prompts, seeds, flags and samples ----------------------
class RecordingEngine:
    """A stand-in engine: `samples(call, prompt, j)` is sample j of a prompt in generate call `call`;
    every sync and every generate call (prompt ids, n, the log-prob flag, seeds) is recorded. It has
    no `return_logprobs` attribute (an engine that never returns log-probs)."""

    stop_token_ids = [3]  # the toy tokenizer's <|im_end|>

    def __init__(self, samples=lambda call, prompt, j: [7] * (1 + j) + [3]):
        self.samples, self.calls, self.syncs = samples, [], []

    def sync(self, policy) -> None:
        self.syncs.append(policy)

    def generate(self, prompt_ids, n, sampling, return_logprobs=False, seeds=None):
        from lightning_prerl.rollout.engine import Generation

        call = len(self.calls)
        self.calls.append(SimpleNamespace(prompts=prompt_ids, n=n, logprobs=return_logprobs, seeds=seeds))
        completions = [self.samples(call, i, j) for i in range(len(prompt_ids)) for j in range(n)]
        return Generation(completions, [[-0.25] * len(c) for c in completions] if return_logprobs else None)

    def close(self) -> None:
        pass


class LogprobEngine(RecordingEngine):
    return_logprobs = True  # `rollout.return_logprobs`: the engine returns its sampling log-probs


class TokenizerProxy:
    """The toy tokenizer with another pad id, recording the extra chat-template arguments."""

    def __init__(self, tokenizer, pad_token_id: int | None = None):
        self._tok, self.template_kwargs = tokenizer, []
        self.pad_token_id = tokenizer.pad_token_id if pad_token_id is None else pad_token_id

    def apply_chat_template(self, messages, **kwargs):
        self.template_kwargs.append({k: v for k, v in kwargs.items() if k not in ("add_generation_prompt", "tokenize")})
        return self._tok.apply_chat_template(messages, **kwargs)

    def __call__(self, *args, **kwargs):
        return self._tok(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._tok, name)


def recording_datamodule(tokenizer, engine, rank: int = 0, world: int = 1, step: int = 0, reward=None, **kwargs):
    """4 prompts per step, G = 2, 6 held-out prompts, 4 per batch; seeds and shuffle seed left at their defaults."""
    dm = RolloutDataModule(
        tokenizer,
        engine,
        reward or BoxedExactMatch(),
        toy_prompts("train", 50),
        toy_prompts("heldout", 6),
        **{"prompts_per_step": 4, "samples_per_prompt": 2, "eval_samples": 2, "eval_prompts_per_batch": 4, **kwargs},
    )
    dm.trainer = SimpleNamespace(
        lightning_module=SimpleNamespace(policy="the policy"),
        global_rank=rank,
        world_size=world,
        global_step=step,
        current_epoch=0,
    )
    return dm


def test_batches_hold_exactly_what_the_engine_was_asked_for_and_returned(tokenizer):
    """Rank 1 of 2, epoch 1: the engine (an instance, used as it is) is synced once and asked for the
    rank's slice of the epoch's prompts (stream positions 6, 7) with seeds derive_seed(0, "train", 0,
    position), no log-probs from an engine that has none; the batch holds its samples decoded without
    special tokens, the prompts' sources, answer flags and no lockstep padding; overlong masking counts
    over both ranks. Held-out batch at step 5: this rank's prompts 1, 3, 5 with seeds derive_seed(0,
    "eval", 5, index), its stats named as the logs and reports read them. Catches: the engine instance
    called as a factory, the log-prob flag or seeds changed, a default seed other than 0, padding or
    lists lost, special tokens left in the scored text, the world size left out of the overlong stats
    (found by `make mutation`)."""
    from lightning_prerl.data.prompts import render_prompt
    from lightning_prerl.rollout.engine import derive_seed

    engine = RecordingEngine(lambda call, i, j: [7] * (1 + j) + ([3] if j == 0 else []))  # sample 1: truncated
    dm = recording_datamodule(tokenizer, engine, rank=1, world=2, overlong="mask")
    dm.setup("fit")
    assert dm.engine is None and dm._get_engine() is engine
    batch = dm.train_batch(1)
    (call,) = engine.calls
    prompts = dm.train_set.take(6, 2)  # epoch 1 owns positions 4..7, rank 1 of 2 the second half
    assert call.prompts == [render_prompt(tokenizer, p) for p in prompts] and call.n == 2
    assert call.logprobs is False and engine.syncs == ["the policy"]
    assert call.seeds == [derive_seed(0, "train", 0, pos) for pos in (6, 7)]
    completions = [[7, 3], [7, 7]] * 2
    assert batch.response_ids.tolist() == [[7, 3], [7, 7]] * 2 and batch.response_mask.sum().item() == 8
    assert batch.texts == tokenizer.batch_decode(completions, skip_special_tokens=True)
    assert not any("<|im_end|>" in t for t in batch.texts)
    assert batch.sources == ["toy/train"] * 4 and batch.has_answer == [False] * 4
    assert batch.padding_prompts == 0 and batch.rollout_logprobs is None and batch.rewards.dtype == torch.float32
    assert batch.sample_mask.tolist() == [True, False] * 2
    assert batch.stats["rollout/truncated"] == 0.5 and batch.stats["rollout/overlong_masked"] == 2 * 2  # 2 ranks

    dm.trainer.global_step = 5
    held_out = dm.eval_batch(0)
    call = engine.calls[-1]
    assert call.prompts == [render_prompt(tokenizer, dm.eval_prompts[j]) for j in (1, 3, 5)]
    assert call.seeds == [derive_seed(0, "eval", 5, j) for j in (1, 3, 5)] and call.logprobs is False
    assert held_out.padding_prompts == 0 and held_out.sources == ["toy/heldout"] * 6
    stats = held_out.stats
    assert set(stats) == {"rollout/reward_errors", "rollout/reward_timeouts", "rollout/dropped_prompts",
                          "rollout/truncated", "rollout/oom_splits",
                          "time/sync", "time/generate", "time/score"}  # fmt: skip
    assert stats["rollout/oom_splits"] == 0  # no decoding call ran out of memory
    assert (stats["rollout/reward_errors"], stats["rollout/reward_timeouts"], stats["rollout/truncated"]) == (0, 0, 0.5)
    assert all(0 <= stats[k] < 60 for k in ("time/sync", "time/generate", "time/score"))  # durations, not sums


def test_sampling_seed_and_engine_logprobs_reach_generation(tokenizer):
    """`sampling.seed` overrides the data module's seed; an engine with `return_logprobs` is asked for
    log-probs on training batches only (they land in `rollout_logprobs`, 0 on padding). Catches the
    sampling seed ignored and the flag forced on for held-out batches or for engines without it (found
    by `make mutation`)."""
    from lightning_prerl.rollout.engine import derive_seed

    engine = LogprobEngine()
    dm = recording_datamodule(tokenizer, engine, sampling={"seed": 7, "max_new_tokens": 8})
    batch = dm.train_batch(0)
    assert engine.calls[0].logprobs is True
    assert engine.calls[0].seeds == [derive_seed(7, "train", 0, pos) for pos in range(4)]
    n = len(batch) // 4  # each prompt's seed on every one of its samples (what a rollout record keeps)
    assert batch.seeds == [derive_seed(7, "train", 0, pos) for pos in range(4) for _ in range(n)]
    assert batch.rollout_logprobs.tolist() == [[-0.25, -0.25, 0.0], [-0.25, -0.25, -0.25]] * 4
    dm.eval_batch(0)
    assert engine.calls[1].logprobs is False
    assert engine.calls[1].seeds == [derive_seed(7, "eval", 0, j) for j in range(4)]


def _flag_then_hash(prompt, completion: str) -> float:
    return float("#" in completion)


def test_dynamic_sampling_extra_rounds_draw_their_own_prompts_seeds_and_pad_id(tokenizer):
    """An extra round takes the extra stream's block for (epoch, round) from its first position, with
    seeds derive_seed(0, "train_extra", 0, position); the extra stream is shuffled by derive_seed(
    shuffle_seed, "train_extra"), the main one by `shuffle_seed` (default 0); kept groups of rounds of
    different widths are padded with the tokenizer's pad id. Catches: the block read from its second
    position, the purpose or step of the extra seeds changed, the extra stream's seed changed, padding
    with 0 instead of the pad id, and rank r's extra block placed before rank 0's (found by `make
    mutation`)."""
    from lightning_prerl.data.prompts import render_prompt
    from lightning_prerl.rollout.engine import derive_seed

    def samples(call: int, i: int, j: int) -> list[int]:  # main round: group 0 informative; extra: group 0, longer
        if i == 0:
            return [7 + j] * (1 if call == 0 else 4) + [3]
        return [7, 3]

    proxy = TokenizerProxy(tokenizer, pad_token_id=1)
    engine = RecordingEngine(samples)
    dm = recording_datamodule(
        proxy, engine, reward=_flag_then_hash, prompts_per_step=2, dynamic_sampling=True, max_extra_rounds=1
    )
    batch = dm.train_batch(0)
    assert len(engine.calls) == 2
    prompts = toy_prompts("train", 50)
    assert dm.train_set.take(0, 50) == PromptSet(prompts, 0).take(0, 50)
    assert dm.extra_set.take(0, 50) == PromptSet(prompts, derive_seed(0, "train_extra")).take(0, 50)
    assert engine.calls[1].prompts == [render_prompt(tokenizer, p) for p in dm.extra_set.take(0, 2)]
    assert engine.calls[1].seeds == [derive_seed(0, "train_extra", 0, pos) for pos in (0, 1)]
    assert batch.rewards.tolist() == [0.0, 1.0, 0.0, 1.0] and batch.sample_mask is None
    assert batch.response_ids.tolist() == [[7, 3, 1, 1, 1], [8, 3, 1, 1, 1], [7] * 4 + [3], [8] * 4 + [3]]
    assert bool((batch.prompt_ids[batch.prompt_mask == 0] == 1).all())
    rank1 = recording_datamodule(tokenizer, RecordingEngine(), rank=1, world=2, prompts_per_step=8)
    assert rank1.extra_positions(1, 2) == [44, 45, 46, 47]  # (epoch 1 x 4 rounds + 1) x 8 + rank 1 x 4


def test_any_rank_reduces_this_ranks_flag_with_max_on_the_strategy_device(tokenizer):
    """Dynamic sampling's lockstep: this rank's "short" flag, on the strategy's device (NCCL reduces
    device tensors only), max-reduced over ranks; True only when some rank is short. Catches the flag
    not sent, sent from the CPU, another reduce op, and `>= 0` (always True) (found by `make mutation`)."""
    seen = []

    def reduce(flag, reduce_op):
        seen.append((flag.device.type, reduce_op))
        return torch.tensor(0.0) if flag.is_meta else torch.maximum(flag, torch.tensor(0.0))  # others: not short

    dm = recording_datamodule(tokenizer, RecordingEngine(), world=2)
    dm.trainer.strategy = SimpleNamespace(root_device=torch.device("cpu"), reduce=reduce)
    assert dm._any_rank(True) is True and dm._any_rank(False) is False
    dm.trainer.strategy.root_device = torch.device("meta")
    dm._any_rank(True)
    assert seen == [("cpu", "max"), ("cpu", "max"), ("meta", "max")]


def test_held_out_shards_without_a_trainer_and_their_padding_rows(tokenizer):
    """No trainer: one process, rank 0 (the whole held-out set, the first extra block). Uneven shards
    are padded with repeats of the rank's own first prompt (generated, never scored), or prompt 0 when
    the rank has none. Catches the default rank or world changed and the padding prompt changed (found
    by `make mutation`)."""
    from lightning_prerl.data.prompts import render_prompt

    alone = recording_datamodule(tokenizer, RecordingEngine())
    alone.trainer = None
    assert alone._eval_shard() == ([0, 1, 2, 3, 4, 5], 0) and alone.extra_positions(0, 1) == [0, 1, 2, 3]
    engine = RecordingEngine()
    dm = recording_datamodule(tokenizer, engine, rank=3, world=4)  # 6 prompts: shards 2, 2, 1 + 1, 1 + 1
    assert dm._eval_shard() == ([3, 3], 1)
    held_out = dm.eval_batch(0)
    assert engine.calls[0].prompts == [render_prompt(tokenizer, dm.eval_prompts[3])] * 2
    assert held_out.padding_prompts == 1
    few = recording_datamodule(tokenizer, RecordingEngine(), rank=3, world=4)
    few.eval_prompts = toy_prompts("heldout", 2)
    assert few._eval_shard() == ([0], 1)  # no prompt of its own: it repeats prompt 0


def test_constructor_defaults_checks_and_reward_pool_settings(tokenizer):
    """The signature's defaults (benchmarks/objective_cost.py builds the module on them); every count
    may be 1 and `max_extra_rounds` 0, smaller values fail naming the key; the reward pool gets its
    timeout and worker count; no prompt counted as dropped before any filter; template arguments reach
    the chat template; the global batch must divide by world size x mini-batches. Catches changed
    defaults, off-by-one bounds, renamed keys in the messages, the pool settings or template arguments
    dropped, and `/` for `*` in the divisibility check (found by `make mutation`)."""
    import pytest

    prompts = toy_prompts("train", 8)
    dm = RolloutDataModule(tokenizer, RecordingEngine(), BoxedExactMatch(), prompts)
    got = (dm.prompts_per_step, dm.samples_per_prompt, dm.eval_samples, dm.eval_prompts_per_batch)
    assert got == (16, 8, 2, 100)
    assert (dm.shuffle_seed, dm.seed, dm.data_root, dm.name, dm.eval_prompts) == (0, 0, ".", "data", [])
    assert dm.dropped_prompts == {"train": 0, "eval": 0, "contaminated": 0}
    assert dm.scorer.timeout_s is None
    ones = dict(prompts_per_step=1, samples_per_prompt=1, eval_samples=1, eval_prompts_per_batch=1)
    RolloutDataModule(tokenizer, RecordingEngine(), BoxedExactMatch(), prompts, max_extra_rounds=0, **ones)
    for key in ones:
        with pytest.raises(ValueError, match=f"^data.{key}=0: must be >= 1$"):
            RolloutDataModule(tokenizer, RecordingEngine(), BoxedExactMatch(), prompts, **{key: 0})
    pooled = RolloutDataModule(tokenizer, RecordingEngine(), BoxedExactMatch(), prompts, reward_timeout_s=5.0,
                               reward_workers=3)  # fmt: skip
    assert (pooled.scorer.timeout_s, pooled.scorer.workers) == (5.0, 3)
    proxy = TokenizerProxy(tokenizer)
    thinking = recording_datamodule(proxy, RecordingEngine(), template_kwargs={"enable_thinking": False})
    thinking.setup("fit")
    assert thinking.dropped_prompts == {"train": 0, "eval": 0, "contaminated": 0}
    thinking.train_batch(0)
    assert proxy.template_kwargs and all(kw == {"enable_thinking": False} for kw in proxy.template_kwargs)
    with pytest.raises(ValueError, match="=3 does not divide by the world size 1 x module.mini_batches=2"):
        recording_datamodule(tokenizer, RecordingEngine(), prompts_per_step=3, mini_batches=2).setup("fit")


def test_length_filter_counts_and_logs_each_split(tokenizer, caplog):
    """Over-long prompts are dropped per split at load time, counted under their split and logged once
    with the counts and the limit. Catches the held-out split counted under another key and the log
    line broken or missing an argument (found by `make mutation`)."""
    import logging

    from lightning_prerl.data.prompts import render_prompt

    held_out = [len(render_prompt(tokenizer, p)) for p in toy_prompts("heldout", 6)]
    train = [len(render_prompt(tokenizer, p)) for p in toy_prompts("train", 50)]
    limit = sorted(held_out)[3]
    drop_train, drop_eval = sum(n > limit for n in train), sum(n > limit for n in held_out)
    assert 0 < drop_train < 50 and 0 < drop_eval < 6
    dm = recording_datamodule(tokenizer, RecordingEngine(), max_prompt_tokens=limit)
    with caplog.at_level(logging.INFO, logger="lightning_prerl.training.datamodule"):
        dm.setup("fit")
    assert dm.dropped_prompts == {"train": drop_train, "eval": drop_eval, "contaminated": 0}
    assert len(dm.eval_prompts) == 6 - drop_eval
    messages = [r.getMessage() for r in caplog.records if r.name == "lightning_prerl.training.datamodule"]
    assert messages == [
        f"data: {drop_train} of 50 train prompts are longer than data.max_prompt_tokens={limit} and are dropped",
        f"data: {drop_eval} of 6 eval prompts are longer than data.max_prompt_tokens={limit} and are dropped",
    ]
