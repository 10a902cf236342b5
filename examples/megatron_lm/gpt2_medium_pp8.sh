#!/usr/bin/env bash
# GPT-2 Medium (345M) on 8 pipeline stages with Megatron-LM's own pretrain_gpt.py: the
# PACI paper's setup (arXiv 2606.07881). One node with 8 GPUs; for 2 nodes (PP 8 x DP 2)
# see gpt2_medium_pp8_dp2.slurm.
#
#   MEGATRON_LM=/path/to/Megatron-LM DATA_PREFIX=/data/owt/owt_text_document \
#       bash examples/megatron_lm/gpt2_medium_pp8.sh          # PACI
#   SCHEDULE=1f1b bash examples/megatron_lm/gpt2_medium_pp8.sh # Megatron's 1F1B baseline
#   bash examples/megatron_lm/gpt2_medium_pp8_interleaved.sh    # the interleaved 1F1B
#
# Everything PACI needs is the one flag --pipeline-schedule paci (paci-megatron installed
# from a clone, `pip install ".[megatron-lm]"`, next to megatron-core). The paper's setting: m = a = 8 micro-batches per
# iteration on P = 8 stages, peak lr 3e-4 at global batch 256 (x sqrt(batch / 256)
# otherwise), about 190k updates at batch 256 (the same tokens at other batch sizes), 1%
# warm-up, cosine to 10%, no clipping; the 1F1B baseline differs in the schedule only.
# Environment knobs:
#   SCHEDULE      paci | 1f1b                          (default paci)
#   GLOBAL_BATCH  256 | 128 (sequences of 1024 tokens) (default 256)
#   LR            peak learning rate                    (default 3e-4 x sqrt(GLOBAL_BATCH/256))
#   TRAIN_ITERS   iterations                            (default 190000 x 256 / GLOBAL_BATCH)
#   MICRO_BATCH   micro-batch size                      (default GLOBAL_BATCH / (8 x DP): m = 8)
#   SPLIT         balanced | even | interleaved         (default balanced; layers per stage,
#                 below; interleaved: 2 model chunks a stage, 1F1B only)
#   NPROC, NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT  torchrun's rendezvous
#   CHECKPOINTS   --save/--load folder                  (default runs/gpt2m_${SCHEDULE})
#   TENSORBOARD   --tensorboard-dir                     (default $CHECKPOINTS/tensorboard)
#   DRY_RUN=1     print the command instead of running it
# Extra arguments are passed on to pretrain_gpt.py (e.g. PACI's --paci-* flags).
set -euo pipefail

SCHEDULE=${SCHEDULE:-paci}
GLOBAL_BATCH=${GLOBAL_BATCH:-256}
NPROC=${NPROC:-8}
NNODES=${NNODES:-1}
DP=$(( NPROC * NNODES / 8 ))
if [[ -z "${LR:-}" ]]; then
  LR=$(python3 -c "print(f'{3e-4 * (${GLOBAL_BATCH} / 256) ** 0.5:.4g}')")
fi
MIN_LR=$(python3 -c "print(f'{${LR} / 10:.4g}')")   # cosine down to 10% of the peak
TRAIN_ITERS=${TRAIN_ITERS:-$(( 190000 * 256 / GLOBAL_BATCH ))}
MICRO_BATCH=${MICRO_BATCH:-$(( GLOBAL_BATCH / (8 * DP) ))}
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}  # as Megatron's own scripts
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-localhost}
MASTER_PORT=${MASTER_PORT:-6000}
CHECKPOINTS=${CHECKPOINTS:-runs/gpt2m_${SCHEDULE}}
TENSORBOARD=${TENSORBOARD:-$CHECKPOINTS/tensorboard}
MEGATRON_LM=${MEGATRON_LM:?set MEGATRON_LM to your Megatron-LM checkout}
DATA_PREFIX=${DATA_PREFIX:?set DATA_PREFIX to OpenWebText preprocessed by Megatron (see prepare_openwebtext.sh)}
TOKENIZER_DIR=${TOKENIZER_DIR:-$(dirname "$DATA_PREFIX")}

# Layers per stage: each schedule on its own best split. The output layer and loss take
# about three layers' time, so 3 layers on every stage leave the last one the slowest and
# set the pace of both schedules. The splits below are what
#   python -m paci_megatron.sim --balance --stages 8 --microbatches 8 --layers 24 \
#       --device-check benchmarks/results/device_check_h200.json --measured-layers 3 \
#       --micro-batch-size 32 --virtual-stages 2
# proposes from GPT-2 Medium stages measured on one H200 (bf16, micro-batch 32, links
# assumed at 150 GB/s): PACI 0.665 s/iteration (0.832 on the even split), 1F1B 1.015
# (1.279), the interleaved 1F1B with v = 2 and the loss alone on the last model chunk
# 0.848. Run it again with your own benchmarks/device_check.py report.
SPLIT=${SPLIT:-balanced}
case "$SPLIT:$SCHEDULE" in
  balanced:paci) LAYOUT='Et*3|t*3|t*3|t*4|t*3|t*3|t*3|t*2L' ;;
  balanced:1f1b) LAYOUT='Et*4|t*4|t*3|t*3|t*3|t*3|t*3|tL' ;;
  interleaved:1f1b) LAYOUT='Et|t|t|t|t|t|t*2|t*2|t*2|t*2|t*2|t*2|t*2|t*2|t*2|L' ;;
  even:*) LAYOUT= ;;
  *) echo "SPLIT=$SPLIT with SCHEDULE=$SCHEDULE: SPLIT is balanced, even or (1f1b only) interleaved" >&2
     exit 2 ;;
esac
SPLIT_ARGS=()
if [[ -n "$LAYOUT" ]]; then
  SPLIT_ARGS=(--pipeline-model-parallel-layout "$LAYOUT")
fi

ARGS=(
  # model: GPT-2 Medium, untied input/output embeddings as in the time-to-accuracy study
  # (tied ones, Megatron's default, work under PACI too: drop the --untie flag)
  --num-layers 24 --hidden-size 1024 --num-attention-heads 16
  --seq-length 1024 --max-position-embeddings 1024
  --position-embedding-type learned_absolute
  --untie-embeddings-and-output-weights
  # parallelism: 8 pipeline stages (layers per stage: SPLIT above); DP = world / 8
  --pipeline-model-parallel-size 8 --tensor-model-parallel-size 1 "${SPLIT_ARGS[@]}"
  --micro-batch-size "$MICRO_BATCH" --global-batch-size "$GLOBAL_BATCH"
  --pipeline-schedule "$SCHEDULE"
  # optimiser: AdamW (0.9, 0.95), weight decay 0.1, no gradient clipping, 1% warm-up,
  # cosine to 10%
  --optimizer adam --adam-beta1 0.9 --adam-beta2 0.95 --weight-decay 0.1 --clip-grad 0.0
  --lr "$LR" --min-lr "$MIN_LR" --lr-decay-style cosine --lr-warmup-fraction 0.01
  --train-iters "$TRAIN_ITERS"
  --bf16
  # data: OpenWebText, GPT-2 BPE
  --data-path "$DATA_PREFIX" --split 949,50,1
  --tokenizer-type GPT2BPETokenizer
  --vocab-file "$TOKENIZER_DIR/gpt2-vocab.json" --merge-file "$TOKENIZER_DIR/gpt2-merges.txt"
  # logging, evaluation, checkpoints (PACI drains the pipeline before each)
  --log-interval 10 --log-throughput --eval-interval 500 --eval-iters 20
  --tensorboard-dir "$TENSORBOARD" --log-timers-to-tensorboard
  --save "$CHECKPOINTS" --load "$CHECKPOINTS" --save-interval 2000
  --distributed-backend nccl
)

CMD=(torchrun --nproc-per-node "$NPROC" --nnodes "$NNODES" --node-rank "$NODE_RANK"
     --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT"
     "$MEGATRON_LM/pretrain_gpt.py" "${ARGS[@]}" "$@")
if [[ "${DRY_RUN:-0}" == 1 ]]; then
  printf '%q ' "${CMD[@]}"; echo
else
  exec "${CMD[@]}"
fi
