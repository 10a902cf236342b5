"""A rank that dies takes the whole pipeline down, loudly and quickly: no hang."""

import os
import signal
import subprocess
import sys
import time

from harness import free_port

HERE = os.path.dirname(os.path.abspath(__file__))
TIMEOUT_S = 10


def test_killing_one_rank_makes_every_rank_exit_nonzero_naming_its_stage(tmp_path):
    world, port = 4, free_port()
    procs, logs = [], []
    for rank in range(world):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
                   PACI_TEST_TIMEOUT=str(TIMEOUT_S), PYTHONWARNINGS="ignore")
        log = open(tmp_path / f"rank{rank}.log", "w+")
        logs.append(log)
        procs.append(subprocess.Popen([sys.executable, os.path.join(HERE, "kill_worker.py")],
                                      env=env, stdout=log, stderr=subprocess.STDOUT))
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:  # wait until the pipeline is in steady state
            if all("training" in (tmp_path / f"rank{r}.log").read_text() for r in range(world)):
                break
            assert all(p.poll() is None for p in procs), "a rank exited before the kill"
            time.sleep(0.5)
        else:
            raise AssertionError("the run did not start within 180 s")
        procs[2].send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        for rank, p in enumerate(procs):
            if rank == 2:
                continue
            remaining = killed_at + 2 * TIMEOUT_S - time.monotonic()
            p.wait(timeout=max(remaining, 0.1))  # raises TimeoutExpired if it hangs
        for rank, p in enumerate(procs):
            if rank == 2:
                continue
            text = (tmp_path / f"rank{rank}.log").read_text()
            assert p.returncode != 0, f"rank {rank} exited 0:\n{text[-2000:]}"
            assert f"stage {rank} of 4" in text, f"rank {rank} did not name its stage:\n{text[-3000:]}"
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        for p in procs:
            p.wait(timeout=10)
        for log in logs:
            log.close()
    assert all(p.poll() is not None for p in procs)  # nothing left running
