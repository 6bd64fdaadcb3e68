"""Every YAML under conf/ composes and instantiates; bad configs fail early with one line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from lightning_prerl.config import ConfigError, validate_config

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
GROUPS = sorted(p.name for p in CONF.iterdir() if p.is_dir() and p.name != "recipe")  # recipes: via experiments


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
    cfg = compose_cfg(f"{group}={option}", f"data_root={data_root}", model_dir=tiny_model_dir)
    cfg.run_dir = str(tmp_path)
    validate_config(cfg)
    node = {"objective": cfg.objective, "rollout": cfg.rollout, "trainer": cfg.trainer}.get(group)
    if group == "trainer":
        return  # strategies that need several processes or a GPU are built by Lightning at fit time
    if group == "model":
        return  # other models point at directories that only a real run provides
    if group == "logger":
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
    ],
)
def test_bad_values_fail_before_compute_naming_the_key(overrides, message):
    cfg = compose_cfg(*overrides)
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        validate_config(cfg)


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


def test_unknown_group_options_are_named_with_the_allowed_ones():
    from lightning_prerl.config import check_group_choices

    check_group_choices(["objective=grpo,dsrl", "trainer.max_steps=3", "experiment=null"], CONF)
    with pytest.raises(ConfigError, match=r"objective='nope' is not an option: choose one of \['dsrl'"):
        check_group_choices(["objective=grpo,nope"], CONF)
    with pytest.raises(ConfigError, match=r"rollout='vlm'"):
        check_group_choices(["rollout=vlm"], CONF)
