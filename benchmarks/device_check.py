"""One command for a machine with one GPU: what only a GPU can show about PACI.

    python benchmarks/device_check.py --output device_check.json        # one GPU, < 8 min
    python benchmarks/device_check.py --device cpu --output /tmp/d.json  # dry run (tests)

If megatron-core is not importable it is installed from the wheels in ``--wheels``
(default ``.whl/``, made here by ``bash benchmarks/fetch_device_wheels.sh`` for the GPU
machine's Python; no network needed there). Transformer Engine and Apex are not needed:
the layers are megatron-core's local spec with the fused kernels that are installed
(``gpt_recipe.model.available_fusions``). Five checks, one JSON report:

(a) PP = 1, bf16, GPT-2 Medium layers (hidden 1024, 16 heads, sequence 1024): the PACI
    schedule (a = m) against megatron-core's ``forward_backward_no_pipelining`` from the
    same weights, in alternating rounds (each round both schedules, the first alternating):
    the losses of every iteration (must be identical), seconds per iteration from CUDA
    events (median and min-max over >= 20 iterations each, the per-round ratio of
    medians), and the CUDA kernel time of one profiled iteration of each
    (``torch.profiler``) beside its wall time: where the kernels take the same time, a
    difference in wall time is the host's.
(b) A single-process replay of a 4-stage PACI plan (:func:`paci_megatron.sim.stage_actions`)
    on the device in bf16, weights updated in place while micro-batches are in flight
    (version counters restored as the optimizer wrapper does): no autograd version error,
    and the bits of a replay that recomputes each backward with the current weights (the
    semantics the CPU tests pin), but not those of one with forward-time weights.
(c) Host syncs in (a)'s steady state (``Tensor.item`` / ``bool`` / ``.cpu`` / ... calls),
    each charged to the module that made it (outside torch's own package folder): the
    schedule's own (must be 0), the wrapper's per update, megatron-core's per iteration
    for both schedules; on CUDA also the warnings of ``torch.cuda.set_sync_debug_mode``.
(d) Forward / backward seconds of GPT-2 Medium stages (3 layers; the first with the
    embedding, the last with the output layer and loss; sequence 1024, micro-batch 16 and
    32), fed to :func:`paci_megatron.sim.simulate` for the paper's P = 8, m = a = 8:
    projected PACI / 1F1B throughput, p2p costed as activation bytes over assumed link
    speeds (NCCL point-to-point needs two devices: one GPU cannot measure it).
(e) The recipe end to end: ``torchrun --nproc-per-node 1 examples/pretrain_gpt.py --device
    cuda`` at PP 1 with
    ``--pipeline-schedule paci`` and ``1f1b`` (a GPT-2 Small-width model, bf16, real
    text), the same losses at every iteration and evaluation expected.

(f) Time to accuracy at P = 8 on one device (``--checks f``, its own call: about 7 minutes
    on an H200): a GPT-2 Small shape (12 layers, hidden 768, sequence 1024) on real text,
    P = 8, m = a = 8, every rank of each run in this one process
    (``examples/pretrain_gpt.py --emulate-pipeline``, the P-process run's losses bit for
    bit), 1F1B and PACI with AdamW (PACI with the synchronous warm-up and the look-ahead)
    and with Muon, one seed each, each schedule on its own best split
    (:func:`paci_megatron.sim.balance`) from stage times measured here (the update is
    AdamW's for every arm). The projected time axis and the per-seed-pair TTA are
    ``benchmarks/time_to_accuracy.py``'s.

``--device cpu`` runs the same code at toy sizes in under a minute (so it cannot rot);
its timings mean nothing.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from typing import Any, Dict, List, Optional, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for path in (ROOT, os.path.join(ROOT, "examples")):  # paci_megatron, gpt_recipe
    if path not in sys.path:
        sys.path.insert(0, path)

#: sizes per device: (a)/(c) model and rounds, (b) replay width, (d) stage shapes, (e) recipe
SIZES = {
    "cuda": dict(layers=6, hidden=1024, heads=16, seq=1024, vocab=50304, mbs=4, m=8,
                 warmup=2, rounds=5, iters_per_round=4, sync_iters=2, width=1024,
                 stage_layers=3, stage_mbs=(16, 32), repeats=5,
                 recipe=["--num-layers", "12", "--hidden-size", "768", "--num-attention-heads",
                         "12", "--seq-length", "512", "--micro-batch-size", "8",
                         "--global-batch-size", "32", "--bf16", "--eval-iters", "2"],
                 recipe_iters=30, recipe_timeout_s=240,
                 # (f): GPT-2 Small's shape; AdamW at GPT-3's rate for it, Muon at 4x (the
                 # CPU studies' best Muon rates were 4x to 8x their best AdamW rates; the low end)
                 tta=dict(layers=12, hidden=768, heads=12, seq=1024, mbs=4, gbs=32,
                          iters=120, eval_interval=20, eval_iters=2, warmup=12,
                          lr={"adam": 6e-4, "muon": 2.4e-3}, timeout_s=150)),
    "cpu": dict(layers=2, hidden=64, heads=4, seq=32, vocab=128, mbs=2, m=4,
                warmup=1, rounds=2, iters_per_round=2, sync_iters=1, width=16,
                stage_layers=1, stage_mbs=(2, 4), repeats=2,
                recipe=["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4",
                        "--seq-length", "32", "--micro-batch-size", "2",
                        "--global-batch-size", "4", "--eval-iters", "1"],
                recipe_iters=3, recipe_timeout_s=240,
                tta=dict(layers=8, hidden=32, heads=4, seq=32, mbs=2, gbs=16, iters=4,
                         eval_interval=2, eval_iters=1, warmup=1,
                         lr={"adam": 3e-3, "muon": 1e-2}, timeout_s=240)),
}
TTA_ARMS = ("1f1b-adam", "paci-adam-sync-lookahead", "1f1b-muon", "paci-muon")
LINK_GBPS = (25.0, 150.0)  # inter-node InfiniBand (200 Gb/s) and NVLink, GB/s per direction
LINK_LATENCY_S = 10e-6
SCHEDULE_OWN = ("paci_megatron/schedule.py", "paci_megatron/p2p.py", "paci_megatron/plan.py")


def ensure_megatron_core(wheels: str) -> str:
    """Import megatron-core, installing it from ``wheels`` first if needed; its version.

    Raises:
        RuntimeError: not installed and the wheels folder is missing or does not install.
    """
    try:
        return importlib.import_module("megatron.core").__version__
    except ImportError:
        pass
    if not os.path.isdir(wheels):
        raise RuntimeError(f"megatron-core is not installed and {wheels} does not exist: "
                           "run bash benchmarks/fetch_device_wheels.sh where there is network")
    cmd = [sys.executable, "-m", "pip", "install", "--no-index", "--find-links", wheels,
           "megatron-core", "numpy", "packaging"]
    if subprocess.run(cmd).returncode != 0:
        raise RuntimeError(f"installing megatron-core from {wheels} failed: {' '.join(cmd)}")
    importlib.invalidate_caches()
    return importlib.import_module("megatron.core").__version__


def ensure_muon(wheels: str) -> None:
    """Make megatron-core's Muon importable (``emerging-optimizers`` and ``absl-py``, pure
    Python), installing them from ``wheels`` if needed.

    Raises:
        RuntimeError: not installed and they do not install from ``wheels``.
    """
    if importlib.util.find_spec("emerging_optimizers") is not None:
        return
    cmd = [sys.executable, "-m", "pip", "install", "--no-index", "--find-links", wheels,
           "--no-deps", "--ignore-requires-python", "emerging-optimizers", "absl-py"]
    if not os.path.isdir(wheels) or subprocess.run(cmd).returncode != 0:
        raise RuntimeError(f"Muon needs emerging-optimizers and absl-py: {' '.join(cmd)} "
                           "failed (bash benchmarks/fetch_device_wheels.sh fetches them)")
    importlib.invalidate_caches()


def setup(device: str) -> None:
    """World of one process (NCCL on CUDA, gloo on CPU) and megatron-core's parallel state."""
    import torch
    from megatron.core import parallel_state as ps

    from harness import free_port
    from paci_megatron import compat

    kwargs: Dict[str, Any] = {}
    if device == "cpu":
        from paci_megatron.cpu import enable_cpu_mode

        enable_cpu_mode(force=True)
    else:
        torch.cuda.set_device(0)
        kwargs = compat.init_device_kwargs(torch.device("cuda", 0))
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    torch.distributed.init_process_group("nccl" if device == "cuda" else "gloo", rank=0,
                                         world_size=1, timeout=datetime.timedelta(seconds=120),
                                         **kwargs)
    ps.initialize_model_parallel(1, 1)


def _seed(seed: int) -> None:
    from harness import seed_all

    seed_all(seed)


def _config(size: Dict[str, Any], device: str, num_layers: int):
    """The recipe's ``TransformerConfig``: bf16, fused kernels by availability."""
    from gpt_recipe import model as gpt

    return gpt.transformer_config(num_layers=num_layers, hidden_size=size["hidden"],
                                  num_attention_heads=size["heads"], bf16=True,
                                  on_gpu=device == "cuda")


def _batch(size: Dict[str, Any], j: int, device: str) -> Dict[str, Any]:
    """Micro-batch ``j`` of random tokens (the same for every schedule), on ``device``."""
    import torch

    g = torch.Generator().manual_seed(j)
    seq = torch.randint(0, size["vocab"], (size["mbs"], size["seq"] + 1), generator=g)
    batch = {"tokens": seq[:, :-1], "labels": seq[:, 1:],
             "loss_mask": torch.ones(size["mbs"], size["seq"]),
             "position_ids": torch.arange(size["seq"]).expand(size["mbs"], -1)}
    return {k: v.to(device) for k, v in batch.items()}


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def spread(values: Sequence[float]) -> Dict[str, float]:
    """``{"median", "min", "max", "n"}`` of ``values``."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "n": len(values)}


class _Timer:
    """Seconds of each timed region: CUDA events on a GPU (read after a synchronize at the
    end of a round), the host clock around a synchronize on the CPU."""

    def __init__(self, device: str):
        self.device, self.pending, self.seconds = device, [], []

    def region(self):
        timer = self

        class Region:
            def __enter__(self):
                import torch

                if timer.device == "cuda":
                    self.events = (torch.cuda.Event(enable_timing=True),
                                   torch.cuda.Event(enable_timing=True))
                    self.events[0].record()
                else:
                    self.t0 = time.perf_counter()
                return self

            def __exit__(self, *exc):
                if timer.device == "cuda":
                    self.events[1].record()
                    timer.pending.append(self.events)
                else:
                    timer.seconds.append(time.perf_counter() - self.t0)

        return Region()

    def collect(self) -> List[float]:
        """Seconds of the regions since the last collect."""
        if self.device == "cuda":
            _sync(self.device)
            self.seconds += [a.elapsed_time(b) / 1e3 for a, b in self.pending]
            self.pending = []
        out, self.seconds = self.seconds, []
        return out


# ------------------------------------------------------------------ (a) + (c)
class _Arm:
    """One schedule on its own model copy, iterating over the shared micro-batches."""

    def __init__(self, name: str, size: Dict[str, Any], device: str):
        import torch
        from megatron.core.distributed import finalize_model_grads
        from megatron.core.pipeline_parallel import get_forward_backward_func

        import paci_megatron as pm
        from gpt_recipe import model as gpt

        _seed(1234)
        cfg = _config(size, device, size["layers"])
        self.model = gpt.build_model(cfg, vocab_size=size["vocab"],
                                     max_position_embeddings=size["seq"],
                                     device=gpt.stage_device(device))
        opt = gpt.build_optimizer(self.model, lr=1e-4, clip_grad=1.0, bf16=True, weight_decay=0.1)
        if name == "megatron":
            cfg.finalize_model_grads_func = finalize_model_grads
            cfg.no_sync_func = self.model[0].no_sync
            self.schedule = get_forward_backward_func()
            self.optimizer = opt
        else:
            self.optimizer = pm.PACIOptimizer(opt, self.model)
            self.schedule = pm.PACISchedule(self.optimizer)
        self.name, self.size, self.device = name, size, device
        self.next_microbatch, self.losses = 0, []
        self.tokens_per_iteration = size["m"] * size["mbs"] * size["seq"]
        self._torch = torch

    def iteration(self) -> None:
        """One training iteration, Megatron's ``train_step`` around the schedule."""
        from gpt_recipe import model as gpt

        m, first = self.size["m"], self.next_microbatch
        batches = iter([_batch(self.size, j, self.device) for j in range(first, first + m)])
        self.next_microbatch += m
        self.model[0].zero_grad_buffer()
        self.optimizer.zero_grad()
        out = self.schedule(forward_step_func=gpt.forward_step, data_iterator=batches,
                            model=self.model, num_microbatches=m, seq_length=self.size["seq"],
                            micro_batch_size=self.size["mbs"], forward_only=False)
        self.optimizer.step()
        self.losses.append(out)

    def float_losses(self) -> List[List[float]]:
        return [[float(d["lm loss"]) for d in out] for out in self.losses]


def _profile(arm: _Arm, device: str) -> Dict[str, Optional[float]]:
    """One iteration under ``torch.profiler``: its CUDA kernel seconds (sum of every
    kernel's own time) and its wall seconds."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    timer = _Timer(device)
    with profile(activities=activities) as prof:
        with timer.region():
            arm.iteration()
        _sync(device)
    kernel = None
    if device == "cuda":  # every kernel, copy and set on the device, by its own duration
        from torch.autograd import DeviceType

        kernel = sum(e.time_range.elapsed_us() for e in prof.events()
                     if e.device_type == DeviceType.CUDA) / 1e6
    return {"kernel_seconds": kernel, "wall_seconds": timer.collect()[0]}


def check_pp1(size: Dict[str, Any], device: str) -> Dict[str, Any]:
    """(a) and (c): PACI vs megatron-core's no-pipelining schedule on one device."""
    import torch

    from harness import HostSyncCounter

    arms = {name: _Arm(name, size, device) for name in ("megatron", "paci")}
    for arm in arms.values():  # warm-up: compilation, allocator, first-touch
        for _ in range(size["warmup"]):
            arm.iteration()
    _sync(device)
    seconds: Dict[str, List[float]] = {name: [] for name in arms}
    round_ratio = []
    for r in range(size["rounds"]):
        order = ("megatron", "paci") if r % 2 == 0 else ("paci", "megatron")
        medians = {}
        for name in order:
            timer = _Timer(device)
            for _ in range(size["iters_per_round"]):
                with timer.region():
                    arms[name].iteration()
            got = timer.collect()
            seconds[name] += got
            medians[name] = statistics.median(got)
        round_ratio.append(medians["megatron"] / medians["paci"])
    report: Dict[str, Any] = {
        "model": {k: size[k] for k in ("layers", "hidden", "heads", "seq", "mbs", "m")},
        "rounds": size["rounds"], "iterations_per_round": size["iters_per_round"]}
    for name, arm in arms.items():
        per_it = spread(seconds[name])
        report[name] = {"seconds_per_iteration": per_it,
                        "tokens_per_second": arm.tokens_per_iteration / per_it["median"],
                        "profiled_iteration": _profile(arm, device)}
    report["tokens_per_second_ratio"] = {
        "of_medians": report["megatron"]["seconds_per_iteration"]["median"]
        / report["paci"]["seconds_per_iteration"]["median"], "per_round": spread(round_ratio)}
    kernels = [report[n]["profiled_iteration"]["kernel_seconds"] for n in ("paci", "megatron")]
    report["kernel_time_ratio"] = kernels[0] / kernels[1] if None not in kernels else None
    # (c): steady-state host syncs, by module
    syncs: Dict[str, Dict[str, int]] = {}
    debug = 0
    for name, arm in arms.items():
        with HostSyncCounter() as counter, warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if device == "cuda" and name == "paci":
                torch.cuda.set_sync_debug_mode("warn")
            try:
                for _ in range(size["sync_iters"]):
                    arm.iteration()
            finally:
                if device == "cuda":
                    torch.cuda.set_sync_debug_mode("default")
        syncs[name] = counter.counts
        if name == "paci":
            debug = sum("synchroniz" in str(w.message) for w in caught)
    iters = size["sync_iters"]
    paci = syncs["paci"]
    report["host_syncs"] = {
        "iterations": iters, "updates": iters,
        "by_source": syncs,
        "schedule_own": sum(n for k, n in paci.items() if k.startswith(SCHEDULE_OWN)),
        "wrapper_per_update": sum(n for k, n in paci.items()
                                  if k.startswith("paci_megatron/optimizer.py")) / iters,
        "megatron_core_per_iteration": {
            name: sum(n for k, n in counts.items() if k.startswith("megatron/")) / iters
            for name, counts in syncs.items()},
        "sync_debug_warnings": debug if device == "cuda" else None}
    for name, arm in arms.items():
        report[name]["losses"] = arm.float_losses()
    report["losses_identical"] = report["paci"]["losses"] == report["megatron"]["losses"]
    del arms
    if device == "cuda":
        torch.cuda.empty_cache()
    return report


# ------------------------------------------------------------------ (b)
def replay(device: str, width: int, mode: str, P: int = 4, m: int = 4, a: int = 2,
           calls: int = 3, lr: float = 2.0 ** -4) -> Dict[str, Any]:
    """Run every stage's PACI actions in one process, bf16 Linear stages on ``device``.

    ``mode``: ``"inplace"`` (update the weights in place with micro-batches in flight and
    restore the version counters, as :class:`~paci_megatron.PACIOptimizer` does),
    ``"recompute"`` (each backward recomputes its stage with the current weights) or
    ``"stash"`` (backward with the forward-time weights). Returns the final weights and
    every input gradient, as lists of tensors on the CPU.

    Raises:
        RuntimeError: autograd's version check (``"inplace"`` without the restore never
            gets here: the wrapper's restore is what this exercises).
    """
    import torch

    from paci_megatron import compat
    from paci_megatron.plan import Kind
    from paci_megatron.sim import stage_actions

    g = torch.Generator().manual_seed(7)
    weights = [(torch.randn(width, width, generator=g) / width ** 0.5).to(device, torch.bfloat16)
               .requires_grad_() for _ in range(P)]
    inputs = [torch.randn(8, width, generator=g).to(device, torch.bfloat16) for _ in range(m * calls)]
    plans = [stage_actions("paci", P, s, m, calls, a) for s in range(P)]  # calls, then a drain
    pos, acts_in, grads_in, saved, input_grads = [0] * P, {}, {}, {}, []
    while any(pos[s] < len(plans[s]) for s in range(P)):
        progressed = False
        for s in range(P):
            if pos[s] == len(plans[s]):
                continue
            act, w = plans[s][pos[s]], weights[s]
            if act.kind is Kind.FORWARD:
                if s > 0 and (s - 1, act.index) not in acts_in:
                    continue
                x = inputs[act.index] if s == 0 else acts_in.pop((s - 1, act.index))
                x = x.detach().requires_grad_(s > 0)
                weight = w.detach().clone().requires_grad_() if mode == "stash" else w
                y = x @ weight.t()
                saved[(s, act.index)] = (x, y, weight)
                if s < P - 1:
                    acts_in[(s, act.index)] = y.detach()
            elif act.kind is Kind.BACKWARD:
                if s < P - 1 and (s + 1, act.index) not in grads_in:
                    continue
                x, y, weight = saved.pop((s, act.index))
                if mode == "recompute":
                    y = x @ w.t()
                grad = (y.detach() / y.numel() if s == P - 1  # d(0.5 mean y^2)/dy
                        else grads_in.pop((s + 1, act.index)))
                y.backward(grad)
                if weight is not w:  # stash: the forward-time copy's gradient is the stage's
                    w.grad = weight.grad if w.grad is None else w.grad + weight.grad
                if s > 0:
                    grads_in[(s, act.index)] = x.grad
                    input_grads.append(x.grad.float().cpu())
            else:
                with torch.no_grad():
                    version = [w._version]
                    w.sub_(w.grad, alpha=lr)
                    compat.set_version_counters([w], version)
                w.grad = None
            pos[s] += 1
            progressed = True
        if not progressed:
            raise RuntimeError("the replay deadlocked: the plan's dependencies never resolve")
    return {"weights": [w.detach().float().cpu() for w in weights], "input_grads": input_grads}


def check_replay(device: str, width: int) -> Dict[str, Any]:
    """(b): in-place PACI replay == recompute-with-current-weights replay, != stash."""
    import torch

    out: Dict[str, Any] = {"stages": 4, "microbatches_per_call": 4, "accumulation": 2,
                           "dtype": "bfloat16"}
    try:
        inplace = replay(device, width, "inplace")
    except RuntimeError as exc:
        return {**out, "version_error": str(exc), "equals_current_weights": False}
    current, stash = replay(device, width, "recompute"), replay(device, width, "stash")

    def same(x, y):
        return all(torch.equal(p, q) for p, q in zip(x["weights"] + x["input_grads"],
                                                     y["weights"] + y["input_grads"]))

    return {**out, "version_error": None, "equals_current_weights": same(inplace, current),
            "differs_from_forward_time_weights": not same(inplace, stash)}


# ------------------------------------------------------------------ (d)
def stage_seconds(size: Dict[str, Any], device: str, mbs: int) -> Dict[str, List[float]]:
    """Median forward / backward seconds of the first, a middle and the last GPT-2 Medium
    stage (``stage_layers`` layers each) at micro-batch ``mbs``, and of an AdamW update of
    each stage's fp32 main weights (as Megatron's mixed-precision optimizer keeps)."""
    import torch
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt import gpt_layer_specs as specs

    out: Dict[str, List[float]] = {"forward_s": [], "backward_s": [], "update_s": []}
    seq, hidden = size["seq"], size["hidden"]
    for pre, post in ((True, False), (False, False), (False, True)):
        _seed(1234)
        cfg = _config(size, device, size["stage_layers"])
        stage = GPTModel(config=cfg, transformer_layer_spec=specs.get_gpt_layer_local_spec(),
                         vocab_size=size["vocab"], max_sequence_length=seq, pre_process=pre,
                         post_process=post, share_embeddings_and_output_weights=False)
        stage = stage.to(device=device, dtype=torch.bfloat16)
        tokens = torch.randint(0, size["vocab"], (mbs, seq), device=device)
        positions = torch.arange(seq, device=device).expand(mbs, -1)
        hidden_in = torch.randn(seq, mbs, hidden, device=device, dtype=torch.bfloat16,
                                requires_grad=True)
        main = [p.detach().float().requires_grad_() for p in stage.parameters()]
        adam = torch.optim.AdamW(main, lr=1e-4)
        times = {"forward_s": [], "backward_s": [], "update_s": []}
        for r in range(size["repeats"] + 2):
            if not pre:
                stage.set_input_tensor(hidden_in)
            _sync(device)
            t0 = time.perf_counter()
            y = stage(tokens, positions, None, labels=tokens if post else None)
            _sync(device)
            t1 = time.perf_counter()
            (y.float().mean() if post else y).backward(None if post else torch.ones_like(y))
            _sync(device)
            t2 = time.perf_counter()
            for p, q in zip(main, stage.parameters()):
                p.grad = q.grad.float()
            adam.step()
            _sync(device)
            t3 = time.perf_counter()
            stage.zero_grad(set_to_none=True)
            if r >= 2:
                for key, value in zip(times, (t1 - t0, t2 - t1, t3 - t2)):
                    times[key].append(value)
        for key, values in times.items():
            out[key].append(statistics.median(values))
        del stage, adam, main
    return out


def check_projection(size: Dict[str, Any], device: str, P: int = 8, m: int = 8,
                     iterations: int = 16) -> Dict[str, Any]:
    """(d): stage times -> simulated PACI / 1F1B throughput for P = 8, m = a = 8."""
    from paci_megatron.sim import simulate

    rows = []
    for mbs in size["stage_mbs"]:
        t = stage_seconds(size, device, mbs)
        per_stage = {k: [v[0]] + [v[1]] * (P - 2) + [v[2]] for k, v in t.items()}
        activation_bytes = size["seq"] * mbs * size["hidden"] * 2  # bf16 [s, b, h]
        for gbps in LINK_GBPS:
            comm = LINK_LATENCY_S + activation_bytes / (gbps * 1e9)
            runs = {s: simulate(s, P, m, iterations, per_stage["forward_s"],
                                per_stage["backward_s"], comm, per_stage["update_s"])
                    for s in ("1f1b", "paci")}
            rows.append({"micro_batch": mbs, "link_GBps": gbps, "comm_s": comm,
                         "stage_seconds": t, "activation_bytes": activation_bytes,
                         "bubble_1f1b": runs["1f1b"].bubble_fraction,
                         "bubble_paci": runs["paci"].bubble_fraction,
                         "paci_over_1f1b_throughput": runs["1f1b"].makespan / runs["paci"].makespan})
    return {"stages": P, "microbatches": m, "accumulation": m, "iterations": iterations,
            "layers_per_stage": size["stage_layers"],
            "note": "NCCL point-to-point needs two devices: p2p is costed from the activation "
                    "bytes at assumed link speeds, not measured", "rows": rows}


# ------------------------------------------------------------------ (e)
def check_recipe(size: Dict[str, Any], device: str, data_cache_dir: str,
                 data_path: Optional[str] = None) -> Dict[str, Any]:
    """(e): ``examples/pretrain_gpt.py --device <device>`` at PP 1, PACI and 1F1B, one after
    the other on the same data: the losses of every iteration and evaluation, and the
    recipe's own tokens/s (host clock over each log interval; indicative only)."""
    iters = size["recipe_iters"]
    out: Dict[str, Any] = {"flags": size["recipe"], "train_iters": iters}
    with tempfile.TemporaryDirectory() as tmp:
        for schedule in ("paci", "1f1b"):
            log = os.path.join(tmp, f"{schedule}.jsonl")
            data = ["--data-path", data_path] if data_path else ["--data-cache-dir", data_cache_dir]
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1",
                   os.path.join(ROOT, "examples", "pretrain_gpt.py"), "--device", device, "--pipeline-model-parallel-size", "1",
                   "--pipeline-schedule", schedule, *size["recipe"], "--train-iters", str(iters),
                   "--log-interval", "1", "--eval-interval", str(iters), "--log-json", log, *data]
            t0 = time.time()
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT,
                                  timeout=size["recipe_timeout_s"])
            run: Dict[str, Any] = {"returncode": proc.returncode,
                                   "seconds": round(time.time() - t0, 1)}
            if proc.returncode != 0:
                run["error"] = (proc.stdout[-1500:] + proc.stderr[-3000:]).strip()
                out[schedule] = run
                continue
            records = [json.loads(line) for line in open(log) if line.strip()]
            run["lm_loss"] = [r["lm_loss"] for r in records if r.get("lm_loss") is not None]
            run["val_loss"] = [r["val_loss"] for r in records if r.get("val_loss") is not None]
            speed = [r["tokens_per_second"] for r in records[3:] if r.get("tokens_per_second")]
            run["tokens_per_second"] = spread(speed) if speed else None
            run["last_line"] = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
            out[schedule] = run
    ok = all(out[s].get("returncode") == 0 for s in ("paci", "1f1b"))
    out["losses_identical"] = ok and all(out["paci"][k] == out["1f1b"][k]
                                         for k in ("lm_loss", "val_loss"))
    if not ok:
        out["error"] = "a recipe run failed: see its 'error'"
    return out


# ------------------------------------------------------------------ (f)
def check_tta(size: Dict[str, Any], device: str, data_cache_dir: str,
              data_path: Optional[str] = None, P: int = 8) -> Dict[str, Any]:
    """(f): stage times of ``size["tta"]``'s model on ``device``, each schedule's best split,
    then one emulated run per arm of :data:`TTA_ARMS` (``--emulate-pipeline``) and
    ``time_to_accuracy``'s analysis of their curves on the projected time axis."""
    import dataclasses

    import time_to_accuracy as tta
    from gpt_recipe import data

    t = size["tta"]
    prefix = data_path or os.path.join(data_cache_dir, "stdlib")
    if data_path is None:
        data.prepare_corpus(prefix)
    from tokenizers import Tokenizer

    vocab = Tokenizer.from_file(data.tokenizer_path_for_prefix(prefix)).get_vocab_size()
    vocab = -(-vocab // 128) * 128  # the recipe pads to a multiple of 128
    shape = dict(size, hidden=t["hidden"], heads=t["heads"], seq=t["seq"], vocab=vocab,
                 stage_layers=t["layers"] // P)
    measured = stage_seconds(shape, device, t["mbs"])  # first, middle, last stage
    per_stage = {k: [v[0]] + [v[1]] * (P - 2) + [v[2]] for k, v in measured.items()}
    activation_bytes = t["seq"] * t["mbs"] * t["hidden"] * (2 if device == "cuda" else 4)
    times = {"forward_s": per_stage["forward_s"], "backward_s": per_stage["backward_s"],
             "update_adam_s": per_stage["update_s"], "update_muon_s": per_stage["update_s"],
             "comm_s": LINK_LATENCY_S + activation_bytes / (max(LINK_GBPS) * 1e9)}
    regime = tta.Regime(f"device {device}: {t['layers']} layers, hidden {t['hidden']}, "
                        f"sequence {t['seq']}, P = {P}, m = {t['gbs'] // t['mbs']}",
                        stages=P, num_layers=t["layers"], hidden=t["hidden"], heads=t["heads"],
                        seq=t["seq"], mbs=t["mbs"], gbs=t["gbs"], train_iters=t["iters"],
                        lr_warmup_iters=t["warmup"], eval_interval=t["eval_interval"],
                        eval_iters=t["eval_iters"], lrs=(t["lr"]["adam"],), seeds=(1234,),
                        clip_grad=1.0, arms=TTA_ARMS, balanced=True, emulate=True)
    times = tta.with_balanced_splits(regime, times)
    runs: Dict[str, Any] = {}
    out: Dict[str, Any] = {"regime": dataclasses.asdict(regime), "stage_times": times,
                           "runs": runs}
    with tempfile.TemporaryDirectory() as tmp:
        for name in TTA_ARMS:
            arm = tta.ARMS[name]
            lr = t["lr"][arm.optimizer]
            log = os.path.join(tmp, f"{name}.jsonl")
            cmd = tta.recipe_command(regime, arm, lr, 1234, t["iters"], log, data_cache_dir, 0,
                                     times["splits"][arm.schedule])
            cmd[cmd.index("--device") + 1] = device
            cmd += ["--data-path", prefix] + (["--bf16"] if device == "cuda" else [])
            t0 = time.time()
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT,
                                  timeout=t["timeout_s"],
                                  env=dict(os.environ, PYTHONWARNINGS="ignore"))
            curve = tta.read_curve(log) if proc.returncode == 0 else None
            runs[name] = {"lr": lr, "returncode": proc.returncode,
                          "seconds": round(time.time() - t0, 1), "curve": curve,
                          "command": " ".join(tta.display_command(cmd))}
            if not curve:
                runs[name]["error"] = (proc.stdout[-1500:] + proc.stderr[-3000:]).strip()
    if any("error" in r for r in runs.values()):
        out["error"] = "a run failed: see its 'error'"
        return out
    iterations = {n: t["iters"] for n in TTA_ARMS}
    result = tta.analyse(regime, times, iterations,
                         {n: {r["lr"]: {1234: r["curve"]}} for n, r in runs.items()})
    out["table"] = tta.markdown(result)
    out["arms"] = result["arms"]
    out["reference"] = result["reference"]
    return out


def main(argv: Sequence[str] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--output", default="device_check.json", help="JSON report path")
    parser.add_argument("--wheels", default=os.path.join(ROOT, ".whl"),
                        help="folder of wheels to install megatron-core from (no network)")
    parser.add_argument("--data-cache-dir", default=os.path.join(ROOT, "data", "stdlib"),
                        help="(e): where the recipe prepares its default corpus")
    parser.add_argument("--data-path", default=None,
                        help="(e): an already prepared Megatron data prefix to train on instead")
    parser.add_argument("--checks", default="abcde",
                        help="which checks to run, by letter (default abcde; f, the time to "
                             "accuracy, is its own call)")
    args = parser.parse_args(argv)
    start = time.time()
    report: Dict[str, Any] = {"device": args.device,
                              "megatron_core": ensure_megatron_core(args.wheels)}
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device: run with --device cpu for the dry run")
    report.update(torch=torch.__version__, python=sys.version.split()[0],
                  gpu=torch.cuda.get_device_name(0) if args.device == "cuda" else None)
    size = SIZES[args.device]
    checks = {"a": ("pp1", lambda: check_pp1(size, args.device)),
              "b": ("replay", lambda: check_replay(args.device, size["width"])),
              "d": ("projection", lambda: check_projection(size, args.device)),
              "e": ("recipe", lambda: check_recipe(size, args.device, args.data_cache_dir,
                                                   args.data_path)),
              "f": ("time_to_accuracy", lambda: (ensure_muon(args.wheels), check_tta(
                  size, args.device, args.data_cache_dir, args.data_path))[1])}
    wanted = [checks[c] for c in "abdef" if c in args.checks]
    if any(key != "recipe" for key, _ in wanted):  # (f) times its stages here
        setup(args.device)
    for key, check in wanted:
        t0 = time.time()
        try:
            report[key] = check()
        except Exception as exc:  # one failed check still reports the others
            report[key] = {"error": f"{type(exc).__name__}: {exc}"}
        report[key]["seconds"] = round(time.time() - t0, 1)
        print(f"{key}: {json.dumps(report[key], default=str)[:600]}", flush=True)
        report["seconds"] = round(time.time() - start, 1)
        with open(args.output, "w") as f:  # after each check: a cut-short run keeps the rest
            json.dump(report, f, indent=1, default=str)
    print(f"wrote {args.output} in {report['seconds']} s")
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return 0 if all("error" not in report[key] for key, _ in wanted) else 1


if __name__ == "__main__":
    sys.exit(main())
