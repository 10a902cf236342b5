"""Drift statistics and the hard bound check."""

import pytest

from paci_megatron.telemetry import DriftBoundError, DriftTelemetry, gather_drift


def test_statistics_and_histogram():
    t = DriftTelemetry(num_stages=4, stage=0)
    for j, d in enumerate([0, 1, 1, 0, 1]):
        t.record(j, d, accumulation=4)
    assert t.max == 1 and t.count == 5 and t.mean == pytest.approx(0.6)
    assert t.summary() == {"max": 1, "mean": 0.6, "count": 5, "histogram": {0: 2, 1: 3}}
    assert gather_drift(t) == [t.summary()]  # no process group: this stage only


def test_drift_above_the_bound_is_a_hard_error():
    t = DriftTelemetry(num_stages=4, stage=1)
    t.record(0, 1, accumulation=2)  # bound ceil((4-1-1)/2) = 1
    with pytest.raises(DriftBoundError, match=r"stage 1: micro-batch 7 crossed 2 updates.*= 1"):
        t.record(7, 2, accumulation=2)
    assert t.count == 1  # the bad value was not recorded as if fine
    DriftTelemetry(4, 1, check=False).record(7, 2, accumulation=2)  # opt-out for experiments


def test_a_failed_gather_names_the_stage(monkeypatch):
    import torch

    from paci_megatron import telemetry

    class Group:
        def rank(self):
            return 2

    def dead_peer(out, obj, group=None):
        raise RuntimeError("Connection closed by peer")

    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 4)
    monkeypatch.setattr(torch.distributed, "all_gather_object", dead_peer)
    with pytest.raises(RuntimeError, match=r"stage 2: gathering every stage's drift statistics "
                                           r"failed \(did another stage stop\?\): Connection closed"):
        telemetry.gather_drift(DriftTelemetry(4, 2), Group())
