"""transformers `generate` engine: samples from the live policy module itself (no weight copy).

The fallback when vLLM is absent, and the reference the vLLM engine is tested against. Sampling
is true temperature sampling: generation runs from a fresh `GenerationConfig` with `top_k` 0 (off),
because `generate` would otherwise apply its default top_k=50 and the checkpoint's own defaults.
"""

from __future__ import annotations

import torch
from transformers import GenerationConfig

from lightning_prerl.batch import pad_left
from lightning_prerl.models import is_sharded
from lightning_prerl.rollout.engine import Generation, SamplingConfig, cut_at_eos


class HFEngine:
    """Generates with `policy.generate` in chunks of at most `max_batch_sequences` sequences.

    Args:
        tokenizer: the policy's tokenizer (EOS and padding ids).
        max_batch_sequences: prompts x samples per `generate` call (bounds memory).
        stop_token_ids: extra ids that end a completion besides the tokenizer's EOS.
    """

    def __init__(self, tokenizer, max_batch_sequences: int = 256, stop_token_ids: list[int] | None = None):
        self.eos_token_ids = [tokenizer.eos_token_id, *(stop_token_ids or [])]
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.max_batch_sequences = max_batch_sequences
        self.policy: torch.nn.Module | None = None

    def sync(self, policy: torch.nn.Module) -> None:
        self.policy = policy

    def close(self) -> None:
        self.policy = None

    @torch.no_grad()
    def generate(
        self, prompt_ids: list[list[int]], n: int, sampling: SamplingConfig, return_logprobs: bool = False
    ) -> Generation:
        if self.policy is None:
            raise RuntimeError("HFEngine.generate called before sync(policy)")
        policy = self.policy
        was_training = policy.training
        policy.eval()
        device = next(policy.parameters()).device
        per_call = max(1, self.max_batch_sequences // n)
        greedy = sampling.temperature == 0
        # a fresh GenerationConfig, also swapped in as the model's default: `generate` fills every
        # field left at its default from `policy.generation_config`, so the checkpoint's own settings
        # (top_k=50, repetition penalties, ...) would otherwise distort the samples
        config = GenerationConfig(
            max_new_tokens=sampling.max_new_tokens,
            do_sample=not greedy,
            temperature=sampling.temperature if not greedy else 1.0,
            top_p=sampling.top_p if not greedy else 1.0,
            top_k=(sampling.top_k or 0) if not greedy else 0,
            eos_token_id=self.eos_token_ids,
            pad_token_id=self.pad_token_id,
            num_return_sequences=n,
            output_scores=return_logprobs,
            return_dict_in_generate=True,
        )
        # sharded (FSDP2) policies all-gather in every forward: ranks must step in lockstep until all finish
        kwargs = dict(generation_config=config, synced_gpus=is_sharded(policy))
        completions, logprobs = [], [] if return_logprobs else None
        eos = set(self.eos_token_ids)
        saved_config, policy.generation_config = policy.generation_config, GenerationConfig()
        try:
            for start in range(0, len(prompt_ids), per_call):
                ids, mask = pad_left(prompt_ids[start : start + per_call], self.pad_token_id)
                width = ids.shape[1]
                out = policy.generate(input_ids=ids.to(device), attention_mask=mask.to(device), **kwargs)
                new = out.sequences[:, width:].tolist()  # (len(chunk) * n, <= max_new_tokens)
                cut = [cut_at_eos(row, eos, self.pad_token_id) for row in new]
                completions += cut
                if return_logprobs:
                    # scores are the processed (temperature-scaled) logits of each step
                    steps = torch.stack(out.scores, dim=1).float().log_softmax(-1)  # (rows, S, V)
                    picked = steps.gather(-1, out.sequences[:, width:, None]).squeeze(-1)  # (rows, S)
                    logprobs += [picked[r, : len(c)].tolist() for r, c in enumerate(cut)]
        finally:
            policy.generation_config = saved_config
            policy.train(was_training)
        return Generation(completions=completions, logprobs=logprobs)
