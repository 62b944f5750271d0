"""Which accuracy proxy ranks PBS settings like task accuracy (docs/eval.md, BENCHMARKS.md).

    python scripts/proxy_correlation.py --seq-len 2048 --out pbs-out/proxies.json

Runs pbs_cli.workflows.eval.proxies.proxy_study on the embedded demo model: a grid of settings
(threshold x permute, every layer alike), their retrieval accuracy and each proxy, and the
Spearman rank correlation of each proxy with accuracy. Prints the Markdown table.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from pbs_cli.workflows.eval.proxies import grid, markdown_table, proxy_study
from pbs_cli.workflows.jsonable import to_jsonable
from pbs_kernels._io import write_atomic
from pbs_kernels.demo import demo_doc, demo_model_path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--thresholds", default="0.2,0.4,0.6,0.8,0.9,0.95,0.99,1.0")
    ap.add_argument("--samples", type=int, default=2)
    ap.add_argument("--out", default="pbs-out/proxies.json")
    args = ap.parse_args()
    path = demo_model_path()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(path)
    # Proxies on held-out demo text (seeds >= 1_000_000 were never trained on), as tune measures.
    calib = torch.tensor([demo_doc(args.seq_len, 1_000_123).ids])
    t0 = time.perf_counter()
    study = proxy_study(model, tok, calib, settings=grid([float(t) for t in args.thresholds.split(",")]),
                        seq_len=args.seq_len, samples=args.samples,
                        progress=lambda d, c, t=None: print(f"{d}: {c}/{t}", flush=True) if d == "settings" else None)
    print(f"seq_len {args.seq_len}, dense accuracy {study.dense_accuracy:.3f}, {time.perf_counter() - t0:.0f} s, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(markdown_table(study))
    print("best:", study.best)
    write_atomic(args.out, json.dumps(to_jsonable(study), indent=2) + "\n")


if __name__ == "__main__":
    main()
