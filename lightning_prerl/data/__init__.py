"""Data (layer 3): what training reads and how a rollout batch looks.

Owns the rollout batch (`batch.RolloutBatch`), rewards and their scorer (`rewards`), prompt sets and
chat rendering (`prompts`), the toy world (`toyworld`), the paper's benchmarks and decontamination
(`benchmarks`), where the data files live and which Hub data sets they come from (`sources`), and the
shaping of a batch before the update (overlong penalty, informative groups: `shaping`). May import:
`objectives`, `evaluation`.
"""
