"""No silent hangs: a rank that makes no progress for too long writes every thread's stack and exits.

Runs that hang hours in (a weight sync that never returns, a rank stuck in a collective its peers
left, a reward that never finishes) are what RL users report most (TRL #6796/#6797). A collective's
own timeout (30 min with gloo and NCCL by default) ends such a run at best with a message that names
neither the rank that stalled nor where. `HangWatchdog` keeps a heartbeat on every training and
validation batch; a daemon thread on each rank checks it, and when the time since the last beat passes
the limit it writes that rank's Python stacks (all threads, `faulthandler`) to
`run_dir/hang/rank<r>.txt`, prints one line naming the rank, how long it waited and the innermost
frame of the main thread (e.g. `all_reduce` in torch/distributed/distributed_c10d.py), and ends the
process with exit status 3. Every rank has its own watchdog, so the rank that stalled and the ranks
waiting for it each leave their stack. Checkpoints are written atomically, so the last complete one
stays usable for `ckpt_path=auto`.

The limit follows the run: `startup_s` until the first optimizer step ends (model loading, the
engine's start, the first rollouts), then `max(min_s, factor x the slowest step so far)`, or a fixed
`timeout_s`.
"""

from __future__ import annotations

import faulthandler
import logging
import os
import sys
import threading
import time
from pathlib import Path

import lightning as L

log = logging.getLogger(__name__)
EXIT_CODE = 3


class Watchdog:
    """The heartbeat and its checking thread, apart from Lightning (tests drive it from plain processes)."""

    def __init__(self, run_dir: str | Path, rank: int = 0, limit_s: float = 1800.0, poll_s: float = 1.0):
        self.run_dir, self.rank, self.limit_s, self.poll_s = Path(run_dir), rank, limit_s, poll_s
        self._last = time.monotonic()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def beat(self) -> None:
        self._last = time.monotonic()

    def start(self) -> None:
        if self._thread is None:
            self.beat()
            self._thread = threading.Thread(target=self._watch, name="lightning-prerl-watchdog", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_s):
            waited = time.monotonic() - self._last
            if waited > self.limit_s:
                self.fire(waited)

    def fire(self, waited: float) -> None:
        """Stacks to `run_dir/hang/rank<r>.txt`, one line on stderr and the log, exit status 3."""
        path = self.run_dir / "hang" / f"rank{self.rank}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        where = waiting_in(threading.main_thread().ident)
        with open(path, "w") as fh:
            fh.write(f"rank {self.rank}: no progress for {waited:.0f} s (limit {self.limit_s:.0f} s)\n\n")
            fh.flush()
            faulthandler.dump_traceback(file=fh, all_threads=True)
        line = (
            f"watchdog: rank {self.rank} made no progress for {waited:.0f} s (limit {self.limit_s:.0f} s), "
            f"waiting in {where}; stacks of every thread in {path}"
        )
        log.error(line)  # through the run's handlers (console and run.log); logging's last resort: stderr
        for handler in logging.getLogger().handlers:
            handler.flush()
        os._exit(EXIT_CODE)  # the main thread is stuck: neither an exception nor sys.exit would reach it


def waiting_in(thread_id: int | None) -> str:
    """`function (file:line)` of the innermost frame of `thread_id`, and of the innermost project frame."""
    frame = sys._current_frames().get(thread_id)
    if frame is None:
        return "an unknown frame"
    inner = f"{frame.f_code.co_name} ({frame.f_code.co_filename}:{frame.f_lineno})"
    while frame is not None and "lightning_prerl" not in frame.f_code.co_filename:
        frame = frame.f_back
    if frame is None:
        return inner
    return f"{inner}, called from {frame.f_code.co_name} ({frame.f_code.co_filename}:{frame.f_lineno})"


class HangWatchdog(L.Callback):
    """Lightning side of `Watchdog` (conf/config.yaml `callbacks.watchdog`).

    Args:
        run_dir: where `hang/rank<r>.txt` goes.
        timeout_s: a fixed limit in seconds; None derives it from the measured step times.
        factor: the limit after the first step: `factor` x the slowest step so far ...
        min_s: ... but at least this many seconds.
        startup_s: the limit before the first step has ended (loading, engine start, first rollouts).
    """

    def __init__(
        self,
        run_dir: str,
        timeout_s: float | None = None,
        factor: float = 10.0,
        min_s: float = 600.0,
        startup_s: float = 3600.0,
    ):
        self.run_dir, self.timeout_s, self.factor, self.min_s, self.startup_s = (
            run_dir,
            timeout_s,
            factor,
            min_s,
            startup_s,
        )
        self.dog: Watchdog | None = None
        self._step_started: float | None = None
        self.slowest_step_s = 0.0

    def limit(self) -> float:
        if self.timeout_s is not None:
            return float(self.timeout_s)
        if self.slowest_step_s == 0.0:
            return float(self.startup_s)
        return max(float(self.min_s), self.factor * self.slowest_step_s)

    def setup(self, trainer: L.Trainer, pl_module, stage: str) -> None:
        if stage == "fit" and self.dog is None:
            self.dog = Watchdog(self.run_dir, trainer.global_rank, self.limit())
            self.dog.start()

    def _beat(self) -> None:
        if self.dog is not None:
            self.dog.limit_s = self.limit()
            self.dog.beat()

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._step_started = time.monotonic()  # the epoch's rollouts are generated before its batch
        self._beat()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._beat()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._step_started is not None:
            self.slowest_step_s = max(self.slowest_step_s, time.monotonic() - self._step_started)
        self._beat()

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._beat()

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if self.dog is not None:
            self.dog.stop()
            self.dog = None

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self.teardown(trainer, pl_module, "fit")
