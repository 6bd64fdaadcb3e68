"""Sweeps: the summary over seeds checked by hand, the report's PNGs, the thread rule, a real joblib sweep.

Job directories are built as Hydra and the CSVLogger leave them: `<job>/.hydra/overrides.yaml` and
`<job>/logs/metrics.csv`, plus the sweep's `multirun.yaml`.
"""

from __future__ import annotations

import csv
import math
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from lightning_prerl.reports.plots import write_sweep_report
from lightning_prerl.reports.sweep import ParallelJobs, find_jobs, oversubscription, short_names, swept_keys

ROOT = Path(__file__).resolve().parents[1]
COEF, SWITCH, LR = "objective.warmup.coef", "objective.switch_step", "objective.warmup.lr_scale"
MODULE_LR = "module.lr"  # the real sweep's second key: independent of how DSRL names its warm-up knobs


def write_job(sweep: Path, num: int, overrides: dict[str, str], finals: dict[str, float] | None) -> Path:
    """A job dir: its overrides (with one fixed key, as a real sweep has) and, unless `finals` is None
    (a job that died before logging), a metrics CSV whose final values are `finals`."""
    job = sweep / str(num)
    (job / ".hydra").mkdir(parents=True)
    lines = [f"- {k}={v}" for k, v in overrides.items()] + ["- trainer.max_steps=3", "- hydra.verbose=false"]
    (job / ".hydra" / "overrides.yaml").write_text("\n".join(lines) + "\n")
    if finals is None:
        return job
    rows = [{"step": 0, **{k: 0.25 for k in finals}}]  # before training: never part of the summary
    rows += [{"step": s, "objective/phase": int(s >= 2), "train/loss": 1.0} for s in range(3)]
    rows.append({"step": 3, **finals})
    (job / "logs").mkdir()
    with open(job / "logs" / "metrics.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, sorted({k for r in rows for k in r}))
        writer.writeheader()
        writer.writerows(rows)
    return job


def write_multirun(sweep: Path, task: list[str]) -> None:
    (sweep / "multirun.yaml").write_text("hydra:\n  overrides:\n    task:\n" + "".join(f"    - {t}\n" for t in task))


def read_summary(sweep: Path) -> list[dict[str, str]]:
    with open(sweep / "sweep_summary.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) in pixels, read back by PIL and by matplotlib."""
    import matplotlib.image
    from PIL import Image

    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        size = image.size
    assert matplotlib.image.imread(path).shape[:2] == (size[1], size[0])
    return size


@pytest.fixture
def grid_sweep(tmp_path) -> Path:
    """coef x switch_step x seed, 2 x 2 x 2, switch_step given as 10 then 2 (sorted numerically: 2, 10).

    Final val/accuracy per (coef, switch, seed); (0.1, 10) lost seed 1 (no metrics CSV).
    """
    finals = {
        ("0.01", "2"): [0.50, 0.70],
        ("0.01", "10"): [0.40, 0.46],
        ("0.1", "2"): [0.30, 0.30],
        ("0.1", "10"): [0.80, None],
    }
    num = 0
    for (coef, switch), accs in finals.items():
        for seed, acc in enumerate(accs):
            metrics = None if acc is None else {"val/accuracy": acc, "val/reflection_rate": acc / 10}
            write_job(tmp_path, num, {"objective": "dsrl", COEF: coef, SWITCH: switch, "seed": str(seed)}, metrics)
            num += 1
    write_multirun(tmp_path, ["objective=dsrl", f"{COEF}=0.01,0.1", f"{SWITCH}=10,2", "seed=0,1"])
    return tmp_path


def test_summary_is_mean_and_sample_std_over_seeds_of_the_final_values(grid_sweep):
    written = write_sweep_report(grid_sweep)
    assert [p.name for p in written] == [
        "sweep_summary.csv",
        "sweep_heatmap.png",
        "sweep_curves.png",
        "sweep_behavior.png",
    ]
    rows = read_summary(grid_sweep)
    # keys in command-line order, values numerically sorted; seed is not a configuration key
    assert [(r[COEF], r[SWITCH], r["seeds"], r["jobs"]) for r in rows] == [
        ("0.01", "2", "2", "0 1"),
        ("0.01", "10", "2", "2 3"),
        ("0.1", "2", "2", "4 5"),
        ("0.1", "10", "1", "6 7"),  # job 7 never logged
    ]
    acc = [(float(r["val/accuracy_mean"]), r["val/accuracy_std"]) for r in rows]
    # mean (a+b)/2; sample std |a-b|/sqrt(2): 0.2/1.41421 = 0.141421, 0.06/1.41421 = 0.042426
    assert acc[0][0] == pytest.approx(0.60) and float(acc[0][1]) == pytest.approx(0.1414214, abs=1e-6)
    assert acc[1][0] == pytest.approx(0.43) and float(acc[1][1]) == pytest.approx(0.0424264, abs=1e-6)
    assert acc[2][0] == pytest.approx(0.30) and float(acc[2][1]) == pytest.approx(0.0, abs=1e-12)
    assert acc[3] == (pytest.approx(0.80), "")  # one seed: no std
    assert float(rows[0]["val/reflection_rate_mean"]) == pytest.approx(0.06)
    assert float(rows[0]["val/reflection_rate_std"]) == pytest.approx(0.01414214, abs=1e-7)
    assert "trainer.max_steps" not in rows[0]  # the same in every job: not swept


def test_sweep_pngs_are_real_images_of_the_expected_size(grid_sweep):
    write_sweep_report(grid_sweep)
    assert png_size(grid_sweep / "sweep_heatmap.png") == (550, 450)  # one 5.5 x 4.5 in panel at 100 dpi
    assert png_size(grid_sweep / "sweep_curves.png") == (700, 550)  # 2 x 2 panels of 3.5 x 2.75 in
    assert png_size(grid_sweep / "sweep_behavior.png") == (800, 700)
    assert (grid_sweep / "sweep_heatmap.png").stat().st_size > 15_000  # drawn, not blank


def test_one_swept_key_gives_a_bar_chart(tmp_path):
    for num, (switch, seed, acc) in enumerate([("5", "0", 0.2), ("5", "1", 0.4), ("20", "0", 0.6), ("20", "1", 0.6)]):
        write_job(tmp_path, num, {SWITCH: switch, "seed": seed}, {"val/accuracy": acc})
    written = write_sweep_report(tmp_path)  # no multirun.yaml: keys in the jobs' override order
    assert [p.name for p in written] == [
        "sweep_summary.csv",
        "sweep_bars.png",
        "sweep_curves.png",
        "sweep_behavior.png",
    ]
    assert not (tmp_path / "sweep_heatmap.png").exists()
    rows = read_summary(tmp_path)
    assert [(r[SWITCH], float(r["val/accuracy_mean"])) for r in rows] == [("5", pytest.approx(0.3)), ("20", 0.6)]
    assert list(rows[0])[:3] == [SWITCH, "seeds", "jobs"]
    # t interval over 2 seeds: mean 0.3, s = 0.141421, t(0.975, 1) = 12.7062 -> half-width 1.27062
    ci = (float(rows[0]["val/accuracy_ci_low"]), float(rows[0]["val/accuracy_ci_high"]))
    assert ci == (pytest.approx(0.3 - 1.27062, abs=1e-5), pytest.approx(0.3 + 1.27062, abs=1e-5))
    assert (rows[1]["val/accuracy_ci_low"], rows[1]["val/accuracy_ci_high"]) == ("0.6", "0.6")  # equal seeds
    # switch 20 minus switch 5, paired by seed: 0.4 and 0.2 -> the same arithmetic around 0.3
    assert rows[0]["val/accuracy_minus_first"] == ""
    assert float(rows[1]["val/accuracy_minus_first"]) == pytest.approx(0.3)
    assert float(rows[1]["val/accuracy_minus_first_ci_low"]) == pytest.approx(0.3 - 1.27062, abs=1e-5)
    assert png_size(tmp_path / "sweep_bars.png") == (600, 450)
    assert png_size(tmp_path / "sweep_curves.png") == (700, 275)  # 2 configurations in one row
    assert png_size(tmp_path / "sweep_behavior.png") == (800, 700)  # "not logged" panels, still a real image


def test_seeds_alone_give_one_configuration(tmp_path):
    for seed, acc in enumerate([0.1, 0.3, 0.5]):
        write_job(tmp_path, seed, {"seed": str(seed)}, {"val/accuracy": acc})
    write_sweep_report(tmp_path)
    (row,) = read_summary(tmp_path)
    assert row["seeds"] == "3" and float(row["val/accuracy_mean"]) == pytest.approx(0.3)
    assert float(row["val/accuracy_std"]) == pytest.approx(0.2)  # sqrt((0.04 + 0 + 0.04) / 2)
    assert png_size(tmp_path / "sweep_bars.png") == (600, 450)


def test_three_swept_keys_give_one_heatmap_panel_per_value_of_the_third(tmp_path):
    num = 0
    for lr in ("0.1", "0.3"):
        for coef in ("0.01", "0.1"):
            for switch in ("1", "2"):
                acc = float(lr) + float(coef) + int(switch) / 100
                write_job(tmp_path, num, {LR: lr, COEF: coef, SWITCH: switch, "seed": "0"}, {"val/accuracy": acc})
                num += 1
    write_multirun(tmp_path, [f"{COEF}=0.01,0.1", f"{SWITCH}=1,2", f"{LR}=0.1,0.3", "seed=0"])
    write_sweep_report(tmp_path)
    rows = read_summary(tmp_path)
    assert list(rows[0])[:3] == [COEF, SWITCH, LR]
    assert len(rows) == 8 and all(r["seeds"] == "1" and r["val/accuracy_std"] == "" for r in rows)
    by_key = {(r[COEF], r[SWITCH], r[LR]): float(r["val/accuracy_mean"]) for r in rows}
    assert by_key[("0.1", "2", "0.3")] == pytest.approx(0.3 + 0.1 + 0.02)
    assert png_size(tmp_path / "sweep_heatmap.png") == (1100, 450)  # two 5.5 x 4.5 in panels side by side
    assert png_size(tmp_path / "sweep_curves.png") == (1400, 550)  # 8 configurations: 4 per row


def test_swept_keys_and_their_short_names(grid_sweep):
    jobs = find_jobs(grid_sweep)
    assert [j.dir.name for j in jobs] == [str(i) for i in range(8)]
    assert swept_keys(jobs, grid_sweep) == [COEF, SWITCH, "seed"]  # objective=dsrl and hydra.* left out
    assert short_names([COEF, SWITCH, "objective.main.coef"]) == {
        COEF: "warmup.coef",
        SWITCH: "switch_step",
        "objective.main.coef": "main.coef",
    }


def test_report_script_redraws_a_sweep_and_refuses_an_empty_dir(grid_sweep, tmp_path_factory):
    script = [sys.executable, str(ROOT / "experiments" / "report.py")]
    done = subprocess.run([*script, str(grid_sweep)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == [
        str(grid_sweep / n)
        for n in ("sweep_summary.csv", "sweep_heatmap.png", "sweep_curves.png", "sweep_behavior.png")
    ]
    empty = tmp_path_factory.mktemp("empty")
    failed = subprocess.run([*script, str(empty)], capture_output=True, text=True, timeout=120)
    assert failed.returncode != 0 and "no logs/metrics.csv" in failed.stderr


@pytest.mark.parametrize(
    "n_jobs,threads,cores,omp,ok",
    [
        (2, 1, 2, None, True),
        (2, 2, 2, None, False),  # 4 threads on 2 cores
        (2, None, 2, None, True),  # loky gives each job 2 // 2 = 1
        (3, None, 2, None, False),  # 3 jobs of at least 1 thread on 2 cores
        (-1, None, 16, None, True),  # every core, one thread each
        (-1, 2, 16, None, False),
        (4, None, 16, "8", False),  # the parent's OMP_NUM_THREADS reaches every job
        (4, None, 16, None, True),  # 16 // 4 = 4 threads each
    ],
)
def test_parallel_jobs_never_ask_for_more_threads_than_cores(n_jobs, threads, cores, omp, ok):
    assert (oversubscription(n_jobs, threads, cores, omp) is None) == ok


def test_parallel_jobs_callback_refuses_an_oversubscribed_sweep(monkeypatch):
    monkeypatch.setattr("lightning_prerl.reports.sweep.machine_cores", lambda: 2)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)

    def config(threads, task=()):
        return OmegaConf.create(
            {
                "threads": threads,
                "rollout": {"_target_": "lightning_prerl.rollout.hf.HFEngine"},
                "trainer": {"accelerator": "cpu"},
                "hydra": {"launcher": {"n_jobs": 2}, "overrides": {"task": list(task)}},
            }
        )

    ParallelJobs().on_multirun_start(config(None))
    ParallelJobs().on_multirun_start(config(1))
    with pytest.raises(SystemExit, match=r"config error: hydra.launcher.n_jobs=2 with threads=2: 2 jobs x 2 threads"):
        ParallelJobs().on_multirun_start(config(2))
    with pytest.raises(SystemExit, match="threads=2"):  # swept on the command line
        ParallelJobs().on_multirun_start(config(None, ["seed=0,1", "threads=1,2"]))


def test_parallel_jobs_callback_restores_the_start_method_in_loky_workers(monkeypatch):
    calls = []
    monkeypatch.setattr("multiprocessing.get_start_method", lambda allow_none=False: "loky")
    monkeypatch.setattr("multiprocessing.set_start_method", lambda method, force=False: calls.append((method, force)))
    ParallelJobs().on_job_start(OmegaConf.create({}))
    assert calls == [(None, True)]


def test_launcher_configs_compose():
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        joblib = compose("config", overrides=["hydra/launcher=joblib"], return_hydra_config=True)
        assert joblib.hydra.launcher._target_.endswith("JoblibLauncher")
        assert "parallel_jobs" in joblib.hydra.callbacks and "sweep_report" in joblib.hydra.callbacks
        try:
            import hydra_plugins.hydra_submitit_launcher  # noqa: F401  (pip extra `slurm`)
        except ImportError:
            with pytest.raises(Exception, match="submitit_slurm"):  # names what is missing
                compose("config", overrides=["hydra/launcher=slurm"], return_hydra_config=True)
            return
        slurm = compose("config", overrides=["hydra/launcher=slurm"], return_hydra_config=True)
        assert slurm.hydra.launcher._target_.endswith("SlurmLauncher")
        assert OmegaConf.to_container(slurm.hydra.launcher, resolve=True)["setup"] == ["export OMP_NUM_THREADS=8"]


def test_command_line_check_leaves_hydras_own_launcher_options_to_hydra():
    from lightning_prerl.config.checks import ConfigError, check_group_choices

    check_group_choices(["-m", "hydra/launcher=joblib", "hydra/launcher=basic", "seed=0,1"], ROOT / "conf")
    with pytest.raises(ConfigError, match="objective='nope' is not an option"):
        check_group_choices(["objective=nope"], ROOT / "conf")


@pytest.mark.slow
def test_real_joblib_sweep_writes_a_report_that_matches_its_jobs(tmp_path):
    """2 x 2 configurations x 2 seeds of DSRL on the toy world, two jobs at a time with one thread each."""
    sweep = tmp_path / "sweep"
    proc = subprocess.run(
        [
            sys.executable,
            "experiments/run.py",
            "-m",
            "hydra/launcher=joblib",
            "hydra.launcher.n_jobs=2",
            f"hydra.sweep.dir={sweep}",
            "objective=dsrl",
            f"{SWITCH}=1,2",
            f"{MODULE_LR}=1e-4,3e-4",
            "seed=0,1",
            "threads=1",
            "trainer.max_steps=3",
            "trainer.check_val_every_n_epoch=3",
            "trainer.enable_progress_bar=false",
            "data.prompts_per_step=2",
            "data.samples_per_prompt=2",
            "data.eval_prompts.count=8",
            "data.sampling.max_new_tokens=80",  # the toy answers in ~60 tokens: accuracy is not all zeros
            "callbacks.checkpoint.every_n_train_steps=3",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    jobs = sorted((d for d in sweep.iterdir() if d.is_dir()), key=lambda d: int(d.name))
    assert [d.name for d in jobs] == [str(i) for i in range(8)]
    for job in jobs:  # nothing shared: every job has its own checkpoints, policy, logs, report
        assert (job / "checkpoints" / "last.ckpt").is_file() and (job / "policy" / "config.json").is_file()
        assert (job / "report.png").is_file() and (job / "config.yaml").is_file()

    finals: dict[tuple[str, str], list[float]] = {}
    for job in jobs:
        overrides = dict(o.split("=", 1) for o in yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text()))
        with open(job / "logs" / "metrics.csv", newline="") as fh:
            accs = [float(r["val/accuracy"]) for r in csv.DictReader(fh) if r.get("val/accuracy")]
        finals.setdefault((overrides[SWITCH], overrides[MODULE_LR]), []).append(accs[-1])
    rows = read_summary(sweep)
    assert [(r[SWITCH], r[MODULE_LR]) for r in rows] == [
        ("1", "0.0001"),
        ("1", "0.0003"),
        ("2", "0.0001"),
        ("2", "0.0003"),
    ]
    for row in rows:
        accs = finals[(row[SWITCH], row[MODULE_LR])]
        assert row["seeds"] == "2"
        assert float(row["val/accuracy_mean"]) == pytest.approx(sum(accs) / 2)
        assert float(row["val/accuracy_std"]) == pytest.approx(abs(accs[0] - accs[1]) / math.sqrt(2), abs=1e-9)
        assert row["val/reflection_rate_mean"] and row["val/transition_thoughts_mean"]
    assert any(float(r["val/accuracy_mean"]) > 0 for r in rows)
    assert png_size(sweep / "sweep_heatmap.png") == (550, 450)
    assert png_size(sweep / "sweep_curves.png") == (700, 550)
    assert png_size(sweep / "sweep_behavior.png") == (800, 700)


@pytest.mark.slow
def test_a_failed_job_does_not_stop_the_sweep_and_the_report_names_it(tmp_path):
    """Four jobs, two knobs: samples_per_prompt=1 is a config error for GRPO (sys.exit in the job), a run
    report target of `builtins.int` raises when the trainer is built. Each failure is recorded in its job
    dir, the jobs after it run, the report summarises the one that finished and lists the three that did
    not with their line, and the sweep exits 1 saying so (Hydra's sweeper would otherwise stop at the
    first failure, before on_multirun_end: no report)."""
    sweep, run_report = tmp_path / "sweep", "lightning_prerl.reports.callbacks.RunReport"
    proc = subprocess.run(
        [sys.executable, "experiments/run.py", "-m", f"hydra.sweep.dir={sweep}", "objective=grpo",
         "data.samples_per_prompt=1,2", f"callbacks.report._target_={run_report},builtins.int",
         "trainer.max_steps=2", "trainer.enable_progress_bar=false", "eval_before_training=false",
         "trainer.check_val_every_n_epoch=2", "data.prompts_per_step=2", "data.eval_prompts.count=4",
         "data.sampling.max_new_tokens=32"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1] == f"3 of 4 sweep jobs failed: {sweep / 'sweep_failures.csv'}"
    failed = {d.name: (d / "failed.txt").read_text().strip() for d in sweep.iterdir() if (d / "failed.txt").exists()}
    assert sorted(failed) == ["0", "1", "3"]
    assert failed["0"].startswith("config error: data.samples_per_prompt=1") and failed["1"] == failed["0"]
    assert failed["3"].startswith("InstantiationException: Error in call to target 'builtins.int'")
    with open(sweep / "sweep_failures.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [(r["job"], r["error"]) for r in rows] == [(j, failed[j]) for j in ("0", "1", "3")]
    (row,) = read_summary(sweep)  # only the job that finished is summarised
    assert row["jobs"] == "2" and row["val/accuracy_mean"]
    assert "job 3 failed: InstantiationException" in proc.stdout
