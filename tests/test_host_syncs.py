"""The steady state queues work without waiting on the device: no host sync per micro-batch.

Every host-sync entry point (``Tensor.item``, ``bool(tensor)``, ``.tolist()``, ``.cpu()``,
``.numpy()``, ``float()``, ``int()``, ``torch.cuda.synchronize``) is counted during steady-
state calls of continuous PACI on a tiny GPT, on CPU (each would block the host on a GPU).
Runs with m = 4 and m = 8 micro-batches per call make the same number of local updates, so
any sync per micro-batch shows as a difference between them.
"""

import pytest

from harness import run_distributed

from workers import host_sync_case

CALLS = 3


def _counts(m, overlap_param_gather=False, per_token_loss=False):
    return run_distributed(host_sync_case, 2, m, 2, CALLS, overlap_param_gather, per_token_loss,
                           timeout_s=240)


# Not syncs on a GPU: CPU mode's emulation of the CUDA RNG (absent there), and Megatron's
# RNG tracker comparing two CPU RNG states (``tensor_parallel/random.py``, host tensors on
# a GPU too). Every other count is kept, host-resident tensors included (torch's Adam reads
# its CPU step counters with ``.item()``), so the counts are an upper bound.
NOT_DEVICE_SYNCS = ("paci_megatron/cpu.py", "megatron/core/tensor_parallel/random.py")


def _device_syncs(result):
    return {k: v for k, v in result["counts"].items() if not k.startswith(NOT_DEVICE_SYNCS)}


@pytest.mark.parametrize("overlap_param_gather,per_token_loss",
                         [(False, False), (True, True)],
                         ids=["", "overlap-param-gather-and-per-token-loss"])
def test_no_host_sync_per_microbatch_and_a_few_per_update(overlap_param_gather, per_token_loss):
    small = _counts(4, overlap_param_gather, per_token_loss)
    large = _counts(8, overlap_param_gather, per_token_loss)
    for stage, (a, b) in enumerate(zip(small, large)):
        a["counts"], b["counts"] = _device_syncs(a), _device_syncs(b)
        assert a["updates"] == b["updates"] == CALLS, (a["updates"], b["updates"])
        assert b["microbatches"] == 2 * a["microbatches"]
        # twice the micro-batches, the same updates: the same syncs, source by source
        assert a["counts"] == b["counts"], f"stage {stage}: m=4 {a['counts']} m=8 {b['counts']}"
        schedule_own = {k: v for k, v in b["counts"].items()
                        if k.startswith(("paci_megatron/schedule", "paci_megatron/p2p",
                                         "paci_megatron/plan"))}
        assert schedule_own == {}, f"stage {stage}: the schedule syncs the host: {schedule_own}"
        # the wrapper's own: one read of the non-finite flag (reduced on the device) per update
        wrapper_own = {k: v for k, v in b["counts"].items() if k.startswith("paci_megatron/")}
        assert wrapper_own == {"paci_megatron/optimizer.py: Tensor.item": CALLS}, wrapper_own


def test_syncs_are_charged_to_the_module_that_made_them_even_under_a_folder_named_torch(
        tmp_path, monkeypatch):
    """On a machine whose packages live in /opt/torch/.venv, megatron-core's syncs are still
    megatron-core's: only torch's own package folder (from ``torch.__file__``) is skipped."""
    import torch

    from harness import HostSyncCounter

    site = tmp_path / "torch" / ".venv" / "site-packages"
    (site / "somepkg").mkdir(parents=True)
    (site / "somepkg" / "__init__.py").write_text("")
    (site / "somepkg" / "norms.py").write_text("def norm(t):\n    return t.norm().item()\n")
    monkeypatch.syspath_prepend(str(site))
    from somepkg.norms import norm

    with HostSyncCounter() as counter:
        norm(torch.ones(3))
        torch.ones(2).sum().item()
    assert counter.counts == {"somepkg/norms.py: Tensor.item": 1,
                              "test_host_syncs.py: Tensor.item": 1}, counter.counts
    assert counter.by_module() == {"somepkg/norms.py": 1, "test_host_syncs.py": 1}
