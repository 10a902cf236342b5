"""Properties of the pure planner over a grid of (P, m, a); no torch, no processes."""

import math
import re

import pytest

from paci_megatron.plan import (
    Action,
    Barrier,
    Comm,
    GradSync,
    Kind,
    P2PError,
    PlanError,
    StageState,
    drift_bound,
    format_actions,
    format_steps,
    lower,
    measure_drift,
    parse_actions,
    parse_steps,
    plan_call,
    plan_drain,
    simulate_p2p,
    TiedComm,
    lower_run,
    validate_plan,
)


def run_plan(P, m, a, calls):
    """Plan `calls` training calls then a drain for every stage; simulate p2p per call.

    Returns {stage: all actions}. Raises P2PError if a call's sends and receives do not
    pair up within that call on every stage.
    """
    states = {s: StageState() for s in range(P)}
    carry = {s: None for s in range(P)}
    actions = {s: [] for s in range(P)}
    for c in range(calls + 1):
        final = c == calls
        comms = {}
        for s in range(P):
            if final:
                acts, states[s] = plan_drain(P, s, a, states[s])
            else:
                acts, states[s] = plan_call(P, s, m, a, states[s])
            steps, carry[s] = lower(P, s, acts, carry[s], final=final)
            comms[s] = [x for x in steps if isinstance(x, Comm)]
            actions[s] += acts
        simulate_p2p(comms)  # every send of this call is received in this call
    assert all(c is None for c in carry.values())
    return actions, states


GRID = [
    (P, m, a)
    for P in range(1, 9)
    for m in range(max(1, P - 1), 3 * P + 1)
    for a in range(1, 2 * m + 1)
]


@pytest.mark.parametrize("P", range(1, 9))
def test_planner_properties_over_grid(P):
    checked = 0
    for (PP, m, a) in GRID:
        if PP != P:
            continue
        calls = 2 + math.ceil((2 * a + P) / m)
        actions, states = run_plan(P, m, a, calls)
        total = calls * m
        for s in range(P):
            acts = actions[s]
            fwd = [x.index for x in acts if x.kind is Kind.FORWARD]
            bwd = [x.index for x in acts if x.kind is Kind.BACKWARD]
            upd = [x.index for x in acts if x.kind is Kind.UPDATE]
            # every micro-batch forwarded and backwarded exactly once, in order
            assert fwd == list(range(total)) and bwd == list(range(total)), (P, m, a, s)
            # updates numbered 1.. and every window but a drained tail holds a backwards
            assert upd == list(range(1, len(upd) + 1))
            assert len(upd) == math.ceil(total / a)
            # in flight never exceeds P - s
            in_flight = peak = 0
            for x in acts:
                in_flight += {Kind.FORWARD: 1, Kind.BACKWARD: -1, Kind.UPDATE: 0}[x.kind]
                peak = max(peak, in_flight)
            assert peak == min(P - s, total), (P, m, a, s, peak)
            # the largest drift reached equals the bound exactly
            drift = measure_drift(acts)
            assert max(drift.values()) == drift_bound(P, s, a), (P, m, a, s)
            assert states[s].in_flight == 0 and states[s].pending == 0
        checked += 1
    assert checked > 0


def test_drift_bound_examples_from_the_paper():
    # docs/design.md, "The bound" (P = 8)
    assert [drift_bound(8, s, 1) for s in range(8)] == [7, 6, 5, 4, 3, 2, 1, 0]
    assert [drift_bound(8, s, 4) for s in range(8)] == [2, 2, 2, 1, 1, 1, 1, 0]
    assert [drift_bound(8, s, 8) for s in range(8)] == [1, 1, 1, 1, 1, 1, 1, 0]
    with pytest.raises(ValueError, match="stage must be in"):
        drift_bound(4, 4, 1)


def test_steady_state_call_is_m_forwards_and_m_backwards_with_no_flush():
    st = StageState()
    acts, st = plan_call(4, 1, 4, 4, st)  # first call: warm-up of P - s - 1 = 2
    assert format_actions(acts) == "1F0 1F1 1F2 1B0 1F3 1B1"
    acts, st = plan_call(4, 1, 4, 4, st)  # steady state: 4 F, 4 B, window closes at B3
    assert format_actions(acts) == "1F4 1B2 1F5 1B3 1U1 1F6 1B4 1F7 1B5"
    assert st.in_flight == 2  # carried into the next call, not flushed
    acts, st = plan_drain(4, 1, 4, st)
    assert format_actions(acts) == "1B6 1B7 1U2"


def test_action_text_round_trips():
    text = "2F5 0B3 1U2"
    assert format_actions(parse_actions(text)) == text
    assert Action.from_str("12B105") == Action(12, Kind.BACKWARD, 105)
    with pytest.raises(ValueError, match="not an action"):
        Action.from_str("2X5")


def test_gradient_of_a_calls_last_backward_is_sent_in_the_next_call():
    st, carry = StageState(), None
    acts, st = plan_call(2, 1, 2, 2, st)
    steps, carry = lower(2, 1, acts, carry)
    assert carry == 1  # B1's input gradient waits for the next call
    acts, st = plan_call(2, 1, 2, 2, st)
    steps, carry = lower(2, 1, acts, carry)
    assert str(steps[0]) == "1:send_backward_recv_forward(grad1,act2)"


def test_simulator_detects_a_call_boundary_that_leaves_a_send_unmatched():
    # Stage 1 sends its last gradient at the end of call 0, stage 0 only wants it in
    # call 1: the per-call simulation must refuse that boundary.
    st0, st1 = StageState(), StageState()
    a0, st0 = plan_call(2, 0, 2, 2, st0)
    a1, st1 = plan_call(2, 1, 2, 2, st1)
    s0, _ = lower(2, 0, a0)
    s1, _ = lower(2, 1, a1, final=True)  # wrong: flushes the carried gradient now
    with pytest.raises(P2PError, match="deadlock or unmatched"):
        simulate_p2p({0: [x for x in s0 if isinstance(x, Comm)],
                      1: [x for x in s1 if isinstance(x, Comm)]})


def test_simulator_detects_crossed_messages():
    comms = {
        0: [Comm(0, "send_forward", ("act", 1), None)],
        1: [Comm(1, "recv_forward", None, ("act", 0))],
    }
    with pytest.raises(P2PError, match="sends"):
        simulate_p2p(comms)


def lowered_run(P, m, a, calls):
    """Every stage's lowered steps (actions, exchanges, SYNC marks) of a run and a drain."""
    plans = {}
    for s in range(P):
        state, carry, steps = StageState(), None, []
        for c in range(calls + 1):
            if c == calls:
                acts, state = plan_drain(P, s, a, state)
            else:
                acts, state = plan_call(P, s, m, a, state)
            low, carry = lower(P, s, acts, carry, final=c == calls)
            steps += low
        plans[s] = steps
    return plans


@pytest.mark.parametrize("P,m,a", [(1, 2, 1), (2, 4, 4), (4, 4, 2), (4, 8, 8), (8, 8, 3)])
def test_lowered_plans_round_trip_as_text_and_validate(P, m, a):
    plans = lowered_run(P, m, a, calls=3)
    for s, steps in plans.items():
        assert parse_steps(format_steps(steps)) == steps
        # a SYNC mark precedes exactly the backwards that an update follows
        acts = [x for x in steps if not isinstance(x, Comm)]
        for i, x in enumerate(acts):
            if isinstance(x, GradSync):
                assert acts[i + 1].kind is Kind.BACKWARD and acts[i + 2].kind is Kind.UPDATE
            elif x.kind is Kind.UPDATE:
                assert isinstance(acts[i - 2], GradSync), (s, i, acts[i - 2:i + 1])
    states = validate_plan(P, a, plans)
    assert all(st.in_flight == 0 and st.pending == 0 for st in states.values())


def test_exchange_text_names_direction_and_tensors():
    comm = Comm.from_str("1:send_backward_recv_forward(grad1,act2)")
    assert comm == Comm(1, "send_backward_recv_forward", ("grad", 1), ("act", 2))
    assert comm.peer() == 0
    assert Comm.from_str("3:recv_backward(grad7)").recv == ("grad", 7)
    for bad in ("1:send_sideways(act1)", "1:send_forward()", "send_forward(act1)"):
        with pytest.raises(ValueError, match="not an exchange"):
            Comm.from_str(bad)


def test_validate_plan_marks_the_faulty_action_in_the_grid():
    plans = lowered_run(4, 4, 4, calls=2)
    steps = list(plans[2])
    i, j = (steps.index(Action(2, Kind.BACKWARD, k)) for k in (3, 4))
    steps[i], steps[j] = steps[j], steps[i]  # backward of 4 before 3
    with pytest.raises(PlanError) as info:
        validate_plan(4, 4, {**plans, 2: steps})
    text = str(info.value)
    assert "stage 2" in text and "backward of micro-batch 4, but the oldest in flight is 3" in text
    marked = [line for line in text.splitlines() if ">>" in line]
    assert len(marked) == 1 and ">> 2B4" in marked[0]
    assert "stage 0" in text.splitlines()[1] and "stage 3" in text.splitlines()[1]


@pytest.mark.parametrize("text,needle", [
    ("0F0 0F1 0F1", "forward of micro-batch 1, but the next to forward is 2"),
    ("0F0 0F1 0F2", "puts 3 in flight, more than P - s = 2"),
    ("0F0 0B0 0F1 0B1 0F2 0B2", "after a full window of 2 without its update"),
    ("0F0 0F1 0B0 0U1", "update 1 of a window of 1 backwards (a = 2) with 1 micro-batches in flight"),
    ("0F0 0B0 0U2", "update 2 after update 0"),
])
def test_validate_plan_names_each_broken_rule(text, needle):
    with pytest.raises(PlanError, match=re.escape(needle)):
        validate_plan(2, 2, {0: parse_actions(text)})


def test_validate_plan_reports_unpaired_exchanges():
    plans = lowered_run(2, 2, 2, calls=1)
    plans[1] = [x for x in plans[1] if not (isinstance(x, Comm) and x.op == "recv_forward")]
    with pytest.raises(PlanError, match=re.escape(
            "exchanges: stage 0 sends ('act', 0) while stage 1 receives ('act', 1)")):
        validate_plan(2, 2, plans)


def test_the_planner_imports_no_torch():
    import subprocess
    import sys

    code = "import sys, paci_megatron.plan; print(sorted(m for m in ('torch', 'megatron') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# ------------------------------------------------------------------ NCCL semantics
def _divisors(m):
    return [a for a in range(1, m + 1) if m % a == 0]


NCCL_GRID = [(P, m, a, tied, drains)
             for P in range(2, 9) for m in sorted({max(1, P - 2), P, 2 * P})
             for a in sorted({1, m, *_divisors(m)[1:2]}) for tied in (False, True)
             for drains in ((), (0,), (1, 2))]


def test_every_message_pairs_up_under_nccl_semantics_with_a_barrier_after_every_call():
    """Unbuffered sends, post order per channel, a device-wide synchronize possible after
    any step, a collective at every call's end: no deadlock, no mismatch, over P, m, a,
    tied or untied, drains anywhere."""
    for P, m, a, tied, drains in NCCL_GRID:
        calls = 3 + (2 * a + P) // m
        plans = lower_run(P, m, a, calls, tied=tied, drain_after=drains)
        validate_plan(P, a, plans)
        sends = [x for s in (0, P - 1) for x in plans[s] if isinstance(x, TiedComm)]
        if tied:  # every tied update exchanged both ways, each once
            version = calls * m // a
            assert sorted(str(x.tensor) for x in sends if x.op == "send") == sorted(
                [str(("tgrad", k)) for k in range(1, version + 1)]
                + [str(("tstep", k)) for k in range(1, version + 1)]), (P, m, a, drains)
        else:
            assert sends == []


def _previous_tied_placement(P, m, a, calls):
    """The tied messages where the runtime used to post them: the last stage sent gL(k) at
    its update k, the first stage received it at its own update k and sent its step
    right after, the last stage received that step just before its forward of ka + P - 1."""
    plans = lower_run(P, m, a, calls)
    out = {}
    for s, steps in plans.items():
        mine = []
        for x in steps:
            if s == 0 and isinstance(x, Action) and x.kind is Kind.UPDATE:
                mine += [TiedComm(0, "recv", ("tgrad", x.index), P - 1), x,
                         TiedComm(0, "send", ("tstep", x.index), P - 1)]
                continue
            if s == P - 1 and isinstance(x, Action) and x.kind is Kind.FORWARD:
                k, due = (x.index - P + 1) // a, (x.index - P + 1) % a == 0
                if x.index >= P - 1 + a and due:
                    mine.append(TiedComm(s, "recv", ("tstep", k), 0))
            mine.append(x)
            if s == P - 1 and isinstance(x, Action) and x.kind is Kind.UPDATE:
                mine.append(TiedComm(s, "send", ("tgrad", x.index), 0))
        out[s] = mine
    return out


@pytest.mark.parametrize("P,m,a,where", [
    (2, 4, 4, "tied_send(tgrad1)"),  # a = m: gL(1) waits across the call boundary
    (4, 8, 8, "tied_send(tgrad1)"),
    (8, 8, 8, "tied_send(tgrad1)"),
    (4, 8, 2, "tied_send(tgrad"),    # a < P: sends posted in opposite orders at both ends
])
def test_the_previous_tied_placement_deadlocks_under_nccl_semantics(P, m, a, where):
    with pytest.raises(P2PError, match="deadlock") as info:
        simulate_p2p(_previous_tied_placement(P, m, a, calls=3))
    assert where in str(info.value)


def test_a_send_left_pending_at_a_calls_end_is_a_deadlock_at_its_barrier():
    send, recv = Comm(0, "send_forward", ("act", 0), None), Comm(1, "recv_forward", None, ("act", 0))
    simulate_p2p({0: [send, Barrier(0)], 1: [recv, Barrier(1)]})
    simulate_p2p({0: [send], 1: [recv]})
    with pytest.raises(P2PError, match=r"deadlock.*0:send_forward\(act0\).*1BARRIER"):
        simulate_p2p({0: [send, Barrier(0)], 1: [Barrier(1), recv]})
    tied = lower_run(2, 2, 2, calls=2, tied=True)
    last = tied[1]
    i = next(i for i, x in enumerate(last) if isinstance(x, TiedComm) and x.op == "recv")
    with pytest.raises(P2PError, match="deadlock"):  # the step's receive a call late
        simulate_p2p({0: tied[0], 1: last[:i] + last[i + 1:] + [last[i]]})


def test_tied_messages_sit_where_the_design_says_and_round_trip_as_text():
    # P = 4, m = a = 4: update 1 closes micro-batch 3
    plans = lower_run(4, 4, 4, calls=2, tied=True)
    text = {s: format_steps(plans[s]) for s in plans}
    # last stage: gL(1) after the exchange that sends grad 3, before F4; the step's receive
    # right after its forward of e(1) + P - 1 = 6
    assert "3:send_backward_recv_forward(grad3,act4) 3:tied_send(tgrad1)@0 3F4" in text[3]
    assert "3F6 3:tied_recv(tstep1)@0" in text[3]
    # first stage: the receive after its forward of 4 and that forward's exchange, the step
    # sent right after update 1 (which follows its forward of 6)
    assert "0F4 0:send_forward_recv_backward(act4,grad1) 0:tied_recv(tgrad1)@3" in text[0]
    assert "0U1 0:tied_send(tstep1)@3" in text[0]
    assert "1:tied" not in text[1] and "2:tied" not in text[2]
    for s in plans:
        assert parse_steps(text[s]) == plans[s]
    assert TiedComm.from_str("3:tied_send(tgrad2)@0") == TiedComm(3, "send", ("tgrad", 2), 0)
    with pytest.raises(ValueError, match="not a tied-embedding message"):
        TiedComm.from_str("3:tied_send(tact2)@0")
