"""Staleness mitigations: Muon under PACI, the synchronous warm-up and the look-ahead keep
PACI's exactness guarantees (drained PACI == Megatron's 1F1B, bit for bit) and do what
they say in continuous PACI."""

import pytest
import torch

from harness import run_distributed, run_emulated

from workers import TOY_LR, lookahead_update_case, mitigation_case

ITERS, SYNC = 4, 2


def assert_same_params(a, b, what):
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), f"{what}: {name} differs"


def _have_muon() -> bool:
    import importlib.util

    return importlib.util.find_spec("emerging_optimizers") is not None


NEEDS_MUON = pytest.mark.skipif(
    not _have_muon(), reason="Muon needs emerging-optimizers (CI installs it): pip install "
    "'.[muon]' && pip install --no-deps --ignore-requires-python emerging-optimizers==0.3.0")


_RUNS: dict = {}


def distributed_run(optimizer: str, pp: int) -> list:
    """The P-process run of :func:`workers.mitigation_case` (once per module)."""
    if (optimizer, pp) not in _RUNS:
        _RUNS[optimizer, pp] = run_distributed(mitigation_case, pp, optimizer, ITERS, pp, SYNC,
                                               timeout_s=500)
    return _RUNS[optimizer, pp]


@pytest.fixture(scope="module", params=[("adam", 2), pytest.param(("muon", 2), marks=NEEDS_MUON),
                                        pytest.param(("muon", 4), marks=NEEDS_MUON)],
                ids=["adam-pp2", "muon-pp2", "muon-pp4"])
def case(request):
    optimizer, pp = request.param
    return optimizer, pp, sorted(distributed_run(optimizer, pp), key=lambda r: r["stage"])


def assert_same(a, b, where="result"):
    """Equal values, tensors bit for bit, through dicts, lists and tuples."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


@NEEDS_MUON
def test_emulated_pipeline_equals_the_distributed_run_bit_for_bit():
    """One process, the four stages taking turns (paci_megatron.emulator): Megatron's 1F1B,
    drained PACI, the synchronous warm-up and continuous PACI with the look-ahead, all with
    Muon, give the P-process run's losses, drift and every parameter, bit for bit."""
    emulated = run_emulated(mitigation_case, 4, "muon", ITERS, 4, SYNC)
    assert_same(emulated, distributed_run("muon", 4))
    assert emulated[-1]["continuous_lookahead"][1]["max"] == 0  # the last stage: no drift
    assert emulated[0]["continuous_lookahead"][1]["max"] == 1


def test_drained_paci_equals_megatron_1f1b_with_each_optimizer(case):
    optimizer, pp, results = case
    for r in results:  # Muon for the 2-D weights, chained with Adam for the rest
        assert r["inner_optimizers"] == (["AdamW", "TensorParallelMuon"] if optimizer == "muon"
                                         else ["AdamW"]), r["inner_optimizers"]
        meg_losses, meg_snaps, meg_params = r["megatron"]
        for name in ("drained", "drained_lookahead"):  # a drain removes the look-ahead
            losses, snaps, params = r[name]
            assert_same_params(meg_params, params, f"{optimizer} stage {r['stage']} {name}")
            for k in range(ITERS):
                assert_same_params(meg_snaps[k], snaps[k], f"{name} after iteration {k + 1}")
            assert losses == meg_losses
    last = results[-1]["megatron"][0]
    assert sum(last[-pp:]) < sum(last[:pp])  # it trained


def test_synchronous_warm_up_is_1f1b_then_paci(case):
    optimizer, pp, results = case
    for r in results:
        meg_losses, meg_snaps, meg_params = r["megatron"]
        losses, snaps, params = r["sync"]
        for k in range(SYNC):  # the first SYNC iterations are exactly 1F1B
            assert_same_params(meg_snaps[k], snaps[k], f"sync warm-up iteration {k + 1}")
        assert losses[:SYNC * pp] == meg_losses[:SYNC * pp]
        # then PACI takes over: stages but the last see drift 1, and the weights part ways
        expected = 1 if r["stage"] < pp - 1 else 0
        assert r["sync_drift"]["max"] == expected
        if r["stage"] < pp - 1:
            assert any(not torch.equal(meg_params[n], params[n]) for n in params)
        assert r["sync_trace_versions"] == ITERS


def test_continuous_paci_with_lookahead_trains_with_the_same_drift(case):
    optimizer, pp, results = case
    for r in results:
        losses, drift, params = r["continuous_lookahead"]
        assert drift["max"] == (1 if r["stage"] < pp - 1 else 0)  # m = a = P: drift bound 1
        assert all(torch.isfinite(p).all() for p in params.values())
    last = results[-1]
    losses = last["continuous_lookahead"][0]
    assert losses != last["continuous"]  # the look-ahead changed what the stages computed
    assert sum(losses[-pp:]) < sum(losses[:pp])


def test_lookahead_moves_weights_ahead_by_the_mean_drift_and_settle_removes_it():
    (seen,) = run_distributed(lookahead_update_case, 1, timeout_s=120)
    g = 2.0 * 0.25  # lookahead x mean drift
    x = seen["start"].clone()
    previous = x.clone()
    for k, grad in enumerate(seen["grads"], start=1):
        x_new = x - TOY_LR * grad  # plain SGD steps the optimizer's iterate
        expected = x_new + g * (x_new - x)
        assert torch.allclose(seen[f"after {k}"], expected, atol=1e-6), k
        previous, x = x, x_new
    assert torch.allclose(seen["settled"], x, atol=1e-6)  # back to the iterate
    assert not torch.allclose(seen["after 3"], x, atol=1e-4)  # and it was ahead before
