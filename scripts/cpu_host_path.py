"""The host (Python) cost of a replayed `pbs_attention(..., graph=True)` call, on the CPU: a proxy
for issue 22's "host cost per call <= 60 us" (BENCHMARKS.md section 18).

A stand-in CUDA graph whose replay does nothing, no-op streams, and `why_eager` answering as it
would for CUDA tensors let the graph path run on CPU tensors; the input copies and the output
clone are real CPU ops on small tensors (2 query / 1 KV heads, 72 tokens, D 64, bf16, blocks of
32, segments of 64), i.e. dispatcher cost, not bandwidth. What is timed is everything a replayed call does on the host
except the CUDA side: on a GPU each copy, the replay and the clone also pay a launch (~5 us
each), so the GPU figure is higher (`python scripts/gpu_fixed_cost.py --quick` measures it).

Rows, each timed with time.perf_counter_ns over many calls (best and median of rounds):
  pbs_attention  the whole public call up to and including PbsGraphs.run's bookkeeping
  PbsGraphs.run  the replay alone: input copies, replay (no-op), output clone
  HF forward     `pbs_attention_forward` (transformers' per-layer call, graph="auto")
for three code trees / switches in one run: PBS_LEGACY_HOST=1 (the host path before issue 22),
main at `--base` (default the commit this branch forked from, extracted with `git archive` into
a temporary folder and run in a subprocess), and this tree.

    python scripts/cpu_host_path.py                  # ~1 min on 2 cores
    python scripts/cpu_host_path.py --base 836c44c --calls 3000 --rounds 7
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import types
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
# Small enough that a copy costs its dispatch, not its bytes (18 KB for q); N > segment_size: the
# sparse pipeline's key. The Python path does not depend on the sizes.
SHAPE = dict(B=1, HQ=2, H=1, N=72, D=64)
SETTINGS = dict(block_size=32, segment_size=64, threshold=0.9)
DEFAULT_BASE = "836c44c"  # main when this script was written (issue 22, before the fast path)


class NoOpGraph:
    """torch.cuda.CUDAGraph's stand-in. `body` (set by `stand_ins(replaying=True)`) re-runs the
    captured call on the capture's buffers, as a real replay would; None: replay does nothing."""

    def __init__(self):
        self.body = None

    def replay(self):
        if self.body is not None:
            self.body()


class NoOpStream:
    def __init__(self, device=None):
        self.device = device

    def wait_stream(self, other):
        pass


@contextlib.contextmanager
def stand_ins(replaying: bool):
    """The CUDA graph path on CPU tensors (restored on exit)."""
    from pbs_kernels import attention, graphs

    real = dict(CUDAGraph=torch.cuda.CUDAGraph, graph=torch.cuda.graph, Stream=torch.cuda.Stream,
                current_stream=torch.cuda.current_stream, stream=torch.cuda.stream)
    real_why, real_capture, real_default = attention.why_eager, graphs.PbsGraphs._capture, graphs._DEFAULT

    def why_eager_before(q, k, v, backend, *, return_stats, cache, auto=False):
        """why_eager_on_device for a --base tree that predates it: why_eager's checks in its
        order, as for CUDA tensors (no open capture)."""
        if backend == "torch":
            return "torch backend"
        if return_stats:
            return "statistics are read on the host"
        if cache is not None:
            return "a prefix cache is updated on the host"
        if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
            return "gradients"
        if auto and not graphs.auto_worth_it(q):
            return "graph='auto' and a large call"
        return None

    def capture(self, key, fn, inputs):
        entry = real_capture(self, key, fn, inputs)
        if entry is not None and replaying:
            entry.graph.body = lambda: entry.out.copy_(fn(*entry.inputs))
        return entry

    torch.cuda.CUDAGraph = NoOpGraph
    torch.cuda.graph = lambda g, **kw: contextlib.nullcontext()
    torch.cuda.Stream = NoOpStream
    torch.cuda.current_stream = lambda device=None: NoOpStream(device)
    torch.cuda.stream = lambda s: contextlib.nullcontext()
    attention.why_eager = getattr(graphs, "why_eager_on_device", why_eager_before)
    graphs.PbsGraphs._capture = capture
    graphs._DEFAULT = graphs.PbsGraphs()
    try:
        yield
    finally:
        for name, fn in real.items():
            setattr(torch.cuda, name, fn)
        attention.why_eager, graphs.PbsGraphs._capture, graphs._DEFAULT = real_why, real_capture, real_default


def inputs(seed: int, hf: bool = False):
    """q, k, v in pbs_attention's layout [B, heads, N, D]; `hf`: as transformers passes them
    (transposed views of [B, N, heads, D] projections)."""
    g = torch.Generator().manual_seed(seed)
    B, HQ, H, N, D = (SHAPE[x] for x in ("B", "HQ", "H", "N", "D"))
    out = []
    for heads in (HQ, H, H):
        t = torch.randn(B, N, heads, D, generator=g).to(torch.bfloat16)
        out.append(t.transpose(1, 2) if hf else t.transpose(1, 2).contiguous())
    return out


def hf_module():
    """A decoder layer's attention module as pbs_attention_forward sees it, bound to a profile
    whose layers all run PBS (min_seq_len 0), graph="auto" (apply_profile's default)."""
    from pbs_kernels.integrations.hf._common import _STATE_ATTR
    from pbs_kernels.integrations.hf.forward import _State
    from pbs_kernels.profile import LayerConfig, PbsProfile

    state = _State(PbsProfile(defaults=LayerConfig(**SETTINGS, min_seq_len=0)), previous=None)
    return types.SimpleNamespace(layer_idx=0, is_causal=True, training=False, **{_STATE_ATTR: state})


def check() -> bool:
    """Replays (a stand-in graph that re-runs the capture) on fresh inputs equal eager calls, for
    pbs_attention and the HF forward."""
    from pbs_kernels import pbs_attention
    from pbs_kernels.integrations.hf.forward import pbs_attention_forward

    ok = True
    with stand_ins(replaying=True), torch.no_grad():
        module = hf_module()
        for seed in range(4):
            q, k, v = inputs(seed)
            ok &= torch.equal(pbs_attention(q, k, v, graph=True, **SETTINGS), pbs_attention(q, k, v, **SETTINGS))
            qh, kh, vh = inputs(seed, hf=True)
            got, _ = pbs_attention_forward(module, qh, kh, vh, None, scaling=SHAPE["D"] ** -0.5)
            want = pbs_attention(qh, kh, vh, scale=SHAPE["D"] ** -0.5, **SETTINGS).transpose(1, 2)
            ok &= torch.equal(got, want)
    return bool(ok)


def per_call_us(fn, calls: int, rounds: int) -> dict:
    for _ in range(min(200, calls)):
        fn()
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter_ns()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter_ns() - t0) / calls / 1e3)
    return dict(best=min(times), median=statistics.median(times))


def measure(calls: int, rounds: int) -> dict:
    """Per-call host us of each row, for this process's pbs_kernels, under both host switches."""
    from pbs_kernels import _host, pbs_attention
    from pbs_kernels.graphs import PbsGraphs
    from pbs_kernels.integrations.hf.forward import pbs_attention_forward

    q, k, v = inputs(0)
    qh, kh, vh = inputs(1, hf=True)
    scale = SHAPE["D"] ** -0.5
    found = {}
    for legacy in (True, False):
        _host.LEGACY_HOST = legacy
        with stand_ins(replaying=False), torch.no_grad():
            module = hf_module()
            g = PbsGraphs()
            g.run("key", lambda *t: t[0] * 1, (q, k, v, None))  # captured: every later call replays
            row = {"pbs_attention": per_call_us(lambda: pbs_attention(q, k, v, graph=True, **SETTINGS), calls, rounds),
                   "PbsGraphs.run": per_call_us(lambda: g.run("key", None, (q, k, v, None)), calls, rounds),
                   "HF forward": per_call_us(lambda: pbs_attention_forward(module, qh, kh, vh, None, scaling=scale),
                                             calls, rounds)}
        found["legacy" if legacy else "default"] = row
    _host.LEGACY_HOST = False
    return found


def base_tree(rev: str, into: Path) -> Path:
    """`rev`'s kernels/ folder extracted under `into` (git archive)."""
    blob = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "kernels"], check=True, capture_output=True).stdout
    path = into / "tree.tar"
    path.write_bytes(blob)
    with tarfile.open(path) as tar:
        tar.extractall(into, filter="data")
    return into / "kernels"


def show(rows: list) -> None:
    """One row per tree: host ns per call (whole ns: the us differ by a few), best / median."""
    names = ("pbs_attention", "PbsGraphs.run", "HF forward")
    print(f"{'host ns per replayed call':<32}" + "".join(f"{n:>15}" for n in names))
    print("  (best / median of rounds)")
    for label, r in rows:
        print(f"{label:<32}" + "".join(f"{r[n]['best'] * 1e3:>8.0f} /{r[n]['median'] * 1e3:>6.0f}" for n in names))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default=DEFAULT_BASE, help="the commit to compare with ('' to skip)")
    ap.add_argument("--calls", type=int, default=2000, help="calls per timed round")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--json-only", action="store_true", help=argparse.SUPPRESS)  # the base tree's subprocess
    ap.add_argument("--out", default=os.environ.get("OUT"), help="folder for cpu_host_path.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    ok = check()
    found = measure(args.calls, args.rounds)
    if args.json_only:
        print(json.dumps(dict(ok=ok, rows=found)))
        return 0
    if not ok:
        print("cpu_host_path: a replay differs from the eager call; the timings would mean nothing", file=sys.stderr)
        return 1
    rows = [("PBS_LEGACY_HOST=1 (pre-issue 22)", found["legacy"])]
    base = None
    if args.base:
        with tempfile.TemporaryDirectory() as tmp:
            kernels = base_tree(args.base, Path(tmp))
            env = {**os.environ, "PYTHONPATH": str(kernels)}
            res = subprocess.run([sys.executable, __file__, "--json-only", "--calls", str(args.calls),
                                  "--rounds", str(args.rounds)], env=env, capture_output=True, text=True, check=True)
            base = json.loads(res.stdout.strip().splitlines()[-1])
        if not base["ok"]:
            print(f"cpu_host_path: at {args.base} a replay differs from the eager call", file=sys.stderr)
            return 1
        rows.append((f"base {args.base}", base["rows"]["default"]))
    rows.append(("this tree", found["default"]))
    print(f"CPU proxy: {SHAPE['HQ']}/{SHAPE['H']} heads, N {SHAPE['N']}, D {SHAPE['D']}, bf16, no-op replay, "
          f"torch {torch.__version__}")
    show(rows)
    print("A GPU adds a launch per copy, replay, clone: scripts/gpu_fixed_cost.py --quick")
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        data = dict(shape=SHAPE, settings=SETTINGS, torch=torch.__version__, calls=args.calls, rounds=args.rounds,
                    rows={label: r for label, r in rows})
        (Path(args.out) / "cpu_host_path.json").write_text(json.dumps(data, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
