"""Schedule IR: the ordered actions of one pipeline stage under PACI (pure, no torch).

A stage runs one-forward-one-backward (1F1B) continuously. Counted from the last drain,
stage ``s`` of ``P`` first forwards ``W = P - s - 1`` micro-batches (warm-up), then
alternates ``F j+W``, ``B j`` (steady state), so it never holds more than ``P - s``
micro-batches in flight. There is no flush between training iterations: a call of
``forward_backward_func`` ends, on every stage, right after the forward of the call's
last micro-batch and the backward paired with it; the in-flight micro-batches stay in
flight into the next call. After every ``a`` backwards the stage applies its own
optimizer update (``U k``, the ``k``-th update, 1-based). :func:`plan_drain` is the
cool-down: backwards of everything in flight, then the update they complete
(PACI.md, "The schedule" and "Drain"; arXiv 2606.07881, Sec. 3).

Communication implied by the actions (the runtime derives it, the simulator checks it):
``F j`` on stage ``s > 0`` receives activation ``j`` from ``s - 1``; on ``s < P - 1`` it
sends activation ``j`` to ``s + 1``. ``B j`` on ``s < P - 1`` receives the gradient of
micro-batch ``j`` from ``s + 1``; on ``s > 0`` it sends the input gradient to ``s - 1``.
The send that follows the last backward of a call is issued at the start of the next
call (together with the receive of that call's first activation, as Megatron's
``send_backward_recv_forward`` does), so that every send of a call is received in the
same call on both stages: no point-to-point operation is left unmatched between calls.

Actions have a compact text form that round-trips: ``2F5`` (stage 2 forwards
micro-batch 5), ``0B3``, ``1U2`` (stage 1 applies its 2nd update).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace
from enum import Enum
from typing import List, Sequence, Tuple

__all__ = [
    "Kind",
    "Action",
    "StageState",
    "plan_call",
    "plan_drain",
    "plan_forward_only",
    "drift_bound",
    "warmup_microbatches",
    "measure_drift",
    "format_actions",
    "parse_actions",
]


class Kind(str, Enum):
    """Computation type of an action."""

    FORWARD = "F"
    BACKWARD = "B"
    UPDATE = "U"


_ACTION_RE = re.compile(r"^(\d+)([FBU])(\d+)$")


@dataclass(frozen=True)
class Action:
    """One action of one stage: ``FORWARD j``, ``BACKWARD j`` or ``UPDATE k``.

    Attributes:
        stage: pipeline stage index ``s`` in ``[0, P)``.
        kind: :class:`Kind`.
        index: micro-batch index ``j`` (global, counted from the first call) for F/B;
            the update number ``k`` (1-based, counted per stage) for U.
    """

    stage: int
    kind: Kind
    index: int

    def __str__(self) -> str:
        return f"{self.stage}{self.kind.value}{self.index}"

    @staticmethod
    def from_str(text: str) -> "Action":
        """Parse the text form (``"2F5"``). Raises ``ValueError`` on anything else."""
        m = _ACTION_RE.match(text.strip())
        if not m:
            raise ValueError(f"not an action: {text!r} (expected e.g. '2F5', '0B3', '1U2')")
        return Action(int(m.group(1)), Kind(m.group(2)), int(m.group(3)))


@dataclass(frozen=True)
class StageState:
    """What a stage has done so far; the planner's only input besides (P, s, m, a).

    Attributes:
        forwarded: micro-batches forwarded since training started (training calls only).
        backwarded: micro-batches backwarded since training started.
        pending: backwards accumulated since the last update (``0 <= pending < a``).
        version: optimizer updates applied so far (``v_s`` in PACI.md).
    """

    forwarded: int = 0
    backwarded: int = 0
    pending: int = 0
    version: int = 0

    @property
    def in_flight(self) -> int:
        """Micro-batches forwarded and not yet backwarded."""
        return self.forwarded - self.backwarded


def warmup_microbatches(num_stages: int, stage: int) -> int:
    """Warm-up forwards of a stage in 1F1B: ``P - s - 1`` (Megatron's
    ``forward_backward_pipelining_without_interleaving``)."""
    return num_stages - stage - 1


def drift_bound(num_stages: int, stage: int, accumulation: int) -> int:
    """Largest drift PACI allows on a stage: ``ceil((P - 1 - s) / a)`` (PACI.md, "The bound").

    Raises:
        ValueError: for ``stage`` outside ``[0, P)`` or ``accumulation < 1``.
    """
    _check(num_stages, stage, 1, accumulation)
    return math.ceil((num_stages - 1 - stage) / accumulation)


def _check(num_stages: int, stage: int, num_microbatches: int, accumulation: int) -> None:
    if num_stages < 1:
        raise ValueError(f"num_stages must be >= 1, got {num_stages}")
    if not 0 <= stage < num_stages:
        raise ValueError(f"stage must be in [0, {num_stages}), got {stage}")
    if num_microbatches < 1:
        raise ValueError(f"num_microbatches must be >= 1, got {num_microbatches}")
    if accumulation < 1:
        raise ValueError(f"accumulation factor a must be >= 1, got {accumulation}")


def _backward(stage: int, state: StageState, accumulation: int, out: List[Action]) -> StageState:
    out.append(Action(stage, Kind.BACKWARD, state.backwarded))
    state = replace(state, backwarded=state.backwarded + 1, pending=state.pending + 1)
    if state.pending == accumulation:
        state = replace(state, pending=0, version=state.version + 1)
        out.append(Action(stage, Kind.UPDATE, state.version))
    return state


def plan_call(
    num_stages: int, stage: int, num_microbatches: int, accumulation: int, state: StageState
) -> Tuple[List[Action], StageState]:
    """Actions of one training call of ``forward_backward_func`` on one stage.

    Forwards exactly ``m`` new micro-batches. While fewer than ``W = P - s - 1`` are in
    flight it only forwards (warm-up, after a drain or at the start); otherwise each
    forward is followed by the backward of the oldest in-flight micro-batch (steady
    state), and an update follows every ``a``-th backward.

    Args:
        num_stages: ``P``. stage: ``s``. num_microbatches: ``m`` forwards in this call.
        accumulation: ``a``, backwards per local update.
        state: the stage's :class:`StageState` before the call.

    Returns:
        ``(actions, state_after)``.

    Raises:
        ValueError: on out-of-range arguments.
    """
    _check(num_stages, stage, num_microbatches, accumulation)
    warmup = warmup_microbatches(num_stages, stage)
    out: List[Action] = []
    for _ in range(num_microbatches):
        out.append(Action(stage, Kind.FORWARD, state.forwarded))
        state = replace(state, forwarded=state.forwarded + 1)
        if state.in_flight > warmup:
            state = _backward(stage, state, accumulation, out)
    return out, state


def plan_drain(
    num_stages: int, stage: int, accumulation: int, state: StageState
) -> Tuple[List[Action], StageState]:
    """Cool-down: backwards of every in-flight micro-batch, then the update they complete.

    A window left incomplete by the drain (``pending > 0`` afterwards) is applied as a
    final, partial update so that all stages end at the same version with one
    consistent set of weights (PACI.md, "Drain").

    Returns:
        ``(actions, state_after)``; ``state_after.in_flight == 0`` and ``pending == 0``.
    """
    _check(num_stages, stage, 1, accumulation)
    out: List[Action] = []
    while state.in_flight > 0:
        state = _backward(stage, state, accumulation, out)
    if state.pending:
        state = replace(state, pending=0, version=state.version + 1)
        out.append(Action(stage, Kind.UPDATE, state.version))
    return out, state


def plan_forward_only(stage: int, num_microbatches: int) -> List[Action]:
    """Evaluation call (``forward_only=True``) on a drained pipeline: ``F 0 .. F m-1``.

    Micro-batch indices are local to the call; evaluation does not touch training state.
    """
    return [Action(stage, Kind.FORWARD, j) for j in range(num_microbatches)]


def measure_drift(actions: Sequence[Action], version: int = 0) -> dict:
    """Drift of every micro-batch backwarded in ``actions`` (one stage's, in order).

    Drift of micro-batch ``j`` = version at ``B j`` minus version at ``F j``
    (PACI.md, "Terms"). Forwards before ``actions`` are not seen: pass a whole run.

    Returns:
        ``{j: drift}`` for every ``j`` with both ``F j`` and ``B j`` in ``actions``.
    """
    at_forward = {}
    drift = {}
    for act in actions:
        if act.kind is Kind.UPDATE:
            version = act.index
        elif act.kind is Kind.FORWARD:
            at_forward[act.index] = version
        elif act.index in at_forward:
            drift[act.index] = version - at_forward.pop(act.index)
    return drift


def format_actions(actions: Sequence[Action]) -> str:
    """Space-separated text form, e.g. ``"1F0 1F1 1B0 1U1"``."""
    return " ".join(str(a) for a in actions)


def parse_actions(text: str) -> List[Action]:
    """Inverse of :func:`format_actions`. Raises ``ValueError`` on a malformed token."""
    return [Action.from_str(tok) for tok in text.split()]
