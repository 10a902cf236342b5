"""Which wait each backend gets, and the NCCL watchdog (fake work objects, no GPU needed).

gloo: the host waits with a timeout. NCCL: ``Work.wait()`` without one (the stream waits,
the host goes on), no device synchronize, and a watchdog that names the exchange it was
waiting for when it does not complete in time.
"""

import datetime
import subprocess
import sys
import textwrap
import time

import pytest
import torch
import torch.distributed as dist

from paci_megatron import p2p
from paci_megatron.p2p import PipelineP2P, PipelineTimeout, Watchdog, wait_all

LABEL = "stage 0 of 2: sending the activation of micro-batch 3 (SEND_ACT) with stage 1"


class FakeWork:
    def __init__(self, completes_after_s=0.0, times_out=False):
        self.waits, self.done_at = [], time.monotonic() + completes_after_s
        self.times_out = times_out

    def wait(self, *args):
        self.waits.append(args)
        if self.times_out:
            raise RuntimeError("[../gloo/transport/unbound_buffer.cc] Timed out waiting 3000ms")
        return True

    def is_completed(self):
        return time.monotonic() >= self.done_at


class FakeGroup:
    def size(self):
        return 2

    def rank(self):
        return 0


@pytest.fixture
def no_device_sync(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: calls.append(a))
    return calls


def test_gloo_waits_on_the_host_with_the_timeout(no_device_sync):
    works = [FakeWork(), FakeWork()]
    wait_all(works, LABEL, datetime.timedelta(seconds=7))
    assert [w.waits for w in works] == [[(datetime.timedelta(seconds=7),)]] * 2
    assert no_device_sync == []


def test_gloo_timeout_becomes_a_pipeline_timeout():
    with pytest.raises(PipelineTimeout, match=r"no answer within 3 s: .*Timed out"):
        wait_all([FakeWork(times_out=True)], LABEL, datetime.timedelta(seconds=3))


def test_nccl_waits_on_the_stream_and_the_watchdog_takes_the_exchange(no_device_sync):
    watchdog = Watchdog(60.0, on_expire=pytest.fail)
    works = [FakeWork(), FakeWork()]
    wait_all(works, LABEL, datetime.timedelta(seconds=60), watchdog)
    assert [w.waits for w in works] == [[()]] * 2  # no timeout: not a host-blocking wait
    assert no_device_sync == []
    assert [label for _, _, label in watchdog._pending] == [LABEL]


def test_pipeline_p2p_picks_the_wait_by_backend(monkeypatch, no_device_sync):
    monkeypatch.setattr(dist, "get_global_rank", lambda group, rank: rank)
    monkeypatch.setattr(dist, "P2POp", lambda *args: args)
    posted = []
    monkeypatch.setattr(dist, "batch_isend_irecv",
                        lambda ops: posted.extend(FakeWork() for _ in ops) or posted)
    monkeypatch.setattr(dist, "get_backend", lambda group: "gloo")
    gloo = PipelineP2P(FakeGroup(), torch.float32, timeout_s=5)
    assert gloo.watchdog is None
    gloo.exchange(send_next=torch.ones(2), label=LABEL)
    assert posted[-1].waits == [(datetime.timedelta(seconds=5),)]

    monkeypatch.setattr(dist, "get_backend", lambda group: "nccl")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    nccl = PipelineP2P(FakeGroup(), torch.float32, timeout_s=5)
    assert isinstance(nccl.watchdog, Watchdog) and nccl.watchdog.timeout_s == 5
    nccl.exchange(send_next=torch.ones(2), label=LABEL)
    assert posted[-1].waits == [()]
    assert no_device_sync == []


def test_watchdog_names_the_stalled_exchange_within_the_timeout():
    fired = []
    watchdog = Watchdog(0.3, on_expire=lambda msg: fired.append((time.monotonic(), msg)),
                        poll_s=0.02)
    start = time.monotonic()
    watchdog.watch([FakeWork(completes_after_s=0.0)], "stage 1 of 2: a finished exchange")
    watchdog.watch([FakeWork(completes_after_s=1e9)], LABEL)
    while not fired and time.monotonic() - start < 5:
        time.sleep(0.01)
    assert fired, "the watchdog never fired"
    at, message = fired[0]
    assert message == f"{LABEL}: not completed within 0.3 s"
    assert 0.3 <= at - start < 1.5


def test_watchdog_stays_quiet_when_exchanges_complete():
    fired = []
    watchdog = Watchdog(0.2, on_expire=fired.append, poll_s=0.02)
    for i in range(5):
        watchdog.watch([FakeWork(completes_after_s=0.05)], f"exchange {i}")
    time.sleep(0.6)
    assert fired == [] and len(watchdog._pending) == 0


def test_watchdog_default_ends_the_process_with_the_message():
    code = textwrap.dedent(f"""
        import time
        from paci_megatron.p2p import Watchdog
        class Never:
            def is_completed(self):
                return False
        Watchdog(0.5, poll_s=0.05).watch([Never()], {LABEL!r})
        time.sleep(30)
        print("still running")
    """)
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 1, proc.stderr
    assert f"PACI watchdog: {LABEL}: not completed within 0.5 s" in proc.stderr
    assert "still running" not in proc.stdout
    assert time.monotonic() - start < 20


def test_watchdog_goes_on_watching_after_a_stall_and_checks_every_deadline():
    fired = []
    watchdog = Watchdog(5.0, on_expire=fired.append, poll_s=0.02)
    watchdog.watch([FakeWork(completes_after_s=1e9)], "slow head")  # deadline in 5 s
    watchdog.timeout_s = 0.2  # shortened: later exchanges have a near deadline
    watchdog.watch([FakeWork(completes_after_s=1e9)], "stalled second")
    deadline = time.monotonic() + 5
    while not fired and time.monotonic() < deadline:
        time.sleep(0.01)
    assert fired == ["stalled second: not completed within 0.2 s"]  # not hidden by the head
    watchdog.watch([FakeWork(completes_after_s=1e9)], "stalled third")
    while len(fired) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert fired[1] == "stalled third: not completed within 0.2 s"  # the thread lives on
    assert [label for _, _, label in watchdog._pending] == ["slow head"]
