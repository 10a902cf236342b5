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
