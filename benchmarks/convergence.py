"""Convergence of PACI against Megatron's 1F1B on the tiny GPT, at equal tokens.

Runs ``examples/pretrain_gpt.py`` twice, one schedule after the other, with the same
flags, seed and data (the embedded standard-library corpus unless ``--recipe-args``
says otherwise), each under ``torchrun`` with one process per stage on CPU, and reads
their ``--log-json`` logs. Both runs see the same micro-batches in the same order, so
the logs compare the schedules at equal tokens: iteration ``i`` has consumed
``i * global_batch_size * seq_length`` tokens in either.

Outputs: a markdown table of the validation loss at every evaluation, the final gap
``(val_paci - val_1f1b) / val_1f1b`` (relative, in percent), a PNG with the training
loss (mean over each log interval) and the validation loss against tokens, and a JSON
file with every logged point.

Usage::

    python benchmarks/convergence.py --output benchmarks/results/convergence.json \\
        --png docs/convergence.png

``--from-logs`` re-reads existing logs in ``--runs-dir`` (no training) to redraw.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from typing import Any, Dict, List, Optional, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = os.path.join("examples", "pretrain_gpt.py")  # relative to ROOT, the runs' cwd
SCHEDULES = ("paci", "1f1b")


def recipe_command(schedule: str, args: argparse.Namespace, log_path: str) -> List[str]:
    """The ``torchrun`` command line of one run (one process per stage)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(args.stages),
           "--master-port", str(_free_port()), RECIPE, "--device", "cpu",
           "--pipeline-model-parallel-size", str(args.stages),
           "--pipeline-schedule", schedule, "--untie-embeddings-and-output-weights",
           "--train-iters", str(args.train_iters), "--lr", str(args.lr),
           "--min-lr", str(args.min_lr), "--lr-warmup-iters", str(args.lr_warmup_iters),
           "--clip-grad", str(args.clip_grad), "--global-batch-size", str(args.global_batch_size),
           "--micro-batch-size", str(args.micro_batch_size), "--seq-length", str(args.seq_length),
           "--eval-interval", str(args.eval_interval), "--log-interval", str(args.log_interval),
           "--seed", str(args.seed), "--log-json", log_path]
    return cmd + shlex.split(args.recipe_args)


def _free_port() -> int:
    from harness import free_port

    return free_port()


def read_log(path: str, tokens_per_iteration: int) -> Dict[str, List[Dict[str, float]]]:
    """Training and validation points of one ``--log-json`` file.

    Returns ``{"train": [{"iteration", "tokens", "loss"}], "val": [...]}``; ``tokens`` =
    ``iteration * tokens_per_iteration``.

    Raises:
        FileNotFoundError: no log at ``path``.
        ValueError: the log holds no validation loss.
    """
    train, val = [], []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            rec = json.loads(line)
            it = int(rec["iteration"])
            point = {"iteration": it, "tokens": it * tokens_per_iteration}
            if rec.get("lm_loss") is not None:
                train.append(dict(point, loss=float(rec["lm_loss"])))
            if rec.get("val_loss") is not None:
                val.append(dict(point, loss=float(rec["val_loss"])))
    if not val:
        raise ValueError(f"{path} holds no val_loss: did the run finish?")
    return {"train": train, "val": val}


def final_gap(paci_val: float, ref_val: float) -> float:
    """Relative gap of PACI's final validation loss: ``(paci - 1f1b) / 1f1b``."""
    if ref_val <= 0:
        raise ValueError(f"the 1F1B validation loss must be positive, got {ref_val}")
    return (paci_val - ref_val) / ref_val


def plot(curves: Dict[str, Dict[str, List[Dict[str, float]]]], path: str, title: str) -> None:
    """Two panels, training and validation loss against tokens, one line per schedule."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    style = {"paci": dict(color="#e15759", marker=None), "1f1b": dict(color="#4e79a7", marker=None)}
    for schedule, data in curves.items():
        for ax, key in zip(axes, ("train", "val")):
            pts = data[key]
            ax.plot([p["tokens"] / 1e6 for p in pts], [p["loss"] for p in pts],
                    label=schedule.upper() if schedule == "paci" else "Megatron 1F1B",
                    marker="o" if key == "val" else None, markersize=3, **{
                        k: v for k, v in style.get(schedule, {}).items() if k != "marker"})
    axes[0].set_title("training loss (mean per log interval)", fontsize=9)
    axes[1].set_title("validation loss", fontsize=9)
    for ax in axes:
        ax.set_xlabel("tokens (millions)")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(curves: Dict[str, Dict[str, List[Dict[str, float]]]]) -> str:
    """Validation loss at every evaluation, both schedules, and the gap per row."""
    paci = {p["iteration"]: p for p in curves["paci"]["val"]}
    ref = {p["iteration"]: p for p in curves["1f1b"]["val"]}
    lines = ["| iteration | tokens | PACI val loss | 1F1B val loss | gap |",
             "| --- | --- | --- | --- | --- |"]
    for it in sorted(set(paci) & set(ref)):
        gap = final_gap(paci[it]["loss"], ref[it]["loss"])
        lines.append(f"| {it} | {paci[it]['tokens']} | {paci[it]['loss']:.3f} "
                     f"| {ref[it]['loss']:.3f} | {gap:+.2%} |")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command line: train both schedules, print the table and the final gap."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--stages", type=int, default=4, help="pipeline stages = processes")
    p.add_argument("--train-iters", type=int, default=300)
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    p.add_argument("--min-lr", type=float, default=3e-4)
    p.add_argument("--lr-warmup-iters", type=int, default=60)
    p.add_argument("--clip-grad", type=float, default=0.0, help="0: no clipping")
    p.add_argument("--global-batch-size", type=int, default=32)
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--seq-length", type=int, default=128)
    p.add_argument("--eval-interval", type=int, default=50)
    p.add_argument("--log-interval", type=int, default=10)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--recipe-args", default="",
                   help="more flags for examples/pretrain_gpt.py, one quoted string")
    p.add_argument("--runs-dir", default=os.path.join(ROOT, "runs", "convergence"),
                   help="where the two logs go (<schedule>.jsonl, <schedule>.out)")
    p.add_argument("--from-logs", action="store_true",
                   help="do not train: read the logs already in --runs-dir")
    p.add_argument("--png", default=None, help="write the loss-vs-tokens picture here")
    p.add_argument("--output", default=None, help="write the results as JSON here")
    p.add_argument("--max-gap", type=float, default=None,
                   help="exit 1 if the final relative gap exceeds this (e.g. 0.02)")
    args = p.parse_args(argv)
    for name in ("stages", "train_iters", "global_batch_size", "micro_batch_size",
                 "seq_length", "eval_interval", "log_interval"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.lr <= 0 or args.min_lr < 0 or args.lr_warmup_iters < 0 or args.clip_grad < 0:
        p.error("--lr must be > 0; --min-lr, --lr-warmup-iters, --clip-grad >= 0")
    if args.global_batch_size % args.micro_batch_size:
        p.error("--global-batch-size must be a multiple of --micro-batch-size")

    os.makedirs(args.runs_dir, exist_ok=True)
    tokens_per_iteration = args.global_batch_size * args.seq_length
    curves: Dict[str, Any] = {}
    commands: Dict[str, str] = {}
    seconds: Dict[str, Optional[float]] = {}
    for schedule in SCHEDULES:
        log_path = os.path.join(args.runs_dir, f"{schedule}.jsonl")
        if os.path.abspath(log_path).startswith(ROOT + os.sep):
            log_path = os.path.relpath(os.path.abspath(log_path), ROOT)
        cmd = recipe_command(schedule, args, log_path)
        commands[schedule] = shlex.join(["torchrun"] + cmd[3:])
        seconds[schedule] = None
        if not args.from_logs:
            print(f"> {schedule}: {commands[schedule]}", flush=True)
            t0 = time.time()
            with open(os.path.join(args.runs_dir, f"{schedule}.out"), "w") as out:
                rc = subprocess.run(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT).returncode
            seconds[schedule] = time.time() - t0
            if rc != 0:
                print(f"error: the {schedule} run failed (exit {rc}); its output is in "
                      f"{os.path.join(args.runs_dir, schedule + '.out')}", file=sys.stderr)
                return 2
        curves[schedule] = read_log(os.path.join(ROOT, log_path), tokens_per_iteration)
    last = {s: curves[s]["val"][-1] for s in SCHEDULES}
    if last["paci"]["iteration"] != last["1f1b"]["iteration"]:
        print("error: the two logs end at different iterations "
              f"({last['paci']['iteration']} vs {last['1f1b']['iteration']})", file=sys.stderr)
        return 2
    gap = final_gap(last["paci"]["loss"], last["1f1b"]["loss"])
    print(markdown(curves))
    print(f"final validation loss at {last['paci']['tokens']} tokens: PACI "
          f"{last['paci']['loss']:.4f}, 1F1B {last['1f1b']['loss']:.4f}, gap {gap:+.2%}")
    if args.png:
        os.makedirs(os.path.dirname(os.path.abspath(args.png)), exist_ok=True)
        plot(curves, args.png,
             f"tiny GPT, P={args.stages}, {args.train_iters} iterations, peak lr {args.lr:g}, "
             f"warm-up {args.lr_warmup_iters}, clip {args.clip_grad:g}: final val gap {gap:+.2%}")
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        import warnings

        warnings.filterwarnings("ignore", category=UserWarning)  # megatron-core: no Apex/TE
        from schedule_throughput import machine  # noqa: E402 (same folder)

        with open(args.output, "w", encoding="utf-8") as f:
            json.dump({"machine": machine(), "settings": vars(args), "commands": commands,
                       "wall_seconds": seconds,
                       "final_val_loss": {s: last[s]["loss"] for s in SCHEDULES},
                       "final_tokens": last["paci"]["tokens"], "final_gap": gap,
                       "curves": curves}, f, indent=1)
    if args.max_gap is not None and gap > args.max_gap:
        print(f"FAILED: final gap {gap:+.2%} exceeds {args.max_gap:.2%}")
        return 1
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    sys.path.insert(0, ROOT)
    sys.path.insert(0, os.path.join(ROOT, "tests"))  # the process harness
    sys.exit(main())
