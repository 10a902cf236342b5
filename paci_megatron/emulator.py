"""A pipeline emulator: all P ranks of a pipeline-parallel run in one process, on one device.

The emulator is a second driver of the same code, not a second implementation: each rank
runs the unchanged training function (``examples/pretrain_gpt.py``'s, or any function of
the rank) on its own thread, and only the transport differs. Ranks take turns: exactly
one runs at a time, and it hands over only where it waits for another rank (a receive
that has not arrived, a collective that others have not joined). At every hand-over the
process-global state a rank owns is swapped with it: torch's RNG states, torch.distributed's
world (its groups), megatron-core's module state (``parallel_state``'s groups, the
model-parallel RNG tracker, ...) and the rank's environment (``RANK``, ``WORLD_SIZE``).
Each rank therefore computes what its own process would compute: a run's values depend
only on each rank's own inputs, never on the order the ranks take turns in, so the
emulated run equals the P-process run bit for bit where the collectives combine in the
same order (sums over more than two ranks add as gloo's ring does a one-element tensor:
rank ``P-1`` first, down to rank 0; ``tests/test_emulator.py`` pins it).

Point-to-point messages are handed over in memory (a send is buffered, a receive waits
for it); collectives meet in memory. A wait that can never be satisfied (every rank
waiting) stops every rank with :class:`EmulationDeadlock`, naming what each rank waited
for; a wait longer than the groups' timeout (``init_process_group``'s) fails as a timeout
naming what it waited for; an error in one rank stops the others and is raised with that
rank's traceback.

Limits: DP = TP = CP = 1 in the models this is meant for (the pipeline's own collectives
are supported; a multi-element sum over more than two ranks may differ from gloo's in
the last bits), CPU or one CUDA device shared by all ranks.
"""

from __future__ import annotations

import datetime
import importlib
import os
import re
import sys
import threading
import traceback
from collections import deque
from typing import Any, Callable, Deque, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

__all__ = ["BACKEND", "EmulationDeadlock", "EmulationError", "run_ranks", "current_rank"]

BACKEND = "paci_emulated"
"""The ``torch.distributed`` backend name of the in-process transport."""

#: modules whose module-level state (names ``_UPPER_CASE``) belongs to a rank
_RANK_STATE_MODULES = (
    "megatron.core.parallel_state",
    "megatron.core.tensor_parallel.random",
    "megatron.core.num_microbatches_calculator",
    "megatron.core.rerun_state_machine",
    "megatron.core.utils",
    "megatron.core.pipeline_parallel.utils",
    "megatron.core.transformer.utils",
    "megatron.core.transformer.moe.moe_utils",
)
_RANK_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK")
_STATE_NAME = re.compile(r"^_[A-Z][A-Z0-9_]*$")
#: torch.distributed's own per-process state (its groups, their names and ranks): a rank
#: starts with none of it
_C10D = "torch.distributed.distributed_c10d"


def _fresh_c10d_state() -> Dict[str, Any]:
    c10d = dist.distributed_c10d
    return {"_world": c10d._World(), "_pg_map": {}, "_pg_names": {}, "_pg_group_ranks": {},
            "_pg_backend_config": {}, "_group_count": 0, "_tags_to_pg": {}, "_pg_to_tag": {},
            "_backend": None, "_default_pg_init_method": None}


class EmulationError(RuntimeError):
    """A rank of an emulated run failed; the message holds its traceback."""


class EmulationDeadlock(EmulationError):
    """Every unfinished rank waits for another: the plan (or the code) cannot proceed."""


class _Stop(BaseException):
    """Raised in a waiting rank when another rank failed (not an ``Exception``: the rank's
    own error handlers must not swallow it)."""


# ---------------------------------------------------------------------- rank state
class _RankState:
    """The process-global state one rank owns, captured and restored at hand-over."""

    def __init__(self, modules: Dict[str, Dict[str, Any]], env: Dict[str, Optional[str]],
                 cpu_rng: torch.Tensor, cuda_rng: Optional[List[torch.Tensor]], excepthook):
        self.modules, self.env = modules, env
        self.cpu_rng, self.cuda_rng, self.excepthook = cpu_rng, cuda_rng, excepthook

    @classmethod
    def capture(cls) -> "_RankState":
        modules = {_C10D: {k: getattr(dist.distributed_c10d, k) for k in _fresh_c10d_state()}}
        for name in _RANK_STATE_MODULES:
            module = sys.modules.get(name)
            if module is not None:
                modules[name] = {k: v for k, v in vars(module).items() if _STATE_NAME.match(k)}
        cuda = (torch.cuda.get_rng_state_all()
                if torch.cuda.is_available() and torch.cuda.is_initialized() else None)
        return cls(modules, {k: os.environ.get(k) for k in _RANK_ENV}, torch.get_rng_state(),
                   cuda, sys.excepthook)

    def fresh(self) -> "_RankState":
        """This state with a torch.distributed of its own, uninitialised (a new rank)."""
        modules = dict(self.modules)
        modules[_C10D] = _fresh_c10d_state()
        return _RankState(modules, self.env, self.cpu_rng, self.cuda_rng, self.excepthook)

    def restore(self) -> None:
        sys.excepthook = self.excepthook  # init_process_group wraps it once per rank
        c10d = dist.distributed_c10d
        for k, v in self.modules[_C10D].items():
            setattr(c10d, k, v)
        for name, values in self.modules.items():
            if name == _C10D:
                continue
            module = sys.modules[name]
            for k in [k for k in vars(module) if _STATE_NAME.match(k) and k not in values]:
                delattr(module, k)  # set by another rank after this one's capture
            for k, v in values.items():
                setattr(module, k, v)
        for k, v in self.env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        torch.set_rng_state(self.cpu_rng)
        if self.cuda_rng is not None:
            torch.cuda.set_rng_state_all(self.cuda_rng)


# ---------------------------------------------------------------------- turn-taking
class _Hub:
    """What the ranks of one emulation share: whose turn it is, what each waits for, the
    messages in flight and the collectives being joined."""

    def __init__(self, world_size: int):
        self.world_size = world_size
        self.cond = threading.Condition()
        self.running: Optional[int] = None
        self.started: List[bool] = [False] * world_size
        self.done: List[bool] = [False] * world_size
        self.waits: Dict[int, Tuple[Callable[[], bool], str]] = {}
        self.failure: Optional[EmulationError] = None
        self.mailboxes: Dict[Tuple[str, int, int, int], Deque[torch.Tensor]] = {}
        self.meetings: Dict[Tuple[str, int], Tuple[Dict[int, Any], List[int]]] = {}
        self.local = threading.local()
        self.timeout_s: Optional[float] = None  # the shortest timeout a group was given

    def rank(self) -> int:
        rank = getattr(self.local, "rank", None)
        if rank is None:
            raise EmulationError("this thread is not a rank of the emulated run")
        return rank

    # called with self.cond held
    def _pass_on(self, after: int) -> None:
        """Give the turn to the next rank (cyclically after ``after``) that can go on."""
        n = self.world_size
        for step in range(1, n + 1):
            r = (after + step) % n
            if self.done[r]:
                continue
            if not self.started[r] or (r in self.waits and self.waits[r][0]()):
                self.waits.pop(r, None)
                self.running = r
                self.cond.notify_all()
                return
        self.running = None
        if not all(self.done) and self.failure is None:
            waiting = "; ".join(f"rank {r} waits for {label}"
                                for r, (_, label) in sorted(self.waits.items()))
            self.failure = EmulationDeadlock(
                f"no rank of the emulated run can go on: {waiting}")
        self.cond.notify_all()

    def _await_turn(self, rank: int, timeout_s: Optional[float] = None) -> bool:
        """Wait (``self.cond`` held) until it is ``rank``'s turn; False after ``timeout_s``.

        Raises:
            _Stop: another rank failed meanwhile.
        """
        if not self.cond.wait_for(lambda: self.running == rank or self.failure is not None,
                                  timeout=timeout_s):
            return False
        if self.failure is not None and self.running != rank:
            raise _Stop()
        return True

    def block(self, predicate: Callable[[], bool], label: str,
              timeout_s: Optional[float] = None) -> None:
        """The running rank waits until ``predicate()`` holds; the others run meanwhile.

        Args:
            timeout_s: the longest wait, seconds (default: the groups' timeout, as
                ``init_process_group`` gave it; None: no limit).

        Raises:
            EmulationError: the wait passed ``timeout_s`` (its message says "timed out" and
                what the rank waited for: a transport's timeout, which
                :func:`paci_megatron.p2p.wait_all` names with the stage and micro-batch).
            EmulationDeadlock (in the rank that detects it) or _Stop (in the others).
        """
        if predicate():
            return
        rank = self.rank()
        limit = timeout_s if timeout_s else self.timeout_s
        mine = _RankState.capture()
        with self.cond:
            self.waits[rank] = (predicate, label)
            self._pass_on(rank)
            if self.failure is not None and self.running is None:
                raise self.failure
            if not self._await_turn(rank, limit):
                self.waits.pop(rank, None)  # the run is aborted (run_ranks restores this
                # process's state when every rank has stopped)
                raise EmulationError(f"rank {rank} timed out after {limit:g} s waiting for "
                                     f"{label}")
        mine.restore()

    def run(self, rank: int, fn: Callable[[int], Any], initial: _RankState,
            results: List[Any]) -> None:
        """Thread body of ``rank``: wait for the first turn, run ``fn(rank)``, hand over."""
        self.local.rank = rank
        with self.cond:
            try:
                self._await_turn(rank)
            except _Stop:
                self.done[rank] = True
                return
            self.started[rank] = True
        try:
            initial.restore()
            os.environ.update(RANK=str(rank), LOCAL_RANK="0", WORLD_SIZE=str(self.world_size),
                              LOCAL_WORLD_SIZE=str(self.world_size), GROUP_RANK="0")
            results[rank] = fn(rank)
        except _Stop:
            pass
        except BaseException as exc:  # SystemExit included: the rank stopped the run
            with self.cond:
                if self.failure is None:
                    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
                    self.failure = EmulationError(f"rank {rank} failed:\n{text}")
                    self.failure.exit_code = exc.code if isinstance(exc, SystemExit) else None
                self.cond.notify_all()  # the waiting ranks stop
        finally:
            # this thread's torch function modes (the CPU mode's) live in C++ thread-local
            # storage: dropped here, with the GIL, not by the thread's exit at interpreter
            # shutdown (which aborts the process)
            while torch._C._len_torch_function_stack() > 0:
                torch._C._pop_torch_function_stack()
            with self.cond:
                self.done[rank] = True
                if self.running == rank:
                    self._pass_on(rank)


_HUB: Optional[_Hub] = None  # the emulation in progress (one at a time)
_HUB_LOCK = threading.Lock()


def current_rank() -> Optional[int]:
    """The emulated rank of the calling thread, or None outside an emulated run."""
    hub = _HUB
    return getattr(hub.local, "rank", None) if hub is not None else None


def run_ranks(world_size: int, fn: Callable[[int], Any],
              preload: Sequence[str] = _RANK_STATE_MODULES) -> List[Any]:
    """Run ``fn(rank)`` for every rank of a ``world_size``-rank job in this process, the
    ranks taking turns (module docstring). Inside, ``torch.distributed`` is initialised as
    usual with ``backend=paci_megatron.emulator.BACKEND`` (any ``init_method`` or store;
    ``RANK`` and ``WORLD_SIZE`` are set for each rank), and the ranks' groups, messages and
    collectives stay in this process.

    Args:
        world_size: ranks to run (>= 1).
        fn: the work of one rank; its return value is collected.
        preload: modules whose per-rank state must be captured from the start (imported
            here, before any rank runs).

    Returns:
        ``[fn(0), ..., fn(world_size - 1)]``.

    Raises:
        EmulationError: a rank raised (its traceback in the message; ``exit_code`` is set
            where it was a ``SystemExit``), or the ranks deadlocked
            (:class:`EmulationDeadlock`). Every rank has stopped when it is raised.
    """
    global _HUB
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    for name in preload:
        try:
            importlib.import_module(name)
        except ImportError:
            pass
    if not _HUB_LOCK.acquire(blocking=False):
        raise EmulationError("an emulated run is already in progress in this process")
    outer = _RankState.capture()
    try:
        _register_backend()
        hub = _Hub(world_size)
        _HUB = hub
        results: List[Any] = [None] * world_size
        grad_threads = torch.autograd.set_multithreading_enabled(False)
        new_group = dist.new_group
        dist.new_group = _in_process(new_group)
        # torch's registry of groups by name: one per thread (rank), as one per process
        torch._C._distributed_c10d._set_thread_isolation_mode(True)
        # every rank starts from this process's state, with a torch.distributed of its own
        threads = [threading.Thread(target=hub.run, args=(r, fn, outer.fresh(), results),
                                    name=f"emulated-rank-{r}", daemon=True)
                   for r in range(world_size)]
        for t in threads:
            t.start()
        with hub.cond:
            hub._pass_on(world_size - 1)  # rank 0 first
        for t in threads:
            t.join()
        grad_threads.__exit__(None, None, None)
        torch._C._distributed_c10d._set_thread_isolation_mode(False)
        dist.new_group = new_group
        if hub.failure is not None:
            raise hub.failure
        return results
    finally:
        _HUB = None
        outer.restore()
        _HUB_LOCK.release()


# ---------------------------------------------------------------------- transport
class _Work(dist.Work):
    """A request of the in-process transport: complete at once (sends, collectives) or
    when its message arrives (receives)."""

    def __init__(self, finish: Optional[Callable[[Optional[float]], None]] = None):
        super().__init__()
        self._finish = finish

    def wait(self, timeout: datetime.timedelta = datetime.timedelta(0)) -> bool:
        """Wait for the request, at most ``timeout`` (zero: the group's timeout).

        Raises:
            EmulationError: it timed out (see :meth:`_Hub.block`)."""
        if self._finish is not None:
            finish, self._finish = self._finish, None
            finish(timeout.total_seconds() or None)
        return True

    def is_completed(self) -> bool:
        return self._finish is None

    def is_success(self) -> bool:
        return True

    def exception(self):
        return None

    def result(self) -> List[torch.Tensor]:
        return []

    def synchronize(self) -> None:
        self.wait()


def _combine_sum(parts: List[torch.Tensor]) -> torch.Tensor:
    """gloo's ring order for a one-element tensor: rank P-1 first, down to rank 0."""
    total = parts[-1].clone()
    for part in reversed(parts[:-1]):
        total = total + part
    return total


_REDUCE = {
    dist.ReduceOp.SUM: _combine_sum,
    dist.ReduceOp.MAX: lambda parts: torch.stack(parts).amax(0),
    dist.ReduceOp.MIN: lambda parts: torch.stack(parts).amin(0),
}


def _reduction(opts) -> Callable[[List[torch.Tensor]], torch.Tensor]:
    op = getattr(opts, "reduceOp", dist.ReduceOp.SUM) if opts is not None else dist.ReduceOp.SUM
    op = getattr(op, "op", op)  # a ReduceOp wraps its RedOpType
    for kind, combine in _REDUCE.items():
        if op == kind:
            return combine
    raise EmulationError(f"the emulated transport has no reduction {op}")


class EmulatedProcessGroup(dist.ProcessGroup):
    """One rank's member of a group in the in-process transport (backend
    :data:`BACKEND`): buffered sends, receives that wait for their message, collectives
    that meet in memory. Ranks are group ranks, as for every ``ProcessGroup``."""

    def __init__(self, rank: int, size: int, hub: _Hub):
        super().__init__(rank, size)
        self._hub = hub
        self._sequence = 0

    def getBackendName(self) -> str:
        return BACKEND

    def _name(self) -> str:
        return dist.distributed_c10d._world.pg_names[self]

    def _meet(self, what: str, payload: Any) -> List[Any]:
        """Deposit ``payload`` and wait until every member has; the deposits by group rank."""
        key = (self._name(), self._sequence)
        self._sequence += 1
        hub, size = self._hub, self.size()
        slot, left = hub.meetings.setdefault(key, ({}, [size]))
        slot[self.rank()] = payload
        hub.block(lambda: len(slot) == size,
                  f"{what} #{key[1]} of group {key[0]} ({len(slot)} of {size} joined)")
        parts = [slot[r] for r in range(size)]
        left[0] -= 1
        if left[0] == 0:  # every member has its parts
            del hub.meetings[key]
        return parts

    # collectives --------------------------------------------------------------
    @torch.no_grad()
    def allreduce(self, tensors, opts=None):
        if isinstance(tensors, torch.Tensor):
            tensors = [tensors]
        combine = _reduction(opts)
        for t in tensors:
            parts = self._meet("all-reduce", t.detach().clone())
            t.copy_(combine(parts))
        return _Work()

    def allreduce_coalesced(self, tensors, opts=None):
        return self.allreduce(tensors, opts)

    @torch.no_grad()
    def allgather(self, output_tensors, input_tensor, opts=None):
        for outs, t in zip(output_tensors, input_tensor):
            parts = self._meet("all-gather", t.detach().clone())
            for o, p in zip(outs, parts):
                o.copy_(p)
        return _Work()

    @torch.no_grad()
    def _allgather_base(self, output, input, opts=None):
        parts = self._meet("all-gather", input.detach().clone())
        output.copy_(torch.cat([p.reshape(-1) for p in parts]).view_as(output))
        return _Work()

    @torch.no_grad()
    def broadcast(self, tensors, opts=None):
        root = opts.rootRank if opts is not None else 0
        for t in tensors:
            parts = self._meet("broadcast", t.detach().clone() if self.rank() == root else None)
            if self.rank() != root:
                t.copy_(parts[root])
        return _Work()

    def barrier(self, opts=None):
        self._meet("barrier", None)
        return _Work()

    @torch.no_grad()
    def reduce_scatter(self, output_tensors, input_tensors, opts=None):
        combine = _reduction(opts)
        for out, ins in zip(output_tensors, input_tensors):
            parts = self._meet("reduce-scatter", [t.detach().clone() for t in ins])
            out.copy_(combine([p[self.rank()] for p in parts]))
        return _Work()

    @torch.no_grad()
    def _reduce_scatter_base(self, output, input, opts=None):
        combine = _reduction(opts)
        parts = self._meet("reduce-scatter", input.detach().clone())
        n = output.numel()
        out = combine([p.reshape(-1)[self.rank() * n:(self.rank() + 1) * n] for p in parts])
        output.copy_(out.view_as(output))
        return _Work()

    # point to point ------------------------------------------------------------
    def send(self, tensors, dst: int, tag: int = 0):
        key = (self._name(), self.rank(), dst, tag)
        box = self._hub.mailboxes.setdefault(key, deque())
        for t in tensors:
            box.append(t.detach().clone())
        return _Work()

    def recv(self, tensors, src: int, tag: int = 0):
        key = (self._name(), src, self.rank(), tag)
        hub = self._hub
        box = hub.mailboxes.setdefault(key, deque())

        def finish(timeout_s: Optional[float]) -> None:
            for t in tensors:
                hub.block(lambda: len(box) > 0,
                          f"a message from rank {src} of group {key[0]} (tag {tag})", timeout_s)
                with torch.no_grad():  # a receive buffer may require grad (Megatron's)
                    t.copy_(box.popleft())

        return _Work(finish)


def _in_process(new_group: Callable[..., Any]) -> Callable[..., Any]:
    """``torch.distributed.new_group`` that keeps every group in this process: a group asked
    for on another backend (megatron-core's gloo groups) gets the emulated transport."""
    def emulated_new_group(*args, **kwargs):
        if len(args) >= 3:
            args = args[:2] + (BACKEND,) + args[3:]
        elif kwargs.get("backend") is not None:
            kwargs["backend"] = BACKEND
        return new_group(*args, **kwargs)

    return emulated_new_group


def _create_group(store, rank: int, size: int, timeout) -> EmulatedProcessGroup:
    if _HUB is None:
        raise EmulationError(f"backend {BACKEND!r} is only available inside "
                             "paci_megatron.emulator.run_ranks")
    seconds = timeout.total_seconds() if timeout is not None else None
    if seconds and (_HUB.timeout_s is None or seconds < _HUB.timeout_s):
        _HUB.timeout_s = seconds  # every wait of the transport is bounded by it
    return EmulatedProcessGroup(rank, size, _HUB)


_REGISTERED = False


def _register_backend() -> None:
    global _REGISTERED
    if not _REGISTERED:
        dist.Backend.register_backend(BACKEND, _create_group, devices=["cpu", "cuda"])
        _REGISTERED = True
