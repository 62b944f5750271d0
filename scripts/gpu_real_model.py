"""SmolLM2-135M-Instruct (a real pretrained model, Q4_1 GGUF) on a GPU: retrieval of a pass key in
prose, dense vs PBS settings, then `pbs tune` with the accuracy guard and an eval of its profiles
on prompts tune never saw (issue 21).

    PBS_SMOLLM2_GGUF=/path/SmolLM2-135M-Instruct.Q4_1.gguf python scripts/gpu_real_model.py [OUT]

OUT (default $OUT, else pbs-out/gpu_real_model) receives every eval/tune JSON, the profiles, a
log and summary.json; the tables print to stdout. Env: SAMPLES (pass keys per depth, default 4:
20 prompts per length over 5 depths), HELDOUT_SAMPLES (default 8: 40 per length), TRIALS (tune's
trials per layer, default 12), GUARD_SAMPLES (tune's --accuracy-samples, default 7), LENS
(default "4k,8k"; 8k runs at the model's 8192 positions, its prompts shortened by the answer's
tokens), PARTS (default "table,tune": run only the named parts, e.g. in two device calls), TARGETS
(tune's --target-speedup, tried in order until one is reached; default "2x,1.5x,1.2x"), PARALLEL
(the table's evals run at once, accuracy only; default 1).

1. `pbs eval MODEL --profile P --tasks passkey --seq-len 4k,8k` for the settings of the issue's
   table, every layer sparse (min_seq_len 0): paired counts per length (dense, PBS, prompts lost /
   won, McNemar p, verdict). Densities are not measured here (pbs analyze gives them).
2. `pbs tune MODEL --seq-len L --target-speedup T --max-accuracy-drop 1` at each length, then
   `pbs eval` of its profile with --seed 2024 (tune checks seed 1000 prompts; eval's default is 0).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    gguf = os.environ.get("PBS_SMOLLM2_GGUF")
    if not gguf or not Path(gguf).is_file():
        print("set PBS_SMOLLM2_GGUF to the SmolLM2-135M-Instruct.Q4_1.gguf file", file=sys.stderr)
        return 2
    out = Path(sys.argv[1] if len(sys.argv) > 1 else os.environ.get("OUT") or "pbs-out/gpu_real_model")
    out.mkdir(parents=True, exist_ok=True)
    samples = int(os.environ.get("SAMPLES", "4"))
    heldout = int(os.environ.get("HELDOUT_SAMPLES", "8"))
    trials = os.environ.get("TRIALS", "12")
    guard = os.environ.get("GUARD_SAMPLES", "7")  # tune's check: 7 x 3 depths x 2 tasks = 42 prompts
    lens = os.environ.get("LENS", "4k,8k")
    parts = os.environ.get("PARTS", "table,tune").split(",")
    targets = os.environ.get("TARGETS", "2x,1.5x,1.2x").split(",")
    depths = "0,0.25,0.5,0.75,1"
    log = open(out / "log.txt", "a")
    env = {**os.environ, "PYTHONPATH": f"{ROOT}:{ROOT / 'kernels'}:" + os.environ.get("PYTHONPATH", "")}

    def pbs(name: str, *args: str) -> dict | None:
        t0 = time.perf_counter()
        r = subprocess.run([sys.executable, "-m", "pbs_cli", *args, "--format", "json"], cwd=ROOT, env=env,
                           capture_output=True, text=True)
        dt = time.perf_counter() - t0
        log.write(f"== {name} ({dt:.0f} s, rc {r.returncode}): pbs {' '.join(args)}\n{r.stderr[-4000:]}\n")
        log.flush()
        if r.returncode != 0:
            last = [ln for ln in r.stderr.splitlines() if ln.startswith("error")]
            print(f"{name}: failed ({last[-1] if last else 'rc ' + str(r.returncode)})", flush=True)
            return None
        (out / f"{name}.json").write_text(r.stdout)
        return json.loads(r.stdout)

    import torch, transformers, triton  # noqa: E401 - versions for the log

    log.write(f"{torch.cuda.get_device_name(0)}; torch {torch.__version__}, triton {triton.__version__}, "
              f"transformers {transformers.__version__}\n")
    sys.path[:0] = [str(ROOT), str(ROOT / "kernels")]
    from pbs_kernels.profile import LayerConfig, PbsProfile

    name = Path(gguf).name.removesuffix(".gguf")
    settings = {
        "defaults (b128 s256 t0.9 perm)": {},
        "permute off": {"permute": False},
        "t 0.97": {"threshold": 0.97},
        "b64 t0.95": {"block_size": 64, "threshold": 0.95},
        "mass total t0.9": {"threshold_mass": "total"},
        "head rule t0.93 (top, vk2)": {"threshold_mass": "head", "estimator": "top", "vertical_keys": 2,
                                       "threshold": 0.93},
        "head rule t0.97 (top, vk2)": {"threshold_mass": "head", "estimator": "top", "vertical_keys": 2,
                                       "threshold": 0.97},
        "t 0.5 (too sparse)": {"threshold": 0.5},
    }
    jobs = []
    for i, (label, kw) in enumerate(settings.items() if "table" in parts else ()):
        path = out / f"profile-{i}.yaml"
        PbsProfile(model=name, defaults=LayerConfig(min_seq_len=0, **kw)).save(path)
        jobs.append((label, (f"eval-{i}", "eval", gguf, "--profile", str(path), "--seq-len", lens, "--tasks",
                             "passkey", "--depths", depths, "--samples", str(samples), "--device", "cuda", "--out",
                             str(out / f"ev-{i}"))))
    # Accuracy only, so the evals may share the GPU (PARALLEL at once); tune, which times, runs after.
    with ThreadPoolExecutor(max(1, int(os.environ.get("PARALLEL", "1")))) as pool:
        docs = list(pool.map(lambda job: pbs(*job[1]), jobs))
    rows = [(label, doc) for (label, _), doc in zip(jobs, docs)]
    _print_rows(rows, header=bool(rows))

    print("\n# pbs tune --max-accuracy-drop 1, then eval of its profile on unseen prompts (seed 2024)", flush=True)
    tuned = []
    for n in lens.split(",") if "tune" in parts else ():
        prof = out / f"tuned-{n}.yaml"
        t = None
        for target in targets:  # trials are stored beside the profile: a lower target reruns none
            t = pbs(f"tune-{n}-{target}", "tune", gguf, "--seq-len", n, "--target-speedup", target,
                    "--max-accuracy-drop", "1", "--trials", trials, "--accuracy-samples", guard, "--device", "cuda",
                    "--out", str(prof))
            if t is not None:
                break
        if t is None:
            continue
        acc = t.get("accuracy") or {}
        chosen = acc.get("chosen") or {}
        print(f"tune {n}: {t['search']['speedup']:.2f}x search, held-out {t['validation']['speedup']:.2f}x; guard "
              f"{acc.get('status')} on {','.join(acc.get('tasks', []))}: dense "
              f"{100 * acc.get('dense_accuracy', 0):.0f}% pbs {100 * chosen.get('accuracy', float('nan')):.0f}% "
              f"lost/won {chosen.get('dense_only')}/{chosen.get('pbs_only')}; notes: {t.get('notes')}", flush=True)
        doc = pbs(f"eval-tuned-{n}", "eval", gguf, "--profile", str(prof), "--seq-len", n, "--tasks", "passkey",
                  "--depths", depths, "--samples", str(heldout), "--seed", "2024", "--device", "cuda",
                  "--out", str(out / f"ev-tuned-{n}"))
        tuned.append((f"tuned at {n} (seed 2024)", doc))
    _print_rows(tuned, header=True)
    summary = {label: doc and {"paired": doc["paired"]} for label, doc in rows + tuned}
    (out / f"summary-{'-'.join(parts)}.json").write_text(json.dumps(summary, indent=1))
    return 0


def _print_rows(rows, header: bool) -> None:
    if header:
        print(f"{'setting':<28} {'len':>5} {'dense':>6} {'pbs':>6} {'lost/won':>8} {'p':>5}  verdict")
    for label, doc in rows:
        if doc is None:
            print(f"{label:<28} failed (see log.txt)")
            continue
        for c in doc["paired"]:
            print(f"{label:<28} {c['seq_len']:>5} {c['both'] + c['dense_only']:>3}/{c['n']:<2} "
                  f"{c['both'] + c['pbs_only']:>3}/{c['n']:<2} {c['dense_only']:>4}/{c['pbs_only']:<3} "
                  f"{c['p_value']:>5.2f}  {c['verdict']}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
