"""A batch-size change (Megatron-LM's --rampup-batch-size, or --step-batch-size-schedule):
the micro-batches per iteration grow during training. PACI re-plans at each change and
drains first where the accumulation factor changes with it; drained PACI stays Megatron's
1F1B bit for bit (PP 2, and PP 2 x DP 2 with bf16, tied embeddings and the distributed
optimizer)."""

import pytest
import torch

from harness import run_distributed
from paci_megatron.plan import drift_bound

from workers import ramp_case

MS = [2, 2, 4, 4, 8, 8]  # m per iteration: a = m grows with it


def same_params(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("world,composed", [(2, False), (4, True)],
                         ids=["pp2-fp32", "pp2-dp2-bf16-tied-distopt"])
def test_a_ramp_replans_drains_where_the_window_grows_and_stays_exact(world, composed):
    results = sorted(run_distributed(ramp_case, world, MS, 2, composed, timeout_s=300),
                     key=lambda r: (r["stage"], r["dp_rank"]))
    assert len(results) == world
    for r in results:
        meg_losses, meg_params = r["megatron"]
        losses, params = r["drained"]  # drained after every call: exactly 1F1B
        assert same_params(meg_params, params), f"stage {r['stage']}"
        assert losses == meg_losses
        # continuous PACI: the automatic drain at each change is the drain a user would
        # call by hand, bit for bit
        c_losses, c_params, drift, replans = r["continuous"]
        h_losses, h_params = r["by_hand"]
        assert c_losses == h_losses and same_params(c_params, h_params)
        assert not same_params(c_params, meg_params)  # and it is asynchronous between changes
        assert [(p["iteration"], p["from_m"], p["to_m"], p["accumulation"], p["drained"])
                for p in replans] == [(2, 2, 4, 4, True), (4, 4, 8, 8, True)]
        # the drift bound holds for every window size: ceil((P - 1 - s) / a) <= 1 here
        assert drift["max"] == drift_bound(2, r["stage"], 8)
    last = results[-1]
    assert len(last["megatron"][0]) == sum(MS)  # one loss per micro-batch
