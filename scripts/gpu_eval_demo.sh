#!/usr/bin/env bash
# pbs eval on the demo model on a GPU: the demo's accuracy table for BENCHMARKS.md / README.
#   bash scripts/gpu_eval_demo.sh OUT [TUNED_PROFILE]
# 1. dense vs profiles/demo.yaml (and a tuned profile if given) on the needle tasks at 8K and 16K;
# 2. every task, dense only, at 2K-16K (what the small model can do).
set -euo pipefail
OUT=${1:?usage: gpu_eval_demo.sh OUT [TUNED_PROFILE]}
mkdir -p "$OUT"
log="$OUT/log.txt"
{
  nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
  python -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
} >>"$log" 2>&1
NEEDLE=(--tasks niah_single,niah_multikey --depths 0,0.25,0.5,0.75,1 --samples 6 --device cuda)
run() {
  local name=$1; shift; local t0=$SECONDS
  python -m pbs_cli eval "$@" --out "$OUT/tmp-$name" --format json >"$OUT/$name.json" 2>>"$log"
  echo "$name: $((SECONDS - t0)) s" >>"$log"
}
run demo --profile profiles/demo.yaml --seq-len 8k,16k "${NEEDLE[@]}"
cp "$OUT/tmp-demo/eval_needle.png" "$OUT/demo_needle.png"
if [ -n "${2:-}" ]; then
  run tuned --profile "$2" --seq-len 8k,16k "${NEEDLE[@]}"
  cp "$OUT/tmp-tuned/eval_needle.png" "$OUT/tuned_needle.png"
fi
run tasks --seq-len 2k,4k,8k,16k --samples 4 --device cuda
rm -rf "$OUT"/tmp-*
