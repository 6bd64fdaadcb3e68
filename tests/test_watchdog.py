"""No silent hangs (issue 27, part 1): a stalled rank and the rank waiting for it both leave their stacks
and one line, within the watchdog's limit, not gloo's 120 s timeout; the limit follows the step times."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

from lightning_prerl.training.watchdog import EXIT_CODE, HangWatchdog

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_rank_stuck_in_a_collective_ends_with_its_stack_and_one_line(tmp_path):
    port = str(_free_port())
    t0 = time.monotonic()
    procs = [
        subprocess.Popen([sys.executable, str(ROOT / "tests" / "hang_probe.py"), str(r), port, str(tmp_path)],
                         cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for r in (0, 1)
    ]  # fmt: skip
    outs = [p.communicate(timeout=90) for p in procs]
    elapsed = time.monotonic() - t0
    assert [p.returncode for p in procs] == [EXIT_CODE, EXIT_CODE], outs
    assert elapsed < 60, elapsed  # the watchdog's 2 s (plus start-up), not gloo's 120 s
    for rank, (stdout, stderr) in enumerate(outs):
        assert "unreachable" not in stdout
        (line,) = [x for x in stderr.splitlines() if x.startswith("watchdog:")]
        assert line.startswith(f"watchdog: rank {rank} made no progress for ")
        assert f"stacks of every thread in {tmp_path / 'hang' / f'rank{rank}.txt'}" in line
        stacks = (tmp_path / "hang" / f"rank{rank}.txt").read_text()
        assert "hang_probe.py" in stacks and "Thread" in stacks
    assert "waiting in all_reduce" in outs[0][1]  # rank 0 names the collective it waits in
    assert "hang_probe.py:26" in outs[1][1]  # rank 1 names the line where it stalled (the sleep)


def test_the_limit_is_the_startup_limit_then_a_multiple_of_the_slowest_step():
    dog = HangWatchdog("/unused", factor=10, min_s=60, startup_s=900)
    assert dog.limit() == 900
    trainer = SimpleNamespace()
    dog.on_train_epoch_start(trainer, None)
    dog._step_started -= 3.0  # a step of 3 s: 10 x 3 = 30 s, below the floor
    dog.on_train_batch_end(trainer, None, None, None, 0)
    assert dog.limit() == 60
    dog.on_train_epoch_start(trainer, None)
    dog._step_started -= 12.0  # the slowest step so far: 12 s
    dog.on_train_batch_end(trainer, None, None, None, 0)
    assert abs(dog.limit() - 120) < 0.1
    assert HangWatchdog("/unused", timeout_s=5).limit() == 5
