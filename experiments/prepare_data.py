"""Fetch the paper's data sets into data_root: every benchmark preset and training set, from the Hugging Face Hub.

    python experiments/prepare_data.py                          # all of them, into $LIGHTNING_PRERL_DATA or ./data
    python experiments/prepare_data.py --only aime24 math500    # some presets (gsm8k: its train and test files)
    python experiments/prepare_data.py --source /media/hub-copy # no network: local copies (see below)
    python experiments/prepare_data.py --list                   # preset, Hub id, split, records, file

Each file is written in the layout its preset reads (conf/benchmark/*.yaml, conf/data/*.yaml), then
checked: the record count the data set is known to have, and the preset's question and answer fields
in every record, read by the preset's own loader (`load_prompts`). A file that is already there and
passes the check is skipped (`--force` fetches it again); one that fails is never left in place. One
line per data set; the exit status is 1 if any failed. Where the files come from: `SOURCES` in
`lightning_prerl/data/sources.py`.

`--source DIR` reads nothing from the network. Per data set it takes, in this order: DIR/<hub id>/ (a
Hub snapshot, e.g. `huggingface-cli download --repo-type dataset <id> --local-dir DIR/<id>`, read with
`datasets.load_dataset`); DIR/datasets--<org>--<name>/snapshots/ (a Hugging Face cache, e.g.
~/.cache/huggingface/hub); DIR/<file under data_root> (an already prepared folder, copied as is).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

from lightning_prerl.data.sources import SOURCES, Source, default_data_root, prepare_root, select

GUIDE = "docs/how-to/data.md"


def offline_reason() -> str | None:
    """Why the Hub cannot be reached from here (an offline switch, no route), or None."""
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on"):
            return f"{var}={os.environ[var]}"
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    try:
        urllib.request.urlopen(urllib.request.Request(f"{endpoint}/api/datasets", method="HEAD"), timeout=10)
    except urllib.error.HTTPError:
        return None  # an answer, even a refusal, means the Hub is there
    except (urllib.error.URLError, OSError) as exc:
        return f"{endpoint} is unreachable: {getattr(exc, 'reason', exc)}"
    return None


def locate(source: Source, src_dir: Path) -> tuple[str, Path] | None:
    """("hub", snapshot dir) or ("file", prepared file) for `source` under `src_dir` (module docstring)."""
    if (src_dir / source.hub).is_dir():
        return "hub", src_dir / source.hub
    cache = src_dir / f"datasets--{source.hub.replace('/', '--')}"
    snapshots = sorted((cache / "snapshots").glob("*"), key=lambda p: p.stat().st_mtime)
    if snapshots:
        ref = cache / "refs" / "main"
        main = cache / "snapshots" / ref.read_text().strip() if ref.is_file() else None
        return "hub", main if main and main.is_dir() else snapshots[-1]
    if (src_dir / source.relative_path()).is_file():
        return "file", src_dir / source.relative_path()
    return None


def hub_records(source: Source, where: str, cache_dir: str | None) -> list[dict]:
    """The split's records, with only the fields `source.keep` names (before renaming)."""
    import datasets

    datasets.disable_progress_bars()
    datasets.utils.logging.set_verbosity_error()
    revision = source.revision if where == source.hub else None
    ds = datasets.load_dataset(where, name=source.config, split=source.split, revision=revision, cache_dir=cache_dir)
    if source.keep is not None:
        ds = ds.select_columns([c for c in ds.column_names if source.rename.get(c, c) in source.keep])
    return ds.to_list()


def _text(value) -> str:
    """An answer as text: 27.0 -> "27"."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return "" if value is None else str(value).strip()


def shape(source: Source, records: list[dict]) -> list[dict]:
    """Hub records -> the preset's rows: renamed fields, then `source.shape` (`Source` docstring)."""
    from lightning_prerl.data.rewards import last_boxed

    rows = []
    for i, record in enumerate(records):
        row = {}
        for key, value in record.items():  # a rename never overwrites a field the record already has
            new = source.rename.get(key, key)
            row[new if new == key or new not in record else key] = value
        if source.shape == "boxed_solution" and last_boxed(str(row.get("solution") or "")) is None:
            row["solution"] = f"\\boxed{{{_text(row.get('answer'))}}}"
        elif source.shape == "verl":
            if "problem" not in row:
                raise KeyError(f"record {i} has no 'problem' field (it has {sorted(record)})")
            answer = _text(row.get("answer")) or last_boxed(str(row.get("solution") or "")) or ""
            rest = {k: v for k, v in row.items() if k not in ("problem", "answer", "solution")}
            row = {
                "data_source": source.preset,
                "prompt": [{"role": "user", "content": row["problem"]}],
                "ability": "math",
                "reward_model": {"ground_truth": answer, "style": "rule"},
                "extra_info": {"index": i, "split": source.split},
                **rest,
            }
        rows.append(row)
    return rows


def write(rows: list[dict], path: Path) -> None:
    if path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        path.write_text("".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in rows), encoding="utf-8")


def read(path: Path) -> list[dict]:
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    lines = path.read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def check(source: Source, path: Path, spec: dict) -> tuple[str, str | None]:
    """("N records, M usable", None) when `path` holds the data set whole, else ("", what is wrong)."""
    from lightning_prerl.data.prompts import load_prompts

    try:
        records = read(path)
    except (OSError, ValueError) as exc:  # ArrowInvalid and JSONDecodeError are ValueErrors
        return "", f"unreadable ({type(exc).__name__}: {' '.join(str(exc).split())[:120]})"
    if len(records) != source.records:
        return "", f"{len(records)} records, expected {source.records}"
    for i, record in enumerate(records):
        for key in (spec["question_key"], spec["answer_key"]):
            if not isinstance(record, dict) or record.get(key) is None:
                return "", f"record {i} has no '{key}' (the preset's field)"
    try:
        usable = load_prompts(str(path), spec["question_key"], spec["answer_key"], spec["answer_format"])
    except ValueError as exc:
        return "", " ".join(str(exc).split())
    return f"{len(records):>5} records, {len(usable):>5} usable", None


def fetch(source: Source, tmp: Path, src_dir: Path | None, cache_dir: str | None) -> str:
    """Write `source` into `tmp`; returns where it came from. Raises LookupError when `src_dir` lacks it."""
    where = source.hub
    if src_dir is not None:
        found = locate(source, src_dir)
        if found is None:
            raise LookupError(
                f"not in --source {src_dir} (no {source.hub}/, datasets--{source.hub.replace('/', '--')}/ "
                f"or {source.relative_path()})"
            )
        kind, path = found
        if kind == "file":
            shutil.copyfile(path, tmp)
            return str(path)
        where = str(path)
    write(shape(source, hub_records(source, where, cache_dir)), tmp)
    return f"{where} [{'/'.join(filter(None, (source.config, source.split)))}]"


def prepare(source: Source, root: Path, src_dir: Path | None, cache_dir: str | None, state) -> tuple[bool, str]:
    """One data set: (ok, its progress line). `state` is the check of the file already there, or None."""
    spec = source.spec(root)
    path = spec["path"]
    if state is not None and state[1] is None:
        return True, f"{source.label:<24} complete  {state[0]}  {path}"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.partial{path.suffix}")  # same suffix: read as the real file
    try:
        origin = fetch(source, tmp, src_dir, cache_dir)
        counts, why = check(source, tmp, spec)
    except LookupError as exc:
        counts, why, origin = "", str(exc), None
    except Exception as exc:  # one line per data set, whatever the Hub or the files did
        counts, why, origin = "", f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}", None
    if why is not None:
        tmp.unlink(missing_ok=True)
        source_note = f" (from {origin})" if origin else ""
        return False, f"{source.label:<24} FAILED    {why}{source_note}; {path} not written"
    os.replace(tmp, path)
    return True, f"{source.label:<24} fetched   {counts}  {path} <- {origin}"


def print_table() -> None:
    print(f"{'preset':<24} {'Hub dataset':<36} {'config/split':<26} {'records':>7}  file under data_root")
    for s in SOURCES:
        split = "/".join(filter(None, (s.config, s.split)))
        print(f"{s.label:<24} {s.hub:<36} {split:<26} {s.records:>7}  {s.relative_path()}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", nargs="+", metavar="NAME", help="preset names (default: every data set)")
    parser.add_argument("--data-root", type=Path, default=None, help="default: $LIGHTNING_PRERL_DATA, else ./data")
    parser.add_argument("--source", type=Path, help="a folder of local copies: no network (module docstring)")
    parser.add_argument("--force", action="store_true", help="fetch again even when a file is complete")
    parser.add_argument("--list", action="store_true", help="print where each data set comes from, then exit")
    args = parser.parse_args(argv)
    if args.list:
        print_table()
        return 0
    try:
        sources = select(args.only)
    except ValueError as exc:
        parser.error(str(exc))
    if args.source is not None and not args.source.is_dir():
        print(f"prepare_data: --source {args.source} is not a folder", file=sys.stderr)
        return 2
    logging.getLogger("lightning_prerl").setLevel(logging.ERROR)  # skipped records: counted in the line
    root = (args.data_root or prepare_root()).resolve()
    states = []
    for s in sources:
        path = s.spec(root)["path"]
        states.append(check(s, path, s.spec(root)) if path.is_file() and not args.force else None)
    todo = [s.preset for s, state in zip(sources, states, strict=True) if state is None or state[1] is not None]
    if todo and args.source is None and (reason := offline_reason()):
        print(
            f"prepare_data: offline ({reason}): {' '.join(dict.fromkeys(todo))} must come from the Hugging Face "
            f"Hub; run where it is reachable, or pass --source DIR with local copies ({GUIDE})",
            file=sys.stderr,
        )
        return 2
    before = default_data_root()
    with tempfile.TemporaryDirectory(prefix="prepare_data-") as cache:
        results = []
        for s, state in zip(sources, states, strict=True):
            ok, line = prepare(s, root, args.source, cache if args.source else None, state)
            print(line, flush=True)
            results.append(ok)
    read = Path(default_data_root()).resolve()
    hint = "" if root == read else f"; runs read {read}: set LIGHTNING_PRERL_DATA={root} or data_root={root}"
    print(f"prepare_data: {sum(results)} of {len(results)} data sets ready under {root}{hint}")
    if Path(before).resolve() != read:  # <checkout>/data now exists and comes before ../shared/data
        print(f"prepare_data: runs now read {read} instead of {before} ({GUIDE}: the order data_root follows)")
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
