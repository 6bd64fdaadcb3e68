"""Every YAML under conf/ composes and instantiates; bad configs fail early with one line."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import require_extra
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from lightning_prerl.config.checks import ConfigError, validate_config

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
# see below; arm/: experiment=reproduce_recheck's arms, composed with it in test_reproduction.py
GROUPS = sorted(p.name for p in CONF.iterdir() if p.is_dir() and p.name not in ("recipe", "benchmark", "arm"))


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    """Tiny stand-ins for the math data files, in their real formats (verl parquet, JSONL)."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    root = tmp_path_factory.mktemp("data")
    (root / "math_train").mkdir()
    pq.write_table(
        pa.Table.from_pylist(
            [
                {
                    "prompt": [{"role": "user", "content": f"What is {i}+1?"}],
                    "reward_model": {"ground_truth": {"target": str(i + 1)}, "style": "rule"},
                }
                for i in range(4)
            ]
        ),
        root / "math_train" / "train.parquet",
    )
    (root / "math500").mkdir()
    (root / "math500" / "test.jsonl").write_text(
        "\n".join(json.dumps({"problem": f"Half of {2 * i}?", "answer": str(i)}) for i in range(3))
    )
    for name in ("aime24", "amc23"):  # Qwen2.5-Math layout
        (root / name).mkdir()
        (root / name / "test.jsonl").write_text(json.dumps({"id": 0, "problem": "2+2?", "answer": "4"}))
    (root / "aime25").mkdir()  # verl parquet
    pq.write_table(
        pa.Table.from_pylist(
            [{"prompt": [{"role": "user", "content": "3+3?"}], "reward_model": {"ground_truth": {"target": "6"}}}]
        ),
        root / "aime25" / "test.parquet",
    )
    (root / "gsm8k").mkdir()
    for split in ("train", "test"):
        (root / "gsm8k" / f"{split}.jsonl").write_text(
            "\n".join(
                json.dumps({"question": f"{i} apples plus 1?", "answer": f"{i}+1=<<{i}+1={i + 1}>>\n#### {i + 1}"})
                for i in range(3)
            )
        )
    return root


def compose_cfg(*overrides: str, model_dir: Path | None = None):
    extra = [f"model.path={model_dir}"] if model_dir else []
    with initialize_config_dir(str(CONF), version_base="1.3"):
        return compose("config", overrides=["run_dir=/tmp/unused", *extra, *overrides])


@pytest.mark.parametrize(
    "group,option",
    [(g, p.stem) for g in GROUPS for p in sorted((CONF / g).glob("*.yaml"))],
)
def test_every_config_option_composes_and_instantiates(group, option, tiny_model_dir, tmp_path, data_root):
    gguf = ["model.gguf_file=null"] if group == "experiment" else []  # a preset's GGUF model: the tiny one here
    cfg = compose_cfg(f"{group}={option}", f"data_root={data_root}", *gguf, model_dir=tiny_model_dir)
    cfg.run_dir = str(tmp_path)
    validate_config(cfg)
    node = {"objective": cfg.objective, "rollout": cfg.rollout, "trainer": cfg.trainer}.get(group)
    if group == "trainer":
        return  # strategies that need several processes or a GPU are built by Lightning at fit time
    if group == "model":
        return  # other models point at directories that only a real run provides
    if group == "logger":
        if option == "wandb" and importlib.util.find_spec("wandb") is None:
            require_extra("wandb", "wandb is not installed")
        assert all(instantiate(lg) for lg in cfg.logger.values())
        return
    if node is not None:
        assert instantiate(node) is not None
    objective = instantiate(cfg.objective)
    module = instantiate(cfg.module, _partial_=True)(objective=getattr(objective, "initial_objective", objective))
    if group in ("data", "experiment"):
        dm = instantiate(cfg.data, _partial_=True, _convert_="all")(
            tokenizer=module.tokenizer, engine=instantiate(cfg.rollout)
        )
        assert dm.train_prompts and dm.eval_prompts
    assert [instantiate(c) for c in cfg.callbacks.values()]


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["objective=grpo", "data.samples_per_prompt=1"], "data.samples_per_prompt=1 with objective advantage 'grpo'"),
        (["data.samples_per_prompt=1"], "data.samples_per_prompt=1 with objective advantage 'group_mean'"),  # DSRL
        (["data.samples_per_prompt=-2"], "data.samples_per_prompt=-2: must be >= 1"),
        (["model.path=/nonexistent/model"], "model.path='/nonexistent/model'"),
        (["module.pass_k=[1,4]"], "module.pass_k contains 4 > data.eval_samples=2"),
        (["trainer.max_steps=0"], "trainer.max_steps=0"),
        (["rollout=vllm", "rollout.max_model_len=100"], "rollout.max_model_len=100 < data.sampling.max_new_tokens"),
        (["trainer=fsdp", "trainer.strategy.tensor_parallel_size=2"], "tensor_parallel_size=2: only 1 is supported"),
        (["trainer=ddp", "data.prompts_per_step=3"], "prompts_per_step=3 does not divide by the world size 2"),
        (["trainer=fsdp", "trainer.num_nodes=2", "data.prompts_per_step=6"], "does not divide by the world size 4"),
        (["model.dtype=float16"], "model.dtype=float16: fp16 compute needs loss scaling"),
        # declared types and ranges (lightning_prerl/config/schema.py)
        (["module.lr=abc"], "module.lr='abc': input should be a valid number"),
        (["objective.main.eps_high=1.5"], "objective.main.eps_high=1.5: must be < 1"),
        (["objective=grpo", "objective.eps_low=-0.1"], "objective.eps_low=-0.1: must be >= 0"),
        (["data.sampling.top_p=0"], "data.sampling.top_p=0: must be > 0"),
        # the key the user typed, not the one that reads it through ${...} (module.temperature)
        (["data.sampling.temperature=-1"], "data.sampling.temperature=-1: must be > 0.0 (module.temperature reads it)"),
        (["module.betas=[0.9,1.2]"], "module.betas=1.2: must be < 1"),
        # conditioning spaces (lightning_prerl/objectives/spaces.py)
        (
            ["objective=grpo", "objective.space=both"],
            "objective.space='both': expected one of 'conditional', 'fixed', 'last_k', 'marginal', 'question', "
            "'system'",
        ),
        (
            ["objective=grpo", "objective.space=last_k"],
            "objective.space_args={}: k=<missing>: space 'last_k' requires it",
        ),
        (
            ["objective.warmup.space=last_k", "+objective.warmup.space_args.k=0"],
            "objective.warmup.space_args={'k': 0}: k=0: must be >= 1 (the last k prompt tokens)",
        ),
        (["objective=grpo", "objective.space=fixed"], "data.fixed_context=null: the fixed space needs the text that"),
        (
            ["diagnostics=alignment", "callbacks.alignment.pairs=[[marginal,nope]]"],
            "callbacks.alignment.pairs=['marginal', 'nope']: space 'nope': expected one of ['conditional', 'fixed'",
        ),
        (
            ["diagnostics=alignment", "callbacks.alignment.pairs=[[marginal,{space:last_k,space_args:{k:-1}}]]"],
            "callbacks.alignment.pairs=['marginal', {'space': 'last_k', 'space_args': {'k': -1}}]: k=-1: must be >= 1",
        ),
        (["diagnostics=alignment", "callbacks.alignment.pairs=[[marginal]]"], "callbacks.alignment.pairs=['marginal']"),
        (["diagnostics=alignment", "callbacks.alignment.pairs=[[question,fixed]]"], "data.fixed_context=null"),
        (["module.micro_batch_size=0"], "module.micro_batch_size=0: must be >= 1"),
        (["model.dtype=float64"], "model.dtype='float64': expected one of 'float32', 'bfloat16', 'float16'"),
        (["data.reward_timeout_s=-1"], "data.reward_timeout_s=-1: must be > 0"),
        (["module.pass_k=[0]"], "module.pass_k=0: must be >= 1"),
        (["threads=two"], "threads='two': input should be a valid integer"),
        (["data.samples_per_prompt=2.5"], "data.samples_per_prompt=2.5: input should be a valid integer"),
        (["trainer.devices=0"], "trainer.devices=0: must be >= 1"),
        (["module.activation_checkpointing=maybe"], "module.activation_checkpointing='maybe': input should be a valid"),
        (["objective=grpo", "objective.clip_c=1"], "objective.clip_c=1: must be > 1"),
        (["model=hf_local"], "model.path=???: required"),
        (["eval.samples=0"], "eval.samples=0: must be >= 1"),
        (["eval.benchmarks=[]"], "eval.benchmarks=[]: must not be empty"),
        # contradictions between keys
        (["objective.switch_step=60"], "objective.switch_step=60 >= trainer.max_steps=60: DSRL would never leave"),
        (["objective.switch_step=null"], "objective.switch_step=null with objective.monitor=null: DSRL would never"),
    ],
)
def test_bad_values_fail_before_compute_naming_the_key(overrides, message):
    cfg = compose_cfg(*overrides)
    with pytest.raises(ConfigError) as exc:
        validate_config(cfg)
    assert message in str(exc.value) and "\n" not in str(exc.value)


def test_signed_advantage_allows_one_sample_per_prompt():
    validate_config(compose_cfg("objective=grpo", "data.samples_per_prompt=1", "objective.advantage=signed"))


@pytest.mark.slow
def test_run_script_reports_config_errors_in_one_line(tmp_path):
    bad = subprocess.run(
        [sys.executable, "experiments/run.py", "data.samples_per_prompt=1", f"hydra.run.dir={tmp_path}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode != 0
    lines = [line for line in bad.stderr.splitlines() if line.startswith("config error:")]
    assert len(lines) == 1 and "data.samples_per_prompt=1" in lines[0]
    unknown = subprocess.run(
        [sys.executable, "experiments/run.py", "objective=nope"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert unknown.returncode != 0
    assert unknown.stderr.strip().splitlines()[-1].startswith("config error: objective='nope' is not an option")
    # mistakes found only once the model is loaded inside fit, or with its tokenizer: the key typed, no traceback
    for override, message in (
        ("model.lora.target_modules=[no_such_module]", "config error: model.lora.target_modules=['no_such_module']:"),
        ("model.start_token='<nope>'", "config error: model.start_token='<nope>': not a single token"),
    ):
        late = subprocess.run(
            [sys.executable, "experiments/run.py", "objective=grpo", "model.lora.r=8", override, "trainer.max_steps=1"]
            + [f"hydra.run.dir={tmp_path / 'late'}"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert late.returncode != 0 and "Traceback" not in late.stderr, late.stderr[-2000:]
        assert late.stderr.strip().splitlines()[-1].startswith(message), late.stderr[-500:]


def test_unknown_group_options_are_named_with_the_allowed_ones():
    from lightning_prerl.config.checks import check_group_choices

    check_group_choices(["objective=grpo,dsrl", "trainer.max_steps=3", "experiment=null"], CONF)
    with pytest.raises(ConfigError, match=r"objective='nope' is not an option: choose one of \[.*'dsrl', 'grpo'"):
        check_group_choices(["objective=grpo,nope"], CONF)
    with pytest.raises(ConfigError, match=r"rollout='vlm'"):
        check_group_choices(["rollout=vlm"], CONF)


@pytest.mark.parametrize("name", ["paper_dsrl_qwen3_4b", "paper_grpo_qwen3_4b"])
def test_paper_presets_resolve_for_eight_gpus(name, tiny_model_dir, data_root):
    """The paper's run on 8 GPUs: FSDP2 over all 8 ranks, 128 prompts x 8 samples per step in all
    (16 prompts per GPU), float32 master weights with bf16 compute, activation checkpointing, bf16 vLLM."""
    cfg = compose_cfg(f"experiment={name}", "trainer.devices=8", f"data_root={data_root}", model_dir=tiny_model_dir)
    validate_config(cfg)
    t = cfg.trainer
    assert t.strategy._target_.endswith("ModelParallelStrategy") and t.accelerator == "auto"
    assert (t.strategy.data_parallel_size, t.strategy.tensor_parallel_size) == (8, 1)
    assert t.precision == "32-true"  # compute dtype through FSDP2's MixedPrecisionPolicy
    module = cfg.module
    assert (module.dtype, module.param_dtype, module.activation_checkpointing) == ("bfloat16", "float32", True)
    assert (cfg.data.prompts_per_step, cfg.data.samples_per_prompt) == (128, 8)
    assert cfg.module.lr == 1e-6 and cfg.module.weight_decay == 0.01 and cfg.module.max_grad_norm == 1.0
    lengths = (cfg.data.sampling.max_new_tokens, cfg.data.max_prompt_tokens, cfg.rollout.max_model_len)
    assert lengths == (8192, 1024, 9216)
    assert cfg.rollout.dtype == "bfloat16" and t.max_steps == 348
    if name == "paper_dsrl_qwen3_4b":
        assert cfg.objective.switch_step == 19 and cfg.objective.warmup.samples == "negative"
        assert cfg.objective.main.eps_high == 0.2 and cfg.objective.warmup.lr_scale == 1.0
    else:
        assert (cfg.objective.eps_low, cfg.objective.eps_high, cfg.objective.clip_c) == (0.2, 0.28, 10.0)


def test_distributed_trainers_use_the_gpus_when_present_else_two_cpu_processes(monkeypatch):
    import torch

    for name in ("ddp", "fsdp"):
        cfg = compose_cfg(f"trainer={name}")
        assert cfg.trainer.accelerator == "auto" and cfg.trainer.devices == 2  # no CUDA here: 2 gloo processes
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
        assert compose_cfg(f"trainer={name}").trainer.devices == 8
        monkeypatch.undo()
    assert compose_cfg("model.dtype=bfloat16").trainer.precision == "bf16-mixed"
    assert compose_cfg("model.dtype=bfloat16", "model.param_dtype=bfloat16").trainer.precision == "32-true"


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_trainers_build_their_strategy_here_and_refuse_cpu_runs_in_one_line(stage):
    from types import SimpleNamespace

    from lightning_prerl.config.compose import check_deepspeed
    from lightning_prerl.scale.zero import offloads_optimizer, set_gradient_clipping

    cfg = compose_cfg(f"trainer=deepspeed_zero{stage}", "model.dtype=bfloat16", "module.max_grad_norm=0.5")
    validate_config(cfg)
    assert cfg.trainer.precision == "bf16-mixed"  # bf16 compute, float32 master weights in DeepSpeed's optimizer
    strategy = instantiate(cfg.trainer.strategy)
    assert type(strategy).__name__ == "DeepSpeedStrategy" and strategy.config["zero_optimization"]["stage"] == stage
    trainer = SimpleNamespace(strategy=strategy)
    set_gradient_clipping(trainer, cfg.module.max_grad_norm)
    assert strategy.config["gradient_clipping"] == 0.5 and not offloads_optimizer(trainer)
    offloaded = compose_cfg(f"trainer=deepspeed_zero{stage}", "trainer.strategy.offload_optimizer=true")
    assert offloads_optimizer(SimpleNamespace(strategy=instantiate(offloaded.trainer.strategy)))
    with pytest.raises(ConfigError, match=r"^trainer=deepspeed_\*: Lightning's DeepSpeedStrategy runs on CUDA"):
        check_deepspeed(cfg)  # no CUDA on this machine
    with pytest.raises(ConfigError, match=r"model.lora.r=4 with trainer strategy DeepSpeed"):
        validate_config(compose_cfg(f"trainer=deepspeed_zero{stage}", "model.lora.r=4"))
    # the engine exists only after deepspeed.initialize: configure_model (which builds the reference)
    # runs while the strategy still holds the LightningModule
    from lightning_prerl.scale.zero import engine_of

    assert engine_of(trainer) is None
    strategy.model = torch.nn.Linear(1, 1)
    assert engine_of(trainer) is None
    strategy.model = SimpleNamespace(set_gradient_accumulation_boundary=lambda last: None)
    assert engine_of(trainer) is strategy.model


@pytest.mark.parametrize("name", ["ddp", "fsdp"])
def test_num_nodes_reaches_the_strategy(name):
    cfg = compose_cfg(f"trainer={name}", "trainer.num_nodes=2", "data.prompts_per_step=8")
    validate_config(cfg)
    trainer = instantiate(cfg.trainer, logger=False, enable_checkpointing=False)
    assert (trainer.num_nodes, trainer.strategy.num_nodes, trainer.world_size) == (2, 2, 4)
    if name == "fsdp":
        assert trainer.strategy._data_parallel_size == 4  # data parallel over every rank of every node
