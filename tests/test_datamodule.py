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
    from lightning_prerl.training.update import sequence_logprobs

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
    from lightning_prerl.training.update import sequence_logprobs

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
