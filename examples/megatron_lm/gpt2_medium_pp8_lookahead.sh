#!/usr/bin/env bash
# gpt2_medium_pp8.sh (AdamW) with the staleness mitigation that won the time-to-accuracy
# study's AdamW comparison at the paper's per-update scale (README, "When PACI pays off",
# wide regime: PACI-AdamW with the synchronous warm-up + look-ahead ended 2.1% below
# 1F1B-AdamW, TTA 1.11x to 1.30x; projected from CPU runs, not yet measured at this size):
#   bash examples/megatron_lm/gpt2_medium_pp8_lookahead.sh                # PACI + look-ahead
#   SCHEDULE=1f1b bash examples/megatron_lm/gpt2_medium_pp8.sh            # its 1F1B baseline
# The synchronous warm-up is PACI's default (the 1% LR warm-up runs as 1F1B); the
# look-ahead costs one fp32 buffer per parameter (4 bytes each, sharded with
# --use-distributed-optimizer). Environment knobs and extra arguments as gpt2_medium_pp8.sh.
set -euo pipefail
if [[ "${SCHEDULE:-paci}" != paci ]]; then
  echo "gpt2_medium_pp8_lookahead.sh is PACI's variant: run gpt2_medium_pp8.sh with SCHEDULE=${SCHEDULE}" >&2
  exit 2
fi
export CHECKPOINTS=${CHECKPOINTS:-runs/gpt2m_paci_lookahead}
exec bash "$(dirname "$0")/gpt2_medium_pp8.sh" --paci-lookahead 1 "$@"
