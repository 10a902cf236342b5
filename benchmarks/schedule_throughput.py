"""Throughput of PACI against Megatron's own 1F1B, side by side, in one invocation.

For every pipeline size ``P`` and micro-batch count ``m`` the same pipeline is trained
through megatron-core's ``forward_backward_pipelining_without_interleaving`` (what
``get_forward_backward_func()`` returns for ``P > 1``, with Megatron-LM's
``finalize_model_grads`` and one ``optimizer.step()`` per iteration) and through
:class:`paci_megatron.PACISchedule` + :class:`paci_megatron.PACIOptimizer` (``a = m``),
alternating: ``--rounds`` rounds of (1F1B, PACI), each ``--warmup`` discarded iterations
then ``--iterations`` timed ones. PACI is never drained between its rounds: its
micro-batches stay in flight while 1F1B runs (nothing is pending between calls), so the
timed PACI iterations are in steady state once the warm-up iteration has refilled the
pipeline.

The same controlled-time stages also run Megatron's interleaved 1F1B (``--interleaved V``:
``V`` model chunks a stage, each taking ``1 / V`` of the stage's time; megatron-core's
``forward_backward_pipelining_with_interleaving``), the fastest synchronous baseline; its
measured seconds per iteration are set against :mod:`paci_megatron.sim`'s and against
PACI's measured speed on the same stages.

Controlled-time stages. Each stage is one ``[h, h]`` weight applied by an autograd
function whose forward takes ``--forward-ms`` and whose backward takes ``--backward-ms``
of wall time (the matmul, then ``time.sleep`` up to the target). Sleeping costs no CPU,
so 8 stage processes fit on 2 cores and the measurement shows the pipeline schedule
rather than the machine's core count; the last stage adds a mean-squared-error loss.
With ``--vocab V`` the first stage adds a ``[V, h]`` embedding look-up and the last a ``[V, h]``
output layer (logits ``y E^T`` in the loss), trained with Adam; with ``--tied`` the two are one
tied weight (Megatron all-reduces its gradients; PACI exchanges them, :mod:`paci_megatron.tied`).
Activations ``[--seq-length, --micro-batch-size, --hidden-size]`` travel between stages
through gloo.

Measured, per rank and round over the timed iterations only (``time.perf_counter``,
seconds):

- ``wall``: from the start of the first timed iteration to the end of the last.
- ``compute``: time inside the stage's forward and backward functions (the controlled
  time plus the matmuls).
- ``comm``: time inside the point-to-point exchanges, waits on neighbours included
  (PACI: ``PACISchedule._communicate``; 1F1B: megatron-core's
  ``P2PCommunicator._communicate``).
- ``tied_recv`` (``--tied``, PACI): time receiving the other end's tied-embedding message
  (``TiedEmbedding._recv``: the transfer and any wait for it), reported per iteration.
- ``update``: time in optimizer steps (PACI: ``PACIOptimizer.local_update``; 1F1B:
  ``optimizer.step()``).

A round lasts as long as its slowest rank. Every figure below comes from each schedule's
fastest round (on a shared machine, the round least disturbed by other processes); the
JSON also holds every round's time and the ratio over all rounds. Reported per
``(P, m)``:

- throughput: micro-batches per second, ``m * iterations / wall`` of that round;
  ``ratio`` = PACI / 1F1B, against the ideal ``(m + P - 1) / m`` (1F1B's iteration costs
  ``m + P - 1`` micro-batch slots, PACI's steady state ``m``: PACI paper, arXiv
  2606.07881, and Megatron's flush utilisation ``m / (m + P - 1)``).
- utilisation, averaged over stages: ``busy / wall``, where ``busy`` = ``steps`` (below),
  the time the stage spends in its forward and backward actions, which is what the
  simulator counts as busy; and the narrower ``compute / wall`` (the controlled time
  only, Megatron's per-micro-batch machinery counted as idle). Formula ``m / (m + P - 1)`` for
  1F1B and 1 for PACI in steady state; and the simulator's
  (:mod:`paci_megatron.sim`, fed the same forward / backward times, zero communication
  time) steady-state utilisation, measured as the marginal utilisation between a
  ``K1``- and a ``K2``-iteration simulation, ``(busy(K2) - busy(K1)) / (makespan(K2) -
  makespan(K1))``, so that PACI's one-off fill and drain drop out as they do from the
  measured steady state.
- schedule overhead per micro-batch, seconds: ``(wall - steps - comm - update) /
  micro-batches`` per rank, the largest over ranks, where ``steps`` is the time inside
  megatron-core's per-micro-batch ``schedules.forward_step`` and
  ``schedules.backward_step`` (both schedules call these same functions; they hold the
  model's forward, the loss, autograd's backward and the gradient hooks). What remains is
  the schedule's own work: planning, bookkeeping of the micro-batches in flight, drift
  telemetry, and the training loop's ``zero_grad`` calls. The JSON also holds the wider
  ``outside_compute`` figure, ``(wall - compute - comm - update) / micro-batches``, which
  adds Megatron's ``forward_step`` / ``backward_step`` machinery around the controlled
  compute (and this benchmark's own activation accounting). A third, independent measure
  runs ONE stage whose forward and backward cost nothing but a tiny matmul
  (``--overhead-microbatches`` per iteration) and compares PACI's time per micro-batch
  with megatron-core's own ``forward_backward_no_pipelining`` loop on the same model: the
  difference is what PACI adds per micro-batch over Megatron's plain loop.
- peak activation bytes per stage: the most bytes autograd held saved for backward at
  once (``torch.autograd.graph.saved_tensors_hooks`` around the model's forward; every
  saved tensor counted with its storage size from its pack until autograd frees it,
  parameters excluded), measured separately for each schedule in the same processes.

The same comparison then runs on the tiny megatron-core GPT (``--gpt-stages``, default 2
and 4, ``m = --gpt-microbatch-factor x P``; random tokens, real compute; throughput,
schedule overhead and activation bytes): there the stages share the machine's cores, so
the ratio also measures how many stages the cores can run at once.

``--check`` exits 1 when a criterion fails on the controlled-time stages: ratio below
0.95 x ideal, PACI's schedule overhead 1 ms or more per micro-batch, peak activation
bytes more than 5 % apart, or the simulator more than 5 % from the formula or the
measured utilisation.

Usage::

    python benchmarks/schedule_throughput.py --output benchmarks/results/throughput.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import weakref
from typing import Any, Dict, List, Optional, Sequence

import torch

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for _folder in (_ROOT, os.path.join(_ROOT, "examples")):  # paci_megatron, gpt_recipe
    if _folder not in sys.path:
        sys.path.insert(0, _folder)

SCHEDULES = ("1f1b", "paci")

# per process: seconds spent in each category, by schedule (reset per timed window)
_TIMES: Dict[str, float] = {}
_CURRENT = {"schedule": None}


def _add(key: str, seconds: float) -> None:
    name = f"{_CURRENT['schedule']}.{key}"
    _TIMES[name] = _TIMES.get(name, 0.0) + seconds


def _sleep_until(deadline: float) -> None:
    left = deadline - time.perf_counter()
    if left > 0:
        time.sleep(left)


class _TimedLinear(torch.autograd.Function):
    """``y = x @ w`` whose forward and backward each take a set wall time (seconds)."""

    @staticmethod
    def forward(ctx, x, w, forward_s: float, backward_s: float):
        t0 = time.perf_counter()
        y = torch.matmul(x, w)
        _sleep_until(t0 + forward_s)
        ctx.save_for_backward(x, w)
        ctx.backward_s = backward_s
        _add("compute", time.perf_counter() - t0)
        return y

    @staticmethod
    def backward(ctx, grad):
        t0 = time.perf_counter()
        x, w = ctx.saved_tensors
        grad_x = torch.matmul(grad, w.t()) if ctx.needs_input_grad[0] else None
        grad_w = torch.matmul(x.reshape(-1, x.shape[-1]).t(), grad.reshape(-1, grad.shape[-1]))
        _sleep_until(t0 + ctx.backward_s)
        _add("compute", time.perf_counter() - t0)
        return grad_x, grad_w, None, None


class _Held:
    """A saved tensor in the meter's care; its collection marks autograd's release."""

    __slots__ = ("tensor", "__weakref__")

    def __init__(self, tensor):
        self.tensor = tensor


class ActivationMeter:
    """Bytes autograd holds saved for backward, per schedule: current and peak.

    Use :meth:`hooks` around a model's forward. A saved tensor counts its storage size in
    bytes from the moment autograd saves it until autograd releases it (after its
    backward); tensors listed in ``exclude`` (the parameters) do not count.
    """

    def __init__(self, exclude: Sequence[torch.Tensor] = ()):
        self.exclude = {t.data_ptr() for t in exclude}
        self.live: Dict[str, int] = {}
        self.peak: Dict[str, int] = {}

    def hooks(self, schedule: str):
        """Context manager: account the tensors autograd saves under ``schedule``."""
        meter = self

        def release(nbytes: int) -> None:
            meter.live[schedule] -= nbytes

        def pack(tensor):
            if tensor.data_ptr() in meter.exclude:
                return tensor
            nbytes = tensor.untyped_storage().nbytes()
            held = _Held(tensor)
            meter.live[schedule] = meter.live.get(schedule, 0) + nbytes
            meter.peak[schedule] = max(meter.peak.get(schedule, 0), meter.live[schedule])
            weakref.finalize(held, release, nbytes)
            return held

        def unpack(held):
            return held.tensor if isinstance(held, _Held) else held

        return torch.autograd.graph.saved_tensors_hooks(pack, unpack)


def _make_sleep_stage(stage: int, num_stages: int, hidden: int, forward_s: float,
                      backward_s: float, seed: int, vocab: int = 0, tied: bool = False):
    from megatron.core.enums import ModelType
    from megatron.core.transformer.module import MegatronModule
    from megatron.core.transformer.transformer_config import TransformerConfig

    config = TransformerConfig(num_layers=1, hidden_size=hidden, num_attention_heads=1,
                               pipeline_dtype=torch.float32, use_cpu_initialization=True)

    class SleepStage(MegatronModule):
        def __init__(self):
            super().__init__(config)
            self.model_type = ModelType.encoder_or_decoder
            # what Megatron's finalize_model_grads looks up: with --vocab V the first stage
            # has a [V, h] embedding and the last an output layer, one weight with --tied
            self.pre_process, self.post_process = stage == 0, stage == num_stages - 1
            ends = self.pre_process or self.post_process
            self.share_embeddings_and_output_weights = tied and ends
            g = torch.Generator().manual_seed(seed + stage)
            self.weight = torch.nn.Parameter(
                torch.eye(hidden) + 0.01 * torch.randn(hidden, hidden, generator=g))
            self.tied = None  # the embedding (first stage) or output weight (last stage)
            if vocab and ends:
                g = torch.Generator().manual_seed(seed)  # the same on both ends
                self.tied = torch.nn.Parameter(0.02 * torch.randn(vocab, hidden, generator=g))
                if tied and not self.pre_process:
                    self.tied.shared = self.tied.shared_embedding = True  # as Megatron marks E'
                g = torch.Generator().manual_seed(seed + 1)
                self.register_buffer("ids", torch.randint(0, vocab, (1,), generator=g))
            self.input_tensor = None

        def shared_embedding_or_output_weight(self):
            return self.tied

        def set_input_tensor(self, tensor):
            self.input_tensor = tensor[0] if isinstance(tensor, list) else tensor

        def forward(self, x=None, target=None):
            h = x if stage == 0 else self.input_tensor
            if self.tied is not None and self.pre_process:  # the embedding look-up
                h = h + torch.nn.functional.embedding(
                    self.ids.expand(h.shape[:-1]), self.tied)
            y = _TimedLinear.apply(h, self.weight, forward_s, backward_s)
            if stage == num_stages - 1:
                loss = ((y - target) ** 2).mean()
                if self.tied is not None:  # the output layer: logits y E^T
                    loss = loss + 1e-3 * torch.matmul(y, self.tied.t()).pow(2).mean()
                return loss
            return y

    return SleepStage()


def _sleep_batches(seq: int, mbs: int, hidden: int):
    g = torch.Generator().manual_seed(0)
    pool = [{"x": torch.randn(seq, mbs, hidden, generator=g),
             "target": torch.randn(seq, mbs, hidden, generator=g)} for _ in range(16)]
    j = 0
    while True:
        yield pool[j % len(pool)]
        j += 1


def _mse_loss(output):
    return output, {"loss": output.detach()}


def _timed_forward_step(meter: ActivationMeter, schedule: str, kind: str):
    """forward_step_func: reads a batch on the first and last stage, runs the model under
    the activation meter; ``kind`` "sleep" or "gpt"."""
    from megatron.core import parallel_state as ps

    from gpt_recipe import model as gpt

    def forward_step(data_iterator, model):
        if kind == "gpt":
            with meter.hooks(schedule):
                return gpt.forward_step(data_iterator, model)
        first, last = ps.is_pipeline_first_stage(), ps.is_pipeline_last_stage()
        batch = next(data_iterator) if (first or last) else {}
        with meter.hooks(schedule):
            output = model(batch.get("x"), batch.get("target"))
        return output, _mse_loss

    return forward_step


def _instrument_megatron_p2p() -> None:
    """Time megatron-core's point-to-point exchanges (every 1F1B send/receive goes
    through ``P2PCommunicator._communicate``) under the current schedule's name."""
    from megatron.core.pipeline_parallel.p2p_communication import P2PCommunicator

    if getattr(P2PCommunicator._communicate, "_timed", False):
        return
    original = P2PCommunicator._communicate

    def timed(self, *args, **kwargs):
        t0 = time.perf_counter()
        try:
            return original(self, *args, **kwargs)
        finally:
            _add("comm", time.perf_counter() - t0)

    timed._timed = True
    P2PCommunicator._communicate = timed


def _instrument_megatron_steps() -> None:
    """Time megatron-core's per-micro-batch ``forward_step`` and ``backward_step`` (both
    schedules call them through the ``schedules`` module) under the key "steps"."""
    import functools

    from megatron.core.pipeline_parallel import schedules

    for name in ("forward_step", "backward_step"):
        original = getattr(schedules, name)
        if getattr(original, "_timed", False):
            continue

        @functools.wraps(original)  # keeps the signature that paci_megatron.compat inspects
        def timed(*args, _original=original, **kwargs):
            t0 = time.perf_counter()
            try:
                return _original(*args, **kwargs)
            finally:
                _add("steps", time.perf_counter() - t0)

        timed._timed = True
        setattr(schedules, name, timed)


def _timed_method(obj, name: str, key: str) -> None:
    original = getattr(obj, name)

    def timed(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            _add(key, time.perf_counter() - t0)

    setattr(obj, name, timed)


def _build_pair(kind: str, P: int, stage: int, args: Dict[str, Any]):
    """Two identical stages (one per schedule), each with its own config, DDP, optimizer."""
    import paci_megatron as pm
    from megatron.core.distributed import (DistributedDataParallel,
                                           DistributedDataParallelConfig, finalize_model_grads)
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from gpt_recipe import model as gpt

    built = {}
    for schedule in SCHEDULES:
        if kind == "sleep":
            module = _make_sleep_stage(stage, P, args["hidden"], args["forward_s"],
                                       args["backward_s"], seed=1234,
                                       vocab=args.get("vocab", 0), tied=args.get("tied", False))
            model = [DistributedDataParallel(module.config, DistributedDataParallelConfig(),
                                             module)]
            opt = get_megatron_optimizer(
                OptimizerConfig(optimizer="adam" if args.get("vocab") else "sgd", lr=1e-4,
                                weight_decay=0.0, sgd_momentum=0.0, clip_grad=0.0), model)
        else:
            torch.manual_seed(1234)
            from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

            model_parallel_cuda_manual_seed(1234)
            cfg = gpt.transformer_config(num_layers=args["gpt_layers"],
                                         hidden_size=args["hidden"], num_attention_heads=4,
                                         pipeline_model_parallel_size=P)
            model = gpt.build_model(cfg, vocab_size=args["vocab"],
                                    max_position_embeddings=args["seq"])
            opt = gpt.build_optimizer(model, lr=1e-4, weight_decay=0.0, clip_grad=0.0)
        config = model[0].config
        if schedule == "1f1b":
            config.finalize_model_grads_func = finalize_model_grads
            config.no_sync_func = model[0].no_sync
            fb = get_forward_backward_func()
            _instrument_megatron_p2p()
            _timed_method(opt, "step", "update")
            train_opt = opt
        else:
            train_opt = pm.PACIOptimizer(opt, model)
            fb = pm.PACISchedule(train_opt, pm.PACIConfig(accumulation=None))
            _timed_method(fb, "_communicate", "comm")
            _timed_method(train_opt, "local_update", "update")
            if train_opt.tied is not None:  # waits for the other end's tied message
                _timed_method(train_opt.tied, "_recv", "tied_recv")
        built[schedule] = (model, train_opt, fb)
    return built


def _gpt_batches(seq: int, mbs: int, vocab: int):
    g = torch.Generator().manual_seed(0)
    pool = []
    for _ in range(16):
        t = torch.randint(0, vocab, (mbs, seq + 1), generator=g)
        pool.append({"tokens": t[:, :-1].contiguous(), "labels": t[:, 1:].contiguous(),
                     "loss_mask": torch.ones(mbs, seq),
                     "position_ids": torch.arange(seq).unsqueeze(0).expand(mbs, seq).contiguous()})
    j = 0
    while True:
        yield pool[j % len(pool)]
        j += 1


def pipeline_case(rank: int, world: int, kind: str, m: int, args: Dict[str, Any]) -> dict:
    """One rank of the side-by-side run: returns its per-schedule measurements.

    ``args``: ``forward_s`` / ``backward_s`` (sleep stages), ``hidden``, ``seq``, ``mbs``,
    ``warmup``, ``iterations``, ``rounds`` (and ``gpt_layers``, ``vocab`` for the GPT).
    """
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(tensor_model_parallel_size=1, pipeline_model_parallel_size=world)
    stage = ps.get_pipeline_model_parallel_rank()
    built = _build_pair(kind, world, stage, args)
    _instrument_megatron_steps()
    params = [p for model, _, _ in built.values() for p in model[0].parameters()]
    meter = ActivationMeter(exclude=params)
    out: Dict[str, Any] = {"stage": stage}
    rounds: Dict[str, List[Dict[str, float]]] = {s: [] for s in SCHEDULES}
    data = {s: (_sleep_batches(args["seq"], args["mbs"], args["hidden"]) if kind == "sleep"
                else _gpt_batches(args["seq"], args["mbs"], args["vocab"])) for s in SCHEDULES}
    steps = {s: _timed_forward_step(meter, s, kind) for s in SCHEDULES}

    def iteration(schedule: str) -> None:
        model, opt, fb = built[schedule]
        model[0].zero_grad_buffer()
        opt.zero_grad()
        fb(forward_step_func=steps[schedule], data_iterator=data[schedule], model=model,
           num_microbatches=m, seq_length=args["seq"], micro_batch_size=args["mbs"],
           forward_only=False)
        opt.step()

    for _ in range(args["rounds"]):
        for schedule in SCHEDULES:
            _CURRENT["schedule"] = schedule
            torch.distributed.barrier()
            for _ in range(args["warmup"]):
                iteration(schedule)
            _TIMES.clear()
            t0 = time.perf_counter()
            for _ in range(args["iterations"]):
                iteration(schedule)
            wall = time.perf_counter() - t0
            record = {"wall": wall}
            for key in ("compute", "steps", "comm", "update", "tied_recv"):
                record[key] = _TIMES.get(f"{schedule}.{key}", 0.0)
            rounds[schedule].append(record)
    _CURRENT["schedule"] = None
    for schedule in SCHEDULES:
        out[schedule] = {"rounds": rounds[schedule], "microbatches": m * args["iterations"],
                         "peak_activation_bytes": meter.peak.get(schedule, 0)}
    _, _, paci = built["paci"]
    out["paci_peak_in_flight"] = paci.peak_in_flight
    out["paci_drift_max"] = paci.telemetry.summary()["max"] if paci.telemetry else None
    paci.drain()
    return out


def interleaved_case(rank: int, world: int, m: int, v: int, args: Dict[str, Any]) -> dict:
    """One rank of Megatron's interleaved 1F1B
    (``forward_backward_pipelining_with_interleaving``, what ``get_forward_backward_func()``
    returns with virtual pipeline stages) on controlled-time stages: ``v`` model chunks a
    stage, virtual stage ``c P + s`` taking ``1 / v`` of a stage's ``forward_s`` /
    ``backward_s``, Megatron-LM's ``finalize_model_grads`` and one ``optimizer.step()`` per
    iteration. Returns the wall seconds of each round's timed iterations."""
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import (DistributedDataParallel,
                                           DistributedDataParallelConfig, finalize_model_grads)
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(tensor_model_parallel_size=1, pipeline_model_parallel_size=world,
                                 virtual_pipeline_model_parallel_size=v)
    stage = ps.get_pipeline_model_parallel_rank()
    chunks = []
    for c in range(v):
        module = _make_sleep_stage(c * world + stage, world * v, args["hidden"],
                                   args["forward_s"] / v, args["backward_s"] / v, seed=1234)
        chunks.append(DistributedDataParallel(module.config, DistributedDataParallelConfig(),
                                              module, disable_bucketing=c > 0))
    opt = get_megatron_optimizer(OptimizerConfig(optimizer="sgd", lr=1e-4, weight_decay=0.0,
                                                 sgd_momentum=0.0, clip_grad=0.0), chunks)
    config = chunks[0].config  # the schedule reads the first chunk's
    config.microbatch_group_size_per_vp_stage = world  # Megatron's default: P
    config.virtual_pipeline_model_parallel_size = v  # as Megatron-LM's config carries it
    config.finalize_model_grads_func = finalize_model_grads
    config.no_sync_func = [chunk.no_sync for chunk in chunks]
    fb = get_forward_backward_func()
    if fb.__name__ != "forward_backward_pipelining_with_interleaving":
        raise RuntimeError(f"megatron-core chose {fb.__name__}, not the interleaved schedule")
    data = [_sleep_batches(args["seq"], args["mbs"], args["hidden"]) for _ in chunks]

    def forward_step(data_iterator, model):
        batch = next(data_iterator)  # each chunk its own stream; only the ends use it
        return model(batch["x"], batch["target"]), _mse_loss

    def iteration() -> None:
        for chunk in chunks:
            chunk.zero_grad_buffer()
        opt.zero_grad()
        fb(forward_step_func=forward_step, data_iterator=data, model=chunks,
           num_microbatches=m, seq_length=args["seq"], micro_batch_size=args["mbs"],
           forward_only=False)
        opt.step()

    walls = []
    for _ in range(args["rounds"]):
        torch.distributed.barrier()
        for _ in range(args["warmup"]):
            iteration()
        t0 = time.perf_counter()
        for _ in range(args["iterations"]):
            iteration()
        walls.append(time.perf_counter() - t0)
    return {"stage": stage, "walls": walls}


def summarise_interleaved(P: int, m: int, v: int, ranks: List[dict], forward_s: float,
                          backward_s: float, iterations: int) -> dict:
    """Measured seconds per iteration of the interleaved 1F1B (fastest round, a round as
    long as its slowest rank) against :func:`paci_megatron.sim.seconds_per_iteration`'s
    and the formula ``(m + (P - 1) / v) (F + B)`` (Narayanan et al. 2021, section 2.2)."""
    from paci_megatron.sim import seconds_per_iteration

    walls = [max(r["walls"][i] for r in ranks) for i in range(len(ranks[0]["walls"]))]
    measured = min(walls) / iterations
    sim = seconds_per_iteration("interleaved", P, m, forward_s, backward_s, virtual_stages=v)
    return {"P": P, "m": m, "v": v, "round_walls_s": walls,
            "measured_s_per_iteration": measured, "sim_s_per_iteration": sim,
            "formula_s_per_iteration": (m + (P - 1) / v) * (forward_s + backward_s),
            "sim_vs_measured_rel_diff": abs(sim - measured) / measured}


def overhead_case(rank: int, world: int, m: int, iterations: int, hidden: int) -> dict:
    """One stage, zero controlled time: seconds per micro-batch of megatron-core's
    ``forward_backward_no_pipelining`` and of PACI on the same tiny model."""
    import paci_megatron as pm
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(tensor_model_parallel_size=1, pipeline_model_parallel_size=1)
    seq, mbs = 4, 2
    meter = ActivationMeter()
    result = {}
    for schedule in ("megatron", "paci", "megatron", "paci"):  # alternate, keep the second
        module = _make_sleep_stage(0, 1, hidden, 0.0, 0.0, seed=1)
        model = [DistributedDataParallel(module.config, DistributedDataParallelConfig(), module)]
        opt = get_megatron_optimizer(OptimizerConfig(optimizer="sgd", lr=1e-4, weight_decay=0.0,
                                                     clip_grad=0.0), model)
        if schedule == "paci":
            opt = pm.PACIOptimizer(opt, model)
            fb = pm.PACISchedule(opt, pm.PACIConfig())
        else:
            fb = get_forward_backward_func()
        step = _timed_forward_step(meter, schedule, "sleep")
        it = _sleep_batches(seq, mbs, hidden)
        _CURRENT["schedule"] = schedule

        def iteration():
            model[0].zero_grad_buffer()
            opt.zero_grad()
            fb(forward_step_func=step, data_iterator=it, model=model, num_microbatches=m,
               seq_length=seq, micro_batch_size=mbs, forward_only=False)
            opt.step()

        for _ in range(2):
            iteration()
        t0 = time.perf_counter()
        for _ in range(iterations):
            iteration()
        result[schedule] = (time.perf_counter() - t0) / (iterations * m)
    _CURRENT["schedule"] = None
    result["paci_minus_megatron_s"] = result["paci"] - result["megatron"]
    return result


def sim_utilisation(schedule: str, P: int, m: int, forward_s: float, backward_s: float,
                    k1: int = 2, k2: int = 4) -> float:
    """Steady-state utilisation from :func:`paci_megatron.sim.simulate`: the marginal
    ``(busy(k2) - busy(k1)) / (makespan(k2) - makespan(k1))``, busy averaged over stages
    (one-off fill and drain cancel)."""
    from paci_megatron.sim import simulate

    a = simulate(schedule, P, m, k1, forward_s, backward_s)
    b = simulate(schedule, P, m, k2, forward_s, backward_s)
    busy = (sum(b.busy) - sum(a.busy)) / P
    return busy / (b.makespan - a.makespan)


def summarise(kind: str, P: int, m: int, ranks: List[dict], forward_s: float,
              backward_s: float) -> dict:
    """One table row from the per-rank measurements (see the module docstring)."""
    from paci_megatron.sim import flush_utilisation

    row: Dict[str, Any] = {"kind": kind, "P": P, "m": m}
    ranks = sorted(ranks, key=lambda r: r["stage"])
    micro = ranks[0]["1f1b"]["microbatches"]
    for s in SCHEDULES:
        n_rounds = len(ranks[0][s]["rounds"])
        # a round lasts as long as its slowest rank; keep the fastest round (least disturbed
        # by other work on the machine) and take every figure from that round
        walls = [max(r[s]["rounds"][i]["wall"] for r in ranks) for i in range(n_rounds)]
        best = min(range(n_rounds), key=walls.__getitem__)
        per_rank = [r[s]["rounds"][best] for r in ranks]
        row[f"{s}_round_walls_s"] = walls
        row[f"{s}_wall_s"] = walls[best]
        row[f"{s}_throughput_mb_per_s"] = micro / walls[best]
        row[f"{s}_throughput_all_rounds_mb_per_s"] = micro * n_rounds / sum(walls)
        if kind == "sleep":
            row[f"{s}_compute_utilisation"] = (sum(t["compute"] / t["wall"] for t in per_rank)
                                               / len(ranks))
            row[f"{s}_outside_compute_per_microbatch_s"] = max(
                (t["wall"] - t["compute"] - t["comm"] - t["update"]) / micro for t in per_rank)
        else:  # the GPT's backward compute is not timed
            row[f"{s}_compute_utilisation"] = None
            row[f"{s}_outside_compute_per_microbatch_s"] = None
        row[f"{s}_utilisation"] = sum(t["steps"] / t["wall"] for t in per_rank) / len(ranks)
        row[f"{s}_overhead_per_microbatch_s"] = max(
            (t["wall"] - t["steps"] - t["comm"] - t["update"]) / micro for t in per_rank)
        row[f"{s}_peak_activation_bytes"] = [r[s]["peak_activation_bytes"] for r in ranks]
    # tied embeddings: seconds per iteration each PACI stage spent receiving the other
    # end's tied message (the transfer, and any wait for it), in the fastest round
    best = min(range(len(row["paci_round_walls_s"])), key=row["paci_round_walls_s"].__getitem__)
    row["paci_tied_recv_per_iteration_s"] = [
        r["paci"]["rounds"][best].get("tied_recv", 0.0) / (micro / m) for r in ranks]
    row["ratio"] = row["paci_throughput_mb_per_s"] / row["1f1b_throughput_mb_per_s"]
    row["ratio_all_rounds"] = (row["paci_throughput_all_rounds_mb_per_s"]
                               / row["1f1b_throughput_all_rounds_mb_per_s"])
    row["ideal_ratio"] = (m + P - 1) / m
    row["ratio_over_ideal"] = row["ratio"] / row["ideal_ratio"]
    row["peak_bytes_max_rel_diff"] = max(
        abs(a - b) / max(a, b, 1) for a, b in zip(row["paci_peak_activation_bytes"],
                                                  row["1f1b_peak_activation_bytes"]))
    row["paci_peak_in_flight"] = [r["paci_peak_in_flight"] for r in ranks]
    row["ranks"] = ranks  # every rank's every round, seconds
    if kind == "sleep":
        row["formula_utilisation"] = {"1f1b": flush_utilisation(P, m), "paci": 1.0}
        row["sim_utilisation"] = {s: sim_utilisation(s, P, m, forward_s, backward_s)
                                  for s in SCHEDULES}
        row["sim_vs_formula_max_rel_diff"] = max(
            abs(row["sim_utilisation"][s] - row["formula_utilisation"][s])
            / row["formula_utilisation"][s] for s in SCHEDULES)
        for measured in ("utilisation", "compute_utilisation"):
            name = "measured" if measured == "utilisation" else "compute_only"
            row[f"sim_vs_{name}_max_rel_diff"] = max(
                abs(row["sim_utilisation"][s] - row[f"{s}_{measured}"]) / row[f"{s}_{measured}"]
                for s in SCHEDULES)
    return row


def machine() -> Dict[str, Any]:
    """The machine the numbers come from: CPU model, core count, library versions."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    import megatron.core

    return {"cpu": model, "cores": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__,
            "megatron_core": getattr(megatron.core, "__version__", "unknown")}


def _fmt_bytes(values: Sequence[int]) -> str:
    return "[" + ", ".join(f"{v / 1024:.0f}" for v in values) + "]"


def _ms(seconds: Optional[float]) -> str:
    return "n/a" if seconds is None else f"{seconds * 1e3:.3f}"


def markdown(rows: List[dict], overhead: Optional[dict]) -> str:
    """The results as markdown tables (times in ms, bytes in KiB)."""
    lines = ["| stages | P | m | 1F1B mb/s | PACI mb/s | ratio | ideal (m+P-1)/m | ratio/ideal "
             "| PACI overhead/mb (ms) | 1F1B overhead/mb (ms) | peak act. KiB per stage, PACI "
             "| 1F1B |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(
            f"| {r['kind']} | {r['P']} | {r['m']} | {r['1f1b_throughput_mb_per_s']:.2f} "
            f"| {r['paci_throughput_mb_per_s']:.2f} | {r['ratio']:.3f} | {r['ideal_ratio']:.3f} "
            f"| {r['ratio_over_ideal']:.3f} | {_ms(r['paci_overhead_per_microbatch_s'])} "
            f"| {_ms(r['1f1b_overhead_per_microbatch_s'])} "
            f"| {_fmt_bytes(r['paci_peak_activation_bytes'])} "
            f"| {_fmt_bytes(r['1f1b_peak_activation_bytes'])} |")
    sleep = [r for r in rows if r["kind"] == "sleep"]
    if sleep:
        lines += ["", "| P | m | 1F1B util. measured (compute only) | sim | formula m/(m+P-1) "
                  "| PACI util. measured (compute only) | sim | formula "
                  "| max rel. diff sim vs measured (compute only) | sim vs formula "
                  "| outside compute per mb (ms), PACI | 1F1B |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in sleep:
            lines.append(
                f"| {r['P']} | {r['m']} | {r['1f1b_utilisation']:.3f} "
                f"({r['1f1b_compute_utilisation']:.3f}) "
                f"| {r['sim_utilisation']['1f1b']:.3f} | {r['formula_utilisation']['1f1b']:.3f} "
                f"| {r['paci_utilisation']:.3f} ({r['paci_compute_utilisation']:.3f}) "
                f"| {r['sim_utilisation']['paci']:.3f} | {r['formula_utilisation']['paci']:.3f} "
                f"| {r['sim_vs_measured_max_rel_diff']:.3f} "
                f"({r['sim_vs_compute_only_max_rel_diff']:.3f}) "
                f"| {r['sim_vs_formula_max_rel_diff']:.3f} "
                f"| {_ms(r['paci_outside_compute_per_microbatch_s'])} "
                f"| {_ms(r['1f1b_outside_compute_per_microbatch_s'])} |")
    if overhead:
        lines += ["", f"One zero-cost stage, {overhead['m']} micro-batches per iteration: "
                  f"megatron-core's no-pipelining loop {overhead['megatron'] * 1e3:.3f} ms per "
                  f"micro-batch, PACI {overhead['paci'] * 1e3:.3f} ms: PACI adds "
                  f"{overhead['paci_minus_megatron_s'] * 1e3:.3f} ms per micro-batch."]
    return "\n".join(lines)


def interleaved_markdown(rows: List[dict]) -> str:
    """The interleaved 1F1B's table: measured against simulated seconds per iteration, and
    PACI's measured speed over it on the same stages."""
    if not rows:
        return ""
    lines = ["", "", "Megatron's interleaved 1F1B on the same controlled-time stages (v model "
             "chunks a stage, each 1/v of its time), seconds per iteration:", "",
             "| P | m | v | measured | simulator | formula (m + (P-1)/v)(F+B) | simulator vs "
             "measured | PACI measured | PACI / interleaved |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        paci = r.get("paci_s_per_iteration")
        lines.append(
            f"| {r['P']} | {r['m']} | {r['v']} | {r['measured_s_per_iteration']:.3f} | "
            f"{r['sim_s_per_iteration']:.3f} | {r['formula_s_per_iteration']:.3f} | "
            f"{r['sim_vs_measured_rel_diff']:.1%} | "
            + (f"{paci:.3f} | {r['paci_over_interleaved']:.3f} |" if paci else "- | - |"))
    return "\n".join(lines)


def check(rows: List[dict], overhead: Optional[dict]) -> List[str]:
    """The acceptance criteria that fail (empty when all hold): ratio >= 0.95 x ideal,
    overhead < 1 ms per micro-batch, peak activation bytes within 5 %, simulator within 5 %
    of the formula and the measurement (controlled-time stages only)."""
    bad = []
    for r in rows:
        if r["kind"] != "sleep":
            continue
        tag = f"P={r['P']} m={r['m']}"
        if r["ratio_over_ideal"] < 0.95:
            bad.append(f"{tag}: ratio {r['ratio']:.3f} < 0.95 x ideal {r['ideal_ratio']:.3f}")
        if r["paci_overhead_per_microbatch_s"] >= 1e-3:
            bad.append(f"{tag}: PACI overhead {r['paci_overhead_per_microbatch_s'] * 1e3:.3f} ms")
        if r["peak_bytes_max_rel_diff"] > 0.05:
            bad.append(f"{tag}: peak activation bytes differ by {r['peak_bytes_max_rel_diff']:.1%}")
        if r["sim_vs_formula_max_rel_diff"] > 0.05 or r["sim_vs_measured_max_rel_diff"] > 0.05:
            bad.append(f"{tag}: simulator utilisation off by {r['sim_vs_formula_max_rel_diff']:.1%}"
                       f" (formula) / {r['sim_vs_measured_max_rel_diff']:.1%} (measured)")
    if overhead and overhead["paci_minus_megatron_s"] >= 1e-3:
        bad.append(f"one stage: PACI adds {overhead['paci_minus_megatron_s'] * 1e3:.3f} ms")
    return bad


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _non_negative(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command line; prints the markdown tables and writes ``--output`` JSON."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--stages", type=_positive, nargs="*", default=[2, 4, 8],
                   help="pipeline sizes P of the controlled-time runs (>= 2)")
    p.add_argument("--microbatch-factors", type=_positive, nargs="+", default=[1, 2, 4],
                   help="m = factor x P")
    p.add_argument("--forward-ms", type=_non_negative, default=40.0)
    p.add_argument("--backward-ms", type=_non_negative, default=80.0)
    p.add_argument("--hidden-size", type=_positive, default=256)
    p.add_argument("--seq-length", type=_positive, default=32)
    p.add_argument("--micro-batch-size", type=_positive, default=4)
    p.add_argument("--warmup", type=_positive, default=1,
                   help="discarded iterations per round and schedule")
    p.add_argument("--iterations", type=_positive, default=2,
                   help="timed iterations per round and schedule")
    p.add_argument("--rounds", type=_positive, default=3,
                   help="alternations 1F1B, PACI; figures come from each one's fastest round")
    p.add_argument("--vocab", type=int, default=0,
                   help="controlled-time runs with a [V, h] embedding on the first stage and "
                        "output weight on the last, and Adam (0: neither, SGD)")
    p.add_argument("--tied", action="store_true",
                   help="with --vocab: the embedding and output weight are one tied weight")
    p.add_argument("--interleaved", type=_positive, nargs="*", default=[2],
                   help="model chunks v per stage of Megatron's interleaved 1F1B, run on the "
                        "same controlled-time stages (none: skip it)")
    p.add_argument("--gpt-stages", type=_positive, nargs="*", default=[2, 4],
                   help="pipeline sizes of the tiny-GPT comparison (none: skip it)")
    p.add_argument("--gpt-microbatch-factor", type=_positive, default=2)
    p.add_argument("--gpt-layers", type=_positive, default=8)
    p.add_argument("--gpt-hidden-size", type=_positive, default=64)
    p.add_argument("--overhead-microbatches", type=int, default=32,
                   help="micro-batches per iteration of the one-stage overhead run (0: skip)")
    p.add_argument("--overhead-iterations", type=_positive, default=20)
    p.add_argument("--timeout-s", type=float, default=900.0, help="per (P, m) run")
    p.add_argument("--output", default=None, help="write the results as JSON here")
    p.add_argument("--check", action="store_true",
                   help="exit 1 if an acceptance criterion fails")
    args = p.parse_args(argv)
    if args.tied and args.vocab < 1:
        p.error("--tied needs --vocab V (the tied weight's rows)")
    if any(P < 2 for P in list(args.stages) + list(args.gpt_stages)):
        p.error("--stages and --gpt-stages must be >= 2 (one stage has no pipeline)")
    if any(args.gpt_layers % P for P in args.gpt_stages):
        p.error(f"--gpt-layers {args.gpt_layers} must be divisible by every --gpt-stages value")

    from harness import run_distributed

    fwd, bwd = args.forward_ms / 1e3, args.backward_ms / 1e3
    common = {"warmup": args.warmup, "iterations": args.iterations, "rounds": args.rounds}
    rows = []
    for P in args.stages:
        for f in args.microbatch_factors:
            m = f * P
            cfg = dict(common, forward_s=fwd, backward_s=bwd, hidden=args.hidden_size,
                       seq=args.seq_length, mbs=args.micro_batch_size,
                       vocab=args.vocab, tied=args.tied)
            ranks = run_distributed(pipeline_case, P, "sleep", m, cfg, timeout_s=args.timeout_s)
            rows.append(summarise("sleep", P, m, ranks, fwd, bwd))
            print(f"> sleep P={P} m={m}: ratio {rows[-1]['ratio']:.3f} "
                  f"(ideal {rows[-1]['ideal_ratio']:.3f})", flush=True)
    interleaved = []
    for P in args.stages:
        for f in args.microbatch_factors:
            m = f * P
            cfg = dict(common, forward_s=fwd, backward_s=bwd, hidden=args.hidden_size,
                       seq=args.seq_length, mbs=args.micro_batch_size)
            for v in args.interleaved:
                ranks = run_distributed(interleaved_case, P, m, v, cfg, timeout_s=args.timeout_s)
                row = summarise_interleaved(P, m, v, ranks, fwd, bwd, args.iterations)
                paci = next((r for r in rows if r["kind"] == "sleep" and (r["P"], r["m"]) == (P, m)),
                            None)
                if paci is not None:  # the same stages under PACI, measured above
                    row["paci_s_per_iteration"] = paci["paci_wall_s"] / args.iterations
                    row["paci_over_interleaved"] = (row["measured_s_per_iteration"]
                                                    / row["paci_s_per_iteration"])
                interleaved.append(row)
                print(f"> interleaved P={P} m={m} v={v}: measured "
                      f"{row['measured_s_per_iteration']:.3f} s/iteration, simulated "
                      f"{row['sim_s_per_iteration']:.3f}", flush=True)
    for P in args.gpt_stages:
        m = args.gpt_microbatch_factor * P
        cfg = dict(common, hidden=args.gpt_hidden_size, seq=args.seq_length,
                   mbs=args.micro_batch_size, gpt_layers=args.gpt_layers, vocab=256)
        ranks = run_distributed(pipeline_case, P, "gpt", m, cfg, timeout_s=args.timeout_s)
        rows.append(summarise("gpt", P, m, ranks, fwd, bwd))
        print(f"> gpt P={P} m={m}: ratio {rows[-1]['ratio']:.3f} "
              f"(ideal {rows[-1]['ideal_ratio']:.3f})", flush=True)
    overhead = None
    if args.overhead_microbatches > 0:
        (overhead,) = run_distributed(overhead_case, 1, args.overhead_microbatches,
                                      args.overhead_iterations, 64, timeout_s=args.timeout_s)
        overhead["m"] = args.overhead_microbatches
    failures = check(rows, overhead)
    text = markdown(rows, overhead) + interleaved_markdown(interleaved)
    print(text)
    for line in failures:
        print(f"FAILED: {line}")
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, "w", encoding="utf-8") as f:
            json.dump({"machine": machine(), "settings": vars(args), "rows": rows,
                       "interleaved": interleaved,
                       "one_stage_overhead": overhead, "failed_criteria": failures}, f, indent=1)
    return 1 if (args.check and failures) else 0


if __name__ == "__main__":
    sys.exit(main())
