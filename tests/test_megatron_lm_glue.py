"""The Megatron-LM glue without a Megatron-LM checkout: hook, arguments, refusals, patches,
the ``paci-megatron`` command and the CPU-mode pieces for ``megatron.training``."""

import argparse
import os
import subprocess
import sys
import sysconfig
import types

import pytest
import torch

from paci_megatron import cli, hook, megatron_lm
from paci_megatron.config import PACIConfigError
from paci_megatron.megatron_lm import Glue, add_arguments, check_args


# --------------------------------------------------------------------------- hook
@pytest.mark.parametrize("argv,env,expected", [
    (["pretrain_gpt.py", "--pipeline-schedule", "paci"], {}, (True, False)),
    (["pretrain_gpt.py", "--pipeline-schedule=1f1b"], {}, (True, False)),
    (["pretrain_gpt.py", "--pipeline-model-parallel-size", "2"], {}, (False, False)),
    (["--pipeline-schedule"], {}, (False, False)),  # argv[0] is the program, not a flag
    (["pretrain_gpt.py", "--paci-accumulation", "2"], {}, (True, False)),
    (["x.py"], {"PACI_MEGATRON_CPU": "1"}, (False, True)),
    (["x.py"], {"PACI_MEGATRON_CPU": "0"}, (False, False)),
    (["x.py", "--pipeline-schedule", "paci"], {"PACI_MEGATRON_CPU": "yes",
                                               "PACI_MEGATRON_DISABLE": "1"}, (False, False)),
])
def test_hook_activates_only_for_its_flag_or_cpu_mode(argv, env, expected):
    assert hook.wanted(argv, env) == expected


def test_a_cpu_mode_value_that_is_not_understood_is_reported(capsys):
    assert hook.wanted(["x.py"], {"PACI_MEGATRON_CPU": "2"}) == (False, False)
    assert "PACI_MEGATRON_CPU='2' is not understood: set it to 1 (CPU mode) or 0" in capsys.readouterr().err
    assert hook.wanted(["x.py"], {"PACI_MEGATRON_CPU": "off"}) == (False, False)
    assert capsys.readouterr().err == ""


def test_post_import_hook_patches_the_module_from_where_python_finds_it(tmp_path, monkeypatch):
    pkg = tmp_path / "paci_fake_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "mod.py").write_text("def f():\n    return 'original'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    seen = []

    def patch(module):
        seen.append(module.__file__)
        original = module.f
        module.f = lambda: "patched " + original()

    finder = hook.PostImportHook()
    finder.register("paci_fake_pkg.mod", patch)
    sys.meta_path.insert(0, finder)
    try:
        import paci_fake_pkg.mod as mod

        assert mod.f() == "patched original"
        assert seen == [str(pkg / "mod.py")]
        late = []
        finder.register("paci_fake_pkg.mod", lambda m: late.append(m))  # already imported
        assert late == [mod]
        assert mod.__spec__.loader.get_source("paci_fake_pkg.mod").startswith("def f")
    finally:
        sys.meta_path.remove(finder)
        for name in ("paci_fake_pkg.mod", "paci_fake_pkg"):
            sys.modules.pop(name, None)


def _loaded(*args, env=None):
    code = ("import sys; print(int('paci_megatron.megatron_lm' in sys.modules), "
            "int('paci_megatron.cpu' in sys.modules))")
    environ = {k: v for k, v in os.environ.items() if not k.startswith("PACI_MEGATRON")}
    environ.update(env or {})
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                         env=environ, cwd="/", timeout=120, check=True).stdout.split()
    return tuple(map(int, out))


def test_installed_pth_activates_the_glue_only_when_asked():
    pth = os.path.join(sysconfig.get_paths()["purelib"], "paci_megatron.pth")
    assert os.path.exists(pth), (
        f"{pth} is missing: `pip install .` installs it; editable installs need "
        "`paci-megatron install-hook`")
    assert _loaded() == (0, 0)
    assert _loaded("--pipeline-schedule", "paci") == (1, 0)
    assert _loaded(env={"PACI_MEGATRON_CPU": "1"}) == (0, 1)
    assert _loaded("--pipeline-schedule", "paci", env={"PACI_MEGATRON_DISABLE": "1"}) == (0, 0)


# --------------------------------------------------------------------------- arguments
def test_arguments_default_to_megatrons_own_schedule():
    parser = add_arguments(argparse.ArgumentParser())
    args = parser.parse_args([])
    assert (args.pipeline_schedule, args.paci_accumulation, args.paci_drain_interval,
            args.paci_max_drift, args.paci_memory_mode, args.paci_skip_nonfinite_updates) == (
        "1f1b", None, 0, None, "activations", False)
    args = parser.parse_args(["--pipeline-schedule", "paci", "--paci-accumulation", "2",
                              "--paci-drain-interval", "50", "--paci-memory-mode", "recompute"])
    assert (args.pipeline_schedule, args.paci_accumulation, args.paci_drain_interval,
            args.paci_memory_mode) == ("paci", 2, 50, "recompute")
    with pytest.raises(SystemExit):
        parser.parse_args(["--pipeline-schedule", "gpipe"])


def megatron_args(**overrides):
    """The attributes of Megatron-LM's validated arguments that the glue reads."""
    values = dict(
        pipeline_schedule="paci", pipeline_model_parallel_size=4, global_batch_size=32,
        micro_batch_size=2, data_parallel_size=2, untie_embeddings_and_output_weights=True,
        paci_accumulation=None, paci_drain_interval=0, paci_max_drift=None,
        paci_memory_mode="activations", paci_skip_nonfinite_updates=False,
        rerun_mode="validate_results", distributed_timeout_minutes=10, fp16=False, bf16=True,
        calculate_per_token_loss=False, virtual_pipeline_model_parallel_size=None, fp8=None,
        mtp_num_layers=None, overlap_p2p_comm=False, rampup_batch_size=None,
        overlap_param_gather=False, cuda_graph_impl="none", use_torch_fsdp2=False,
    )
    values.update(overrides)
    return argparse.Namespace(**values)


def test_a_valid_paci_run_passes_and_disables_the_rerun_machine():
    args = megatron_args()
    assert check_args(args, argv=["pretrain_gpt.py", "--pipeline-schedule", "paci"]) == []
    assert args.rerun_mode == "disabled"
    explicit = megatron_args(rerun_mode="disabled")
    assert check_args(explicit, argv=["x", "--rerun-mode", "disabled"]) == []


def test_1f1b_leaves_megatron_arguments_alone():
    args = megatron_args(pipeline_schedule="1f1b", untie_embeddings_and_output_weights=False,
                         fp16=True)
    assert check_args(args, argv=["x"]) == []
    assert args.rerun_mode == "validate_results"
    stray = megatron_args(pipeline_schedule="1f1b", paci_accumulation=2, paci_drain_interval=5)
    assert check_args(stray, argv=["x"]) == [
        "--paci-accumulation, --paci-drain-interval only apply with --pipeline-schedule paci: "
        "add that or remove them"]
    one = megatron_args(pipeline_schedule="1f1b", paci_max_drift=2)
    assert check_args(one, argv=["x"]) == [
        "--paci-max-drift only applies with --pipeline-schedule paci: add that or remove it"]


def test_a_script_that_defines_the_flag_itself_keeps_it(monkeypatch, capsys):
    monkeypatch.setattr(megatron_lm, "glue", Glue())
    parser = argparse.ArgumentParser()
    parser.add_argument("--pipeline-schedule", default="zero-bubble")
    add_arguments(parser)
    assert parser.parse_args([]).pipeline_schedule == "zero-bubble"
    assert "defines --pipeline-schedule itself; the PACI glue stays off" in capsys.readouterr().err
    megatron_lm._accept(argparse.Namespace(pipeline_schedule="paci"))  # theirs, not ours
    assert megatron_lm.glue.disabled and not megatron_lm.glue.active


def requires_ramp():
    """Skip, saying why, where megatron-core (0.18+) ignores --rampup-batch-size: there the
    glue plans a constant batch (test_a_ramp_megatron_core_ignores_is_no_ramp)."""
    from paci_megatron.compat import ramp_supported

    if not ramp_supported():
        pytest.skip("this megatron-core (0.18+) ignores --rampup-batch-size; "
                    "the ramp is tested with megatron-core up to 0.17")


def test_a_ramp_megatron_core_ignores_is_no_ramp(monkeypatch):
    """megatron-core 0.18+ builds its calculator without rampup_batch_size (the flag is
    deprecated and ignored there): the glue then plans a constant batch, as Megatron does."""
    from megatron.core import num_microbatches_calculator as nmc

    from paci_megatron.compat import ramp_iterations, ramp_supported

    if ramp_supported():  # megatron-core up to 0.17 (the one these tests install: 0.16)
        assert ramp_iterations([8, 8, 96], 32, 2, 2) != []

        def builder_018(rank, global_batch_size, micro_batch_size, data_parallel_size,
                        decrease_batch_size_if_needed, step_batch_size_schedule=None,
                        seq_length=None):
            raise AssertionError("not called for an ignored ramp")

        # megatron-core 0.18's builder, where the installed one still takes the ramp
        monkeypatch.setattr(nmc, "_build_num_microbatches_calculator", builder_018)
    assert not ramp_supported()
    assert ramp_iterations([8, 8, 96], 32, 2, 2) == []
    ramp = megatron_args(rampup_batch_size=["8", "8", "96"], train_iters=None,
                         train_samples=10_000, lr_warmup_samples=160)
    assert check_args(ramp, argv=["pretrain_gpt.py"]) == []
    assert megatron_lm._lr_warmup_iters(ramp) == 160 // 32


def test_a_batch_size_ramp_is_accepted_and_its_warm_up_counted_in_its_iterations():
    """--rampup-batch-size: every m of the ramp passes PACI's rules (a = m follows it);
    the synchronous warm-up (the LR warm-up, in samples) counts the ramp's iterations as
    megatron-core's calculator steps through them."""
    from paci_megatron.compat import ramp_iterations

    requires_ramp()
    ramp = megatron_args(rampup_batch_size=["8", "8", "96"], train_iters=None,
                         train_samples=10_000, lr_warmup_samples=160)
    assert check_args(ramp, argv=["pretrain_gpt.py"]) == []
    # global batch 8, 16, 24, 32 (m = 2, 4, 6, 8 at micro-batch 2 x DP 2)
    iterations = ramp_iterations([8, 8, 96], 32, 2, 2)
    assert sorted({m for _, _, m in iterations}) == [2, 4, 6, 8]
    assert iterations[0] == (0, 8, 2) and iterations[-1][1:] == (32, 8)
    ramp_samples = sum(b for _, b, _ in iterations)
    within = sum(1 for consumed, _, _ in iterations if consumed < 160)
    assert (within, ramp_samples) == (9, 144)
    # every iteration that starts before the warm-up's 160 samples are consumed (Megatron's
    # LR is still warming up there): the ramp's 9 and the one from sample 144 to 176
    assert megatron_lm._lr_warmup_iters(ramp) == 10
    assert megatron_lm._lr_warmup_iters(megatron_args(lr_warmup_iters=7)) == 7
    fixed = megatron_args(rampup_batch_size=["8", "8", "96"], paci_accumulation=2)
    assert check_args(fixed, argv=["pretrain_gpt.py"]) == []  # 2 divides 2, 4, 6 and 8


class _StepCalculator:
    """megatron-core 0.18's ``StepBatchsizeNumMicroBatchesCalculator`` as the glue uses it
    (its parsed ``schedule`` of (threshold in samples, global batch), ``update``, ``get``,
    ``get_current_global_batch_size``), for the megatron-core these tests install (0.16),
    which has no step schedule; the real one is used where installed."""

    def __init__(self, micro_batch_size, data_parallel_size, schedule, seq_length):
        self.per = micro_batch_size * data_parallel_size
        self.schedule = sorted((int(t) // seq_length, int(b)) for t, b in
                               (e.split(":") for e in schedule.replace(",", " ").split()))
        assert self.schedule[0][0] == 0, "first schedule entry must have threshold 0"

    def update(self, consumed_samples, consistency_check, verbose=False):
        self.batch = [b for t, b in self.schedule if consumed_samples >= t][-1]

    def get(self):
        return self.batch // self.per

    def get_current_global_batch_size(self):
        return self.batch


@pytest.fixture(params=["megatron-core", "interface double"])
def step_calculator(request, monkeypatch):
    """megatron-core's step-schedule calculator (0.18 on) or, on older releases, the double."""
    from megatron.core import num_microbatches_calculator as nmc

    from paci_megatron.compat import step_schedule_supported

    if request.param == "megatron-core":
        if not step_schedule_supported():
            pytest.skip("this megatron-core has no step batch-size schedule (0.18 on)")
        return nmc._build_num_microbatches_calculator

    def builder_018(rank, global_batch_size, micro_batch_size, data_parallel_size,
                    decrease_batch_size_if_needed, step_batch_size_schedule=None,
                    seq_length=None):
        return _StepCalculator(micro_batch_size, data_parallel_size, step_batch_size_schedule,
                               seq_length)

    monkeypatch.setattr(nmc, "_build_num_microbatches_calculator", builder_018)
    return builder_018


def test_a_step_batch_size_schedule_is_planned_as_megatron_lm_steps_through_it(step_calculator):
    """--step-batch-size-schedule (thresholds in tokens): the changes of m are where
    Megatron-LM's loop (update the calculator with the samples consumed, train one batch)
    meets them; every m within training passes PACI's rules; PACI starts at the schedule's
    first m, not at --global-batch-size (one micro-batch per DP rank there); the warm-up
    counts the schedule's iterations."""
    from paci_megatron.compat import batch_size_steps

    schedule, seq = "0:8 1300:16 4100:32", 32  # thresholds 40 and 128 samples
    steps = batch_size_steps(2, 2, step_batch_size_schedule=schedule, seq_length=seq)
    calculator = step_calculator(1, None, 2, 2, False, step_batch_size_schedule=schedule,
                                 seq_length=seq)
    walked, consumed = [], 0
    for iteration in range(40):  # Megatron-LM's own loop, one iteration at a time
        calculator.update(consumed, False)
        batch = calculator.get_current_global_batch_size()
        if not walked or walked[-1][2] != batch:
            walked.append((iteration, consumed, batch, calculator.get()))
        consumed += batch
    assert steps == walked == [(0, 0, 8, 2), (5, 40, 16, 4), (11, 136, 32, 8)]

    args = megatron_args(step_batch_size_schedule=schedule, seq_length=seq, global_batch_size=4,
                         train_iters=None, train_samples=10_000, lr_warmup_samples=60)
    assert check_args(args, argv=["pretrain_gpt.py"]) == []  # a = m: 2, 4, 8
    assert megatron_lm._num_microbatches(args) == 2
    assert megatron_lm.resolve(args, argv=["x"]).num_microbatches == 2
    # iterations 0-4 (samples 0-40) and 5-6 (40-72) start before 60 samples are consumed
    assert megatron_lm._lr_warmup_iters(args) == 7
    fixed = megatron_args(step_batch_size_schedule=schedule, seq_length=seq, global_batch_size=4,
                          paci_accumulation=4, train_iters=None, train_samples=10_000)
    assert check_args(fixed, argv=["x"]) == [
        "--paci-accumulation 4 does not divide the 2 micro-batches of an iteration (fewer "
        "micro-batches than one accumulation window needs, or windows that end mid-iteration): "
        "choose one of [1, 2], or change --step-batch-size-schedule"]
    # a batch the schedule reaches only after training ends is not checked: m = 2 (whose
    # a = 2 does not divide 3) at iteration 3 of global batch 12 after 4 iterations of 8
    late = dict(step_batch_size_schedule="0:8 1024:12", seq_length=seq, global_batch_size=4,
                paci_accumulation=2, micro_batch_size=2, data_parallel_size=2)
    assert check_args(megatron_args(train_iters=4, **late), argv=["x"]) == []
    assert check_args(megatron_args(train_iters=5, **late), argv=["x"]) == [
        "--step-batch-size-schedule: at 3 micro-batches per iteration: --paci-accumulation 2 "
        "does not divide the 3 micro-batches of an iteration (fewer micro-batches than one "
        "accumulation window needs, or windows that end mid-iteration): choose one of [1, 3], "
        "or change --step-batch-size-schedule"]


@pytest.mark.parametrize("overrides,argv,expected", [
    ({"untie_embeddings_and_output_weights": False, "use_distributed_optimizer": True,
      "use_precision_aware_optimizer": True}, [],
     "--use-precision-aware-optimizer (and --optimizer-cpu-offload) keep elsewhere"),
    ({"use_distributed_optimizer": True, "num_distributed_optimizer_instances": 2}, [],
     "--num-distributed-optimizer-instances 2: PACI reduces a stage's grad norm"),
    ({"fp16": True, "bf16": False}, [], "--fp16 uses dynamic loss scaling"),
    ({"virtual_pipeline_model_parallel_size": 2, "overlap_p2p_comm": True}, [],
     "remove --num-layers-per-virtual-pipeline-stage / --num-virtual-stages-per-pipeline-rank"),
    ({"mtp_num_layers": 1}, [], "multi-token prediction (--mtp-num-layers)"),
    ({"flextron": True}, [], "Flextron's router gradients are all-reduced across pipeline"),
    ({"has_cond_embedder": True}, [], "a conditional embedder's gradients (DiT)"),
    ({"fp8": "hybrid"}, [], "remove --fp8-format"),
    ({}, ["--rerun-mode", "validate_results"], "use --rerun-mode disabled"),
    ({"rerun_mode": "report_stats"}, ["--rerun-mode=report_stats"], "--rerun-mode report_stats re-runs"),
    ({"rampup_batch_size": ["16", "16", "1000"], "paci_accumulation": 8}, [],
     "--rampup-batch-size: at 4 micro-batches per iteration: --paci-accumulation 8 does not "
     "divide the 4 micro-batches"),
    ({"use_torch_fsdp2": True}, [], "--use-torch-fsdp2 is not supported"),
    ({"use_distributed_optimizer": True, "overlap_param_gather": True,
      "overlap_param_gather_with_optimizer_step": True}, [],
     "--overlap-param-gather-with-optimizer-step starts the first model chunk's parameter"),
    ({"cuda_graph_impl": "local"}, [], "remove --cuda-graph-impl"),
    ({"paci_accumulation": 3}, [], "--paci-accumulation 3 does not divide the 8 micro-batches"),
    ({"paci_max_drift": 1, "paci_accumulation": 1}, [], "exceeds --paci-max-drift 1: use --paci-accumulation 4"),
    ({"paci_drain_interval": -1}, [], "--paci-drain-interval -1: must be >= 0"),
    ({"paci_sync_warmup_iters": -1}, [], "--paci-sync-warmup-iters -1: must be >= 0"),
    ({"paci_lookahead": 5.0}, [], "--paci-lookahead 5.0: must be between 0 (off) and 4"),
    ({"optimizer_cuda_graph": True}, [], "--optimizer-cuda-graph replaces optimizer.step()"),
    ({"moe_expert_rank_capacity_factor": 1.5}, [], "--moe-expert-rank-capacity-factor re-runs"),
    ({"save_wgrads_interval": 10}, [], "--save-wgrads-interval needs a whole iteration's"),
    ({"freeze_all_layers": True}, [], "--freeze-all-layers makes the training calls forward-only"),
    ({"tensor_parallel_num_weight_shards": 2}, [], "--tensor-parallel-num-weight-shards reduces"),
    ({"pipeline_schedule": "1f1b"}, ["--yaml-cfg", "x.yaml", "--pipeline-schedule", "paci"],
     "put pipeline_schedule: paci in the YAML file"),
    ({"save": "/sys/paci_ckpt"}, [], "--save /sys/paci_ckpt: /sys is not writable"),
    ({"save": "/etc/hostname/ck"}, [], "/etc/hostname is a file, not a folder"),
    ({"paci_trace": "/sys/run.json"}, [], "--paci-trace /sys/run.json: /sys is not writable"),
    ({"train_iters": 100, "paci_sync_warmup_iters": 100}, [],
     "--paci-sync-warmup-iters 100 drains after every one of the 100 iterations"),
])
def test_each_refusal_names_the_flag_to_change(overrides, argv, expected):
    if "rampup_batch_size" in overrides:
        requires_ramp()
    problems = check_args(megatron_args(**overrides), argv=["pretrain_gpt.py", *argv])
    assert len(problems) == 1 and expected in problems[0], problems


def test_tied_embeddings_are_accepted_also_with_the_distributed_optimizer():
    # tests/test_composition.py: drained PACI == 1F1B with tied embeddings and the
    # distributed optimizer (pp2-dp2-distopt-tied-bf16)
    assert check_args(megatron_args(untie_embeddings_and_output_weights=False,
                                    use_distributed_optimizer=True),
                      argv=["pretrain_gpt.py"]) == []


def test_overlap_param_gather_is_accepted_with_the_distributed_optimizer_and_tied_embeddings():
    # tests/test_overlap_param_gather.py: no read of a weight before its gather finished,
    # drained PACI == 1F1B with the overlap
    assert check_args(megatron_args(untie_embeddings_and_output_weights=False,
                                    use_distributed_optimizer=True, overlap_grad_reduce=True,
                                    overlap_param_gather=True),
                      argv=["pretrain_gpt.py"]) == []


def test_moe_router_expert_bias_is_accepted_it_is_updated_at_each_local_update():
    # tests/test_moe.py: drained PACI == 1F1B with the expert bias on
    assert check_args(megatron_args(moe_router_enable_expert_bias=True, num_moe_experts=4),
                      argv=["pretrain_gpt.py"]) == []


def test_refusals_are_reported_together_once_before_training(capsys, monkeypatch):
    monkeypatch.setenv("RANK", "0")
    calls = []
    validate = megatron_lm._validated(lambda args, defaults=None: calls.append(args))
    args = megatron_args(fp16=True, mtp_num_layers=1)
    with pytest.raises(SystemExit) as stop:
        validate(args, {})
    assert stop.value.code == 2 and calls == [args]  # Megatron's own validation ran first
    err = capsys.readouterr().err
    assert "paci-megatron: this run cannot start (2 problem(s))" in err
    assert "--mtp-num-layers" in err and "--fp16" in err
    monkeypatch.setenv("RANK", "3")
    with pytest.raises(SystemExit):
        validate(megatron_args(fp16=True), {})
    assert capsys.readouterr().err == ""  # printed by rank 0 only


# --------------------------------------------------------------------------- patches
def fake_training_module(events):
    """A stand-in for megatron.training.training whose functions record their calls."""
    m = types.ModuleType("fake_megatron_training")

    def record(name, result=None):
        def fn(*a, **k):
            events.append((name, a, k))
            return result
        return fn

    m.setup_model_and_optimizer = record("setup", (["chunk"], "megatron-optimizer", "sched"))
    m.get_forward_backward_func = record("get_fbf", "megatron-1f1b")
    m.finalize_model_grads = record("finalize", "finalized")
    m.train_step = record("train_step", "step-result")
    m.training_log = record("training_log", "log-result")
    m.evaluate = record("evaluate", "eval-result")
    m.save_checkpoint_and_time = record("save", None)
    m.checkpoint_and_decide_exit = record("decide_exit", False)
    m.train = record("train", (10, 0.0))
    return m


class FakeSchedule:
    def __init__(self, events):
        self.events = events
        self.replans = []  # no batch-size ramp

    def drain(self):
        self.events.append(("drain", (), {}))


def test_patched_training_module_is_megatrons_own_under_1f1b(monkeypatch):
    monkeypatch.setattr(megatron_lm, "glue", Glue())
    events = []
    m = fake_training_module(events)
    megatron_lm._patch_training(m)
    megatron_lm._patch_training(m)  # idempotent: no double wrapping
    assert not hasattr(m.train_step.__paci_original__, "__paci_original__")
    assert m.get_forward_backward_func(schedule_pg_collection="pg") == "megatron-1f1b"
    assert m.setup_model_and_optimizer("mp", "mt") == (["chunk"], "megatron-optimizer", "sched")
    assert m.finalize_model_grads(["chunk"], 7) == "finalized"
    assert m.evaluate("x") == "eval-result" and m.train() == (10, 0.0)
    assert [e[0] for e in events] == ["get_fbf", "setup", "finalize", "evaluate", "train"]
    assert events[0][2] == {"schedule_pg_collection": "pg"} and events[2][1] == (["chunk"], 7)


def test_patched_training_module_runs_paci_and_drains_where_it_must(monkeypatch):
    glue = Glue()
    monkeypatch.setattr(megatron_lm, "glue", glue)
    monkeypatch.setattr(megatron_lm, "_print_summary", lambda: None)
    events = []
    m = fake_training_module(events)
    megatron_lm._patch_training(m)
    glue.active = True
    glue.args = argparse.Namespace(paci_drain_interval=2, log_interval=0)
    with pytest.raises(RuntimeError, match="before setup_model_and_optimizer"):
        m.get_forward_backward_func()
    glue.schedule = FakeSchedule(events)
    assert m.get_forward_backward_func(schedule_pg_collection="pg") is glue.schedule
    multi = type("MultiModuleProcessGroupCollection", (), {})()  # megatron-core 0.17+'s name
    with pytest.raises(PACIConfigError, match="--pipeline-schedule 1f1b"):
        m.get_forward_backward_func(schedule_pg_collection=multi)
    names = lambda: [e[0] for e in events]  # noqa: E731
    m.evaluate()
    m.save_checkpoint_and_time(4)
    assert names() == ["drain", "evaluate", "drain", "save"]
    events.clear()
    assert m.checkpoint_and_decide_exit() is False
    assert names() == ["decide_exit"]  # no exit: nothing drained
    events.clear()
    m.train_step()
    m.train_step()
    m.train_step()
    # the drain interval and the synchronous warm-up are the schedule's own decisions
    assert names() == ["train_step"] * 3 and glue.iteration == 3
    events.clear()
    m.train()
    assert names() == ["train", "drain"]  # drained at the end of training
    assert glue.drains == {"evaluation": 1, "checkpoint": 1, "end of training": 1}
    # Megatron's finalize_model_grads is the stage-local one: it starts with the chunk's
    # own grad sync (the token count is accepted: --calculate-per-token-loss)
    class Reached(Exception):
        pass

    class Chunk:
        def finish_grad_sync(self):
            raise Reached

    with pytest.raises(Reached):
        m.finalize_model_grads([Chunk()], num_tokens=torch.tensor(5))


def test_exit_decision_drains_before_megatron_exits(monkeypatch):
    glue = Glue()
    monkeypatch.setattr(megatron_lm, "glue", glue)
    monkeypatch.setattr(megatron_lm, "_print_summary", lambda: None)
    events = []
    m = fake_training_module(events)
    m.checkpoint_and_decide_exit = lambda *a, **k: events.append(("decide_exit",)) or True
    megatron_lm._patch_training(m)
    glue.active, glue.schedule = True, FakeSchedule(events)
    glue.args = argparse.Namespace(paci_drain_interval=0, log_interval=0)
    assert m.checkpoint_and_decide_exit() is True
    assert [e[0] for e in events] == ["decide_exit", "drain"]


# --------------------------------------------------------------------------- the command
INIT = '''# Copyright line
"""Package docstring
over two lines."""

import torch

from .global_vars import get_args
'''


def test_patch_inserts_two_marked_lines_after_the_docstring_and_reverts_exactly(tmp_path, capsys):
    target = tmp_path / "megatron" / "training" / "__init__.py"
    target.parent.mkdir(parents=True)
    target.write_text(INIT)
    assert cli.main(["patch", str(tmp_path), "--diff"]) == 0
    assert target.read_text() == INIT  # --diff writes nothing
    assert "+paci_megatron.hook.activate(glue=True)" in capsys.readouterr().out
    assert cli.main(["patch", str(tmp_path)]) == 0
    lines = target.read_text().splitlines()
    assert lines[3:5] == [line.rstrip("\n") for line in cli.PATCH_LINES]
    assert lines[:3] == INIT.splitlines()[:3] and lines[5:] == INIT.splitlines()[3:]
    assert cli.main(["patch", str(tmp_path)]) == 0
    assert "already patched" in capsys.readouterr().out
    assert target.read_text().count("paci-megatron") == 2
    patched = target.read_text()
    assert cli.main(["patch", str(tmp_path), "--revert", "--diff"]) == 0
    assert target.read_text() == patched  # --diff writes nothing, also with --revert
    assert "-paci_megatron.hook.activate(glue=True)" in capsys.readouterr().out
    assert cli.main(["patch", str(tmp_path), "--revert"]) == 0
    assert target.read_text() == INIT


def test_patch_refuses_a_folder_that_is_not_a_checkout(tmp_path, capsys):
    assert cli.main(["patch", str(tmp_path)]) == 2
    assert "is not a Megatron-LM checkout: megatron/training/__init__.py not found" in capsys.readouterr().err


def test_install_hook_writes_the_pth_file(tmp_path):
    path = cli.install_hook(str(tmp_path))
    with open(os.path.join(os.path.dirname(cli.__file__), "paci_megatron.pth")) as f:
        assert open(path).read() == f.read()
    assert "--pipeline-schedule" in open(path).read()


# --------------------------------------------------------------------------- CPU mode
def test_cuda_is_reported_to_megatron_training_only():
    from paci_megatron.cpu import _megatron_training_sees_cuda

    is_available = _megatron_training_sees_cuda(lambda: False)
    inside = {"__name__": "megatron.training.initialize", "f": is_available}
    exec("result = f()", inside)
    outside = {"__name__": "torch._dynamo.utils", "f": is_available}
    exec("result = f()", outside)
    assert inside["result"] is True and outside["result"] is False


def test_checkout_datasets_package_finds_the_installed_compiled_helper(tmp_path):
    from paci_megatron.cpu import _use_installed_dataset_helper

    pkg = types.SimpleNamespace(__path__=[str(tmp_path)])
    _use_installed_dataset_helper(pkg)
    assert len(pkg.__path__) == 2 and pkg.__path__[0] == str(tmp_path)
    assert any(n.startswith("helpers_cpp") for n in os.listdir(pkg.__path__[1]))
    (tmp_path / "helpers_cpp.so").write_text("")
    own = types.SimpleNamespace(__path__=[str(tmp_path)])
    _use_installed_dataset_helper(own)
    assert own.__path__ == [str(tmp_path)]  # a checkout with its own build keeps it


def test_arguments_that_skipped_validate_args_are_checked_before_the_model_is_built(
        monkeypatch, capsys):
    glue = Glue()
    monkeypatch.setattr(megatron_lm, "glue", glue)
    monkeypatch.setenv("RANK", "0")
    events = []
    m = fake_training_module(events)
    bad = megatron_args(fp16=True)
    m.get_args = lambda: bad  # e.g. arguments from --yaml-cfg, never seen by validate_args
    megatron_lm._patch_training(m)
    with pytest.raises(SystemExit):
        m.setup_model_and_optimizer()
    assert events == [] and "--fp16 uses dynamic loss scaling" in capsys.readouterr().err
    good = megatron_args(pipeline_schedule="1f1b")
    m.get_args = lambda: good
    assert m.setup_model_and_optimizer()[1] == "megatron-optimizer"
    assert glue.args is good and not glue.active


def test_patched_names_are_the_documented_ones():
    assert set(megatron_lm._TRAINING_PATCHES) == set(megatron_lm.PATCHED["megatron.training.training"])
    events = []
    m = fake_training_module(events)
    megatron_lm._patch_training(m)
    for name in megatron_lm.PATCHED["megatron.training.training"]:
        assert getattr(m, name).__paci_original__ is not None, name


def test_skip_train_evaluates_with_megatrons_schedule(monkeypatch):
    glue = Glue()
    monkeypatch.setattr(megatron_lm, "glue", glue)
    events = []
    m = fake_training_module(events)
    m.setup_model_and_optimizer = lambda *a, **k: (["chunk"], None, None)  # --skip-train
    megatron_lm._patch_training(m)
    glue.active = True
    glue.args = megatron_args()
    m.get_args = lambda: glue.args
    assert m.setup_model_and_optimizer()[1] is None and glue.evaluation_only
    assert m.get_forward_backward_func() == "megatron-1f1b"


def test_arguments_from_a_yaml_file_without_paci_attributes_are_read_with_defaults():
    # --yaml-cfg builds the namespace from the YAML: pipeline_schedule: paci, no paci_* keys
    args = megatron_args()
    for name in [n for n in vars(args) if n.startswith("paci_")]:
        delattr(args, name)
    assert check_args(args, argv=["pretrain_gpt.py", "--yaml-cfg", "x.yaml"]) == []
    settings = megatron_lm.resolve(args, argv=["pretrain_gpt.py", "--yaml-cfg", "x.yaml"])
    assert settings.drain_interval == 0 and settings.config.accumulation is None
    assert settings.accumulation == settings.num_microbatches == 8


class _Recorder:
    def __init__(self):
        self.calls = []

    def add_scalar(self, name, value, step):
        self.calls.append((name, value, step))

    def log(self, values, step):
        self.calls.append((values, step))


def test_log_line_writes_drift_grad_norm_and_lr_per_stage_to_megatrons_writers(monkeypatch):
    rows = [{"drift": {"max": 1, "mean": 0.25}, "version": 7, "grad_norm": 2.5, "lr": 1e-3},
            {"drift": {"max": 0, "mean": 0.0}, "version": 8, "grad_norm": None, "lr": 2e-3}]
    g = Glue()
    g.start_iteration, g.train_steps = 30, 10  # iteration 40
    monkeypatch.setattr(g, "stage_summaries", lambda: rows)
    tensorboard, wandb = _Recorder(), _Recorder()
    line = g.log_line((tensorboard, wandb))
    expected = {"paci/drift_max/stage_0": 1.0, "paci/drift_mean/stage_0": 0.25,
                "paci/grad_norm/stage_0": 2.5, "paci/lr/stage_0": 1e-3,
                "paci/drift_max/stage_1": 0.0, "paci/drift_mean/stage_1": 0.0,
                "paci/lr/stage_1": 2e-3}  # no update yet on stage 1: no grad norm
    assert tensorboard.calls == [(k, v, 40) for k, v in expected.items()]
    assert wandb.calls == [(expected, 40)]
    assert "drift_max per stage: [1, 0]" in line and "version per stage: [7, 8]" in line
    assert g.log_line((None, None)) == line  # writers not configured: the line alone


def test_the_command_reports_a_bad_site_packages_or_checkout_in_one_line(tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("")
    assert cli.main(["install-hook", "--site-packages", str(afile)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"paci-megatron: {afile} is not a folder") and "Traceback" not in err
    target = tmp_path / "megatron" / "training" / "__init__.py"
    target.parent.mkdir(parents=True)
    target.write_bytes(b"# \xff\xfe not text\n")
    for command in (["patch", str(tmp_path)], ["status", str(tmp_path)]):
        assert cli.main(command) == 2
        err = capsys.readouterr().err
        assert f"{target} is not UTF-8 text" in err and "Traceback" not in err
