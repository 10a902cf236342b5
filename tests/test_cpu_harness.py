"""The CPU/gloo harness runs megatron-core's GPT, DDP, optimizer and Megatron's OWN
pipeline schedule: PP = 2 and PP = 4 reproduce the un-pipelined PP = 1 run."""

import pytest
import torch

from paci_megatron._testing import run_distributed

from workers import megatron_1f1b_case

ITERS, M = 3, 4


@pytest.fixture(scope="module")
def reference():
    (ref,) = run_distributed(megatron_1f1b_case, 1, ITERS, M, timeout_s=240)
    return ref


@pytest.mark.parametrize("pp", [2, 4])
def test_megatron_1f1b_on_cpu_matches_unpipelined_run(reference, pp):
    assert reference["schedule"] == "forward_backward_no_pipelining"
    results = run_distributed(megatron_1f1b_case, pp, ITERS, M, reference["initial"],
                              timeout_s=300)
    assert {r["schedule"] for r in results} == {"forward_backward_pipelining_without_interleaving"}
    merged = {}
    for r in results:
        merged.update(r["params"])
    assert merged.keys() == reference["params"].keys()
    worst = 0.0
    for name, ref in reference["params"].items():
        diff = (merged[name] - ref).abs().max().item()
        worst = max(worst, diff / max(ref.abs().max().item(), 1e-12))
    assert worst < 1e-6, f"pipelined parameters differ from PP=1 by {worst:.3g} (relative)"
    last = max(results, key=lambda r: r["stage"])
    assert last["losses"] == pytest.approx(reference["losses"], rel=1e-6)
    # the parameters moved: the run trained, it did not just copy the initial state
    assert any(not torch.equal(merged[n], reference["initial"][n]) for n in merged)
    assert sum(last["losses"][-M:]) < sum(last["losses"][:M])
