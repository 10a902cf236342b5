"""Tied input embedding and output layer across stages under PACI (paci_megatron.tied)."""

import math

import pytest
import torch

from harness import run_distributed, run_emulated
from paci_megatron.plan import StageState, drift_bound, format_actions, plan_call, tied_updates_due

from workers import tied_embedding_case

ITERS = 4


# P = 2 in bf16: tests/test_composition.py ("pp2-dp2-overlap-tied-bf16")
_RUNS: dict = {}


def distributed_run(pp: int, bf16: bool) -> list:
    """The P-process run of :func:`workers.tied_embedding_case` (once per module)."""
    if (pp, bf16) not in _RUNS:
        _RUNS[pp, bf16] = run_distributed(tied_embedding_case, pp, bf16, ITERS, pp, timeout_s=400)
    return _RUNS[pp, bf16]


@pytest.fixture(scope="module", params=[(2, False), (4, False), (4, True)],
                ids=["pp2-fp32", "pp4-fp32", "pp4-bf16"])
def case(request):
    pp, bf16 = request.param
    return pp, bf16, pp, sorted(distributed_run(pp, bf16), key=lambda r: r["stage"])


def test_emulated_pipeline_with_tied_embeddings_equals_the_distributed_run():
    """Tied embeddings in bf16 on four stages in one process (paci_megatron.emulator):
    Megatron's 1F1B, drained PACI and continuous PACI at a = m and a = 1 (the tied
    weight's exchanges between the first and last stage included) as the P-process run."""
    from test_mitigations import assert_same

    emulated = run_emulated(tied_embedding_case, 4, True, ITERS, 4)
    assert_same(emulated, distributed_run(4, True))
    assert emulated[0]["has_tied"] and emulated[-1]["has_tied"]


def test_drained_paci_with_tied_embeddings_equals_megatron_1f1b_bitwise(case):
    pp, bf16, m, results = case
    assert [r["has_tied"] for r in results] == [True] + [False] * (pp - 2) + [True]
    for r in results:
        for name, ref in r["megatron_params"].items():
            assert torch.equal(ref, r["drained_params"][name]), f"stage {r['stage']} {name}"
    first, last = results[0], results[-1]
    assert last["drained_losses"] == last["megatron_losses"]
    # the two copies started equal and trained (Megatron's own run moved them)
    assert torch.equal(first["initial_tied"], last["initial_tied"])
    e = next(v for k, v in first["megatron_params"].items() if "word_embeddings" in k)
    assert not torch.equal(e, first["initial_tied"])


@pytest.mark.parametrize("a", [None, 1])
def test_continuous_paci_tied_copies_agree_after_drain_and_lag_equals_bound(case, a):
    pp, bf16, m, results = case
    acc = m if a is None else a
    first, last = results[0], results[-1]
    run_first, run_last = first[f"a={a}"], last[f"a={a}"]
    # after the drain both copies are the same bits, at the same version
    assert torch.equal(run_first["tied"], run_last["tied"])
    assert run_first["tied_version"] == run_last["tied_version"] == ITERS * m // acc
    # the last stage's copy lagged, by exactly the bound ceil((P-1)/a) at its worst
    lag = run_last["drift"]["tied_lag"]
    assert lag["max"] == drift_bound(pp, 0, acc) == math.ceil((pp - 1) / acc)
    assert lag["count"] == ITERS * m
    assert run_last["tied_version_before_drain"] < run_last["version_before_drain"]
    # a continuous run differs from the drained one (the lag is real) but trains
    assert run_last["losses"] != last["drained_losses"]
    assert all(math.isfinite(x) for x in run_last["losses"])
    assert "tied_lag" not in run_first["drift"]


@pytest.mark.parametrize("P,m,a", [(2, 4, 1), (4, 8, 8), (4, 8, 2), (4, 8, 1), (8, 8, 8),
                                   (8, 16, 4), (3, 6, 3)])
def test_tied_update_k_follows_first_stage_update_k_in_the_plan(P, m, a):
    """First stage: update k precedes its forward of ka + P - 1, the point at which the
    last stage applies tied update k; the lag of the copy never exceeds ceil((P-1)/a)."""
    state0, state_last = StageState(), StageState()
    acts0, acts_last = [], []
    for _ in range(3):
        more, state0 = plan_call(P, 0, m, a, state0)
        acts0 += more
        more, state_last = plan_call(P, P - 1, m, a, state_last)
        acts_last += more
    text = format_actions(acts0).split()
    for k in range(1, state0.version + 1):
        j = k * a + P - 1
        if f"0F{j}" in text:
            assert text.index(f"0U{k}") < text.index(f"0F{j}")
    lags, version = [], 0
    for act in acts_last:
        if act.kind.value == "U":
            version = act.index
        elif act.kind.value == "F":
            lags.append(version - tied_updates_due(P, a, act.index))
    assert max(lags) == drift_bound(P, 0, a) and min(lags) >= 0


class GroupStepSGD(torch.optim.Optimizer):
    """Counts steps per param group, as Transformer Engine's and Apex's ``FusedAdam`` do
    (``group["step"] += 1`` before use); its update ``p -= lr * step * grad`` shows the
    count each parameter was stepped at."""

    def __init__(self, params, lr):
        super().__init__(params, {"lr": lr, "weight_decay": 0.0})

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            group["step"] = group.get("step", 0) + 1
            for p in group["params"]:
                if p.grad is not None:
                    p.sub_(group["lr"] * group["step"] * p.grad)


class MegatronLike:
    """What ``compat`` reads of a Megatron optimizer: the torch optimizer inside."""

    def __init__(self, optimizer):
        self.optimizer = optimizer


def test_a_group_counting_optimizer_keeps_its_count_and_steps_the_tied_copy_at_the_peers():
    from paci_megatron import internals

    w, e = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))
    opt = MegatronLike(GroupStepSGD([w, e], lr=0.1))
    w.grad, e.grad = torch.ones(2), torch.ones(2)
    for _ in range(2):  # the last stage's own updates, E' left out
        with internals.ParamGroupsWithout(opt, e):
            opt.optimizer.step()
    group = opt.optimizer.param_groups[0]
    assert group["step"] == 2  # the count its steps wrote is kept
    assert torch.equal(e.detach(), torch.ones(2))  # E' untouched
    assert torch.allclose(w.detach(), torch.full((2,), 1 - 0.1 * 1 - 0.1 * 2))
    assert internals.step_hyperparameters(opt, e) == (0.1, 0.0, 2)
    # the tied step arrives with the first stage's count (5): E' is stepped at 5 ...
    internals.step_one_parameter(opt, e, torch.full((2,), 2.0), 0.05, 0.0, group_step=5)
    assert torch.allclose(e.detach(), torch.full((2,), 1 - 0.05 * 5 * 2))
    assert group["step"] == 2  # ... and the group's own count stays the last stage's
    # torch's AdamW counts per parameter: no group count is sent (-1) and none is added
    adam = MegatronLike(torch.optim.AdamW([e], lr=0.1))
    assert internals.step_hyperparameters(adam, e)[2] == -1
    internals.step_one_parameter(adam, e, torch.ones(2), 0.1, 0.0, group_step=-1)
    assert "step" not in adam.optimizer.param_groups[0]
    assert adam.optimizer.state[e]["step"] == 1


def test_tied_embeddings_with_the_precision_aware_optimizer_are_refused(monkeypatch):
    import types

    import paci_megatron.tied
    from paci_megatron import PACIConfigError
    from paci_megatron.optimizer import _tied_embedding

    weight = torch.nn.Parameter(torch.ones(4, 2))
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(paci_megatron.tied, "find_tied_embedding", lambda model: (weight, True))
    optimizer = types.SimpleNamespace(
        config=types.SimpleNamespace(use_precision_aware_optimizer=True))
    with pytest.raises(PACIConfigError) as err:
        _tied_embedding([torch.nn.Linear(2, 2)], optimizer)
    assert "--use-precision-aware-optimizer" in str(err.value)
    assert "--untie-embeddings-and-output-weights" in str(err.value)
