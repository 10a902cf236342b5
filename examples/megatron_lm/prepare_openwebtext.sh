#!/usr/bin/env bash
# OpenWebText for gpt2_medium_pp8.sh, preprocessed with Megatron-LM's own tool.
#
#   MEGATRON_LM=/path/to/Megatron-LM OUT=/data/owt bash examples/megatron_lm/prepare_openwebtext.sh
#
# Writes $OUT/openwebtext.jsonl (one {"text": ...} per document, from the Hugging Face
# dataset "Skylion007/openwebtext"), the GPT-2 BPE files $OUT/gpt2-vocab.json and
# $OUT/gpt2-merges.txt, and Megatron's indexed dataset $OUT/owt_text_document.{bin,idx}
# (about 9 billion tokens, 17 GB). Needs `pip install datasets huggingface_hub` and disk.
set -euo pipefail
MEGATRON_LM=${MEGATRON_LM:?set MEGATRON_LM to your Megatron-LM checkout}
OUT=${OUT:?set OUT to the output folder}
WORKERS=${WORKERS:-$(nproc)}
mkdir -p "$OUT"

python3 - "$OUT" <<'PY'
import json, os, sys
from datasets import load_dataset
from huggingface_hub import hf_hub_download

out = sys.argv[1]
for remote, local in (("vocab.json", "gpt2-vocab.json"), ("merges.txt", "gpt2-merges.txt")):
    path = hf_hub_download("openai-community/gpt2", remote)
    with open(path, "rb") as src, open(os.path.join(out, local), "wb") as dst:
        dst.write(src.read())
jsonl = os.path.join(out, "openwebtext.jsonl")
if not os.path.exists(jsonl):
    ds = load_dataset("Skylion007/openwebtext", split="train")
    with open(jsonl + ".part", "w", encoding="utf-8") as f:
        for row in ds:
            f.write(json.dumps({"text": row["text"]}) + "\n")
    os.replace(jsonl + ".part", jsonl)
PY

python3 "$MEGATRON_LM/tools/preprocess_data.py" \
  --input "$OUT/openwebtext.jsonl" --output-prefix "$OUT/owt" \
  --tokenizer-type GPT2BPETokenizer \
  --vocab-file "$OUT/gpt2-vocab.json" --merge-file "$OUT/gpt2-merges.txt" \
  --append-eod --workers "$WORKERS"
echo "DATA_PREFIX=$OUT/owt_text_document"
