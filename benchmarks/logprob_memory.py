"""Benchmark (CPU): peak extra memory and time of token log-probs + backward, full logits vs chunked head.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/logprob_memory.py [--tokens 1024 4096 8192 --vocab 151936
        --hidden 1024 --threads 1 --old-at-8192 --out benchmarks/results/logprob_memory.json]

One sequence of T response tokens goes through a float32 output head (V x H, Qwen3's vocabulary by
default) and back:
  old: logits = hidden @ weight.T, a (1, T, V) tensor, then `ops.token_logprobs_and_entropy`;
  new: `ops.head_logprobs`, chunked `linear_cross_entropy`, never holding (1, T, V).
Each (path, T) runs in a fresh child process (the script re-invoked with `--child PATH T`), so one
measurement's allocator state cannot hide another's peak. The child creates weight (V, H) and hidden
(1, T, H) with requires_grad, reads `ru_maxrss` as the baseline, runs logp = path(...) and
logp.sum().backward(), and reports extra = max RSS - baseline: everything above the head's weight and
the input, the weight's gradient (V * H * 4 bytes, 0.58 GiB by default) included.

Target: new <= 1.5 GiB at T=8192. The old path is skipped at T >= 8192 unless `--old-at-8192`, and
whenever its estimate 3 * T * V * 4 bytes exceeds MemAvailable.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

GIB = 2**30
TARGET_GIB = 1.5
ROOT = Path(__file__).resolve().parent.parent


def max_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB  # ru_maxrss is KiB on Linux


def rss_gib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / GIB


def mem_available_bytes() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no MemAvailable in /proc/meminfo")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def child(path: str, t: int, args) -> None:
    """Measure one (path, T) in this process and print one JSON line."""
    import torch

    from lightning_prerl.objectives.ops import head_logprobs, token_logprobs_and_entropy

    def run(hidden, weight, targets):
        if path == "old":
            logits = hidden @ weight.T  # (1, T, V)
            return token_logprobs_and_entropy(logits, targets, 1.0, False)[0]  # (1, T)
        return head_logprobs(hidden, weight, targets, chunk_tokens=args.chunk_tokens)[0]  # (1, T)

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    v, h = args.vocab, args.hidden
    warm_w = torch.randn(min(v, 1024), h, requires_grad=True)  # (V', H): warm-up, first-call costs untimed
    warm_h = torch.randn(1, 64, h, requires_grad=True)  # (1, 64, H)
    run(warm_h, warm_w, torch.randint(0, warm_w.shape[0], (1, 64))).sum().backward()
    del warm_w, warm_h
    weight = torch.randn(v, h).mul_(h**-0.5).requires_grad_()  # (V, H), in place: no freed copy raises max RSS
    hidden = torch.randn(1, t, h).requires_grad_()  # (1, T, H)
    targets = torch.randint(0, v, (1, t))  # (1, T)
    float(weight.detach().sum() + hidden.detach().sum())  # every page resident before the baseline
    baseline = max_rss_gib()
    slack = baseline - rss_gib()  # > 0: an earlier transient raised max RSS, extra would be understated

    start = time.perf_counter()
    logp = run(hidden, weight, targets)  # (1, T)
    logp.sum().backward()
    seconds = time.perf_counter() - start
    peak = max_rss_gib()

    result = {
        "path": path,
        "T": t,
        "vocab": v,
        "hidden": h,
        "threads": torch.get_num_threads(),
        "baseline_gib": round(baseline, 4),
        "peak_gib": round(peak, 4),
        "extra_gib": round(peak - baseline, 4),
        "baseline_slack_gib": round(slack, 4),
        "weight_grad_gib": round(weight.grad.numel() * weight.grad.element_size() / GIB, 4),
        "time_s": round(seconds, 3),
        "chunk_tokens": args.chunk_tokens if path == "new" else None,
        "logp_sum": float(logp.detach().sum()),
        "weight_grad_norm": float(weight.grad.norm()),
    }
    print(json.dumps(result), flush=True)


def run_child(path: str, t: int, args) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", path, str(t)]
    cmd += ["--vocab", str(args.vocab), "--hidden", str(args.hidden), "--threads", str(args.threads)]
    cmd += ["--chunk-tokens", str(args.chunk_tokens)] if args.chunk_tokens else []
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"path": path, "T": t, "failed": f"exit {proc.returncode}: {' | '.join(tail)}"}
    return json.loads(lines[-1])


def skip_reason(t: int, args) -> str | None:
    """Why the old path is not run at this T (None: it is run)."""
    if t >= 8192 and not args.old_at_8192:
        return "T >= 8192 without --old-at-8192"
    # logits, their gradient, one temporary of the same size (measured: ~3.75 x (T, V) at T=4096)
    need = 3 * t * args.vocab * 4
    if need > mem_available_bytes():
        return f"estimate {need / GIB:.1f} GiB > MemAvailable {mem_available_bytes() / GIB:.1f} GiB"
    return None


def fmt(entry: dict, key: str, digits: int) -> str:
    if "skipped" in entry:
        return "skipped"
    if "failed" in entry:
        return "failed"
    return f"{entry[key]:.{digits}f}"


def ratio(new: dict, old: dict, key: str) -> str:
    if key in new and key in old and old[key] > 0:
        return f"{new[key] / old[key]:.3f}"
    return "n/a"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, nargs="+", default=[1024, 4096, 8192], help="response lengths T")
    ap.add_argument("--vocab", type=int, default=151_936)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=1, help="torch threads in each child")
    ap.add_argument(
        "--chunk-tokens", type=int, default=None, help="new path's rows per chunk (default: 512 MiB of logits)"
    )
    ap.add_argument("--old-at-8192", action="store_true", help="also run the full-logits path at T >= 8192")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "logprob_memory.json")
    ap.add_argument("--child", nargs=2, metavar=("PATH", "T"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        path, t = args.child
        if path not in ("old", "new"):
            ap.error(f"--child {path}: expected old or new")
        child(path, int(t), args)
        return

    machine = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "mem_total_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB, 1),
    }
    print(
        f"log-probs + backward, one sequence, float32 head V={args.vocab} H={args.hidden}, "
        f"{args.threads} torch thread(s), new-path chunk {args.chunk_tokens or 'head_logprobs default'}; "
        f"{machine['cpu']}, {machine['cores']} cores, {machine['mem_total_gib']} GiB; "
        f"extra = max RSS - RSS with weight and hidden resident",
        flush=True,
    )
    results = []
    for t in args.tokens:
        reason = skip_reason(t, args)
        old = {"path": "old", "T": t, "skipped": reason} if reason else run_child("old", t, args)
        new = run_child("new", t, args)
        results += [old, new]
        print(f"peak_extra_gib T={t} old={fmt(old, 'extra_gib', 3)} new={fmt(new, 'extra_gib', 3)}")
        print(f"time_s T={t} old={fmt(old, 'time_s', 2)} new={fmt(new, 'time_s', 2)}")
        print(f"ratio_new_over_old T={t} memory={ratio(new, old, 'extra_gib')} time={ratio(new, old, 'time_s')}")
        for entry in (old, new):
            if "failed" in entry:
                print(f"  {entry['path']} failed: {entry['failed']}")
        if "logp_sum" in old and "logp_sum" in new:
            diff = abs(old["logp_sum"] - new["logp_sum"]) / max(1.0, abs(old["logp_sum"]))
            print(f"  check: relative difference of sum(logp) old vs new {diff:.2e}", flush=True)
        for entry in (old, new):
            if entry.get("baseline_slack_gib", 0) > 0.01:
                print(f"  warning: {entry['path']} baseline max RSS {entry['baseline_slack_gib']:.3f} GiB above RSS")

    largest = max(args.tokens)
    at_largest = next(r for r in results if r["path"] == "new" and r["T"] == largest)
    verdict = "n/a"
    if "extra_gib" in at_largest:
        verdict = "met" if at_largest["extra_gib"] <= TARGET_GIB else "missed"
        print(f"target new <= {TARGET_GIB} GiB at T={largest}: {verdict} ({at_largest['extra_gib']:.3f} GiB)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "benchmark": "logprob_memory",
        "machine": machine,
        "vocab": args.vocab,
        "hidden": args.hidden,
        "threads": args.threads,
        "target_gib_at_largest_T": TARGET_GIB,
        "target": verdict,
        "results": results,
    }
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
