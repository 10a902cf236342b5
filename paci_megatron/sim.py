"""Discrete-event simulation of pipeline schedules: PACI, 1F1B with flush, GPipe.

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
- ``gpipe``: all forwards of an iteration, then all backwards, then the update.

Command line: ``python -m paci_megatron.sim --stages 4 --microbatches 8 --iterations 4``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

from .plan import Action, Kind, StageState, measure_drift, plan_call, plan_drain
from .telemetry import TimelineEvent, write_chrome_trace

__all__ = ["SimResult", "stage_actions", "simulate", "plot_timeline", "flush_utilisation", "main"]

SCHEDULES = ("paci", "1f1b", "gpipe")


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
            (activation memory in micro-batches).
        drift_max: per stage, the largest drift of any micro-batch.
    """

    schedule: str
    events: List[TimelineEvent]
    makespan: float
    busy: List[float]
    utilisation: List[float]
    bubble_fraction: float
    peak_in_flight: List[int]
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


def _per_stage(value, num_stages: int) -> List[float]:
    if isinstance(value, (int, float)):
        return [float(value)] * num_stages
    if len(value) != num_stages:
        raise ValueError(f"need one time per stage ({num_stages}), got {len(value)}")
    return [float(v) for v in value]


def simulate(schedule: str, num_stages: int, num_microbatches: int, iterations: int,
             forward_s=1.0, backward_s=2.0, comm_s: float = 0.0, update_s=0.0,
             accumulation: Optional[int] = None) -> SimResult:
    """Simulate ``iterations`` iterations of ``schedule``.

    Args:
        forward_s / backward_s: seconds per micro-batch forward / backward, one number or
            one per stage.
        comm_s: seconds from the end of an action to the arrival of its activation or
            gradient at the neighbour stage.
        update_s: seconds per optimizer update, one number or one per stage.

    Returns:
        :class:`SimResult`.

    Raises:
        RuntimeError: the actions cannot all run (a dependency never satisfied).
    """
    P = num_stages
    tf, tb, tu = _per_stage(forward_s, P), _per_stage(backward_s, P), _per_stage(update_s, P)
    plans = [stage_actions(schedule, P, s, num_microbatches, iterations, accumulation)
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
                act = plans[s][pos[s]]
                ready = free[s]
                if act.kind is Kind.FORWARD and s > 0:
                    if (s - 1, act.index) not in done_f:
                        break
                    ready = max(ready, done_f[(s - 1, act.index)] + comm_s)
                elif act.kind is Kind.BACKWARD and s < P - 1:
                    if (s + 1, act.index) not in done_b:
                        break
                    ready = max(ready, done_b[(s + 1, act.index)] + comm_s)
                cost = {Kind.FORWARD: tf[s], Kind.BACKWARD: tb[s], Kind.UPDATE: tu[s]}[act.kind]
                ev = TimelineEvent(s, act.kind, act.index, ready, ready + cost, version[s])
                events.append(ev)
                per_stage[s].append(ev)
                free[s] = ev.end
                if act.kind is Kind.FORWARD:
                    done_f[(s, act.index)] = ev.end
                elif act.kind is Kind.BACKWARD:
                    done_b[(s, act.index)] = ev.end
                else:
                    version[s] = act.index
                pos[s] += 1
                progressed = True
        if not progressed:
            stuck = {s: str(plans[s][pos[s]]) for s in range(P) if pos[s] < len(plans[s])}
            raise RuntimeError(f"simulation cannot proceed: {stuck}")
    makespan = max(ev.end for ev in events)
    busy = [sum(ev.end - ev.start for ev in per_stage[s]) for s in range(P)]
    util = [b / makespan for b in busy]
    peaks, drift = [], {}
    for s in range(P):
        in_flight = peak = 0
        for act in plans[s]:
            in_flight += {Kind.FORWARD: 1, Kind.BACKWARD: -1, Kind.UPDATE: 0}[act.kind]
            peak = max(peak, in_flight)
        peaks.append(peak)
        drift[s] = measure_drift(plans[s])
    return SimResult(
        schedule=schedule, events=events, makespan=makespan, busy=busy, utilisation=util,
        bubble_fraction=1.0 - sum(util) / P, peak_in_flight=peaks,
        drift_max=[max(drift[s].values(), default=0) for s in range(P)], drift=drift,
    )


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
    p.add_argument("--schedules", nargs="+", default=list(SCHEDULES), choices=SCHEDULES)
    p.add_argument("--png", default=None, help="write the timeline picture here")
    p.add_argument("--trace", default=None, help="write a Chrome trace per schedule (PATH.<schedule>.json)")
    p.add_argument("--json", default=None, help="write the table as JSON")
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
    results = [simulate(s, args.stages, args.microbatches, args.iterations,
                        args.forward_ms / 1e3, args.backward_ms / 1e3, args.comm_ms / 1e3,
                        accumulation=args.accumulation if s == "paci" else None)
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
