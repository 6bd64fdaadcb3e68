"""Rollout (layer 5): the engines that sample responses from the current policy.

Owns the `RolloutEngine` protocol and sampling settings (`engine`), `HFEngine` (the live policy,
transformers) and `VLLMEngine` (colocated vLLM, in-place weight sync). May import: `objectives`,
`evaluation`, `data`, `scale`.
"""
