"""Telemetry: per-stage drift statistics, the hard check against the bound, timelines.

Drift of micro-batch ``j`` on stage ``s`` is the stage's version (updates applied) at the
backward of ``j`` minus its version at the forward of ``j`` (docs/design.md, "Terms"). It never
exceeds ``ceil((P - 1 - s) / a)`` (docs/design.md, "The bound"); a larger measured value means
the schedule is wrong, and :meth:`DriftTelemetry.record` raises. A run's (or a
simulation's) timeline is a list of :class:`TimelineEvent`, written as a Chrome / Perfetto
trace by :func:`write_chrome_trace`.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

from .plan import Kind, drift_bound

__all__ = ["DriftTelemetry", "DriftBoundError", "gather_drift", "gather_stages", "TimelineEvent",
           "write_chrome_trace", "write_run_trace"]


class DriftBoundError(RuntimeError):
    """A measured drift exceeded ``ceil((P - 1 - s) / a)``."""


class DriftTelemetry:
    """Drift statistics of one stage.

    Args:
        num_stages: ``P``. stage: ``s``.
        check: raise :class:`DriftBoundError` when a drift exceeds the bound.
    """

    def __init__(self, num_stages: int, stage: int, check: bool = True):
        self.num_stages, self.stage, self.check = num_stages, stage, check
        self.histogram: Counter = Counter()
        self.total = 0
        self.tied_lag: Counter = Counter()  # last stage of a tied embedding: lag -> forwards

    def record(self, microbatch: int, drift: int, accumulation: int) -> None:
        """Add the drift of one backwarded micro-batch.

        Raises:
            DriftBoundError: ``drift`` exceeds ``ceil((P - 1 - s) / accumulation)``.
        """
        bound = drift_bound(self.num_stages, self.stage, accumulation)
        if self.check and drift > bound:
            raise DriftBoundError(
                f"stage {self.stage}: micro-batch {microbatch} crossed {drift} updates between "
                f"its forward and backward; the bound ceil((P-1-s)/a) = "
                f"ceil(({self.num_stages}-1-{self.stage})/{accumulation}) = {bound}")
        self.histogram[drift] += 1
        self.total += drift

    def record_tied_lag(self, microbatch: int, lag: int, accumulation: int) -> None:
        """Add the tied lag at one forward of the last stage: its own version minus the
        tied updates its copy of the tied embedding holds (:mod:`paci_megatron.tied`).

        Raises:
            DriftBoundError: ``lag`` exceeds ``ceil((P - 1) / accumulation)``.
        """
        bound = drift_bound(self.num_stages, 0, accumulation)
        if self.check and lag > bound:
            raise DriftBoundError(
                f"stage {self.stage}: at the forward of micro-batch {microbatch} the tied "
                f"embedding's copy trails the stage by {lag} updates; the bound "
                f"ceil((P-1)/a) = ceil(({self.num_stages}-1)/{accumulation}) = {bound}")
        self.tied_lag[lag] += 1

    @property
    def count(self) -> int:
        """Micro-batches recorded."""
        return sum(self.histogram.values())

    @property
    def max(self) -> int:
        """Largest drift seen (0 before any backward)."""
        return max(self.histogram) if self.histogram else 0

    @property
    def mean(self) -> float:
        """Mean drift over recorded micro-batches (0.0 before any)."""
        return self.total / self.count if self.count else 0.0

    def summary(self) -> Dict[str, object]:
        """``{"max", "mean", "count", "histogram"}``; histogram maps drift -> micro-batches.
        The last stage of a tied embedding adds ``"tied_lag": {"max", "mean", "count"}``."""
        out = {"max": self.max, "mean": self.mean, "count": self.count,
               "histogram": {int(k): int(v) for k, v in sorted(self.histogram.items())}}
        if self.tied_lag:
            n = sum(self.tied_lag.values())
            out["tied_lag"] = {"max": max(self.tied_lag), "count": n,
                               "mean": sum(k * v for k, v in self.tied_lag.items()) / n}
        return out


def gather_drift(telemetry: Optional[DriftTelemetry], pp_group=None) -> List[Dict[str, object]]:
    """Every stage's :meth:`DriftTelemetry.summary`, gathered over the pipeline group.

    A collective: call it between training calls on every rank of the pipeline group (the
    training loop does so at log intervals). ``telemetry`` None (e.g. Megatron's own
    schedule) counts as a stage that has seen no drift.

    Returns:
        ``P`` summaries in stage order: ``{"max", "mean", "count", "histogram"}``.
    """
    local = telemetry.summary() if telemetry is not None else DriftTelemetry(1, 0).summary()
    return gather_stages(local, pp_group, "drift statistics")


def gather_stages(local: object, pp_group, what: str) -> List[object]:
    """Every stage's ``local`` (any picklable object), in stage order: a collective over the
    pipeline group (``[local]`` without one).

    Raises:
        RuntimeError: the collective failed (a peer stage stopped); names this stage.
    """
    import torch  # here, so that the simulator imports this module without torch

    if pp_group is None or not torch.distributed.is_initialized():
        return [local]
    out: List[object] = [None] * torch.distributed.get_world_size(pp_group)
    try:
        torch.distributed.all_gather_object(out, local, group=pp_group)
    except Exception as err:  # a peer stage died or stalled mid-collective
        raise RuntimeError(f"stage {pp_group.rank()}: gathering every stage's {what} failed "
                           f"(did another stage stop?): {err}") from err
    return out


@dataclass(frozen=True)
class TimelineEvent:
    """One executed action, recorded by the runtime or simulated (:mod:`paci_megatron.sim`).

    Attributes:
        stage: pipeline stage. kind: :class:`~paci_megatron.plan.Kind`. index: micro-batch
            (F/B) or update number (U).
        start / end: seconds from the first recorded action.
        version: the stage's updates applied when the action started (the weights it used).
        replica: the DP rank of a real run (0 in a simulation).
    """

    stage: int
    kind: Kind
    index: int
    start: float
    end: float
    version: int
    replica: int = 0

    @property
    def label(self) -> str:
        """Block text: ``F3/v1`` (forward of micro-batch 3 with weights of version 1)."""
        return f"{self.kind.value}{self.index}" + (f"/v{self.version}" if self.kind is not Kind.UPDATE else "")


def write_chrome_trace(events: Sequence[TimelineEvent], path: str, num_stages: Optional[int] = None,
                       replica: int = 0) -> None:
    """Chrome / Perfetto trace (``chrome://tracing``, ui.perfetto.dev) of events whose times
    are in seconds: one track per stage (per DP replica: the trace's process id), one
    complete event per action, micro-batch and weight version in its arguments.
    ``num_stages`` / ``replica`` name the tracks of stages that have no events."""
    tracks = {(ev.replica, ev.stage) for ev in events}
    tracks |= {(replica, s) for s in range(num_stages or 0)}
    trace = {"traceEvents": [
        {"name": ev.label, "cat": ev.kind.name.lower(), "ph": "X", "pid": ev.replica,
         "tid": ev.stage, "ts": ev.start * 1e6, "dur": (ev.end - ev.start) * 1e6,
         "args": {"micro_batch": ev.index, "version": ev.version}}
        for ev in events
    ] + [{"name": "thread_name", "ph": "M", "pid": r, "tid": s, "args": {"name": f"stage {s}"}}
         for r, s in sorted(tracks)]}
    with open(path, "w", encoding="utf-8") as f:
        json.dump(trace, f)


def write_run_trace(path: str, timeline: Sequence[TimelineEvent]) -> Optional[int]:
    """Gather every rank's timeline and write one Chrome trace from the last rank.

    A collective over the whole world (``--paci-trace`` at the end of training).

    Returns:
        The number of events written on the last rank, None on the others.
    """
    import os

    import torch

    gathered: List[Sequence[TimelineEvent]] = [list(timeline)]
    if torch.distributed.is_initialized():
        gathered = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(gathered, list(timeline))
        if torch.distributed.get_rank() != torch.distributed.get_world_size() - 1:
            return None
    events = [ev for events in gathered for ev in events]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_chrome_trace(events, path)
    return len(events)
