"""The schedule is a drop-in for Megatron's forward_backward_func."""

import inspect

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


def test_public_names_resolve():
    for name in pm.__all__:
        assert getattr(pm, name) is not None
    assert pm.StageState is StageState


def test_drain_before_first_call_is_a_no_op():
    class _Opt:
        version = 0

    sched = pm.PACISchedule(_Opt())
    sched.drain()
    assert sched.in_flight == 0 and sched.state == StageState()
