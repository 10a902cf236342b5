"""examples/pretrain_gpt.py end to end under torchrun (tiny sizes, real text)."""

import json
import os

import pytest

from launch import launch, records

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UNTIED = ["--log-interval", "2", "--untie-embeddings-and-output-weights"]


def recipe(corpus, tmp_path, name, nproc, *flags):
    log = tmp_path / f"{name}.jsonl"
    rc, out = launch(*UNTIED, "--data-path", corpus, "--log-json", log, *flags, nproc=nproc,
                     cwd=tmp_path, timeout=300)
    assert rc == 0, out[-6000:]
    return records(log), out


def emulated(corpus, tmp_path, name, *flags):
    """The recipe with --emulate-pipeline: every rank in one process (plain python)."""
    import subprocess
    import sys

    from launch import RECIPE, TINY

    log = tmp_path / f"{name}.jsonl"
    proc = subprocess.run([sys.executable, RECIPE, *TINY, *UNTIED, "--data-path", str(corpus),
                           "--log-json", str(log), *map(str, flags), "--emulate-pipeline"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    return records(log), proc.stdout


def same_training(a, b):
    """Two runs' records alike but for the measured speed."""
    strip = [{k: v for k, v in r.items() if k != "tokens_per_second"} for r in a]
    return strip == [{k: v for k, v in r.items() if k != "tokens_per_second"} for r in b]


@pytest.mark.parametrize("accumulation,expected", [(None, [1, 1, 1, 0]), (1, [3, 2, 1, 0])])
def test_paci_recipe_logs_drift_per_stage(corpus, tmp_path, accumulation, expected):
    flags = ["--pipeline-model-parallel-size", "4", "--pipeline-schedule", "paci",
             "--train-iters", "6", "--eval-interval", "6"]
    if accumulation:  # and a layout that leaves the last stage the output layer alone
        flags += ["--paci-accumulation", str(accumulation),
                  "--pipeline-model-parallel-layout", "Et|t|t*2|L"]
    records, out = recipe(corpus, tmp_path, "paci", 4, *flags, "--paci-trace", "trace/run.json")
    # the real timeline: every forward, backward and update of every stage, with versions
    events = [e for e in json.loads((tmp_path / "trace" / "run.json").read_text())["traceEvents"]
              if e["ph"] == "X"]
    for kind, per_stage in (("forward", 6 * 4), ("backward", 6 * 4),
                            ("update", 6 * 4 // (accumulation or 4))):
        counts = [sum(1 for e in events if e["cat"] == kind and e["tid"] == s) for s in range(4)]
        assert counts == [per_stage] * 4, (kind, counts)
    assert max(e["args"]["version"] for e in events) == 6 * 4 // (accumulation or 4) - 1
    first, last = records[0], records[-1]
    assert first["iteration"] == 0 and "val_loss" in first
    assert first["layers_per_stage"] == ([1, 1, 2, 0] if accumulation else [1, 1, 1, 1])
    assert last["iteration"] == 6 and last["drift_max"] == expected
    for key in ("lm_loss", "lr", "tokens_per_second", "drift_mean", "drift_histogram"):
        assert key in last
    assert len(last["drift_histogram"]) == 4
    assert "> done: iteration 6 | validation loss" in out
    # the same run with every stage in one process: the same records, bit for bit
    alone, out = emulated(corpus, tmp_path, "emulated", *flags)
    assert same_training(alone, records) and "> done: iteration 6" in out


def test_recipe_checkpoint_resume_matches_run_that_saved_at_the_same_iteration(corpus, tmp_path):
    common = ["--pipeline-model-parallel-size", "2", "--pipeline-schedule", "paci",
              "--eval-interval", "100"]
    straight, _ = recipe(corpus, tmp_path, "straight", 2, *common, "--train-iters", "6",
                         "--save", str(tmp_path / "a"), "--save-interval", "3")
    recipe(corpus, tmp_path, "first", 2, *common, "--train-iters", "6", "--exit-interval", "3",
           "--save", str(tmp_path / "b"))
    resumed, out = recipe(corpus, tmp_path, "resumed", 2, *common, "--train-iters", "6",
                          "--load", str(tmp_path / "b"))
    assert [r["iteration"] for r in resumed] == [4, 6]
    assert resumed[-1]["lm_loss"] == straight[-1]["lm_loss"]
    assert resumed[-1]["val_loss"] == straight[-1]["val_loss"]
    assert (tmp_path / "a" / "latest_checkpointed_iteration.txt").read_text() == "6"


def test_paci_drained_every_iteration_trains_exactly_like_1f1b(corpus, tmp_path):
    # on an uneven split (3 layers and 1 with the output layer), Megatron-LM's flags
    common = ["--pipeline-model-parallel-size", "2", "--train-iters", "4", "--eval-interval",
              "4", "--clip-grad", "0", "--decoder-first-pipeline-num-layers", "3",
              "--decoder-last-pipeline-num-layers", "1"]
    sync, _ = recipe(corpus, tmp_path, "1f1b", 2, *common)
    drained, _ = recipe(corpus, tmp_path, "drained", 2, *common, "--pipeline-schedule", "paci",
                        "--paci-drain-interval", "1")
    assert [r.get("lm_loss") for r in drained] == [r.get("lm_loss") for r in sync]
    assert len([r for r in sync if "lm_loss" in r]) == 2  # iterations 2 and 4
    assert drained[-1]["val_loss"] == sync[-1]["val_loss"]
    assert drained[-1]["drift_max"] == [0, 0]  # drained before every next iteration
    assert sync[0]["layers_per_stage"] == drained[0]["layers_per_stage"] == [3, 1]
    # Megatron's own 1F1B with both stages in one process: the same records
    assert same_training(emulated(corpus, tmp_path, "emulated", *common)[0], sync)
