"""Oracle: with one stage PACI is plain gradient accumulation over a micro-batches."""

import torch

from harness import run_distributed

from workers import single_stage_accumulation_case


CASES = [(4, 4), (4, 2), (6, 3)]


def test_one_stage_equals_gradient_accumulation():
    ((results, lr),) = run_distributed(single_stage_accumulation_case, 1, CASES, 3, timeout_s=240)
    # a resumed scheduler continues: the updates use the lrs of iterations 6 and 7
    assert lr["used"] == lr["expected"] and lr["expected"][0] != lr["expected"][1]
    assert lr["iterator_kept"] is False
    for (m, a), r in zip(CASES, results):
        assert r["version"] == 3 * m // a
        for name, ref in r["reference"].items():
            assert torch.equal(r["paci"][name], ref), (m, a, name)
