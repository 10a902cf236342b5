#!/usr/bin/env bash
# The fastest synchronous baseline of gpt2_medium_pp8.sh: Megatron's interleaved 1F1B (two
# model chunks per stage, the output layer and loss alone on the last chunk; the layout
# the balance advisor proposes, see gpt2_medium_pp8.sh). Synchronous like 1F1B: the same
# losses per iteration, a bubble about half as long. Environment knobs and extra arguments
# as gpt2_medium_pp8.sh.
SCHEDULE=1f1b SPLIT=interleaved CHECKPOINTS=${CHECKPOINTS:-runs/gpt2m_interleaved} \
    exec bash "$(dirname "$0")/gpt2_medium_pp8.sh" "$@"
