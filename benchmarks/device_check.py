"""One command for a machine with one GPU: what only a GPU can show about PACI.

    python benchmarks/device_check.py --output device_check.json        # one GPU, < 8 min
    python benchmarks/device_check.py --device cpu --output /tmp/d.json  # dry run (tests)

If megatron-core is not importable it is installed from the wheels in ``--wheels``
(default ``.whl/``, made here by ``bash benchmarks/fetch_device_wheels.sh`` for the GPU
machine's Python; no network needed there). Transformer Engine and Apex are not used:
the layers are megatron-core's local spec. Four checks, one JSON report:

(a) PP = 1, bf16, GPT-2 Medium layers (hidden 1024, 16 heads, sequence 1024): the PACI
    schedule (a = m) against megatron-core's ``forward_backward_no_pipelining`` from the
    same weights: per-iteration losses (must be identical) and tokens/s of each.
(b) A single-process replay of a 4-stage PACI plan (:func:`paci_megatron.sim.stage_actions`)
    on the device in bf16, weights updated in place while micro-batches are in flight
    (version counters restored as the optimizer wrapper does): no autograd version error,
    and the bits of a replay that recomputes each backward with the current weights (the
    semantics the CPU tests pin), but not those of one with forward-time weights.
(c) Host syncs in (a)'s PACI steady state, by source: every ``Tensor.item`` / ``bool`` /
    ``.cpu`` / ... call counted per micro-batch and per update, and on CUDA the warnings of
    ``torch.cuda.set_sync_debug_mode("warn")``. The schedule's own must be 0.
(d) Forward / backward seconds of GPT-2 Medium stages (3 layers; the first with the
    embedding, the last with the output layer and loss; sequence 1024, micro-batch 16 and
    32), fed to :func:`paci_megatron.sim.simulate` for the paper's P = 8, m = a = 8:
    projected PACI / 1F1B throughput, p2p costed as activation bytes over assumed link
    speeds (NCCL point-to-point needs two devices: one GPU cannot measure it).

``--device cpu`` runs the same code at toy sizes in seconds (so it cannot rot); its
timings mean nothing.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import subprocess
import sys
import time
import warnings
from typing import Any, Dict, List, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for path in (ROOT, os.path.join(ROOT, "examples"), os.path.join(ROOT, "tests")):
    if path not in sys.path:
        sys.path.insert(0, path)

#: sizes per device: (a)/(c) model and run, (d) stage shapes, (b) replay width
SIZES = {
    "cuda": dict(layers=6, hidden=1024, heads=16, seq=1024, vocab=50304, mbs=4, m=8,
                 iters=6, stage_layers=3, stage_mbs=(16, 32), repeats=5, width=1024),
    "cpu": dict(layers=2, hidden=64, heads=4, seq=32, vocab=128, mbs=2, m=4,
                iters=3, stage_layers=1, stage_mbs=(2, 4), repeats=2, width=16),
}
LINK_GBPS = (25.0, 150.0)  # inter-node InfiniBand (200 Gb/s) and NVLink, GB/s per direction
LINK_LATENCY_S = 10e-6


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


def setup(device: str) -> None:
    """World of one process (NCCL on CUDA, gloo on CPU) and megatron-core's parallel state."""
    import torch
    from megatron.core import parallel_state as ps

    if device == "cpu":
        from paci_megatron.cpu import enable_cpu_mode

        enable_cpu_mode(force=True)
    else:
        torch.cuda.set_device(0)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    from harness import free_port

    os.environ.setdefault("MASTER_PORT", str(free_port()))
    torch.distributed.init_process_group("nccl" if device == "cuda" else "gloo", rank=0,
                                         world_size=1, timeout=datetime.timedelta(seconds=120))
    ps.initialize_model_parallel(1, 1)


def _seed(seed: int) -> None:
    import torch
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)


def _config(size: Dict[str, Any], device: str, num_layers: int):
    from gpt_recipe import model as gpt

    cfg = gpt.transformer_config(num_layers=num_layers, hidden_size=size["hidden"],
                                 num_attention_heads=size["heads"], bf16=True,
                                 on_gpu=device == "cuda")
    # fused kernels of Apex / Transformer Engine are not on the machine
    cfg.persist_layer_norm = cfg.masked_softmax_fusion = False
    cfg.bias_activation_fusion = cfg.bias_dropout_fusion = False
    return cfg


def _batches(size: Dict[str, Any], n: int, device: str) -> List[Dict[str, Any]]:
    import torch

    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        seq = torch.randint(0, size["vocab"], (size["mbs"], size["seq"] + 1), generator=g)
        out.append({"tokens": seq[:, :-1], "labels": seq[:, 1:],
                    "loss_mask": torch.ones(size["mbs"], size["seq"]),
                    "position_ids": torch.arange(size["seq"]).expand(size["mbs"], -1)})
    return [{k: v.to(device) for k, v in b.items()} for b in out]


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


# ------------------------------------------------------------------ (a) + (c)
def check_pp1(size: Dict[str, Any], device: str) -> Dict[str, Any]:
    """(a) and (c): PACI vs megatron-core's no-pipelining schedule on one GPU."""
    import torch
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.pipeline_parallel import get_forward_backward_func

    import paci_megatron as pm
    from gpt_recipe import model as gpt
    from workers import HostSyncCounter

    m, iters = size["m"], size["iters"]
    batches = _batches(size, m * (iters + 2), device)
    report: Dict[str, Any] = {"model": {k: size[k] for k in ("layers", "hidden", "heads", "seq",
                                                               "mbs", "m")}}
    for name in ("megatron", "paci"):
        _seed(1234)
        cfg = _config(size, device, size["layers"])
        model = gpt.build_model(cfg, vocab_size=size["vocab"], max_position_embeddings=size["seq"])
        opt = gpt.build_optimizer(model, lr=1e-4, clip_grad=1.0, bf16=True, weight_decay=0.1)
        if name == "megatron":
            cfg.finalize_model_grads_func, cfg.no_sync_func = finalize_model_grads, model[0].no_sync
            fb = get_forward_backward_func()
        else:
            opt = pm.PACIOptimizer(opt, model)
            fb = pm.PACISchedule(opt)
        it = iter(batches)
        losses, seconds, syncs, debug = [], [], {}, 0
        for i in range(iters + 2):  # two untimed iterations first
            steady = i >= 2
            _sync(device)
            t0 = time.perf_counter()
            with HostSyncCounter() as counter, warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                if steady and device == "cuda" and name == "paci":
                    torch.cuda.set_sync_debug_mode("warn")
                model[0].zero_grad_buffer()
                opt.zero_grad()
                out = fb(forward_step_func=gpt.forward_step, data_iterator=it, model=model,
                         num_microbatches=m, seq_length=size["seq"],
                         micro_batch_size=size["mbs"], forward_only=False)
                opt.step()
                if device == "cuda":
                    torch.cuda.set_sync_debug_mode("default")
            _sync(device)
            if steady:
                seconds.append(time.perf_counter() - t0)
                for key, n in counter.counts.items():
                    syncs[key] = syncs.get(key, 0) + n
                debug += sum("synchroniz" in str(w.message) for w in caught)
            losses.append([float(d["lm loss"]) for d in out])
        tokens = m * size["mbs"] * size["seq"] * iters
        report[name] = {"losses": losses, "seconds_per_iteration": sorted(seconds)[len(seconds) // 2],
                        "tokens_per_second": tokens / sum(seconds)}
        if name == "paci":
            schedule_own = {k: v for k, v in syncs.items()
                            if k.startswith(("paci_megatron/schedule", "paci_megatron/p2p",
                                             "paci_megatron/plan"))}
            report["host_syncs"] = {
                "by_source": syncs, "iterations": iters, "microbatches": m * iters,
                "updates": iters, "schedule_own": sum(schedule_own.values()),
                "sync_debug_warnings": debug if device == "cuda" else None}
    report["losses_identical"] = report["paci"]["losses"] == report["megatron"]["losses"]
    report["tokens_per_second_ratio"] = (report["paci"]["tokens_per_second"]
                                         / report["megatron"]["tokens_per_second"])
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
            out[key].append(sorted(values)[len(values) // 2])
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
            "note": "NCCL point-to-point needs two devices: p2p is costed from the activation "
                    "bytes at assumed link speeds, not measured", "rows": rows}


def main(argv: Sequence[str] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--output", default="device_check.json", help="JSON report path")
    parser.add_argument("--wheels", default=os.path.join(ROOT, ".whl"),
                        help="folder of wheels to install megatron-core from (no network)")
    args = parser.parse_args(argv)
    start = time.time()
    report: Dict[str, Any] = {"device": args.device,
                              "megatron_core": ensure_megatron_core(args.wheels)}
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device: run with --device cpu for the dry run")
    report.update(torch=torch.__version__, python=sys.version.split()[0],
                  gpu=torch.cuda.get_device_name(0) if args.device == "cuda" else None)
    setup(args.device)
    size = SIZES[args.device]
    for key, check in (("pp1", lambda: check_pp1(size, args.device)),
                       ("replay", lambda: check_replay(args.device, size["width"])),
                       ("projection", lambda: check_projection(size, args.device))):
        t0 = time.time()
        try:
            report[key] = check()
        except Exception as exc:  # one failed check still reports the others
            report[key] = {"error": f"{type(exc).__name__}: {exc}"}
        report[key]["seconds"] = round(time.time() - t0, 1)
        print(f"{key}: {json.dumps(report[key], default=str)[:400]}", flush=True)
    report["seconds"] = round(time.time() - start, 1)
    with open(args.output, "w") as f:
        json.dump(report, f, indent=1, default=str)
    print(f"wrote {args.output} in {report['seconds']} s")
    torch.distributed.destroy_process_group()
    return 0 if all("error" not in report[k] for k in ("pp1", "replay", "projection")) else 1


if __name__ == "__main__":
    sys.exit(main())
