"""NaN/Inf in a stage's gradients: a named error, or a skipped update with a flag."""

import pytest

from harness import DistributedFailure, run_distributed

from workers import nan_gradient_case


def test_nan_gradient_stops_with_stage_update_and_microbatches():
    with pytest.raises(DistributedFailure) as info:
        run_distributed(nan_gradient_case, 3, False, timeout_s=240)
    msg = str(info.value)
    assert "rank 1 failed" in msg and "NonFiniteGradientError" in msg
    assert ("stage 1: NaN/Inf in the gradients of update 2 (micro-batches 3..5, iteration 2)"
            in msg)


def test_nan_gradient_update_skipped_on_request():
    results = sorted(run_distributed(nan_gradient_case, 3, True, timeout_s=240),
                     key=lambda r: r["stage"])
    assert [r["skipped"] for r in results] == [[], [2], []]
    assert all(r["finite"] for r in results)  # the poisoned window never reached weights
    assert [r["version"] for r in results] == [3, 3, 3]  # stages stay in step
