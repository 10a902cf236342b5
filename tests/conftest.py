"""Test-wide setup: the example recipes' support package (examples/gpt_recipe), the process
harness the benchmarks share (benchmarks/harness.py) and the per-rank test bodies
(tests/workers.py) are importable, also in the ranks of run_distributed."""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for folder in (os.path.join(ROOT, "examples"), os.path.join(ROOT, "benchmarks"),
               os.path.dirname(os.path.abspath(__file__))):
    if folder not in sys.path:
        sys.path.insert(0, folder)


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """The recipe's default corpus (Python standard library sources), 2 MB with a
    512-token vocabulary, prepared once per test run: its data prefix."""
    from gpt_recipe.data import prepare_corpus

    prefix = tmp_path_factory.mktemp("corpus") / "stdlib"
    return prepare_corpus(prefix, max_bytes=2_000_000, vocab_size=512).prefix
