"""benchmarks/device_check.py's dry run on CPU: every check runs and the report is consistent."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def report(tmp_path_factory, corpus):
    out = tmp_path_factory.mktemp("device") / "report.json"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "device_check.py"),
                           "--device", "cpu", "--output", str(out), "--data-path", str(corpus),
                           "--checks", "abcdef"],
                          capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


def test_pp1_paci_equals_megatron_no_pipelining_in_alternating_rounds(report):
    pp1 = report["pp1"]
    assert pp1["losses_identical"] is True
    assert pp1["paci"]["losses"] == pp1["megatron"]["losses"]
    # warm-up 1 + 2 rounds x 2 + 1 profiled + 1 counted iteration, 4 micro-batches each
    assert len(pp1["paci"]["losses"]) == 7 and len(pp1["paci"]["losses"][0]) == 4
    for name in ("paci", "megatron"):
        per_it = pp1[name]["seconds_per_iteration"]
        assert per_it["n"] == 4 and per_it["min"] <= per_it["median"] <= per_it["max"]
        assert pp1[name]["tokens_per_second"] == pytest.approx(4 * 2 * 32 / per_it["median"])
        assert pp1[name]["profiled_iteration"]["wall_seconds"] > 0
        assert pp1[name]["profiled_iteration"]["kernel_seconds"] is None  # no CUDA here
    ratio = pp1["tokens_per_second_ratio"]
    assert ratio["of_medians"] == pytest.approx(pp1["megatron"]["seconds_per_iteration"]["median"]
                                                / pp1["paci"]["seconds_per_iteration"]["median"])
    assert ratio["per_round"]["n"] == 2
    assert ratio["per_round"]["min"] <= ratio["per_round"]["median"] <= ratio["per_round"]["max"]


def test_host_syncs_are_charged_by_module_the_schedule_makes_none(report):
    syncs = report["pp1"]["host_syncs"]
    assert syncs["schedule_own"] == 0
    assert syncs["wrapper_per_update"] == 1  # the non-finite flag, read once per update
    paci = syncs["by_source"]["paci"]
    assert paci["paci_megatron/optimizer.py: Tensor.item"] == syncs["updates"]
    # megatron-core's own syncs are megatron-core's, for both schedules
    assert all(k.split(": ")[0].endswith(".py") or k.startswith("torch") for k in paci)
    assert set(syncs["megatron_core_per_iteration"]) == {"paci", "megatron"}


def test_replay_uses_current_weights_without_version_error(report):
    replay = report["replay"]
    assert replay["version_error"] is None
    assert replay["equals_current_weights"] is True
    assert replay["differs_from_forward_time_weights"] is True


def test_projection_comes_from_the_stage_times_it_reports(report):
    from paci_megatron.sim import simulate

    proj = report["projection"]
    assert {r["micro_batch"] for r in proj["rows"]} == {2, 4}
    for row in proj["rows"]:
        assert row["comm_s"] == pytest.approx(
            10e-6 + row["activation_bytes"] / (row["link_GBps"] * 1e9))
        t = row["stage_seconds"]
        per = {k: [v[0]] + [v[1]] * 6 + [v[2]] for k, v in t.items()}
        runs = {s: simulate(s, 8, 8, proj["iterations"], per["forward_s"], per["backward_s"],
                            row["comm_s"], per["update_s"]) for s in ("1f1b", "paci")}
        assert row["paci_over_1f1b_throughput"] == pytest.approx(
            runs["1f1b"].makespan / runs["paci"].makespan)
        assert row["bubble_paci"] < row["bubble_1f1b"]


def test_the_balance_advisor_reads_the_report(report, tmp_path):
    """python -m paci_megatron.sim --balance --device-check REPORT: the pieces a stage is
    built from, recovered from the measured first, middle and last stage."""
    from paci_megatron.sim import StageCosts, measured_costs

    path = tmp_path / "report.json"
    path.write_text(json.dumps(report))
    costs, comm_s, row = measured_costs(str(path), micro_batch_size=4)
    assert report["projection"]["layers_per_stage"] == 1  # the dry run's stages
    assert row["micro_batch"] == 4 and row["link_GBps"] == max(
        r["link_GBps"] for r in report["projection"]["rows"]) and comm_s == row["comm_s"]
    t = row["stage_seconds"]
    assert costs == StageCosts.from_stage_times(t["forward_s"], t["backward_s"], 1)
    assert costs.layer_forward_s == t["forward_s"][1]
    assert costs.output_forward_s == max(t["forward_s"][2] - t["forward_s"][1], 0.0)


def test_the_recipe_runs_end_to_end_with_both_schedules_and_the_same_losses(report):
    recipe = report["recipe"]
    assert "error" not in recipe, recipe
    for schedule in ("paci", "1f1b"):
        run = recipe[schedule]
        assert run["returncode"] == 0
        assert len(run["lm_loss"]) == 3 and len(run["val_loss"]) == 2  # iterations 0 and 3
    assert recipe["losses_identical"] is True
    assert recipe["paci"]["lm_loss"] == recipe["1f1b"]["lm_loss"]


def test_time_to_accuracy_at_p8_runs_every_arm_emulated_on_its_own_split(report):
    """(f)'s dry run: four emulated P = 8 runs on the schedules' own splits, analysed by
    time_to_accuracy (per seed pair, on the projected time axis)."""
    from paci_megatron.sim import split_flags

    f = report["time_to_accuracy"]
    assert "error" not in f, f
    times = f["stage_times"]
    assert len(times["forward_s"]) == 8 and set(times["splits"]) == {"paci", "1f1b"}
    for name, run in f["runs"].items():
        schedule = "paci" if name.startswith("paci") else "1f1b"
        assert run["returncode"] == 0 and "--emulate-pipeline" in run["command"]
        assert " ".join(split_flags(times["splits"][schedule])) in run["command"]
        assert max(map(int, run["curve"])) == 4  # iterations 0, 2, 4 evaluated
        assert f["arms"][name]["iterations"] == 4
    assert set(f["runs"]) == {"1f1b-adam", "paci-adam-sync-lookahead", "1f1b-muon", "paci-muon"}
    assert f["arms"]["paci-muon"]["same_optimizer_reference"] == "1f1b-muon"
    for t in f["arms"]["paci-muon"]["tta_same_optimizer"]:
        assert t["pairs"] == 1 and (t["median"] is None) == (t["reached"] == 0)
    assert "| PACI, Muon | 1F1B, Muon |" in f["table"]
    # PACI's run takes less projected time for the same iterations (no flush per iteration)
    paci, base = f["arms"]["paci-muon"], f["arms"]["1f1b-muon"]
    assert paci["seconds_total"] < base["seconds_total"]
