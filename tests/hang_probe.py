"""One rank of a 2-process gloo group in which rank 1 stalls: `python tests/hang_probe.py RANK PORT RUN_DIR`.

Rank 0 enters an all_reduce that rank 1 never joins (it sleeps); each rank's `Watchdog` (limit 2 s)
must end its process with exit status 3, one line and its stacks file, long before gloo's own timeout.
"""

from __future__ import annotations

import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from lightning_prerl.training.watchdog import Watchdog

rank, port, run_dir = int(sys.argv[1]), sys.argv[2], sys.argv[3]
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                        timeout=timedelta(seconds=120))  # fmt: skip
dog = Watchdog(run_dir, rank, limit_s=2.0, poll_s=0.2)
dog.start()
dist.barrier()
dog.beat()
if rank == 1:
    time.sleep(60)  # the stalled rank: a hung reward, a weight sync that never returns
dist.all_reduce(torch.ones(1))  # rank 0 waits here for rank 1
print("unreachable: the collective completed", flush=True)
