"""The one launcher of ``examples/pretrain_gpt.py`` in the tests, and its tiny-model flags."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import List, Optional, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = os.path.join(ROOT, "examples", "pretrain_gpt.py")

#: a tiny GPT on the CPU (4 layers, hidden 32, sequence 32, m = 4 at DP 1), tied
#: embeddings (Megatron's default; add ``--untie-embeddings-and-output-weights``)
TINY = ["--device", "cpu", "--num-layers", "4", "--hidden-size", "32",
        "--num-attention-heads", "4", "--seq-length", "32", "--micro-batch-size", "2",
        "--global-batch-size", "8", "--eval-iters", "1", "--lr-warmup-iters", "1"]


def launch(*flags, nproc: int = 2, cwd: Optional[str] = None, env: Optional[dict] = None,
           timeout: float = 400, tiny: bool = True) -> Tuple[int, str]:
    """Run ``torchrun --nproc-per-node NPROC examples/pretrain_gpt.py [TINY] FLAGS``; returns
    ``(exit status, stdout + stderr)``. Later flags override earlier ones (argparse)."""
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", RECIPE,
         *(TINY if tiny else []), *map(str, flags)],
        cwd=cwd or ROOT, capture_output=True, text=True, timeout=timeout,
        env=dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1", **(env or {})))
    return proc.returncode, proc.stdout + proc.stderr


def records(path) -> List[dict]:
    """The JSON records of a ``--log-json`` file."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
