#!/usr/bin/env bash
# GPU check and bench of the serving shapes (issue 12), in one device call: the new GPU tests,
# pbs bench's chunk and varlen rows, the HF serving tests on this machine's transformers, and the
# existing GPU kernel tests (the kernels gained constexpr flags).
# Usage (repository root, CUDA machine): OUT=/tmp/out bash scripts/gpu_serving.sh
set -u
export PYTHONPATH=$PWD:$PWD/kernels PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/pbs-serving}
mkdir -p "$OUT"
python3 - <<'PY' | tee "$OUT/versions.txt"
import torch, triton, transformers
print("gpu", torch.cuda.get_device_name(), "| torch", torch.__version__, "| triton", triton.__version__,
      "| transformers", transformers.__version__, "| cuda", torch.version.cuda)
PY
timeout 90 python3 -m pytest -q -p no:warnings tests/kernels/test_serving.py -m gpu 2>&1 | tail -6 | tee "$OUT/tests.txt"
timeout 150 python3 -m pbs_cli bench --seq-len 128k --chunk 8k,16k --lengths 4k,16k,32k,64k --serving-only \
  --out "$OUT/bench" > "$OUT/bench.log" 2>&1; echo "bench rc $?"
timeout 60 python3 -m pytest -q -p no:warnings -x tests/kernels/test_hf_serving.py 2>&1 | tail -3 | tee -a "$OUT/tests.txt"
timeout 45 python3 -m pytest -q -p no:warnings tests/kernels/test_gpu_kernels.py 2>&1 | tail -3 | tee -a "$OUT/tests.txt"
cat "$OUT/bench/results.md" 2>/dev/null || tail -30 "$OUT/bench.log"
