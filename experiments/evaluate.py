"""Evaluate a policy on held-out problems: avg@k, pass@k, format validity, behaviour rates.

    python experiments/evaluate.py model.path=outputs/<date>/<time>/policy data.eval_samples=8 module.pass_k=[1,4,8]
    python experiments/evaluate.py model=hf_local model.path=/models/Qwen3-4B data=math rollout=vllm \
        data.eval_prompts.path=../shared/data/aime24/test.jsonl data.eval_samples=32 module.pass_k=[1,8,32]

Uses the same config as training (the data config's `eval_prompts`, `eval_samples`, `eval_sampling`)
and writes evaluation.json into the Hydra run dir.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> dict[str, float]:
    from lightning_prerl.compose import build_run

    run = build_run(cfg)
    run.trainer.validate(run.module, datamodule=run.datamodule)
    metrics = {k: float(v) for k, v in run.trainer.callback_metrics.items() if k.startswith("val/")}
    report = {
        "model": str(cfg.model.path),
        "data": cfg.data.name,
        "samples_per_prompt": cfg.data.eval_samples,
        "prompts": len(run.datamodule.eval_prompts),
        "metrics": metrics,
    }
    out = Path(cfg.run_dir) / "evaluation.json"
    out.write_text(json.dumps(report, indent=2))
    for key, value in sorted(metrics.items()):
        print(f"{key:<32}{value:.4f}")
    print(f"evaluation written to {out}")
    return metrics


if __name__ == "__main__":
    from lightning_prerl.config import check_command_line

    check_command_line(sys.argv[1:])
    main()
