"""Drift telemetry: per-stage drift statistics and the hard check against the bound.

Drift of micro-batch ``j`` on stage ``s`` is the stage's version (updates applied) at the
backward of ``j`` minus its version at the forward of ``j`` (docs/design.md, "Terms"). It never
exceeds ``ceil((P - 1 - s) / a)`` (docs/design.md, "The bound"); a larger measured value means
the schedule is wrong, and :meth:`DriftTelemetry.record` raises.
"""

from __future__ import annotations

from collections import Counter
from typing import Dict, List, Optional

import torch

from .plan import drift_bound

__all__ = ["DriftTelemetry", "DriftBoundError", "gather_drift"]


class DriftBoundError(RuntimeError):
    """A measured drift exceeded ``ceil((P - 1 - s) / a)``."""


class DriftTelemetry:
    """Drift statistics of one stage.

    Args:
        num_stages: ``P``. stage: ``s``.
        check: raise :class:`DriftBoundError` when a drift exceeds the bound.
    """

    def __init__(self, num_stages: int, stage: int, check: bool = True):
        self.num_stages = num_stages
        self.stage = stage
        self.check = check
        self.histogram: Counter = Counter()
        self.total = 0

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
                f"ceil(({self.num_stages}-1-{self.stage})/{accumulation}) = {bound}"
            )
        self.histogram[drift] += 1
        self.total += drift

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
        """``{"max", "mean", "count", "histogram"}``; histogram maps drift -> micro-batches."""
        return {
            "max": self.max,
            "mean": self.mean,
            "count": self.count,
            "histogram": {int(k): int(v) for k, v in sorted(self.histogram.items())},
        }


def gather_drift(telemetry: Optional[DriftTelemetry], pp_group=None) -> List[Dict[str, object]]:
    """Every stage's :meth:`DriftTelemetry.summary`, gathered over the pipeline group.

    A collective: call it between training calls on every rank of the pipeline group (the
    training loop does so at log intervals). ``telemetry`` None (e.g. Megatron's own
    schedule) counts as a stage that has seen no drift.

    Returns:
        ``P`` summaries in stage order: ``{"max", "mean", "count", "histogram"}``.
    """
    local = telemetry.summary() if telemetry is not None else DriftTelemetry(1, 0).summary()
    if pp_group is None or not torch.distributed.is_initialized():
        return [local]
    out: List[Dict[str, object]] = [None] * torch.distributed.get_world_size(pp_group)
    torch.distributed.all_gather_object(out, local, group=pp_group)
    return out
