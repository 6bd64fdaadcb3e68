"""transformers `generate` engine: samples from the live policy module itself (no weight copy).

The fallback when vLLM is absent, and the reference the vLLM engine is tested against.

Sampling is exact temperature sampling done as Gumbel-max: `generate` runs greedy over
`logits / T + Gumbel noise`, the noise of each sample drawn from its own generator seeded from
(prompt seed, sample index). A sample therefore depends on its prompt's seed alone, not on which
other prompts share the `generate` call, the rank, the world size or the run's history: the same
run on 1 or 8 processes, or resumed from a checkpoint, draws the same completions. `generate`'s
own defaults (top_k=50, the checkpoint's repetition penalty, ...) never apply: the engine passes a
fresh `GenerationConfig`.
"""

from __future__ import annotations

import contextlib

import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList
from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

from lightning_prerl.batch import pad_left
from lightning_prerl.models import DTYPES, is_sharded
from lightning_prerl.rollout.engine import Generation, SamplingConfig, cut_at_eos, derive_seed


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
        scores = scores.float() / self.temperature  # (R, V)
        for warp in self.warpers:
            scores = warp(input_ids, scores)
        uniform = torch.stack(
            [torch.rand(scores.shape[1], generator=g, device=scores.device) for g in self.generators]
        )  # (R, V)
        gumbel = -torch.log(-torch.log(uniform.clamp(min=1e-20)))  # (R, V)
        return scores + gumbel


class HFEngine:
    """Generates with `policy.generate` in chunks of at most `max_batch_sequences` sequences.

    Args:
        tokenizer: the policy's tokenizer (EOS and padding ids).
        max_batch_sequences: prompts x samples per `generate` call (bounds memory).
        stop_token_ids: every id that ends a completion (default: the tokenizer's EOS).
        dtype: compute dtype of generation; with float32 master weights and bf16 compute, the
            policy generates under autocast (FSDP2's mixed precision already casts).
        return_logprobs: hand training batches the sampling log-probs (every step's logits are kept
            until the call ends: (rows, steps, V) float32, so off by default).
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

    def sync(self, policy: torch.nn.Module) -> None:
        self.policy = policy

    def close(self) -> None:
        self.policy = None

    def _autocast(self, device: torch.device):
        param_dtype = next(self.policy.parameters()).dtype
        if self.dtype == param_dtype or is_sharded(self.policy):
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=self.dtype)

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
        per_call = max(1, self.max_batch_sequences // n)
        greedy = sampling.temperature == 0
        if seeds is None:  # unseeded: draw prompt seeds from the global torch generator
            seeds = torch.randint(0, 2**62, (len(prompt_ids),)).tolist()
        # greedy decoding in both cases (sampling = greedy over logits / T + Gumbel noise); rows are
        # prompts repeated n times
        config = GenerationConfig(
            max_new_tokens=sampling.max_new_tokens,
            do_sample=False,
            eos_token_id=self.stop_token_ids,
            pad_token_id=self.pad_token_id,
            output_logits=return_logprobs,
            return_dict_in_generate=True,
        )
        # sharded (FSDP2) policies all-gather in every forward: ranks must step in lockstep until all finish
        kwargs = dict(generation_config=config, synced_gpus=is_sharded(policy))
        completions, logprobs = [], [] if return_logprobs else None
        stop = set(self.stop_token_ids)
        # `generate` fills unset fields from `policy.generation_config`: swap in a blank one
        saved_config, policy.generation_config = policy.generation_config, GenerationConfig()
        try:
            for start in range(0, len(prompt_ids), per_call):
                chunk = range(start, min(start + per_call, len(prompt_ids)))
                ids, mask = pad_left([prompt_ids[i] for i in chunk for _ in range(n)], self.pad_token_id)
                width = ids.shape[1]
                processors = LogitsProcessorList()
                if not greedy:
                    row_seeds = [derive_seed(seeds[i], j) for i in chunk for j in range(n)]
                    processors.append(SeededGumbel(row_seeds, sampling, device))
                with self._autocast(device):
                    out = policy.generate(
                        input_ids=ids.to(device), attention_mask=mask.to(device), logits_processor=processors, **kwargs
                    )
                new = out.sequences[:, width:]  # (len(chunk) * n, <= max_new_tokens)
                cut = [cut_at_eos(row, stop, self.pad_token_id) for row in new.tolist()]
                completions += cut
                if return_logprobs:
                    # the sampling distribution before top-k/top-p: softmax(logits / T), what training scores
                    scale = 1.0 if greedy else sampling.temperature
                    steps = (torch.stack(out.logits, dim=1).float() / scale).log_softmax(-1)  # (rows, S, V)
                    picked = steps.gather(-1, new[:, :, None]).squeeze(-1)  # (rows, S)
                    logprobs += [picked[r, : len(c)].tolist() for r, c in enumerate(cut)]
        finally:
            policy.generation_config = saved_config
            policy.train(was_training)
        return Generation(completions=completions, logprobs=logprobs)
