"""What the tests and the benchmarks share (not part of the installed package): running a
function on N CPU processes with gloo (fail fast, never hang), the per-rank megatron-core
set-up, and the host-sync counter.

Each rank of :func:`run_distributed` runs ``fn(rank, world_size, *args)``
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
from typing import Any, Callable, Dict, List, Optional

__all__ = ["run_distributed", "run_emulated", "DistributedFailure", "free_port", "setup_parallel", "seed_all",
           "HostSyncCounter", "HOST_SYNCS"]


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


#: what a fork server imports once, so that a rank starts without importing torch and
#: megatron-core again (about 3 s of CPU each on a laptop core)
_PRELOAD = ["torch", "torch.distributed", "megatron.core.parallel_state",
            "megatron.core.pipeline_parallel.schedules", "megatron.core.models.gpt"]


def _context(env: Optional[dict]) -> Any:
    """The start method for the ranks: a fork server with torch and megatron-core imported
    (each rank then starts as a fresh import would leave it, nothing run), or a plain spawn
    where the ranks get their own environment variables (``env``: torch reads some of them
    at import) or the platform has no fork server."""
    if env or "forkserver" not in mp.get_all_start_methods():
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(_PRELOAD)
    return ctx


def run_distributed(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout_s: float = 300.0,
    comm_timeout_s: float = 120.0,
    env: Optional[dict] = None,
) -> List[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` new processes (:func:`_context`).

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
    ctx = _context(env)
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


def run_emulated(fn: Callable[..., Any], world_size: int, *args: Any,
                 comm_timeout_s: float = 120.0) -> List[Any]:
    """:func:`run_distributed`'s counterpart in one process: ``fn(rank, world_size, *args)``
    for every rank, the ranks taking turns (:mod:`paci_megatron.emulator`), each set up as
    :func:`_worker` sets up its process (CPU mode, one thread, torch.distributed
    initialised, here on the in-process transport).

    Returns:
        The return values of ``fn`` by rank.

    Raises:
        DistributedFailure: a rank raised (its traceback in the message) or the ranks
            deadlocked (the message names what each waited for).
    """
    import datetime

    import torch

    from paci_megatron.cpu import enable_cpu_mode
    from paci_megatron.emulator import BACKEND, EmulationError, run_ranks

    store = torch.distributed.HashStore()
    threads = torch.get_num_threads()

    def rank_main(rank: int) -> Any:
        enable_cpu_mode(force=True)
        torch.distributed.init_process_group(
            backend=BACKEND, store=store, rank=rank, world_size=world_size,
            timeout=datetime.timedelta(seconds=comm_timeout_s))
        try:
            return fn(rank, world_size, *args)
        finally:
            torch.distributed.destroy_process_group()

    torch.set_num_threads(1)  # as each rank of run_distributed runs
    try:
        return run_ranks(world_size, rank_main)
    except EmulationError as exc:
        raise DistributedFailure(str(exc)) from None
    finally:
        torch.set_num_threads(threads)


# ------------------------------------------------------------------ per-rank set-up
def setup_parallel(pp: int, tp: int = 1, ep: int = 1) -> None:
    """megatron-core's model-parallel state for ``pp`` stages x ``tp`` x ``ep`` (afresh)."""
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        expert_model_parallel_size=ep,
    )


def seed_all(seed: int) -> None:
    """Seed torch and megatron-core's model-parallel RNG tracker."""
    import torch
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)


# ------------------------------------------------------------------ host syncs
HOST_SYNCS = (("Tensor", "item"), ("Tensor", "__bool__"), ("Tensor", "tolist"),
              ("Tensor", "cpu"), ("Tensor", "numpy"), ("Tensor", "__float__"),
              ("Tensor", "__int__"), ("cuda", "synchronize"))
"""The host-sync entry points :class:`HostSyncCounter` counts: ``(owner, attribute)``."""


def module_of(filename: str) -> str:
    """The module path of a source file, relative to the ``sys.path`` entry holding it
    (``"paci_megatron/schedule.py"``, ``"megatron/core/optimizer/clip_grads.py"``), by the
    longest matching entry: a package installed under a folder named ``torch`` (such as a
    virtual environment at ``/opt/torch/.venv``) is still itself."""
    import sys

    path = os.path.abspath(filename)
    roots = sorted((os.path.abspath(p) for p in sys.path if p), key=len, reverse=True)
    for root in roots:
        if path.startswith(root + os.sep):
            return os.path.relpath(path, root).replace(os.sep, "/")
    return os.path.basename(path)


class HostSyncCounter:
    """Counts calls of the host-sync entry points in :data:`HOST_SYNCS` (a context manager).

    Each call is charged to the innermost frame outside the ``torch`` package, whose folder
    comes from ``torch.__file__`` (not a path substring), and named by :func:`module_of`:
    ``counts["paci_megatron/optimizer.py: Tensor.item"]``. A call with only torch frames on
    the stack counts as ``"torch: ..."``.
    """

    def __init__(self):
        self.counts: Dict[str, int] = {}
        self._saved: list = []

    def __enter__(self):
        import sys

        import torch

        torch_dir = os.path.dirname(os.path.abspath(torch.__file__)) + os.sep
        for owner_name, attr in HOST_SYNCS:
            owner = torch.Tensor if owner_name == "Tensor" else torch.cuda
            original = getattr(owner, attr)
            self._saved.append((owner, attr, original))

            def counted(*args, _original=original, _name=f"{owner_name}.{attr}", **kwargs):
                frame = sys._getframe(1)
                while frame is not None and os.path.abspath(
                        frame.f_code.co_filename).startswith(torch_dir):
                    frame = frame.f_back
                where = "torch" if frame is None else module_of(frame.f_code.co_filename)
                key = f"{where}: {_name}"
                self.counts[key] = self.counts.get(key, 0) + 1
                return _original(*args, **kwargs)

            setattr(owner, attr, counted)
        return self

    def __exit__(self, *exc):
        for owner, attr, original in reversed(self._saved):
            setattr(owner, attr, original)
        self._saved = []

    def by_module(self) -> Dict[str, int]:
        """Counts summed per module (the part of each key before ``": "``)."""
        out: Dict[str, int] = {}
        for key, n in self.counts.items():
            where = key.split(": ", 1)[0]
            out[where] = out.get(where, 0) + n
        return out
