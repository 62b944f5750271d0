"""Time to first token of a Llama-3-8B-shaped model at 64K, 128K and 256K tokens: dense, the method
defaults and a profile tuned at 128K, with the Amdahl split (issue 22, item 5).

    python scripts/gpu_ttft.py [--layers 8] [--lens 64k,128k,256k] [--tune 128k] [--targets 5x,4x,3x]
                               [--trials 12] [--no-analyze] [--storage DB] [--profile P] [--out DIR]

1. The model (scripts/llama8b_model.py: structured random attention, bf16, no download) is built
   on the GPU with positions for the longest length.
2. --tune L: `run_tune` (what `pbs tune` runs) on random prompts of L tokens (the model's attention
   depends on distance, not on the tokens), measured costs, trying --targets in order until one
   is reached (the stored trials are reused, so a lower target costs no new ones); the profile is
   written to DIR/tuned.yaml. Or --profile P: a profile made earlier. Neither: no tuned rows.
   The trials are stored in DIR/tuned.optuna.db, or in --storage DB: a tune longer than one device
   call (section 20: ~90 s a layer at 128K) goes on in the next call from the database the first
   left in $OUT (the studies' names come from the model, the length and the prompt, which the
   seeds fix). --lens "" runs the tune alone.
3. Per length, one random prompt (BOS first): the time to first token (`pbs bench --e2e`'s
   `_ttft_ms`: median wall time of one prefill up to the first token's logits) dense, with the
   defaults (PbsProfile(): block 128, segment 256, tau 0.9, permute) and with the tuned profile.
   The Amdahl split: the dense attention inside the dense TTFT is layers x the fastest dense SDPA
   (cuDNN / flash, timing.fastest_dense_ms) on random q, k, v of a layer's shape; the rest is the
   dense TTFT minus that; a profile's attention is its TTFT minus the rest (implied, not timed
   apart); the ceiling (attention free) is dense TTFT / rest.
Writes ttft.json (every figure) to DIR.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from llama8b_model import build  # noqa: E402

from pbs_cli.workflows.bench.e2e import _ttft_ms  # noqa: E402
from pbs_cli.workflows.errors import TargetUnreachableError  # noqa: E402
from pbs_cli.commands._options import parse_length, parse_speedup  # noqa: E402
from pbs_cli.workflows.timing import fastest_dense_ms  # noqa: E402
from pbs_cli.workflows.tune import TuneSettings, run_tune  # noqa: E402
from pbs_kernels._io import write_atomic  # noqa: E402
from pbs_kernels.integrations.hf import apply_profile, remove_profile  # noqa: E402
from pbs_kernels.profile import PbsProfile  # noqa: E402


def prompt(model, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, model.config.vocab_size, (1, n), generator=g)
    ids[0, 0] = 1  # BOS: the model's attention sink
    return ids.to(model.device)


def measure(model, name: str, profile: PbsProfile, ids, row: dict, logits_dense, reps: int) -> None:
    """row[name]: the time to first token with `profile` applied, and the implied attention time."""
    apply_profile(model, profile)
    try:
        ms, logits = _ttft_ms(model, ids, model.device, 1, reps)
    finally:
        remove_profile(model)
    attn = ms - row["rest_ms"]
    row[name] = {"ttft_ms": ms, "speedup": row["ttft_dense_ms"] / ms, "attention_ms": attn,
                 "attention_speedup": row["attention_dense_ms"] / attn if attn > 0 else None,
                 "logits_error": float((logits - logits_dense).norm() / logits_dense.norm()),
                 "same_token": bool(logits.argmax() == logits_dense.argmax())}
    a = row[name]["attention_speedup"]
    print(f"  {row['seq_len'] // 1024}K {name}: {ms:.0f} ms, {row[name]['speedup']:.2f}x; attention {attn:.0f} ms "
          f"({'n/a' if a is None else f'{a:.2f}x'}); logits error {row[name]['logits_error']:.3f}", flush=True)
    torch.cuda.empty_cache()


def save(out: Path, doc: dict) -> None:
    write_atomic(out / "ttft.json", json.dumps(doc, indent=1, default=str))


def compiled_kernels() -> int:
    """Kernels in Triton's on-disk cache (one folder per compiled variant): counted before and
    after the tune, the variants its trials compiled. Why: section 20's tune at 128K took ~13 s
    a trial for about 0.5 s of GPU work by estimate, and 48 random trials of its space ask for
    ~78 compilations on a fresh machine (section 21, scripts/cpu_tune_variants.py)."""
    folder = Path(os.environ.get("TRITON_CACHE_DIR") or Path.home() / ".triton" / "cache")
    return sum(1 for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else 0


def tune(model, n: int, targets: list[str], trials: int, out: Path, analyze: bool,
         storage: str | None = None) -> tuple[PbsProfile | None, dict]:
    calib, held = prompt(model, n, 1), prompt(model, n, 2)
    info: dict = {"seq_len": n, "tried": [], "kernels_cached_before": compiled_kernels()}
    t_start = time.time()

    def progress(desc, done, total=None):
        # Where a long tune spends its time (section 20: 14 trials in about 3 minutes at 128K),
        # and how many kernel variants it has compiled so far.
        print(f"  [{time.time() - t_start:6.1f} s] {desc} {done}/{total} "
              f"(+{compiled_kernels() - info['kernels_cached_before']} compiled)", flush=True)

    for t in targets:
        settings = TuneSettings(target_speedup=parse_speedup(t),
                                out=out / "tuned.yaml", trials=trials, model_name="llama8b-shaped",
                                max_accuracy_drop=None, analyze=analyze, storage=storage)
        t0 = time.time()
        try:
            result = run_tune(model, calib, held, settings, progress=progress)
        except TargetUnreachableError as e:
            info["tried"].append({"target": t, "error": str(e), "s": time.time() - t0})
            print(f"tune {t}: {e}", flush=True)
            continue
        result.profile.save(out / "tuned.yaml")
        v = result.validation
        info.update(target=t, s=time.time() - t0, search=result.search, validation=v,
                    kernels_compiled=compiled_kernels() - info["kernels_cached_before"],
                    trials_stored=sum(layer.trials_before for layer in result.layers),
                    trials_run=sum(layer.trials_run for layer in result.layers))
        print(f"tune {t} at {n}: search {result.search['speedup']:.2f}x, held-out {v['speedup']:.2f}x "
              f"({time.time() - t0:.0f} s)", flush=True)
        return result.profile, info
    return None, info


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--lens", default="64k,128k,256k")
    ap.add_argument("--tune", default="", help="tune at this length first (e.g. 128k)")
    ap.add_argument("--targets", default="5x,4x,3x")
    ap.add_argument("--trials", type=int, default=12)
    ap.add_argument("--no-analyze", action="store_true",
                    help="seed the tune's studies without analyze_layer (as TuneSettings(analyze=False))")
    ap.add_argument("--storage", default=None,
                    help="the tune's Optuna storage (default: DIR/tuned.optuna.db); an earlier call's to go on")
    ap.add_argument("--profile", default="", help="a tuned profile made earlier")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lens = [parse_length(x) for x in args.lens.split(",") if x.strip()]
    if not lens and not args.tune:
        ap.error("nothing to do: give --lens, --tune or both")
    t0 = time.time()
    model = build(args.layers, max_positions=max(lens + ([parse_length(args.tune)] if args.tune else [])))
    model.eval()
    cfg = model.config
    print(f"{torch.cuda.get_device_name()}: {args.layers}-layer Llama-3-8B-shaped model built "
          f"({time.time() - t0:.0f} s)", flush=True)
    doc: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "layers": args.layers, "rows": []}
    dev = model.device
    rows, prompts, logits_dense = [], {}, {}
    doc["rows"] = rows
    # Dense and the defaults at every length first, then the tune, then the tuned rows: what a
    # run that ends early (a device's time limit) has measured is already in ttft.json.
    for n in lens:
        ids = prompts[n] = prompt(model, n, 0)
        q = torch.randn(1, cfg.num_attention_heads, n, cfg.head_dim, device=dev, dtype=torch.bfloat16)
        k = torch.randn(1, cfg.num_key_value_heads, n, cfg.head_dim, device=dev, dtype=torch.bfloat16)
        backend, attn_ms = fastest_dense_ms(q, k, torch.randn_like(k))
        del q, k
        dense_ms, logits_dense[n] = _ttft_ms(model, ids, dev, 1, args.reps)
        attn_dense = args.layers * attn_ms
        rest = dense_ms - attn_dense
        rows.append({"seq_len": n, "ttft_dense_ms": dense_ms, "attention_dense_ms": attn_dense,
                     "dense_backend": backend, "rest_ms": rest, "attention_share": attn_dense / dense_ms,
                     "ceiling": dense_ms / rest})
        print(f"{n // 1024}K: dense {dense_ms:.0f} ms, attention {attn_dense:.0f} ms ({backend}) = "
              f"{100 * rows[-1]['attention_share']:.0f}%, ceiling {rows[-1]['ceiling']:.2f}x", flush=True)
        measure(model, "defaults", PbsProfile(model="llama8b-shaped"), ids, rows[-1], logits_dense[n], args.reps)
        save(out, doc)
    tuned = PbsProfile.load(args.profile) if args.profile else None
    if args.tune:
        tuned, doc["tune"] = tune(model, parse_length(args.tune), args.targets.split(","), args.trials, out,
                                  analyze=not args.no_analyze, storage=args.storage)
        save(out, doc)
    if tuned is not None:
        name = f"tuned@{args.tune or 'profile'}"
        for row in rows:
            n = row["seq_len"]
            measure(model, name, tuned, prompts[n], row, logits_dense[n], args.reps)
            save(out, doc)
    print(f"wrote {out / 'ttft.json'} ({time.time() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
