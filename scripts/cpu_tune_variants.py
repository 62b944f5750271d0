"""How many distinct Triton kernel variants a `pbs tune` search asks for, trial by trial (issue 22,
BENCHMARKS section 21): on a GPU each new variant is a compilation (four for a new autotuning
key of the selection kernel), which a fresh machine pays during the first trials.

    python scripts/cpu_tune_variants.py [--trials 48] [--seq-len 128k]   # CPU, ~6 min for 48

Trials are drawn at random from `pbs tune`'s search space for --seq-len (what its studies do for
their first 8 trials, before TPE takes over; a device call of 6 trials a layer never leaves
them). Each runs what a trial runs on a layer (tune/layer.py): `pbs_plan` and the attend with
LSE, then the timed call, `pbs_attention` (no LSE), through the Triton interpreter on a small
input (2 query heads, 1 KV head, D 64, 2048 tokens: every segment of the space fits twice), and
every launch's constexpr values and warps / stages are recorded per kernel. Prints the running
count of distinct variants per kernel, then the selection kernel's autotuning keys: on a GPU a
new key compiles all 4 warp counts, so compilations = variants + 3 x keys. Shape-dependent
constexprs (the selection kernel's row width) take other values at the real length, but one per
block size there as here. The split final rows (above 32 blocks) add one combine variant per
block size at the real length, which 2048 tokens do not reach.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import inspect
import os
import time

os.environ["TRITON_INTERPRET"] = "1"  # before any kernel is defined

import optuna  # noqa: E402
import torch  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

from pbs_cli.commands._options import parse_length  # noqa: E402
from pbs_cli.workflows.tune.study import SearchSpace  # noqa: E402
from pbs_kernels.attention import pbs_attention, pbs_plan  # noqa: E402
from pbs_kernels.ops.select.fused import _select_kernel  # noqa: E402

N_CPU = 2048


def constexpr_names(fn) -> list[str]:
    """A @triton.jit function's constexpr parameters, in order."""
    return [n for n, p in inspect.signature(fn).parameters.items()
            if p.annotation is tl.constexpr or str(p.annotation).endswith("constexpr")]


@contextlib.contextmanager
def record_launches():
    """While open, the interpreter's launches keep every kernel's (constexprs, warps, stages)."""
    seen: dict[str, set] = collections.defaultdict(set)
    run = InterpretedFunction.run

    def recording(self, *args, grid, warmup, **kwargs):
        params = inspect.signature(self.fn).parameters
        bound = {**dict(zip(self.arg_names, args)), **kwargs}
        key = tuple((n, bound.get(n, params[n].default)) for n in constexpr_names(self.fn))
        seen[self.fn.__name__].add(key + (kwargs.get("num_warps"), kwargs.get("num_stages")))
        return run(self, *args, grid=grid, warmup=warmup, **kwargs)

    InterpretedFunction.run = recording
    try:
        yield seen
    finally:
        InterpretedFunction.run = run


def main(argv: list[str] | None = None) -> dict:
    """Prints the trials' running counts; returns the last counts (variants per kernel, keys)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=48, help="48: 6 trials on each of 8 layers")
    ap.add_argument("--seq-len", default="128k", help="the length whose search space is sampled")
    args = ap.parse_args(argv)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space = SearchSpace.for_length(parse_length(args.seq_len))
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, h, N_CPU, 64, generator=g) for h in (2, 1, 1))
    with record_launches() as seen:
        return run_trials(study, space, args.trials, q, k, v, seen)


def run_trials(study, space, trials: int, q, k, v, seen: dict) -> dict:
    t0 = time.time()
    for i in range(trials):
        trial = study.ask()
        config = space.suggest(trial)
        study.tell(trial, 0.0)
        if 2 * config.segment_size > N_CPU:
            raise SystemExit(f"segment {config.segment_size} does not fit twice in {N_CPU} tokens")
        plan = pbs_plan(q, k, v, backend="triton", **config.plan_kwargs())
        plan.attend(q, return_lse=True)
        pbs_attention(q, k, v, backend="triton", min_seq_len=0, **config.plan_kwargs())
        per = " ".join(f"{name.strip('_').removesuffix('_kernel')} {len(s)}" for name, s in sorted(seen.items()))
        print(f"trial {i + 1:3d}: {sum(len(s) for s in seen.values()):3d} variants ({per}) "
              f"[{time.time() - t0:.0f} s]", flush=True)
    names = constexpr_names(_select_kernel.fn.fn)
    at = [names.index(name) for name in _select_kernel.keys]
    keys = {tuple(v[i][1] for i in at) for v in seen["_select_kernel"]}
    total = sum(len(s) for s in seen.values())
    key_names = ", ".join(_select_kernel.keys)
    print(f"selection kernel: {len(keys)} autotuning keys ({key_names}); on a GPU "
          f"{total} variants + 3 x {len(keys)} = {total + 3 * len(keys)} compilations", flush=True)
    return {"variants": {name: len(v) for name, v in seen.items()}, "select_keys": len(keys)}


if __name__ == "__main__":
    main()
