"""Test-wide setup: the example recipes' support package (examples/gpt_recipe) and the
per-rank test bodies (tests/workers.py) are importable, also in spawned ranks."""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for folder in (os.path.join(ROOT, "examples"), os.path.dirname(os.path.abspath(__file__))):
    if folder not in sys.path:
        sys.path.insert(0, folder)
