"""The schedule is a drop-in for Megatron's forward_backward_func."""

import inspect

import pytest

from megatron.core.pipeline_parallel import schedules

import paci_megatron as pm
from paci_megatron.plan import StageState

NEWER_KEYWORDS = {"force_all_reduce", "p2p_communicator", "pg_collection",
                  "adjust_tensor_shapes_fn", "collect_non_loss_data", "first_val_step"}


def keyword_params(fn):
    return {n: p for n, p in inspect.signature(fn).parameters.items() if n != "self"}


def test_signature_accepts_every_keyword_megatron_passes():
    ours = keyword_params(pm.PACISchedule.__call__)
    for fn in (schedules.forward_backward_pipelining_without_interleaving,
               schedules.forward_backward_no_pipelining):
        for name, param in keyword_params(fn).items():
            assert name in ours, f"{fn.__name__} takes {name!r}; PACISchedule must too"
            assert ours[name].kind is inspect.Parameter.KEYWORD_ONLY
            if param.default is not inspect.Parameter.empty:
                assert ours[name].default == param.default, name
    assert NEWER_KEYWORDS <= set(ours)


def test_public_names_resolve_to_their_modules():
    from paci_megatron import _EXPORTS

    for name, module in _EXPORTS.items():
        assert getattr(pm, name).__module__ == f"paci_megatron.{module}", name
    with pytest.raises(AttributeError, match="no attribute 'PACISchedul'"):
        pm.PACISchedul  # noqa: B018
    assert pm.StageState is StageState


@pytest.mark.parametrize("sync,interval,resume_at,expected", [
    # the synchronous warm-up: calls 1..3 end drained, then PACI keeps micro-batches in flight
    (3, 0, 99, [True, True, True, False, False, False]),
    # every 2nd call drains, counted from the start
    (0, 2, 99, [False, True, False, True, False, True]),
    # resumed after call 1, inside the warm-up: the resumed run's first call drains too
    (3, 0, 1, [True, True, True, False, False, False]),
    # resumed after call 3: the interval keeps counting the run's iterations, not the process's
    (0, 2, 3, [False, True, False, True, False, True]),
])
def test_the_schedule_owns_the_warm_up_and_interval_drains(sync, interval, resume_at, expected):
    from harness import run_distributed

    from workers import drain_decisions_case

    results = run_distributed(drain_decisions_case, 2, sync, interval, 6, resume_at,
                              timeout_s=120)
    for r in results:
        assert [d for _, d in r["drained"]] == expected, r
        assert [i for i, _ in r["drained"]] == list(range(1, 7))
