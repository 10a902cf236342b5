"""Support of the example GPT recipes (not part of the installed ``paci_megatron`` runtime).

- :mod:`gpt_recipe.model`: one pipeline stage of a megatron-core GPT, its optimizer and LR
  scheduler, built the way Megatron-LM builds them;
- :mod:`gpt_recipe.data`: the embedded default corpus and user text folders turned into
  Megatron's indexed dataset format, read back with megatron-core's GPT datasets;
- :mod:`gpt_recipe.checkpoint`: the recipe's checkpoints of a drained pipeline (Megatron's
  legacy layout).

``examples/pretrain_gpt.py`` imports it from its own folder; tests and benchmarks put
``examples/`` on ``sys.path``. The data preparation needs ``tokenizers``
(``pip install ".[examples]"``).
"""

import argparse

DEFAULT_VOCAB_SIZE = 4096
"""Default BPE vocabulary size in tokens, special tokens included."""

DEFAULT_MAX_BYTES = 8 * 1024 * 1024
"""Default cap, in bytes of source text, on the stdlib corpus (8 MiB; prepares in seconds)."""

DATA_CLI = "python examples/prepare_data.py"


def data_parser() -> argparse.ArgumentParser:
    """The flags of the data tool (``examples/prepare_data.py``); builds without importing
    torch or megatron-core, so that ``--help`` answers at once."""
    parser = argparse.ArgumentParser(
        prog=DATA_CLI,
        description="Tokenize text (default: the Python stdlib .py files) into Megatron's "
        "indexed dataset format (<prefix>.bin/.idx) plus <dir>/tokenizer.json.")
    parser.add_argument("--output-prefix", required=True, help="output path prefix (no .bin)")
    parser.add_argument("--input", nargs="+", action="extend", metavar="FILE_OR_DIR",
                        help="UTF-8 text files (one document each) or directories; default: "
                        "the Python standard library's .py files")
    parser.add_argument("--suffix", action="append",
                        help="with directory inputs, only take files ending with this "
                        "(repeatable)")
    parser.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB_SIZE,
                        help="BPE vocabulary size (tokens)")
    parser.add_argument("--max-bytes", type=int, default=None,
                        help=f"cap on source text in bytes (default {DEFAULT_MAX_BYTES} for the "
                        "stdlib corpus, none for --input)")
    parser.add_argument("--tokenizer-model", default=None,
                        help="reuse this tokenizer.json instead of training one (e.g. to blend "
                        "corpora)")
    parser.add_argument("--force", action="store_true", help="rebuild even if up to date")
    return parser
