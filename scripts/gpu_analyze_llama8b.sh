#!/usr/bin/env bash
# `pbs analyze` on a Llama-3-8B-shaped model at 32K tokens, on one CUDA GPU (issue 3 acceptance:
# runs without running out of memory). The model has Llama-3-8B's attention and MLP shapes
# (hidden 4096, 32 heads, 8 KV heads, head dim 128, intermediate 14336, vocab 128256, rope theta
# 500000, 128K positions) but random weights and only a few layers, so it needs no download.
#
# Usage: scripts/gpu_analyze_llama8b.sh [OUT_DIR] [LAYERS] [SEQ_LEN]   (defaults: pbs-out/gpu-llama8b 4 32k)
# Writes OUT_DIR/model (the saved model, ~4 GB), OUT_DIR/analyze (report.json, PNGs) and
# OUT_DIR/analyze.json (the --format json document), and prints the summary and peak memory.
set -euo pipefail

OUT=${1:-pbs-out/gpu-llama8b}
LAYERS=${2:-4}
SEQ=${3:-32k}
MODEL="$OUT/model"
mkdir -p "$OUT"
# Works from a plain checkout too (no pip install): the packages live in . and kernels/.
ROOT=$(cd "$(dirname "$0")/.." && pwd)
export PYTHONPATH="$ROOT:$ROOT/kernels${PYTHONPATH:+:$PYTHONPATH}"

python - "$MODEL" "$LAYERS" <<'EOF'
import sys
import time

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

folder, layers = sys.argv[1], int(sys.argv[2])
assert torch.cuda.is_available(), "this script needs a CUDA GPU"
config = LlamaConfig(
    hidden_size=4096, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
    intermediate_size=14336, vocab_size=128256, rope_theta=500000.0,
    max_position_embeddings=131072, num_hidden_layers=layers, tie_word_embeddings=False,
    bos_token_id=128000, eos_token_id=128001,
)
t = time.time()
torch.manual_seed(0)
with torch.device("cuda"):  # random init on the GPU: seconds instead of minutes on the CPU
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
model.save_pretrained(folder)
print(f"saved a {layers}-layer Llama-3-8B-shaped model ({sum(p.numel() for p in model.parameters()) / 1e9:.2f}B "
      f"params, bf16) to {folder} in {time.time() - t:.0f} s", flush=True)
EOF

nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
# No tokenizer in the folder: pbs analyze feeds synthetic token ids (the demo corpus's structure).
python -m pbs_cli analyze "$MODEL" --seq-len "$SEQ" --device cuda --dtype bf16 \
    --out "$OUT/analyze" --format json > "$OUT/analyze.json" 2> "$OUT/analyze.log" || {
    echo "pbs analyze failed:"; tail -n 30 "$OUT/analyze.log"; exit 1; }
grep -v "^layers" "$OUT/analyze.log" | head -n 5 || true

python - "$OUT/analyze.json" <<'EOF'
import json
import sys

doc = json.load(open(sys.argv[1]))
s = doc["summary"]
print(f"model {doc['model']}: {doc['seq_len']} tokens, {doc['num_layers']} layers x {doc['num_heads']} heads "
      f"(kv {doc['num_kv_heads']}, head dim {doc['head_dim']}), {doc['device']} {doc['dtype']}")
print(f"analysis {doc['elapsed_s']:.1f} s, peak GPU memory {doc['peak_gpu_memory_gib']:.1f} GiB")
print(f"oracle density {s['oracle_density']:.3f} -> {s['oracle_density_perm']:.3f} permuted; "
      f"PBS density {s['pbs_density']:.3f}, recall {s['pbs_recall']:.3f}; "
      f"perm helps/neutral/hurts {s['heads_helps']}/{s['heads_neutral']}/{s['heads_hurts']}")
for layer in doc["layers"]:
    print(f"  layer {layer['layer']}: oracle {layer['oracle_density']:.3f} -> {layer['oracle_density_perm']:.3f}, "
          f"PBS {layer['pbs_density']:.3f} / recall {layer['pbs_recall']:.3f}, sink {layer['sink_mass']:.3f}, "
          f"local {layer['local_mass']:.3f}")
print("pictures:", ", ".join(doc["files"]["pictures"]))
EOF
