"""A newcomer's first hour, replayed: every stumble of the README's first-hour path, with
the README's own commands copied from it literally."""

import os
import re
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()


def code_blocks(heading):
    """The ```bash blocks of the README section whose heading starts with ``heading``."""
    section = README.split("\n## " + heading, 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.*?)```", section, flags=re.S)


def commands(block):
    """The block's commands, continuation lines joined, comments dropped."""
    text = block.replace("\\\n", " ")
    return [line.split("  #")[0].strip() for line in text.splitlines()
            if line.strip() and not line.strip().startswith("#")]


def test_the_quick_start_comes_first_and_installs_the_cpu_build():
    first = README.split("\n## ", 2)[1]
    assert first.startswith("Quick start")
    cpu = [c for b in code_blocks("Quick start") for c in commands(b)]
    torch_line = next(c for c in cpu if "pip install torch" in c)
    assert "--index-url https://download.pytorch.org/whl/cpu" in torch_line
    assert not any("[gpu]" in c or "test,gpu" in c for c in cpu)  # GPU lines elsewhere
    assert any(c.startswith("torchrun") for c in cpu) and "python -m pytest -q" in cpu
    gpu = [c for b in code_blocks("On GPUs") for c in commands(b)]
    assert any("gpu]" in c for c in gpu)


def test_megatron_lm_install_commands_work_from_a_clone():
    lines = [c for b in code_blocks("Megatron-LM") for c in commands(b) if "pip install" in c]
    assert lines and not any(re.search(r"pip install \"?paci-megatron", c) for c in lines)
    assert any('pip install ".[megatron-lm]"' in c for c in lines)


def test_git_ignores_what_the_readme_creates():
    ignored = subprocess.run(["git", "check-ignore", ".venv/x", "data/x", "runs/x"], cwd=ROOT,
                             capture_output=True, text=True).stdout.split()
    assert ignored == [".venv/x", "data/x", "runs/x"]


def test_the_readme_training_command_runs_a_short_trial_with_readable_progress(corpus, tmp_path):
    cmd = next(c for b in code_blocks("Quick start") for c in commands(b)
               if c.startswith("torchrun"))
    argv = cmd.split()
    argv[0:1] = [sys.executable, "-m", "torch.distributed.run"]
    argv[argv.index("examples/pretrain_gpt.py")] = os.path.join(ROOT, "examples", "pretrain_gpt.py")
    # a short trial: 20 iterations (the default warm-up follows them), small model
    argv += ["--train-iters", "20", "--eval-interval", "10", "--log-interval", "10",
             "--num-layers", "4", "--hidden-size", "32", "--seq-length", "32",
             "--eval-iters", "1", "--data-path", corpus]
    proc = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=400,
                          env=dict(os.environ, PYTHONWARNINGS="ignore"))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    out = proc.stdout
    assert "> lr warm-up: 2 iterations (10% of --train-iters" in out
    progress = [line for line in out.splitlines() if line.startswith(" iteration ")]
    assert len(progress) == 3 and "lm loss:" in progress[-1] and "drift max per stage: [1, 1, 1, 0]" in progress[-1]
    assert not any(line.startswith("{") for line in out.splitlines())  # JSON only in the log
    done = [line for line in out.splitlines() if line.startswith("> done:")]
    assert done and "drift max per stage [1, 1, 1, 0]" in done[0] and "runs/paci.jsonl" in done[0]
    assert (tmp_path / "runs" / "paci.jsonl").exists()


def test_a_typo_under_torchrun_gives_one_short_error_with_a_suggestion(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "4",
         os.path.join(ROOT, "examples", "pretrain_gpt.py"), "--device", "cpu",
         "--pipeline-model-parallel-size", "4", "--pipeline-schedule", "paci",
         "--paci-acumulation", "2"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    lines = (proc.stdout + proc.stderr).splitlines()
    ours = [line for line in lines if not re.match(r"^[WEI]\d{4} ", line)]
    ours = ours[:next((i for i, line in enumerate(ours) if line.startswith("Traceback")),
                      len(ours))]  # from there on: torchrun's own failure summary
    assert len(ours) <= 15, ours
    assert "--paci-acumulation: did you mean --paci-accumulation?" in "\n".join(ours)
    assert sum("unrecognized arguments" in line for line in lines) == 1  # once, not per rank
    assert not any(line.startswith("usage:") for line in lines)


def test_the_data_tool_answers_help_at_once_and_warns_about_a_small_corpus(tmp_path):
    t0 = time.monotonic()
    help_text = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "prepare_data.py"),
                                "--help"], capture_output=True, text=True, timeout=60, check=True)
    assert time.monotonic() - t0 < 10 and "--output-prefix" in help_text.stdout
    notes = tmp_path / "notes"
    notes.mkdir()
    for i in range(3):
        (notes / f"n{i}.md").write_text(f"note number {i}\n" * 50)
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "prepare_data.py"),
                           "--output-prefix", str(tmp_path / "mine" / "mine"), "--input",
                           str(notes), "--vocab-size", "300"], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "the validation split gets no document" in proc.stderr
    assert "--split 2,1,0" in proc.stderr


def test_the_training_error_for_a_small_corpus_names_split():
    from gpt_recipe.data import documents_per_split, split_advice

    assert documents_per_split(3) == [3, 0, 0] and documents_per_split(100) == [98, 2, 0]
    assert "--split 2,1,0" in split_advice(3)
    assert "add more text" in split_advice(1)


def test_the_simulator_says_where_it_wrote(tmp_path):
    png, trace = tmp_path / "t.png", tmp_path / "trace"
    out = subprocess.run([sys.executable, "-m", "paci_megatron.sim", "--stages", "2",
                          "--microbatches", "2", "--iterations", "1", "--png", str(png),
                          "--trace", str(trace)], capture_output=True, text=True, timeout=120,
                         check=True).stdout
    assert f"wrote {png}" in out and f"wrote {trace}.paci.json" in out


def test_the_own_data_command_as_printed_keeps_validation_data_for_twenty_files():
    from gpt_recipe.data import documents_per_split

    train = next(c for b in code_blocks("Prepare your own data") for c in commands(b)
                 if c.startswith("torchrun"))
    split = train.split("--split ", 1)[1].split()[0]
    assert documents_per_split(20, split)[1] >= 1, split
    assert documents_per_split(20, "98,2,0")[1] == 0  # why the command carries one
