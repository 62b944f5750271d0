#!/usr/bin/env bash
# `pbs tune` on a Llama-3-8B-shaped model at 32K tokens on one CUDA GPU (issue 5 acceptance: the
# tune finishes within 10 minutes), then `pbs bench --profile` on the tuned profile, to compare
# the speedup the tune measured on held-out text with bench's own measurement (within 15%).
#
# The model has Llama-3-8B's shapes (hidden 4096, 32 heads, 8 KV heads, head dim 128,
# intermediate 14336, vocab 128256, rope theta 500000, 128K positions), a few layers and random
# weights, so it needs no download. Plain random weights attend almost uniformly, which no sparse
# method can speed up without wrecking the output (every target would be out of reach), so the
# q/k projections and the embeddings are set, still randomly, to give trained-model-like
# attention: sharp local heads of varied width (fast RoPE frequencies), a smooth recency bias
# (slow ones) that block pooling can see, and a BOS sink of varied strength per head. Pass
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

python - "$MODEL" "$LAYERS" "$STRUCTURED" <<'EOF'
import math
import sys
import time

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

folder, layers, structured = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"
assert torch.cuda.is_available(), "this script needs a CUDA GPU"
config = LlamaConfig(
    hidden_size=4096, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
    intermediate_size=14336, vocab_size=128256, rope_theta=500000.0,
    max_position_embeddings=131072, num_hidden_layers=layers, tie_word_embeddings=False,
    bos_token_id=1, eos_token_id=2,  # the synthetic prompt (no tokenizer) starts with id 1
)


def shape_attention(model, seed=0, noise=0.5, peaks=(6.0, 24.0), recencies=(2.0, 10.0), sinks=(0.0, 12.0)):
    """q.k(n, m) = peak * K_fast(n - m) + recency * K_slow(n - m) + sink * [m == 0] (logits).

    Every token embedding is a shared unit direction s plus noise (relative size `noise`), times
    sqrt(hidden) so RMSNorm keeps it; k reads s into RoPE pairs, q reads the same scaled per head,
    so q.k depends on the distance only, through RoPE's rotations: the 16 fastest pairs make a
    sharp local peak, pairs 28-43 (periods of ~600-40000 tokens) a slow recency decay. The BOS
    embedding adds a direction t that only the slowest pair's key reads: an attention sink.
    Attention and MLP outputs are scaled down so every layer's input stays close to that.
    V stays random (token noise), so skipping the wrong keys shows as output error.
    """
    cfg = model.config
    dev = model.device
    g = torch.Generator(device=dev).manual_seed(seed)
    d, D, HQ, H = cfg.hidden_size, cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
    G, half, rd = HQ // H, D // 2, math.sqrt(cfg.hidden_size)
    fast, slow_band, sink_pair = list(range(16)), list(range(28, 44)), half - 1
    rand = lambda *shape: torch.rand(*shape, generator=g, device=dev)  # noqa: E731
    s = torch.randn(d, generator=g, device=dev)
    s /= s.norm()
    t = torch.randn(d, generator=g, device=dev)
    t -= (t @ s) * s
    t /= t.norm()
    hs = rd / math.sqrt(1 + noise**2)  # h . s after RMSNorm, ordinary tokens
    ht = rd / math.sqrt(2 + noise**2)  # h . t for BOS
    with torch.no_grad():
        emb = model.get_input_embeddings().weight
        z = torch.randn(emb.shape, generator=g, device=dev, dtype=torch.float32)
        z -= (z @ s)[:, None] * s
        z /= z.norm(dim=1, keepdim=True)
        emb.copy_((s + noise * z) * rd)
        del z
        emb[cfg.bos_token_id] += t * rd
        for layer in model.model.layers:
            a = layer.self_attn
            a.o_proj.weight.mul_(0.05)
            layer.mlp.down_proj.weight.mul_(0.05)
            wq = a.q_proj.weight.view(HQ, D, d)
            wk = a.k_proj.weight.view(H, D, d)
            wq.zero_()
            wk.zero_()
            for j in range(H):
                keys = {}
                for band in (fast, slow_band):
                    w = rand(len(band), 2) + 0.5
                    w /= w.norm()
                    for i, p in enumerate(band):
                        keys[p], keys[p + half] = w[i, 0] * s / hs, w[i, 1] * s / hs
                keys[sink_pair] = t / ht
                for p, row in keys.items():
                    wk[j, p] = row
                for gi in range(G):
                    lo_hi = lambda r: r[0] + (r[1] - r[0]) * float(rand(()))  # noqa: E731
                    peak, recency, sink = lo_hi(peaks), lo_hi(recencies), lo_hi(sinks)
                    hq = j * G + gi
                    for p in fast:
                        wq[hq, p], wq[hq, p + half] = keys[p] * peak * math.sqrt(D), keys[p + half] * peak * math.sqrt(D)
                    for p in slow_band:
                        wq[hq, p], wq[hq, p + half] = (keys[p] * recency * math.sqrt(D),
                                                       keys[p + half] * recency * math.sqrt(D))
                    wq[hq, sink_pair] = s / hs * sink * math.sqrt(D)


t0 = time.time()
torch.manual_seed(0)
with torch.device("cuda"):  # random init on the GPU: seconds instead of minutes on the CPU
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
if structured:
    shape_attention(model)
model.save_pretrained(folder)
print(f"saved a {layers}-layer Llama-3-8B-shaped model ({sum(p.numel() for p in model.parameters()) / 1e9:.2f}B "
      f"params, bf16, {'structured' if structured else 'plain'} random attention) to {folder} "
      f"in {time.time() - t0:.0f} s", flush=True)
EOF

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
