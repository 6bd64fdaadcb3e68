"""Held-out evaluation of a `PolicyModule`: pass@k, avg@k, format and behaviour metrics per benchmark.

A mixin of `PolicyModule` (lightning_prerl/training/policy.py), split out to keep each file readable. Held-out
rollouts come from the data module's validation loader (generated with the current weights, padding
prompts for rank lockstep are never scored); metrics are logged against optimizer steps done.
"""

from __future__ import annotations

import math

from lightning_prerl.data.batch import RolloutBatch
from lightning_prerl.data.benchmarks import BenchmarkMetrics


class HeldOutEvaluation:
    """Validation hooks for a LightningModule with `val_metrics`, `benchmark_metrics`, `eval_k` and
    `updates_per_batch` (see `PolicyModule`)."""

    evaluate_first = False  # `eval_before_training`: evaluate at step 0 of a fresh run (set by compose.build_run)

    def on_train_start(self) -> None:
        """Held-out evaluation before the first step, inside `fit`, with the training strategy's model:

        - a fresh run with `evaluate_first` (`eval_before_training`) evaluates at step 0;
        - a resumed run evaluates if an evaluation was due at the checkpointed step (checkpoints are
          written at the end of a step's training batch, before that step's held-out evaluation;
          without this the resumed run would skip it and lose a point of the curve).

        Not `trainer.validate` before `fit`: under DeepSpeed ZeRO-3 that builds Lightning's separate
        inference engine, whose ZeRO-3 hooks the training engine then adds to (two parameter
        coordinators on every module); one code path also means the same evaluation on every strategy.
        """
        t = self.trainer
        every, step = t.check_val_every_n_epoch, t.global_step // self.updates_per_batch  # rollout batches done
        due = t.ckpt_path is not None and every and step and step % every == 0
        if not t.datamodule.eval_prompts or not (due or (step == 0 and self.evaluate_first)):
            return
        for i, batch in enumerate(t.datamodule.val_dataloader()):
            self.validation_step(t.strategy.batch_to_device(batch), i)  # as Lightning's loop moves it
        self.on_validation_epoch_end()
        from lightning_prerl.training.dsrl import PhaseSchedule  # its metric trigger observes every evaluation

        for callback in t.callbacks:
            if isinstance(callback, PhaseSchedule):
                callback.on_validation_end(t, self)

    def _benchmark_metrics(self) -> BenchmarkMetrics:
        """`val/<benchmark>/...` metrics for the benchmark presets among the held-out prompts."""
        if self.benchmark_metrics is None:
            prompts = getattr(getattr(self.trainer, "datamodule", None), "eval_prompts", None) or []
            hp = self.hparams
            self.benchmark_metrics = BenchmarkMetrics(prompts, hp.pass_k, hp.transition, hp.reflection).to(self.device)
        return self.benchmark_metrics

    def validation_step(self, batch: RolloutBatch, batch_idx: int) -> None:
        real = len(batch) - batch.padding_prompts * batch.group_size  # lockstep padding is never scored
        if real < len(batch):
            batch = batch.select(slice(0, real))
        g = batch.group_size
        self.eval_k = g
        rewards, lengths = batch.rewards.view(-1, g), batch.response_mask.sum(1)  # (B, G), (B*G,)
        self.val_metrics.update(rewards, lengths, batch.texts, batch.has_answer)
        self._benchmark_metrics().record(rewards, lengths, batch.texts, batch.has_answer, batch.sources)

    def on_validation_epoch_end(self) -> None:
        values = self.val_metrics.compute(self._global_max)
        self.val_metrics.reset()
        values.update(self._benchmark_metrics().compute(self._global_max))
        self._benchmark_metrics().reset()
        for key in [k for k in values if k.endswith("/accuracy")]:  # avg@k: mean accuracy over k samples
            values[key.removesuffix("accuracy") + f"avg@{self.eval_k}"] = values[key]
        values = {k: v for k, v in values.items() if not math.isnan(v)}
        # logged against optimizer steps done (0 before training), the x-axis of rollout metrics too
        if self.trainer.is_global_zero and not self.trainer.sanity_checking:
            for logger in self.trainer.loggers:
                logger.log_metrics(values, step=self.trainer.global_step)
        for key, value in values.items():
            self.log(key, value, logger=False)  # callback_metrics: checkpoint monitors, sweep results
