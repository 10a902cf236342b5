"""The simulator reproduces the textbook numbers and plans with the runtime's planner."""

import json

import pytest

from paci_megatron.plan import Kind, drift_bound
from paci_megatron.sim import flush_utilisation, main, plot_timeline, simulate, stage_actions
from paci_megatron.telemetry import write_chrome_trace

GRID = [(2, 2), (4, 4), (4, 8), (8, 8), (8, 16), (8, 32)]


@pytest.mark.parametrize("P,m", GRID)
def test_flushing_schedules_match_the_bubble_formula(P, m):
    K, tf, tb = 3, 1.0, 2.0
    for schedule in ("1f1b", "gpipe"):
        r = simulate(schedule, P, m, K, tf, tb)
        assert r.makespan == pytest.approx(K * (m + P - 1) * (tf + tb))
        assert r.utilisation == pytest.approx([flush_utilisation(P, m)] * P)
        assert r.drift_max == [0] * P
    assert simulate("1f1b", P, m, K).peak_in_flight == [min(P - s, m) for s in range(P)]
    assert simulate("gpipe", P, m, K).peak_in_flight == [m] * P


@pytest.mark.parametrize("P,m", GRID)
def test_paci_pays_the_ramp_once_not_per_iteration(P, m):
    K, tf, tb = 3, 1.0, 2.0
    r = simulate("paci", P, m, K, tf, tb)
    assert r.makespan == pytest.approx((K * m + P - 1) * (tf + tb))
    assert r.utilisation == pytest.approx([K * m / (K * m + P - 1)] * P)
    assert r.peak_in_flight == [min(P - s, K * m) for s in range(P)]  # 1F1B's activations
    assert r.drift_max == [drift_bound(P, s, m) for s in range(P)]


def test_accumulation_and_communication_time():
    r = simulate("paci", 4, 8, 3, accumulation=1)
    assert r.drift_max == [3, 2, 1, 0]
    slow = simulate("1f1b", 4, 8, 3, 1.0, 2.0, comm_s=0.5)
    assert slow.makespan > simulate("1f1b", 4, 8, 3, 1.0, 2.0).makespan
    with pytest.raises(ValueError, match="accumulation must be m"):
        stage_actions("gpipe", 4, 0, 8, 1, accumulation=2)
    with pytest.raises(ValueError, match="unknown schedule"):
        stage_actions("zb", 4, 0, 8, 1)


def test_versions_in_the_timeline_show_the_drift():
    r = simulate("paci", 2, 2, 3)
    stage0 = [ev for ev in r.events if ev.stage == 0 and ev.kind is not Kind.UPDATE]
    f2 = next(ev for ev in stage0 if ev.kind is Kind.FORWARD and ev.index == 2)
    b2 = next(ev for ev in stage0 if ev.kind is Kind.BACKWARD and ev.index == 2)
    assert (f2.label, b2.label) == ("F2/v0", "B2/v1")  # forward before update 1, backward after


def test_chrome_trace_and_picture(tmp_path):
    r = simulate("paci", 4, 4, 2)
    write_chrome_trace(r.events, str(tmp_path / "t.json"), num_stages=4)
    events = json.loads((tmp_path / "t.json").read_text())["traceEvents"]
    complete = [e for e in events if e["ph"] == "X"]
    assert len(complete) == len(r.events)
    assert {e["tid"] for e in complete} == {0, 1, 2, 3}
    assert all("version" in e["args"] and "micro_batch" in e["args"] for e in complete)
    plot_timeline([r, simulate("1f1b", 4, 4, 2)], str(tmp_path / "t.png"))
    assert (tmp_path / "t.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_command_line_table_and_json(tmp_path, capsys):
    assert main(["--stages", "8", "--microbatches", "8", "--iterations", "4",
                 "--json", str(tmp_path / "r.json")]) == 0
    out = capsys.readouterr().out
    assert "m/(m+P-1) = 0.533" in out and "| paci |" in out
    rows = {r["schedule"]: r for r in json.loads((tmp_path / "r.json").read_text())}
    assert rows["1f1b"]["utilisation"] == pytest.approx(8 / 15)
    assert rows["paci"]["utilisation"] == pytest.approx(32 / 39)


@pytest.mark.parametrize("flags,needle", [
    (["--forward-ms", "0", "--backward-ms", "0"], "forward plus backward above 0"),
    (["--forward-ms", "-5"], "must be finite and >= 0"),
    (["--comm-ms", "nan"], "must be finite and >= 0"),
    (["--accumulation", "-2"], "--accumulation must divide --microbatches 8"),
    (["--accumulation", "3"], "--accumulation must divide --microbatches 8"),
    (["--png", "/nonexistent/dir/t.png"], "its folder does not exist"),
])
def test_simulator_refuses_bad_input_with_a_short_message(flags, needle, capsys):
    with pytest.raises(SystemExit) as stop:
        main(["--stages", "4", "--microbatches", "8", "--iterations", "2", *flags])
    assert stop.value.code == 2 and needle in capsys.readouterr().err
