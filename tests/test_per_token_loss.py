"""``--calculate-per-token-loss`` under PACI: each window's gradients are scaled by the token
count of its own micro-batches (summed over DP), which reaches every stage with the
gradients flowing backward; no collective across stages.

Micro-batches keep between 3% and 100% of their tokens, so a window scaled by any other
count (another window's, one stage's own guess, the iteration's) shows in the recorded
count and in the weights. Drained PACI (a = m) equals Megatron's 1F1B bit for bit.
"""

import pytest
import torch

from harness import run_distributed

from workers import per_token_loss_case

ITERS, M = 2, 4


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("pp,tp,bf16,tied,dist_opt", [
    (2, 1, False, False, True), (2, 2, True, True, True)],
    ids=["pp2-dp2-distopt-fp32", "pp2-tp2-bf16-tied-distopt"])
def test_each_window_is_scaled_by_its_own_token_count(pp, tp, bf16, tied, dist_opt):
    results = run_distributed(per_token_loss_case, 4, pp, bf16, tied, dist_opt, ITERS, M, tp,
                              timeout_s=600)
    dp = results[0]["dp"]
    # every DP replica's count of micro-batch j, summed: what each window must be scaled by
    replicas = [r for r in results if r["stage"] == 0 and r["tp_rank"] == 0]
    assert len(replicas) == dp
    tokens = [sum(r["tokens"][j] for r in replicas) for j in range(ITERS * M)]
    assert max(tokens) > 4 * min(tokens), tokens  # the counts really differ
    a = M // 2
    for r in results:
        where = f"stage {r['stage']}, DP rank {r['dp_rank']}, TP rank {r['tp_rank']}"
        assert len(r["tokens"]) == ITERS * M and r["dp"] == dp
        # drained PACI == Megatron's 1F1B with per-token loss, every bit
        assert r["drained_losses"] == r["megatron_losses"], where
        assert _same(r["drained_params"], r["megatron_params"]), where
        assert r["drained_windows"] == [(k * M, M, sum(tokens[k * M:(k + 1) * M]))
                                        for k in range(ITERS)], where
        # continuous PACI, a = m / 2: each update's count is that of its own window
        expected = [(k * a, a, sum(tokens[k * a:(k + 1) * a])) for k in range(ITERS * M // a)]
        assert r["continuous_windows"] == expected, (where, r["continuous_windows"], expected)
    last = [r for r in results if r["stage"] == pp - 1]
    assert all(len(r["continuous_losses"]) == ITERS * M for r in last)
    # drift: stage s reaches ceil((P-1-s)/a)
    for r in results:
        assert r["continuous_drift"] == -(-(pp - 1 - r["stage"]) // a), r["stage"]
