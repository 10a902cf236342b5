"""Megatron-LM's own ``pretrain_gpt.py`` with ``--pipeline-schedule paci``, on CPU.

These tests launch the real training entry point of a Megatron-LM checkout under
torchrun with gloo (``PACI_MEGATRON_CPU=1``: :func:`paci_megatron.cpu.enable_megatron_lm_cpu_mode`),
mock data and a tiny GPT. They need a checkout, named by the environment variable
``MEGATRON_LM_PATH`` (``tools/release_matrix.py`` runs them for each release); without it
they are skipped with that message. Distributed-optimizer checkpoints are not loaded
here: on CPU, Megatron's torch-Adam fallback cannot reload them, with or without PACI. The
glue is activated the way users get it: by the installed ``paci_megatron.pth`` hook (or,
in the last test, by ``paci-megatron patch`` on a copy of the checkout).
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile

import pytest

CHECKOUT = os.environ.get("MEGATRON_LM_PATH")
pytestmark = pytest.mark.skipif(
    not CHECKOUT or not os.path.isfile(os.path.join(CHECKOUT or "", "pretrain_gpt.py")),
    reason="set MEGATRON_LM_PATH to a Megatron-LM checkout (e.g. git tag core_v0.16.1) to run "
           "Megatron-LM's own pretrain_gpt.py with --pipeline-schedule paci",
)

TINY = [
    "--distributed-backend", "gloo", "--transformer-impl", "local",
    "--attention-backend", "unfused", "--no-masked-softmax-fusion", "--no-bias-gelu-fusion",
    "--no-bias-dropout-fusion", "--no-gradient-accumulation-fusion", "--no-persist-layer-norm",
    "--no-rope-fusion", "--mock-data", "--tokenizer-type", "NullTokenizer",
    "--vocab-size", "4096", "--num-layers", "4", "--hidden-size", "64",
    "--num-attention-heads", "4", "--seq-length", "64", "--max-position-embeddings", "64",
    "--micro-batch-size", "2", "--global-batch-size", "8", "--lr", "3e-3", "--min-lr", "3e-4",
    "--lr-decay-style", "cosine", "--lr-warmup-iters", "2",
    "--untie-embeddings-and-output-weights", "--hidden-dropout", "0", "--attention-dropout", "0",
    "--log-interval", "1", "--eval-iters", "1", "--seed", "1234",
]
LOSS = re.compile(r"iteration\s+(\d+)/\s*\d+ \|.*?\| lm loss: ([0-9.E+-]+) \|")
VALID = re.compile(r"validation loss at iteration (\d+)( on \w+ set)? \| lm loss value: ([0-9.E+-]+)")
DRIFT = re.compile(r"paci \| iteration (\d+) \| drift_max per stage: (\[[0-9, ]*\])")


def launch(nproc, *flags, checkout=None, env=None, base=TINY, timeout=420):
    """Run pretrain_gpt.py under torchrun; returns (returncode, combined output).

    On timeout every process the launch started is killed (torchrun puts its workers in
    sessions of their own, and they start DataLoader workers) and the test fails.
    """
    checkout = checkout or CHECKOUT
    environ = dict(os.environ, PACI_MEGATRON_CPU="1", OMP_NUM_THREADS="1",
                   PYTHONWARNINGS="ignore", **(env or {}))
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
           "--master-port", str(_port()), os.path.join(checkout, "pretrain_gpt.py"), *base,
           *map(str, flags)]
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True,
                                env=environ, start_new_session=True)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_tree(proc.pid)
            proc.wait()
            log.seek(0)
            pytest.fail(f"pretrain_gpt.py did not finish within {timeout} s:\n{log.read()[-4000:]}")
        log.seek(0)
        return proc.returncode, log.read()


def _kill_tree(pid):
    """SIGKILL ``pid`` and all its descendants (read from /proc)."""
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    todo, seen = [pid], []
    while todo:
        p = todo.pop()
        seen.append(p)
        todo.extend(children.get(p, []))
    for p in seen:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _port():
    from harness import free_port

    return free_port()


def ok(nproc, *flags, **kw):
    rc, out = launch(nproc, *flags, **kw)
    assert rc == 0, out[-6000:]
    return out


def losses(out):
    return {int(i): float(v) for i, v in LOSS.findall(out)}


def validation(out):
    return [(int(i), where.strip(), float(v)) for i, where, v in VALID.findall(out)]


CONTRACT = r"""
import inspect, json, sys
sys.path.insert(0, sys.argv[1])
import megatron.training.arguments, megatron.training.initialize, megatron.training.training
import megatron.training.global_vars
out = {}
for module in ("megatron.training.arguments", "megatron.training.initialize",
               "megatron.training.training", "megatron.training.global_vars"):
    for name, value in vars(sys.modules[module]).items():
        if callable(value):
            try:
                out[f"{module}:{name}"] = list(inspect.signature(value).parameters)
            except (TypeError, ValueError):
                out[f"{module}:{name}"] = None
print(json.dumps(out))
"""
#: where the glue relies on more than the name: the parameters it passes by position
LEADING = {"megatron.training.arguments:_add_distributed_args": ["parser"],
           "megatron.training.arguments:validate_args": ["args"],
           "megatron.training.training:finalize_model_grads": ["model"]}
#: rebound only where the release has it (gone from megatron.training.initialize in 0.18)
OPTIONAL = {"megatron.training.initialize:validate_args"}


def test_every_name_the_glue_rebinds_exists_with_the_parameters_it_expects():
    from paci_megatron.megatron_lm import PATCHED

    proc = subprocess.run([sys.executable, "-c", CONTRACT, CHECKOUT], capture_output=True,
                          text=True, timeout=300, env=dict(os.environ, PYTHONWARNINGS="ignore"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    rebound = {f"{module}:{name}" for module, names in PATCHED.items() for name in names}
    missing = sorted(rebound - set(found) - OPTIONAL)
    assert missing == [], f"this Megatron-LM lacks what the glue rebinds: {missing}"
    for key, leading in LEADING.items():
        params = found[key]
        assert params[:len(leading)] == leading, f"{key}{params}: the glue passes {leading}"
    for key in ("megatron.training.training:get_args",  # read by the glue's wrappers
                "megatron.training.global_vars:get_tensorboard_writer",
                "megatron.training.global_vars:get_wandb_writer"):
        assert key in found, key


@pytest.mark.parametrize("pp,expected", [(2, [1, 0]), (4, [1, 1, 1, 0])])
def test_paci_trains_megatron_lm_with_drift_per_stage(pp, expected):
    out = ok(pp, "--pipeline-model-parallel-size", pp, "--pipeline-schedule", "paci",
             "--train-iters", 16, "--eval-interval", 16)
    # the PACI schedule and optimizer wrapper are the ones Megatron-LM called: every stage
    # announces them, the drift lines come from the schedule's own telemetry, and each
    # stage's wrapper counted its local updates (a = m: one per iteration)
    for s in range(pp):
        assert f"paci-megatron: stage {s} of {pp}: PACI schedule active (accumulation a = 4 of m = 4" in out
    drift = {int(i): v for i, v in DRIFT.findall(out)}
    assert sorted(drift) == list(range(1, 17)) and drift[16] == str(expected)
    assert (f"stopped at iteration 16 with the PACI schedule: train_step calls per stage "
            f"{[16] * pp}, local updates per stage {[16] * pp}, drift_max per stage {expected}, "
            "drains {'evaluation': 1, 'end of training': 1}") in out
    loss = losses(out)
    assert sorted(loss) == list(range(1, 17))
    first, last = sum(loss[i] for i in range(1, 5)) / 4, sum(loss[i] for i in range(13, 17)) / 4
    assert last < first - 0.1, loss
    assert "--pipeline-schedule paci (rerun mode disabled)" in out


def test_tensorboard_event_file_holds_the_drift_per_stage(tmp_path):
    pytest.importorskip("tensorboard", reason="pip install tensorboard (Megatron-LM's writer)")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ok(2, "--pipeline-model-parallel-size", 2, "--pipeline-schedule", "paci",
       "--train-iters", 4, "--eval-interval", 4, "--paci-accumulation", 1,
       "--tensorboard-dir", tmp_path / "tb")
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    series = {tag: [(e.step, e.value) for e in events.Scalars(tag)]
              for tag in events.Tags()["scalars"] if tag.startswith("paci/")}
    # a = 1 on 2 stages: stage 0 drifts by its bound 1 from the first iteration on
    assert [v for _, v in series["paci/drift_max/stage_0"]] == [1.0] * 4
    assert [v for _, v in series["paci/drift_max/stage_1"]] == [0.0] * 4
    assert [step for step, _ in series["paci/drift_max/stage_0"]] == [1, 2, 3, 4]
    for stage in (0, 1):
        assert len(series[f"paci/grad_norm/stage_{stage}"]) == 4
        assert all(v > 0 for _, v in series[f"paci/grad_norm/stage_{stage}"])
        lrs = [v for _, v in series[f"paci/lr/stage_{stage}"]]
        assert len(lrs) == 4 and lrs[1] > lrs[0] > 0  # the LR warm-up, as each stage applied it


def test_accumulation_one_gives_drift_bound_per_stage(tmp_path):
    trace = tmp_path / "trace.json"
    out = ok(4, "--pipeline-model-parallel-size", 4, "--pipeline-schedule", "paci",
             "--paci-accumulation", 1, "--train-iters", 4, "--eval-interval", 4,
             "--paci-trace", trace)
    drift = {int(i): v for i, v in DRIFT.findall(out)}
    assert drift[4] == "[3, 2, 1, 0]"
    assert "local updates per stage [16, 16, 16, 16]" in out
    # --paci-trace in the glue: every stage's 16 forwards, 16 backwards, 16 updates
    events = [e for e in json.loads(trace.read_text())["traceEvents"] if e["ph"] == "X"]
    for kind in ("forward", "backward", "update"):
        counts = [sum(1 for e in events if e["cat"] == kind and e["tid"] == s) for s in range(4)]
        assert counts == [16] * 4, (kind, counts)
    assert f"trace of {len(events)} actions written to {trace}" in out


@pytest.mark.parametrize("split", [  # [2, 1, 1, 1] layers; [1, 1, 2, 0]
    ["--num-layers", 5, "--decoder-first-pipeline-num-layers", 2,
     "--decoder-last-pipeline-num-layers", 1],
    ["--pipeline-model-parallel-layout", "Et|t|t*2|L"],
], ids=["first-last", "layout"])
def test_uneven_split_drained_paci_prints_1f1b_losses_and_drift_is_the_bound(split):
    common = ["--pipeline-model-parallel-size", 4, "--train-iters", 4, "--eval-interval", 4,
              "--clip-grad", 0, *split]
    base = losses(ok(4, *common, "--pipeline-schedule", "1f1b"))
    assert sorted(base) == [1, 2, 3, 4]
    drained = losses(ok(4, *common, "--pipeline-schedule", "paci", "--paci-drain-interval", 1))
    assert drained == base  # every printed digit
    out = ok(4, *common, "--pipeline-schedule", "paci", "--paci-accumulation", 1,
             "--paci-sync-warmup-iters", 0)
    assert {int(i): v for i, v in DRIFT.findall(out)}[4] == "[3, 2, 1, 0]"


#: sample-based training with a batch-size ramp: global batch 4 (m = 2) for the first 16
#: samples, then 8 (m = 4): 96 samples in 14 iterations
_WARMUP = TINY.index("--lr-warmup-iters")
_SAMPLES = TINY[:_WARMUP] + TINY[_WARMUP + 2:] + [
    "--train-samples", "96", "--lr-warmup-samples", "8", "--lr-decay-samples", "96"]
RAMP = _SAMPLES + ["--rampup-batch-size", "4", "4", "16"]
#: the same batches from megatron-core 0.18's step schedule (thresholds in tokens: 16
#: samples of 64 tokens), which takes the place of --global-batch-size
_GBS = _SAMPLES.index("--global-batch-size")
STEP = _SAMPLES[:_GBS] + _SAMPLES[_GBS + 2:] + ["--step-batch-size-schedule", "0:4 1024:8"]
CHANGE_MSG = (r"paci-megatron: iteration (\d+): (\d+) -> (\d+) micro-batches per "
              r"iteration \({}\): accumulation a = (\d+), drift bound per "
              r"stage (\[[0-9, ]*\])(, drained first)?")


def _batch_size_change_is_exact(base, label, tmp_path):
    """Drained PACI == Megatron's 1F1B through the change of m (global batch 4 -> 8 after
    16 samples); continuous PACI re-plans there (a = m: 2 -> 4, drained first), its drift
    stays the bound; a checkpoint inside the first batch size resumes onto the run that
    saved there."""
    message = re.compile(CHANGE_MSG.format(re.escape(label)))
    common = ["--pipeline-model-parallel-size", 2, "--eval-interval", 100, "--clip-grad", 0]
    reference = losses(ok(2, *common, "--pipeline-schedule", "1f1b", base=base))
    assert sorted(reference) == list(range(1, 15))  # 4 iterations of 4 samples, 10 of 8
    drained = losses(ok(2, *common, "--pipeline-schedule", "paci", "--paci-drain-interval", 1,
                        base=base))
    assert drained == reference  # every printed digit
    out = ok(2, *common, "--pipeline-schedule", "paci", "--paci-sync-warmup-iters", 0,
             base=base)
    assert message.findall(out) == [("5", "2", "4", "4", "[1, 0]", ", drained first")]
    assert {int(i): v for i, v in DRIFT.findall(out)}[14] == "[1, 0]"
    assert losses(out) != reference  # asynchronous between the drains
    # with --save, Megatron-LM saves when m changes: that checkpoint's drain is the one
    out = ok(2, *common, "--pipeline-schedule", "paci", "--paci-sync-warmup-iters", 0,
             "--save", tmp_path / "a", "--save-interval", 3, base=base)
    assert message.findall(out) == [("5", "2", "4", "4", "[1, 0]", "")]
    straight = losses(out)
    # stopped at iteration 3 (inside the first batch size), resumed: what the run that
    # saved there printed
    ok(2, *common, "--pipeline-schedule", "paci", "--paci-sync-warmup-iters", 0,
       "--save", tmp_path / "b", "--save-interval", 3, "--exit-interval", 3, base=base)
    resumed = ok(2, *common, "--pipeline-schedule", "paci", "--paci-sync-warmup-iters", 0,
                 "--save", tmp_path / "b", "--save-interval", 3, "--load", tmp_path / "b",
                 base=base)
    assert "starting at iteration 3" in resumed
    assert message.findall(resumed) == [("5", "2", "4", "4", "[1, 0]", "")]
    again = losses(resumed)
    assert all(again[i] == straight[i] for i in (4, *range(6, 15)))
    # Megatron-LM 0.16 prints the mean of iterations 4 and 5 at 5 after a resume (its loss
    # average is not reset after a process's first logged iteration)
    assert again[5] == straight[5] or again[5] == pytest.approx((straight[4] + straight[5]) / 2,
                                                               rel=1e-6)


def test_batch_size_ramp_drained_paci_prints_1f1b_losses_and_resumes_across_the_change(tmp_path):
    """--rampup-batch-size (megatron-core up to 0.17): :func:`_batch_size_change_is_exact`."""
    from paci_megatron.compat import ramp_supported

    if not ramp_supported():
        pytest.skip("this megatron-core ignores --rampup-batch-size (deprecated from 0.18, "
                    "replaced by --step-batch-size-schedule): Megatron-LM trains with a "
                    "constant batch, and so does PACI")
    _batch_size_change_is_exact(RAMP, "batch-size ramp-up", tmp_path)


def test_step_batch_size_schedule_drained_paci_prints_1f1b_losses_and_resumes_across_the_change(
        tmp_path):
    """--step-batch-size-schedule (megatron-core 0.18 on): :func:`_batch_size_change_is_exact`."""
    from paci_megatron.compat import step_schedule_supported

    if not step_schedule_supported():
        pytest.skip("--step-batch-size-schedule needs megatron-core 0.18 or newer")
    _batch_size_change_is_exact(STEP, "step batch-size schedule", tmp_path)


def test_without_the_flag_and_with_1f1b_megatron_is_unchanged():
    common = ["--pipeline-model-parallel-size", 2, "--train-iters", 6, "--eval-interval", 3]
    plain = ok(2, *common)
    explicit = ok(2, *common, "--pipeline-schedule", "1f1b")
    assert "paci-megatron" not in plain and "pipeline_schedule" not in plain  # hook idle
    assert "pipeline_schedule ............................... 1f1b" in explicit
    assert "paci |" not in explicit and "PACI schedule active" not in explicit
    assert len(losses(plain)) == 6
    assert losses(explicit) == losses(plain)  # every printed digit
    assert validation(explicit) == validation(plain) and len(validation(plain)) == 4


@pytest.mark.parametrize("optimizer", ["adam", "muon"])
def test_drained_paci_prints_1f1b_losses_and_the_synchronous_warm_up_is_1f1b(optimizer):
    if optimizer == "muon" and "'muon'" not in open(
            os.path.join(CHECKOUT, "megatron", "training", "arguments.py")).read():
        pytest.skip("this Megatron-LM has no --optimizer muon (added in core_v0.16)")
    common = ["--pipeline-model-parallel-size", 2, "--train-iters", 6, "--eval-interval", 6,
              "--clip-grad", 0, "--optimizer", optimizer]
    base = losses(ok(2, *common, "--pipeline-schedule", "1f1b"))  # Megatron's own 1F1B
    assert sorted(base) == list(range(1, 7))
    drained = losses(ok(2, *common, "--pipeline-schedule", "paci", "--paci-drain-interval", 1))
    assert drained == base  # every printed digit
    warm = ok(2, *common, "--pipeline-schedule", "paci", "--paci-sync-warmup-iters", 3)
    assert "synchronous warm-up 3 iterations" in warm
    warm = losses(warm)
    assert [warm[i] for i in (1, 2, 3)] == [base[i] for i in (1, 2, 3)] and warm[6] != base[6]


TIED = [f for f in TINY if f != "--untie-embeddings-and-output-weights"]
TIED_LAG = re.compile(r"paci \| iteration (\d+) \|.*tied embedding lag max: (\d+) \|")


@pytest.mark.parametrize("pp,dtype", [(2, "fp32"), (4, "bf16")])
def test_tied_embeddings_drained_paci_prints_1f1b_losses_and_continuous_paci_lags_by_the_bound(
        pp, dtype):
    common = ["--pipeline-model-parallel-size", pp, "--train-iters", 6, "--eval-interval", 6,
              "--clip-grad", 0, *(["--bf16"] if dtype == "bf16" else [])]
    base = losses(ok(pp, *common, "--pipeline-schedule", "1f1b", base=TIED))
    assert sorted(base) == list(range(1, 7))
    drained = ok(pp, *common, "--pipeline-schedule", "paci", "--paci-drain-interval", 1,
                 base=TIED)
    assert losses(drained) == base  # every printed digit: E and E' stepped as Megatron does
    out = ok(pp, *common, "--pipeline-schedule", "paci", "--paci-sync-warmup-iters", 0,
             "--paci-accumulation", 1, base=TIED)
    # a = 1: the last stage's copy trails its own version by ceil((P-1)/a) = P-1 updates
    assert TIED_LAG.findall(out)[-1] == ("6", str(pp - 1))
    assert losses(out)[6] != base[6] and [v[0] for v in validation(out)][0] == 6  # drained, evaluated


def test_tied_embeddings_with_the_distributed_optimizer_drained_paci_prints_1f1b_losses():
    # PP 2 x DP 2: each data-parallel rank's shard of E and of E' covers the same elements
    common = ["--pipeline-model-parallel-size", 2, "--train-iters", 4, "--eval-interval", 4,
              "--clip-grad", 0, "--bf16", "--use-distributed-optimizer"]
    base = losses(ok(4, *common, "--pipeline-schedule", "1f1b", base=TIED))
    assert sorted(base) == list(range(1, 5))
    drained = ok(4, *common, "--pipeline-schedule", "paci", "--paci-drain-interval", 1,
                 base=TIED)
    assert losses(drained) == base  # every printed digit
    out = ok(4, *common, "--pipeline-schedule", "paci", "--paci-sync-warmup-iters", 0,
             "--paci-accumulation", 1, base=TIED)
    assert TIED_LAG.findall(out)[-1] == ("4", "1")
    assert losses(out)[4] != base[4]


def test_overlap_param_gather_drained_paci_prints_1f1b_losses_and_continuous_paci_trains():
    # PP 2 x DP 2, tied, bf16, small buckets: megatron-core's forward pre-hooks gather the
    # shards bucket by bucket (after Megatron-LM's first iteration, which runs without them)
    common = ["--pipeline-model-parallel-size", 2, "--train-iters", 4, "--eval-interval", 4,
              "--clip-grad", 0, "--bf16", "--use-distributed-optimizer", "--overlap-grad-reduce",
              "--overlap-param-gather", "--ddp-bucket-size", 20000]
    base = losses(ok(4, *common, "--pipeline-schedule", "1f1b", base=TIED))
    assert sorted(base) == list(range(1, 5))
    drained = ok(4, *common, "--pipeline-schedule", "paci", "--paci-drain-interval", 1,
                 base=TIED)
    assert losses(drained) == base  # every printed digit
    out = ok(4, *common, "--pipeline-schedule", "paci", "--paci-sync-warmup-iters", 0,
             "--paci-accumulation", 1, base=TIED)
    assert "drift_max per stage [1, 0]" in out and TIED_LAG.findall(out)[-1] == ("4", "1")
    assert losses(out)[4] != base[4] and [v[0] for v in validation(out)][0] == 4


def test_per_token_loss_drained_paci_prints_1f1b_losses_and_continuous_paci_trains():
    # PP 2 x DP 2, tied, bf16, distributed optimizer: the token count of each window
    # travels backward with the gradients (tests/test_per_token_loss.py: very different
    # counts per micro-batch, each window's checked)
    common = ["--pipeline-model-parallel-size", 2, "--train-iters", 4, "--eval-interval", 4,
              "--clip-grad", 0, "--bf16", "--use-distributed-optimizer",
              "--calculate-per-token-loss"]
    base = losses(ok(4, *common, "--pipeline-schedule", "1f1b", base=TIED))
    assert sorted(base) == list(range(1, 5))
    drained = ok(4, *common, "--pipeline-schedule", "paci", "--paci-drain-interval", 1,
                 base=TIED)
    assert losses(drained) == base  # every printed digit
    out = ok(4, *common, "--pipeline-schedule", "paci", "--paci-sync-warmup-iters", 0,
             "--paci-accumulation", 2, base=TIED)
    assert "drift_max per stage [1, 0]" in out
    assert losses(out)[4] != base[4] and [v[0] for v in validation(out)][0] == 4


def test_tied_embeddings_checkpoint_resumes_exactly(tmp_path):
    common = ["--pipeline-model-parallel-size", 2, "--pipeline-schedule", "paci",
              "--train-iters", 8, "--eval-interval", 4, "--paci-sync-warmup-iters", 0]
    ok(2, *common, "--save", tmp_path / "a", "--save-interval", 4, "--exit-interval", 4,
       base=TIED)
    resumed = ok(2, *common, "--load", tmp_path / "a", base=TIED)
    assert "starting at iteration 4, version 4" in resumed
    whole = ok(2, *common, "--save", tmp_path / "b", "--save-interval", 4, base=TIED)
    # the save drained both copies of the tied weight to the same bits and the resumed
    # copy's tied version is the stage's: the resumed run prints the uninterrupted one's
    a, b = losses(resumed), losses(whole)
    assert a[7] == b[7] and a[8] == b[8]
    assert [v for v in validation(resumed) if v[0] == 8] == [v for v in validation(whole) if v[0] == 8]
    assert TIED_LAG.findall(resumed)[-1] == ("8", "1")


MOE = ["--num-experts", 4, "--moe-router-topk", 2, "--moe-aux-loss-coeff", 1e-2,
       "--moe-router-score-function", "sigmoid", "--moe-router-enable-expert-bias",
       "--moe-router-load-balancing-type", "aux_loss", "--moe-token-dispatcher-type", "alltoall",
       "--disable-bias-linear"]


def test_moe_drained_paci_prints_1f1b_losses_and_continuous_paci_trains():
    common = ["--pipeline-model-parallel-size", 2, "--train-iters", 6, "--eval-interval", 6,
              "--clip-grad", 0, *MOE]
    base = losses(ok(2, *common, "--pipeline-schedule", "1f1b"))
    assert sorted(base) == list(range(1, 7))
    drained = losses(ok(2, *common, "--pipeline-schedule", "paci", "--paci-drain-interval", 1))
    assert drained == base  # every printed digit, router expert bias included
    out = ok(2, *common, "--pipeline-schedule", "paci", "--paci-sync-warmup-iters", 0)
    assert DRIFT.findall(out)[-1] == ("6", "[1, 0]")
    assert losses(out)[6] != base[6]


def test_megatron_timing_log_shows_forward_backward_under_paci():
    out = ok(2, "--pipeline-model-parallel-size", 2, "--pipeline-schedule", "paci",
             "--train-iters", 4, "--eval-interval", 4, "--timing-log-level", 1)
    timed = re.findall(r"forward-backward \.+: \(([0-9.]+), ([0-9.]+)\)", out)
    assert len(timed) >= 4 and all(float(hi) > 0 for _, hi in timed), timed


def test_paci_checkpoint_saves_drained_and_resumes(tmp_path):
    common = ["--pipeline-model-parallel-size", 2, "--pipeline-schedule", "paci",
              "--train-iters", 12, "--eval-interval", 4]
    first = ok(2, *common, "--save", tmp_path / "a", "--save-interval", 4, "--exit-interval", 8)
    assert "stopped at iteration 8 with the PACI schedule" in first
    assert (tmp_path / "a" / "latest_checkpointed_iteration.txt").read_text().strip() == "8"
    resumed = ok(2, *common, "--load", tmp_path / "a")
    assert "starting at iteration 8, version 8" in resumed
    whole = ok(2, *common, "--save", tmp_path / "b", "--save-interval", 4)
    a, b = losses(resumed), losses(whole)
    # Megatron-LM 0.16 does not reset its loss average after a process's first logged
    # iteration, so iteration 10 of the resumed run prints the mean of 9 and 10 (0.14
    # prints iteration 10 alone)
    assert a[9] == b[9] and a[11] == b[11] and a[12] == b[12]
    assert a[10] == b[10] or a[10] == pytest.approx((b[9] + b[10]) / 2, rel=1e-6)
    assert [v for v in validation(resumed) if v[0] == 12] == [v for v in validation(whole) if v[0] == 12]
    # another global batch size: the stage version comes from the samples consumed (64 of
    # 2 per micro-batch = 32 micro-batches = 4 windows of a = m = 8), not iteration x m / a
    # (Megatron's own LR-schedule check wants its schedule from the checkpoint then)
    other = [*common, "--load", tmp_path / "a", "--use-checkpoint-opt_param-scheduler"]
    bigger = ok(2, *other, "--global-batch-size", 16)
    assert "starting at iteration 8, version 4" in bigger and sorted(losses(bigger)) == [9, 10, 11, 12]
    rc, out = launch(2, *other, "--global-batch-size", 12)
    assert rc != 0 and "not whole accumulation windows of a = 6 micro-batches" in out


def test_refusals_stop_megatron_lm_before_training():
    tied = [f for f in TINY if f != "--untie-embeddings-and-output-weights"]
    rc, out = launch(2, "--pipeline-model-parallel-size", 2, "--pipeline-schedule", "paci",
                     "--train-iters", 4, "--rerun-mode", "validate_results",
                     "--fp16", "--paci-accumulation", 3, base=tied)
    assert rc != 0
    assert "paci-megatron: this run cannot start (3 problem(s))" in out
    assert "add --untie" not in out  # tied embeddings are supported (tests below)
    for text in ("--fp16 uses dynamic loss scaling",
                 "use --rerun-mode disabled",
                 "--paci-accumulation 3 does not divide the 4 micro-batches"):
        assert text in out
    assert not LOSS.search(out) and "[before the start of training step]" not in out


def test_patched_checkout_activates_without_the_hook(tmp_path):
    copy = tmp_path / "Megatron-LM"
    copy.mkdir()
    for name in ("pretrain_gpt.py", "gpt_builders.py", "model_provider.py"):
        if os.path.exists(os.path.join(CHECKOUT, name)):
            shutil.copy(os.path.join(CHECKOUT, name), copy / name)
    shutil.copytree(os.path.join(CHECKOUT, "megatron"), copy / "megatron",
                    ignore=shutil.ignore_patterns("__pycache__"))
    from paci_megatron.cli import main

    assert main(["patch", str(copy)]) == 0
    # the .pth hook is switched off: only the edit in megatron/training/__init__.py acts
    env = {"PACI_MEGATRON_DISABLE": "1"}
    plain = ok(2, "--pipeline-model-parallel-size", 2, "--train-iters", 4, "--eval-interval", 4,
               checkout=str(copy), env=env)
    assert "pipeline_schedule ............................... 1f1b" in plain
    assert "PACI schedule active" not in plain
    out = ok(2, "--pipeline-model-parallel-size", 2, "--pipeline-schedule", "paci",
             "--train-iters", 4, "--eval-interval", 4, checkout=str(copy), env=env)
    assert "paci-megatron: stage 1 of 2: PACI schedule active" in out
    assert losses(out).keys() == {1, 2, 3, 4}
    assert main(["patch", str(copy), "--revert"]) == 0
    target = os.path.join("megatron", "training", "__init__.py")
    with open(os.path.join(CHECKOUT, target), "rb") as f:
        assert (copy / target).read_bytes() == f.read()


@pytest.mark.parametrize("script,expected", [
    ("gpt2_medium_pp8.sh", "validated paci disabled 2 8 None"),
    ("gpt2_medium_pp8_1f1b.sh", "validated 1f1b validate_results 2 8 None"),  # Megatron's default rerun mode
    ("gpt2_medium_pp8_interleaved.sh", "validated 1f1b validate_results 2 8 2"),
])
def test_gpt2_medium_recipe_passes_megatron_lm_and_paci_validation(script, expected):
    """The paper recipe's flags, each schedule on its own split, parsed and validated by
    Megatron-LM itself (16 ranks, as on 2 nodes) and then by PACI's checks, without
    launching anything."""
    recipes = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                           "examples", "megatron_lm")
    environ = dict(os.environ, DRY_RUN="1", MEGATRON_LM=CHECKOUT, DATA_PREFIX="/data/owt_text_document",
                   NNODES="2")  # the recipe's micro-batch then gives m = a = 8 at DP 2
    cmd = subprocess.run(["bash", os.path.join(recipes, script)], env=environ,
                         capture_output=True, text=True, check=True, timeout=60).stdout
    import shlex

    argv = shlex.split(cmd)
    argv = argv[argv.index(os.path.join(CHECKOUT, "pretrain_gpt.py")) + 1:]
    code = ("from megatron.training.arguments import parse_args, validate_args\n"
            "args = parse_args(); validate_args(args)\n"
            "print('validated', args.pipeline_schedule, args.rerun_mode, args.data_parallel_size,"
            " args.global_batch_size // (args.micro_batch_size * args.data_parallel_size),"
            " args.virtual_pipeline_model_parallel_size)\n")
    proc = subprocess.run([sys.executable, "-c", code, *argv], cwd=CHECKOUT, capture_output=True,
                          text=True, timeout=300,
                          env=dict(os.environ, PACI_MEGATRON_CPU="1", WORLD_SIZE="16", RANK="0",
                                   LOCAL_RANK="0"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert expected in proc.stdout  # DP 2, m = 256 / (16 x 2), model chunks per stage


def test_tiny_cpu_recipe_trains_with_paci():
    recipes = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                           "examples", "megatron_lm")
    proc = subprocess.run(["bash", os.path.join(recipes, "tiny_gpt_cpu.sh"), "--train-iters", "6",
                           "--eval-interval", "6", "--lr-warmup-iters", "1"],
                          env=dict(os.environ, MEGATRON_LM=CHECKOUT, PP="2"),
                          capture_output=True, text=True, timeout=420)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "drift_max per stage: [1, 0]" in out and "local updates per stage [6, 6]" in out


def test_paci_with_distributed_optimizer_bf16_and_data_parallelism():
    out = ok(4, "--pipeline-model-parallel-size", 2, "--pipeline-schedule", "paci",
             "--use-distributed-optimizer", "--bf16", "--train-iters", 6, "--eval-interval", 6)
    # two data-parallel replicas of a 2-stage pipeline: each stage's wrapper reduces its
    # grads over its own DP group and updates once per iteration
    assert "stopped at iteration 6 with the PACI schedule: train_step calls per stage [6, 6], " \
           "local updates per stage [6, 6], drift_max per stage [1, 0]" in out
    assert len(losses(out)) == 6 and "using world size: 4, data-parallel size: 2" in out


def test_paci_run_with_exit_signal_handler_and_data_workers_exits():
    # Megatron's SIGTERM handler is inherited by the DataLoader workers; a data iterator
    # kept alive until interpreter exit would make their join hang
    out = ok(2, "--pipeline-model-parallel-size", 2, "--pipeline-schedule", "paci",
             "--exit-signal-handler", "--num-workers", 2, "--train-iters", 4,
             "--eval-interval", 4, timeout=120)
    assert "stopped at iteration 4 with the PACI schedule" in out


def test_skip_train_evaluates_under_paci():
    out = ok(2, "--pipeline-model-parallel-size", 2, "--pipeline-schedule", "paci",
             "--skip-train", "--train-iters", 4, "--eval-interval", 4)
    assert "skipping training" in out and [v[0] for v in validation(out)] == [0, 0]
