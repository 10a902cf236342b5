"""Bad configurations stop before training with a message that says what to change."""

import argparse
import os

import pytest
import torch

from paci_megatron.config import PACIConfig, PACIConfigError, divisors, validate_setup

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class FakeModelConfig:
    """The TransformerConfig attributes validate_setup reads, all valid by default."""

    pipeline_dtype = torch.float32
    calculate_per_token_loss = False
    fp16 = False
    virtual_pipeline_model_parallel_size = None
    variable_seq_lengths = False
    fp8 = None
    mtp_num_layers = None
    overlap_p2p_comm = False
    delay_wgrad_compute = False
    defer_embedding_wgrad_compute = False

    def __init__(self, **kw):
        self.__dict__.update(kw)


def problems(**kw):
    paci = kw.pop("paci", PACIConfig())
    with pytest.raises(PACIConfigError) as info:
        validate_setup(paci, **kw)
    return info.value.problems


def test_valid_setup_returns_accumulation_factor():
    assert validate_setup(PACIConfig(), num_microbatches=8, pipeline_model_parallel_size=4,
                          model_config=FakeModelConfig()) == 8
    assert validate_setup(PACIConfig(accumulation=2), num_microbatches=8,
                          pipeline_model_parallel_size=4) == 2


def test_fewer_microbatches_than_the_accumulation_window_needs():
    (msg,) = problems(paci=PACIConfig(accumulation=8), num_microbatches=4,
                      pipeline_model_parallel_size=4)
    assert "--paci-accumulation 8 does not divide the 4 micro-batches" in msg
    assert "[1, 2, 4]" in msg  # what to choose instead


def test_accumulation_not_dividing_iteration():
    (msg,) = problems(paci=PACIConfig(accumulation=3), num_microbatches=8,
                      pipeline_model_parallel_size=2)
    assert "choose one of [1, 2, 4, 8]" in msg


def test_no_microbatches():
    assert any("need at least 1" in p for p in problems(num_microbatches=0,
                                                        pipeline_model_parallel_size=2))


def test_tied_embeddings_across_stages_are_accepted_also_with_the_distributed_optimizer():
    # tests/test_tied_embeddings.py and test_composition.py: drained PACI with tied
    # embeddings == 1F1B, also with the distributed optimizer
    assert validate_setup(PACIConfig(), num_microbatches=4, pipeline_model_parallel_size=2,
                          share_embeddings_and_output_weights=True) == 4
    assert validate_setup(PACIConfig(), num_microbatches=4, pipeline_model_parallel_size=2,
                          share_embeddings_and_output_weights=True,
                          training_args=argparse.Namespace(use_distributed_optimizer=True)) == 4
    assert validate_setup(PACIConfig(), num_microbatches=4, pipeline_model_parallel_size=1,
                          share_embeddings_and_output_weights=True,
                          training_args=argparse.Namespace(use_distributed_optimizer=True)) == 4


def test_max_drift_says_which_accumulation_satisfies_it():
    (msg,) = problems(paci=PACIConfig(accumulation=1, max_drift=2), num_microbatches=8,
                      pipeline_model_parallel_size=8)
    assert "drift bound ceil((P-1)/a) = 7" in msg
    assert "use --paci-accumulation 4 (or any of [4, 8])" in msg
    (msg,) = problems(paci=PACIConfig(accumulation=1, max_drift=0), num_microbatches=4,
                      pipeline_model_parallel_size=4)
    assert "no accumulation factor dividing m = 4 achieves it" in msg
    (msg,) = problems(paci=PACIConfig(max_drift=-1), num_microbatches=4,
                      pipeline_model_parallel_size=4)
    assert "--paci-max-drift -1: must be >= 0" in msg


def test_timeout_must_be_positive():
    (msg,) = problems(paci=PACIConfig(p2p_timeout_s=0), num_microbatches=4,
                      pipeline_model_parallel_size=2)
    assert "timeout is 0 s: must be > 0" in msg
    assert validate_setup(PACIConfig(accumulation=4, max_drift=2), num_microbatches=8,
                          pipeline_model_parallel_size=8) == 4


@pytest.mark.parametrize("attr,value,needle", [
    ("fp16", True, "use --bf16"),
    ("virtual_pipeline_model_parallel_size", 2, "virtual pipeline"),
    ("variable_seq_lengths", True, "fixed --seq-length"),
    ("fp8", "hybrid", "--fp8-format"),
    ("mtp_num_layers", 1, "--mtp-num-layers"),
    ("pipeline_dtype", None, "pipeline_dtype"),
])
def test_model_config_refusals(attr, value, needle):
    (msg,) = problems(num_microbatches=4, pipeline_model_parallel_size=2,
                      model_config=FakeModelConfig(**{attr: value}))
    assert needle in msg


def test_all_problems_reported_at_once():
    found = problems(paci=PACIConfig(accumulation=3), num_microbatches=4,
                     pipeline_model_parallel_size=4, share_embeddings_and_output_weights=True,
                     model_config=FakeModelConfig(fp16=True, mtp_num_layers=1))
    assert len(found) == 3
    assert "3 problem(s)" in str(PACIConfigError(found))


def test_divisors():
    assert divisors(12) == [1, 2, 3, 4, 6, 12]


def run_recipe(*flags, nproc=4):
    from launch import launch

    return launch("--device", "cpu", *flags, nproc=nproc, tiny=False, timeout=120)


def test_recipe_refuses_a_short_window_before_starting():
    proc = run_recipe("--pipeline-model-parallel-size", "4", "--pipeline-schedule", "paci",
                      "--global-batch-size", "8", "--micro-batch-size", "4",
                      "--paci-accumulation", "4")
    rc, out = proc
    assert rc != 0
    assert "bad configuration, nothing was started" in out
    assert "untie" not in out  # tied embeddings (no --untie-...) are supported
    assert "--paci-accumulation 4 does not divide the 2 micro-batches" in out
    assert "> data:" not in out  # stopped before any data or model was built
    assert out.count("bad configuration") == 1  # reported once, not once per rank


def test_recipe_lists_every_shape_and_schedule_problem_at_once():
    proc = run_recipe("--pipeline-model-parallel-size", "4", "--untie-embeddings-and-output-weights",
                      "--num-layers", "6", "--hidden-size", "30", "--num-attention-heads", "4",
                      "--train-iters", "5", "--lr-warmup-iters", "10", "--eval-iters", "0",
                      "--load", "/nonexistent/ckpt", "--global-batch-size", "10",
                      "--micro-batch-size", "4", "--device", "cuda", nproc=2)
    rc, out = proc
    assert rc != 0
    for needle in ("world size 2 is not divisible by TP x PP = 4",
                   "--num-layers 6 is not divisible by --pipeline-model-parallel-size 4",
                   "--hidden-size 30 is not divisible by --num-attention-heads 4",
                   "--lr-warmup-iters 10 must be below --train-iters 5",
                   "--eval-iters 0: must be >= 1",
                   "--load /nonexistent/ckpt holds no checkpoint",
                   "--global-batch-size 10 is not divisible by --micro-batch-size x DP = 4",
                   "--device cuda but CUDA is not available: use --device cpu"):
        assert needle in out, needle


def test_changing_the_activation_shape_in_flight_is_refused_on_every_stage():
    """(A change of m drains by itself: tests/test_ramp.py.)"""
    from harness import run_distributed

    from workers import midflight_change_case

    results = run_distributed(midflight_change_case, 2, "seq", timeout_s=240)
    for r in results:
        assert "activation shape changed" in r["message"] and "drain()" in r["message"], r


# one non-default value per PACI setting that has a flag: a new setting must be added here
NON_DEFAULT = {"accumulation": 2, "drain_interval": 3, "max_drift": 1,
               "memory_mode": "recompute", "skip_nonfinite_updates": True,
               "sync_warmup_iters": 5, "lookahead": 0.5, "trace": "runs/trace.json"}


def paci_argv():
    argv = ["--pipeline-schedule", "paci"]
    for name, flag, _ in PACIConfig.flag_fields():
        value = NON_DEFAULT[name]
        argv += [flag] if value is True else [flag, str(value)]
    return argv


def test_every_paci_flag_is_declared_once_and_read_by_both_front_ends():
    import argparse

    import pretrain_gpt  # examples/pretrain_gpt.py

    from paci_megatron import megatron_lm

    assert {name for name, _, _ in PACIConfig.flag_fields()} == set(NON_DEFAULT)
    example = pretrain_gpt.parse_args(paci_argv() + ["--device", "cpu"])
    glue_parser = megatron_lm.add_arguments(argparse.ArgumentParser())
    glue = glue_parser.parse_args(paci_argv())
    for args in (example, glue):
        config = PACIConfig.from_args(args)
        assert {name: getattr(config, name) for name in NON_DEFAULT} == NON_DEFAULT
    # defaults agree with PACIConfig's
    for parser_args in (pretrain_gpt.parse_args(["--device", "cpu"]),
                        glue_parser.parse_args([])):
        defaults = PACIConfig.from_args(parser_args)
        assert defaults == PACIConfig(p2p_timeout_s=defaults.p2p_timeout_s)
        assert parser_args.pipeline_schedule == "1f1b"


def test_paci_flags_without_the_paci_schedule_are_refused_the_same_by_both_front_ends(
        capsys, monkeypatch):
    import argparse

    import pretrain_gpt

    from paci_megatron import megatron_lm

    argv = paci_argv()[2:]  # every --paci-* flag, no --pipeline-schedule paci
    flags = [flag for _, flag, _ in PACIConfig.flag_fields()]
    example = pretrain_gpt.parse_args(argv + ["--device", "cpu"])
    glue = megatron_lm.add_arguments(argparse.ArgumentParser()).parse_args(argv)
    expected = f"{', '.join(flags)} only apply with --pipeline-schedule paci: add that or remove them"
    assert megatron_lm.check_args(glue, argv=["x"]) == [expected]
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(SystemExit) as stop:
        pretrain_gpt.check_args(example, world_size=1)
    assert stop.value.code == 2 and f"  - {expected}" in capsys.readouterr().err


def test_no_runtime_module_imports_the_simulator():
    import ast

    package = os.path.join(ROOT, "paci_megatron")
    for name in sorted(os.listdir(package)):
        if not name.endswith(".py") or name == "sim.py":
            continue
        tree = ast.parse(open(os.path.join(package, name), encoding="utf-8").read())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                target = ("." * node.level) + (node.module or "")
                names = [a.name for a in node.names]
                assert target not in (".sim", "paci_megatron.sim") and not (
                    target in (".", "paci_megatron") and "sim" in names), (name, target)
            elif isinstance(node, ast.Import):
                assert all(a.name != "paci_megatron.sim" for a in node.names), name


def test_emulating_the_pipeline_refuses_torchrun_and_tensor_parallelism(monkeypatch, capsys):
    """--emulate-pipeline: refused under torchrun (WORLD_SIZE > 1) and with TP > 1, among
    the recipe's other problems, before anything is built."""
    import pretrain_gpt  # examples/pretrain_gpt.py

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    args = pretrain_gpt.parse_args(["--device", "cpu", "--emulate-pipeline",
                                    "--pipeline-model-parallel-size", "2",
                                    "--tensor-model-parallel-size", "2"])
    with pytest.raises(SystemExit) as stop:
        pretrain_gpt.check_args(args, 4)
    err = capsys.readouterr().err
    assert stop.value.code == 2
    assert "--emulate-pipeline runs every rank in one process: start it with python" in err
    assert "drop --tensor-model-parallel-size 2" in err
