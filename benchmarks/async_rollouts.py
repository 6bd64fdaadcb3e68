"""Benchmark: steps/s of asynchronous rollouts (`async_rollout`) against the synchronous loop, same machine.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/async_rollouts.py [--sizes toy 25M --engines hf vllm
        --steps 8 --repeats 2]

The workload is the default run (`experiments/run.py`: DSRL, NSR-PreRL then GRPO from step steps / 2, 16 x 8,
<= 120 new tokens, float32) composed from `conf/` with held-out evaluation off, so a step is generation +
scoring + update. Each contender gets the whole machine (`--cores`, default: every core):
- sync: the engine in the trainer, `threads` = cores (and `sync, 1 thread`, the same with one thread);
- async k=1: trainer and worker process, each `threads` = cores / 2 (they overlap: generation of batch
  t + 1 runs while batch t trains);
- async k=1, oversubscribed (`--contenders`): trainer and worker each `threads` = cores.
A step is timed from one optimizer step's end to the next's; the first two steps are warm-up (worker and
engine start). Each contender runs in its own process, in alternation `--repeats` times; the table holds
the median step time and the ratio to the first contender (sync) of the same engine and size. At 25M
(random init, no reward: every group is flat) every sample is forwarded (`module.skip_zero_advantage=false`),
as in vs_trl.py.
JSON: benchmarks/results/async_rollouts.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
CONTENDERS = {  # name -> (async, trainer threads, worker threads) as shares of the cores
    "sync": (False, 1.0, None),
    "sync, 1 thread": (False, 0.0, None),
    "async k=1": (True, 0.5, 0.5),
    "async k=1, oversubscribed": (True, 1.0, 1.0),
}
DEFAULT = ["sync", "sync, 1 thread", "async k=1"]


def one_run(engine: str, path: str, contender: str, steps: int, cores: int) -> list[float]:
    """Step times of one run of the default config (in this process)."""
    import lightning as L
    from hydra import compose, initialize_config_dir

    from lightning_prerl.config.compose import build_run

    is_async, share, worker_share = CONTENDERS[contender]
    overrides = [
        f"rollout={engine}", f"model.path={path}", f"trainer.max_steps={steps}", f"objective.switch_step={steps // 2}",
        "eval_before_training=false",
        "trainer.check_val_every_n_epoch=100000", "callbacks.checkpoint.every_n_train_steps=100000",
        f"threads={max(1, int(cores * share))}", f"run_dir={tempfile.mkdtemp()}", "logger.tensorboard=null",
        f"module.skip_zero_advantage={path == 'toy'}", "callbacks.report=null",
    ]  # fmt: skip
    if is_async:
        overrides += ["async_rollout.enabled=true", f"async_rollout.worker_threads={max(1, int(cores * worker_share))}"]
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    run = build_run(cfg)
    ends: list[float] = []

    class Tick(L.Callback):
        def on_train_batch_end(self, *args) -> None:
            ends.append(time.perf_counter())

    run.trainer.callbacks.append(Tick())
    run.trainer.fit(run.module, datamodule=run.datamodule)
    return [b - a for a, b in zip(ends[1:], ends[2:], strict=False)]  # steps 0 and 1: warm-up


def policy_path(size: str, tmp: Path) -> str:
    sys.path.insert(0, str(Path(__file__).parent))
    from vs_trl import policy_dir

    return policy_dir(size, tmp)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", nargs="+", default=["toy"], choices=["toy", "25M"])
    ap.add_argument("--engines", nargs="+", default=["hf"], choices=["hf", "vllm"])
    ap.add_argument("--contenders", nargs="+", default=DEFAULT, choices=list(CONTENDERS))
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--cores", type=int, default=os.cpu_count())
    ap.add_argument("--one", nargs=3, metavar=("ENGINE", "PATH", "CONTENDER"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print("STEP_TIMES", json.dumps(one_run(*args.one, args.steps, args.cores)))
        return
    rows = []
    for size in args.sizes:
        with tempfile.TemporaryDirectory() as tmp:
            path = policy_path(size, Path(tmp))
            for engine in args.engines:
                times = {name: [] for name in args.contenders}
                for _ in range(args.repeats):
                    for name in args.contenders:
                        cmd = [sys.executable, __file__, "--one", engine, path, name, f"--steps={args.steps}",
                               f"--cores={args.cores}"]  # fmt: skip
                        out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True).stdout
                        times[name] += json.loads(out.split("STEP_TIMES", 1)[1])
                sync = statistics.median(times[args.contenders[0]])  # the baseline: the first contender
                for name in args.contenders:
                    step = statistics.median(times[name])
                    rows.append({
                        "policy": size, "engine": engine, "contender": name, "step_s": round(step, 3),
                        "steps_per_s": round(1 / step, 2), "ratio_vs_sync": round(sync / step, 2),
                        "steps_timed": len(times[name]),
                    })  # fmt: skip
    print(f"default run (DSRL warm-up), 16 prompts x 8 samples, <= 120 new tokens, {args.cores} cores")
    print(f"{'policy':>6} {'engine':>6} {'contender':>26} {'step s':>7} {'steps/s':>8} {'x sync':>7}")
    for r in rows:
        print(
            f"{r['policy']:>6} {r['engine']:>6} {r['contender']:>26} {r['step_s']:>7.3f} {r['steps_per_s']:>8.2f} "
            f"{r['ratio_vs_sync']:>7.2f}"
        )
    sys.path.insert(0, str(Path(__file__).parent))
    from results_io import write_json

    write_json("async_rollouts", args=vars(args), rows=rows)


if __name__ == "__main__":
    main()
