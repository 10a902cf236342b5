"""Where fp16 overflows happen in Megatron's own 1F1B: on every stage at once, or on some.

    python benchmarks/fp16_overflow.py --output benchmarks/results/fp16_overflow.json

Why it decides ``--fp16`` under PACI. Megatron's dynamic loss scaling keeps one scale for
the whole model: the last stage multiplies each micro-batch's loss by it, every optimizer
unscales its gradients by it, and found-inf is reduced over the model-parallel group
(``MixedPrecisionOptimizer._unscale_main_grads_and_check_for_nan``), so when any stage
overflows every stage skips the step and the scale backs off everywhere. Under PACI each
stage updates on its own, with no collective across stages: an overflow can only be seen,
and the step skipped, by the stage where it happened (and by the stages its infinite input
gradients reach: those before it). A stage AFTER the overflowing one would apply a step
that 1F1B skipped, and the scale the last stage applies could back off only after a
message forward through the pipeline. PACI with fp16 therefore equals 1F1B exactly only as
long as every overflow shows on every stage.

This measures it: Megatron's 1F1B (megatron-core's schedule, ``finalize_model_grads``, its
fp16 optimizer with the dynamic grad scaler: initial scale ``--initial-loss-scale``, growth
every ``--loss-scale-window`` clean steps, Megatron's hysteresis 2) on a GPT of P stages on
CPU, fp16 weights and activations. Before each step every stage checks its own gradients
for Inf/NaN (the check the optimizer then reduces); after the step the skip and the scale
are read. Printed and written (JSON): the steps with an overflow, how many of them on every
stage and how many on some only (each pattern: the stages that overflowed), and the steps a
stage-local skip would have applied where 1F1B skipped.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections import Counter
from typing import Dict, List

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for folder in (os.path.join(ROOT, "examples"), os.path.dirname(os.path.abspath(__file__))):
    if folder not in sys.path:
        sys.path.insert(0, folder)


def _local_overflow(model) -> bool:
    """Inf/NaN in this stage's gradient buffers (before any reduction)."""
    bufs = [b.grad_data for chunk in model for b in chunk.buffers]
    return any(not torch.isfinite(b).all() for b in bufs)


def stage_run(rank: int, world: int, args: Dict) -> Dict:
    """One rank: Megatron's 1F1B with fp16 for ``args['iterations']`` iterations; per step,
    whether this stage's own gradients overflowed, whether the step was applied, the scale."""
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from gpt_recipe import model as gpt
    from gpt_recipe.data import build_gpt_datasets
    from harness import seed_all, setup_parallel

    setup_parallel(world)
    seed_all(args["seed"])
    cfg = gpt.transformer_config(num_layers=args["layers"], hidden_size=args["hidden"],
                                 num_attention_heads=4, pipeline_model_parallel_size=world)
    cfg = dataclasses.replace(cfg, fp16=True, params_dtype=torch.float16,
                              pipeline_dtype=torch.float16)
    model = gpt.build_model(cfg, vocab_size=args["vocab"], max_position_embeddings=args["seq"])
    opt = get_megatron_optimizer(OptimizerConfig(
        optimizer="adam", lr=args["lr"], weight_decay=0.0, clip_grad=1.0, fp16=True,
        params_dtype=torch.float16, initial_loss_scale=args["initial_loss_scale"],
        loss_scale_window=args["loss_scale_window"], hysteresis=2, min_loss_scale=1.0),
        list(model))
    cfg = model[0].config
    cfg.finalize_model_grads_func = finalize_model_grads
    cfg.no_sync_func = model[0].no_sync
    cfg.grad_scale_func = opt.scale_loss
    train, _ = build_gpt_datasets(args["data"], args["tokenizer"], args["seq"],
                                  train_samples=args["iterations"] * args["m"] * args["mbs"],
                                  valid_samples=None, seed=args["seed"],
                                  cache_dir=args["cache_dir"])
    data = gpt.microbatches(train, args["mbs"])
    schedule = get_forward_backward_func()
    steps: List[Dict] = []
    for _ in range(args["iterations"]):
        for chunk in model:
            chunk.zero_grad_buffer()
        opt.zero_grad()
        schedule(forward_step_func=gpt.forward_step, data_iterator=data, model=model,
                 num_microbatches=args["m"], seq_length=args["seq"],
                 micro_batch_size=args["mbs"], forward_only=False)
        # finalize_model_grads has run (DP reduction): this stage's own gradients
        local = _local_overflow(model)
        applied, _, _ = opt.step()
        steps.append({"overflow": bool(local), "applied": bool(applied),
                      "scale": float(opt.get_loss_scale())})
    return {"stage": ps.get_pipeline_model_parallel_rank(), "steps": steps}


def summarise(per_stage: List[List[Dict]]) -> Dict:
    """What the per-stage records say (``per_stage[s][i]``: stage ``s``, step ``i``)."""
    P, n = len(per_stage), len(per_stage[0])
    patterns: Counter = Counter()
    everywhere = some = stage_local_differs = 0
    for i in range(n):
        flags = [per_stage[s][i]["overflow"] for s in range(P)]
        applied = per_stage[0][i]["applied"]
        if not any(flags):
            continue
        if all(flags):
            everywhere += 1
        else:
            some += 1
            patterns["".join("x" if f else "." for f in flags)] += 1
        # a stage-local skip applies the step on every stage that saw no overflow
        if not applied and not all(flags):
            stage_local_differs += 1
    overflow_steps = everywhere + some
    return {"stages": P, "steps": n, "steps_with_overflow": overflow_steps,
            "overflow_on_every_stage": everywhere, "overflow_on_some_stages": some,
            "patterns": dict(patterns),
            "steps_a_stage_local_skip_would_apply_on_some_stage": stage_local_differs,
            "final_scale": per_stage[-1][-1]["scale"],
            "scales": [per_stage[-1][i]["scale"] for i in range(n)]}


def table(summary: Dict) -> str:
    rows = [("steps", summary["steps"]), ("steps with an overflow", summary["steps_with_overflow"]),
            ("... on every stage", summary["overflow_on_every_stage"]),
            ("... on some stages only", summary["overflow_on_some_stages"]),
            ("steps 1F1B skipped that a stage-local skip would apply on some stage",
             summary["steps_a_stage_local_skip_would_apply_on_some_stage"])]
    out = ["| fp16, Megatron 1F1B, P = %d | count |" % summary["stages"], "| --- | --- |"]
    out += [f"| {k} | {v} |" for k, v in rows]
    if summary["patterns"]:
        out.append("")
        out.append("Overflow patterns on some stages only (stage 0 first, x: overflow): " + ", ".join(
            f"`{p}` {c}x" for p, c in sorted(summary["patterns"].items())))
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stages", type=int, default=4)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--mbs", type=int, default=4)
    p.add_argument("--m", type=int, default=8, help="micro-batches per iteration")
    p.add_argument("--iterations", type=int, default=200)
    p.add_argument("--lr", type=float, default=4e-3)
    p.add_argument("--initial-loss-scale", type=float, default=2.0 ** 32)
    p.add_argument("--loss-scale-window", type=int, default=20,
                   help="clean steps before the scale doubles (Megatron's default: 1000)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--data-dir", default=os.path.join(ROOT, "data"))
    p.add_argument("--output", default=None, help="JSON results")
    args = p.parse_args(argv)

    from gpt_recipe.data import prepare_corpus
    from harness import run_distributed

    corpus = prepare_corpus(os.path.join(args.data_dir, "stdlib"))
    run = {"layers": args.layers, "hidden": args.hidden, "seq": args.seq, "mbs": args.mbs,
           "m": args.m, "iterations": args.iterations, "lr": args.lr, "seed": args.seed,
           "initial_loss_scale": args.initial_loss_scale,
           "loss_scale_window": args.loss_scale_window, "vocab": corpus.vocab_size,
           "data": corpus.prefix, "tokenizer": corpus.tokenizer_path,
           "cache_dir": os.path.join(args.data_dir, "cache")}
    results = sorted(run_distributed(stage_run, args.stages, run, timeout_s=3600),
                     key=lambda r: r["stage"])
    summary = summarise([r["steps"] for r in results])
    print(table(summary))
    if args.output:
        with open(args.output, "w") as f:
            json.dump({"setup": dict(run, stages=args.stages), "summary": summary,
                       "per_stage": [r["steps"] for r in results]}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
