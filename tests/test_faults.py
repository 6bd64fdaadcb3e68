"""Numerical faults: a non-finite loss or gradient skips the optimizer step (weights and AdamW state
untouched) and is counted; `max_bad_steps` in a row stop the run with a checkpoint from before it."""

from __future__ import annotations

from dataclasses import replace

import lightning as L
import pytest
import torch

from lightning_prerl.data.prompts import toy_prompts
from lightning_prerl.rollout.hf import HFEngine
from lightning_prerl.training.datamodule import RolloutDataModule
from lightning_prerl.training.policy import CondRL


def _length_parity(prompt, completion: str) -> float:
    return float(len(completion) % 2 == 0)


class Snapshots(L.Callback):
    """Weights and AdamW moments before and after every training batch."""

    def __init__(self):
        self.before, self.after = [], []

    @staticmethod
    def _state(module):
        opt = module.optimizers().optimizer
        moments = [s["exp_avg"].clone() for s in opt.state.values() if "exp_avg" in s]
        return [p.detach().clone() for p in module.policy.parameters()], moments

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.before.append(self._state(module))

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.after.append(self._state(module))


def _fit(tiny_model_dir, tmp_path, bad_steps, epochs=4, max_bad_steps=3, bad=float("nan")):
    module = CondRL(model_path=str(tiny_model_dir), lr=1e-3, max_bad_steps=max_bad_steps)
    clean = module.objective.loss_terms

    def loss_terms(*args, **kwargs):  # a non-finite value injected into the loss of the chosen batches
        terms = clean(*args, **kwargs)
        hit = bad_steps is None or module.trainer.current_epoch in bad_steps
        return replace(terms, loss=terms.loss + bad) if hit else terms

    object.__setattr__(module.objective, "loss_terms", loss_terms)
    dm = RolloutDataModule(
        module.tokenizer, HFEngine, _length_parity, toy_prompts("train", 32), None, 4, 4, {"max_new_tokens": 16}
    )
    snaps = Snapshots()
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=epochs,
        max_epochs=epochs,
        logger=False,
        enable_progress_bar=False,
        inference_mode=False,
        default_root_dir=tmp_path,
        callbacks=[snaps],
        enable_checkpointing=False,
    )
    trainer.fit(module, datamodule=dm)
    return module, trainer, snaps


def _same(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_a_nan_step_is_skipped_counted_and_the_run_goes_on(tiny_model_dir, tmp_path):
    module, trainer, snaps = _fit(tiny_model_dir, tmp_path, bad_steps={1})
    assert module.skipped_steps == 1 and module.fault is None
    weights_before, moments_before = snaps.before[1]
    weights_after, moments_after = snaps.after[1]
    assert _same(weights_before, weights_after) and _same(moments_before, moments_after)  # untouched
    assert not _same(snaps.before[2][0], snaps.after[2][0])  # the next step trains again
    assert trainer.global_step == 4  # 4 epochs: the skipped step is counted (a no-op), steps = batches x updates
    assert all(torch.isfinite(p).all() for p in module.policy.parameters())


def test_max_bad_steps_in_a_row_stop_with_a_checkpoint_from_before_the_fault(tiny_model_dir, tmp_path):
    module, trainer, snaps = _fit(tiny_model_dir, tmp_path, bad_steps=None, epochs=10, max_bad_steps=3)
    assert module.skipped_steps == 3 and len(snaps.after) == 3  # stopped after the third bad step
    assert module.fault.startswith("run stopped: 3 steps in a row had a non-finite loss or gradient")
    path = tmp_path / "checkpoints" / "fault-step000002.ckpt"  # skipped steps are counted: the third is step 2
    assert str(path) in module.fault
    saved = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    initial = snaps.before[0][0]
    names = [n for n, _ in module.policy.named_parameters()]
    assert all(torch.equal(saved[f"policy.{n}"], w) for n, w in zip(names, initial, strict=True))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_values_of_either_kind_are_caught(tiny_model_dir, tmp_path, bad):
    module, trainer, _ = _fit(tiny_model_dir, tmp_path, bad_steps={0}, epochs=2, bad=bad)
    assert module.skipped_steps == 1 and trainer.global_step == 2
