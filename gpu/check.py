"""Everything one GPU can verify in at most 10 minutes, offline: `make gpu-check OUT=dir`.

    here (CPU, network):  make gpu-carry            # .gpu-carry/: the wheels of gpu/wheels.txt + the Qwen3 tokenizer
    GPU machine:          make gpu-check OUT=out    # carry .gpu-carry with the checkout
    here or CI:           python gpu/check.py --dry-run --out /tmp/plan   # the plan, every run's config validated

Stages, each a subprocess with its own time limit (their sum is the 10-minute budget); a failed stage
does not stop the ones after it, except that the runs need the setup and the model:

    setup   install the carried wheels the image lacks (hydra, omegaconf, pydantic, math-verify, pebble,
            deepspeed) into OUT's work dir with --no-index --no-deps
    model   a random-init Qwen3 shaped like Qwen3-0.6B (hidden 1024, 28 blocks, 151,936-token vocabulary,
            tied head: 0.6B parameters) with the real Qwen3 tokenizer, saved as an HF directory
    tests   the GPU test tier (tests/test_gpu.py: with asynchronous rollouts colocated on the GPU) and the GPU
            path's CPU-side facts (tests/test_gpu_path.py)
    fsdp    `experiments/run.py trainer=fsdp objective=dsrl`: 2 steps across the switch (NSR-PreRL, then GRPO
            with KL), bf16 over float32 shards, activation checkpointing, step-0 evaluation, sharded checkpoints
    resume  the same run resumed from its sharded checkpoint to step 3
    zero3   `trainer=deepspeed_zero3`, 2 steps with eval_before_training=true (the default)
    memory  one Qwen3-4B-shaped FSDP2 micro-batch at the paper preset's 32,768-token budget
            (benchmarks/gpu_step.py --sizes 4b --fsdp2): peak GiB, s/step, tokens/s

Writes OUT/summary.json and OUT/summary.md (the GPU's name; per stage: status, seconds, peak GPU memory
as nvidia-smi saw it, s/step and tokens/s from the run's own metrics), OUT/logs.txt (each stage's output
tail) and OUT/memory.json. torch 2.11 has no `linear_cross_entropy`: ops.head_logprobs falls back to
its checkpointed chunks there. The vLLM CUDA engine is not checked (its wheel is too large to carry).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CARRY = ROOT / ".gpu-carry"
WHEEL_LIST = ROOT / "gpu" / "wheels.txt"
QWEN3_TOKENIZER = ROOT.parent / "shared" / "tokenizers" / "qwen3"
LIMIT_S = 600
SDIST_ONLY = {"antlr4-python3-runtime", "deepspeed"}
PLATFORM = ["--python-version", "3.12", "--implementation", "cp", "--platform", "manylinux_2_28_x86_64"]
PLATFORM += ["--platform", "manylinux_2_17_x86_64", "--platform", "manylinux2014_x86_64"]
QWEN3_06B = {"hidden_size": 1024, "intermediate_size": 3072, "num_hidden_layers": 28, "num_attention_heads": 16}
QWEN3_06B |= {"num_key_value_heads": 8, "head_dim": 128, "vocab_size": 151_936, "tie_word_embeddings": True}
RUN = [  # shared by fsdp, resume, zero3: toy prompts, Qwen3 tokenizer; a random policy earns no reward,
    # so flat groups are forwarded and GRPO carries a KL term (every pass does real work)
    "model=hf_local", "model.dtype=bfloat16", "objective=dsrl", "objective.switch_step=1",
    "objective.main.kl_coef=0.05", "module.skip_zero_advantage=false", "trainer.devices=1", "trainer.max_steps=2",
    "trainer.check_val_every_n_epoch=100", "data.prompts_per_step=8", "data.samples_per_prompt=4",
    "data.sampling.max_new_tokens=256", "data.eval_prompts.count=16", "data.eval_prompts_per_batch=16",
    "callbacks.checkpoint.every_n_train_steps=1", "eval_before_training=true",
]  # fmt: skip


@dataclass
class Stage:
    name: str
    budget_s: int
    argv: list[str]
    run_dir: Path | None = None
    needs: tuple[str, ...] = ()
    result: dict = field(default_factory=dict)


def wheel_specs() -> list[tuple[str, str]]:
    """(name, version) of every line of gpu/wheels.txt."""
    specs = []
    for n, line in enumerate(WHEEL_LIST.read_text().splitlines(), 1):
        line = line.split("#")[0].strip()
        if not line:
            continue
        if line.count("==") != 1:
            raise SystemExit(f"{WHEEL_LIST}:{n}: {line!r}: expected NAME==VERSION")
        specs.append(tuple(line.split("==")))
    return specs


def stages(out: Path) -> list[Stage]:
    work = out / "work"
    model, site, py = work / "qwen3-0.6b-random", work / "site", sys.executable
    run = [py, "experiments/run.py", f"model.path={model}", *RUN]
    fsdp = [*run, "trainer=fsdp", "model.activation_checkpointing=true", f"hydra.run.dir={work / 'fsdp'}"]
    zero3 = [*run, "trainer=deepspeed_zero3", f"hydra.run.dir={work / 'zero3'}"]
    pytest = [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not slow"]
    pip = [py, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--upgrade"]
    return [
        Stage("setup", 30, [*pip, "--target", str(site), *sorted(map(str, (CARRY / "wheels").glob("*.whl")))]),
        Stage("model", 40, [py, __file__, "--build-model", str(model)], needs=("setup",)),
        Stage("tests", 190, [*pytest, "tests/test_gpu.py", "tests/test_gpu_path.py"], needs=("setup",)),
        Stage("fsdp", 100, fsdp, work / "fsdp", needs=("model",)),
        Stage("resume", 70, [*fsdp, "trainer.max_steps=3", "ckpt_path=auto"], work / "fsdp", needs=("fsdp",)),
        Stage("zero3", 110, zero3, work / "zero3", needs=("model",)),
        Stage("memory", 60, [py, "benchmarks/gpu_step.py", "--sizes", "4b", "--fsdp2", "--batch", "4"]
              + ["--prompt-len", "1024", "--response-len", "7168", "--repeats", "1", "--warmup", "1"]
              + ["--matmul-size", "4096", "--out", str(out / "memory.json")], needs=("setup",)),
    ]  # fmt: skip


class GpuMemory:
    """Peak GPU memory in use (MiB, all processes) sampled from nvidia-smi twice a second."""

    def __init__(self):
        self.peak, self._stop = None, threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        query = ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"]
        while not self._stop.is_set():
            try:
                used = int(subprocess.run(query, capture_output=True, text=True, timeout=5).stdout.split()[0])
                self.peak = max(self.peak or 0, used)
            except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
                return
            self._stop.wait(0.5)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=6)


def run_metrics(run_dir: Path) -> dict:
    """Steps, s/step (sync + generate + score + train) and trained tokens/s from a run's metrics.csv."""
    path = run_dir / "logs" / "metrics.csv"
    if not path.is_file():
        return {}
    rows = [r for r in csv.DictReader(path.open()) if r.get("train/loss")]
    parts = ("time/sync", "time/generate", "time/score", "time/train")
    step_s = [sum(float(r[k] or 0) for k in parts if k in r) for r in rows]
    train_s = sum(float(r.get("time/train") or 0) for r in rows)
    tokens = sum(float(r.get("train/forwarded_tokens") or 0) for r in rows)
    return {
        "steps": [int(r["step"]) for r in rows],
        "s_per_step": round(sum(step_s) / len(step_s), 2) if step_s else None,
        "train_tokens_per_s": round(tokens / train_s) if train_s else None,
    }


def run_stage(stage: Stage, env: dict, log) -> None:
    start = time.perf_counter()
    with GpuMemory() as mem:
        try:
            proc = subprocess.run(stage.argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=stage.budget_s)
            status, text = (
                ("ok" if proc.returncode == 0 else f"failed (exit {proc.returncode})"),
                proc.stdout + proc.stderr,
            )
        except subprocess.TimeoutExpired as exc:
            status, text = f"timed out after {stage.budget_s} s", f"{exc.stdout or ''}{exc.stderr or ''}"
    seconds = time.perf_counter() - start
    stage.result = {"status": status, "seconds": round(seconds, 1), "budget_s": stage.budget_s}
    stage.result["peak_gpu_gib"] = round(mem.peak / 1024, 2) if mem.peak else None
    if stage.run_dir is not None:
        stage.result.update(run_metrics(stage.run_dir))
    log.write(f"===== {stage.name}: {status}, {seconds:.1f} s\n$ {' '.join(stage.argv)}\n{text[-6000:]}\n")
    log.flush()
    print(f"{stage.name:7s} {status:24s} {seconds:6.1f} s", flush=True)


def write_summary(out: Path, plan: list[Stage]) -> dict:
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    summary = {"gpu": gpu, "torch": torch.__version__, "budget_s": LIMIT_S}
    summary["stages"] = {s.name: s.result for s in plan}
    memory = out / "memory.json"
    if memory.is_file():
        probe = json.loads(memory.read_text())["results"][0]
        summary["memory_probe"] = {
            k: probe.get(k) for k in ("size", "params", "peak_mem_gib", "step_s", "tokens_per_s")
        }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    lines = [
        f"# gpu-check on {gpu} (torch {torch.__version__})",
        "",
        "| stage | status | s | peak GiB | s/step | tokens/s |",
    ]
    lines.append("|---|---|---|---|---|---|")
    for s in plan:
        r = s.result
        cells = [r.get("status", "skipped"), r.get("seconds"), r.get("peak_gpu_gib"), r.get("s_per_step")]
        lines.append(
            f"| {s.name} | "
            + " | ".join("" if c is None else str(c) for c in cells)
            + f" | {r.get('train_tokens_per_s') or ''} |"
        )
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return summary


def dry_run(out: Path, plan: list[Stage]) -> None:
    """No GPU: the wheel list parses, every run stage's overrides compose and pass the project's config
    checks, the memory probe's arguments parse, and the budgets fit the 10-minute limit."""
    from hydra import compose, initialize_config_dir

    from lightning_prerl.config.checks import validate_config

    specs = wheel_specs()
    for stage in plan:
        if stage.run_dir is not None:
            overrides = [a for a in stage.argv[2:] if not a.startswith("hydra.")]
            with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
                cfg = compose("config", overrides=["run_dir=/tmp/unused", *overrides])
            cfg.model.path = "toy"  # the model stage makes the real directory on the GPU machine
            validate_config(cfg)
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_step", ROOT / "benchmarks" / "gpu_step.py")
    gpu_step = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_step)
    gpu_step.parser().parse_args(plan[-1].argv[2:])  # the memory probe's arguments (exits on a bad one)
    total = sum(s.budget_s for s in plan)
    for s in plan:
        print(f"{s.name:7s} {s.budget_s:4d} s  {' '.join(s.argv[1:])}")
    print(f"{len(specs)} wheels to carry; stage budgets {total} s of {LIMIT_S} s")
    if total > LIMIT_S:
        raise SystemExit(f"stage budgets add up to {total} s, over the {LIMIT_S} s limit")
    missing = [] if (CARRY / "wheels").is_dir() else ["make gpu-carry (.gpu-carry/ is missing)"]
    (out / "plan.json").write_text(json.dumps({"budget_s": total, "wheels": specs, "todo": missing}, indent=2))


def carry() -> None:
    """Here (network): the wheels of gpu/wheels.txt for Python 3.12 x86_64, and the Qwen3 tokenizer."""
    wheels = CARRY / "wheels"
    shutil.rmtree(CARRY, ignore_errors=True)
    wheels.mkdir(parents=True)
    specs = [f"{n}=={v}" for n, v in wheel_specs()]
    binary = [s for s in specs if s.split("==")[0] not in SDIST_ONLY]
    pip = [sys.executable, "-m", "pip", "-q"]
    subprocess.run([*pip, "download", "--no-deps", "--only-binary=:all:", *PLATFORM, "-d", wheels, *binary], check=True)
    built = [s for s in specs if s.split("==")[0] in SDIST_ONLY]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", wheels, *built], check=True)
    shutil.copytree(QWEN3_TOKENIZER, CARRY / "qwen3-tokenizer")
    size = sum(p.stat().st_size for p in CARRY.rglob("*") if p.is_file())
    print(f"{CARRY}: {len(list(wheels.glob('*.whl')))} wheels + tokenizer, {size / 2**20:.1f} MiB (carry limit 64)")


def build_model(path: Path) -> None:
    """A random-init Qwen3 shaped like Qwen3-0.6B with the carried Qwen3 tokenizer, as an HF directory."""
    import torch
    from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(CARRY / "qwen3-tokenizer")
    config = Qwen3Config(**QWEN3_06B, max_position_embeddings=4096)
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(config)
    model.generation_config.eos_token_id = [tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    print(f"{path}: {sum(p.numel() for p in model.parameters()) / 1e9:.2f}B parameters")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, help="output folder (summary.json, summary.md, logs.txt, memory.json)")
    ap.add_argument("--dry-run", action="store_true", help="no GPU: check the plan and every run's config")
    ap.add_argument("--carry", action="store_true", help="here: fill .gpu-carry/ (wheels, tokenizer)")
    ap.add_argument("--build-model", type=Path, help=argparse.SUPPRESS)  # the model stage's own subprocess
    args = ap.parse_args()
    if args.build_model:
        return build_model(args.build_model)
    if args.carry:
        return carry()
    if args.out is None:
        ap.error("--out is required")
    args.out.mkdir(parents=True, exist_ok=True)
    plan = stages(args.out.resolve())
    if args.dry_run:
        return dry_run(args.out, plan)
    if not (CARRY / "wheels").is_dir():
        raise SystemExit(f"{CARRY / 'wheels'} is missing: run `make gpu-carry` on a machine with pip access first")
    site = args.out.resolve() / "work" / "site"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(ROOT)]), "PYTHONUNBUFFERED": "1"}
    env |= {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    done: set[str] = set()
    with open(args.out / "logs.txt", "w") as log:
        for stage in plan:
            if any(n not in done for n in stage.needs):
                stage.result = {"status": f"skipped: needs {', '.join(stage.needs)}"}
                print(f"{stage.name:7s} {stage.result['status']}")
                continue
            run_stage(stage, env, log)
            if stage.result["status"] == "ok":
                done.add(stage.name)
    summary = write_summary(args.out, plan)
    failed = [n for n, r in summary["stages"].items() if r.get("status") != "ok"]
    sys.exit(f"gpu-check: {', '.join(failed)} did not pass (see {args.out / 'logs.txt'})" if failed else 0)


if __name__ == "__main__":
    main()
