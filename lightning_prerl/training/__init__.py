"""Training (layer 6): the Lightning side of one RL step, from fresh rollouts to the optimizer step.

Owns `RolloutDataModule` (one epoch = one freshly generated rollout batch, engine sync, the global
batch split over ranks: `datamodule`), per-token log-probs in a context space without the logits
(`logprobs`), the gradient of one batch (micro-batches, the global token mean: `update`), the rollout
record and its replay without an engine (`record`, `replay`), the LightningModules `PolicyModule`,
`CondRL`, `PreRL`, `NSRPreRL`, `PSRPreRL` (`policy`), held-out evaluation hooks (`heldout`), schedules
of phases and the DSRL switch (`dsrl`) and checkpoint checks (`checkpoints`). May import: every lower
layer (`objectives` ... `rollout`).
"""
