#!/usr/bin/env bash
# The `top` estimator against `mean` through the commands (BENCHMARKS section 8, runs 2 and 3;
# issue 14), on a CUDA GPU: the overhead part of gpu_select_estimators.py, `pbs bench` on the
# vertical-slash workload (defaults, the top estimator, and top at threshold 0.98 with a 2% gate)
# and `pbs analyze` of the demo model with each estimator.
# Usage: bash scripts/gpu_estimator_bench.sh OUT
set -euo pipefail
OUT=${1:?output folder}
T=$(mktemp -d)
printf 'schema_version: 1\ndefaults: {estimator: top, threshold: 0.9}\n' > "$T/top.yaml"
printf 'schema_version: 1\ndefaults: {estimator: top, threshold: 0.98}\n' > "$T/top98.yaml"
python scripts/gpu_select_estimators.py --parts check,overhead --out "$T" > "$OUT/dev.txt" 2>&1 || cat "$OUT/dev.txt"
tail -30 "$OUT/dev.txt"
python -m pbs_cli bench --seq-len 32k,128k --workload vertical --baselines cudnn --out "$T/bm" || true  # the defaults fail the 5% gate here
cp "$T/bm/results.json" "$OUT/bench_vertical_mean.json"
python -m pbs_cli bench --seq-len 32k,128k --workload vertical --baselines cudnn --profile "$T/top.yaml" --out "$T/bt" || true
cp "$T/bt/results.json" "$OUT/bench_vertical_top.json"
python -m pbs_cli bench --seq-len 128k --workload vertical --baselines cudnn --profile "$T/top98.yaml" --max-error 0.02 --out "$T/bt98"
cp "$T/bt98/results.json" "$OUT/bench_vertical_top98.json"
for est in mean top; do
  python -m pbs_cli analyze --seq-len 8k --estimator $est --out "$T/an_$est" 2>&1 | tail -8
  cp "$T/an_$est/report.json" "$OUT/analyze_demo_$est.json"
done
