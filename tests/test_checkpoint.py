"""Drain, save, stop, load, continue: the same bits as a run that never stopped."""

import os

import pytest
import torch

from harness import run_distributed

from harness import DistributedFailure

from workers import crash_during_save_case, resume_after_crash_case, resume_case

N, K, M = 3, 2, 4


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
def test_resume_equals_uninterrupted_run(tmp_path, bf16):
    results = run_distributed(resume_case, 2, bf16, N, K, M, str(tmp_path), timeout_s=300)
    for stage, r in enumerate(results):
        assert r["loaded"] == {"iteration": N, "extra": {"consumed": N * M}}
        for name, ref in r["uninterrupted"].items():
            assert torch.equal(r["resumed"][name], ref), f"stage {stage} {name}"
        assert r["version"] == N + K
        assert r["resumed_drift"] == r["uninterrupted_drift"]  # telemetry carried over
        assert r["latest"] == N  # the good checkpoint stays the latest
    assert "stage 1: parameter" in results[1]["refused_nan"]
    assert "has NaN/Inf at iteration 5" in results[1]["refused_nan"]
    assert "another rank refused to save iteration 5" in results[0]["refused_nan"]
    # stage 0 had micro-batches in flight at iteration N: saving was refused
    assert "call drain() on every rank before saving" in results[0]["refused_in_flight"]
    assert os.path.isfile(tmp_path / "iter_0000003" / "mp_rank_00_001" / "model_optim_rng.pt")


def test_crash_while_saving_keeps_the_last_checkpoint_and_resume_matches(tmp_path):
    with pytest.raises(DistributedFailure, match="exit codes"):
        run_distributed(crash_during_save_case, 2, N, K, M, str(tmp_path), timeout_s=300)
    # the half-written file never replaced anything
    assert (tmp_path / "latest_checkpointed_iteration.txt").read_text() == str(N)
    assert not (tmp_path / "iter_0000005" / "mp_rank_00_000" / "model_optim_rng.pt").exists()
    results = run_distributed(resume_after_crash_case, 2, N, K, M, str(tmp_path), timeout_s=300)
    for stage, r in enumerate(results):
        assert r["latest"] == N
        for name, ref in r["uninterrupted"].items():
            assert torch.equal(r["resumed"][name], ref), f"stage {stage} {name}"
