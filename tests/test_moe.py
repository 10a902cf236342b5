"""MoE under PACI: the stage-local parts of Megatron's finalize_model_grads (router
expert-bias update, reset of the per-window token counts and aux-loss tracker) run at
each local update, so a drained PACI equals Megatron's 1F1B bit for bit, expert bias
included, and continuous PACI trains within the drift bound."""

import pytest
import torch

from harness import run_distributed

from workers import moe_case

ITERS, M = 3, 4


@pytest.fixture(scope="module")
def stages():
    return run_distributed(moe_case, 2, 2, ITERS, M, timeout_s=300)


def test_drained_paci_equals_megatron_1f1b_with_moe(stages):
    last = stages[-1]
    assert len(last["megatron_losses"]) == ITERS * M
    assert last["drained_losses"] == last["megatron_losses"]
    for r in stages:
        for name, value in r["megatron_params"].items():
            assert torch.equal(r["drained_params"][name], value), f"stage {r['stage']}: {name}"
        assert len(r["megatron_bias"]) == 2  # two MoE layers per stage
        for got, want in zip(r["drained_bias"], r["megatron_bias"]):
            assert torch.equal(got, want), f"stage {r['stage']}: expert bias"
            assert got.abs().sum() > 0  # the bias moved: the update ran


def test_continuous_paci_trains_moe_within_the_drift_bound(stages):
    assert [r["continuous_drift"] for r in stages] == [1, 0]  # ceil((P-1-s)/a), P = 2, a = 4
    last = stages[-1]
    assert last["continuous_losses"][:M] == last["megatron_losses"][:M]  # version 0 alike
    assert last["continuous_losses"] != last["megatron_losses"]  # then the drift shows
    for r in stages:
        assert any(not torch.equal(r["continuous_params"][k], r["megatron_params"][k])
                   for k in r["megatron_params"])


def test_drained_paci_equals_megatron_1f1b_with_expert_parallelism_2():
    # PP 2 x DP 2, experts split over 2 ranks (the allgather dispatcher: gloo's
    # all_to_all_single does not take the alltoall dispatcher's tensor split sizes)
    ranks = run_distributed(moe_case, 4, 2, 2, M, 2, timeout_s=400)
    assert sorted((r["stage"], r["dp_rank"]) for r in ranks) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    for r in ranks:
        for name, value in r["megatron_params"].items():
            assert torch.equal(r["drained_params"][name], value), f"{r['stage']}/{r['dp_rank']}: {name}"
        for got, want in zip(r["drained_bias"], r["megatron_bias"]):
            assert torch.equal(got, want)
        if r["stage"] == 1:
            assert r["drained_losses"] == r["megatron_losses"]
    assert [r["continuous_drift"] for r in sorted(ranks, key=lambda r: r["stage"])] == [1, 1, 0, 0]
