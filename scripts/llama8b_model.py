"""A Llama-3-8B-shaped model with random weights and trained-model-like attention, for GPU runs that
need a big real-shaped model and no download (gpu_tune_llama8b.sh, gpu_ttft.py).

    python scripts/llama8b_model.py FOLDER [LAYERS] [STRUCTURED] [MAX_POSITIONS]   # saves it

The shapes are Llama-3-8B's: hidden 4096, 32 query / 8 KV heads of dim 128, intermediate 14336,
vocab 128256, rope theta 500000. Plain random weights attend almost uniformly, which no sparse
method can speed up without wrecking the output, so `shape_attention` sets the q/k projections and
the embeddings, still randomly, to give sharp local heads of varied width, a smooth recency bias
and a BOS sink of varied strength per head (STRUCTURED=0 keeps the plain init).
"""
from __future__ import annotations

import math
import sys
import time

import torch


def build(layers: int = 4, *, structured: bool = True, max_positions: int = 131072, device: str = "cuda"):
    """The model in bf16 on `device`, seeded (the same weights every run)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        hidden_size=4096, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
        intermediate_size=14336, vocab_size=128256, rope_theta=500000.0,
        max_position_embeddings=max_positions, num_hidden_layers=layers, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2,  # the synthetic prompt (no tokenizer) starts with id 1
    )
    torch.manual_seed(0)
    with torch.device(device):  # random init on the GPU: seconds instead of minutes on the CPU
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    if structured:
        shape_attention(model)
    return model


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



def main() -> int:
    folder = sys.argv[1]
    layers = int(sys.argv[2]) if len(sys.argv) > 2 else 4
    structured = (sys.argv[3] if len(sys.argv) > 3 else "1") == "1"
    max_positions = int(sys.argv[4]) if len(sys.argv) > 4 else 131072
    if not torch.cuda.is_available():
        print("llama8b_model.py needs a CUDA GPU", file=sys.stderr)
        return 1
    t0 = time.time()
    model = build(layers, structured=structured, max_positions=max_positions)
    model.save_pretrained(folder)
    print(f"saved a {layers}-layer Llama-3-8B-shaped model ({sum(p.numel() for p in model.parameters()) / 1e9:.2f}B "
          f"params, bf16, {'structured' if structured else 'plain'} random attention) to {folder} "
          f"in {time.time() - t0:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
