"""Prepare text for examples/pretrain_gpt.py: Megatron's indexed format plus a tokenizer.

    python examples/prepare_data.py --output-prefix data/mine/mine --input notes/

The flags are :func:`gpt_recipe.data_parser`'s; they are read before torch and
megatron-core are imported, so ``--help`` and mistakes answer at once.
"""

import os
import sys

if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from gpt_recipe import data_parser

    data_parser().parse_args()  # --help and bad flags end here, quickly
    from gpt_recipe.data import main

    sys.exit(main())
