"""Run a function on 2 real gloo ranks (separate processes) from a unit test, quickly and without flakes.

- Processes come from a forkserver that imports torch and the Trainer once per test session, so a rank
  starts in well under a second instead of paying those imports itself (about 25 s for two spawned ranks
  on a loaded 2-core machine).
- The ranks meet through a file in the test's tmp_path (``file://``), not a TCP port chosen beforehand
  that another process could take in between.
- Results come back through a queue read with a deadline: a rank that hangs or dies fails the test with
  its exit code instead of blocking it, and no rank outlives the test.
"""

from __future__ import annotations

import queue
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

# What every rank function of the unit tests imports; loaded once, in the forkserver.
PRELOAD = ["torch", "torch.distributed", "metaformer_platform.training.trainer"]


def run_ranks(target: Callable[..., None], tmp_path: Path, *args: Any, world: int = 2, expect: int | None = None,
              timeout: float = 300.0) -> list[Any]:
    """Call ``target(rank, world, init_method, results, *args)`` in ``world`` processes and return the
    ``expect`` items (default: one per rank) they put on ``results``, sorted; ``init_method`` is for
    ``init_process_group``. The timeout is a hang detector, not the expected time (a rank takes seconds);
    a rank that exits with an error fails the test at once."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    rendezvous = tmp_path / "rendezvous"
    rendezvous.unlink(missing_ok=True)  # a file left by an earlier call would confuse the new group
    results = ctx.Queue()
    procs = [ctx.Process(target=target, args=(r, world, f"file://{rendezvous}", results, *args), daemon=True)
             for r in range(world)]
    for p in procs:
        p.start()
    got: list[Any] = []
    deadline = time.monotonic() + timeout
    try:
        while len(got) < (world if expect is None else expect):
            try:
                got.append(results.get(timeout=0.5))
            except queue.Empty:
                codes = [p.exitcode for p in procs]
                assert not any(codes), f"a rank failed: exit codes {codes} (its traceback is above)"
                assert time.monotonic() < deadline, f"{len(got)} results in {timeout:.0f} s; exit codes {codes}"
        for p in procs:
            p.join(max(deadline - time.monotonic(), 1.0))
        assert [p.exitcode for p in procs] == [0] * world, [p.exitcode for p in procs]
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
    return sorted(got)
