"""How many K/V tile reads of the attend kernel would go to HBM, in its launch order and in two
that put a KV head's query heads side by side (GQA sharing through L2): a model of L2, run on
the CPU (issue 22, item 5; BENCHMARKS section 21). Not a measurement of a GPU; section 12
measured one of the orders on an H200, which checks the model.

    python scripts/cpu_l2_order.py [--shapes 32/8/128/32k,...] [--l2-mib 50,25] [--resident N]

Per shape: the kept tiles of the bench workload (`make_workload`, `pbs_plan` with the defaults:
block 128, segment 256, tau 0.9, torch backend, fp32), then the programs of `attend_triton` (the
final rows split as `final_splits` splits them) in three orders:
  block  the kernel's: grid (rows, B x HQ), a head's rows one after another, longest first;
  heads  section 12's "KV head's query heads side by side": every head of a row side by side,
         a KV head's G query heads next to each other, rows longest first (1-11% slower there);
  kv     a KV head's G query heads side by side row by row, KV heads in turn (not timed).
The model: `--resident` programs run at once (default: one per SM of an H200's 132 at D 128, two
at D 64, from their shared memory), each reading one K/V tile per step in turn; a program that
ends is replaced by the next in launch order; L2 is least-recently-used over whole K/V tiles
(2 b D bytes each of K and V, bf16). H100/H200 L2 is 50 MiB in two halves, so 25 MiB is the case
where the halves hold copies of the same tiles.

Printed per order: the share of tile reads that miss L2, and the HBM bandwidth those misses need
at the kernel's measured 396 TFLOP/s (the issue's figure at 32K; the H200 has 4.8 TB/s). The
lower bound ("compulsory") reads each KV head's distinct tiles once.
"""
from __future__ import annotations

import argparse
import time
from collections import OrderedDict

import torch

from pbs_cli.commands._options import parse_length
from pbs_kernels.attention import pbs_plan
from pbs_kernels.ops.attend.fwd import final_splits
from pbs_kernels.workloads import make_workload

RATE_TFLOPS = 396.0  # the attend kernel's rate at 32K on the H200 (issue 22)
ORDERS = ("block", "heads", "kv")


def programs(blocks, G: int, N: int) -> dict[tuple[int, int], tuple[int, list]]:
    """(kv head id, tile list) per program of the kernel's grid, by (bh, pid) where pid follows
    the kernel's split numbering (the final rows' shares first, then the rows, longest first)."""
    idx, n_off, n_tot = blocks.idx, blocks.n_off, blocks.n_total
    B, HQ, nqb = n_tot.shape
    b, nkb = blocks.block_size, blocks.num_blocks
    nfin = min(nqb, 2 if N % b else 1)  # as attend_triton: two final rows when N ends inside a block
    nsplit = final_splits(nkb, b, None)
    out = {}
    for bh in range(B * HQ):
        i_b, i_h = divmod(bh, HQ)
        kv = i_b * (HQ // G) + i_h // G
        for pid in range(nqb + nfin * (nsplit - 1)):
            if pid < nfin * nsplit:
                s, row = pid % nsplit, nqb - 1 - pid // nsplit
                off, tot = int(n_off[i_b, i_h, row]), int(n_tot[i_b, i_h, row])
                lo, hi = s * off // nsplit, (s + 1) * off // nsplit
                ids = idx[i_b, i_h, row, lo:hi].tolist() + (idx[i_b, i_h, row, off:tot].tolist()
                                                            if s == nsplit - 1 else [])
            else:
                row = nqb - 1 - (pid - nfin * (nsplit - 1))
                ids = idx[i_b, i_h, row, :int(n_tot[i_b, i_h, row])].tolist()
            out[bh, pid] = (kv, ids)
    return out


def launch_order(progs: dict, order: str, BHQ: int, G: int, rows: int) -> list:
    """The programs in launch order (see the module's docstring; bh = kv head x G + g)."""
    if order == "block":
        return [progs[bh, pid] for bh in range(BHQ) for pid in range(rows)]
    if order == "heads":
        return [progs[bh, pid] for pid in range(rows) for bh in range(BHQ)]
    return [progs[kvh * G + g, pid] for kvh in range(BHQ // G) for pid in range(rows) for g in range(G)]


def misses(order: list, resident: int, capacity: int) -> tuple[int, int]:
    """(tile reads, L2 misses) with `resident` programs stepping one tile each in turn."""
    lru: OrderedDict = OrderedDict()
    queue = iter(order)
    active = []
    for _ in range(resident):
        p = next(queue, None)
        if p is None:
            break
        active.append([p[0], iter(p[1])])
    reads = miss = 0
    while active:
        nxt = []
        for kv, it in active:
            t = next(it, None)
            while t is None:
                p = next(queue, None)
                if p is None:
                    break
                kv, it = p[0], iter(p[1])
                t = next(it, None)
            if t is None:
                continue
            reads += 1
            key = (kv, t)
            if key in lru:
                lru.move_to_end(key)
            else:
                miss += 1
                lru[key] = None
                if len(lru) > capacity:
                    lru.popitem(last=False)
            nxt.append([kv, it])
        active = nxt
    return reads, miss


def parse_shape(s: str) -> tuple[int, int, int, int]:
    """HQ/H/D/N, N as `pbs bench --seq-len` takes it (32k, 131072)."""
    hq, h, d, n = s.split("/")
    return int(hq), int(h), int(d), parse_length(n)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="32/8/128/32k,8/1/128/32k,9/3/64/32k,32/8/128/128k,8/1/128/128k")
    ap.add_argument("--l2-mib", default="50,25")
    ap.add_argument("--resident", type=int, default=0, help="programs at once (0: 132 at D 128, 264 at D 64)")
    args = ap.parse_args()
    sizes = [float(x) for x in args.l2_mib.split(",")]
    print(f"{'shape':<16}{'L2 MiB':>7}{'order':>7}{'reads':>10}{'miss %':>8}{'TB/s':>7}")
    for spec in args.shapes.split(","):
        HQ, H, D, N = parse_shape(spec)
        t0 = time.time()
        q, k, v = make_workload(N, HQ, H, D, device="cpu", dtype=torch.float32, seed=0)
        blocks = pbs_plan(q, k, v, backend="torch").blocks
        del q, k, v
        G, b = HQ // H, blocks.block_size
        progs = programs(blocks, G, N)
        rows = 1 + max(pid for _, pid in progs)
        tile_bytes = 2 * b * D * 2
        reads = sum(len(ids) for _, ids in progs.values())
        # TB/s that n tile loads need while the reads' FLOPs run at RATE_TFLOPS
        need = lambda n: n * tile_bytes * RATE_TFLOPS / (reads * 4 * b * b * D)  # noqa: E731
        resident = args.resident or (132 if D > 64 else 264)
        compulsory = len({(kv, t) for kv, ids in progs.values() for t in ids})
        for mib in sizes:
            cap = int(mib * 2 ** 20 // tile_bytes)
            for order in ORDERS:
                _, miss = misses(launch_order(progs, order, HQ, G, rows), resident, cap)
                print(f"{spec:<16}{mib:>7.0f}{order:>7}{reads:>10}{100 * miss / reads:>8.1f}{need(miss):>7.2f}",
                      flush=True)
        print(f"{spec:<16}{'':>7}{'bound':>7}{reads:>10}{100 * compulsory / reads:>8.1f}{need(compulsory):>7.2f}"
              f"   ({time.time() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
