"""Prepare text for examples/pretrain_gpt.py: Megatron's indexed format plus a tokenizer.

    python examples/prepare_data.py --output-prefix data/mine/mine --input notes/

See :func:`gpt_recipe.data.main` for the flags.
"""

import os
import sys

if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from gpt_recipe.data import main

    sys.exit(main())
