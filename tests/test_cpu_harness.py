"""The CPU/gloo harness runs megatron-core's GPT, DDP, optimizer and Megatron's OWN
pipeline schedule: PP = 2 and PP = 4 reproduce the un-pipelined PP = 1 run."""

import pytest
import torch

from harness import run_distributed

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


def test_cpu_mode_is_listed_and_reversible():
    import megatron.core.tensor_parallel.random as mc_random

    from paci_megatron.cpu import PATCHES, cpu_mode, cpu_mode_enabled

    names = {entry: PATCHES[entry] for entry in ("torch.cuda", "megatron.core.tensor_parallel.random")}
    targets = {"torch.cuda": torch.cuda, "megatron.core.tensor_parallel.random": mc_random}
    before = {(e, n): getattr(targets[e], n) for e, table in names.items() for n in table}
    real = torch.cuda.is_available()
    with cpu_mode() as active:
        assert active and cpu_mode_enabled()
        assert torch.cuda.current_device() == 0
        assert torch.zeros(2, device="cuda").device.type == "cpu"
        assert torch.ones(1).type() == "torch.cuda.FloatTensor"  # what Megatron's asserts want
        for (e, n), original in before.items():
            assert getattr(targets[e], n) is not original, (e, n)
    assert not cpu_mode_enabled()
    assert {(e, n): getattr(targets[e], n) for (e, n) in before} == before
    assert torch.ones(1).type() == "torch.FloatTensor"
    assert torch.cuda.is_available() == real
    if not real:
        with pytest.raises((RuntimeError, AssertionError)):
            torch.zeros(1, device="cuda")


def test_ranks_start_from_the_fork_server_unless_they_need_their_own_environment():
    """Without ``env`` the ranks are children of the fork server (torch and megatron-core
    imported once there), not of this process; with ``env`` they are spawned by this
    process and see the variable (torch reads some at import, before ``_worker`` runs)."""
    import os

    from workers import start_probe_case

    forked = run_distributed(start_probe_case, 2, timeout_s=120)
    assert {r["probe"] for r in forked} == {None}
    parents = {r["parent"] for r in forked}
    assert len(parents) == 1 and os.getpid() not in parents  # one fork server
    spawned = run_distributed(start_probe_case, 2, timeout_s=120,
                              env={"PACI_HARNESS_PROBE": "set"})
    assert [r["probe"] for r in spawned] == ["set", "set"]
    assert {r["parent"] for r in spawned} == {os.getpid()}
