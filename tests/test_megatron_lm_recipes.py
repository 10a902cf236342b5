"""The Megatron-LM launch recipes in examples/megatron_lm: syntax, the paper's settings,
and the PACI/1F1B pairs differing only in the schedule."""

import os
import shlex
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = os.path.join(ROOT, "examples", "megatron_lm")


def dry_run(script, **env):
    environ = dict(os.environ, DRY_RUN="1", MEGATRON_LM="/opt/Megatron-LM",
                   DATA_PREFIX="/data/owt/owt_text_document", **env)
    out = subprocess.run(["bash", os.path.join(RECIPES, script)], env=environ, text=True,
                         capture_output=True, timeout=60, check=True).stdout
    return shlex.split(out)


def flag(argv, name):
    return argv[argv.index(name) + 1]


@pytest.mark.parametrize("script", sorted(os.listdir(RECIPES)))
def test_every_recipe_is_valid_bash(script):
    subprocess.run(["bash", "-n", os.path.join(RECIPES, script)], check=True, timeout=30)


def test_gpt2_medium_recipe_has_the_papers_settings():
    argv = dry_run("gpt2_medium_pp8.sh")
    assert argv[0] == "torchrun" and "/opt/Megatron-LM/pretrain_gpt.py" in argv
    expected = {
        "--num-layers": "24", "--hidden-size": "1024", "--num-attention-heads": "16",
        "--seq-length": "1024", "--pipeline-model-parallel-size": "8",
        "--global-batch-size": "256", "--adam-beta1": "0.9", "--adam-beta2": "0.95",
        "--weight-decay": "0.1", "--lr": "0.0003", "--min-lr": "3e-05",
        "--micro-batch-size": "32", "--train-iters": "190000",
        "--lr-warmup-fraction": "0.01", "--lr-decay-style": "cosine",
        "--pipeline-schedule": "paci", "--data-path": "/data/owt/owt_text_document",
        "--tokenizer-type": "GPT2BPETokenizer", "--nproc-per-node": "8", "--clip-grad": "0.0",
    }
    assert {k: flag(argv, k) for k in expected} == expected
    assert "--bf16" in argv and "--untie-embeddings-and-output-weights" in argv
    # batch 128: lr x sqrt(1/2), the same tokens, still m = a = 8 micro-batches
    small = dry_run("gpt2_medium_pp8.sh", GLOBAL_BATCH="128")
    assert (flag(small, "--global-batch-size"), flag(small, "--lr"), flag(small, "--min-lr"),
            flag(small, "--micro-batch-size"), flag(small, "--train-iters")) == (
        "128", "0.0002121", "2.121e-05", "16", "380000")
    two_nodes = dry_run("gpt2_medium_pp8.sh", NNODES="2")
    assert flag(two_nodes, "--micro-batch-size") == "16"  # DP 2: 256 / (16 x 2) = 8


def test_the_1f1b_baseline_differs_only_in_the_schedule_split_and_output_folders():
    paci = dry_run("gpt2_medium_pp8.sh")
    base = dry_run("gpt2_medium_pp8_1f1b.sh")
    assert flag(base, "--pipeline-schedule") == "1f1b"
    diff = [(a, b) for a, b in zip(paci, base) if a != b]
    assert len(paci) == len(base) and sorted(diff) == [
        ("Et*3|t*3|t*3|t*4|t*3|t*3|t*3|t*2L", "Et*4|t*4|t*3|t*3|t*3|t*3|t*3|tL"),
        ("paci", "1f1b"), ("runs/gpt2m_paci", "runs/gpt2m_1f1b"),
        ("runs/gpt2m_paci", "runs/gpt2m_1f1b"),
        ("runs/gpt2m_paci/tensorboard", "runs/gpt2m_1f1b/tensorboard")]
    even = dry_run("gpt2_medium_pp8.sh", SPLIT="even")
    assert "--pipeline-model-parallel-layout" not in even and len(even) == len(paci) - 2


def test_each_schedule_runs_on_the_split_the_advisor_proposes():
    """The recipes' layouts are the balance advisor's best splits from the measured H200
    stage times they cite: PACI's, 1F1B's and the interleaved 1F1B's own."""
    from paci_megatron.sim import balance, measured_costs

    costs, comm_s, _ = measured_costs(
        os.path.join(ROOT, "benchmarks", "results", "device_check_h200.json"),
        micro_batch_size=32, layers=3)
    best = balance(24, 8, 8, costs, comm_s=comm_s, virtual_stages=[2])["schedules"]
    runs = {"paci": dry_run("gpt2_medium_pp8.sh"), "1f1b": dry_run("gpt2_medium_pp8_1f1b.sh"),
            "interleaved_v2": dry_run("gpt2_medium_pp8_interleaved.sh")}
    for name, argv in runs.items():
        assert flag(argv, "--pipeline-model-parallel-layout") == best[name]["best"]["flags"][1]
    interleaved = runs["interleaved_v2"]
    assert flag(interleaved, "--pipeline-schedule") == "1f1b"
    assert flag(interleaved, "--save") == "runs/gpt2m_interleaved"
    environ = dict(os.environ, DRY_RUN="1", MEGATRON_LM="/opt/Megatron-LM",
                   DATA_PREFIX="/data/owt/owt_text_document", SPLIT="interleaved")
    proc = subprocess.run(["bash", os.path.join(RECIPES, "gpt2_medium_pp8.sh")],
                          env=environ, text=True, capture_output=True, timeout=60)
    assert proc.returncode == 2 and "(1f1b only) interleaved" in proc.stderr


def test_slurm_recipe_runs_pp8_by_dp2_on_two_nodes():
    text = open(os.path.join(RECIPES, "gpt2_medium_pp8_dp2.slurm")).read()
    assert "#SBATCH --nodes=2" in text and "#SBATCH --gpus-per-node=8" in text
    assert "export NPROC=8 NNODES=$SLURM_NNODES" in text and "gpt2_medium_pp8.sh" in text
    baseline = open(os.path.join(RECIPES, "gpt2_medium_pp8_dp2_1f1b.slurm")).read()
    assert "export SCHEDULE=1f1b" in baseline and "gpt2_medium_pp8_dp2.slurm" in baseline
    argv = dry_run("gpt2_medium_pp8.sh", NNODES="2", NODE_RANK="1", MASTER_ADDR="node0")
    assert (flag(argv, "--nnodes"), flag(argv, "--node-rank"), flag(argv, "--master-addr")) == (
        "2", "1", "node0")


def test_tiny_cpu_recipe_asks_for_cpu_mode_and_paci():
    text = open(os.path.join(RECIPES, "tiny_gpt_cpu.sh")).read()
    assert "export PACI_MEGATRON_CPU=1" in text
    argv = dry_run("tiny_gpt_cpu.sh")
    assert flag(argv, "--pipeline-schedule") == "paci" and flag(argv, "--distributed-backend") == "gloo"
    assert flag(dry_run("tiny_gpt_cpu.sh", SCHEDULE="1f1b"), "--pipeline-schedule") == "1f1b"


def _last(argv, name):
    """The value argparse keeps: the last occurrence of ``name``."""
    return argv[len(argv) - 1 - argv[::-1].index(name) + 1]


def test_muon_variant_sets_the_studys_optimizer_for_both_schedules():
    paci = dry_run("gpt2_medium_pp8_muon.sh")
    base = dry_run("gpt2_medium_pp8_muon.sh", SCHEDULE="1f1b")
    for argv in (paci, base):
        assert _last(argv, "--optimizer") == "muon"
        assert (flag(argv, "--muon-momentum"), flag(argv, "--muon-extra-scale-factor")) == ("0.95", "0.2")
        assert "--muon-use-nesterov" in argv
        assert float(flag(argv, "--lr")) == pytest.approx(1.2e-3)  # 4 x AdamW's 3e-4
        assert float(flag(argv, "--min-lr")) == pytest.approx(1.2e-4)
    assert flag(paci, "--paci-sync-warmup-iters") == "0" and "--paci-sync-warmup-iters" not in base
    assert (flag(paci, "--pipeline-schedule"), flag(base, "--pipeline-schedule")) == ("paci", "1f1b")
    half = dry_run("gpt2_medium_pp8_muon.sh", GLOBAL_BATCH="128")
    assert float(flag(half, "--lr")) == pytest.approx(1.2e-3 * 0.5 ** 0.5, rel=1e-3)


def test_lookahead_variant_adds_only_the_lookahead_and_refuses_1f1b():
    base = dry_run("gpt2_medium_pp8.sh")
    ahead = dry_run("gpt2_medium_pp8_lookahead.sh")
    assert flag(ahead, "--paci-lookahead") == "1" and "--paci-lookahead" not in base
    i = ahead.index("--paci-lookahead")
    rest = ahead[:i] + ahead[i + 2:]
    diff = [(a, b) for a, b in zip(base, rest) if a != b]
    assert len(rest) == len(base) and {b for _, b in diff} <= {
        "runs/gpt2m_paci_lookahead", "runs/gpt2m_paci_lookahead/tensorboard"}
    environ = dict(os.environ, DRY_RUN="1", MEGATRON_LM="/opt/Megatron-LM",
                   DATA_PREFIX="/data/owt/owt_text_document", SCHEDULE="1f1b")
    proc = subprocess.run(["bash", os.path.join(RECIPES, "gpt2_medium_pp8_lookahead.sh")],
                          env=environ, text=True, capture_output=True, timeout=60)
    assert proc.returncode == 2 and "run gpt2_medium_pp8.sh with SCHEDULE=1f1b" in proc.stderr
