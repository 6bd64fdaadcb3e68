"""transformers engine: samples from the live policy module itself (no weight copy).

The fallback when vLLM is absent, and the reference the vLLM engine is tested against.

Sampling is exact temperature sampling done as Gumbel-max: greedy decoding over
`logits / T + Gumbel noise`, the noise of each sample drawn from its own generator seeded from
(prompt seed, sample index). A sample therefore depends on its prompt's seed alone, not on which
other prompts share the call, the rank, the world size or the run's history: the same run on 1 or 8
processes, or resumed from a checkpoint, draws the same completions.

Decoding is the engine's own loop over the model's forward with a transformers `DynamicCache`
(`decode`): a finished row leaves the batch and the cache at once, where `generate` computes it until
the longest row ends (same samples, about half the time on the toy batch). Sharded (FSDP2) policies
gather parameters in every forward, so their ranks must step together until all finish: they decode
with `generate(synced_gpus=True)` and the same noise, under a fresh `GenerationConfig` (`generate`'s
own defaults, top_k=50 or the checkpoint's repetition penalty, never apply).
"""

from __future__ import annotations

import contextlib

import torch
from transformers import DynamicCache, GenerationConfig, LogitsProcessor, LogitsProcessorList
from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

from lightning_prerl.data.batch import pad_left
from lightning_prerl.rollout.engine import Generation, SamplingConfig, cut_at_eos, derive_seed
from lightning_prerl.scale.models import DTYPES, free_memory, is_sharded


class SeededGumbel(LogitsProcessor):
    """Adds per-row Gumbel noise to `scores / T` (after top-k / top-p): greedy decoding then samples.

    Args:
        seeds: one generator seed per row of the `generate` call (rows = prompts x samples).
    """

    def __init__(self, seeds: list[int], sampling: SamplingConfig, device: torch.device):
        self.generators = [torch.Generator(device=device).manual_seed(s) for s in seeds]
        self.temperature = sampling.temperature
        self.warpers = [
            w
            for w in (
                TopKLogitsWarper(sampling.top_k) if sampling.top_k else None,
                TopPLogitsWarper(sampling.top_p) if sampling.top_p < 1 else None,
            )
            if w
        ]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        return self.noisy(scores, range(len(self.generators)))  # a `generate` call: every row

    def noisy(self, scores: torch.Tensor, rows) -> torch.Tensor:
        """`scores / T` (R, V) of the call's rows `rows`, warped, plus each row's own Gumbel noise."""
        scores = scores.float() / self.temperature  # (R, V)
        for warp in self.warpers:
            scores = warp(None, scores)  # top-k / top-p read only the scores
        uniform = torch.stack(
            [torch.rand(scores.shape[1], generator=self.generators[i], device=scores.device) for i in rows]
        )  # (R, V)
        gumbel = -torch.log(-torch.log(uniform.clamp(min=1e-20)))  # (R, V)
        return scores + gumbel


@torch.no_grad()
def decode(policy, ids, mask, max_new_tokens: int, stop: set[int], noise=None, logprob_temperature=None):
    """Greedy decoding of `policy` over its logits (or `noise.noisy(logits, rows)`: sampling), finished
    rows dropped from the batch and the cache. Returns each row's new tokens (up to and including its
    stop token) and, with a `logprob_temperature` T, the log-probs under softmax(logits / T) of the
    tokens it picked (else empty lists).

    Args:
        ids, mask: (R, P) left-padded prompts and their 0/1 mask.
    """
    r = ids.shape[0]
    pos = (mask.cumsum(1) - 1).clamp(min=0)  # (R, P)
    cache = DynamicCache(config=policy.config)
    out = policy(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True,
                 logits_to_keep=1)  # fmt: skip
    alive = torch.arange(r, device=ids.device)  # (A,) rows still decoding
    nxt = pos[:, -1:] + 1  # (A, 1) position of the next token
    tokens, logprobs = [[] for _ in range(r)], [[] for _ in range(r)]
    stop_ids = torch.tensor(sorted(stop), device=ids.device)
    for step in range(max_new_tokens):
        rows = alive.tolist()
        logits = out.logits[:, -1].float()  # (A, V)
        scores = logits if noise is None else noise.noisy(logits, rows)
        picked = scores.argmax(-1)  # (A,)
        for row, t in zip(rows, picked.tolist(), strict=True):
            tokens[row].append(t)
        if logprob_temperature is not None:
            chosen = (logits / logprob_temperature).log_softmax(-1).gather(-1, picked[:, None]).squeeze(-1)  # (A,)
            for row, lp in zip(rows, chosen.tolist(), strict=True):
                logprobs[row].append(lp)
        going = (~torch.isin(picked, stop_ids)).nonzero().squeeze(1)  # (A',)
        if len(going) == 0 or step == max_new_tokens - 1:
            break
        if len(going) < len(alive):
            cache.batch_select_indices(going)
            alive, picked, mask, nxt = alive[going], picked[going], mask[going], nxt[going]
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)  # (A, P + step + 1)
        out = policy(input_ids=picked[:, None], attention_mask=mask, position_ids=nxt, past_key_values=cache,
                     use_cache=True)  # fmt: skip
        nxt = nxt + 1
    return tokens, logprobs


class HFEngine:
    """Generates from the live policy (`decode`; sharded policies: `generate`) in calls of at most
    `max_batch_sequences` sequences.

    Args:
        tokenizer: the policy's tokenizer (EOS and padding ids).
        max_batch_sequences: prompts x samples per decoding call (bounds memory).
        stop_token_ids: every id that ends a completion (default: the tokenizer's EOS).
        dtype: compute dtype of generation; with float32 master weights and bf16 compute, the
            policy generates under autocast (FSDP2's mixed precision already casts).
        return_logprobs: hand training batches the sampling log-probs (off by default: a sharded
            policy's `generate` keeps every step's logits until the call ends, (rows, steps, V) float32).
    """

    def __init__(
        self,
        tokenizer,
        max_batch_sequences: int = 256,
        stop_token_ids: list[int] | None = None,
        dtype: str = "float32",
        return_logprobs: bool = False,
    ):
        self.return_logprobs = return_logprobs
        self.stop_token_ids = list(stop_token_ids or [tokenizer.eos_token_id])
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.max_batch_sequences = max_batch_sequences
        self.dtype = DTYPES[dtype]
        self.policy: torch.nn.Module | None = None
        self.oom_splits = 0  # decoding calls split in two after running out of memory

    def sync(self, policy: torch.nn.Module) -> None:
        self.policy = policy

    def close(self) -> None:
        self.policy = None

    def _autocast(self, device: torch.device):
        param_dtype = next(self.policy.parameters()).dtype
        if self.dtype == param_dtype or is_sharded(self.policy):
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=self.dtype)

    def _generate_in_lockstep(self, policy, ids, mask, noise, max_new_tokens: int, scale: float | None):
        """`generate(synced_gpus=True)`: every rank steps until all ranks' rows finish (FSDP2 gathers).
        Log-probs (with a `scale`) keep every step's logits until the call ends: (R, steps, V) float32."""
        config = GenerationConfig(
            max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=self.stop_token_ids,
            pad_token_id=self.pad_token_id, output_logits=scale is not None, return_dict_in_generate=True,
        )  # fmt: skip
        processors = LogitsProcessorList([noise] if noise is not None else [])
        # `generate` fills unset fields from `policy.generation_config`: swap in a blank one
        saved, policy.generation_config = policy.generation_config, GenerationConfig()
        try:
            out = policy.generate(
                input_ids=ids, attention_mask=mask, logits_processor=processors, generation_config=config,
                synced_gpus=True,
            )  # fmt: skip
        finally:
            policy.generation_config = saved
        new = out.sequences[:, ids.shape[1] :]  # (R, <= max_new_tokens)
        if scale is None:
            return new.tolist(), [[] for _ in range(len(new))]
        steps = (torch.stack(out.logits, dim=1).float() / scale).log_softmax(-1)  # (R, S, V)
        picked = steps.gather(-1, new[:, :, None]).squeeze(-1)  # (R, S)
        return new.tolist(), picked.tolist()

    @torch.no_grad()
    def generate(
        self,
        prompt_ids: list[list[int]],
        n: int,
        sampling: SamplingConfig,
        return_logprobs: bool = False,
        seeds: list[int] | None = None,
    ) -> Generation:
        """n completions per prompt; `seeds` (one per prompt) make each sample reproducible."""
        if self.policy is None:
            raise RuntimeError("HFEngine.generate called before sync(policy)")
        policy = self.policy
        was_training = policy.training
        policy.eval()
        device = next(policy.parameters()).device
        if seeds is None:  # unseeded: draw prompt seeds from the global torch generator
            seeds = torch.randint(0, 2**62, (len(prompt_ids),)).tolist()
        scale = None  # log-probs of softmax(logits / T), what training scores (before top-k / top-p)
        if return_logprobs:
            scale = sampling.temperature if sampling.temperature != 0 else 1.0
        try:
            completions, logprobs = self._decode_chunks(policy, prompt_ids, n, sampling, seeds, scale, device)
        finally:
            policy.train(was_training)
        return Generation(completions=completions, logprobs=logprobs)

    def _decode_chunks(self, policy, prompt_ids, n: int, sampling, seeds: list[int], scale, device):
        """Decoding in calls of at most `max_batch_sequences` rows (prompts repeated n times)."""
        per_call = max(1, self.max_batch_sequences // n)
        completions, logprobs = [], [] if scale is not None else None
        for start in range(0, len(prompt_ids), per_call):
            rows = [(i, j) for i in range(start, min(start + per_call, len(prompt_ids))) for j in range(n)]
            cut, lps = self._decode_rows(policy, prompt_ids, rows, sampling, seeds, scale, device)
            completions += cut
            if scale is not None:
                logprobs += lps
        return completions, logprobs

    def _decode_rows(self, policy, prompt_ids, rows: list[tuple[int, int]], sampling, seeds, scale, device):
        """One decoding call over `rows` (prompt, sample). A call that runs out of memory is split in two
        halves decoded in turn (counted in `oom_splits`): each row's noise comes from its own seed, so
        the samples are the same up to float rounding. Sharded policies decode in lockstep and cannot split."""
        stop = set(self.stop_token_ids)
        ids, mask = pad_left([prompt_ids[i] for i, _ in rows], self.pad_token_id)
        ids, mask = ids.to(device), mask.to(device)
        noise = None  # greedy decoding either way: sampling = greedy over logits / T + Gumbel noise
        if sampling.temperature != 0:
            noise = SeededGumbel([derive_seed(seeds[i], j) for i, j in rows], sampling, device)
        try:
            with self._autocast(device):
                if is_sharded(policy):
                    new, lps = self._generate_in_lockstep(policy, ids, mask, noise, sampling.max_new_tokens, scale)
                else:
                    new, lps = decode(policy, ids, mask, sampling.max_new_tokens, stop, noise, scale)
        except torch.OutOfMemoryError:
            if is_sharded(policy) or len(rows) == 1:
                raise
            new = None
        if new is None:  # out of the except block: the failed call's tensors are unreferenced
            del ids, mask, noise
            free_memory()
            self.oom_splits += 1
            half = len(rows) // 2
            first = self._decode_rows(policy, prompt_ids, rows[:half], sampling, seeds, scale, device)
            second = self._decode_rows(policy, prompt_ids, rows[half:], sampling, seeds, scale, device)
            return first[0] + second[0], (first[1] + second[1]) if scale is not None else None
        cut = [cut_at_eos(row, stop, self.pad_token_id) for row in new]
        return cut, [lp[: len(c)] for lp, c in zip(lps, cut, strict=True)] if scale is not None else None
