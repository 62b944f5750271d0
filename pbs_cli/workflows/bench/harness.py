"""What every bench case measures with: the tolerances a row is gated on, the work of dense and
sparse attention in flops, and the sampled-row kernel error. The prompt case (workflow.py) and
the chunk and varlen cases (serving.py) both import it, so neither imports the other's module
for a constant (that was the package's one import cycle, issue 20)."""
from __future__ import annotations

from pbs_kernels.metrics import output_error as rel_error

DENSE_TOL = 2e-2  # a dense backend vs the fp32 reference, bf16/fp16
KERNEL_TOL = {"fp32": 1e-3, "low": 2e-2}
N_CHECK_BLOCKS = 6  # query blocks sampled for kernel_error


def causal_flops(batch: int, heads: int, head_dim: int, n: int) -> float:
    """Exact dense causal attention work: 4*D flops per allowed (query, key) pair."""
    return 2.0 * batch * heads * head_dim * n * (n + 1)


def tile_flops(tiles: int, block_size: int, head_dim: int) -> float:
    """Work of `tiles` computed b x b tiles (summed over batch and query heads)."""
    return 4.0 * block_size * block_size * head_dim * tiles


def plan_flops(blocks, head_dim: int, segment_size: int, vertical_keys: int) -> float:
    """Work of a plan: its computed tiles, plus 4 * b * D flops per (query row, vertical key)."""
    b = blocks.block_size
    flops = tile_flops(int(blocks.tiles_per_head().sum()), b, head_dim)
    if vertical_keys:
        flops += 4.0 * b * head_dim * float(blocks.vertical_keys_per_head(segment_size, vertical_keys).sum())
    return flops


def check_blocks(num_blocks: int, block_size: int, segment_size: int, count: int = N_CHECK_BLOCKS) -> list[int]:
    """Query blocks sampled for kernel_error: spread over the sequence, the last one included
    (it keeps the most tiles), none in the first segment (dense there anyway)."""
    first = min(num_blocks - 1, segment_size // block_size)
    if num_blocks - first <= count:
        return list(range(first, num_blocks))
    step = (num_blocks - 1 - first) / (count - 1)
    return sorted({first + round(i * step) for i in range(count)})


def kernel_error(out, ref_rows, rows) -> float:
    return rel_error(out[:, :, rows], ref_rows)
