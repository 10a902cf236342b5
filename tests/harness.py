"""Run a function on N CPU processes with gloo: fail fast, never hang.

The test suite's process harness (the benchmarks use it too; not part of the installed
package). Each rank runs ``fn(rank, world_size, *args)``
in CPU mode (:mod:`paci_megatron.cpu`) with ``torch.distributed`` initialised on gloo
with a timeout. If any rank raises, every other rank is killed and
:class:`DistributedFailure` carries that rank's traceback; if the ranks do not all finish
within ``timeout_s`` seconds, they are killed and the error names the ranks still running.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import socket
import time
import traceback
from typing import Any, Callable, List, Optional

__all__ = ["run_distributed", "DistributedFailure", "free_port"]


class DistributedFailure(AssertionError):
    """A rank raised, or the ranks did not finish in time. Message: rank and traceback."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(fn, rank, world_size, port, comm_timeout_s, args, queue, env):
    import warnings

    # megatron-core warns at import that Apex / Transformer Engine are missing: not news.
    warnings.filterwarnings("ignore", category=UserWarning)
    os.environ.update(env)
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
    )
    try:
        import torch

        torch.set_num_threads(1)
        import datetime

        from paci_megatron.cpu import enable_cpu_mode

        enable_cpu_mode(force=True)
        torch.distributed.init_process_group(
            backend="gloo", timeout=datetime.timedelta(seconds=comm_timeout_s))
        result = fn(rank, world_size, *args)
        # Plain pickle (tensors by value): multiprocessing's pickler would share tensor
        # storage through file descriptors that die with this process.
        queue.put((rank, "ok", pickle.dumps(result)))
        try:
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()
        except Exception:
            pass
    except BaseException:
        queue.put((rank, "error", traceback.format_exc()))


def run_distributed(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout_s: float = 300.0,
    comm_timeout_s: float = 120.0,
    env: Optional[dict] = None,
) -> List[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` spawned processes.

    Args:
        fn: a module-level (picklable) function.
        world_size: number of ranks.
        timeout_s: wall-clock limit for all ranks together, seconds.
        comm_timeout_s: gloo timeout of every collective / point-to-point wait, seconds.
        env: extra environment variables for the ranks.

    Returns:
        The return values of ``fn`` by rank (must be picklable).

    Raises:
        DistributedFailure: a rank raised (its traceback is in the message) or the run
            exceeded ``timeout_s`` (the message names the unfinished ranks).
    """
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(
            target=_worker,
            args=(fn, r, world_size, port, comm_timeout_s, args, queue, dict(env or {})),
            daemon=True,
        )
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    results: dict = {}
    deadline = time.monotonic() + timeout_s
    failure: Optional[str] = None
    grace_until: Optional[float] = None  # a rank died: wait briefly for its last message
    try:
        while len(results) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                missing = sorted(set(range(world_size)) - set(results))
                failure = f"ranks {missing} did not finish within {timeout_s:.0f} s"
                break
            try:
                rank, status, payload = queue.get(timeout=min(remaining, 1.0))
            except Exception:
                dead = [r for r, p in enumerate(procs) if not p.is_alive() and r not in results]
                if dead and grace_until is None:
                    grace_until = time.monotonic() + 10.0
                elif dead and time.monotonic() > grace_until:
                    codes = {r: procs[r].exitcode for r in dead}
                    failure = f"ranks {dead} exited without a result (exit codes {codes})"
                    break
                continue
            if status == "error":
                failure = f"rank {rank} failed:\n{payload}"
                break
            results[rank] = pickle.loads(payload)
        if failure is None:
            for p in procs:
                p.join(timeout=max(5.0, deadline - time.monotonic()))
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
        for p in procs:
            p.join(timeout=5)
    if failure is not None:
        raise DistributedFailure(failure)
    return [results[r] for r in range(world_size)]
