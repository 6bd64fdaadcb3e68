"""The end-of-run summary (summary.json + printed table), a clean terminal, and the W&B logger option."""

from __future__ import annotations

import csv
import importlib.util
import json
import logging
import os
import re
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from test_run import FAST, ROOT, read_rows, run_experiment

from lightning_prerl.config.compose import build_run, route_lightning_logs, without_secrets
from lightning_prerl.reports.callbacks import RunSummary
from lightning_prerl.reports.summary import build_summary, print_summary

SECRET = "sk-not-a-real-key-0123456789"
HAS_WANDB = importlib.util.find_spec("wandb") is not None


def write_metrics(path: Path, rows: list[dict]) -> Path:
    keys = sorted({k for r in rows for k in r})
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, keys)
        writer.writeheader()
        writer.writerows(rows)
    return path


def compose_cfg(*overrides: str):
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=["run_dir=/tmp/unused", *overrides])


# -- the summary builder on a hand-written metrics.csv ------------------------------------------------


def test_summary_holds_first_and_last_evaluation_mean_timings_and_skips(tmp_path):
    rollout = [
        {"step": s, "time/generate": g, "time/score": 0.5, "time/train": t, "time/sync": 0.0, "train/skipped_steps": k}
        for s, g, t, k in [(0, 1.0, 2.0, 0), (1, 3.0, 4.0, 1), (2, 5.0, 6.0, 1)]
    ]
    evals = [
        {"step": 0, "val/accuracy": 0.25, "val/avg@4": 0.25, "val/pass@4": 0.5, "val/pass@2": 0.4},
        {"step": 0, "val/format_valid": 0.9, "val/reflection_rate": 0.1, "val/response_length": 80},
        {"step": 0, "val/aime24/accuracy": 0.0, "val/aime24/transition_thoughts": 0.2},
        {"step": 3, "val/accuracy": 0.5, "val/avg@4": 0.5, "val/pass@4": 0.75, "val/pass@2": 0.6},
        {"step": 3, "val/format_valid": 1.0, "val/reflection_rate": 0.3, "val/response_length": 90},
        {"step": 3, "val/aime24/accuracy": 0.125, "val/aime24/transition_thoughts": 0.4},
    ]
    summary = build_summary(write_metrics(tmp_path / "metrics.csv", rollout + evals), {"run_dir": "/r"})

    held = summary["heldout"]
    assert (held["before_step"], held["after_step"]) == (0, 3)
    # aggregate first (accuracy, avg@k, pass@k by k, format, behaviour), then per benchmark; no length
    assert list(held["metrics"]) == [
        "val/accuracy",
        "val/avg@4",
        "val/pass@2",
        "val/pass@4",
        "val/format_valid",
        "val/reflection_rate",
        "val/aime24/accuracy",
        "val/aime24/transition_thoughts",
    ]
    assert held["metrics"]["val/accuracy"] == {"before": 0.25, "after": 0.5}
    assert held["metrics"]["val/aime24/transition_thoughts"] == {"before": 0.2, "after": 0.4}
    # means over the 3 rollout rows: generate (1+3+5)/3 = 3, train (2+4+6)/3 = 4, total 3 + 0.5 + 4 + 0 = 7.5
    assert summary["seconds_per_step"] == {
        "time/generate": 3.0,
        "time/score": 0.5,
        "time/train": 4.0,
        "time/sync": 0.0,
        "total": 7.5,
    }
    assert summary["rollout_steps"] == 3
    assert summary["skipped_steps"] == 1  # the counter is cumulative: its last value
    assert summary["artefacts"] == {"run_dir": "/r"}


@pytest.mark.parametrize(
    "steps,before,after",
    [([0], 0, None), ([5], None, 5), ([4, 8], 4, 8)],  # no training yet / no step-0 eval / resumed elsewhere
)
def test_before_and_after_are_only_claimed_when_they_exist(tmp_path, steps, before, after):
    rows = [{"step": s, "val/accuracy": 0.1 * (i + 1)} for i, s in enumerate(steps)]
    held = build_summary(write_metrics(tmp_path / "metrics.csv", rows))["heldout"]
    assert (held["before_step"], held["after_step"]) == (before, after)
    values = held["metrics"]["val/accuracy"]
    assert (values["before"] is None, values["after"] is None) == (before is None, after is None)


def test_a_run_without_evaluation_or_timings_still_summarises(tmp_path, capsys):
    summary = build_summary(write_metrics(tmp_path / "metrics.csv", [{"step": 0, "train/loss": 1.0}]))
    assert summary["heldout"]["metrics"] == {} and summary["seconds_per_step"] == {}
    print_summary(summary)
    out = capsys.readouterr().out
    assert "no held-out evaluation logged" in out and "seconds per step (mean of 0): not logged" in out


def test_printed_table_keeps_long_paths_whole(tmp_path, capsys):
    rows = [{"step": 0, "val/accuracy": 0.25, "time/generate": 1.0}, {"step": 2, "val/accuracy": 0.5}]
    path = "/very/long/" + "x" * 150 + "/policy"
    print_summary(build_summary(write_metrics(tmp_path / "metrics.csv", rows), {"policy": path}))
    out = capsys.readouterr().out
    assert out.count("Run summary: held-out metrics") == 1
    assert re.search(r"val/accuracy\s*│\s*0\.250\s*│\s*0\.500\s*│\s*\+0\.250", out)
    assert f"policy: {path}\n" in out


def test_thought_counts_that_are_zero_at_both_ends_are_not_printed_but_kept_in_the_json(tmp_path, capsys):
    """A world without thoughts logs 0 -> 0 thought counts: meaningless rows, hidden (a count that moved stays)."""
    rows = [
        {"step": 0, "val/accuracy": 0.25, "val/reflection_thoughts": 0.0, "val/transition_thoughts": 0.0},
        {"step": 2, "val/accuracy": 0.5, "val/reflection_thoughts": 0.0, "val/transition_thoughts": 0.5},
    ]
    summary = build_summary(write_metrics(tmp_path / "metrics.csv", rows))
    print_summary(summary)
    out = capsys.readouterr().out
    assert "val/reflection_thoughts" not in out
    assert re.search(r"val/transition_thoughts\s*│\s*0\.000\s*│\s*0\.500", out)
    assert summary["heldout"]["metrics"]["val/reflection_thoughts"] == {"before": 0.0, "after": 0.0}


def test_summary_is_written_by_rank_zero_only(tmp_path):
    trainer = SimpleNamespace(is_global_zero=False, loggers=[], callbacks=[])
    RunSummary(str(tmp_path)).on_fit_end(trainer, None)
    assert not (tmp_path / "summary.json").exists()


# -- terminal: Lightning's lines once, no adverts -------------------------------------------------------


def test_lightning_logs_go_through_the_root_handlers_only_and_adverts_are_dropped():
    import lightning  # noqa: F401  (attaches its own console handler to the `lightning` logger)

    root = logging.getLogger()
    added = logging.NullHandler()  # stands in for Hydra's job logging handlers
    root.addHandler(added)
    try:
        route_lightning_logs()
        route_lightning_logs()  # idempotent: entry points may call it more than once
    finally:
        root.removeHandler(added)
    assert logging.getLogger("lightning").handlers == []
    rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    assert len(rank_zero.filters) == 1
    tip = logging.makeLogRecord({"msg": "💡 Tip: For seamless cloud logging, try installing [litlogger](...)"})
    assert not rank_zero.filter(tip)
    assert rank_zero.filter(logging.makeLogRecord({"msg": "GPU available: False, used: False"}))


# -- loggers: W&B option, secrets --------------------------------------------------------------------


def test_wandb_logger_option_adds_wandb_offline_unless_the_environment_says_otherwise(monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    cfg = compose_cfg("logger=wandb")
    assert set(cfg.logger) == {"csv", "tensorboard", "wandb"}
    assert cfg.logger.wandb.mode == "offline" and cfg.logger.wandb.save_dir == "/tmp/unused"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert compose_cfg("logger=wandb").logger.wandb.mode == "disabled"
    assert set(compose_cfg().logger) == {"csv", "tensorboard"}  # the default stays offline files only


def test_missing_wandb_fails_in_one_line_before_any_model_is_loaded(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "wandb", None)  # find_spec answers None: as if not installed
    cfg = compose_cfg("logger=wandb", f"run_dir={tmp_path}")
    with pytest.raises(SystemExit) as exc:
        build_run(cfg)
    assert str(exc.value) == "config error: logger.wandb (WandbLogger) needs the wandb package: pip install -e .[wandb]"
    assert not (tmp_path / "config.yaml").exists()


def test_secret_environment_values_never_reach_the_saved_config(monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", SECRET)
    cfg = compose_cfg("logger=wandb", "+logger.wandb.api_key=${oc.env:WANDB_API_KEY}")  # a user's mistake
    saved = OmegaConf.to_yaml(without_secrets(cfg))
    assert SECRET not in saved and "api_key: '***'" in saved
    assert "mode: offline" in saved and "project: lightning-prerl" in saved  # the rest resolved as before


# -- end to end ----------------------------------------------------------------------------------------


def _lightning_messages(output: str) -> list[str]:
    """Lightning's log messages from a run's terminal output, with Hydra's [time][logger][LEVEL] prefix cut."""
    return [
        line.split("] - ", 1)[1]
        for line in output.splitlines()
        if re.match(r"\[[^]]+\]\[lightning\.[^]]+\]\[\w+\] - ", line)
    ]


@pytest.mark.slow
def test_real_run_prints_its_summary_once_and_writes_summary_json(tmp_path):
    run_dir = tmp_path / "run"
    proc = run_experiment(run_dir, *FAST)
    rows = read_rows(run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())

    def column(key):  # (step, value) of every row that logged key
        return [(int(r["step"]), float(r[key])) for r in rows if r.get(key)]

    held = summary["heldout"]
    assert (held["before_step"], held["after_step"]) == (0, 3)
    for key in ("val/accuracy", "val/avg@2", "val/pass@1", "val/pass@2", "val/format_valid", "val/reflection_rate"):
        assert held["metrics"][key] == {"before": column(key)[0][1], "after": column(key)[-1][1]}, key
    for key in ("time/generate", "time/score", "time/train", "time/sync"):
        values = [v for _, v in column(key)]
        assert len(values) == 3 and summary["seconds_per_step"][key] == pytest.approx(sum(values) / 3), key
    assert summary["skipped_steps"] == 0 and summary["optimizer_steps"] == 3
    artefacts = summary["artefacts"]
    assert {"run_dir", "policy", "report", "checkpoints", "tensorboard", "metrics", "summary"} <= set(artefacts)
    assert all(Path(p).exists() for p in artefacts.values())

    output = proc.stdout + proc.stderr
    assert proc.stdout.count("Run summary: held-out metrics") == 1
    assert re.search(r"val/accuracy\s*│\s*[\d.]+\s*│\s*[\d.]+\s*│\s*[+-][\d.]+", proc.stdout)
    assert f"policy: {run_dir / 'policy'}" in proc.stdout
    messages = _lightning_messages(output)
    assert "`Trainer.fit` stopped: `max_steps=3` reached." in messages
    assert len(messages) == len(set(messages)), messages  # each Lightning line once
    assert not [line for line in output.splitlines() if line.startswith("INFO: ")]  # Lightning's own handler
    assert "Tip:" not in output and "litlogger" not in output and "litmodels" not in output


@pytest.mark.slow
def test_wandb_run_is_offline_and_keeps_the_api_key_out_of_the_run_dir(tmp_path, monkeypatch):
    if not HAS_WANDB:  # make setup installs the wandb extra: under CI a missing wandb is a broken setup
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail("wandb is required under CI=true (make setup installs the wandb extra)")
        pytest.skip("wandb not installed (pip install -e .[wandb])")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_API_KEY", SECRET)  # inherited by the run: must not be written anywhere
    run_dir = tmp_path / "wandb-run"
    run_experiment(
        run_dir,
        "logger=wandb",
        "trainer.max_steps=1",
        "objective=grpo",
        "data.prompts_per_step=2",
        "data.samples_per_prompt=2",
        "data.eval_prompts.count=4",
        "data.sampling.max_new_tokens=32",
    )
    (offline,) = (run_dir / "wandb").glob("offline-run-*")
    assert list(offline.glob("*.wandb"))  # the run's records, for a later `wandb sync`
    assert "wandb" in json.loads((run_dir / "summary.json").read_text())["artefacts"]
    saved = [p for p in run_dir.rglob("*") if p.is_file() and p.suffix in (".yaml", ".json", ".log", ".txt")]
    assert (run_dir / "config.yaml") in saved
    assert not [p for p in saved if SECRET in p.read_text(errors="ignore")]
