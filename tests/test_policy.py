"""Policy module: log-prob construction, micro-batch invariance, no reference at KL 0."""

from __future__ import annotations

import pytest
import torch

from lightning_prerl.data.batch import RolloutBatch
from lightning_prerl.objectives import PolicyGradientObjective
from lightning_prerl.training.logprobs import sequence_logprobs
from lightning_prerl.training.policy import CondRL, PolicyModule
from lightning_prerl.training.update import MicroBatching, backward_objective


def make_batch(tokenizer, rewards=(1.0, 0.0, 0.0, 1.0), group_size=2) -> RolloutBatch:
    """2 prompts x 2 samples with responses of different lengths (EOS = <|im_end|> ends three)."""
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    enc = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    prompts = [
        enc("<|im_start|>user\nCompute 1+2<|im_end|>\n<|im_start|>assistant\n"),
        enc("<|im_start|>user\nCompute 10-3<|im_end|>\n<|im_start|>assistant\n"),
    ]
    responses = [enc("1+2=3.") + [eos], enc("1+2=4") + [eos], enc("10-3=7.") + [eos], enc("10-3=")]
    p_rows = [prompts[0], prompts[0], prompts[1], prompts[1]]
    pw, rw = max(map(len, p_rows)), max(map(len, responses))
    prompt_ids = torch.full((4, pw), pad)
    prompt_mask = torch.zeros((4, pw), dtype=torch.long)
    response_ids = torch.full((4, rw), pad)
    response_mask = torch.zeros((4, rw), dtype=torch.long)
    for i, (p, r) in enumerate(zip(p_rows, responses, strict=True)):
        prompt_ids[i, pw - len(p) :], prompt_mask[i, pw - len(p) :] = torch.tensor(p), 1
        response_ids[i, : len(r)], response_mask[i, : len(r)] = torch.tensor(r), 1
    return RolloutBatch(
        prompt_ids,
        prompt_mask,
        response_ids,
        response_mask,
        torch.tensor(rewards),
        group_size,
        texts=[""] * 4,
        has_answer=[True] * 4,
    )


def quiet_cpu_trainer(**kwargs):
    """A one-process CPU Trainer for in-process fits: no logger, checkpoints, progress bar or summary, and
    no inference mode (metric states outlive validation). `kwargs` add or override Trainer arguments."""
    import lightning as L

    quiet = dict(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False)
    quiet.update(enable_model_summary=False, inference_mode=False)
    return L.Trainer(**{**quiet, **kwargs})


def test_marginal_logprobs_drop_the_prompt_restart_positions_and_score_eos(policy, tokenizer):
    batch = make_batch(tokenizer)
    start = tokenizer.convert_tokens_to_ids("<|im_start|>")
    logp, _ = sequence_logprobs(policy, batch, "marginal", start)
    # by hand for sample 0: the sequence is [start] + response, positions 0.., no prompt anywhere
    resp = batch.response_ids[0, : batch.response_mask[0].sum()]
    ids = torch.cat([torch.tensor([start]), resp])[None]
    logits = policy(input_ids=ids, position_ids=torch.arange(len(ids[0]))[None]).logits[0, :-1]
    expected = logits.log_softmax(-1).gather(-1, resp[:, None]).squeeze(-1)
    assert torch.allclose(logp[0, : len(resp)], expected, atol=1e-5)
    assert resp[-1].item() == tokenizer.eos_token_id  # the EOS token is scored, inside the mask
    # the prompt changes the conditional log-probs but not the prompt-free ones
    cond, _ = sequence_logprobs(policy, batch, "conditional", start)
    assert not torch.allclose(cond[0, : len(resp)], expected, atol=1e-3)


@pytest.mark.parametrize("share_prompts", [False, True])
def test_conditional_logprobs_match_an_unpadded_forward(policy, tokenizer, share_prompts):
    """Also when the 2 samples of each prompt share one forward of it (its keys and values)."""
    batch = make_batch(tokenizer)
    rows = []
    handle = policy.register_forward_pre_hook(lambda m, a, kw: rows.append(kw["input_ids"].shape), with_kwargs=True)
    try:
        logp, _ = sequence_logprobs(policy, batch, "conditional", 0, share_prompts=share_prompts)
    finally:
        handle.remove()
    p, t = batch.prompt_ids.shape[1], batch.response_ids.shape[1]
    assert rows == ([(2, p), (4, t)] if share_prompts else [(4, p + t)])  # distinct prompts once, then responses
    for i in range(4):
        p = batch.prompt_ids[i][batch.prompt_mask[i].bool()]
        r = batch.response_ids[i][batch.response_mask[i].bool()]
        logits = policy(input_ids=torch.cat([p, r])[None]).logits[0, len(p) - 1 : -1]
        expected = logits.log_softmax(-1).gather(-1, r[:, None]).squeeze(-1)
        assert torch.allclose(logp[i, : len(r)], expected, atol=1e-4), i


def test_shared_prompt_passes_are_two_forward_calls_whatever_the_rows_hold(policy, tokenizer):
    """Sharded ranks gather parameters in every forward call: the call count must not depend on whether
    a rank's rows repeat a prompt (a data-dependent count hung 2 FSDP2 ranks)."""
    batch = make_batch(tokenizer)
    calls = []
    handle = policy.register_forward_pre_hook(lambda m, a, kw: calls.append(kw["input_ids"].shape[0]), with_kwargs=True)
    try:
        for rows in ([0, 1], [0, 2], [3]):  # one prompt twice; two distinct prompts; a single row
            sequence_logprobs(policy, batch.select(torch.tensor(rows)), "conditional", 0, share_prompts=True)
    finally:
        handle.remove()
    assert calls == [1, 2, 2, 2, 1, 1]  # (distinct prompts, rows) per pass


@pytest.mark.parametrize("space", ["conditional", "marginal"])
def test_gradient_does_not_depend_on_micro_batch_size(policy, tokenizer, space):
    obj = PolicyGradientObjective(space=space, advantage="group_mean")
    batch = make_batch(tokenizer)
    start = tokenizer.convert_tokens_to_ids("<|im_start|>")
    grads = []
    longest = int((batch.prompt_mask.sum(1) + batch.response_mask.sum(1)).max())
    # whole batch, every row with its own prompt forward or sharing them; 1 and 3 rows; a token budget
    # of ~2 rows; tiny output-head chunks
    for micro in (
        MicroBatching(share_prompts=False),
        MicroBatching(),
        MicroBatching(size=1),
        MicroBatching(size=3),
        MicroBatching(max_tokens=2 * longest),
        MicroBatching(size=2, chunk_tokens=5),
    ):
        policy.zero_grad()
        result = backward_objective(obj, policy, batch, start, micro=micro)
        grads.append(torch.cat([p.grad.flatten() for p in policy.parameters()]))
        assert result.kept_tokens.item() == batch.response_mask.sum().item()
    assert grads[0].abs().sum() > 0
    for g in grads[1:]:
        assert torch.allclose(g, grads[0], atol=1e-6, rtol=1e-4)


def test_no_reference_model_at_kl_zero(tiny_model_dir):
    module = CondRL(model_path=str(tiny_model_dir))
    module.configure_model()
    assert module.reference is None
    assert not any(k.startswith("reference.") for k in module.state_dict())
    with_kl = PolicyModule(PolicyGradientObjective(kl_coef=0.1), model_path=str(tiny_model_dir))
    with_kl.configure_model()
    assert with_kl.reference is not None
    assert not any(p.requires_grad for p in with_kl.reference.parameters())


def test_kl_term_enters_the_loss(policy, tokenizer, tiny_model_dir):
    from lightning_prerl.scale.models import load_policy

    reference = load_policy(str(tiny_model_dir))
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(0.05 * torch.randn_like(p))
    batch = make_batch(tokenizer, rewards=(1.0, 1.0, 0.0, 0.0))  # all advantages 0: only KL remains
    obj = PolicyGradientObjective(kl_coef=1.0, kl_estimator="k1")
    result = backward_objective(obj, policy, batch, 0, reference=reference)
    logp, _ = sequence_logprobs(policy, batch, "conditional", 0)
    ref, _ = sequence_logprobs(reference, batch, "conditional", 0)
    mask = batch.response_mask.float()
    expected = ((logp - ref) * mask).sum() / mask.sum()
    assert result.loss.item() == pytest.approx(expected.item(), rel=1e-4)


def test_final_hidden_states_are_the_normed_ones_the_head_reads(tiny_model_dir):
    """The log-prob path takes `hidden_states[-1]` of the model's own forward as the head's input; for
    Qwen3 (the toy) and Llama (SmolLM2's architecture) that is the final-norm output."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from lightning_prerl.scale.models import load_policy
    from lightning_prerl.training.logprobs import final_hidden_states, output_head_weight

    llama = LlamaForCausalLM(
        LlamaConfig(vocab_size=120, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    )
    for model in (load_policy(str(tiny_model_dir)), llama):
        ids = torch.randint(3, 100, (2, 9))
        attn, pos = torch.ones_like(ids), torch.arange(9).expand(2, -1)
        hidden = final_hidden_states(model, ids, attn, pos, keep=4)  # (2, 4, H)
        logits = model(input_ids=ids, attention_mask=attn, position_ids=pos).logits[:, -4:]  # (2, 4, V)
        assert torch.allclose(hidden @ output_head_weight(model).T, logits, atol=1e-5)


def _length_parity(prompt, completion: str) -> float:
    return float(len(completion) % 2 == 0)


@pytest.mark.parametrize(("param_dtype", "low", "high"), [("float32", 0.99, 1.0), ("bfloat16", 0.0, 0.2)])
def test_one_adamw_step_at_lr_1e6_moves_the_weights_only_with_fp32_masters(tiny_model_dir, param_dtype, low, high):
    """bf16 compute over float32 master weights (Lightning bf16-mixed): one AdamW step at lr 1e-6 changes
    >= 99 % of the weights. Pure bf16 weights (asked for explicitly) lose most of that step in rounding."""
    import warnings

    import lightning as L

    from lightning_prerl.config.checks import _precision
    from lightning_prerl.data.prompts import toy_prompts
    from lightning_prerl.rollout.hf import HFEngine
    from lightning_prerl.training.datamodule import RolloutDataModule

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the pure-bf16 warning is the point of the second case
        module = CondRL(model_path=str(tiny_model_dir), dtype="bfloat16", param_dtype=param_dtype, lr=1e-6)
    module.hparams.weight_decay = 0.0  # only the gradient step moves the weights
    dm = RolloutDataModule(
        module.tokenizer, HFEngine, _length_parity, toy_prompts("train", 16), None, 4, 4, {"max_new_tokens": 16}
    )
    trainer = L.Trainer(
        accelerator="cpu",
        precision=_precision("bfloat16", param_dtype),
        max_steps=1,
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        inference_mode=False,
    )
    module.configure_model()
    before = {k: v.detach().clone() for k, v in module.policy.state_dict().items()}
    trainer.fit(module, datamodule=dm)
    assert all(p.dtype == getattr(torch, param_dtype) for p in module.policy.parameters())
    after = module.policy.state_dict()
    changed = sum(int((after[k] != before[k]).sum()) for k in before)
    total = sum(v.numel() for v in before.values())
    assert low <= changed / total <= high, changed / total


def test_gradient_clipping_applies_to_the_update_as_torch_clip_grad_norm(tiny_model_dir):
    """One real CPU step with `max_grad_norm` far below the toy's gradient norms (0.2-0.5, so no end-to-end
    run ever clips): the weights after the step equal torch AdamW applied to the step's raw gradients after
    `torch.nn.utils.clip_grad_norm_`. Catches the clipping removed from `PolicyModule._update` (the update
    is then AdamW on unclipped gradients, and eps makes that visible) or applied with another norm."""
    import lightning as L

    from lightning_prerl.data.prompts import toy_prompts
    from lightning_prerl.rollout.hf import HFEngine
    from lightning_prerl.training.datamodule import RolloutDataModule

    max_norm, lr = 1e-5, 1e-3
    module = CondRL(model_path=str(tiny_model_dir), lr=lr, max_grad_norm=max_norm)
    names = lambda: dict(module.policy.named_parameters())  # noqa: E731
    seen = {}

    class Capture(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen["before"] = {n: p.detach().clone() for n, p in names().items()}

        def on_after_backward(self, trainer, pl_module):  # after each micro-batch: the last holds the sum
            seen["grads"] = {n: p.grad.detach().clone() for n, p in names().items() if p.grad is not None}

    prompts = toy_prompts("train", 16)
    dm = RolloutDataModule(module.tokenizer, HFEngine, _length_parity, prompts, None, 4, 4, {"max_new_tokens": 16})
    trainer = quiet_cpu_trainer(callbacks=[Capture()], max_steps=1)
    trainer.fit(module, datamodule=dm)
    params = {n: seen["before"][n].clone().requires_grad_() for n in seen["grads"]}
    for n, p in params.items():
        p.grad = seen["grads"][n].clone()
    raw = torch.nn.utils.clip_grad_norm_(list(params.values()), max_norm)
    assert raw > 100 * max_norm  # the clip is active
    hp = module.hparams
    torch.optim.AdamW(params.values(), lr=lr, betas=tuple(hp.betas), weight_decay=hp.weight_decay).step()
    after = names()
    for n, p in params.items():
        assert torch.allclose(after[n].detach(), p.detach(), atol=1e-7, rtol=0), n


def test_validation_step_never_scores_lockstep_padding_rows(tiny_model_dir, tokenizer):
    """`validation_step` itself (not a re-implementation of its slicing): the last prompt of an uneven
    evaluation shard is padding (`padding_prompts=1`), generated for rank lockstep; its rows are all
    correct here and must not lift accuracy, pass@k or the per-benchmark counts. Catches the slice
    removed, or cut by prompts instead of rows."""
    import dataclasses
    from types import SimpleNamespace

    module = CondRL(model_path=str(tiny_model_dir), pass_k=[1, 2])
    module._trainer = SimpleNamespace(world_size=1, datamodule=None)  # what validation_step reads of it
    real = make_batch(tokenizer, rewards=(1.0, 0.0, 0.0, 0.0))  # 2 real prompts x 2: accuracy 1/4, pass@2 1/2
    pad = make_batch(tokenizer, rewards=(1.0, 1.0, 1.0, 1.0))
    both = {f.name: getattr(real, f.name) for f in dataclasses.fields(real) if f.type == "torch.Tensor"}
    for name in both:
        both[name] = torch.cat([both[name], getattr(pad, name)[:2]])  # + 1 padding prompt x 2 samples
    batch = dataclasses.replace(real, **both, texts=[""] * 6, has_answer=[True] * 6, padding_prompts=1)
    module.validation_step(batch, 0)
    values = module.val_metrics.compute()
    assert values["val/accuracy"] == pytest.approx(0.25)
    assert values["val/pass@2"] == pytest.approx(0.5)


# -- what `make mutation` found untested in the log-prob path ------------------------------------------
def test_the_scoring_forward_computes_no_logits_and_keeps_no_cache(policy, tokenizer):
    """Every pass of the log-prob path asks the model for zero logits (`logits_to_keep` empty: at 8 x
    8,192 tokens of Qwen3-4B the full logits are 40 GB) and builds no KV cache of its own (the shared
    prompt pass extends the one it is given). Catches `logits_to_keep` dropped or None and `use_cache`
    not tied to the cache argument (found by `make mutation`)."""
    batch = make_batch(tokenizer)
    outputs = []
    handle = policy.register_forward_hook(lambda m, a, out: outputs.append(out))
    try:
        for share in (False, True):
            sequence_logprobs(policy, batch, "conditional", 0, share_prompts=share)
        sequence_logprobs(policy, batch, "marginal", 5)
    finally:
        handle.remove()
    assert len(outputs) == 4  # unshared, prompt + responses, marginal
    assert [out.logits.shape[1] for out in outputs] == [0, 0, 0, 0]
    assert outputs[0].past_key_values is None and outputs[3].past_key_values is None
    assert outputs[1].past_key_values is not None  # the prompt pass fills the cache it was handed


def test_final_hidden_states_of_a_decoder_that_returns_a_plain_tuple():
    """A decoder (remote code, older models) may return a tuple: its first element is the hidden states.
    Catches that branch reading another element or the attribute of a ModelOutput (`make mutation`)."""
    from lightning_prerl.training.logprobs import final_hidden_states

    class Decoder(torch.nn.Module):
        def forward(self, x):
            return (2 * x, 3 * x)  # (hidden, something else)

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.decoder = torch.nn.Embedding(10, 4), Decoder()

        def get_decoder(self):
            return self.decoder

        def forward(self, input_ids, **kwargs):
            self.decoder(self.embed(input_ids))

    model, ids = Model(), torch.tensor([[1, 2, 3]])
    out = final_hidden_states(model, ids, torch.ones_like(ids), None, 2)
    assert torch.equal(out, 2 * model.embed(ids)[:, -2:])


def test_shared_prompts_fall_back_to_one_pass_under_gradient_checkpointing(policy, tokenizer):
    """Activation checkpointing drops the prompt pass's cache (transformers sets past_key_values=None in
    checkpointed layers: the responses would attend to no prompt, log-probs 0.4 off): with checkpointing
    on, `share_prompts` runs the one [prompt | response] pass, same log-probs and gradient. Catches the
    checkpointing test dropped or misspelled (found by `make mutation`)."""
    batch = make_batch(tokenizer)
    mask = batch.response_mask.float()
    ref, _ = sequence_logprobs(policy, batch, "conditional", 0, share_prompts=False)
    (ref * mask).sum().backward()
    ref_grads = [p.grad.clone() for p in policy.parameters()]
    policy.zero_grad(set_to_none=True)
    policy.gradient_checkpointing_enable()
    policy.train()
    logp, _ = sequence_logprobs(policy, batch, "conditional", 0, share_prompts=True)
    assert torch.allclose(logp * mask, ref * mask, atol=1e-5)
    (logp * mask).sum().backward()
    for p, g in zip(policy.parameters(), ref_grads, strict=True):
        assert torch.allclose(p.grad, g, atol=1e-5)


@pytest.mark.parametrize("share_prompts", [False, True])
def test_conditional_logprobs_of_an_absolute_position_model_match_an_unpadded_forward(tokenizer, share_prompts):
    """RoPE only sees relative positions, so a left-padded row's positions shifted by a constant leave the
    toy's log-probs unchanged; GPT-2's learned absolute positions do not forgive it. Catches positions
    that count the padding or start at 1 (found by `make mutation`)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_positions=128, n_embd=32, n_layer=2, n_head=2))
    model.eval()  # no dropout
    batch = make_batch(tokenizer)  # rows 0, 1 have one padding token before their prompt
    assert batch.prompt_mask.sum(1).tolist() != [batch.prompt_ids.shape[1]] * 4
    logp, _ = sequence_logprobs(model, batch, "conditional", 0, share_prompts=share_prompts)
    for i in range(4):
        p = batch.prompt_ids[i][batch.prompt_mask[i].bool()]
        r = batch.response_ids[i][batch.response_mask[i].bool()]
        logits = model(input_ids=torch.cat([p, r])[None]).logits[0, len(p) - 1 : -1]  # (T_i, V)
        expected = logits.log_softmax(-1).gather(-1, r[:, None]).squeeze(-1)
        assert torch.allclose(logp[i, : len(r)], expected, atol=1e-5), i


def test_the_head_refuses_softcapping_and_a_sharded_weight_and_reads_a_zero3_weight_through_its_call(
    policy, tokenizer, monkeypatch
):
    """Soft-capped logits (Gemma 2) and an FSDP2 head still sharded after forward would give wrong
    log-probs: both raise. A ZeRO-3 head (`ds_id`) is read inside its own call so DeepSpeed's hooks gather
    it; `chunk_tokens` reaches the head. Catches each check disabled or misspelled and the chunk size
    dropped (found by `make mutation`)."""
    import lightning_prerl.objectives.ops as ops
    import lightning_prerl.training.logprobs as logprobs

    batch = make_batch(tokenizer)
    ref, _ = sequence_logprobs(policy, batch, "conditional", 0)
    chunks, lce_options = [], ops.lce_options
    monkeypatch.setattr(ops, "lce_options", lambda rows, *a: (chunks.append(rows), lce_options(rows, *a))[1])
    sequence_logprobs(policy, batch, "conditional", 0, chunk_tokens=5)
    assert chunks == [5]
    weight = policy.get_output_embeddings().weight
    calls = []

    def own_call(module, fn):
        calls.append(module)
        return fn(module.weight)

    monkeypatch.setattr(logprobs, "through_own_call", own_call)
    weight.ds_id = 7
    logp, _ = sequence_logprobs(policy, batch, "conditional", 0)
    del weight.ds_id
    assert calls == [policy.get_output_embeddings()] and torch.equal(logp, ref)
    policy.config.final_logit_softcapping = 30.0
    with pytest.raises(ValueError) as err:
        sequence_logprobs(policy, batch, "conditional", 0)
    name = type(policy).__name__
    assert str(err.value) == f"{name} soft-caps its logits: chunked log-probs do not support it"
    policy.config.final_logit_softcapping = None
    weight.full_tensor = lambda: weight
    with pytest.raises(RuntimeError) as err:
        sequence_logprobs(policy, batch, "conditional", 0)
    expected = "the output head is sharded after forward: shard the root with reshard_after_forward=False"
    assert str(err.value) == expected  # the message names the setting that fixes it
