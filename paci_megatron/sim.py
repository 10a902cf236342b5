"""Discrete-event simulation of pipeline schedules: PACI, 1F1B with flush, interleaved
1F1B, GPipe; and a stage-balance advisor.

Each stage executes its actions in the order the planner gives (:mod:`paci_megatron.plan`:
the same plan the runtime executes), as early as its dependencies allow: ``F j`` on stage
``s`` needs activation ``j`` from ``s - 1`` (its forward end plus the communication
time), ``B j`` needs the gradient from ``s + 1``, and a stage runs one action at a time.
From the resulting timeline: makespan, utilisation and bubble fraction per stage, peak
micro-batches in flight (activation memory), drift per micro-batch, a timeline picture
(PNG) whose blocks show the micro-batch and the weight version used, and a Chrome /
Perfetto trace.

Schedules:

- ``paci``: no flush; update after every ``a`` backwards; one drain at the end.
- ``1f1b``: Megatron's 1F1B with a flush (drain) and one update per iteration.
- ``interleaved``: Megatron's interleaved 1F1B (``--num-layers-per-virtual-pipeline-stage``):
  each stage holds ``v`` model chunks, the order of ``forward_backward_pipelining_with_
  interleaving`` (its schedule table, megatron-core's ``get_schedule_table``, and its
  warm-up count), a flush and one update per iteration; its bubble is about ``v`` times
  smaller than 1F1B's.
- ``gpipe``: all forwards of an iteration, then all backwards, then the update.

:func:`balance` proposes the layer split of each schedule from per-layer, embedding and
output-layer times, and reports each schedule's best split and the best-vs-best ratios.

Command line: ``python -m paci_megatron.sim --stages 4 --microbatches 8 --iterations 4``;
``python -m paci_megatron.sim --balance --layers 24 --stages 8 --microbatches 8
--layer-ms 4.12 6.63 --output-ms 12.69 8.09``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import sys
import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

from .plan import Action, Kind, StageState, measure_drift, plan_call, plan_drain
from .telemetry import TimelineEvent, write_chrome_trace

__all__ = ["SimResult", "stage_actions", "interleaved_actions", "simulate", "plot_timeline",
           "flush_utilisation", "StageCosts", "split_flags", "balance", "main"]

SCHEDULES = ("paci", "1f1b", "interleaved", "gpipe")


@dataclass
class SimResult:
    """Timeline and statistics of one simulated run.

    Attributes:
        events: every :class:`TimelineEvent`, in execution order per stage.
        makespan: end of the last action, seconds.
        busy: per stage, seconds spent computing (forward, backward, update).
        utilisation: per stage, ``busy / makespan``.
        bubble_fraction: ``1 - mean(utilisation)``.
        peak_in_flight: per stage, most micro-batches forwarded and not yet backwarded
            (activation memory in micro-batches; interleaved: model-chunk forwards over
            ``v``, in micro-batches of the whole stage).
        drift_max: per stage, the largest drift of any micro-batch.
    """

    schedule: str
    events: List[TimelineEvent]
    makespan: float
    busy: List[float]
    utilisation: List[float]
    bubble_fraction: float
    peak_in_flight: List[float]
    drift_max: List[int]
    drift: Dict[int, Dict[int, int]] = field(default_factory=dict)


def stage_actions(schedule: str, num_stages: int, stage: int, num_microbatches: int,
                  iterations: int, accumulation: Optional[int] = None) -> List[Action]:
    """The ordered actions of one stage for ``iterations`` training iterations.

    Raises:
        ValueError: unknown schedule, or (``gpipe``/``1f1b``) an accumulation factor other
            than ``num_microbatches``.
    """
    a = accumulation or num_microbatches
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}: choose from {SCHEDULES}")
    if schedule == "interleaved":
        raise ValueError("interleaved: use interleaved_actions (its actions carry a model chunk)")
    if schedule != "paci" and a != num_microbatches:
        raise ValueError(f"{schedule} updates once per iteration: accumulation must be m")
    out: List[Action] = []
    state = StageState()
    for _ in range(iterations):
        if schedule == "gpipe":
            base = state.forwarded
            out += [Action(stage, Kind.FORWARD, base + j) for j in range(num_microbatches)]
            out += [Action(stage, Kind.BACKWARD, base + j) for j in range(num_microbatches)]
            state = StageState(base + num_microbatches, base + num_microbatches, 0,
                               state.version + 1)
            out.append(Action(stage, Kind.UPDATE, state.version))
            continue
        acts, state = plan_call(num_stages, stage, num_microbatches, a, state)
        out += acts
        if schedule == "1f1b":
            acts, state = plan_drain(num_stages, stage, a, state)
            out += acts
    if schedule == "paci":
        out += plan_drain(num_stages, stage, a, state)[0]
    return out


def interleaved_actions(num_stages: int, stage: int, num_microbatches: int,
                        virtual_stages: int, iterations: int) -> List[Tuple[int, Action]]:
    """``(model chunk, action)`` of one stage under Megatron's interleaved 1F1B.

    The order of ``forward_backward_pipelining_with_interleaving`` with its default
    ``microbatch_group_size_per_vp_stage = P``: forwards follow megatron-core's
    ``get_schedule_table(m, v, P)``, backwards the same table with the chunks reversed;
    ``(P - s - 1) * 2 + (v - 1) * P`` warm-up forwards (``get_pp_rank_microbatches``),
    then one forward and one backward per step, the cool-down, a flush and one update per
    iteration. Model chunk ``c`` of stage ``s`` is virtual stage ``c * P + s``.

    Raises:
        ValueError: ``v < 2`` or ``m < P`` (Megatron refuses a micro-batch group larger
            than ``m``).
    """
    with warnings.catch_warnings():  # megatron-core's notes on Apex / Transformer Engine
        warnings.simplefilter("ignore", UserWarning)
        from megatron.core.pipeline_parallel.schedules import get_schedule_table

    P, m, v = num_stages, num_microbatches, virtual_stages
    if v < 2:
        raise ValueError(f"interleaved 1F1B needs at least 2 model chunks per stage, got {v}")
    if m < P:
        raise ValueError(f"interleaved 1F1B needs m >= P (Megatron's micro-batch group is P): "
                         f"m = {m}, P = {P}")
    table = get_schedule_table(m, v, P)
    total = m * v
    warmup = min(total, (P - stage - 1) * 2 + (v - 1) * P)
    out: List[Tuple[int, Action]] = []
    for it in range(iterations):
        base = it * m

        def fwd(k):
            mb, chunk = table[k]
            return chunk, Action(stage, Kind.FORWARD, base + mb)

        def bwd(k):
            mb, chunk = table[k]
            return v - 1 - chunk, Action(stage, Kind.BACKWARD, base + mb)

        out += [fwd(k) for k in range(warmup)]
        for k in range(total - warmup):
            out += [fwd(warmup + k), bwd(k)]
        out += [bwd(k) for k in range(total - warmup, total)]
        out.append((0, Action(stage, Kind.UPDATE, it + 1)))
    return out


def _per_stage(value, count: int, what: str = "stage") -> List[float]:
    if isinstance(value, (int, float)):
        return [float(value)] * count
    if len(value) != count:
        raise ValueError(f"need one time per {what} ({count}), got {len(value)}")
    return [float(v) for v in value]


def _per_virtual_stage(value, P: int, v: int) -> List[float]:
    """Seconds per virtual stage ``c * P + s``: one number or one per stage (each chunk
    1/v of it), or one per virtual stage."""
    if not isinstance(value, (int, float)) and len(value) == P * v and v > 1:
        return [float(x) for x in value]
    per_stage = _per_stage(value, P)
    return [per_stage[vs % P] / v for vs in range(P * v)]


def simulate(schedule: str, num_stages: int, num_microbatches: int, iterations: int,
             forward_s=1.0, backward_s=2.0, comm_s: float = 0.0, update_s=0.0,
             accumulation: Optional[int] = None, virtual_stages: int = 2) -> SimResult:
    """Simulate ``iterations`` iterations of ``schedule``.

    Args:
        forward_s / backward_s: seconds per micro-batch forward / backward, one number or
            one per stage; ``interleaved`` also takes one per virtual stage (``P * v``,
            in the order ``c * P + s``), else each chunk takes ``1 / v`` of its stage's.
        comm_s: seconds from the end of an action to the arrival of its activation or
            gradient at the neighbour stage.
        update_s: seconds per optimizer update, one number or one per stage.
        virtual_stages: ``v``, model chunks per stage (``interleaved`` only).

    Returns:
        :class:`SimResult`.

    Raises:
        ValueError: see :func:`stage_actions` and :func:`interleaved_actions`.
        RuntimeError: the actions cannot all run (a dependency never satisfied).
    """
    P = num_stages
    v = virtual_stages if schedule == "interleaved" else 1
    V = P * v
    tf, tb = _per_virtual_stage(forward_s, P, v), _per_virtual_stage(backward_s, P, v)
    tu = _per_stage(update_s, P)
    if schedule == "interleaved":
        plans = [interleaved_actions(P, s, num_microbatches, v, iterations) for s in range(P)]
    else:
        plans = [[(s, act) for act in stage_actions(schedule, P, s, num_microbatches,
                                                     iterations, accumulation)]
                 for s in range(P)]
    pos = [0] * P
    free = [0.0] * P
    version = [0] * P
    done_f: Dict[Tuple[int, int], float] = {}
    done_b: Dict[Tuple[int, int], float] = {}
    events: List[TimelineEvent] = []
    per_stage: List[List[TimelineEvent]] = [[] for _ in range(P)]
    while any(pos[s] < len(plans[s]) for s in range(P)):
        progressed = False
        for s in range(P):
            while pos[s] < len(plans[s]):
                chunk, act = plans[s][pos[s]]
                vs = chunk * P + s if v > 1 else s
                ready = free[s]
                if act.kind is Kind.FORWARD and vs > 0:
                    if (vs - 1, act.index) not in done_f:
                        break
                    ready = max(ready, done_f[(vs - 1, act.index)] + (comm_s if P > 1 else 0.0))
                elif act.kind is Kind.BACKWARD and vs < V - 1:
                    if (vs + 1, act.index) not in done_b:
                        break
                    ready = max(ready, done_b[(vs + 1, act.index)] + (comm_s if P > 1 else 0.0))
                cost = {Kind.FORWARD: tf[vs], Kind.BACKWARD: tb[vs], Kind.UPDATE: tu[s]}[act.kind]
                ev = TimelineEvent(s, act.kind, act.index, ready, ready + cost, version[s])
                events.append(ev)
                per_stage[s].append(ev)
                free[s] = ev.end
                if act.kind is Kind.FORWARD:
                    done_f[(vs, act.index)] = ev.end
                elif act.kind is Kind.BACKWARD:
                    done_b[(vs, act.index)] = ev.end
                else:
                    version[s] = act.index
                pos[s] += 1
                progressed = True
        if not progressed:
            stuck = {s: str(plans[s][pos[s]][1]) for s in range(P) if pos[s] < len(plans[s])}
            raise RuntimeError(f"simulation cannot proceed: {stuck}")
    makespan = max(ev.end for ev in events)
    busy = [sum(ev.end - ev.start for ev in per_stage[s]) for s in range(P)]
    util = [b / makespan for b in busy]
    peaks, drift = [], {}
    for s in range(P):
        in_flight = peak = 0
        for _, act in plans[s]:
            in_flight += {Kind.FORWARD: 1, Kind.BACKWARD: -1, Kind.UPDATE: 0}[act.kind]
            peak = max(peak, in_flight)
        peaks.append(peak if v == 1 else peak / v)
        drift[s] = measure_drift([act for _, act in plans[s]]) if v == 1 else {}
    return SimResult(
        schedule=schedule, events=events, makespan=makespan, busy=busy, utilisation=util,
        bubble_fraction=1.0 - sum(util) / P, peak_in_flight=peaks,
        drift_max=[max(drift[s].values(), default=0) for s in range(P)], drift=drift,
    )


@dataclass(frozen=True)
class StageCosts:
    """Seconds of the pieces a stage is built from, one micro-batch each: a transformer
    layer, the input embedding (first stage) and the output layer with the loss (last
    stage), forward and backward. Measured (``benchmarks/device_check.py``) or given."""

    layer_forward_s: float
    layer_backward_s: float
    embedding_forward_s: float = 0.0
    embedding_backward_s: float = 0.0
    output_forward_s: float = 0.0
    output_backward_s: float = 0.0

    @classmethod
    def from_stage_times(cls, forward_s: Sequence[float], backward_s: Sequence[float],
                         layers: int) -> "StageCosts":
        """The pieces from measured whole stages: ``forward_s`` / ``backward_s`` are the
        seconds of the first, a middle and the last stage (``[3]`` each, one micro-batch),
        each holding ``layers`` transformer layers (``benchmarks/device_check.py``'s check
        (d)). A layer is the middle stage over ``layers``; the embedding and the output
        layer with the loss are what the first and last stage take beyond a middle one
        (at least 0: a difference within the timing noise).

        Raises:
            ValueError: not three times each, or ``layers < 1``.
        """
        if len(forward_s) != 3 or len(backward_s) != 3 or layers < 1:
            raise ValueError("need the first, a middle and the last stage's forward and "
                             f"backward seconds and layers >= 1 (got {len(forward_s)}, "
                             f"{len(backward_s)} times and {layers} layers)")
        (f0, f1, f2), (b0, b1, b2) = forward_s, backward_s
        return cls(f1 / layers, b1 / layers, max(f0 - f1, 0.0), max(b0 - b1, 0.0),
                   max(f2 - f1, 0.0), max(b2 - b1, 0.0))

    def seconds(self, split: Sequence[int]) -> Tuple[List[float], List[float]]:
        """``(forward_s, backward_s)`` per (virtual) stage of ``split`` (transformer layers
        per stage, in order; for the interleaved schedule per virtual stage ``c * P + s``):
        the first holds the embedding, the last the output layer and loss."""
        fwd = [n * self.layer_forward_s for n in split]
        bwd = [n * self.layer_backward_s for n in split]
        fwd[0] += self.embedding_forward_s
        bwd[0] += self.embedding_backward_s
        fwd[-1] += self.output_forward_s
        bwd[-1] += self.output_backward_s
        return fwd, bwd


def split_flags(split: Sequence[int]) -> List[str]:
    """The Megatron-LM flags that build ``split`` (transformer layers per stage; also the
    flags of ``examples/pretrain_gpt.py``): none for an even split;
    ``--decoder-first-pipeline-num-layers`` / ``--decoder-last-pipeline-num-layers`` when
    only the first and last stages differ (megatron-core's
    ``num_layers_in_first/last_pipeline_stage``: both above 0, the middle stages equal);
    else ``--pipeline-model-parallel-layout`` (``E`` embedding, ``t`` a layer, ``L`` the
    loss, ``|`` between stages: megatron-core's ``PipelineParallelLayerLayout``)."""
    split = list(split)
    if len(set(split)) == 1:
        return []
    middle = split[1:-1]
    if split[0] > 0 and split[-1] > 0 and len(set(middle)) <= 1 and all(middle):
        return ["--decoder-first-pipeline-num-layers", str(split[0]),
                "--decoder-last-pipeline-num-layers", str(split[-1])]
    stages = [f"t*{n}" if n > 1 else "t" * n for n in split]
    return ["--pipeline-model-parallel-layout", "E" + "|".join(stages) + "L"]


def seconds_per_iteration(schedule: str, num_stages: int, num_microbatches: int,
                          forward_s, backward_s, comm_s: float = 0.0, update_s=0.0,
                          accumulation: Optional[int] = None, virtual_stages: int = 2,
                          iterations: int = 16) -> float:
    """Steady-state seconds per iteration. The flushing schedules repeat the same
    iteration: one iteration's makespan. PACI never flushes: the makespan difference
    between ``4 + iterations`` and 4 iterations over ``iterations`` (its fill and drain
    cancel; with unequal stages it approaches the slowest stage's ``m (F_s + B_s)``
    from below as ``iterations`` grows). Arguments as :func:`simulate`."""
    def run(k):
        return simulate(schedule, num_stages, num_microbatches, k, forward_s, backward_s,
                        comm_s, update_s, accumulation, virtual_stages).makespan
    if schedule != "paci":
        return run(1)
    return (run(4 + iterations) - run(4)) / iterations


def _splits(num_layers: int, stage_s: Sequence[float], bound: float, num_stages: int,
            fixed: Sequence[float]) -> Iterator[Tuple[int, ...]]:
    """Layers per stage (first and last may hold none, the others at least one) whose
    every stage costs at most ``bound`` seconds: ``stage_s`` is one layer's forward plus
    backward, ``fixed`` each stage's embedding / output-layer seconds."""
    def rec(s, left, prefix):
        if s == num_stages - 1:
            if fixed[s] + left * stage_s <= bound * (1 + 1e-12):
                yield tuple(prefix + [left])
            return
        low = 0 if s == 0 else 1
        for n in range(low, left + 1):
            if fixed[s] + n * stage_s > bound * (1 + 1e-12):
                break
            yield from rec(s + 1, left - n, prefix + [n])
    yield from rec(0, num_layers, [])


def balance(num_layers: int, num_stages: int, num_microbatches: int, costs: StageCosts,
            accumulation: Optional[int] = None, comm_s: float = 0.0, update_s=0.0,
            virtual_stages: Optional[Sequence[int]] = None, tolerance: float = 0.1,
            max_candidates: int = 3000) -> Dict[str, object]:
    """Each schedule's best whole-layer split, and the best-vs-best ratios.

    Candidates: every split whose most expensive stage (forward + backward of one
    micro-batch) is within ``tolerance`` of the least possible (at most ``max_candidates``,
    the cheapest first), plus the even split. 1F1B simulates each candidate
    (:func:`seconds_per_iteration`); PACI, which runs at its slowest stage's pace,
    simulates the 8 with the cheapest slowest stage (the most even first). Each schedule
    keeps its own best. The interleaved 1F1B runs the even split over ``P * v`` virtual stages for each
    ``v`` of ``virtual_stages`` (default: every ``v >= 2`` with ``P v`` dividing ``L``,
    as ``--num-layers-per-virtual-pipeline-stage`` needs) where ``m >= P``, on the even
    split over the ``P v`` virtual stages (the embedding on virtual stage 0, the output
    layer on the last), on each of the 200 cheapest candidates' stage totals spread
    over the stage's chunks, and on the 200 cheapest splits balanced over the virtual
    stages themselves (a virtual stage may then hold only the output layer and loss:
    ``--pipeline-model-parallel-layout`` ``...|L``), its own best kept. The simulator
    charges ``comm_s`` per transfer; the interleaved schedule makes ``v`` times more.

    Returns:
        ``{"schedules": {name: {"even": {...} | None, "best": {...}}}, "ceilings":
        {"paci_vs_<name>": ratio}}``; each entry holds ``split``, ``flags``
        (:func:`split_flags`) and ``seconds_per_iteration``; names ``paci``, ``1f1b``,
        ``interleaved_v<v>``. A ceiling is the other schedule's best seconds over PACI's
        best: the most time to accuracy PACI can gain if it loses nothing per iteration.

    Raises:
        ValueError: fewer than 2 stages, fewer layers than the middle stages need, or
            non-positive layer times.
    """
    P, L = num_stages, num_layers
    if P < 2 or L < P - 2 or L < 1:
        raise ValueError(f"balance needs P >= 2 and at least P - 2 layers: P = {P}, L = {L}")
    if costs.layer_forward_s + costs.layer_backward_s <= 0:
        raise ValueError("a layer's forward plus backward time must be above 0")
    layer = costs.layer_forward_s + costs.layer_backward_s
    fixed = [0.0] * P
    fixed[0] += costs.embedding_forward_s + costs.embedding_backward_s
    fixed[-1] += costs.output_forward_s + costs.output_backward_s
    # the least possible most-expensive stage: smallest bound with a split under it
    bounds = sorted({fixed[s] + n * layer for s in range(P) for n in range(L + 1)})
    best_bound = next(b for b in bounds if next(_splits(L, layer, b, P, fixed), None))
    candidates = sorted(_splits(L, layer, best_bound * (1 + tolerance), P, fixed),
                        key=lambda sp: max(f + n * layer for f, n in zip(fixed, sp)))
    candidates = candidates[:max_candidates]
    even = tuple([L // P] * P) if L % P == 0 else None
    if even and even not in candidates:
        candidates.append(even)

    def entry(schedule, split, v=2):
        fwd, bwd = costs.seconds(split)
        sec = seconds_per_iteration(schedule, P, num_microbatches, fwd, bwd, comm_s, update_s,
                                    accumulation if schedule == "paci" else None, v)
        return {"split": list(split), "flags": split_flags(split) if len(split) == P else [],
                "seconds_per_iteration": sec}

    def spread(split):  # how uneven: spread, then squared deviations from the mean
        return max(split) - min(split), sum((n - L / len(split)) ** 2 for n in split)

    out: Dict[str, Dict[str, object]] = {}
    # 1F1B: every candidate simulated (one iteration each)
    rows = {split: entry("1f1b", split) for split in candidates}
    best = min(rows, key=lambda sp: (round(rows[sp]["seconds_per_iteration"], 9), spread(sp)))
    out["1f1b"] = {"even": rows.get(even) if even else None, "best": rows[best]}
    # PACI runs at its slowest stage's pace: the candidates with the cheapest slowest stage
    # (the most even first) are simulated over a long run
    key = {sp: max(f + n * layer for f, n in zip(fixed, sp)) for sp in candidates}
    short = sorted(candidates, key=lambda sp: (key[sp], spread(sp)))[:8]
    rows = {split: entry("paci", split) for split in set(short) | ({even} if even else set())}
    best = min(short, key=lambda sp: (round(rows[sp]["seconds_per_iteration"], 9), spread(sp)))
    out["paci"] = {"even": rows.get(even) if even else None, "best": rows[best]}
    if virtual_stages is None:
        virtual_stages = [v for v in range(2, L // P + 1) if L % (P * v) == 0]
    for v in virtual_stages:
        if v < 2 or num_microbatches < P:
            continue
        # the even split over P v virtual stages where it exists, and each of the 1F1B
        # candidates' stage totals spread over the stage's v chunks (extra layers to the
        # earlier chunks)
        splits = {}
        if L % (P * v) == 0:
            splits[tuple([L // (P * v)] * (P * v))] = None
        for sp in sorted(candidates, key=lambda sp: (key[sp], spread(sp)))[:200]:
            chunks = [[n // v + (c < n % v) for c in range(v)] for n in sp]
            splits.setdefault(tuple(chunks[vs % P][vs // P] for vs in range(P * v)), None)
        # and the splits balanced over the P v virtual stages themselves
        fixed_v = [0.0] * (P * v)
        fixed_v[0], fixed_v[-1] = fixed[0], fixed[-1]
        if L >= P * v - 2:
            bounds_v = sorted({fixed_v[i] + n * layer for i in (0, P * v - 1, 1)
                               for n in range(L + 1)})
            low = next(b for b in bounds_v if next(_splits(L, layer, b, P * v, fixed_v), None))
            found = itertools.islice(_splits(L, layer, low * (1 + tolerance), P * v, fixed_v),
                                     max_candidates)
            for sp in sorted(found, key=lambda sp: (max(f + n * layer
                                                        for f, n in zip(fixed_v, sp)),
                                                    spread(sp)))[:200]:
                splits.setdefault(sp, None)
        rows = {split: entry("interleaved", split, v) for split in splits}
        for split, row in rows.items():
            row["flags"] = (["--num-layers-per-virtual-pipeline-stage", str(split[0])]
                            if len(set(split)) == 1 else split_flags(split))
        even_v = tuple([L // (P * v)] * (P * v)) if L % (P * v) == 0 else None
        best = min(rows, key=lambda sp: (round(rows[sp]["seconds_per_iteration"], 9), spread(sp)))
        out[f"interleaved_v{v}"] = {"even": rows.get(even_v), "best": rows[best]}
    paci = out["paci"]["best"]["seconds_per_iteration"]
    ceilings = {f"paci_vs_{name}": out[name]["best"]["seconds_per_iteration"] / paci
                for name in out if name != "paci"}
    return {"schedules": out, "ceilings": ceilings}


def flush_utilisation(num_stages: int, num_microbatches: int) -> float:
    """Utilisation of a flushing pipeline with equal stages: ``m / (m + P - 1)``."""
    return num_microbatches / (num_microbatches + num_stages - 1)


def plot_timeline(results: Sequence[SimResult], path: str, width_in: float = 12.0) -> None:
    """Timeline picture (PNG) readable at screen width: one panel per result, one row per
    stage, ``width_in`` inches wide. Blocks wide enough for text show the micro-batch and
    the weight version they used (``F3/v1``); a legend names the colours. Needs matplotlib.

    Raises:
        ImportError: matplotlib is not installed (``pip install matplotlib``).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    colors = {Kind.FORWARD: "#4c9be8", Kind.BACKWARD: "#f28e2b", Kind.UPDATE: "#59a14f"}
    span = max(r.makespan for r in results)
    P = len(results[0].busy)
    fig, axes = plt.subplots(len(results), 1, squeeze=False,
                             figsize=(width_in, 1.0 + 0.4 * (P + 1) * len(results)))
    for ax, res in zip(axes[:, 0], results):
        for ev in res.events:
            width = max(ev.end - ev.start, span * 0.002)
            ax.broken_barh([(ev.start, width)], (P - 1 - ev.stage + 0.1, 0.8),
                           facecolors=colors[ev.kind], edgecolor="white", linewidth=0.5)
            room = width / span * width_in * 0.8 / 0.09  # characters that fit, fontsize 8
            text = next((t for t in (ev.label, ev.label.split("/")[0]) if len(t) <= room), None)
            if ev.kind is not Kind.UPDATE and text:
                ax.text(ev.start + width / 2, P - 1 - ev.stage + 0.5, text, ha="center",
                        va="center", fontsize=8)
        ax.set_yticks([P - 1 - s + 0.5 for s in range(P)], [f"stage {s}" for s in range(P)],
                      fontsize=9)
        ax.set_xlim(0, span)
        ax.set_title(f"{res.schedule}: bubble {res.bubble_fraction:.1%}, "
                     f"drift max {res.drift_max}", fontsize=10)
    axes[0, 0].legend(handles=[Patch(color=c, label=k.name.lower()) for k, c in colors.items()],
                      loc="lower right", bbox_to_anchor=(1.0, 1.0), fontsize=8, ncol=3,
                      frameon=False)
    axes[-1, 0].set_xlabel("time (s)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def measured_costs(path: str, micro_batch_size: Optional[int] = None,
                   link_gbps: Optional[float] = None,
                   layers: Optional[int] = None) -> Tuple[StageCosts, float, Dict[str, Any]]:
    """:class:`StageCosts` and the per-transfer seconds from a
    ``benchmarks/device_check.py`` report (its check (d): first, middle and last stage
    times per micro-batch size, a transfer time per assumed link speed).

    Args:
        path: the report (JSON).
        micro_batch_size: the row's micro-batch (default: the first measured).
        link_gbps: the row's link speed in GB/s (default: the fastest).
        layers: layers of each measured stage (default: the report's
            ``layers_per_stage``).

    Returns:
        ``(costs, comm_s, row)``.

    Raises:
        ValueError: the report has no stage times, no such row, or does not say how many
            layers a measured stage held and ``layers`` is not given.
    """
    with open(path, encoding="utf-8") as f:
        report = json.load(f)
    projection = report.get("projection") or {}
    rows = projection.get("rows") or []
    if not rows:
        raise ValueError(f"{path} holds no stage times (benchmarks/device_check.py's check d)")
    mbs = micro_batch_size if micro_batch_size is not None else rows[0]["micro_batch"]
    rows = [r for r in rows if r["micro_batch"] == mbs]
    if link_gbps is not None:
        rows = [r for r in rows if r["link_GBps"] == link_gbps]
    if not rows:
        raise ValueError(f"{path}: no stage times at micro-batch {mbs}"
                         + (f" and {link_gbps:g} GB/s" if link_gbps is not None else ""))
    row = max(rows, key=lambda r: r["link_GBps"])
    layers = layers or projection.get("layers_per_stage")
    if not layers:
        raise ValueError(f"{path} does not say how many layers each measured stage held: "
                         "give --measured-layers")
    t = row["stage_seconds"]
    return StageCosts.from_stage_times(t["forward_s"], t["backward_s"], layers), row["comm_s"], row


def _balance_main(p: argparse.ArgumentParser, args) -> int:
    """``--balance``: each schedule's best split from per-layer times; a table and JSON."""
    if args.device_check:
        if args.layer_ms is not None:
            p.error("give either --device-check or --layer-ms, not both")
        try:
            costs, comm_s, row = measured_costs(args.device_check, args.micro_batch_size,
                                                args.link_gbps, args.measured_layers)
        except (OSError, ValueError, KeyError) as exc:
            p.error(f"--device-check: {exc}")
        ms = 1e3
        args.layer_ms = [costs.layer_forward_s * ms, costs.layer_backward_s * ms]
        args.embedding_ms = [costs.embedding_forward_s * ms, costs.embedding_backward_s * ms]
        args.output_ms = [costs.output_forward_s * ms, costs.output_backward_s * ms]
        args.comm_ms = comm_s * ms
        print(f"measured: {args.device_check}, micro-batch {row['micro_batch']}, link "
              f"{row['link_GBps']:g} GB/s: a layer {args.layer_ms[0]:.2f} / "
              f"{args.layer_ms[1]:.2f} ms, embedding {args.embedding_ms[0]:.2f} / "
              f"{args.embedding_ms[1]:.2f} ms, output layer and loss {args.output_ms[0]:.2f} / "
              f"{args.output_ms[1]:.2f} ms, a transfer {args.comm_ms:.3f} ms")
    if args.layers is None or args.layer_ms is None:
        p.error("--balance needs --layers and --layer-ms FORWARD BACKWARD (milliseconds) "
                "or --device-check REPORT")
    times = [*args.layer_ms, *args.embedding_ms, *args.output_ms, args.comm_ms, args.update_ms]
    if not all(0 <= t < float("inf") for t in times) or sum(args.layer_ms) <= 0:
        p.error("times must be finite and >= 0, a layer's forward plus backward above 0")
    if args.stages < 2 or args.layers < args.stages - 2:
        p.error(f"--balance needs --stages >= 2 and --layers >= stages - 2 (got "
                f"{args.stages} stages, {args.layers} layers)")
    ms = 1e-3
    costs = StageCosts(args.layer_ms[0] * ms, args.layer_ms[1] * ms, args.embedding_ms[0] * ms,
                       args.embedding_ms[1] * ms, args.output_ms[0] * ms, args.output_ms[1] * ms)
    result = balance(args.layers, args.stages, args.microbatches, costs, args.accumulation,
                     args.comm_ms * ms, args.update_ms * ms, args.virtual_stages)
    print(f"L={args.layers} P={args.stages} m={args.microbatches} "
          f"a={args.accumulation or args.microbatches}: each schedule on its own best split")
    print("| schedule | even split (ms/iteration) | best split | ms/iteration | flags |")
    print("| --- | --- | --- | --- | --- |")
    for name, row in result["schedules"].items():
        even, best = row["even"], row["best"]
        even_text = f"{even['seconds_per_iteration'] / ms:.1f}" if even else "not even"
        print(f"| {name} | {even_text} | {best['split']} | "
              f"{best['seconds_per_iteration'] / ms:.1f} | {' '.join(best['flags']) or '(even)'} |")
    for name, ratio in result["ceilings"].items():
        print(f"ceiling {name.replace('_vs_', ' over ')}: {ratio:.3f}x (best split against best split)")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"layers": args.layers, "stages": args.stages,
                       "microbatches": args.microbatches, "costs_s": costs.__dict__, **result},
                      f, indent=1)
        print(f"wrote {args.json}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command line: simulate PACI, 1F1B and GPipe side by side; print a table."""
    p = argparse.ArgumentParser(prog="python -m paci_megatron.sim", description=__doc__.split("\n")[0])
    p.add_argument("--stages", type=int, default=4)
    p.add_argument("--microbatches", type=int, default=8)
    p.add_argument("--iterations", type=int, default=4)
    p.add_argument("--accumulation", type=int, default=None, help="PACI's a (default m)")
    p.add_argument("--forward-ms", type=float, default=1.0)
    p.add_argument("--backward-ms", type=float, default=2.0)
    p.add_argument("--comm-ms", type=float, default=0.0)
    p.add_argument("--schedules", nargs="+", default=None, choices=SCHEDULES,
                   help="default: all (the interleaved 1F1B where m >= P)")
    p.add_argument("--png", default=None, help="write the timeline picture here")
    p.add_argument("--trace", default=None, help="write a Chrome trace per schedule (PATH.<schedule>.json)")
    p.add_argument("--json", default=None, help="write the table as JSON")
    g = p.add_argument_group("--balance: propose each schedule's layer split")
    g.add_argument("--balance", action="store_true",
                   help="search whole-layer splits for PACI, 1F1B and the interleaved 1F1B")
    g.add_argument("--layers", type=int, default=None, help="transformer layers (--num-layers)")
    g.add_argument("--layer-ms", type=float, nargs=2, metavar=("FORWARD", "BACKWARD"),
                   default=None, help="one layer, one micro-batch")
    g.add_argument("--embedding-ms", type=float, nargs=2, default=(0.0, 0.0),
                   metavar=("FORWARD", "BACKWARD"), help="input embedding (first stage)")
    g.add_argument("--output-ms", type=float, nargs=2, default=(0.0, 0.0),
                   metavar=("FORWARD", "BACKWARD"), help="output layer and loss (last stage)")
    g.add_argument("--update-ms", type=float, default=0.0, help="one optimizer update")
    g.add_argument("--device-check", metavar="REPORT", default=None,
                   help="take the layer, embedding, output-layer and transfer times from "
                        "benchmarks/device_check.py's report (its stage times)")
    g.add_argument("--measured-layers", type=int, default=None,
                   help="layers of each measured stage (default: the report's)")
    g.add_argument("--micro-batch-size", type=int, default=None,
                   help="the report's micro-batch to use (default: its first)")
    g.add_argument("--link-gbps", type=float, default=None,
                   help="the report's link speed to use, GB/s (default: its fastest)")
    g.add_argument("--virtual-stages", type=int, nargs="+", default=None,
                   help="v of the interleaved 1F1B (default: every v with P v dividing L)")
    args = p.parse_args(argv)
    if min(args.stages, args.microbatches, args.iterations) < 1:
        p.error("--stages, --microbatches and --iterations must be >= 1")
    times = (args.forward_ms, args.backward_ms, args.comm_ms)
    if not all(0 <= t < float("inf") for t in times) or args.forward_ms + args.backward_ms <= 0:
        p.error("--forward-ms, --backward-ms, --comm-ms must be finite and >= 0, forward plus "
                "backward above 0")
    if args.accumulation is not None and (args.accumulation < 1
                                          or args.microbatches % args.accumulation):
        p.error(f"--accumulation must divide --microbatches {args.microbatches} (as PACI requires)")
    for path in (args.json, args.png, args.trace):
        if path and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
            p.error(f"{path}: its folder does not exist")
    if args.virtual_stages and min(args.virtual_stages) < 2:
        p.error("--virtual-stages: each v must be >= 2")
    if args.balance:
        return _balance_main(p, args)
    if args.schedules is None:
        args.schedules = [s for s in SCHEDULES
                          if s != "interleaved" or args.microbatches >= args.stages]
    if "interleaved" in args.schedules and args.microbatches < args.stages:
        p.error("the interleaved 1F1B needs --microbatches >= --stages (Megatron's group size)")
    results = [simulate(s, args.stages, args.microbatches, args.iterations,
                        args.forward_ms / 1e3, args.backward_ms / 1e3, args.comm_ms / 1e3,
                        accumulation=args.accumulation if s == "paci" else None,
                        virtual_stages=(args.virtual_stages or [2])[0])
               for s in args.schedules]
    rows = []
    print(f"P={args.stages} m={args.microbatches} iterations={args.iterations} "
          f"(flush formula m/(m+P-1) = {flush_utilisation(args.stages, args.microbatches):.3f})")
    print("| schedule | time (ms) | utilisation | bubble | peak in flight | drift max |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in results:
        util = sum(r.utilisation) / len(r.utilisation)
        rows.append({"schedule": r.schedule, "makespan_s": r.makespan, "utilisation": util,
                     "bubble_fraction": r.bubble_fraction, "peak_in_flight": r.peak_in_flight,
                     "drift_max": r.drift_max})
        print(f"| {r.schedule} | {r.makespan * 1e3:.1f} | {util:.3f} | {r.bubble_fraction:.3f} "
              f"| {r.peak_in_flight} | {r.drift_max} |")
    written = []
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(rows, f, indent=1)
        written.append(args.json)
    if args.trace:
        for r in results:
            write_chrome_trace(r.events, f"{args.trace}.{r.schedule}.json", len(r.busy))
            written.append(f"{args.trace}.{r.schedule}.json")
    if args.png:
        try:
            plot_timeline(results, args.png)
        except ImportError:
            p.exit(2, "error: --png needs matplotlib: pip install matplotlib\n")
        written.append(args.png)
    for path in written:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
