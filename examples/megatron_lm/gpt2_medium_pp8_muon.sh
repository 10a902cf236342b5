#!/usr/bin/env bash
# gpt2_medium_pp8.sh with megatron-core's Muon (AdamW for embeddings, norms and biases):
# the optimizer under which PACI beat 1F1B in the time-to-accuracy study (README, "When
# PACI pays off"; tiny GPT on CPU, projected to one device per stage). The same optimizer
# settings for both schedules:
#   bash examples/megatron_lm/gpt2_medium_pp8_muon.sh                 # PACI
#   SCHEDULE=1f1b bash examples/megatron_lm/gpt2_medium_pp8_muon.sh   # its 1F1B baseline
# As in the study: momentum 0.95 with Nesterov, spectral scaling x 0.2, a peak LR 4x the
# AdamW one (the study's best Muon LRs were 4x to 8x the best AdamW LRs: tiny recipe 4x for
# 1F1B and 8x for PACI, wide regime 8x for both; the low end here; not yet
# measured at this size: sweep LR), and under PACI no synchronous warm-up (the study's
# PACI-Muon arm ran PACI from the first iteration). Needs Muon's packages:
#   pip install ".[muon]" && pip install --no-deps --ignore-requires-python emerging-optimizers==0.3.0
# Environment knobs and extra arguments as gpt2_medium_pp8.sh.
set -euo pipefail
GLOBAL_BATCH=${GLOBAL_BATCH:-256}
if [[ -z "${LR:-}" ]]; then
  LR=$(python3 -c "print(f'{4 * 3e-4 * (${GLOBAL_BATCH} / 256) ** 0.5:.4g}')")
fi
export GLOBAL_BATCH LR
export CHECKPOINTS=${CHECKPOINTS:-runs/gpt2m_muon_${SCHEDULE:-paci}}
MUON=(--optimizer muon --muon-momentum 0.95 --muon-use-nesterov --muon-scale-mode spectral
      --muon-extra-scale-factor 0.2)
if [[ "${SCHEDULE:-paci}" == paci ]]; then
  MUON+=(--paci-sync-warmup-iters 0)
fi
exec bash "$(dirname "$0")/gpt2_medium_pp8.sh" "${MUON[@]}" "$@"
