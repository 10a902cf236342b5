"""``--overlap-param-gather`` under PACI (distributed optimizer, DP 2, several bucket groups;
PP 2 x DP 2, and PP 2 x TP 2 x DP 2 for bf16 with tied embeddings).

megatron-core's forward pre-hooks gather the updated parameter shards bucket by bucket;
under PACI a local update happens inside the schedule, where the next read of a weight may
also be a backward (cool-down) or the tied embedding's catch-up. Every read is checked
(``workers.GatherChecker``): none may see a parameter whose gather had not finished, and
with the schedule's wait removed the checker must see exactly such reads. Values: each run
with the overlap equals the same run without it, bit for bit, and drained PACI equals
Megatron's 1F1B with the overlap.
"""

import pytest
import torch

from harness import run_distributed

from workers import overlap_param_gather_case

ITERS, M = 3, 4


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("bf16,tied,moe,tp", [(False, False, False, 1), (True, True, False, 2),
                                              (False, False, True, 1)],
                         ids=["pp2-dp2-fp32", "pp2-tp2-dp2-bf16-tied", "pp2-dp2-moe"])
def test_overlap_param_gather(bf16, tied, moe, tp):
    results = run_distributed(overlap_param_gather_case, 4 * tp, 2, bf16, tied, ITERS, M, moe,
                              tp, timeout_s=900)
    assert len(results) == 4 * tp
    for r in results:
        where = f"stage {r['stage']}, TP rank {r['tp_rank']}, DP rank {r['dp_rank']}"
        # a gather chain on the first stage (megatron-core buckets only there)
        assert r["bucket_groups"] >= 2 or r["stage"] > 0, where
        assert r["megatron_overlap_violations"] == [], where
        for run in ("megatron", "drained", "a1", "continuous"):
            assert r[f"{run}_overlap_losses"] == r[f"{run}_sync_losses"], (where, run)
            assert _same(r[f"{run}_overlap_params"], r[f"{run}_sync_params"]), (where, run)
        assert r["align_overlap_losses"] == r["continuous_sync_losses"], where
        assert _same(r["align_overlap_params"], r["continuous_sync_params"]), where
        for run in ("drained", "a1", "continuous", "nohooks", "align"):
            assert r[f"{run}_overlap_violations"] == [], (where, run)
            forward_checks, backward_checks = r[f"{run}_overlap_checks"]
            assert forward_checks > 0 and backward_checks > 0, (where, run)
        # drained PACI == Megatron's 1F1B, both with the overlap
        assert r["drained_overlap_losses"] == r["megatron_overlap_losses"], where
        assert _same(r["drained_overlap_params"], r["megatron_overlap_params"]), where
        assert r["a1_overlap_version"] == ITERS * M, where
        # without megatron-core's hooks PACI's synchronous gather keeps the run exact
        assert r["nohooks_overlap_losses"] == r["nohooks_sync_losses"], where
        assert _same(r["nohooks_overlap_params"], r["nohooks_sync_params"]), where
    # the wait before a backward that follows a local update is what keeps it right: with
    # it removed, a cool-down backward reads weights whose gather was still pending
    assert any(r["nowait_overlap_violations"] for r in results), \
        [r["nowait_overlap_violations"] for r in results]
    assert all("backward" in v for r in results for v in r["nowait_overlap_violations"])


def test_overlapping_the_gather_with_the_optimizer_step_is_refused_before_training():
    """megatron-core's ``overlap_param_gather_with_optimizer_step`` starts a gather inside
    ``optimizer.step()``; PACI's look-ahead and drains write the weights it reads. The
    wrapper refuses it (megatron-core's own OptimizerConfig field), Megatron-LM's flag is
    refused by the glue's check (tests/test_megatron_lm_glue.py)."""
    import types

    from megatron.core.optimizer import OptimizerConfig

    from paci_megatron import PACIOptimizer
    from paci_megatron.config import PACIConfigError

    def optimizer(**overrides):
        config = OptimizerConfig(use_distributed_optimizer=True, **overrides)
        return types.SimpleNamespace(config=config, chained_optimizers=[
            types.SimpleNamespace(config=config)])

    with pytest.raises(PACIConfigError) as refused:
        PACIOptimizer(optimizer(overlap_param_gather_with_optimizer_step=True), [])
    assert "overlap_param_gather_with_optimizer_step starts the first model chunk's" in str(refused.value)
    assert "set it to False in the OptimizerConfig" in str(refused.value)
    with pytest.raises(Exception) as other:  # without the flag it gets past the check
        PACIOptimizer(optimizer(), [])
    assert not isinstance(other.value, PACIConfigError)
