"""Nothing lost, nothing silently wrong (examples/pretrain_gpt.py): resume, relaunch,
divergence, bad flags and data, each reproduced and refused or handled."""

import json
import os

import pytest

from launch import TINY, launch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
S = TINY + ["--untie-embeddings-and-output-weights", "--log-interval", "1"]


def run(cwd, *flags, nproc=2, pp=2, corpus=None):
    extra = ["--data-path", corpus] if corpus else []
    return launch("--untie-embeddings-and-output-weights", "--log-interval", "1",
                  "--pipeline-model-parallel-size", pp, *extra, *flags, nproc=nproc, cwd=cwd)


def tracker(path):
    return (path / "latest_checkpointed_iteration.txt").read_text()


def test_resume_relaunch_and_a_checkpoint_that_does_not_fit(corpus, tmp_path, capsys,
                                                            monkeypatch):
    ck, log = tmp_path / "ck", tmp_path / "log.jsonl"
    common = ["--pipeline-schedule", "paci", "--eval-interval", "2", "--save", ck,
              "--log-json", log]
    rc, out = run(tmp_path, *common, "--train-iters", "4", "--exit-interval", "2",
                  corpus=corpus)
    assert rc == 0, out[-3000:]
    (ck / "iter_0000002" / "stale.pt.tmp4242").write_text("a killed save")
    rc, out = run(tmp_path, *common, "--train-iters", "4", "--load", ck, corpus=corpus)
    assert rc == 0, out[-3000:]
    # the resumed run appended to the log: every record once
    its = [json.loads(line)["iteration"] for line in log.read_text().splitlines()]
    assert its == [0, 1, 2, 3, 4], its
    assert not (ck / "iter_0000002" / "stale.pt.tmp4242").exists()  # cleaned by the next save
    assert tracker(ck) == "4"
    # refused before start-up (checked in-process: the same check_args torchrun's ranks run)
    assert "is at iteration 4, beyond --train-iters 2" in refusal(
        capsys, monkeypatch, *common, "--train-iters", "2", "--load", ck)
    assert tracker(ck) == "4"
    assert "written with TP x PP = 1 x 2, this run has 1 x 1" in refusal(
        capsys, monkeypatch, "--train-iters", "6", "--load", ck, pp=1, world=1)
    rel = tmp_path / "release"
    rel.mkdir()
    (rel / "latest_checkpointed_iteration.txt").write_text("release")
    assert "holds 'release', not an iteration" in refusal(
        capsys, monkeypatch, "--train-iters", "6", "--load", rel)
    (rel / "latest_checkpointed_iteration.txt").write_text("3")
    assert "iter_0000003 is missing there" in refusal(
        capsys, monkeypatch, "--train-iters", "6", "--load", rel)
    # --save onto another run's checkpoints without loading them: refused
    assert "holds checkpoints (up to iteration 4) that this run did not load" in refusal(
        capsys, monkeypatch, "--train-iters", "6", "--save", ck)
    # a finished run relaunched: nothing to do, said once, exit 0
    rc, out = run(tmp_path, *common, "--train-iters", "4", "--load", ck, corpus=corpus)
    assert rc == 0 and out.count("nothing to do") == 1 and "Traceback" not in out
    # another global batch: refused after loading, it would re-read or skip samples
    rc, out = run(tmp_path, *common, "--train-iters", "6", "--load", ck,
                  "--global-batch-size", "16", corpus=corpus)
    assert rc != 0 and "trained with --global-batch-size 8; this run has 16" in out
    assert out.count("cannot be resumed") == 1 and tracker(ck) == "4"
    # a longer run than the saved schedule: refused (its lr would sit at --min-lr)
    rc, out = run(tmp_path, *common, "--train-iters", "6", "--load", ck, corpus=corpus)
    assert rc != 0 and "learning-rate schedule decays over 4 iterations" in out
    # a 1F1B checkpoint resumed under PACI: a drained state, not "damaged"
    ck2 = tmp_path / "ck2"
    rc, out = run(tmp_path, "--train-iters", "4", "--exit-interval", "2", "--save", ck2,
                  "--eval-interval", "4", corpus=corpus)
    assert rc == 0, out[-3000:]
    rc, out = run(tmp_path, "--pipeline-schedule", "paci", "--train-iters", "4", "--load", ck2,
                  "--save", ck2, "--eval-interval", "4", "--micro-batch-size", "1", corpus=corpus)
    assert rc == 0 and "> done: iteration 4" in out, out[-3000:]
    # a checkpoint whose last stage's files are missing: incomplete, not another PP size
    import shutil

    partial = tmp_path / "partial"
    shutil.copytree(ck, partial)
    shutil.rmtree(partial / "iter_0000004" / "mp_rank_00_001")
    (partial / "iter_0000004" / "parallel_sizes.txt").unlink()  # as an older checkpoint
    out = refusal(capsys, monkeypatch, "--train-iters", "6", "--load", partial)
    assert "iteration 4 is incomplete: the files of stage 1 are missing (mp_rank_00_001)" in out
    assert "written with TP x PP" not in out
    # a damaged file: named, and said to be damaged
    damaged = tmp_path / "damaged"
    shutil.copytree(ck, damaged)
    path = damaged / "iter_0000004" / "mp_rank_00_000" / "model_optim_rng.pt"
    path.write_bytes(b"not a checkpoint")
    rc, out = run(tmp_path, *common[:-4], "--train-iters", "6", "--load", damaged, "--save",
                  damaged, "--log-json", log, corpus=corpus)
    assert rc != 0 and f"{path} cannot be read" in out and "the file is damaged" in out
    # a checkpoint of another model shape: one message, not a state-dict traceback per rank
    rc, out = run(tmp_path, "--train-iters", "6", "--load", ck, "--save", ck, "--hidden-size",
                  "64", "--lr-warmup-iters", "1", corpus=corpus)
    assert rc != 0 and out.count("cannot be loaded") == 1
    assert "it does not fit this model and optimizer" in out


def refusal(capsys, monkeypatch, *flags, pp=2, world=2):
    """The problems ``check_args`` reports (and the exit status 2) for these flags."""
    import pretrain_gpt

    monkeypatch.setenv("RANK", "0")
    args = pretrain_gpt.parse_args(S + ["--pipeline-model-parallel-size", str(pp)]
                                   + [str(f) for f in flags])
    with pytest.raises(SystemExit) as stop:
        pretrain_gpt.check_args(args, world_size=world)
    assert stop.value.code == 2
    return capsys.readouterr().err


def test_bad_values_are_refused_before_anything_starts(capsys, monkeypatch, tmp_path):
    out = refusal(capsys, monkeypatch, "--lr", "-1", "--weight-decay", "-0.1",
                  "--ffn-hidden-size", "-4", "--lr-warmup-iters", "-2", "--exit-interval", "0",
                  "--distributed-timeout-minutes", "0", "--data-path")
    assert out.count("bad configuration") == 1
    for needle in ("--lr -1.0: must be >= 0", "--weight-decay -0.1: must be >= 0",
                   "--ffn-hidden-size -4: must be >= 1", "--lr-warmup-iters -2: must be >= 0",
                   "--exit-interval 0: must be >= 1",
                   "--distributed-timeout-minutes 0.0: must be > 0",
                   "--data-path was given without a value"):
        assert needle in out, needle
    out = refusal(capsys, monkeypatch, "--data-path", "nan", "a/b", "1", "c/d")
    assert "--data-path weight nan: must be a finite number > 0" in out
    out = refusal(capsys, monkeypatch, "--data-path", "0.5", "a/b", "0.5")
    assert "weights and prefixes come in pairs" in out
    out = refusal(capsys, monkeypatch, "--split", "inf,1,0")
    assert "--split inf,1,0: give three non-negative" in out
    afile = tmp_path / "afile"
    afile.write_text("")
    out = refusal(capsys, monkeypatch, "--pipeline-schedule", "paci", "--paci-trace",
                  afile / "trace.json", "--log-json", tmp_path)
    assert f"--paci-trace {afile / 'trace.json'}: {afile} is a file, not a folder" in out
    assert f"--log-json {tmp_path}: is a folder: give a file name" in out


def test_a_diverged_run_stops_without_saving(corpus, tmp_path):
    ck = tmp_path / "ck"
    rc, out = run(tmp_path, "--pipeline-schedule", "paci", "--paci-skip-nonfinite-updates",
                  "--lr", "1e30", "--train-iters", "6", "--eval-interval", "6", "--save", ck,
                  "--save-interval", "3", corpus=corpus)
    assert rc != 0
    assert "skipped updates per stage" in out
    assert "not saving iteration 3: the training loss is nan" in out or \
        "consecutive updates of this stage had NaN/Inf" in out
    assert not (ck / "latest_checkpointed_iteration.txt").exists()


def test_logged_losses_average_over_data_parallel_replicas(corpus, tmp_path):
    vals = []
    for nproc in (2, 4):  # PP 2 with DP 1, then DP 2: the same validation samples
        log = tmp_path / f"dp{nproc}.jsonl"
        rc, out = run(tmp_path, "--train-iters", "2", "--eval-interval", "2", "--log-json", log,
                      nproc=nproc, corpus=corpus)
        assert rc == 0, out[-3000:]
        vals.append(json.loads(log.read_text().splitlines()[0])["val_loss"])
    assert vals[1] == pytest.approx(vals[0], rel=1e-5)


def test_an_unwritable_save_folder_and_a_warm_up_as_long_as_the_run_are_refused_at_once(
        capsys, monkeypatch, tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("")
    for schedule in ("1f1b", "paci"):
        out = refusal(capsys, monkeypatch, "--pipeline-schedule", schedule, "--save",
                      "/sys/paci_ckpt")
        assert out.count("--save /sys/paci_ckpt: /sys is not writable") == 1, out
        out = refusal(capsys, monkeypatch, "--pipeline-schedule", schedule, "--save",
                      afile / "ck")
        assert f"--save {afile / 'ck'}: {afile} is a file, not a folder" in out
    out = refusal(capsys, monkeypatch, "--pipeline-schedule", "paci", "--train-iters", "6",
                  "--paci-sync-warmup-iters", "6")
    assert "--paci-sync-warmup-iters 6 drains after every one of the 6 iterations" in out


def test_the_help_no_longer_calls_untied_embeddings_required(capsys):
    import pretrain_gpt

    with pytest.raises(SystemExit):
        pretrain_gpt.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "required with PACI" not in text
    assert "tied to the input embedding" in text
