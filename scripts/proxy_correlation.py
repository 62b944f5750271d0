"""Which accuracy proxy ranks PBS settings like task accuracy (docs/eval.md, BENCHMARKS.md).

    python scripts/proxy_correlation.py --seq-len 2048 --out pbs-out/proxies.json
    python scripts/proxy_correlation.py --model SmolLM2-135M-Instruct.Q4_1.gguf --seq-len 4096 \
        --tasks passkey --depths 0,0.25,0.5,0.75,1 --samples 8 --block-size 128 --device cuda

Runs pbs_cli.workflows.eval.proxies.proxy_study on a model (default: the embedded demo model; a
folder, hub id or GGUF file as `pbs` takes it): a grid of settings (threshold x permute, every
layer alike), their retrieval accuracy and each proxy, and the Spearman rank correlation of each
proxy with accuracy. Prints the Markdown table. The proxies are measured on held-out demo text
for the demo model, on the built-in synthetic text (what `pbs tune` calibrates on) for others.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from pbs_cli.workflows.eval.proxies import grid, markdown_table, proxy_study
from pbs_cli.workflows.jsonable import to_jsonable
from pbs_cli.workflows.model import build_prompt, load_model
from pbs_kernels._io import write_atomic
from pbs_kernels.demo import demo_doc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--thresholds", default="0.2,0.4,0.6,0.8,0.9,0.95,0.99,1.0")
    ap.add_argument("--samples", type=int, default=2)
    ap.add_argument("--out", default="pbs-out/proxies.json")
    ap.add_argument("--model", default="", help="a model as pbs commands take it (default: the demo model)")
    ap.add_argument("--tasks", default="niah_single,niah_multikey")
    ap.add_argument("--depths", default="0.1,0.3,0.5,0.7,0.9")
    ap.add_argument("--block-size", type=int, default=64)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    # No --model: the demo model (load_model(None)), in fp32 as before.
    loaded = load_model(args.model or None, device=args.device, dtype="auto" if args.model else "fp32")
    model, tok = loaded.model.eval(), loaded.tokenizer
    if args.model:
        calib = build_prompt(loaded, args.seq_len).input_ids
    else:
        # Proxies on held-out demo text (seeds >= 1_000_000 were never trained on), as tune measures.
        calib = torch.tensor([demo_doc(args.seq_len, 1_000_123).ids], device=loaded.device)
    t0 = time.perf_counter()
    settings = grid([float(t) for t in args.thresholds.split(",")], block_size=args.block_size)
    study = proxy_study(model, tok, calib, settings=settings, tasks=args.tasks.split(","),
                        depths=[float(d) for d in args.depths.split(",")],
                        seq_len=args.seq_len, samples=args.samples,
                        progress=lambda d, c, t=None: print(f"{d}: {c}/{t}", flush=True) if d == "settings" else None)
    where = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"{torch.get_num_threads()} threads"
    print(f"seq_len {args.seq_len}, dense accuracy {study.dense_accuracy:.3f}, {time.perf_counter() - t0:.0f} s, "
          f"torch {torch.__version__}, {where}")
    print(markdown_table(study))
    print("best:", study.best)
    write_atomic(args.out, json.dumps(to_jsonable(study), indent=2) + "\n")


if __name__ == "__main__":
    main()
