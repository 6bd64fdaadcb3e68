"""experiments/prepare_data.py offline: Hub-format copies the test writes (record counts as the real data
sets') and the real ../shared/data become the presets' layout, checked, idempotent; data_root's default;
a missing file names the command that fetches it."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from lightning_prerl.data import sources
from lightning_prerl.data.benchmarks import benchmark_names, load_benchmark
from lightning_prerl.data.prompts import load_prompts
from lightning_prerl.data.sources import SOURCES

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "experiments" / "prepare_data.py"
_spec = importlib.util.spec_from_file_location("prepare_data", SCRIPT)
prepare_data = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(prepare_data)


def _jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _parquet(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)


def _configs_card(repo: Path, configs: dict[str, str]) -> None:
    """A dataset card whose `configs:` map config -> data files, as Hub repos with several configs have."""
    repo.mkdir(parents=True, exist_ok=True)
    lines = ["---", "configs:"]
    for name, pattern in configs.items():
        lines += [f"- config_name: {name}", "  data_files:"]
        lines += [f"  - split: {split}\n    path: {pattern.format(split=split)}" for split in ("train", "test")]
    (repo / "README.md").write_text("\n".join([*lines, "---", ""]))


def write_hub_copies(hub: Path) -> Path:
    """Every source as its Hub repository lays it out (file names, configs, field names), made-up problems."""
    _jsonl(hub / "HuggingFaceH4/MATH-500/test.jsonl", [
        {"problem": f"{i}+1?", "solution": f"so \\boxed{{{i + 1}}}", "answer": str(i + 1), "subject": "Algebra",
         "level": 1, "unique_id": f"test/algebra/{i}.json"} for i in range(500)
    ])  # fmt: skip
    _parquet(hub / "HuggingFaceH4/aime_2024/data/train-00000-of-00001.parquet", [
        {"id": 60 + i, "problem": f"AIME {i}?", "solution": "...", "answer": f"{i:03d}", "url": "u", "year": "2024"}
        for i in range(30)
    ])  # fmt: skip
    _parquet(hub / "math-ai/aime25/test-00000-of-00001.parquet", [
        {"id": i, "problem": f"{i}*2?", "answer": float(2 * i)} for i in range(30)
    ])  # fmt: skip
    _parquet(hub / "math-ai/amc23/data/test-00000-of-00001.parquet", [
        {"id": i, "question": f"AMC {i}?", "answer": 27.0, "url": "u"} for i in range(40)
    ])  # fmt: skip
    _jsonl(
        hub / "math-ai/minervamath/test.jsonl",
        [{"question": f"Minerva {i}?", "answer": f"{i}.5\n"} for i in range(272)],
    )
    olympiad = hub / "Hothan/OlympiadBench"
    _configs_card(olympiad, {
        "OE_TO_maths_en_COMP": "OlympiadBench/OE_TO_maths_en_COMP/*.parquet",
        "OE_MM_maths_en_COMP": "OlympiadBench/OE_MM_maths_en_COMP/*.parquet",
    })  # fmt: skip
    _parquet(olympiad / "OlympiadBench/OE_TO_maths_en_COMP/train.parquet", [
        {"id": i, "question": f"Olympiad {i}?", "solution": ["..."], "final_answer": [f"${i}$"], "image_1": None,
         "modality": "Text-only", "answer_type": "Numerical"} for i in range(675)
    ])  # fmt: skip
    _parquet(olympiad / "OlympiadBench/OE_MM_maths_en_COMP/train.parquet", [{"id": 0, "question": "a figure"}])
    gsm8k = hub / "openai/gsm8k"
    _configs_card(gsm8k, {c: f"{c}/{{split}}-*" for c in ("main", "socratic")})
    for split, n in (("train", 7473), ("test", 1319)):
        for config in ("main", "socratic"):
            rows = [{"question": f"{config} {i}?", "answer": f"1+1=<<1+1=2>>2\n#### {i:,}"} for i in range(n)]
            _parquet(gsm8k / config / f"{split}-00000-of-00001.parquet", rows)
    _parquet(hub / "DigitalLearningGmbH/MATH-lighteval/data/train-00000-of-00001.parquet", [
        {"problem": f"MATH {i}?", "level": "Level 2", "type": "Algebra",
         "solution": "no box here" if i % 1000 == 0 else f"so \\boxed{{\\frac{{{i}}}{{2}}}}"} for i in range(7500)
    ])  # fmt: skip
    return hub


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """(Hub copies, output folder, the first run's printed lines)."""
    hub = write_hub_copies(tmp_path_factory.mktemp("hub"))
    out = tmp_path_factory.mktemp("data")
    lines = _run("--source", str(hub), "--data-root", str(out))
    return hub, out, lines


def _run(*args: str, code: int = 0) -> list[str]:
    """prepare_data in this process; its stdout lines."""
    import contextlib
    import io

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        assert prepare_data.main(list(args)) == code
    return buffer.getvalue().splitlines()


def test_every_file_a_preset_reads_under_data_root_has_one_source():
    benchmarks = {f"benchmark {n}" for n in benchmark_names()}
    data = {f"data {p.stem}" for p in (ROOT / "conf" / "data").glob("*.yaml") if "${data_root}" in p.read_text()}
    assert {s.label for s in SOURCES} == benchmarks | data
    files = [s.relative_path() for s in SOURCES]
    assert len(set(files)) == len(files)


def test_hub_copies_become_the_presets_layout_and_the_presets_read_them(prepared):
    _, out, lines = prepared
    assert len(lines) == len(SOURCES) + 1 and lines[-1].startswith(f"prepare_data: {len(SOURCES)} of {len(SOURCES)}")
    assert all(" fetched " in line for line in lines[:-1])
    for name in benchmark_names():  # every benchmark preset, through its own loader
        source = next(s for s in SOURCES if s.label == f"benchmark {name}")
        assert len(load_benchmark(name, str(out))) == source.records, name
    rows = [json.loads(line) for line in (out / "amc23" / "test.jsonl").read_text().splitlines()]
    assert rows[0] == {"id": 0, "problem": "AMC 0?", "answer": 27.0, "url": "u"}  # question -> problem
    minerva = json.loads((out / "minerva_math" / "test.jsonl").read_text().splitlines()[3])
    assert minerva["problem"] == "Minerva 3?" and minerva["solution"] == "\\boxed{3.5}"
    olympiad = json.loads((out / "olympiadbench" / "test.jsonl").read_text().splitlines()[0])
    assert set(olympiad) == {"id", "question", "solution", "final_answer", "answer_type"}  # no image columns
    assert (out / "gsm8k" / "train.jsonl").read_text().startswith('{"question": "main 0?"')  # config main only
    aime25 = pq.read_table(out / "aime25" / "test.parquet").to_pylist()[4]
    assert aime25["prompt"] == [{"role": "user", "content": "4*2?"}] and aime25["reward_model"]["ground_truth"] == "8"
    math = pq.read_table(out / "math_train" / "train.parquet").to_pylist()
    assert (
        math[1]["reward_model"] == {"ground_truth": "\\frac{1}{2}", "style": "rule"} and math[1]["level"] == "Level 2"
    )
    train = load_prompts(str(out / "math_train" / "train.parquet"), "prompt", "reward_model")
    assert (len(train), train.skipped) == (7492, 8)  # no \boxed{} in 8 solutions: kept in the file, never scored
    for preset, problems in (("math", 7492), ("gsm8k", 7473)):  # the data presets, as a run builds them
        with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
            cfg = compose("config", overrides=["run_dir=/tmp/unused", f"data={preset}", f"data_root={out}"])
        assert len(instantiate(cfg.data.train_prompts)) == problems
        assert len(instantiate(cfg.data.eval_prompts)) == {"math": 500, "gsm8k": 1319}[preset]
    assert "data math                fetched    7500 records,  7492 usable" in lines[-2]


def test_a_second_run_skips_complete_files_and_force_fetches_again(prepared):
    hub, out, _ = prepared
    files = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    lines = _run("--source", str(hub), "--data-root", str(out))
    assert all(" complete " in line for line in lines[:-1]) and len(lines) == len(SOURCES) + 1
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == files
    (out / "aime24" / "test.jsonl").write_text(
        "".join((out / "aime24" / "test.jsonl").read_text().splitlines(True)[:-1])
    )
    lines = _run("--source", str(hub), "--data-root", str(out), "--only", "aime24", "amc23")
    assert [line.split()[2] for line in lines[:-1]] == ["fetched", "complete"]  # 29 of 30 records: fetched again
    assert _run("--source", str(hub), "--data-root", str(out), "--only", "amc23", "--force")[0].split()[2] == "fetched"


def test_a_truncated_set_fails_in_one_line_and_leaves_no_file(tmp_path):
    hub = tmp_path / "hub"
    _jsonl(hub / "HuggingFaceH4/MATH-500/test.jsonl", [{"problem": f"{i}?", "answer": "1"} for i in range(499)])
    lines = _run("--source", str(hub), "--data-root", str(tmp_path / "out"), "--only", "math500", code=1)
    assert lines[0].split()[2] == "FAILED" and "499 records, expected 500" in lines[0]
    assert lines[1].startswith("prepare_data: 0 of 1 data sets ready")
    assert not any((tmp_path / "out").rglob("*.jsonl"))  # nor the partial file
    _run("--source", str(tmp_path / "nowhere"), code=2)  # not a folder: one line on stderr
    lines = _run("--source", str(hub), "--data-root", str(tmp_path / "out"), "--only", "aime24", code=1)
    assert "not in --source" in lines[0] and "aime24/test.jsonl" in lines[0]


def test_a_hugging_face_cache_is_a_source(tmp_path):
    repo = tmp_path / "hub" / "datasets--HuggingFaceH4--MATH-500"
    _jsonl(repo / "snapshots" / "abc123" / "test.jsonl", [{"problem": f"{i}?", "answer": str(i)} for i in range(500)])
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    lines = _run("--source", str(tmp_path / "hub"), "--data-root", str(tmp_path / "out"), "--only", "math500")
    assert "snapshots/abc123 [test]" in lines[0] and len(load_benchmark("math500", str(tmp_path / "out"))) == 500


def test_the_shared_data_folder_is_a_source_copied_as_is(shared_data, tmp_path):
    names = [s.preset for s in SOURCES if (shared_data / s.relative_path()).is_file()]
    assert {"math500", "aime24", "amc23", "minerva", "gsm8k", "math"} <= set(names)
    lines = _run("--source", str(shared_data), "--data-root", str(tmp_path), "--only", *names)
    assert all(" fetched " in line for line in lines[:-1])  # the known record counts hold for the real files
    for s in SOURCES:
        if s.preset in names:
            assert (tmp_path / s.relative_path()).read_bytes() == (shared_data / s.relative_path()).read_bytes()
    assert len(load_benchmark("aime24", str(tmp_path))) == 30


@pytest.mark.parametrize(
    "env,reason",
    [({"HF_HUB_OFFLINE": "1"}, "HF_HUB_OFFLINE=1"), ({"HF_HUB_OFFLINE": "", "HF_ENDPOINT": "http://127.0.0.1:9"}, "")],
)
def test_offline_fails_in_one_line(tmp_path, env, reason):
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--data-root", str(tmp_path), "--only", "aime24"],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith(f"prepare_data: offline ({reason}")
    assert "--source DIR" in proc.stderr and "aime24" in proc.stderr


def test_data_root_defaults_to_the_env_then_the_checkout_then_shared(tmp_path, monkeypatch):
    checkout, shared = tmp_path / "repo" / "data", tmp_path / "shared" / "data"
    monkeypatch.setattr(sources, "CHECKOUT_DATA", checkout)
    monkeypatch.setattr(sources, "SHARED_DATA", shared)
    monkeypatch.delenv("LIGHTNING_PRERL_DATA", raising=False)
    assert sources.default_data_root() == str(checkout)  # neither exists: where prepare_data writes
    shared.mkdir(parents=True)
    assert sources.default_data_root() == str(shared)
    checkout.mkdir(parents=True)
    assert sources.default_data_root() == str(checkout)
    monkeypatch.setenv("LIGHTNING_PRERL_DATA", str(tmp_path / "mine"))
    assert sources.default_data_root() == str(tmp_path / "mine")
    import lightning_prerl.config.checks  # noqa: F401  (registers ${lp.data_root:})

    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["run_dir=/tmp/unused", "data=math"])
    assert cfg.data.train_prompts.path == f"{tmp_path}/mine/math_train/train.parquet"


def test_the_first_prepared_file_in_the_checkout_says_that_runs_now_read_it(tmp_path, monkeypatch):
    checkout, shared = tmp_path / "repo" / "data", tmp_path / "shared" / "data"
    monkeypatch.setattr(sources, "CHECKOUT_DATA", checkout)
    monkeypatch.setattr(sources, "SHARED_DATA", shared)
    monkeypatch.delenv("LIGHTNING_PRERL_DATA", raising=False)
    _jsonl(shared / "aime24" / "test.jsonl", [{"problem": f"{i}?", "answer": str(i)} for i in range(30)])
    lines = _run("--source", str(shared), "--only", "aime24")  # no --data-root: into <checkout>/data
    assert lines[0].split()[2] == "fetched" and (checkout / "aime24" / "test.jsonl").is_file()
    assert lines[1] == f"prepare_data: 1 of 1 data sets ready under {checkout}"
    assert lines[2].startswith(f"prepare_data: runs now read {checkout} instead of {shared}")
    assert len(_run("--source", str(shared), "--only", "aime24")) == 2  # said once


def test_a_missing_file_names_the_command_that_fetches_it(tmp_path, monkeypatch):
    from lightning_prerl.config.checks import ConfigError, validate_config

    with pytest.raises(FileNotFoundError) as exc:
        load_benchmark("aime25", str(tmp_path))
    command = f"python experiments/prepare_data.py --only aime25 --data-root {tmp_path}"
    assert str(exc.value) == (
        f"benchmark aime25: {tmp_path}/aime25/test.parquet does not exist (data_root={tmp_path}; fetch it: {command})"
    )
    monkeypatch.setenv("LIGHTNING_PRERL_DATA", str(tmp_path))  # prepare_data's own default: no --data-root
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["run_dir=/tmp/unused", "data=gsm8k"])
    with pytest.raises(ConfigError) as exc:
        validate_config(cfg)
    assert str(exc.value) == (
        f"data gsm8k: {tmp_path}/gsm8k/train.jsonl does not exist (data_root={tmp_path}; "
        "fetch it: python experiments/prepare_data.py --only gsm8k)"
    )
