"""Schedule IR: the ordered actions of one pipeline stage under PACI (pure, no torch).

Stage ``s`` of ``P`` runs 1F1B continuously: counted from the last drain it forwards
``W = P - s - 1`` micro-batches (warm-up), then alternates ``F j+W``, ``B j`` (steady
state), never flushing between calls of ``forward_backward_func``; after every ``a``
backwards it applies its own update ``U k``. :func:`plan_drain` is the cool-down
(docs/design.md, "The schedule" and "Drain"). :func:`lower` adds the exchanges with the
neighbours in Megatron's pairing, such that every send of a call is received in the same
call, and marks the backwards that close a window.

Actions, exchanges and marks have text forms that round-trip (``2F5``, ``0B3``, ``1U2``,
``1:send_forward_recv_backward(act5,grad3)``, ``1SYNC``); :func:`validate_plan` checks
whole plans and shows a violation in the stages' grid.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace
from enum import Enum
from typing import Dict, List, Optional, Sequence, Tuple, Union

__all__ = ["Kind", "Action", "StageState", "plan_call", "plan_drain", "plan_forward_only",
           "drift_bound", "mean_drift", "warmup_microbatches", "measure_drift", "advance",
           "Comm", "GradSync", "lower", "format_steps", "parse_steps", "PlanError",
           "validate_plan", "simulate_p2p", "P2PError", "format_actions", "parse_actions",
           "tied_updates_due", "TiedComm", "TiedWindows", "Barrier", "lower_run"]


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
        version: optimizer updates applied so far (``v_s`` in docs/design.md).
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
    """Largest drift PACI allows on a stage: ``ceil((P - 1 - s) / a)``.

    Source: arXiv 2606.07881; docs/design.md, "The bound".

    Raises:
        ValueError: for ``stage`` outside ``[0, P)`` or ``accumulation < 1``.
    """
    _check(num_stages, stage, 1, accumulation)
    return math.ceil((num_stages - 1 - stage) / accumulation)


def mean_drift(num_stages: int, stage: int, accumulation: int) -> float:
    """Mean drift of a stage's micro-batches in steady state: ``(P - 1 - s) / a``.

    Between the forward and the backward of a micro-batch the stage runs the backwards of
    the ``W = P - 1 - s`` micro-batches ahead of it; each closes a window with probability
    ``1 / a`` over a window's positions (docs/design.md, "The bound").
    """
    _check(num_stages, stage, 1, accumulation)
    return (num_stages - 1 - stage) / accumulation


def tied_updates_due(num_stages: int, accumulation: int, microbatch: int,
                     origin: Optional["StageState"] = None) -> int:
    """Tied updates the last stage's copy of a tied embedding must hold at its forward of
    ``microbatch``: ``v0 + max(0, floor((j - j0 - P + 1) / a))``, windows counted from
    ``origin`` (the drained state ``(j0 = backwarded, v0 = version)`` the stages last
    shared; a fresh run's by default).

    Update ``k`` of the first stage follows its backward of the window's last micro-batch
    ``e(k)`` (:meth:`TiedWindows.window_end`), and its next forward is that of
    ``e(k) + P``: the last stage applies tied update ``k`` just before the forward of
    ``e(k) + P``, so both ends of every micro-batch use the same version of the tied
    weight, and its copy lags the last stage's own version by at most
    ``ceil((P - 1) / a)`` (docs/design.md, "Tied embeddings").
    """
    _check(num_stages, num_stages - 1, 1, accumulation)
    origin = origin or StageState()
    return origin.version + max(0, (microbatch - origin.backwarded - num_stages + 1) // accumulation)


def _check(num_stages: int, stage: int, num_microbatches: int, accumulation: int) -> None:
    if num_stages < 1:
        raise ValueError(f"num_stages must be >= 1, got {num_stages}")
    if not 0 <= stage < num_stages:
        raise ValueError(f"stage must be in [0, {num_stages}), got {stage}")
    if num_microbatches < 1:
        raise ValueError(f"num_microbatches must be >= 1, got {num_microbatches}")
    if accumulation < 1:
        raise ValueError(f"accumulation factor a must be >= 1, got {accumulation}")


def advance(num_stages: int, state: StageState, action: Action, accumulation: int) -> StageState:
    """The stage's state after ``action``: the transition rules every plan obeys.

    ``F j`` forwards the next micro-batch (``j == forwarded``) and keeps at most ``P - s``
    in flight; ``B j`` backwards the oldest in flight (``j == backwarded``) into an open
    window (``pending < a``); ``U k`` applies update ``k = version + 1`` to a full window
    (``pending == a``), or to a partial one once nothing is in flight (a drain's last).

    Raises:
        ValueError: the action is not legal in ``state``; the message says why.
    """
    s, j = action.stage, action.index
    if action.kind is Kind.FORWARD:
        if j != state.forwarded:
            raise ValueError(f"forward of micro-batch {j}, but the next to forward is "
                             f"{state.forwarded}")
        if state.in_flight + 1 > num_stages - s:
            raise ValueError(f"forward of micro-batch {j} puts {state.in_flight + 1} in flight, "
                             f"more than P - s = {num_stages - s}")
        return replace(state, forwarded=j + 1)
    if action.kind is Kind.BACKWARD:
        if j != state.backwarded or j >= state.forwarded:
            raise ValueError(f"backward of micro-batch {j}, but the oldest in flight is "
                             + (str(state.backwarded) if state.in_flight else "none"))
        if state.pending >= accumulation:
            raise ValueError(f"backward of micro-batch {j} after a full window of "
                             f"{accumulation} without its update")
        return replace(state, backwarded=j + 1, pending=state.pending + 1)
    if j != state.version + 1:
        raise ValueError(f"update {j} after update {state.version}")
    if state.pending != accumulation and not (state.pending and state.in_flight == 0):
        raise ValueError(f"update {j} of a window of {state.pending} backwards (a = "
                         f"{accumulation}) with {state.in_flight} micro-batches in flight")
    return replace(state, pending=0, version=j)


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
    consistent set of weights (docs/design.md, "Drain").

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
    (docs/design.md, "Terms"). Forwards before ``actions`` are not seen: pass a whole run.

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



def parse_actions(text: str) -> List[Action]:
    """Inverse of :func:`format_actions`. Raises ``ValueError`` on a malformed token."""
    return [Action.from_str(tok) for tok in text.split()]


# ----------------------------------------------------------------------------------------
# Point-to-point lowering: which Megatron P2PCommunicator call precedes / follows each
# action. The runtime executes exactly these steps; the simulator below checks them.
# ----------------------------------------------------------------------------------------

Tensor = Tuple[str, int]  # ("act", j): activation of micro-batch j; ("grad", j): its gradient


@dataclass(frozen=True)
class Comm:
    """One call of Megatron's ``P2PCommunicator`` on one stage.

    Attributes:
        stage: the stage making the call.
        op: the method name (``recv_forward``, ``send_forward``,
            ``send_forward_recv_backward``, ``send_backward_recv_forward``,
            ``send_backward``, ``recv_backward``).
        send: the tensor sent (``("act", j)`` goes to ``stage + 1``, ``("grad", j)`` to
            ``stage - 1``), or None.
        recv: the tensor received (``("act", j)`` from ``stage - 1``, ``("grad", j)``
            from ``stage + 1``), or None.
    """

    stage: int
    op: str
    send: Optional[Tensor] = None
    recv: Optional[Tensor] = None

    def peer(self) -> int:
        """The stage on the other end (all halves of one call share it)."""
        kind = (self.send or self.recv)[0]
        if self.send is not None:
            return self.stage + 1 if kind == "act" else self.stage - 1
        return self.stage - 1 if kind == "act" else self.stage + 1

    def __str__(self) -> str:
        parts = [f"{t[0]}{t[1]}" for t in (self.send, self.recv) if t is not None]
        return f"{self.stage}:{self.op}({','.join(parts)})"

    @staticmethod
    def from_str(text: str) -> "Comm":
        """Parse the text form (``"1:send_forward_recv_backward(act5,grad3)"``).

        An activation is sent by the ``send_forward*`` calls and received otherwise; a
        gradient is sent by the ``send_backward*`` calls and received otherwise.

        Raises:
            ValueError: not a :class:`Comm`'s text form.
        """
        m = _COMM_RE.match(text.strip())
        if not m or m.group(2) not in _COMM_OPS:
            raise ValueError(f"not an exchange: {text!r} (expected e.g. "
                             "'1:send_forward_recv_backward(act5,grad3)')")
        stage, op, send, recv = int(m.group(1)), m.group(2), None, None
        for kind, j in re.findall(r"(act|grad)(\d+)", m.group(3)):
            if op.startswith("send_forward" if kind == "act" else "send_backward"):
                send = (kind, int(j))
            else:
                recv = (kind, int(j))
        return Comm(stage, op, send, recv)


_COMM_RE = re.compile(r"^(\d+):(\w+)\(((?:(?:act|grad)\d+,?){1,2})\)$")
_COMM_OPS = ("recv_forward", "send_forward", "send_forward_recv_backward",
             "send_backward_recv_forward", "send_backward", "recv_backward")


@dataclass(frozen=True)
class GradSync:
    """Lowered step: the next backward closes an accumulation window.

    That backward runs with the data-parallel gradient reduction enabled (Megatron's
    ``enable_grad_sync`` before the last micro-batch's backward; the others run in
    ``no_sync``), and the stage's update follows it. Text form ``"1SYNC"``.
    """

    stage: int

    def __str__(self) -> str:
        return f"{self.stage}SYNC"


@dataclass(frozen=True)
class TiedComm:
    """Lowered step: one message of a tied embedding between the first and the last stage
    (docs/design.md, "Tied embeddings"), posted without a host wait.

    Attributes:
        stage: the stage posting it (``0`` or ``P - 1``).
        op: ``"send"`` or ``"recv"``.
        tensor: ``("tgrad", k)``, the last stage's window gradient of update ``k`` (last
            stage -> first), or ``("tstep", k)``, the step the first stage took on the tied
            weight at its update ``k`` (first -> last).
        peer: the stage at the other end.

    Text form ``"3:tied_send(tgrad2)@0"``.
    """

    stage: int
    op: str
    tensor: Tensor
    peer: int

    def __str__(self) -> str:
        return f"{self.stage}:tied_{self.op}({self.tensor[0]}{self.tensor[1]})@{self.peer}"

    @staticmethod
    def from_str(text: str) -> "TiedComm":
        """Parse the text form. Raises ``ValueError`` on anything else."""
        m = _TIED_RE.match(text.strip())
        if not m:
            raise ValueError(f"not a tied-embedding message: {text!r} (expected e.g. "
                             "'3:tied_send(tgrad2)@0')")
        return TiedComm(int(m.group(1)), m.group(2), (m.group(3), int(m.group(4))), int(m.group(5)))


_TIED_RE = re.compile(r"^(\d+):tied_(send|recv)\((tgrad|tstep)(\d+)\)@(\d+)$")


@dataclass(frozen=True)
class Barrier:
    """A collective every stage must reach before any passes it (the training loop's timers
    barrier, a logging all-gather, a checkpoint): the point where a call ends. Used by
    :func:`simulate_p2p`; the runtime never executes one. Text form ``"2BARRIER"``."""

    stage: int

    def __str__(self) -> str:
        return f"{self.stage}BARRIER"


@dataclass(frozen=True)
class TiedWindows:
    """Where a tied embedding's messages sit in the plans of the first and the last stage.

    Windows are counted from ``origin``, the drained :class:`StageState` all stages last
    shared (the start, a drain, a resume): update ``k > origin.version`` closes the window
    ending at micro-batch ``e(k) = origin.backwarded + (k - origin.version) a - 1``.

    Every message is posted on both ends in the same call, at points that make it
    completable whatever the two stages do next (a device-wide synchronize may follow any
    step; docs/design.md, "Tied embeddings"):

    - ``("tgrad", k)``: the last stage sends it after the exchange that carries the input
      gradient of ``e(k)`` out (just before its forward of ``e(k) + 1``), the first stage
      posts the receive after the exchange that follows its own forward of ``e(k) + 1``
      and waits for it at its update ``k``;
    - ``("tstep", k)``: the first stage sends it right after its update ``k`` (which follows
      its forward of ``e(k) + P - 1``), the last stage posts the receive right after its
      own forward of ``e(k) + P - 1`` and waits for it before its forward of ``e(k) + P``.

    In a drain, messages whose points were not reached are posted in the order ``tgrad k``,
    ``tstep k`` for ascending ``k``: the same order on both ends.
    """

    num_stages: int
    accumulation: int
    origin: StageState = StageState()

    def window_end(self, update: int) -> int:
        """``e(k)``: the last micro-batch of update ``k``'s window."""
        return self.origin.backwarded + (update - self.origin.version) * self.accumulation - 1

    def _update_ending_at(self, microbatch: int) -> Optional[int]:
        offset = microbatch + 1 - self.origin.backwarded
        if offset <= 0 or offset % self.accumulation:
            return None
        return self.origin.version + offset // self.accumulation

    def grad_posted_before(self, microbatch: int) -> Optional[int]:
        """The update whose ``tgrad`` is posted around the forward of ``microbatch``."""
        return self._update_ending_at(microbatch - 1)

    def step_posted_after(self, microbatch: int) -> Optional[int]:
        """The update whose ``tstep`` is posted around the forward of ``microbatch``."""
        return self._update_ending_at(microbatch - self.num_stages + 1)

    def due(self, microbatch: int) -> int:
        """:func:`tied_updates_due` of ``microbatch`` from this origin."""
        return tied_updates_due(self.num_stages, self.accumulation, microbatch, self.origin)


Step = Union[Action, Comm, GradSync, TiedComm, Barrier]


def format_steps(steps: Sequence[Step]) -> str:
    """Space-separated text form of actions (``"1F0 1F1 1B0 1U1"``) or of a lowered plan
    (with exchanges, tied-embedding messages and ``SYNC`` marks)."""
    return " ".join(str(x) for x in steps)


format_actions = format_steps


def parse_steps(text: str) -> List[Step]:
    """Inverse of :func:`format_steps`. Raises ``ValueError`` on a malformed token."""
    out: List[Step] = []
    for tok in text.split():
        if tok.endswith("SYNC") and tok[:-4].isdigit():
            out.append(GradSync(int(tok[:-4])))
        elif tok.endswith("BARRIER") and tok[:-7].isdigit():
            out.append(Barrier(int(tok[:-7])))
        elif ":tied_" in tok:
            out.append(TiedComm.from_str(tok))
        else:
            out.append(Comm.from_str(tok) if ":" in tok else Action.from_str(tok))
    return out


def _comm(stage, op, send, recv, num_stages) -> Optional[Comm]:
    first, last = stage == 0, stage == num_stages - 1

    def keep(t, sending):
        if t is None:
            return None
        kind = t[0]
        # first stage: receives no activation, sends no gradient; last: the reverse
        if first and ((kind == "act" and not sending) or (kind == "grad" and sending)):
            return None
        if last and ((kind == "act" and sending) or (kind == "grad" and not sending)):
            return None
        return t

    send, recv = keep(send, True), keep(recv, False)
    if send is None and recv is None:
        return None
    return Comm(stage, op, send, recv)


def lower(
    num_stages: int,
    stage: int,
    actions: Sequence[Action],
    carry: Optional[int] = None,
    final: bool = False,
    tied: Optional[TiedWindows] = None,
    state: Optional[StageState] = None,
) -> Tuple[List[Step], Optional[int]]:
    """Interleave a stage's actions with the p2p calls they imply, in Megatron's pairing.

    Before ``F j``: receive activation ``j`` (sending a carried gradient with it, as
    ``send_backward_recv_forward``). After ``F j``: send activation ``j``, receiving the
    gradient of the backward that follows, if any (``send_forward_recv_backward``).
    Before ``B k`` whose gradient has not arrived: send a carried gradient, then
    ``recv_backward``. A :class:`GradSync` precedes every backward followed by an update.
    After ``B k``: its input gradient is carried to the next call that can take it.
    ``final`` (a drain) sends the last carried gradient alone. With ``tied`` (a tied
    embedding, ``P > 1``) the first and the last stage also get their
    :class:`TiedComm` messages at the points :class:`TiedWindows` names.

    Args:
        carry: micro-batch whose input gradient is still to be sent (from the previous
            call), or None.
        tied: where the tied embedding's messages go, or None (untied).
        state: the stage's state before ``actions`` (needed with ``tied``: a drain posts
            the messages whose points were never reached).

    Returns:
        ``(steps, carry_out)``: actions, :class:`Comm`, :class:`GradSync` and
        :class:`TiedComm` in execution order, and the micro-batch whose gradient is carried
        into the next call.

    Raises:
        ValueError: ``tied`` without ``state``.
    """
    steps: List[Step] = []
    received = set()
    last = num_stages - 1
    if tied is not None and (num_stages < 2 or stage not in (0, last)):
        tied = None
    if tied is not None and state is None:
        raise ValueError("lowering a tied embedding's messages needs the stage's state")
    forwarded = state.forwarded if state is not None else 0

    def add(comm):
        if comm is not None:
            steps.append(comm)

    def tied_msg(op, kind, k):
        steps.append(TiedComm(stage, op, (kind, k), last - stage))

    for i, act in enumerate(actions):
        if act.kind is Kind.FORWARD:
            forwarded = act.index + 1
            if carry is not None:
                add(_comm(stage, "send_backward_recv_forward", ("grad", carry),
                          ("act", act.index), num_stages))
                carry = None
            else:
                add(_comm(stage, "recv_forward", None, ("act", act.index), num_stages))
            k = tied.grad_posted_before(act.index) if tied is not None else None
            if k is not None and stage == last:
                tied_msg("send", "tgrad", k)
            steps.append(act)
            k_step = tied.step_posted_after(act.index) if tied is not None else None
            if k_step is not None and stage == last:
                tied_msg("recv", "tstep", k_step)
            nxt = actions[i + 1] if i + 1 < len(actions) else None
            if nxt is not None and nxt.kind is Kind.BACKWARD:
                add(_comm(stage, "send_forward_recv_backward", ("act", act.index),
                          ("grad", nxt.index), num_stages))
                received.add(nxt.index)
            else:
                add(_comm(stage, "send_forward", ("act", act.index), None, num_stages))
            if k is not None and stage == 0:
                tied_msg("recv", "tgrad", k)
        elif act.kind is Kind.BACKWARD:
            if act.index not in received:
                if carry is not None:
                    add(_comm(stage, "send_backward", ("grad", carry), None, num_stages))
                    carry = None
                add(_comm(stage, "recv_backward", None, ("grad", act.index), num_stages))
            if i + 1 < len(actions) and actions[i + 1].kind is Kind.UPDATE:
                steps.append(GradSync(stage))
            steps.append(act)
            if stage > 0:
                carry = act.index
        else:
            if tied is not None and stage == 0 and tied.window_end(act.index) + 1 >= forwarded:
                tied_msg("recv", "tgrad", act.index)  # a drain's update: not posted before
            steps.append(act)
            if tied is not None and stage == 0:
                tied_msg("send", "tstep", act.index)
    if final and carry is not None:
        add(_comm(stage, "send_backward", ("grad", carry), None, num_stages))
        carry = None
    if final and tied is not None and stage == last:
        version = state.version + sum(1 for a in actions if a.kind is Kind.UPDATE)
        for k in range(tied.origin.version + 1, version + 1):
            if tied.window_end(k) + 1 >= forwarded:
                tied_msg("send", "tgrad", k)
            if tied.window_end(k) + num_stages - 1 >= forwarded:
                tied_msg("recv", "tstep", k)
    return steps, carry


def lower_run(num_stages: int, num_microbatches: int, accumulation: int, calls: int,
              tied: bool = False, drain_after: Sequence[int] = (),
              barriers: bool = True) -> Dict[int, List[Step]]:
    """Every stage's lowered steps for ``calls`` training calls, as the schedule runs them:
    a drain after each call index in ``drain_after`` and after the last call, windows (and
    the tied embedding's message points) counted afresh after each drain, and with
    ``barriers`` a :class:`Barrier` at the end of every call and drain (where a training
    loop may synchronise the device or run a collective). The input of
    :func:`simulate_p2p` and :func:`validate_plan` for a whole run.

    Raises:
        ValueError: on out-of-range arguments (:func:`plan_call`).
    """
    plans: Dict[int, List[Step]] = {}
    drains = set(drain_after) | {calls - 1}
    for s in range(num_stages):
        state, carry, steps = StageState(), None, []
        origin = state
        for c in range(calls):
            acts, after = plan_call(num_stages, s, num_microbatches, accumulation, state)
            windows = TiedWindows(num_stages, accumulation, origin) if tied else None
            low, carry = lower(num_stages, s, acts, carry, tied=windows, state=state)
            steps += low + ([Barrier(s)] if barriers else [])
            state = after
            if c in drains:
                acts, after = plan_drain(num_stages, s, accumulation, state)
                low, carry = lower(num_stages, s, acts, carry, final=True, tied=windows,
                                   state=state)
                steps += low + ([Barrier(s)] if barriers else [])
                state = origin = after
        plans[s] = steps
    return plans


class P2PError(RuntimeError):
    """The simulated point-to-point exchange deadlocks or pairs the wrong tensors."""


def _halves(step) -> List[Tuple[str, Tensor, int, str]]:
    """``(direction, tensor, peer, channel)`` of one p2p step."""
    if isinstance(step, TiedComm):
        return [(step.op, step.tensor, step.peer, "tied")]
    peer = step.peer()
    return [(d, t, peer, "pp") for d, t in (("send", step.send), ("recv", step.recv))
            if t is not None]


def simulate_p2p(comms: Dict[int, Sequence[Union[Comm, TiedComm, Barrier]]]) -> None:
    """Check that the stages' p2p steps complete together, in the same order, under NCCL's
    semantics.

    Model (the strictest NCCL allows): a send is an unbuffered rendezvous, completed only
    when the peer has posted the matching receive; messages between two stages on one
    channel (the pipeline group's exchanges, or the tied embedding's messages) are
    matched in post order; and a device-wide synchronize may follow any step, so each
    stage waits for every half of its current step (Megatron's ``_communicate`` posts
    them together) before it posts the next. A :class:`Barrier` completes when every
    stage has reached one. Plans that pass complete under any less synchronous execution
    too; plans whose calls end with a :class:`Barrier` leave nothing pending between calls.

    Args:
        comms: ``{stage: steps}`` (:class:`Comm`, :class:`TiedComm`, :class:`Barrier`; other
            steps are ignored).

    Raises:
        P2PError: a deadlock (names each stuck stage and what it waits for) or a
            mismatch (the two tensors).
    """
    comms = {s: [c for c in steps if isinstance(c, (Comm, TiedComm, Barrier))]
             for s, steps in comms.items()}
    pos = {s: 0 for s in comms}
    open_halves: Dict[int, set] = {}

    def current(s):
        return comms[s][pos[s]] if pos[s] < len(comms[s]) else None

    def post(s):
        c = current(s)
        if c is None or isinstance(c, Barrier):
            open_halves.pop(s, None)
        else:
            open_halves[s] = set(_halves(c))

    def advance_stage(s):
        pos[s] += 1
        post(s)

    for s in comms:
        post(s)
    progress = True
    while progress:
        progress = False
        if comms and all(isinstance(current(s), Barrier) for s in comms):
            for s in comms:
                advance_stage(s)
            progress = True
            continue
        for s in list(open_halves):
            touched = set()
            for direction, t, peer, channel in list(open_halves.get(s, ())):
                if direction != "send" or peer not in open_halves:
                    continue
                theirs = [u for d, u, q, ch in open_halves[peer]
                          if d == "recv" and q == s and ch == channel]
                if not theirs:
                    continue
                if theirs[0] != t:
                    raise P2PError(f"stage {s} sends {t} while stage {peer} receives {theirs[0]}")
                open_halves[s].discard((direction, t, peer, channel))
                open_halves[peer].discard(("recv", t, s, channel))
                touched |= {s, peer}
            for x in touched:
                if x in open_halves and not open_halves[x]:
                    advance_stage(x)
                    progress = True
    stuck = {s: str(current(s)) for s in comms if current(s) is not None}
    if stuck:
        raise P2PError(f"deadlock or unmatched operations: {stuck}")


class PlanError(ValueError):
    """A plan breaks PACI's rules; the message shows the stages' actions around the fault."""


def validate_plan(num_stages: int, accumulation: int, plans: Dict[int, Sequence[Step]],
                  start: Optional[Dict[int, StageState]] = None) -> Dict[int, StageState]:
    """Check every stage's plan (actions, or lowered steps) from ``start`` on.

    Each action must be legal in its stage's state (:func:`advance`: micro-batches in
    order, at most ``P - s`` in flight, updates after every ``a`` backwards, which keeps
    every drift within ``ceil((P-1-s)/a)``), and, where the plans hold exchanges, those
    must pair up (:func:`simulate_p2p`). Like torch's pipelining validator, the error prints the grid
    of the stages' actions with the faulty one marked ``>>``.

    Args:
        num_stages: ``P``. accumulation: ``a``.
        plans: ``{stage: steps}``; :class:`Comm` and :class:`GradSync` steps are allowed.
        start: each stage's state before its plan (default: a fresh run).

    Returns:
        Each stage's state after its plan.

    Raises:
        PlanError: the first violation found, with the grid.
    """
    actions = {s: [x for x in plans[s] if isinstance(x, Action)] for s in plans}
    states = dict(start or {})
    for s in sorted(plans):
        state = states.get(s, StageState())
        for i, act in enumerate(actions[s]):
            try:
                if act.stage != s:
                    raise ValueError(f"an action of stage {act.stage} in the plan of stage {s}")
                state = advance(num_stages, state, act, accumulation)
            except ValueError as err:
                raise PlanError(f"stage {s}, action {i} ({act}): {err}\n"
                                + _grid(actions, {s: i})) from None
        states[s] = state
    comms = {s: [x for x in plans[s] if isinstance(x, (Comm, TiedComm, Barrier))] for s in plans}
    if any(comms.values()):
        try:
            simulate_p2p(comms)
        except P2PError as err:
            raise PlanError(f"exchanges: {err}\n" + _grid(actions, {})) from err
    return states


def _grid(actions: Dict[int, List[Action]], marks: Dict[int, int], context: int = 4) -> str:
    """Stages as columns, action positions as rows (around the marks), marked ``>>``."""
    stages = sorted(actions)
    length = max((len(a) for a in actions.values()), default=0)
    lo, hi = 0, length
    if marks:
        lo = max(min(marks.values()) - context, 0)
        hi = min(max(marks.values()) + context + 1, length)
    width = max([len(str(a)) for acts in actions.values() for a in acts] + [7]) + 3
    lines = ["step " + "".join(f"   stage {s}".ljust(width) for s in stages).rstrip()]
    for row in range(lo, hi):
        cells = []
        for s in stages:
            text = str(actions[s][row]) if row < len(actions[s]) else ""
            cells.append(((">> " if marks.get(s) == row else "   ") + text).ljust(width))
        lines.append(f"{row:>4} " + "".join(cells).rstrip())
    return "\n".join(lines)
