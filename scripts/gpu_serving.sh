#!/usr/bin/env bash
# GPU check and bench of the serving shapes (issue 12), in one device call:
#   the new GPU tests, the existing GPU kernel tests (the kernels gained constexpr flags), the HF
#   serving tests on this machine's transformers, then pbs bench's chunk and varlen rows.
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
python3 -m pytest -q -p no:warnings tests/kernels/test_serving.py -m gpu 2>&1 | tail -5 | tee "$OUT/tests.txt"
python3 -m pytest -q -p no:warnings tests/kernels/test_gpu_kernels.py 2>&1 | tail -3 | tee -a "$OUT/tests.txt"
python3 -m pytest -q -p no:warnings -x tests/kernels/test_hf_serving.py 2>&1 | tail -3 | tee -a "$OUT/tests.txt"
python3 -m pbs_cli bench --seq-len 128k --chunk 8k,16k --lengths 4k,16k,32k,64k --serving-only \
  --out "$OUT/bench" 2>&1 | tail -60
