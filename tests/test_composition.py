"""PACI composed with data and tensor parallelism, Megatron's distributed optimizer,
--overlap-grad-reduce, Megatron's activation recompute, PACI's own memory mode, fp32 and
bf16 (4 CPU processes each).

For every composition: PACI drained after every call equals Megatron's own 1F1B bit for
bit, the stage-local grad norms combine to Megatron's global norm, and continuous PACI
trains to the drift bound.
"""

import pytest
import torch

from harness import run_distributed

from workers import composition_case

ITERS, M = 3, 4

COMPOSITIONS = {
    # id: (pp, tp, distributed optimizer, overlap grad reduce, bf16, recompute, memory mode,
    #      tied embeddings)
    "pp2-tp2-fp32": (2, 2, False, False, False, None, "activations", False),
    "pp2-tp2-distopt-fp32": (2, 2, True, False, False, None, "activations", False),
    "pp2-dp2-distopt-tied-bf16": (2, 1, True, False, True, None, "activations", True),
    "pp2-dp2-distopt-tied-fp32": (2, 1, True, False, False, None, "activations", True),
    "pp2-dp2-overlap-fp32": (2, 1, False, True, False, None, "activations", False),
    "pp4-recompute-full-fp32": (4, 1, False, False, False, "full", "activations", False),
    "pp2-dp2-recompute-selective-bf16": (2, 1, False, False, True, "selective", "activations", False),
    "pp4-paci-memory-mode-recompute-fp32": (4, 1, False, False, False, None, "recompute", False),
    "pp2-tp2-tied-fp32": (2, 2, False, False, False, None, "activations", True),
    "pp2-dp2-overlap-tied-bf16": (2, 1, False, True, True, None, "activations", True),
}


@pytest.mark.parametrize("name", list(COMPOSITIONS))
def test_composition(name):
    pp, tp, dist_opt, overlap, bf16, recompute, memory_mode, tied = COMPOSITIONS[name]
    results = run_distributed(composition_case, 4, pp, tp, dist_opt, overlap, bf16, ITERS, M,
                              recompute, memory_mode, tied, timeout_s=400)
    assert sorted({r["stage"] for r in results}) == list(range(pp))
    for r in results:
        where = f"{name} stage {r['stage']} tp {r['tp_rank']} dp {r['dp_rank']}"
        # drained PACI == synchronous 1F1B
        for pname, ref in r["megatron_params"].items():
            assert torch.equal(r["paci_params"][pname], ref), f"{where}: {pname}"
        # sqrt(sum_s norm_s^2) of the stage-local norms == Megatron's global norm
        assert r["combined_norms"] == pytest.approx(r["megatron_norms"], rel=1e-6), where
        # continuous: every micro-batch counted, the bound reached, all updates applied
        drift = r["continuous_drift"]
        assert drift["count"] == ITERS * M
        assert drift["max"] == (1 if r["stage"] < pp - 1 else 0), where
        assert r["continuous_version"] == ITERS
    # continuous PACI with the look-ahead: every data-parallel replica of a stage holds the
    # same weights, also mid-run (the look-ahead reaches sharded and fp32 main parameters)
    for r in results:
        for q in results:
            if (q["stage"], q["tp_rank"]) == (r["stage"], r["tp_rank"]) and q is not r:
                for key in ("continuous_params", "continuous_params_ahead"):
                    for pname, value in r[key].items():
                        assert torch.equal(q[key][pname], value), f"{name} {key} {pname}"
    if tied:  # after the drain both ends of each (TP, DP) rank's tied weight are the same bits
        pairs = 0
        for r in results:
            for q in results:
                if (r["stage"], q["stage"]) == (0, pp - 1) and \
                        (q["tp_rank"], q["dp_rank"]) == (r["tp_rank"], r["dp_rank"]):
                    (e,) = [v for k, v in r["continuous_params"].items() if "word_embeddings" in k]
                    (e2,) = [v for k, v in q["continuous_params"].items() if "output_layer" in k]
                    assert torch.equal(e, e2), f"{name} tp {r['tp_rank']} dp {r['dp_rank']}"
                    pairs += 1
        assert pairs == 4 // pp
