#!/usr/bin/env bash
# `pbs tune` on a Llama-3-8B-shaped model at 32K tokens on one CUDA GPU (issue 5 acceptance: the
# tune finishes within 10 minutes), then `pbs bench --profile` on the tuned profile, to compare
# the speedup the tune measured on held-out text with bench's own measurement (within 15%).
#
# The model (scripts/llama8b_model.py) has Llama-3-8B's shapes, a few layers, 128K positions and
# random weights shaped to attend like a trained model, so it needs no download. Pass
# STRUCTURED=0 to keep the plain random init (expect "out of reach").
#
# Usage: scripts/gpu_tune_llama8b.sh [OUT_DIR] [LAYERS] [SEQ_LEN] [TRIALS]
#        (defaults: pbs-out/gpu-tune-llama8b 4 32k 12)
# Writes OUT_DIR/model (~4 GB), OUT_DIR/llama8b.yaml (the profile), OUT_DIR/tune.json,
# OUT_DIR/bench.json and their logs, and prints the comparison.
set -euo pipefail

OUT=${1:-pbs-out/gpu-tune-llama8b}
LAYERS=${2:-4}
SEQ=${3:-32k}
TRIALS=${4:-12}
STRUCTURED=${STRUCTURED:-1}
MODEL="$OUT/model"
PROFILE="$OUT/llama8b.yaml"
mkdir -p "$OUT"
python -c "import optuna; print('optuna', optuna.__version__)"

python "$(dirname "$0")/llama8b_model.py" "$MODEL" "$LAYERS" "$STRUCTURED"

nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
# A fresh storage each run, so the timing is of a full tune, not a resume.
rm -f "$OUT/llama8b.optuna.db"
t0=$(date +%s)
pbs tune "$MODEL" --target-speedup 2x --seq-len "$SEQ" --trials "$TRIALS" --device cuda --dtype bf16 \
    --out "$PROFILE" --format json > "$OUT/tune.json" 2> "$OUT/tune.log" || {
    echo "pbs tune failed:"; tail -n 30 "$OUT/tune.log"; exit 1; }
echo "pbs tune: $(( $(date +%s) - t0 )) s (limit 600 s)"
grep -v "^trials\|^calibration\|^validation" "$OUT/tune.log" | tail -n 40 || true

python - "$OUT/tune.json" <<'EOF'
import json
import sys

doc = json.load(open(sys.argv[1]))
v, s = doc["validation"], doc["search"]
print(f"{doc['model']}: {doc['seq_len']} tokens on {doc['device']} ({doc['dtype']}), {doc['trials']} trials/layer, "
      f"{doc['elapsed_s']:.0f} s")
print(f"search (calibration text): {s['speedup']:.3f}x {doc['cost_model']}; best reachable {s['best_speedup']:.3f}x")
print(f"held-out: {v['speedup']:.3f}x {doc['cost_model']}, cost model {v['predicted_speedup']:.3f}x; "
      f"density {v['density']:.3f}, recall {v['recall']:.4f}, error {v['error']:.4f}, KL {v['kl']:.3g}, "
      f"ppl {v['ppl_dense']:.4g} -> {v['ppl_pbs']:.4g} ({100 * v['ppl_change']:+.2f}%)")
for layer in doc["layers"]:
    c, h = layer["chosen"], layer["heldout"] or {}
    cfg = c["config"]
    name = "dense" if cfg["dense"] else f"b{cfg['block_size']} S{cfg['segment_size']} t{cfg['threshold']} " \
                                        f"{'perm' if cfg['permute'] else 'noperm'}"
    t, dt = h.get("time_ms"), h.get("dense_ms")
    times = f", {t:.2f} ms vs dense {dt:.2f} ms" if t and dt else ""
    print(f"  layer {layer['layer']}: {name}: held-out cost {h.get('cost', 1.0):.3f} "
          f"(model {h.get('predicted_cost', 1.0):.3f}), density {h.get('density', 1.0):.3f}, "
          f"error {h.get('error', 0.0):.4f}{times}; {len(layer['front'])} Pareto points")
EOF

pbs profile show "$PROFILE"

# Bench every sparse layer of the profile on its own captured activations (the calibration
# prompt the tune used), against the fastest of cuDNN / flash; layer 0 also times the first
# token end to end (--e2e). --max-error is loose on purpose: this run checks speed, the tune
# already chose each layer's error.
for L in $(seq 0 $((LAYERS - 1))); do
    if python -c "import sys; from pbs_kernels.profile import PbsProfile; sys.exit(0 if PbsProfile.load('$PROFILE').layer($L).dense else 1)"; then
        echo "layer $L: dense in the profile, not benched"
        continue
    fi
    E2E=""
    [ "$L" = 0 ] && E2E="--e2e"
    pbs bench --profile "$PROFILE" --layer "$L" --seq-len "$SEQ" --workload captured --model "$MODEL" \
        --baselines cudnn,flash --max-error 1.0 $E2E --device cuda --dtype bf16 --out "$OUT/bench-layer$L" \
        --format json > "$OUT/bench-layer$L.json" 2> "$OUT/bench-layer$L.log" || {
        echo "pbs bench (layer $L) failed:"; tail -n 30 "$OUT/bench-layer$L.log"; exit 1; }
done

python - "$OUT" "$LAYERS" <<'EOF'
import json
import os
import sys

out, n_layers = sys.argv[1], int(sys.argv[2])
tune = json.load(open(os.path.join(out, "tune.json")))
by_layer = {layer["layer"]: layer for layer in tune["layers"]}
print("layer  tune search cost  tune held-out cost  bench cost (pbs ms / fastest dense ms)")
bench_costs, e2e = [], None
for i in range(n_layers):
    layer = by_layer[i]
    path = os.path.join(out, f"bench-layer{i}.json")
    search = layer["chosen"]["cost"]
    held = (layer["heldout"] or {}).get("cost", 1.0)
    if not os.path.exists(path):
        bench_costs.append(1.0)
        print(f"{i:5d}  dense")
        continue
    doc = json.load(open(path))
    r = doc["results"][0]
    pbs = next(m for m in r["methods"] if m["method"] == "pbs")
    cost = pbs["ms"] / r["fastest_dense_ms"]
    bench_costs.append(cost)
    print(f"{i:5d}  {search:16.3f}  {held:18.3f}  {cost:.3f} ({pbs['ms']:.2f} / {r['fastest_dense_ms']:.2f} ms "
          f"{r['fastest_dense']}), density {pbs['density']:.3f}, error {pbs['error']:.4f}")
    if doc.get("e2e"):
        e2e = doc["e2e"][0]
bench_speedup = n_layers / sum(bench_costs)
m = tune["metrics"]
predicted = m.get("measured_speedup") or m["predicted_speedup"]
ratio = bench_speedup / predicted
print(f"attention speedup: tune predicted {predicted:.3f}x (held-out, {m['cost_model']}), "
      f"search {tune['search']['speedup']:.3f}x; bench {bench_speedup:.3f}x -> bench / tune = {ratio:.3f} "
      f"({'within' if abs(ratio - 1) <= 0.15 else 'OUTSIDE'} 15%)")
if e2e:
    print(f"end to end (first token, {e2e['seq_len']} tokens): dense {e2e['ttft_dense_ms']} ms, "
          f"with the profile {e2e['ttft_pbs_ms']} ms, speedup {e2e['speedup']}")
EOF
