"""Training (layer 6): the Lightning side of one RL step, from fresh rollouts to the optimizer step.

Owns `RolloutDataModule` (one epoch = one freshly generated rollout batch, engine sync, the global
batch split over ranks: `datamodule`), the gradient of one batch (log-probs in chunks, micro-batches,
the global token mean: `update`), the rollout record and its replay without an engine (`record`,
`replay`), the LightningModules `PolicyModule`, `CondRL`, `PreRL`, `NSRPreRL`,
`PSRPreRL` (`policy`), held-out evaluation hooks (`heldout`), schedules of phases and the DSRL switch
(`dsrl`) and checkpoint checks (`checkpoints`). May import: every lower layer (`objectives` ... `rollout`).
"""
