"""Plain-torch reference of block selection (DESIGN.md §1, step 2)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .._common import cdiv


@dataclass
class BlockList:
    """Kept key blocks per query block, compact (never a dense N x N mask).

    idx:     [B, HQ, NQB, W] int32 key-block indices; for each query block the first n_off are
             blocks of earlier segments (no mask needed), then n_total - n_off blocks of the
             query's own segment (masked by original positions); the rest is unused.
    n_off:   [B, HQ, NQB] int32
    n_total: [B, HQ, NQB] int32
    """

    idx: torch.Tensor
    n_off: torch.Tensor
    n_total: torch.Tensor
    block_size: int

    @property
    def num_blocks(self) -> int:
        return self.idx.shape[2]

    def tiles_per_head(self) -> torch.Tensor:
        """Computed tiles per (batch, head): [B, HQ] int64."""
        return self.n_total.sum(dim=-1, dtype=torch.int64)

    def density_per_head(self) -> torch.Tensor:
        """Computed tiles / causal tiles, mean over the batch: [HQ] float32."""
        nb = self.num_blocks
        causal = nb * (nb + 1) / 2
        return (self.tiles_per_head().float() / causal).mean(dim=0)

    def dense_mask(self) -> torch.Tensor:
        """[B, HQ, NQB, NKB] bool of kept tiles (for tests and analysis on small inputs)."""
        B, HQ, nb, W = self.idx.shape
        valid = torch.arange(W, device=self.idx.device) < self.n_total[..., None]
        mask = torch.zeros(B, HQ, nb, nb + 1, dtype=torch.bool, device=self.idx.device)
        idx = torch.where(valid, self.idx.long(), nb)
        mask.scatter_(3, idx, True)
        return mask[..., :nb]


def pool_blocks(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """Mean over each block of `block_size` rows (a partial last block averages its valid rows).

    x: [B, H, N, D] -> [B, H, NB, D] float32.
    """
    B, H, N, D = x.shape
    n_full = N // block_size
    # Sum in fp32 straight from the 16-bit input: an fp32 copy of Q would cost more than the
    # whole selection at 128K tokens.
    sums = x[:, :, : n_full * block_size].reshape(B, H, n_full, block_size, D).sum(dim=3, dtype=torch.float32)
    counts = torch.full((cdiv(N, block_size),), float(block_size), device=x.device)
    if N % block_size:
        tail = x[:, :, n_full * block_size:].sum(dim=2, keepdim=True, dtype=torch.float32)
        sums = torch.cat([sums, tail], dim=2)
        counts[-1] = N % block_size
    return sums / counts[:, None]


def key_block_stats(k_perm: torch.Tensor, pos: torch.Tensor, block_size: int):
    """What selection needs from the (permuted) keys: the mean key of each block [B, H, NB, D]
    float32 and the earliest original position each block holds [B, H, NB] int32. The Triton
    gather computes the same while it permutes (`gather_keys_triton(..., pool_block=b)`)."""
    B, H, N = pos.shape
    nb = cdiv(N, block_size)
    pos_blk = torch.nn.functional.pad(pos, (0, nb * block_size - N), value=N).reshape(B, H, nb, block_size)
    return pool_blocks(k_perm, block_size), pos_blk.amin(-1).to(torch.int32).contiguous()


def block_geometry(N: int, block_size: int, segment_size: int, device):
    """Segment of each block and the last query position of each block."""
    nb = cdiv(N, block_size)
    blocks = torch.arange(nb, device=device)
    seg = blocks // (segment_size // block_size)
    last_q = torch.clamp((blocks + 1) * block_size - 1, max=N - 1)
    return nb, seg, last_q


def topp_keep(p: torch.Tensor, threshold: float) -> torch.Tensor:
    """Smallest set of entries per row whose mass reaches `threshold` (ties: lower index first).

    p: [..., M] probabilities (rows may be all zero) -> bool [..., M].
    """
    if threshold >= 1.0:
        # Everything, including blocks whose probability underflows to 0: threshold 1.0 is dense.
        return torch.ones_like(p, dtype=torch.bool)
    sorted_p, order = torch.sort(p, dim=-1, descending=True, stable=True)
    before = torch.cumsum(sorted_p, dim=-1) - sorted_p
    keep_sorted = (before < threshold) & (sorted_p > 0)
    keep = torch.zeros_like(keep_sorted)
    keep.scatter_(-1, order, keep_sorted)
    return keep


def compact(off: torch.Tensor, diag: torch.Tensor, block_size: int) -> BlockList:
    """Turn [B, HQ, NQB, NKB] masks into a BlockList (earlier-segment blocks first)."""
    B, HQ, nb, _ = off.shape
    n_off = off.sum(-1)
    slot_off = torch.cumsum(off, -1) - 1
    slot_diag = n_off[..., None] + torch.cumsum(diag, -1) - 1
    slot = torch.where(off, slot_off, torch.where(diag, slot_diag, nb))
    idx = torch.zeros(B, HQ, nb, nb + 1, dtype=torch.int32, device=off.device)
    src = torch.arange(nb, dtype=torch.int32, device=off.device).expand(B, HQ, nb, nb)
    idx.scatter_(3, slot, src)
    return BlockList(
        idx=idx[..., :nb].contiguous(),
        n_off=n_off.to(torch.int32),
        n_total=(n_off + diag.sum(-1)).to(torch.int32),
        block_size=block_size,
    )


def select_blocks_naive(q, k_perm, pos, *, block_size: int, segment_size: int, threshold: float,
                        scale: float) -> BlockList:
    """q: [B, HQ, N, D]; k_perm: [B, H, N, D] (permuted); pos: [B, H, N] original positions."""
    B, HQ, N, D = q.shape
    H = k_perm.shape[1]
    G = HQ // H
    nb, seg, last_q = block_geometry(N, block_size, segment_size, q.device)

    q_pool = pool_blocks(q, block_size).reshape(B, H, G, nb, D)
    k_pool, min_pos = key_block_stats(k_perm, pos, block_size)  # min_pos: [B, H, NKB]
    # [B, HQ, NQB, NKB]
    s = (torch.einsum("bhgid,bhjd->bhgij", q_pool, k_pool) * scale).reshape(B, HQ, nb, nb)
    earlier = seg[None, :] < seg[:, None]
    s = s.masked_fill(~earlier, float("-inf"))
    has_earlier = earlier.any(-1)
    p = torch.softmax(torch.where(has_earlier[:, None], s, torch.zeros_like(s)), dim=-1)
    p = torch.where(earlier, p, torch.zeros_like(p))
    off = topp_keep(p, threshold) & earlier

    # The sink: the block that holds original token 0, for every query block past segment 0.
    sink = (min_pos == 0).repeat_interleave(G, dim=1)[:, :, None, :] & earlier
    off = off | sink

    # Own segment: every block that holds a key at or before the query block's last position.
    same = seg[None, :] == seg[:, None]
    diag = same & (min_pos[:, :, None, :] <= last_q[:, None])  # [B, H, NQB, NKB]
    diag = diag.repeat_interleave(G, dim=1)
    return compact(off, diag, block_size)
