"""benchmarks/fp16_overflow.py: where Megatron's 1F1B overflows in fp16, the measurement
behind the refusal of ``--fp16`` under PACI (README, "Refused under paci")."""

import json
import os

import fp16_overflow as fo
from harness import run_distributed


def _step(overflow, applied=True, scale=1024.0):
    return {"overflow": overflow, "applied": applied, "scale": scale}


def test_summary_counts_where_a_stage_local_skip_would_differ_from_1f1b():
    # 3 stages, 4 steps: everywhere (skipped); stage 0 only (skipped); none; stages 0-1
    per_stage = [[_step(True, False), _step(True, False), _step(False), _step(True, False)],
                 [_step(True, False), _step(False, False), _step(False), _step(True, False)],
                 [_step(True, False), _step(False, False), _step(False), _step(False, False)]]
    s = fo.summarise(per_stage)
    assert (s["steps"], s["steps_with_overflow"], s["overflow_on_every_stage"],
            s["overflow_on_some_stages"]) == (4, 3, 1, 2)
    assert s["patterns"] == {"x..": 1, "xx.": 1}
    assert s["steps_a_stage_local_skip_would_apply_on_some_stage"] == 2
    assert "| ... on some stages only | 2 |" in fo.table(s)


def test_megatron_fp16_run_sees_the_first_overflow_on_every_stage(tmp_path, corpus):
    # at Megatron's initial scale 2^32 the scaled loss overflows: every stage skips step 1
    from gpt_recipe.data import tokenizer_path_for_prefix

    run = {"layers": 2, "hidden": 32, "seq": 32, "mbs": 2, "m": 2, "iterations": 3,
           "lr": 1e-3, "seed": 1, "initial_loss_scale": 2.0 ** 32, "loss_scale_window": 20,
           "vocab": 512, "data": corpus, "tokenizer": tokenizer_path_for_prefix(corpus),
           "cache_dir": str(tmp_path)}
    results = sorted(run_distributed(fo.stage_run, 2, run, timeout_s=300),
                     key=lambda r: r["stage"])
    first = [r["steps"][0] for r in results]
    assert all(s["overflow"] and not s["applied"] for s in first), first
    assert len(results[0]["steps"]) == 3


def test_published_measurement_is_what_the_readme_says():
    root = os.path.join(os.path.dirname(__file__), "..")
    data = json.load(open(os.path.join(root, "benchmarks", "results", "fp16_overflow.json")))
    assert fo.summarise(data["per_stage"]) == data["summary"]
    readme = open(os.path.join(root, "README.md"), encoding="utf-8").read()
    assert fo.table(data["summary"]) in readme
