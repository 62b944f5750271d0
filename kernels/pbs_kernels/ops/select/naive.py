"""Plain-torch reference of block selection (docs/design.md, "The method", step 2)."""
from __future__ import annotations

import torch

from ...blocks import (BlockList, block_geometry, block_representatives, estimated_block_logits,
                       key_block_stats, pool_blocks)


def topp_keep(p: torch.Tensor, threshold) -> torch.Tensor:
    """Smallest set of entries per row whose mass reaches `threshold` (ties: lower index first).

    p: [..., M] probabilities (rows may be all zero) -> bool [..., M]. `threshold` is a float or
    a tensor broadcasting against [..., 1] (one threshold per row; <= 0 keeps nothing).
    """
    if not isinstance(threshold, torch.Tensor) and threshold >= 1.0:
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


def own_segment_share(s: torch.Tensor, earlier: torch.Tensor, own: torch.Tensor) -> torch.Tensor:
    """Estimated share of a row's causal mass on its own segment's visible blocks, from the
    estimated logits s [..., NKB] and the masks of earlier [..., NKB] and own-segment blocks."""
    both = earlier | own
    m = s.masked_fill(~both, float("-inf")).amax(-1, keepdim=True)
    e = torch.exp(s - torch.where(torch.isfinite(m), m, torch.zeros_like(m))).masked_fill(~both, 0.0)
    return (e * own).sum(-1) / e.sum(-1).clamp_min(1e-30)


def earlier_threshold(threshold: float, p_own: torch.Tensor) -> torch.Tensor:
    """Threshold over the total mass turned into one over the earlier segments' mass: the earlier
    blocks must add (threshold - p_own) of the row, which is that share of the earlier mass
    (1 - p_own). <= 0 (the own segment alone reaches it) keeps no earlier block."""
    return (threshold - p_own) / (1.0 - p_own).clamp_min(1e-30)


def select_blocks_naive(q, k_perm, pos, *, block_size: int, segment_size: int, threshold: float,
                        scale: float, estimator: str = "mean", threshold_mass: str = "earlier") -> BlockList:
    """q: [B, HQ, N, D]; k_perm: [B, H, N, D] (permuted); pos: [B, H, N] original positions.
    estimator / threshold_mass: see `pbs_kernels.limits.ESTIMATORS` and `THRESHOLD_MASS`."""
    B, HQ, N, D = q.shape
    H = k_perm.shape[1]
    G = HQ // H
    nb, seg, last_q = block_geometry(N, block_size, segment_size, q.device)

    q_pool = pool_blocks(q, block_size)
    k_pool, min_pos = key_block_stats(k_perm, pos, block_size)  # min_pos: [B, H, NKB]
    reps, logw = block_representatives(k_perm, k_pool, block_size, estimator)
    # [B, HQ, NQB, NKB] estimated log-mass of each tile
    s_all = estimated_block_logits(q_pool, reps, logw, scale)
    earlier = seg[None, :] < seg[:, None]
    s = s_all.masked_fill(~earlier, float("-inf"))
    has_earlier = earlier.any(-1)
    p = torch.softmax(torch.where(has_earlier[:, None], s, torch.zeros_like(s)), dim=-1)
    p = torch.where(earlier, p, torch.zeros_like(p))

    # Own segment: every block that holds a key at or before the query block's last position.
    same = seg[None, :] == seg[:, None]
    diag = same & (min_pos[:, :, None, :] <= last_q[:, None])  # [B, H, NQB, NKB]
    diag = diag.repeat_interleave(G, dim=1)

    if threshold_mass == "total" and threshold < 1.0:
        tau = earlier_threshold(threshold, own_segment_share(s_all, earlier.expand_as(diag), diag))
        off = topp_keep(p, tau[..., None]) & earlier
    elif threshold_mass in ("earlier", "total"):
        off = topp_keep(p, threshold) & earlier
    else:
        raise ValueError(f"select_blocks: unknown threshold_mass {threshold_mass!r}")

    # The sink: the block that holds original token 0, for every query block past segment 0.
    sink = (min_pos == 0).repeat_interleave(G, dim=1)[:, :, None, :] & earlier
    off = off | sink
    return compact(off, diag, block_size)
