#!/usr/bin/env bash
# The baseline of gpt2_medium_pp8.sh: the same run with Megatron's own 1F1B schedule.
SCHEDULE=1f1b exec bash "$(dirname "$0")/gpt2_medium_pp8.sh" "$@"
