"""Properties of the pure planner over a grid of (P, m, a); no torch, no processes."""

import math

import pytest

from paci_megatron.plan import (
    Action,
    Comm,
    Kind,
    P2PError,
    StageState,
    drift_bound,
    format_actions,
    lower,
    measure_drift,
    parse_actions,
    plan_call,
    plan_drain,
    simulate_p2p,
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
