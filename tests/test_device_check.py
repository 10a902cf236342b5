"""benchmarks/device_check.py's dry run on CPU: every check runs and the report is consistent."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("device") / "report.json"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "device_check.py"),
                           "--device", "cpu", "--output", str(out)],
                          capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


def test_pp1_paci_equals_megatron_no_pipelining_and_syncs_only_per_update(report):
    pp1 = report["pp1"]
    assert pp1["losses_identical"] is True
    assert pp1["paci"]["losses"] == pp1["megatron"]["losses"]
    assert len(pp1["paci"]["losses"]) == 5 and len(pp1["paci"]["losses"][0]) == 4
    syncs = pp1["host_syncs"]
    assert syncs["schedule_own"] == 0
    assert syncs["by_source"]["paci_megatron/optimizer.py: Tensor.item"] == syncs["updates"]
    assert pp1["tokens_per_second_ratio"] == pytest.approx(
        pp1["paci"]["tokens_per_second"] / pp1["megatron"]["tokens_per_second"])


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
