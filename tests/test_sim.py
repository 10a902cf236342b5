"""The simulator reproduces the textbook numbers and plans with the runtime's planner."""

import json

import pytest

from paci_megatron.plan import Kind, drift_bound
from paci_megatron.sim import (StageCosts, balance, flush_utilisation, interleaved_actions, main,
                                plot_timeline, simulate, split_flags, stage_actions)
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


# ---------------------------------------------------------------- interleaved 1F1B
@pytest.mark.parametrize("P,m,v", [(2, 4, 2), (4, 8, 2), (4, 8, 4), (8, 16, 2)])
def test_interleaved_bubble_is_v_times_smaller(P, m, v):
    """Megatron's interleaved schedule with P | m: one iteration takes
    (m + (P - 1) / v) (F + B) (Narayanan et al. 2021, section 2.2), the flush's bubble / v."""
    tf, tb = 1.0, 2.0
    r = simulate("interleaved", P, m, 1, tf, tb, virtual_stages=v)
    assert r.makespan == pytest.approx((m + (P - 1) / v) * (tf + tb))
    assert r.makespan < simulate("1f1b", P, m, 1, tf, tb).makespan
    assert r.drift_max == [0] * P  # synchronous: one update per iteration, after the flush


@pytest.mark.parametrize("P,m,v", [(4, 8, 2), (4, 4, 3), (8, 8, 2)])
def test_interleaved_order_is_megatrons(P, m, v):
    """Warm-up length as megatron-core's get_pp_rank_microbatches; every (chunk, micro-batch)
    forwarded and backwarded once, the forwards in get_schedule_table's order, the
    backwards with the chunks reversed."""
    from types import SimpleNamespace

    from megatron.core.pipeline_parallel.schedules import (get_pp_rank_microbatches,
                                                           get_schedule_table)

    table = get_schedule_table(m, v, P)
    for s in range(P):
        comm = SimpleNamespace(pp_group=SimpleNamespace(size=lambda: P, rank=lambda s=s: s),
                               virtual_pipeline_model_parallel_size=v)
        _, _, warmup, _ = get_pp_rank_microbatches(m, v, P, p2p_communicator=comm)
        steps = interleaved_actions(P, s, m, v, iterations=1)
        kinds = [a.kind for _, a in steps]
        assert kinds[:warmup] == [Kind.FORWARD] * warmup
        assert kinds[warmup:warmup + 2] == ([Kind.FORWARD, Kind.BACKWARD]
                                            if warmup < m * v else [Kind.BACKWARD] * 2)
        forwards = [(a.index, c) for c, a in steps if a.kind is Kind.FORWARD]
        backwards = [(a.index, v - 1 - c) for c, a in steps if a.kind is Kind.BACKWARD]
        assert forwards == list(table) and backwards == list(table)
        assert steps[-1][1].kind is Kind.UPDATE and kinds.count(Kind.UPDATE) == 1
    with pytest.raises(ValueError, match="at least 2 model chunks"):
        interleaved_actions(4, 0, 8, 1, 1)
    with pytest.raises(ValueError, match="m >= P"):
        interleaved_actions(4, 0, 2, 2, 1)


# ---------------------------------------------------------------- the balance advisor
# GPT-2 Medium on one H200 (bf16, micro-batch 16, sequence 1024; benchmarks/device_check.py):
# a layer 4.12 / 6.63 ms forward / backward, output layer and loss 12.69 / 8.09 ms
H200 = StageCosts(4.12e-3, 6.63e-3, output_forward_s=12.69e-3, output_backward_s=8.09e-3)


def test_each_schedule_gets_its_own_best_split():
    result = balance(24, 8, 8, H200)
    rows = result["schedules"]
    # PACI runs at its slowest stage's pace: the output layer's stage gets fewer layers
    assert rows["paci"]["best"]["split"] == [4, 3, 3, 3, 3, 3, 3, 2]
    # 1F1B's ramp and flush favour an even earlier part: its own best differs
    assert rows["1f1b"]["best"]["split"] == [4, 4, 3, 3, 3, 3, 3, 1]
    for name, row in rows.items():
        assert sum(row["best"]["split"]) == 24
        assert row["best"]["seconds_per_iteration"] <= row["even"]["seconds_per_iteration"]
    paci = rows["paci"]["best"]["seconds_per_iteration"]
    assert rows["paci"]["even"]["seconds_per_iteration"] / paci > 1.2  # balancing pays
    # the best-vs-best ceilings: each schedule on its own best split
    for name, ratio in result["ceilings"].items():
        other = name.removeprefix("paci_vs_")
        assert ratio == pytest.approx(rows[other]["best"]["seconds_per_iteration"] / paci)
    assert 1.4 < result["ceilings"]["paci_vs_1f1b"] < 1.875  # below the balanced (m+P-1)/m
    # the interleaved 1F1B is the faster synchronous baseline: the smaller ceiling, on a
    # layout megatron-core builds with v = 3 chunks a stage
    from megatron.core.transformer.pipeline_parallel_layer_layout import (
        PipelineParallelLayerLayout)

    assert 1.0 < result["ceilings"]["paci_vs_interleaved_v3"] < result["ceilings"]["paci_vs_1f1b"]
    best_v3 = rows["interleaved_v3"]["best"]
    assert best_v3["seconds_per_iteration"] < rows["interleaved_v3"]["even"]["seconds_per_iteration"]
    layout = PipelineParallelLayerLayout(best_v3["flags"][1], pipeline_model_parallel_size=8)
    assert layout.virtual_pipeline_model_parallel_size == 3
    # a split no schedule can beat: PACI's best is its slowest stage's pace
    fwd, bwd = H200.seconds(rows["paci"]["best"]["split"])
    assert paci == pytest.approx(8 * max(f + b for f, b in zip(fwd, bwd)), rel=0.05)


def test_balanced_stages_simulate_as_the_formula():
    """Equal stages: no split beats the even one, and PACI's ceiling over 1F1B is
    (m + P - 1) / m up to the fill PACI pays once."""
    costs = StageCosts(1e-3, 2e-3)
    result = balance(16, 4, 8, costs)
    assert result["schedules"]["paci"]["best"]["split"] == [4, 4, 4, 4]
    assert result["schedules"]["1f1b"]["best"]["split"] == [4, 4, 4, 4]
    assert result["ceilings"]["paci_vs_1f1b"] == pytest.approx((8 + 3) / 8, rel=1e-6)
    assert result["ceilings"]["paci_vs_interleaved_v2"] == pytest.approx((8 + 1.5) / 8, rel=1e-6)
    with pytest.raises(ValueError, match="P >= 2"):
        balance(4, 1, 8, costs)


@pytest.mark.parametrize("split", [[3, 1], [4, 3, 3, 3, 3, 3, 3, 2], [1, 1, 2, 0],
                                   [4, 4, 3, 3, 3, 3, 3, 1], [0, 3, 3, 2], [2, 2, 2, 2]])
def test_split_flags_build_that_split_in_megatron_core(split):
    """The flags the advisor prints give the split it means: megatron-core's
    get_num_layers_to_build counts each stage's layers from the config they set."""
    import torch
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.enums import LayerType
    from megatron.core.transformer.transformer_block import get_num_layers_to_build

    flags = split_flags(split)
    P, L = len(split), sum(split)
    fields = {"num_layers": L, "hidden_size": 8, "num_attention_heads": 2,
              "pipeline_model_parallel_size": P, "pipeline_dtype": torch.float32}
    names = {"--decoder-first-pipeline-num-layers": "num_layers_in_first_pipeline_stage",
             "--decoder-last-pipeline-num-layers": "num_layers_in_last_pipeline_stage",
             "--pipeline-model-parallel-layout": "pipeline_model_parallel_layout"}
    for flag, value in zip(flags[::2], flags[1::2]):
        fields[names[flag]] = int(value) if "num-layers" in flag else value
    assert bool(flags) == (len(set(split)) > 1)
    config = TransformerConfig(**fields)
    layout = config.pipeline_model_parallel_layout  # parsed by megatron-core
    if layout is not None:  # its get_num_layers_to_build reads the rank from parallel_state
        built = [layout.layout[s][0].count(LayerType.decoder) for s in range(P)]
        assert layout.layout[0][0][0] == LayerType.embedding
        assert layout.layout[-1][0][-1] == LayerType.loss
    else:
        built = [get_num_layers_to_build(config, pp_rank=s) for s in range(P)]
    assert built == split


def test_balance_command_line(tmp_path, capsys):
    assert main(["--balance", "--stages", "8", "--microbatches", "8", "--layers", "24",
                 "--layer-ms", "4.12", "6.63", "--output-ms", "12.69", "8.09",
                 "--json", str(tmp_path / "b.json")]) == 0
    out = capsys.readouterr().out
    assert "| paci |" in out and "[4, 3, 3, 3, 3, 3, 3, 2]" in out
    assert "--decoder-first-pipeline-num-layers 4 --decoder-last-pipeline-num-layers 2" in out
    assert "ceiling paci over 1f1b" in out
    data = json.loads((tmp_path / "b.json").read_text())
    assert data["schedules"]["1f1b"]["best"]["split"] == [4, 4, 3, 3, 3, 3, 3, 1]
    assert data["ceilings"]["paci_vs_1f1b"] > 1.4
    with pytest.raises(SystemExit) as stop:
        main(["--balance", "--stages", "8"])
    assert stop.value.code == 2 and "--balance needs --layers" in capsys.readouterr().err


def test_balance_from_a_device_check_report(tmp_path, capsys):
    """--device-check: layer, embedding and output-layer times recovered from the measured
    first / middle / last stages; the report must say (or be told) their layer count."""
    report = {"projection": {"rows": [{
        "micro_batch": 16, "link_GBps": 150.0, "comm_s": 2e-4,
        "stage_seconds": {"forward_s": [0.014, 0.012, 0.027], "backward_s": [0.022, 0.021, 0.029],
                          "update_s": [0.0, 0.0, 0.0]}}]}}
    path = tmp_path / "r.json"
    path.write_text(json.dumps(report))
    costs = StageCosts.from_stage_times([0.014, 0.012, 0.027], [0.022, 0.021, 0.029], 3)
    assert costs.layer_forward_s == pytest.approx(0.004) and costs.layer_backward_s == pytest.approx(0.007)
    assert costs.embedding_forward_s == pytest.approx(0.002)
    assert (costs.output_forward_s, costs.output_backward_s) == pytest.approx((0.015, 0.008))
    assert main(["--balance", "--stages", "8", "--microbatches", "8", "--layers", "24",
                 "--device-check", str(path), "--measured-layers", "3"]) == 0
    out = capsys.readouterr().out
    assert "a layer 4.00 / 7.00 ms" in out and "a transfer 0.200 ms" in out
    with pytest.raises(SystemExit):
        main(["--balance", "--stages", "8", "--layers", "24", "--device-check", str(path)])
    assert "give --measured-layers" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--balance", "--stages", "8", "--layers", "24", "--device-check", str(path),
              "--measured-layers", "3", "--micro-batch-size", "32"])
    assert "no stage times at micro-batch 32" in capsys.readouterr().err
