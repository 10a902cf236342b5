"""Nothing hangs: a pipeline wait that times out names the stage, peer and micro-batch."""

from harness import run_distributed

from workers import silent_peer_case


def test_silent_peer_gives_named_timeout_not_a_hang():
    stage0, stage1 = run_distributed(silent_peer_case, 2, 2, timeout_s=180, comm_timeout_s=60)
    assert stage1 == "silent"
    msg = stage0["message"]
    assert msg.startswith("stage 0 of 2:"), msg
    assert "micro-batch" in msg and "with stage 1" in msg
    assert "sending the activation of micro-batch 0" in msg  # the wait that timed out
    assert "Timed out" in msg
    assert stage0["seconds"] < 8  # the 3 s timeout, not the peer's 10 s sleep
    # one traceback ending in the named message, not a chain of gloo's and ours
    assert "During handling of the above exception" not in stage0["printed"]
    assert "The above exception was the direct cause" not in stage0["printed"]
    assert stage0["printed"].rstrip().splitlines()[-1].startswith(
        "paci_megatron.p2p.PACICommunicationError: stage 0 of 2:")
