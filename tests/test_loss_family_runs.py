"""Every registered loss trains end to end in both spaces and inside DSRL's phases (issue 25): the
DSRL config composed from YAML with the loss in each phase (`objective@objective.warmup=<loss>`,
prompt-free and negatives only, then `objective@objective.main=<loss>`, conditional), a real CPU fit
of the tiny policy with two updates per rollout batch (so ratios leave 1 and clips can bind)."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from hydra.utils import instantiate

from lightning_prerl.data.prompts import toy_prompts
from lightning_prerl.objectives import registry
from lightning_prerl.rollout.hf import HFEngine
from lightning_prerl.training.datamodule import RolloutDataModule
from lightning_prerl.training.policy import PolicyModule
from tests.test_config import compose_cfg
from tests.test_policy import quiet_cpu_trainer

NEW = ["cispo", "clip_cov", "dr_grpo", "gspo", "kl_cov", "sapo"]


def _length_parity(prompt, completion: str) -> float:
    """A reward the untrained policy gets half the time: mixed groups, negatives and positives."""
    return float(len(completion) % 2 == 0)


def test_every_registered_loss_has_a_yaml_of_its_name():
    assert set(registry.names("policy_loss")) - {"ppo_clip"} <= set(NEW)


@pytest.mark.parametrize("loss", NEW)
def test_the_loss_trains_in_both_spaces_inside_dsrl(loss, tiny_model_dir):
    cfg = compose_cfg(
        "objective=dsrl",
        f"objective@objective.warmup={loss}",
        "objective.warmup.space=marginal",
        "objective.warmup.samples=negative",
        f"objective@objective.main={loss}",
        "objective.switch_step=2",
        "data.sampling.max_new_tokens=8",
    )
    switch = instantiate(cfg.objective)
    assert (switch.warmup.space, switch.main.space) == ("marginal", "conditional")
    assert switch.warmup.name == switch.main.name == loss
    module = PolicyModule(switch.initial_objective, model_path=str(tiny_model_dir), lr=1e-3, ppo_epochs=2)
    prompts = toy_prompts("train", 16)
    dm = RolloutDataModule(module.tokenizer, HFEngine, _length_parity, prompts, None, 2, 4, {"max_new_tokens": 8})
    seen, before = [], []

    class Record(L.Callback):
        def on_train_start(self, trainer, pl_module):
            before.extend(p.detach().clone() for p in pl_module.policy.parameters())

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            grad_norm = float(trainer.callback_metrics["train/grad_norm"])
            seen.append((pl_module.objective.space, float(outputs["loss"]), grad_norm))

    quiet_cpu_trainer(callbacks=[switch, Record()], max_steps=4).fit(module, datamodule=dm)
    assert [space for space, _, _ in seen] == ["marginal", "conditional"]
    assert all(math.isfinite(loss) and grad_norm > 0 for _, loss, grad_norm in seen), seen
    assert module.skipped_steps == 0
    assert any(not torch.equal(p, b) for p, b in zip(module.policy.parameters(), before, strict=True))
