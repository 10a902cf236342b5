"""Time to accuracy: PACI against Megatron's 1F1B, each at its own best learning rate.

A user adopts PACI to reach the loss they want sooner than 1F1B. This benchmark answers
that question for the tiny GPT recipe (``examples/pretrain_gpt.py``) and a wider model at
a lower learning rate, in four steps:

1. **Time per iteration, one device per stage.** Each stage's forward, backward and
   optimizer update are timed alone (the other stages wait at a barrier; one CPU thread
   is one device), on the regime's model. :func:`paci_megatron.sim.simulate` turns them
   into the wall-clock time of every run segment for both schedules: 1F1B flushes every
   iteration, PACI pays a fill and a cool-down only at drains (evaluations, the
   synchronous warm-up). Point-to-point time is costed from the activation bytes at an
   assumed link (:data:`LINK_BYTES_PER_S`, :data:`LINK_LATENCY_S`). The simulator was
   checked against measured runs of controlled duration (``schedule_throughput.py``;
   its figures are copied into the output).
2. **The same budget for every arm.** The budget is the projected wall-clock time of
   ``train_iters`` iterations of 1F1B with AdamW (Megatron's defaults); every arm trains
   as many iterations as fit in it, its cosine schedule spanning its own length.
3. **Curves.** Validation loss against iterations does not depend on timing (the plan
   fixes every stage's order of work), so the runs train on the shared CPU cores of this
   machine (``torchrun``, one process per stage) and their curves are those of one
   device per stage. Every arm sees the same learning-rate grid (an optimizer whose best
   rate sat at the grid's top gets higher rates too, and one known to need another range
   gets a grid of its own, for its 1F1B and PACI arms alike); the
   sweep runs the first seed at every rate, then the other seeds at each arm's best rate
   (``--full-grid``: every seed at every rate). An arm's best rate is the one with the lowest mean final
   validation loss over the seeds run at it.
4. **Time to accuracy, per seed pair.** For each seed both arms ran, the targets are the
   1F1B run's own validation losses at about one and two thirds of its run and at its end;
   the pair's ratio is the 1F1B run's projected seconds to its own loss over the arm's
   seconds to reach it (above 1: faster than 1F1B). Per target the table gives the
   median of the pairs' ratios (a pair that never reached the target counts as the
   slowest), their min-max and how many pairs reached it: the median can never lie
   outside its own bracket. The reference is the best 1F1B arm (lowest mean final loss);
   a second table compares each PACI arm with 1F1B under the same optimizer and the same
   embeddings, tied or not. The crossing of mean curves is reported beside them, labelled.
   Tied arms (Megatron's default, no ``--untie-embeddings-and-output-weights``) use the
   untied model's stage times: the tied exchange (one add and two messages of the tied
   weight per update, docs/design.md) is not in the projection.

Re-analysis of an earlier results JSON (no training, no timing)::

    python benchmarks/time_to_accuracy.py --regime tiny --analyse-only --runs-dir /tmp/empty \\
        --previous benchmarks/results/tta_tiny.json --output benchmarks/results/tta_tiny.json

Usage::

    python benchmarks/time_to_accuracy.py --regime tiny --output benchmarks/results/tta_tiny.json \\
        --png docs/tta_tiny.png
    python benchmarks/time_to_accuracy.py --regime wide --output benchmarks/results/tta_wide.json \\
        --png docs/tta_wide.png
    python benchmarks/time_to_accuracy.py --quick --output /tmp/tta.json   # the test suite's

Runs are resumable: a finished run's log in ``--runs-dir`` is reused. ``--analyse-only``
reads the logs and writes the table without training. Stage timings are a timing
benchmark: run them (the first step, or ``--measure-only``) on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for _folder in (ROOT, os.path.join(ROOT, "examples")):
    if _folder not in sys.path:
        sys.path.insert(0, _folder)

RECIPE = os.path.join("examples", "pretrain_gpt.py")
LINK_BYTES_PER_S = 25e9  # an assumed PCIe-4.0-x16-class link between neighbouring stages
LINK_LATENCY_S = 10e-6
MUON = ["--optimizer", "muon", "--muon-momentum", "0.95", "--muon-use-nesterov",
        "--muon-scale-mode", "spectral", "--muon-extra-scale-factor", "0.2"]


@dataclasses.dataclass(frozen=True)
class Arm:
    """One training configuration: schedule, optimizer and PACI flags."""

    schedule: str
    optimizer: str
    flags: Tuple[str, ...] = ()
    sync_warmup: bool = False  # PACI drains during the LR warm-up (--paci-sync-warmup-iters)
    label: str = ""
    tied: bool = False  # tied input embedding and output layer (Megatron's default)


ARMS: Dict[str, Arm] = {
    "1f1b-adam": Arm("1f1b", "adam", label="1F1B, AdamW"),
    "paci-adam": Arm("paci", "adam", ("--paci-sync-warmup-iters", "0"), label="PACI, AdamW"),
    "paci-adam-sync": Arm("paci", "adam", (), True,
                          label="PACI, AdamW, synchronous warm-up"),
    "paci-adam-lookahead": Arm("paci", "adam", ("--paci-sync-warmup-iters", "0",
                                                "--paci-lookahead", "1"),
                               label="PACI, AdamW, look-ahead"),
    "paci-adam-sync-lookahead": Arm("paci", "adam", ("--paci-lookahead", "1"), True,
                                    label="PACI, AdamW, synchronous warm-up + look-ahead"),
    "1f1b-muon": Arm("1f1b", "muon", label="1F1B, Muon"),
    "paci-muon": Arm("paci", "muon", ("--paci-sync-warmup-iters", "0"), label="PACI, Muon"),
    "paci-muon-sync": Arm("paci", "muon", (), True, label="PACI, Muon, synchronous warm-up"),
    "1f1b-adam-tied": Arm("1f1b", "adam", label="1F1B, AdamW, tied embeddings", tied=True),
    "paci-adam-sync-tied": Arm("paci", "adam", (), True, tied=True,
                               label="PACI, AdamW, synchronous warm-up, tied embeddings"),
}


@dataclasses.dataclass(frozen=True)
class Regime:
    """Model, data and training length of one study.

    ``model`` holds ``examples/pretrain_gpt.py`` flags; ``hidden``, ``seq``, ``mbs``,
    ``gbs`` repeat the values the stage timing needs.
    """

    description: str
    stages: int
    num_layers: int
    hidden: int
    heads: int
    seq: int
    mbs: int
    gbs: int
    train_iters: int
    lr_warmup_iters: int
    eval_interval: int
    eval_iters: int
    lrs: Tuple[float, ...]
    seeds: Tuple[int, ...]
    clip_grad: float
    arms: Tuple[str, ...]
    extra: Tuple[str, ...] = ()
    # more rates for one optimizer's arms (1F1B's and PACI's alike) where its best rate
    # sat at the top of the common grid
    optimizer_lrs: Tuple[Tuple[str, Tuple[float, ...]], ...] = ()
    # a grid of its own for one optimizer's arms (1F1B's and PACI's alike), instead of the
    # common one, where the common grid is known to miss its range
    optimizer_grid: Tuple[Tuple[str, Tuple[float, ...]], ...] = ()
    # each schedule on its own best whole-layer split (paci_megatron.sim.balance) from the
    # measured stages, instead of Megatron's even split
    balanced: bool = False
    # every rank of a run in one process (examples/pretrain_gpt.py --emulate-pipeline)
    emulate: bool = False

    def lrs_for(self, arm: str) -> Tuple[float, ...]:
        """The rates ``arm`` is swept over: its optimizer's own grid if it has one, else the
        common grid plus its optimizer's extras."""
        optimizer = ARMS[arm].optimizer
        if optimizer in dict(self.optimizer_grid):
            return tuple(sorted(dict(self.optimizer_grid)[optimizer]))
        return tuple(sorted(set(self.lrs) | set(dict(self.optimizer_lrs).get(optimizer, ()))))

    @property
    def m(self) -> int:
        """Micro-batches per iteration (DP = 1)."""
        return self.gbs // self.mbs

    def model_flags(self) -> List[str]:
        return ["--num-layers", str(self.num_layers), "--hidden-size", str(self.hidden),
                "--num-attention-heads", str(self.heads), "--seq-length", str(self.seq),
                "--micro-batch-size", str(self.mbs), "--global-batch-size", str(self.gbs),
                *self.extra]


ALL_ARMS = tuple(ARMS)
REGIMES: Dict[str, Regime] = {
    # examples/pretrain_gpt.py's own defaults (P = 4, a = m = 8, 300 iterations)
    "tiny": Regime("the tiny recipe: 8 layers, hidden 128, sequence 128, P = 4, m = 8",
                   stages=4, num_layers=8, hidden=128, heads=4, seq=128, mbs=4, gbs=32,
                   train_iters=300, lr_warmup_iters=30, eval_interval=25, eval_iters=4,
                   lrs=(1e-3, 2e-3, 4e-3, 8e-3), seeds=(1234, 4321, 2025), clip_grad=1.0,
                   optimizer_lrs=(("muon", (1.6e-2, 3.2e-2)),),
                   arms=("1f1b-adam", "paci-adam", "paci-adam-sync", "paci-adam-lookahead",
                         "paci-adam-sync-lookahead", "1f1b-muon", "paci-muon",
                         "1f1b-adam-tied", "paci-adam-sync-tied")),
    # GPT-2 Medium's per-update scale: peak lr 3e-4 with Megatron's init std 0.02 moves the
    # weights by ~lr/0.02 of their size per update, as the paper's setting does; wider,
    # longer, 1% warm-up, no clipping (the paper's), as far as 2 CPU cores allow. 1F1B-AdamW's
    # best sat at the top of the common grid (6e-4), so AdamW gets 1.2e-3 too; Muon's best
    # rate was 4x AdamW's on the tiny recipe, so its grid is AdamW's upper three times 4
    # (and 9.6e-3: 1F1B-Muon's best sat at the top, 4.8e-3);
    # of the AdamW mitigations only the tiny recipe's best (warm-up + look-ahead) runs here
    "wide": Regime("wider, lower lr: 4 layers, hidden 256, sequence 64, P = 4, m = 8, lr ~3e-4",
                   stages=4, num_layers=4, hidden=256, heads=4, seq=64, mbs=4, gbs=32,
                   train_iters=600, lr_warmup_iters=6, eval_interval=50, eval_iters=4,
                   lrs=(1.5e-4, 3e-4, 6e-4), seeds=(1234, 4321, 2025), clip_grad=0.0,
                   optimizer_lrs=(("adam", (1.2e-3,)),),
                   optimizer_grid=(("muon", (1.2e-3, 2.4e-3, 4.8e-3, 9.6e-3)),),
                   arms=("1f1b-adam", "paci-adam", "paci-adam-sync-lookahead", "1f1b-muon",
                         "paci-muon")),
    # P = 8, the paper's depth: the tiny recipe's width twice as deep, each schedule on its
    # own best split, runs emulated in one process (the P-process run's losses, bit for
    # bit); 150 iterations; the rates around the tiny recipe's best ones (AdamW 1F1B 4e-3,
    # PACI 2e-3; Muon 1.6e-2 for both), extended wherever an arm's best sat at an edge
    # (1e-3, 4e-3 for PACI's, 3.2e-2 for 1F1B-Muon's), for both schedules of the optimizer;
    # as far as 2 CPU cores allow; the best AdamW mitigation and Muon
    "p8": Regime("P = 8: 16 layers, hidden 128, sequence 128, m = 8, balanced stages",
                 stages=8, num_layers=16, hidden=128, heads=4, seq=128, mbs=4, gbs=32,
                 train_iters=150, lr_warmup_iters=15, eval_interval=25, eval_iters=4,
                 lrs=(1e-3, 2e-3, 4e-3), seeds=(1234, 4321, 2025), clip_grad=1.0,
                 optimizer_grid=(("muon", (4e-3, 8e-3, 1.6e-2, 3.2e-2)),),
                 arms=("1f1b-adam", "paci-adam-sync-lookahead", "1f1b-muon", "paci-muon"),
                 balanced=True, emulate=True),
    # P = 4 on the same model as "p8" (16 layers, hidden 128): the effect of the pipeline
    # depth alone, each schedule on its own best split, emulated runs; AdamW's grid goes
    # one step below p8's, where PACI-AdamW's best sat at its lowest rate
    "p4": Regime("P = 4: 16 layers, hidden 128, sequence 128, m = 8, balanced stages",
                 stages=4, num_layers=16, hidden=128, heads=4, seq=128, mbs=4, gbs=32,
                 train_iters=150, lr_warmup_iters=15, eval_interval=25, eval_iters=4,
                 lrs=(5e-4, 1e-3, 2e-3, 4e-3), seeds=(1234, 4321, 2025), clip_grad=1.0,
                 optimizer_grid=(("muon", (4e-3, 8e-3, 1.6e-2, 3.2e-2)),),
                 arms=("1f1b-adam", "paci-adam-sync-lookahead", "1f1b-muon", "paci-muon"),
                 balanced=True, emulate=True),
    # P = 8 at the wide regime's per-update scale (lr ~3e-4, init std 0.02, no clipping, 1%
    # warm-up): its width and sequence, one layer a stage, each schedule on its own best
    # split, emulated runs; 300 iterations (half the wide regime's) and, per optimizer,
    # the three rates around the wide regime's best (AdamW 6e-4, Muon 4.8e-3 for both
    # schedules), as far as 2 CPU cores allow, and AdamW's 1.5e-4, where PACI-AdamW's best
    # sat at the lowest rate, and Muon's 1.92e-2, where 1F1B-Muon's best sat at the highest;
    # the best AdamW mitigation and Muon
    "p8wide": Regime("P = 8, lr ~3e-4: 8 layers, hidden 256, sequence 64, m = 8, balanced stages",
                     stages=8, num_layers=8, hidden=256, heads=4, seq=64, mbs=4, gbs=32,
                     train_iters=300, lr_warmup_iters=3, eval_interval=25, eval_iters=4,
                     lrs=(1.5e-4, 3e-4, 6e-4, 1.2e-3), seeds=(1234, 4321, 2025), clip_grad=0.0,
                     optimizer_grid=(("muon", (2.4e-3, 4.8e-3, 9.6e-3, 1.92e-2)),),
                     arms=("1f1b-adam", "paci-adam-sync-lookahead", "1f1b-muon", "paci-muon"),
                     balanced=True, emulate=True),
    # small enough for the test suite: it checks the machinery (balanced splits, emulated
    # runs, the interleaved 1F1B's time), not the result
    "quick": Regime("test-suite size", stages=2, num_layers=4, hidden=32, heads=4, seq=32,
                    mbs=2, gbs=4, train_iters=6, lr_warmup_iters=1, eval_interval=3,
                    eval_iters=1, lrs=(3e-3,), seeds=(1, 2), clip_grad=1.0,
                    arms=("1f1b-adam", "paci-adam-sync"), balanced=True, emulate=True),
}


# ------------------------------------------------------------------ 1. stage timings
def stage_times_case(rank: int, world: int, regime: Regime, vocab: int,
                     optimizers: Sequence[str], repeats: int) -> Dict[str, Any]:
    """Seconds of one forward, backward and update of this rank's stage, timed alone.

    Runs on ``world = P`` ranks (:func:`harness.run_distributed`, one thread each); the
    stages take turns, the others waiting at a barrier. Medians of ``repeats``.
    """
    import torch
    from megatron.core import parallel_state as ps

    import paci_megatron as pm
    from gpt_recipe import model as gpt
    from harness import seed_all, setup_parallel

    setup_parallel(world)
    stage = ps.get_pipeline_model_parallel_rank()
    first, last = ps.is_pipeline_first_stage(), ps.is_pipeline_last_stage()
    seed_all(1234)
    config = gpt.transformer_config(num_layers=regime.num_layers, hidden_size=regime.hidden,
                                    num_attention_heads=regime.heads,
                                    pipeline_model_parallel_size=world)
    model = gpt.build_model(config, vocab_size=vocab, max_position_embeddings=regime.seq)
    tokens = torch.randint(0, vocab, (regime.mbs, regime.seq + 1))
    batch = {"tokens": tokens[:, :-1], "labels": tokens[:, 1:],
             "loss_mask": torch.ones(regime.mbs, regime.seq),
             "position_ids": torch.arange(regime.seq).expand(regime.mbs, regime.seq)}
    hidden_in = torch.randn(regime.seq, regime.mbs, regime.hidden, requires_grad=True)

    from megatron.core.utils import get_attr_wrapped_model

    def forward():
        if not first:
            get_attr_wrapped_model(model[0], "set_input_tensor")(hidden_in)
        output, loss_func = gpt.forward_step(iter([batch]), model[0])
        return loss_func(output)[0] if last else output

    def backward(output):
        if last:
            output.backward()
        else:
            output.backward(torch.ones_like(output))

    out: Dict[str, Any] = {"stage": stage, "forward_s": [], "backward_s": []}
    opts = {}
    for name in optimizers:
        kw = {"optimizer": name, "muon": {"muon_momentum": 0.95, "muon_use_nesterov": True,
                                          "muon_extra_scale_factor": 0.2}
              if name == "muon" else None}
        inner = gpt.build_optimizer(model, lr=1e-4, clip_grad=regime.clip_grad, **kw)
        opts[name] = pm.PACIOptimizer(inner, model).optimizer  # stage-local grad statistics
        out[f"update_{name}_s"] = []
    for turn in range(world):
        torch.distributed.barrier()
        if turn != stage:
            continue
        for r in range(repeats + 2):  # two untimed rounds warm the allocator
            t0 = time.perf_counter()
            output = forward()
            t1 = time.perf_counter()
            backward(output)
            t2 = time.perf_counter()
            if r >= 2:
                out["forward_s"].append(t1 - t0)
                out["backward_s"].append(t2 - t1)
            for name, opt in opts.items():
                t3 = time.perf_counter()
                opt.step()
                if r >= 2:
                    out[f"update_{name}_s"].append(time.perf_counter() - t3)
            model[0].zero_grad_buffer()
    torch.distributed.barrier()
    return {k: (statistics.median(v) if isinstance(v, list) else v) for k, v in out.items()}


def measure_stage_times(regime: Regime, vocab: int, repeats: int) -> Dict[str, Any]:
    """Per-stage seconds (lists in stage order) for the regime's model and both optimizers."""
    from harness import run_distributed

    optimizers = sorted({ARMS[a].optimizer for a in regime.arms})
    ranks = run_distributed(stage_times_case, regime.stages, regime, vocab, optimizers, repeats,
                            timeout_s=1800, comm_timeout_s=1200)
    ranks.sort(key=lambda r: r["stage"])
    times = {key: [r[key] for r in ranks] for key in ranks[0] if key != "stage"}
    times["comm_s"] = LINK_LATENCY_S + regime.seq * regime.mbs * regime.hidden * 4 / LINK_BYTES_PER_S
    times["repeats"] = repeats
    return times


def first_middle_last(per_stage: Sequence[float]) -> List[float]:
    """The first stage's value, the median of the middle stages' and the last stage's (the
    three kinds of stage: with the embedding, layers only, with the output layer)."""
    middle = statistics.median(per_stage[1:-1]) if len(per_stage) > 2 else per_stage[0]
    return [per_stage[0], middle, per_stage[-1]]


def split_seconds(times: Dict[str, Any], layers_per_stage: int,
                  split: Sequence[int]) -> Dict[str, List[float]]:
    """Per-stage seconds of another split of the same model: each timed quantity
    (forward, backward, each optimizer's update; seconds per micro-batch or per update) of
    the even split's first, middle and last stage (``layers_per_stage`` layers each), taken
    apart into one layer, the embedding and the output layer
    (:meth:`paci_megatron.sim.StageCosts.from_stage_times`) and put together again.

    Returns:
        ``{quantity: [seconds of stage 0, ..., stage P-1]}`` for ``split``."""
    from paci_megatron.sim import StageCosts

    out = {}
    for key, per_stage in times.items():
        if not (key.endswith("_s") and isinstance(per_stage, list)):
            continue
        three = first_middle_last(per_stage)
        costs = StageCosts.from_stage_times(three, three, layers_per_stage)
        out[key] = costs.seconds(split)[0]
    return out


def with_balanced_splits(regime: Regime, times: Dict[str, Any]) -> Dict[str, Any]:
    """``times`` plus each schedule's best split (``splits``), its per-stage seconds
    (``by_schedule``) and the best-vs-best throughput ceilings (``ceilings``), from
    :func:`paci_megatron.sim.balance` on the even split's measured stages (AdamW's update)."""
    from paci_megatron.sim import StageCosts, balance

    per = regime.num_layers // regime.stages
    costs = StageCosts.from_stage_times(first_middle_last(times["forward_s"]),
                                        first_middle_last(times["backward_s"]), per)
    result = balance(regime.num_layers, regime.stages, regime.m, costs, regime.m,
                     times["comm_s"], statistics.median(times["update_adam_s"]))
    out = dict(times)
    out["splits"] = {name: result["schedules"][name]["best"]["split"] for name in ("paci", "1f1b")}
    out["by_schedule"] = {name: split_seconds(times, per, split)
                          for name, split in out["splits"].items()}
    out["ceilings"] = dict(result["ceilings"])
    out["seconds_per_iteration"] = {name: row["best"]["seconds_per_iteration"]
                                    for name, row in result["schedules"].items()}
    out["interleaved_splits"] = {name: row["best"]["split"]
                                 for name, row in result["schedules"].items()
                                 if name.startswith("interleaved")}
    return out


def interleaved_factor(times: Dict[str, Any]) -> Optional[Tuple[str, float]]:
    """The fastest interleaved 1F1B (each ``v`` on its own best split) and its seconds per
    iteration over 1F1B's, from the balance advisor; None where the regime is not
    balanced or no ``v`` fits. The interleaved 1F1B is synchronous: its losses per
    iteration are 1F1B's (up to the initialisation of a different split), so its time to
    a loss is 1F1B's times this factor."""
    per = times.get("seconds_per_iteration") or {}
    inter = {k: v for k, v in per.items() if k.startswith("interleaved")}
    if not inter or "1f1b" not in per:
        return None
    name = min(inter, key=inter.get)
    return name, inter[name] / per["1f1b"]


# ------------------------------------------------------------------ 2. projected time
def segment_seconds(schedule: str, regime: Regime, times: Dict[str, Any], optimizer: str,
                    iterations: int) -> float:
    """Projected seconds of ``iterations`` training calls between two drains (one device
    per stage): :func:`paci_megatron.sim.simulate` of the schedule's plan, on the
    schedule's own split where the regime balances them."""
    from paci_megatron.sim import simulate

    if iterations <= 0:
        return 0.0
    own = times.get("by_schedule", {}).get(schedule, times)
    return simulate(schedule, regime.stages, regime.m, iterations, own["forward_s"],
                    own["backward_s"], times["comm_s"], own[f"update_{optimizer}_s"]).makespan


def drain_points(arm: Arm, regime: Regime, iterations: int) -> List[int]:
    """Iterations after which a PACI run is drained: each synchronous warm-up iteration,
    each evaluation and the end (1F1B flushes after every iteration)."""
    if arm.schedule == "1f1b":
        return list(range(1, iterations + 1))
    sync = regime.lr_warmup_iters if arm.sync_warmup else 0
    points = set(range(1, min(sync, iterations) + 1))
    points |= set(range(regime.eval_interval, iterations + 1, regime.eval_interval))
    points.add(iterations)
    return sorted(points)


def projected_seconds(arm: Arm, regime: Regime, times: Dict[str, Any],
                      iterations: int) -> Dict[int, float]:
    """Projected wall-clock seconds at every drain point (evaluations included) of a run
    of ``iterations`` iterations: ``{iteration: seconds}``, with ``{0: 0.0}``."""
    cache: Dict[int, float] = {}
    out, now, previous = {0: 0.0}, 0.0, 0
    for point in drain_points(arm, regime, iterations):
        k = point - previous
        if k not in cache:
            cache[k] = segment_seconds(arm.schedule, regime, times, arm.optimizer, k)
        now += cache[k]
        out[point] = now
        previous = point
    return out


def iterations_within(arm: Arm, regime: Regime, times: Dict[str, Any], budget_s: float) -> int:
    """The most iterations of ``arm`` whose projected time fits in ``budget_s``."""
    per = segment_seconds(arm.schedule, regime, times, arm.optimizer, 1)
    hi = max(int(budget_s / per * 2) + 2, regime.train_iters)
    lo = 1
    while lo < hi:  # largest n with projected(n) <= budget
        mid = (lo + hi + 1) // 2
        if projected_seconds(arm, regime, times, mid)[mid] <= budget_s * (1 + 1e-9):
            lo = mid
        else:
            hi = mid - 1
    return lo


# ------------------------------------------------------------------ 3. runs
def run_name(arm: str, lr: float, seed: int) -> str:
    return f"{arm}_lr{lr:g}_seed{seed}"


def recipe_command(regime: Regime, arm: Arm, lr: float, seed: int, iterations: int,
                   log_path: str, data_dir: str, port: int,
                   split: Sequence[int] = ()) -> List[str]:
    """The command of one run of ``examples/pretrain_gpt.py``: ``torchrun``, or one process
    with ``--emulate-pipeline`` where the regime emulates; ``split``: layers per stage."""
    from paci_megatron.sim import split_flags

    launcher = ([sys.executable] if regime.emulate else
                [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node",
                 str(regime.stages), "--master-port", str(port)])
    cmd = [*launcher, RECIPE, "--device", "cpu",
           "--pipeline-model-parallel-size", str(regime.stages), "--pipeline-schedule",
           arm.schedule, *([] if arm.tied else ["--untie-embeddings-and-output-weights"]),
           *regime.model_flags(), *(split_flags(split) if split else []),
           *(["--emulate-pipeline"] if regime.emulate else []),
           "--train-iters", str(iterations), "--lr", f"{lr:g}", "--min-lr", f"{lr / 10:g}",
           "--lr-warmup-iters", str(regime.lr_warmup_iters), "--clip-grad", f"{regime.clip_grad:g}",
           "--eval-interval", str(regime.eval_interval), "--eval-iters", str(regime.eval_iters),
           "--log-interval", str(regime.eval_interval), "--seed", str(seed),
           "--data-cache-dir", data_dir, "--log-json", log_path]
    if arm.optimizer == "muon":
        cmd += MUON
    return cmd + list(arm.flags)


def display_command(cmd: List[str]) -> List[str]:
    """A run's command as a user types it: ``torchrun ...`` or ``python ...``."""
    if cmd[1:3] == ["-m", "torch.distributed.run"]:
        return ["torchrun"] + cmd[3:]
    return ["python"] + cmd[1:]


def read_curve(path: str) -> Optional[Dict[int, float]]:
    """``{iteration: validation loss}`` of a finished run's log (None if unfinished)."""
    if not os.path.exists(path):
        return None
    curve = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                record = json.loads(line)
                if record.get("val_loss") is not None:
                    curve[int(record["iteration"])] = float(record["val_loss"])
    return curve


def ensure_run(regime: Regime, name: str, arm: Arm, lr: float, seed: int, iterations: int,
               runs_dir: str, data_dir: str, split: Sequence[int] = ()) -> Dict[int, float]:
    """Train one run unless its finished log exists; returns its validation curve.

    Raises:
        RuntimeError: the run failed (the message names its output file).
    """
    from harness import free_port

    log = os.path.join(runs_dir, run_name(name, lr, seed) + ".jsonl")
    curve = read_curve(log)
    if curve and max(curve) == iterations:
        return curve
    cmd = recipe_command(regime, arm, lr, seed, iterations, os.path.abspath(log),
                         os.path.abspath(data_dir), free_port(), split)
    print(f"> {name} lr {lr:g} seed {seed}: {iterations} iterations", flush=True)
    t0 = time.time()
    out_path = log[:-len(".jsonl")] + ".out"
    if os.path.exists(log):
        os.remove(log)
    with open(out_path, "w") as out:
        rc = subprocess.run(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                            env=dict(os.environ, PYTHONWARNINGS="ignore",
                                     **({"OMP_NUM_THREADS": "1"} if regime.emulate else {})
                                     )).returncode
    curve = read_curve(log)
    if rc != 0 or not curve or max(curve) != iterations:
        raise RuntimeError(f"run {run_name(name, lr, seed)} failed (exit {rc}): see {out_path}")
    print(f"  done in {time.time() - t0:.0f} s: val {curve[max(curve)]:.4f}", flush=True)
    return curve


def add_previous_runs(runs: Dict[str, Dict[float, Dict[int, Dict[int, float]]]],
                      previous: Dict[str, Any], times: Dict[str, Any],
                      iterations: Dict[str, int], first_seed: int) -> Optional[str]:
    """Add an earlier results JSON's runs to ``runs`` where it has none: every seed's
    curve at each arm's best rate, and at the other rates the final loss (a one-point
    curve under ``first_seed``). Returns what makes the JSON unusable, or None.

    The JSON must come from the same stage times and iterations per arm (the same
    regime and budget); its curves are the validation losses the logs held."""
    if previous.get("stage_times") != times:
        return "its stage times differ from the runs directory's stage_times.json"
    for name in runs:
        arm = previous["arms"].get(name)
        if arm is None:
            continue
        if arm["iterations"] != iterations[name]:
            return f"{name} ran {arm['iterations']} iterations there, {iterations[name]} here"
        for lr_text, final in arm["final_val_by_lr"].items():
            lr = float(lr_text)
            by_seed = runs[name].setdefault(lr, {})
            if lr == arm["best_lr"]:
                for seed, curve in zip(arm["seeds"], arm["seed_curves"]):
                    by_seed.setdefault(seed, {int(k): v for k, v in curve.items()})
            elif not by_seed:
                by_seed[first_seed] = {iterations[name]: final}
    return None


# ------------------------------------------------------------------ 4. analysis
def crossing(curve: Dict[int, float], clock: Dict[int, float], target: float
             ) -> Optional[Tuple[float, float]]:
    """First ``(iteration, seconds)`` where ``curve`` reaches ``target``, linear between
    evaluations (None if it never does). ``clock`` maps evaluation iterations to seconds."""
    points = sorted(curve)
    if curve[points[0]] <= target:
        return float(points[0]), clock[points[0]]
    for a, b in zip(points, points[1:]):
        if curve[b] <= target:
            f = (curve[a] - target) / (curve[a] - curve[b])
            return a + f * (b - a), clock[a] + f * (clock[b] - clock[a])
    return None


def mean_curve(curves: Sequence[Dict[int, float]]) -> Dict[int, float]:
    return {it: statistics.fmean(c[it] for c in curves) for it in curves[0]}


def spread(values: Sequence[float]) -> Dict[str, Optional[float]]:
    values = [v for v in values if v is not None]
    if not values:
        return {"mean": None, "std": None, "min": None, "max": None, "n": 0}
    return {"mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values), "n": len(values)}


def analyse(regime: Regime, times: Dict[str, Any], iterations: Dict[str, int],
            runs: Dict[str, Dict[float, Dict[int, Dict[int, float]]]]) -> Dict[str, Any]:
    """Best rate per arm, final losses, targets and TTA (see module doc)."""
    arms: Dict[str, Any] = {}
    for name, by_lr in runs.items():
        finals = {lr: statistics.fmean(c[max(c)] for c in seeds.values())
                  for lr, seeds in by_lr.items()}
        best = min(finals, key=lambda lr: (-len(by_lr[lr]), finals[lr]))
        curves = [by_lr[best][s] for s in sorted(by_lr[best])]
        clock = projected_seconds(ARMS[name], regime, times, iterations[name])
        arms[name] = {
            "label": ARMS[name].label, "best_lr": best, "iterations": iterations[name],
            "final_val_by_lr": {f"{lr:g}": v for lr, v in finals.items()},
            "seeds": sorted(by_lr[best]), "final_val": spread([c[max(c)] for c in curves]),
            "mean_curve": mean_curve(curves), "seed_curves": curves,
            "seconds_at": {it: clock[it] for it in curves[0]},
            "seconds_total": clock[iterations[name]],
        }

    def best_1f1b(optimizer=None, tied=None):
        return min((n for n in arms if ARMS[n].schedule == "1f1b"
                    and optimizer in (None, ARMS[n].optimizer) and tied in (None, ARMS[n].tied)),
                   key=lambda n: arms[n]["final_val"]["mean"], default=None)

    reference = best_1f1b()
    targets = targets_of(arms[reference])
    for name, arm in arms.items():
        arm["tta"] = tta(arm, arms[reference])
        arm["final_gap_vs_reference"] = gap(arm, arms[reference])
        # the same optimizer (and the same tying of the embeddings) under 1F1B
        own = best_1f1b(ARMS[name].optimizer, ARMS[name].tied)
        if own is not None:
            arm["same_optimizer_reference"] = own
            arm["final_gap_vs_same_optimizer"] = gap(arm, arms[own])
            arm["tta_same_optimizer"] = tta(arm, arms[own])
            fastest = interleaved_factor(times)
            if fastest is not None and ARMS[name].schedule == "paci":
                # against 1F1B's losses at the interleaved schedule's speed: every pair's
                # ratio times the factor (the order of the pairs is kept)
                interleaved, factor = fastest
                arm["interleaved_reference"] = {"schedule": interleaved, "factor": factor}
                arm["tta_vs_interleaved"] = [
                    {**t, **{k: (t[k] * factor if t[k] is not None else None)
                             for k in ("median", "min", "max")},
                     "ratio_per_pair": {s: (r * factor if r is not None else None)
                                        for s, r in t["ratio_per_pair"].items()}}
                    for t in arm["tta_same_optimizer"]]
    return {"reference": reference, "targets": targets, "arms": arms}


def gap(arm: Dict[str, Any], ref: Dict[str, Any]) -> float:
    """Relative final-loss gap of ``arm`` over ``ref`` (positive: ``arm`` is worse)."""
    return (arm["final_val"]["mean"] - ref["final_val"]["mean"]) / ref["final_val"]["mean"]


FRACTIONS = (1 / 3, 2 / 3, 1.0)  # the points of the reference run whose losses are targets


def targets_of(ref: Dict[str, Any]) -> List[Dict[str, Any]]:
    """The reference's mean curve at about 1/3 and 2/3 of its run and at its end: the
    mean-curve targets (the plot's lines and the labelled mean-curve table)."""
    evals = sorted(ref["mean_curve"])
    out = []
    for fraction in FRACTIONS:
        it = _point(evals, fraction)
        name = "1F1B final" if it == evals[-1] else f"1F1B at iteration {it}"
        out.append({"name": name, "fraction": fraction, "loss": ref["mean_curve"][it]})
    return out


def _point(evals: Sequence[int], fraction: float) -> int:
    """The evaluation iteration nearest ``fraction`` of the run (the last one for 1.0)."""
    return min(evals, key=lambda it: (abs(it - evals[-1] * fraction), -it))


def median_of_pairs(ratios: Sequence[Optional[float]]) -> Optional[float]:
    """Median of per-pair TTA ratios, a pair that never reached its target counted as the
    slowest (its ratio is below anything measured). None when the middle pair(s) did not
    reach it. With every pair counted, the median lies inside the reached pairs' min-max."""
    if not ratios:
        return None
    ranked = sorted(ratios, key=lambda r: -math.inf if r is None else r)
    n = len(ranked)
    middle = ranked[(n - 1) // 2: n // 2 + 1]
    if any(r is None for r in middle):
        return None
    return statistics.fmean(middle)


def tta(arm: Dict[str, Any], ref: Dict[str, Any]) -> List[Dict[str, Any]]:
    """Time to accuracy of ``arm`` against ``ref``, seed pair by seed pair.

    For each seed both arms ran, the targets are the reference RUN's own validation losses
    at about 1/3 and 2/3 of its run and at its end; the pair's ratio is the reference's
    projected seconds to reach its own loss over ``arm``'s seconds to reach it (> 1: ``arm``
    is faster; None: ``arm`` never reached it). Per target: the per-pair ratios, how many
    pairs reached it, their median (:func:`median_of_pairs`), min and max. The crossing
    of the two mean curves is reported beside them, labelled, never as the headline.
    """
    seeds = [s for s in ref["seeds"] if s in arm["seeds"]]
    mine = dict(zip(arm["seeds"], arm["seed_curves"]))
    theirs = dict(zip(ref["seeds"], ref["seed_curves"]))
    mean_targets = targets_of(ref)
    out = []
    for k, fraction in enumerate(FRACTIONS):
        per_pair: Dict[str, Optional[float]] = {}
        losses = []
        for seed in seeds:
            ref_curve = {int(i): v for i, v in theirs[seed].items()}
            target = ref_curve[_point(sorted(ref_curve), fraction)]
            losses.append(target)
            a = crossing({int(i): v for i, v in mine[seed].items()}, arm["seconds_at"], target)
            b = crossing(ref_curve, ref["seconds_at"], target)
            per_pair[str(seed)] = b[1] / a[1] if a and b and a[1] > 0 else None
        reached = [r for r in per_pair.values() if r is not None]
        on_mean = crossing(arm["mean_curve"], arm["seconds_at"], mean_targets[k]["loss"])
        ref_mean = crossing(ref["mean_curve"], ref["seconds_at"], mean_targets[k]["loss"])
        out.append({
            "target": mean_targets[k]["name"], "fraction": fraction,
            "target_loss_per_pair": dict(zip(map(str, seeds), losses)),
            "ratio_per_pair": per_pair, "pairs": len(seeds), "reached": len(reached),
            "median": median_of_pairs(list(per_pair.values())),
            "min": min(reached) if reached else None, "max": max(reached) if reached else None,
            "mean_curves": {
                "target_loss": mean_targets[k]["loss"],
                "iterations": on_mean[0] if on_mean else None,
                "seconds": on_mean[1] if on_mean else None,
                "ratio": ref_mean[1] / on_mean[1] if on_mean and ref_mean and on_mean[1] > 0
                else None},
        })
    return out


def tta_cell(t: Dict[str, Any]) -> str:
    """One TTA cell: ``median x [min-max], reached/pairs`` (a pair that did not reach the
    target counts as the slowest), e.g. ``1.07x [1.06-1.08], 3/3``."""
    if t["median"] is None:
        shown = f" (reached: {t['min']:.2f}-{t['max']:.2f})" if t["reached"] else ""
        return f"not reached, {t['reached']}/{t['pairs']}{shown}"
    return f"{t['median']:.2f}x [{t['min']:.2f}-{t['max']:.2f}], {t['reached']}/{t['pairs']}"


def _mean_cell(t: Dict[str, Any]) -> str:
    r = t["mean_curves"]["ratio"]
    return "not reached" if r is None else f"{r:.2f}x"


def markdown(result: Dict[str, Any]) -> str:
    """The tables: per arm at its best rate, final loss, gap and TTA per target against
    the best 1F1B arm; each PACI arm against 1F1B with its own optimizer; the mean-curve
    crossings, labelled."""
    head = ["arm", "best lr", "iterations", "final val loss (mean ± std, n)", "vs best 1F1B"]
    head += [f"TTA to its {n}" for n in ("1/3 loss", "2/3 loss", "final loss")]
    lines = ["TTA: per seed pair, the best 1F1B run's own losses at 1/3, 2/3 and the end of "
             "its run are the targets; median [min-max] of the pairs' ratios (above 1: "
             "faster than 1F1B), pairs that reached the target / pairs (a pair that did not "
             "counts as the slowest).", "",
             "| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for name, arm in result["arms"].items():
        f = arm["final_val"]
        row = [arm["label"], f"{arm['best_lr']:g}", str(arm["iterations"]),
               f"{f['mean']:.4f} ± {f['std']:.4f} ({f['n']})",
               f"{arm['final_gap_vs_reference']:+.2%}"]
        lines.append("| " + " | ".join(row + [tta_cell(t) for t in arm["tta"]]) + " |")
    same = [(n, a) for n, a in result["arms"].items() if a.get("same_optimizer_reference")
            and a["same_optimizer_reference"] != n]
    if same:
        lines += ["", "Against 1F1B with the same optimizer and embeddings (its runs' own "
                  "losses, per seed pair):",
                  "", "| arm | reference | vs its final loss | TTA to its 1/3 loss | "
                  "TTA to its 2/3 loss | TTA to its final loss |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for name, arm in same:
            ref = result["arms"][arm["same_optimizer_reference"]]["label"]
            lines.append(f"| {arm['label']} | {ref} | {arm['final_gap_vs_same_optimizer']:+.2%} | "
                         + " | ".join(tta_cell(t) for t in arm["tta_same_optimizer"]) + " |")
    inter = [(n, a) for n, a in result["arms"].items() if a.get("tta_vs_interleaved")]
    if inter:
        schedule = inter[0][1]["interleaved_reference"]["schedule"]
        factor = inter[0][1]["interleaved_reference"]["factor"]
        lines += ["", f"Against the interleaved 1F1B ({schedule.replace('_', ', ')}, on its own "
                  f"best split: {factor:.3f}x 1F1B's time per iteration; synchronous, so 1F1B's "
                  "losses per iteration), same optimizer, per seed pair:", "",
                  "| arm | reference | TTA to its 1/3 loss | TTA to its 2/3 loss | "
                  "TTA to its final loss |", "| --- | --- | --- | --- | --- |"]
        for name, arm in inter:
            ref = result["arms"][arm["same_optimizer_reference"]]["label"]
            lines.append(f"| {arm['label']} | {ref}, interleaved | "
                         + " | ".join(tta_cell(t) for t in arm["tta_vs_interleaved"]) + " |")
    lines += ["", "Mean curves only (the crossing of the arm's mean curve with the reference's "
              "mean-curve losses; not evidence where the pairs disagree):", "",
              "| arm | " + " | ".join(t["name"] for t in result["targets"]) + " |",
              "|" + " --- |" * (1 + len(result["targets"]))]
    for name, arm in result["arms"].items():
        lines.append(f"| {arm['label']} | " + " | ".join(_mean_cell(t) for t in arm["tta"]) + " |")
    return "\n".join(lines)


def verdict(arm: Dict[str, Any]) -> str:
    """``wins`` / ``loses`` / ``mixed`` for a PACI arm against 1F1B with its optimizer: wins
    when its mean final loss is lower and the median pair reaches every target sooner
    (median above 1), loses when its final loss is higher and no median is above 1."""
    medians = [t["median"] for t in arm["tta_same_optimizer"]]
    faster = [m is not None and m > 1 for m in medians]
    if arm["final_gap_vs_same_optimizer"] < 0 and all(faster):
        return "PACI wins"
    if arm["final_gap_vs_same_optimizer"] > 0 and not any(faster):
        return "PACI loses"
    return "mixed"


def summary_table(results: Dict[str, Dict[str, Any]]) -> str:
    """README's summary: per regime (``{name: results JSON}``) and PACI arm, the final loss
    against 1F1B with the same optimizer and embeddings, the per-pair TTA cells
    (:func:`tta_cell`) at its 1/3, 2/3 and final loss, and :func:`verdict`."""
    lines = ["| regime | PACI arm | final val loss vs 1F1B, same optimizer (means, 3 seeds) "
             "| TTA to 1F1B's 1/3 loss | 2/3 loss | final loss | |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for regime, result in results.items():
        for name, arm in result["arms"].items():
            own = arm.get("same_optimizer_reference")
            if not own or own == name:
                continue
            ref = result["arms"][own]
            lines.append(
                f"| {regime} | {arm['label'][len('PACI, '):]} | "
                f"{arm['final_gap_vs_same_optimizer']:+.1%} ({arm['final_val']['mean']:.3f} vs "
                f"{ref['final_val']['mean']:.3f}) | "
                + " | ".join(tta_cell(t) for t in arm["tta_same_optimizer"])
                + f" | {verdict(arm)} |")
    return "\n".join(lines)


def plot(result: Dict[str, Any], regime: Regime, path: str) -> None:
    """Mean validation loss against projected wall-clock seconds, one line per arm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.8))
    for name, arm in result["arms"].items():
        its = sorted(arm["mean_curve"])
        style = "-" if ARMS[name].schedule == "paci" else "--"
        ax.plot([arm["seconds_at"][i] for i in its], [arm["mean_curve"][i] for i in its], style,
                marker="o", markersize=3, label=f"{arm['label']} (lr {arm['best_lr']:g})")
    for t in result["targets"]:
        ax.axhline(t["loss"], color="grey", linewidth=0.6, linestyle=":")
    curve_min = min(min(a["mean_curve"].values()) for a in result["arms"].values())
    ax.set_ylim(curve_min - 0.1, result["targets"][0]["loss"] + 0.8)
    ax.set_xlabel("projected wall-clock seconds, one device per stage")
    ax.set_ylabel("validation loss (mean over seeds)")
    ax.set_title(f"{regime.description}: each arm at its best learning rate", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def vocab_size(data_dir: str) -> int:
    """The recipe's padded vocabulary (prepares the embedded corpus if needed)."""
    from gpt_recipe import data

    record = data.prepare_corpus(os.path.join(data_dir, "stdlib"))
    return int(math.ceil(record.vocab_size / 128) * 128)


def simulator_check() -> Optional[Dict[str, Any]]:
    """The simulator against measured controlled-time runs (schedule_throughput.py)."""
    path = os.path.join(ROOT, "benchmarks", "results", "throughput.json")
    if not os.path.exists(path):
        return None
    rows = [r for r in json.load(open(path, encoding="utf-8"))["rows"] if r.get("kind") == "sleep"]
    return {"source": os.path.relpath(path, ROOT), "cases": len(rows),
            "sim_vs_measured_max_rel_diff": max(r["sim_vs_measured_max_rel_diff"] for r in rows)}


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command line: see the module doc."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--regime", choices=sorted(REGIMES), default="tiny")
    p.add_argument("--quick", action="store_true", help="the test suite's tiny regime")
    p.add_argument("--arms", nargs="+", choices=sorted(ARMS), default=None,
                   help="default: the regime's arms")
    p.add_argument("--full-grid", action="store_true", help="every seed at every rate")
    p.add_argument("--lrs", nargs="+", type=float, default=None,
                   help="train only these of the arms' rates (the analysis reads every "
                        "finished run; the table shows each arm's rate and seed count)")
    p.add_argument("--seeds", nargs="+", type=int, default=None,
                   help="train only these of the regime's seeds (the analysis reads every "
                        "finished run)")
    p.add_argument("--runs-dir", default=None, help="default: runs/tta/<regime>")
    p.add_argument("--data-dir", default=os.path.join(ROOT, "data"))
    p.add_argument("--repeats", type=int, default=10, help="timed repeats per stage")
    p.add_argument("--measure-only", action="store_true")
    p.add_argument("--analyse-only", action="store_true", help="no training: logs only")
    p.add_argument("--previous", default=None,
                   help="a results JSON of the same regime and stage times: its runs count "
                        "where --runs-dir has none (curves at each arm's best rate, the final "
                        "loss at the others)")
    p.add_argument("--output", default=None, help="JSON results")
    p.add_argument("--png", default=None, help="loss against projected wall-clock time")
    p.add_argument("--summary", nargs="+", metavar="NAME=JSON", default=None,
                   help="print README's summary table of these results JSONs and exit")
    args = p.parse_args(argv)
    if args.summary:
        if not all("=" in item for item in args.summary):
            p.error("--summary takes NAME=JSON pairs, e.g. tiny=benchmarks/results/tta_tiny.json")
        print(summary_table({name: json.load(open(path, encoding="utf-8")) for name, path in
                             (item.rsplit("=", 1) for item in args.summary)}))
        return 0
    regime = REGIMES["quick" if args.quick else args.regime]
    if args.arms:
        regime = dataclasses.replace(regime, arms=tuple(args.arms))
    grid = sorted(set().union(*(regime.lrs_for(n) for n in regime.arms)))
    if args.lrs and set(args.lrs) - set(grid):
        p.error(f"--lrs {sorted(set(args.lrs) - set(grid))}: not in the arms' grid {grid}")
    if args.seeds and set(args.seeds) - set(regime.seeds):
        p.error(f"--seeds {sorted(set(args.seeds) - set(regime.seeds))}: not among the "
                f"regime's seeds {list(regime.seeds)}")
    runs_dir = args.runs_dir or os.path.join(ROOT, "runs", "tta", "quick" if args.quick else args.regime)
    os.makedirs(runs_dir, exist_ok=True)

    times_path = os.path.join(runs_dir, "stage_times.json")
    if args.previous and not os.path.exists(times_path):  # re-analysis of an earlier JSON
        times = json.load(open(args.previous, encoding="utf-8"))["stage_times"]
        json.dump(times, open(times_path, "w", encoding="utf-8"), indent=1)
    if os.path.exists(times_path):
        times = json.load(open(times_path, encoding="utf-8"))
    else:
        vocab = vocab_size(args.data_dir)
        print(f"> timing each stage alone ({regime.stages} stages, vocab {vocab})", flush=True)
        times = measure_stage_times(regime, vocab, args.repeats)
        json.dump(times, open(times_path, "w", encoding="utf-8"), indent=1)
    print("> stage seconds: " + ", ".join(f"{k} {[round(x * 1e3, 2) for x in v]} ms"
                                          for k, v in times.items() if isinstance(v, list)))
    if regime.balanced:
        times = with_balanced_splits(regime, times)
        print(f"> each schedule on its own best split: {times['splits']}; ceilings "
              + ", ".join(f"{k} {v:.3f}x" for k, v in times["ceilings"].items()), flush=True)
    if args.measure_only:
        return 0
    reference = ARMS["1f1b-adam"]
    budget = projected_seconds(reference, regime, times, regime.train_iters)[regime.train_iters]
    iterations = {name: (regime.train_iters if ARMS[name] == reference
                         else iterations_within(ARMS[name], regime, times, budget))
                  for name in regime.arms}
    print(f"> budget {budget:.1f} projected seconds: iterations per arm {iterations}", flush=True)

    runs: Dict[str, Dict[float, Dict[int, Dict[int, float]]]] = {n: {} for n in regime.arms}

    def get(name, lr, seed):
        if seed in runs[name].get(lr, {}) and not os.path.exists(
                os.path.join(runs_dir, run_name(name, lr, seed) + ".jsonl")):
            return  # from --previous
        if args.analyse_only or (args.seeds and seed not in args.seeds):
            curve = read_curve(os.path.join(runs_dir, run_name(name, lr, seed) + ".jsonl"))
            if not curve or max(curve) != iterations[name]:
                return
        else:
            curve = ensure_run(regime, name, ARMS[name], lr, seed, iterations[name], runs_dir,
                               args.data_dir, times.get("splits", {}).get(ARMS[name].schedule, ()))
        runs[name].setdefault(lr, {})[seed] = curve

    first, rest = regime.seeds[0], regime.seeds[1:]
    if args.previous:
        problem = add_previous_runs(runs, json.load(open(args.previous, encoding="utf-8")),
                                    times, iterations, first)
        if problem:
            p.error(f"--previous {args.previous}: {problem}")
    for name in regime.arms:
        for lr in regime.lrs_for(name):
            if args.lrs and lr not in args.lrs and not args.analyse_only:
                continue
            for seed in (regime.seeds if args.full_grid else (first,)):
                get(name, lr, seed)
    for name in regime.arms:
        if not runs[name]:
            continue
        best = min(runs[name], key=lambda lr: runs[name][lr][first][max(runs[name][lr][first])]
                   if first in runs[name][lr] else math.inf)
        for seed in rest:
            get(name, best, seed)
    missing = [n for n in regime.arms if not runs[n]]
    if missing:
        print(f"error: no finished runs for {missing} in {runs_dir}", file=sys.stderr)
        return 2
    if not any(ARMS[n].schedule == "1f1b" for n in regime.arms):
        print("> runs done; the table needs a 1F1B arm as its reference: run --analyse-only "
              "without --arms (or with a 1f1b arm)")
        return 0
    result = analyse(regime, times, iterations, runs)
    table = markdown(result)
    print(table)
    if args.png:
        os.makedirs(os.path.dirname(os.path.abspath(args.png)), exist_ok=True)
        plot(result, regime, args.png)
        print(f"> picture: {args.png}")
    if args.output:
        from schedule_throughput import machine

        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        # the stage times (and with --previous its runs) come from the earlier machine
        here = machine()
        previous = json.load(open(args.previous, encoding="utf-8")) if args.previous else None
        out = {"machine": previous["machine"] if previous else here,
               **({"added_runs_machine": previous.get("added_runs_machine", here)}
                  if previous else {}),
               "regime": dataclasses.asdict(regime),
               "stage_times": times, "budget_seconds": budget, "iterations": iterations,
               "simulator_check": simulator_check(), "table": table,
               "commands": {n: shlex.join(display_command(recipe_command(
                   regime, ARMS[n], result["arms"][n]["best_lr"], first, iterations[n],
                   "LOG.jsonl", "data", 29500,
                   times.get("splits", {}).get(ARMS[n].schedule, ())))) for n in regime.arms},
               **result}
        with open(args.output, "w", encoding="utf-8") as f:
            json.dump(out, f, indent=1)
        print(f"> results: {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
