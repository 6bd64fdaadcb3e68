"""Out-of-memory backoff (training/oom.py): a micro-batch that runs out of memory in its forward or
backward drops the pass's gradients, halves the token budget and runs the pass again; the update equals
the one without the failure. The failure is injected as the real `torch.OutOfMemoryError`."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM

from lightning_prerl.errors import RunFault
from lightning_prerl.objectives import PolicyGradientObjective as PG
from lightning_prerl.training.oom import OOMBackoff, PassOutOfMemory, micro_batch_guard, padded_tokens
from lightning_prerl.training.update import MicroBatching, backward_objective
from tests.test_policy import make_batch


class FailingForward:
    """Makes the model's forward raise `torch.OutOfMemoryError` on the given calls (1-based)."""

    def __init__(self, model: torch.nn.Module, fail_on: set[int]):
        self.model, self.fail_on, self.calls = model, fail_on, 0
        self.clean = model.forward
        model.forward = self

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls in self.fail_on:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")
        return self.clean(*args, **kwargs)


def _policy(tiny_model_dir):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir)


def _grads(model) -> list[torch.Tensor]:
    return [p.grad.clone() for p in model.parameters() if p.grad is not None]


def _pass(model, batch, max_tokens, backward=lambda loss, last: loss.backward()):
    micro = MicroBatching(max_tokens=max_tokens, share_prompts=False)
    return backward_objective(PG(), model, batch, 0, 1.0, micro, backward=backward)


def _run(backoff, model, batch, configured, backward=lambda loss, last: loss.backward()):
    reset = lambda: model.zero_grad(set_to_none=True)  # noqa: E731
    attempt = lambda tokens: _pass(model, batch, tokens, backward)  # noqa: E731
    return backoff.run(attempt, configured, 7, reset)


def test_a_forward_out_of_memory_is_retried_with_half_the_tokens_and_the_update_is_unchanged(tokenizer, tiny_model_dir):
    batch = make_batch(tokenizer, rewards=(1.0, 0.0, 0.0, 1.0))
    model = _policy(tiny_model_dir)
    whole = padded_tokens(batch)  # one micro-batch of 4 rows fits the configured budget
    clean = _pass(model, batch, whole)
    expected = _grads(model)
    model.zero_grad(set_to_none=True)

    backoff = OOMBackoff(max_retries=3)
    FailingForward(model, fail_on={1})  # the first (only) micro-batch's forward
    result = _run(backoff, model, batch, whole)
    assert backoff.retries == 1 and backoff.max_tokens == whole // 2  # half the failed micro-batch
    assert backoff.budget(whole) == whole // 2 and backoff.budget(None) == whole // 2
    assert len(batch.micro_batches(None, whole // 2)) > 1  # the retry really cut the batch
    got = _grads(model)
    for g, e in zip(got, expected, strict=True):  # the same update up to the micro-batches' summation order
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-7)
    assert float(result.loss) == pytest.approx(float(clean.loss), rel=1e-5)
    assert float(result.kept_tokens) == float(clean.kept_tokens)


def test_a_backward_out_of_memory_drops_the_partial_gradients_before_the_retry(tokenizer, tiny_model_dir):
    """Backward fails after part of the pass accumulated: the retry starts from zero gradients
    (without the reset the first micro-batch would count twice)."""
    batch = make_batch(tokenizer, rewards=(1.0, 0.0, 0.0, 1.0))
    model = _policy(tiny_model_dir)
    budget = padded_tokens(batch) // 2  # two micro-batches
    _pass(model, batch, budget)
    expected = _grads(model)
    model.zero_grad(set_to_none=True)

    calls, stats = [], SimpleNamespace(passes=0)  # stats: what a pass adds to (the mismatch statistics)

    def backward(loss, last):  # the second micro-batch's backward accumulates, then runs out of memory
        calls.append(last)
        stats.passes += 1
        loss.backward()
        if len(calls) == 2:
            raise torch.OutOfMemoryError("CUDA out of memory (injected in backward)")

    backoff = OOMBackoff(max_retries=3)
    backoff.run(lambda tokens: _pass(model, batch, tokens, backward), budget, 0, model.zero_grad, keep=stats)
    assert backoff.retries == 1 and len(calls) > 2
    assert stats.passes == len(calls) - 2  # the failed pass's additions were put back
    for g, e in zip(_grads(model), expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-7)


def test_retries_stop_with_one_line_when_halving_cannot_help(tokenizer, tiny_model_dir):
    batch = make_batch(tokenizer)
    model = _policy(tiny_model_dir)
    FailingForward(model, fail_on=set(range(1, 100)))  # every forward fails
    backoff = OOMBackoff(max_retries=2)
    with pytest.raises(RunFault) as err:
        _run(backoff, model, batch, None)
    line = str(err.value)
    assert "\n" not in line and line.startswith("run stopped at step 7: out of memory in the forward")
    # 4 rows -> 2 -> 1: a single sample cannot be halved, whatever retries are left
    assert "one sample does not fit" in line and backoff.retries == 2
    assert all(p.grad is None for p in model.parameters())  # nothing of the failed passes is left

    backoff = OOMBackoff(max_retries=1)
    with pytest.raises(RunFault, match=r"after 1 halvings \(module.oom_retries\)"):
        _run(backoff, model, batch, None)

    def fails(tokens):
        raise PassOutOfMemory(100, 4, "forward", True)

    backoff = OOMBackoff(3)
    backoff.agree = lambda flag: 1  # this rank could retry, another could not: every rank stops
    with pytest.raises(RunFault, match="another rank could not retry"):
        backoff.run(fails, None, 0)
    backoff.lockstep = False  # sharded / DeepSpeed: a failed rank cannot rejoin the others
    with pytest.raises(RunFault, match="inside a collective"):
        backoff.run(fails, None, 0)


def test_the_guard_names_the_stage_and_ranks_agree_on_a_forward_failure(tokenizer):
    batch = make_batch(tokenizer)
    with pytest.raises(PassOutOfMemory) as err, micro_batch_guard(batch, "backward", world_size=2):
        raise torch.OutOfMemoryError("injected")
    assert (err.value.stage, err.value.rows, err.value.tokens) == ("backward", 4, padded_tokens(batch))
    assert not err.value.retriable  # under DDP the others wait in the gradient all-reduce
    # this rank's forward was fine, another rank's was not: every rank raises, and may retry
    with pytest.raises(PassOutOfMemory) as err, micro_batch_guard(batch, "forward", 2, agree=lambda flag: 1):
        pass
    assert err.value.retriable
    with micro_batch_guard(batch, "forward", 2, agree=lambda flag: flag):  # nobody failed: nothing raised
        pass


def test_generation_splits_a_call_that_runs_out_of_memory_and_draws_the_same_samples(tokenizer, tiny_model_dir):
    from lightning_prerl.rollout.engine import SamplingConfig
    from lightning_prerl.rollout.hf import HFEngine

    prompts = [tokenizer("<|im_start|>user\nCompute 1+2<|im_end|>\n<|im_start|>assistant\n")["input_ids"]] * 3
    sampling = SamplingConfig(temperature=1.0, max_new_tokens=12)
    model = _policy(tiny_model_dir)
    engine = HFEngine(tokenizer, return_logprobs=True)
    engine.sync(model)
    clean = engine.generate(prompts, 2, sampling, return_logprobs=True, seeds=[5, 6, 7])
    failing = FailingForward(model, fail_on={1})  # the prefill of the one call of 6 rows
    split = engine.generate(prompts, 2, sampling, return_logprobs=True, seeds=[5, 6, 7])
    assert engine.oom_splits == 1 and failing.calls > 1
    assert split.completions == clean.completions  # each row's noise comes from its own seed
    for a, b in zip(split.logprobs, clean.logprobs, strict=True):
        assert a == pytest.approx(b, abs=1e-5)
    FailingForward(model, fail_on=set(range(1, 1000)))  # one row that does not fit: raised as it is
    with pytest.raises(torch.OutOfMemoryError):
        engine.generate(prompts[:1], 1, sampling, seeds=[5])
