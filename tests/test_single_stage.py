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


def test_the_schedule_drives_megatrons_forward_backward_timer_without_a_barrier():
    from workers import timers_case

    (events,) = run_distributed(timers_case, 1, 3, timeout_s=120)
    outer = [e for e in events if e[1] == "forward-backward"]
    assert outer == [("start", "forward-backward", False), ("stop", "forward-backward")] * 3
    # megatron-core's own forward_step / backward_step time the compute inside each call
    assert ("start", "forward-compute", False) in events
    assert ("start", "backward-compute", False) in events
    # the optimizer's own timers run inside the local update: never with a world barrier
    inner = [e for e in events if e[0] == "start" and e[1].startswith("optimizer")]
    assert inner and all(barrier is False for _, _, barrier in inner), inner
