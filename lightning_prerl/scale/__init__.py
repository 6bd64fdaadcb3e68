"""Scale (layer 4): loading the policy and running it on many devices.

Owns model loading, dtypes, FSDP2 sharding and full-weight gathering (`models`), LoRA adapters
(`lora`), DeepSpeed ZeRO specifics (`zero`) and the policy/reference pair per strategy (`networks`).
May import: `objectives`, `evaluation`, `data`.
"""
