"""Megatron's ``pg_collection`` / ``p2p_communicator`` arguments: honoured when they describe
one module, refused (with the schedule to use) when they describe several."""

import importlib
import types

import pytest

import paci_megatron as pm
from paci_megatron.config import Setup, refuse
from paci_megatron import compat
from harness import run_distributed

from workers import MultiModuleProcessGroupCollection, process_group_collection_case

ITERS, M = 3, 4


@pytest.fixture(scope="module")
def results():
    return sorted(run_distributed(process_group_collection_case, 2, ITERS, M, timeout_s=300),
                  key=lambda r: r["stage"])


def test_paci_runs_on_the_collections_pipeline_group_and_drained_equals_1f1b(results):
    for r in results:
        assert r["groups_are_others"]  # the case can tell the collection's groups from parallel_state's
        assert r["paci_groups_are_the_collections"], f"stage {r['stage']} used parallel_state's groups"
    last = results[-1]
    assert len(last["megatron"]) == ITERS * M
    assert last["drained"] == last["megatron"]


def test_a_multi_module_collection_is_refused_before_any_work(results):
    for r in results:
        assert "MultiModuleProcessGroupCollection" in r["refusal"]
        assert "--pipeline-schedule 1f1b" in r["refusal"]
        assert r["bound_after_refusal"] is False and r["guarded_after_a_call"] is True
        assert "MultiModuleProcessGroupCollection" in r["later_refusal"]


def test_process_groups_prefer_the_communicator_then_the_collection():
    pp, tp, cp, comm_pp = object(), object(), object(), object()
    pgc = types.SimpleNamespace(pp=pp, tp=tp, cp=cp)
    assert compat.process_groups(pgc) == (pp, tp, cp)
    assert compat.process_groups(pgc, types.SimpleNamespace(pp_group=comm_pp)) == (comm_pp, tp, cp)


def test_megatron_cores_own_multi_module_classes_are_refused():
    names = [("megatron.core.process_groups_config", "MultiModuleProcessGroupCollection"),
             ("megatron.core.pipeline_parallel.multimodule_communicator",
              "MultiModulePipelineCommunicator")]
    classes = [MultiModuleProcessGroupCollection]
    for module, name in names:  # megatron-core 0.17+ (the communicator: 0.16+)
        try:
            classes.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            assert compat.MEGATRON_CORE_VERSION < (0, 17), f"{module}.{name} moved"
    for cls in classes:
        subclass = type("Custom", (cls,), {})  # a subclass is refused as well
        for obj in (object.__new__(cls), object.__new__(subclass)):
            with pytest.raises(pm.PACIConfigError, match="--pipeline-schedule 1f1b"):
                refuse(Setup(collections=(None, obj)))
    refuse(Setup(collections=(None, types.SimpleNamespace(pp=None))))  # one module passes
