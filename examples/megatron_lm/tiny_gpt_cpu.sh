#!/usr/bin/env bash
# Megatron-LM's own pretrain_gpt.py with PACI on a laptop CPU: a tiny GPT on mock data,
# 4 pipeline stages as 4 processes talking over gloo. Try a launch script here first.
#
#   MEGATRON_LM=/path/to/Megatron-LM bash examples/megatron_lm/tiny_gpt_cpu.sh
#   SCHEDULE=1f1b MEGATRON_LM=... bash examples/megatron_lm/tiny_gpt_cpu.sh   # Megatron's 1F1B
#
# PACI_MEGATRON_CPU=1 makes Megatron-LM run without CUDA (paci_megatron.cpu); the CPU
# needs the local transformer implementation and the fusions off, as below.
set -euo pipefail
MEGATRON_LM=${MEGATRON_LM:?set MEGATRON_LM to your Megatron-LM checkout}
SCHEDULE=${SCHEDULE:-paci}
PP=${PP:-4}
export PACI_MEGATRON_CPU=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

CMD=(torchrun --nproc-per-node "$PP" "$MEGATRON_LM/pretrain_gpt.py"
  --distributed-backend gloo --transformer-impl local --attention-backend unfused
  --no-masked-softmax-fusion --no-bias-gelu-fusion --no-bias-dropout-fusion
  --no-gradient-accumulation-fusion --no-persist-layer-norm --no-rope-fusion
  --mock-data --tokenizer-type NullTokenizer --vocab-size 4096
  --num-layers 8 --hidden-size 64 --num-attention-heads 4
  --seq-length 64 --max-position-embeddings 64 --untie-embeddings-and-output-weights
  --pipeline-model-parallel-size "$PP" --pipeline-schedule "$SCHEDULE"
  --micro-batch-size 2 --global-batch-size 16
  --lr 3e-3 --min-lr 3e-4 --lr-decay-style cosine --lr-warmup-iters 5 --train-iters 40
  --log-interval 5 --eval-interval 20 --eval-iters 2
  "$@")
if [[ "${DRY_RUN:-0}" == 1 ]]; then
  printf '%q ' "${CMD[@]}"; echo
else
  exec "${CMD[@]}"
fi
