"""What only a GPU used to show, caught on the CPU: device placement, fused kernels chosen
by availability, the watchdog's device, allocation-free non-finite checks, sends checked
against the receiver's buffer, RNG snapshots of a CUDA-graph-safe tracker.

Each test fails on code that puts the model, a batch or a thread on the wrong device,
turns on a kernel that is not installed, or copies a whole gradient buffer per update.
"""

import threading
import time
import types

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from harness import DistributedFailure, run_distributed


# ------------------------------------------------------------------ the recipe on a GPU
def gpu_config_case(rank: int, world: int) -> dict:
    """The recipe's GPU configuration built and trained one step by megatron-core's local
    spec with Apex and Transformer Engine absent (CPU mode stands in for the device)."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from gpt_recipe import model as gpt

    ps.initialize_model_parallel(1, 1)
    torch.manual_seed(0)
    model_parallel_cuda_manual_seed(0)
    cfg = gpt.transformer_config(num_layers=2, hidden_size=64, num_attention_heads=4,
                                 bf16=True, on_gpu=True)
    model = gpt.build_model(cfg, vocab_size=128, max_position_embeddings=32)
    # shapes where megatron-core would take its fused softmax kernel if switched on
    tokens = torch.randint(0, 128, (4, 32))
    positions = torch.arange(32).expand(4, -1)
    loss = model[0](tokens, positions, None, labels=tokens).float().mean()
    loss.backward()
    return {"fusions": gpt.available_fusions(True), "cpu": gpt.available_fusions(False),
            "config": {k: getattr(cfg, k) for k in gpt.available_fusions(True)},
            "loss": float(loss), "grads": sum(int(p.main_grad.abs().sum() > 0)
                                              for p in model[0].parameters())}


def test_gpu_configuration_builds_and_trains_without_apex_or_transformer_engine():
    (out,) = run_distributed(gpu_config_case, 1, timeout_s=240,
                             env={"TORCHDYNAMO_DISABLE": "1"})
    # no Apex here: its persistent layer norm and compiled softmax kernels are off,
    # megatron-core's own fused bias functions stay on (what Megatron-LM runs without Apex)
    assert out["fusions"] == {"persist_layer_norm": False, "masked_softmax_fusion": False,
                              "bias_activation_fusion": True, "bias_dropout_fusion": True,
                              "gradient_accumulation_fusion": False}
    assert out["config"] == out["fusions"]
    assert not any(out["cpu"].values())
    assert 4.0 < out["loss"] < 6.0  # about ln(128) = 4.85 at initialisation
    assert out["grads"] > 10


class _Recorded(list):
    pass


def placement_case(rank: int, world: int) -> dict:
    """``build_model(device=...)``: what reaches the DDP wrapper, and the batches."""
    import megatron.core.distributed as mcd
    from megatron.core import parallel_state as ps

    from gpt_recipe import model as gpt

    ps.initialize_model_parallel(1, 1)
    seen = {}

    def spy_ddp(config, ddp_config, module):
        seen["wrapped"] = type(module).__name__
        seen["params"] = sorted({str(p.device) for p in module.parameters()})
        seen["buffers"] = sorted({str(b.device) for b in module.buffers()})
        return module

    mcd.DistributedDataParallel = spy_ddp
    for bf16 in (False, True):
        cfg = gpt.transformer_config(num_layers=2, hidden_size=32, num_attention_heads=4,
                                     bf16=bf16)
        gpt.build_model(cfg, vocab_size=64, max_position_embeddings=16,
                        untie_embeddings_and_output_weights=False, device=torch.device("meta"))
        seen[f"bf16={bf16}"] = dict(seen)
    data = [{"tokens": [1, 2], "labels": [2, 3], "loss_mask": [1.0, 1.0], "position_ids": [0, 1]}] * 4
    batch = next(gpt.microbatches(data, 2, device=torch.device("meta")))
    seen["batch"] = sorted({str(t.device) for t in batch.values()})
    return seen


def test_the_recipe_places_the_stage_and_every_batch_on_its_device_before_wrapping():
    (seen,) = run_distributed(placement_case, 1, timeout_s=240)
    for bf16 in (False, True):
        got = seen[f"bf16={bf16}"]
        assert got["wrapped"] == ("Float16Module" if bf16 else "GPTModel")
        assert got["params"] == ["meta"], got  # layer norms, position embeddings included
        assert got["buffers"] in ([], ["meta"]), got
    assert seen["batch"] == ["meta"]


# ------------------------------------------------------------------ watchdog thread
def test_the_watchdog_thread_makes_its_stage_device_current(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "set_device",
                        lambda device: calls.append((threading.current_thread().name, device)))

    class Done:
        def is_completed(self):
            return True

    from paci_megatron.p2p import Watchdog

    Watchdog(5.0, poll_s=0.01, device=torch.device("cuda", 3)).watch([Done()], "x")
    deadline = time.monotonic() + 5
    while not calls and time.monotonic() < deadline:
        time.sleep(0.01)
    assert calls and calls[0][1] == torch.device("cuda", 3)
    assert calls[0][0] != threading.main_thread().name  # the watchdog's own thread
    calls.clear()
    Watchdog(5.0, poll_s=0.01, device=torch.device("cpu")).watch([Done()], "x")
    time.sleep(0.1)
    assert calls == []


# ------------------------------------------------------------------ non-finite check
class _LargestOutput(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel() * t.element_size())
        return out


@pytest.mark.parametrize("value,expected", [(1.5, False), (float("nan"), True),
                                            (float("-inf"), True)])
def test_the_non_finite_check_allocates_nothing_the_size_of_a_gradient_buffer(value, expected):
    from paci_megatron.optimizer import PACIOptimizer

    data = [torch.zeros(1 << 20), torch.zeros(1 << 19, dtype=torch.bfloat16)]
    data[1][12345] = value
    before = [d.clone() for d in data]
    chunk = types.SimpleNamespace(buffers=[types.SimpleNamespace(grad_data=d) for d in data])
    with _LargestOutput() as mode:
        found = PACIOptimizer._nonfinite_grads(types.SimpleNamespace(model=[chunk]))
    assert found is expected
    assert mode.largest <= 64, mode.largest  # a flag, not a copy of 4 MiB
    for d, b in zip(data, before):
        assert torch.equal(d, b) or (d.isnan() == b.isnan()).all()


# ------------------------------------------------------------------ sends checked
def test_a_send_that_does_not_fit_the_receivers_buffer_is_refused_before_posting():
    from paci_megatron.p2p import PACICommunicationError, PipelineP2P

    p2p = object.__new__(PipelineP2P)
    p2p.dtype = torch.bfloat16
    p2p.check_send(torch.zeros(8, 2, 16, dtype=torch.bfloat16), (8, 2, 16), "stage 0")
    with pytest.raises(PACICommunicationError, match=r"is \(8, 2, 16\) torch.float32, the "
                       r"receiving stage expects \(8, 2, 16\) torch.bfloat16"):
        p2p.check_send(torch.zeros(8, 2, 16), (8, 2, 16), "stage 0")
    with pytest.raises(PACICommunicationError, match=r"\(4, 2, 16\).*expects \(8, 2, 16\)"):
        p2p.check_send(torch.zeros(4, 2, 16, dtype=torch.bfloat16), (8, 2, 16), "stage 0")


def wrong_dtype_case(rank: int, world: int) -> None:
    """Stage 0's forward step returns float64 activations where the pipeline is fp32."""
    import workers

    original = workers.toy_forward_step

    def forward_step(data_iterator, model):
        out, loss = original(data_iterator, model)
        return (out.double() if rank == 0 else out), loss

    workers.toy_forward_step = forward_step
    workers.toy_paci_case(rank, world, 2, 2, 1)


def test_the_schedule_checks_each_send_against_the_receiving_stage():
    with pytest.raises(DistributedFailure) as info:
        run_distributed(wrong_dtype_case, 2, timeout_s=120, comm_timeout_s=20)
    text = str(info.value)
    assert "rank 0" in text and "PACICommunicationError" in text
    assert "stage 0 of 2: sending the activation of micro-batch 0" in text
    assert "torch.float64, the receiving stage expects" in text and "torch.float32" in text


# ------------------------------------------------------------------ RNG snapshots
def test_recompute_snapshots_a_cuda_graph_safe_trackers_generators(monkeypatch):
    import megatron.core.tensor_parallel.random as mp_random

    from paci_megatron import schedule

    class GraphSafeTracker:  # keeps live generator objects, as use_cudagraphable_rng does
        def __init__(self):
            self.states_ = {"model-parallel-rng": torch.Generator().manual_seed(7)}

        def get_states(self):
            return dict(self.states_)

        def set_states(self, states):
            self.states_ = states

    tracker = GraphSafeTracker()
    monkeypatch.setattr(mp_random, "get_cuda_rng_tracker", lambda: tracker)
    snapshot = schedule._rng_state()
    first = torch.rand(4, generator=tracker.states_["model-parallel-rng"])
    torch.rand(4, generator=tracker.states_["model-parallel-rng"])  # the forward draws on
    schedule._set_rng_state(snapshot)
    assert torch.equal(torch.rand(4, generator=tracker.states_["model-parallel-rng"]), first)
    schedule._set_rng_state(snapshot)  # a snapshot survives its restore
    assert torch.equal(torch.rand(4, generator=tracker.states_["model-parallel-rng"]), first)


# ------------------------------------------------------------------ tied handshake
def tied_handshake_case(rank: int, world: int, rows_last: int) -> None:
    import torch.distributed as dist

    from paci_megatron.tied import TiedEmbedding

    group = dist.new_group([0, 1])
    weight = torch.nn.Parameter(torch.zeros(16 if rank == 0 else rows_last, 4))
    weight.main_grad = torch.zeros_like(weight)
    optimizer = types.SimpleNamespace(optimizer=torch.optim.SGD([weight], lr=0.1))
    TiedEmbedding(weight, rank == 0, 2, group, timeout_s=20).handshake(optimizer)


def test_tied_ends_agree_on_their_messages_before_training():
    run_distributed(tied_handshake_case, 2, 16, timeout_s=120)
    with pytest.raises(DistributedFailure) as info:
        run_distributed(tied_handshake_case, 2, 24, timeout_s=120)
    text = str(info.value)
    assert "PACIConfigError" in text
    assert "rows 16 here, 24 on stage 1" in text or "rows 24 here, 16 on stage 0" in text
