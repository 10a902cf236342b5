"""A run killed anywhere and relaunched with the same command continues exactly.

Every rank is killed (SIGKILL, ``PACI_EXAMPLE_CRASH_AFTER``) after some iteration; the
relaunch resumes from the last checkpoint before it (``--save-interval 2``) and redoes the
iterations since. Its log must equal an uninterrupted run's, record for record: losses,
validation losses, learning rate, drift per stage, tied-embedding lag. The resume points
fall inside the synchronous warm-up, at its last iteration, right after it, at an
evaluation, right after a drain interval and mid-run, over tied and untied embeddings,
a = m and a < m, and the look-ahead on and off (each pair of those covered).
"""

import pytest

from launch import launch, records

COMPARED = ("iteration", "lm_loss", "val_loss", "lr", "drift_max", "drift_mean",
            "drift_histogram", "tied_lag_max")

#: (name, flags, iterations after which every rank is killed). Checkpoints every 2
#: iterations, evaluations every 4, drains every 3: the relaunch resumes at 2 inside the
#: warm-up (A) or at its last iteration (C), at 4 = the warm-up's last iteration and an
#: evaluation (B) or right after the warm-up and the drain of iteration 3 (D), and mid-run
#: at 6 (A, a drain interval) and 8 (D, an evaluation)
CONFIGS = [
    ("tied-a=m-sync3", ["--paci-sync-warmup-iters", "3"], (3, 7)),
    ("tied-a<m-lookahead-sync4", ["--paci-accumulation", "2", "--paci-lookahead", "1",
                                  "--paci-sync-warmup-iters", "4"], (5,)),
    ("untied-a=m-lookahead-sync2", ["--untie-embeddings-and-output-weights",
                                    "--paci-lookahead", "1", "--paci-sync-warmup-iters", "2"],
     (3,)),
    ("untied-a<m-sync3", ["--untie-embeddings-and-output-weights", "--paci-accumulation", "2",
                          "--paci-sync-warmup-iters", "3"], (5, 9)),
]


@pytest.mark.parametrize("name,flags,kills", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_a_killed_run_relaunched_logs_what_an_uninterrupted_run_logs(corpus, tmp_path, name,
                                                                      flags, kills):
    common = ["--pipeline-model-parallel-size", "2", "--pipeline-schedule", "paci",
              "--train-iters", "10", "--save-interval", "2", "--eval-interval", "4",
              "--paci-drain-interval", "3", "--log-interval", "1", "--data-path", corpus,
              *flags]
    straight = tmp_path / "straight.jsonl"
    rc, out = launch(*common, "--save", tmp_path / "a", "--log-json", straight)
    assert rc == 0, out[-3000:]
    ck, log = tmp_path / "b", tmp_path / "killed.jsonl"
    command = [*common, "--save", ck, "--load", ck, "--log-json", log]
    for k in kills:
        rc, out = launch(*command, env={"PACI_EXAMPLE_CRASH_AFTER": str(k)})
        assert rc != 0 and f"killing every rank after iteration {k}" in out, out[-3000:]
        saved = (ck / "latest_checkpointed_iteration.txt").read_text().strip()
        assert saved == str(k - 1)  # the relaunch resumes before the kill, and redoes k
    rc, out = launch(*command)
    assert rc == 0, out[-3000:]
    mine, theirs = records(log), records(straight)
    assert [r["iteration"] for r in mine] == list(range(0, 11))
    for a, b in zip(mine, theirs):
        assert {k: a.get(k) for k in COMPARED} == {k: b.get(k) for k in COMPARED}, a["iteration"]
    if "--untie-embeddings-and-output-weights" in flags:
        assert all("tied_lag_max" not in r for r in mine)
    else:  # the lag reached its bound ceil((P-1)/a) = 1 and survived the resumes
        assert mine[-1]["tied_lag_max"] == 1


def test_tied_embeddings_at_four_stages_resume_under_another_accumulation_factor(corpus,
                                                                                 tmp_path):
    """a = 4 -> 2 -> 4 across two resumes (P = 4, tied): windows and tied updates are
    counted afresh from each checkpoint, so neither a hang nor a drift error; the lag
    reaches the new bound ceil((P-1)/a) and each change is announced."""
    ck, log = tmp_path / "ck", tmp_path / "log.jsonl"
    common = ["--pipeline-model-parallel-size", "4", "--pipeline-schedule", "paci",
              "--train-iters", "6", "--eval-interval", "6", "--save", ck, "--load", ck,
              "--log-json", log, "--log-interval", "1", "--paci-sync-warmup-iters", "0",
              "--distributed-timeout-minutes", "1", "--data-path", corpus]
    rc, out = launch(*common, "--exit-interval", "2", nproc=4)
    assert rc == 0, out[-3000:]
    assert records(log)[-1]["drift_max"] == [1, 1, 1, 0]
    assert records(log)[-1]["tied_lag_max"] == 1
    rc, out = launch(*common, "--paci-accumulation", "2", "--exit-interval", "4", nproc=4)
    assert rc == 0, out[-3000:]
    assert out.count("> resuming at iteration 2 with --paci-accumulation 2; the checkpoint "
                     "was trained with 4") == 1
    assert records(log)[-1]["drift_max"] == [2, 1, 1, 0]  # ceil((P-1-s)/2)
    assert records(log)[-1]["tied_lag_max"] == 2
    rc, out = launch(*common, nproc=4)
    assert rc == 0, out[-3000:]
    assert "--paci-accumulation 4; the checkpoint was trained with 2" in out
    assert [r["iteration"] for r in records(log)] == list(range(7))
