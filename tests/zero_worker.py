"""One rank of the DeepSpeed ZeRO check (tests/test_zero.py): `torchrun --nproc_per_node=2 zero_worker.py
STAGE OUT [vllm]`.

Raw DeepSpeed on CPU with gloo (Lightning's DeepSpeedStrategy refuses CPUs), built the way the strategy
builds it: the policy and a frozen reference loaded inside `deepspeed.zero.Init` (stage 3) through
`zero.zero3_loading`, both held by one wrapper module given to `deepspeed.initialize` with a client
AdamW. Two optimizer steps (NSR-PreRL, then GRPO) run the project's `backward_objective` on this rank's
prompt group with two micro-batches per step (DeepSpeed micro-steps, boundary on the last). Rank 0
writes the gathered weights; every rank writes its greedy completions from the transformers engine
(generating from the partitioned policy) and, with `vllm`, from a vLLM engine synced from it.
"""

from __future__ import annotations

import os
import sys

import deepspeed
import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))
from test_policy import make_batch  # noqa: E402

from lightning_prerl.data.batch import take_groups  # noqa: E402
from lightning_prerl.data.prompts import render_prompt, toy_prompts  # noqa: E402
from lightning_prerl.objectives import PolicyGradientObjective  # noqa: E402
from lightning_prerl.rollout.engine import SamplingConfig  # noqa: E402
from lightning_prerl.rollout.hf import HFEngine  # noqa: E402
from lightning_prerl.scale.models import full_weights, load_policy, load_tokenizer  # noqa: E402
from lightning_prerl.scale.zero import copy_weights, micro_step, zero3_loading  # noqa: E402
from lightning_prerl.training.policy import CondRL, NSRPreRL  # noqa: E402
from lightning_prerl.training.update import Collectives, MicroBatching, backward_objective  # noqa: E402

LR, CLIP = 1e-3, 1.0
STEPS = [NSRPreRL.preset, CondRL.preset]
GREEDY = SamplingConfig(temperature=0.0, max_new_tokens=60)


def config(stage: int) -> dict:
    return {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": CLIP,
        "zero_allow_untested_optimizer": True,
        "zero_optimization": {"stage": stage},
    }


def greedy_prompts(tok, rank: int) -> list[list[int]]:
    """Rank-dependent prompt lists of different lengths: ranks finish generating at different steps."""
    prompts = [render_prompt(tok, p) for p in toy_prompts("heldout", 6, seed=3)]
    return prompts[rank * 3 : rank * 3 + 3]


def main(stage: int, out: str, with_vllm: bool) -> None:
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = config(stage)
    tok = load_tokenizer("toy")
    with deepspeed.zero.Init(enabled=stage == 3, config_dict_or_path=cfg), zero3_loading(cfg if stage == 3 else None):
        holder = torch.nn.Module()
        holder.policy, holder.reference = load_policy("toy"), load_policy("toy")
    holder.reference.requires_grad_(False)
    if stage == 3:
        assert all(hasattr(p, "ds_id") for p in holder.policy.parameters())
        loaded = dict(full_weights(holder.policy))
        for name, tensor in load_policy("toy").state_dict().items():  # loaded, not freshly initialised
            assert torch.equal(loaded[name], tensor), name
    opt = torch.optim.AdamW(holder.policy.parameters(), lr=LR, betas=(0.9, 0.99), weight_decay=0.0)
    engine, *_ = deepspeed.initialize(model=holder, optimizer=opt, config=cfg)

    def reduce(op):
        def apply(value):
            value = value.detach().float().clone() if isinstance(value, torch.Tensor) else torch.tensor(float(value))
            dist.all_reduce(value, op=op)
            return value

        return apply

    to_max = reduce(dist.ReduceOp.MAX)
    comm = Collectives(world, reduce(dist.ReduceOp.SUM), lambda v: int(to_max(v)) if isinstance(v, int) else to_max(v))

    def backward(loss, last):
        micro_step(engine, last)  # what PolicyModule does before each micro-batch's backward
        engine.backward(loss)

    share = take_groups(make_batch(tok), [rank])  # this rank's prompt group (2 samples)
    for preset in STEPS:
        objective = PolicyGradientObjective(**preset)
        backward_objective(
            objective, holder.policy, share, 0, micro=MicroBatching(size=1), backward=backward, comm=comm
        )
        engine.step()
        assert engine.was_step_applied()

    # Lightning's DeepSpeedStrategy saves this way: its own state as DeepSpeed's client state, tag "checkpoint"
    client = {"global_step": len(STEPS), "run_identity": {"objective": {"name": "zero"}}}
    engine.save_checkpoint(os.path.join(out, "checkpoints", "step000002.ckpt"), client_state=client, tag="checkpoint")

    copy_weights(holder.reference, holder.policy)  # DSRL's reference reset, partition by partition
    weights = {k: v.clone() for k, v in full_weights(holder.policy)}
    reference = dict(full_weights(holder.reference))
    for name, tensor in weights.items():
        assert torch.equal(reference[name], tensor), name

    hf = HFEngine(tok)
    hf.sync(holder.policy)
    prompts = greedy_prompts(tok, rank)
    result = {"hf": hf.generate(prompts, 1, GREEDY).completions}
    if with_vllm:
        from lightning_prerl.rollout.vllm import VLLMEngine

        vllm_engine = VLLMEngine(tok, model_path="toy", max_model_len=256, kv_cache_gib=1)
        vllm_engine.sync(holder.policy)  # gathered one tensor at a time from the partitions
        result["vllm"] = vllm_engine.generate(prompts, 1, GREEDY).completions
        result["sync_bytes"] = vllm_engine.last_sync_bytes
    if rank == 0:
        result["weights"] = weights
    torch.save(result, os.path.join(out, f"rank{rank}.pt"))
    dist.barrier()


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2], len(sys.argv) > 3 and sys.argv[3] == "vllm")
