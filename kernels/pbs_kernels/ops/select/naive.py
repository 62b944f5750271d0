"""Plain-torch reference of block selection (docs/design.md, "The method", step 2)."""
from __future__ import annotations

import torch

from ...blocks import BlockList, block_geometry, key_block_stats, pool_blocks


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
