"""Plain-torch reference of block selection (docs/design.md, "The method", step 2)."""
from __future__ import annotations

import torch

from ...blocks import (BlockList, block_representatives, estimated_block_logits, key_block_max_pos,
                       key_block_stats, pool_query_blocks, query_geometry)
from ...settings import PbsSettings
from .._common import default_scale


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


# The "head" rule's cut lies on a grid of HEAD_BINS_PER_OCTAVE steps per halving of a tile's share
# p of its row's earlier mass: bin j holds 2^-(j+1)/4 < p <= 2^-j/4, and the last bin everything
# smaller (p below 2^-24 = 6e-8; a 128K row has 1024 tiles, so an even share is 1e-3). The rule
# keeps whole bins, so it keeps at most one bin's tiles more than an exact cut would; the Triton
# kernel sums each row's bins and the head's cut comes from their sum (no sort of the head's tiles).
HEAD_BINS_PER_OCTAVE = 4
HEAD_BINS = 96


def head_bins(p: torch.Tensor) -> torch.Tensor:
    """The grid bin (int64, 0 .. HEAD_BINS - 1) of each share p in (0, 1]."""
    x = torch.floor(-torch.log2(p.clamp_min(1e-38)) * HEAD_BINS_PER_OCTAVE)
    return x.clamp(0, HEAD_BINS - 1).long()


def head_cut(hist: torch.Tensor, threshold: float) -> torch.Tensor:
    """[..., HEAD_BINS] mass per bin, summed over a head's rows -> [...] int32: the last bin to
    keep, the first at which the mass of bins 0..j reaches `threshold` of the head's earlier mass
    (-1 for a head with no earlier mass: it keeps nothing)."""
    cum = torch.cumsum(hist, dim=-1)
    need = float(threshold) * cum[..., -1:]
    return ((cum < need).sum(-1) - (cum[..., -1] <= 0).long()).clamp(max=HEAD_BINS - 1).to(torch.int32)


def head_keep(p: torch.Tensor, threshold) -> torch.Tensor:
    """The "head" rule: p [B, HQ, NQB, NKB], each row its tiles' shares of the row's estimated
    earlier mass (rows with no earlier tile all zero) -> bool mask. One cut per (batch, head):
    keep the tiles of the largest shares, across all the head's rows, until their mean over the
    rows that have earlier tiles reaches `threshold` (whole grid bins, see HEAD_BINS)."""
    if threshold >= 1.0:
        return torch.ones_like(p, dtype=torch.bool)
    B, HQ = p.shape[:2]
    bins = head_bins(p)
    hist = torch.zeros(B, HQ, HEAD_BINS, dtype=p.dtype, device=p.device)
    hist.scatter_add_(2, bins.reshape(B, HQ, -1), p.reshape(B, HQ, -1))
    cut = head_cut(hist, threshold)
    return (bins <= cut[:, :, None, None]) & (p > 0)


def final_rows(last_q: torch.Tensor, end, block_size: int) -> torch.Tensor:
    """Which query blocks hold one of the last `block_size` query positions before `end` (one
    block, or two when the sequence ends inside a block): bool, shaped like `last_q` (each
    block's last query position). Their rows keep every causal tile, whatever the rule.

    Why: those are the rows that produce the answer (the question and the template after it),
    and the rules that pool a threshold over many rows (`head`) or count the own segment
    (`total`) can leave them almost nothing of the earlier segments, where the fact asked for
    lies. On SmolLM2-135M at 4K (scripts/real_model_passkey.py --diagnose 2, one prompt) the head
    rule at tau 0.93 computed 2-19% of the last 16 rows' attention to the pass-key sentence in
    layers 20-24, where those rows attend to it most; the row rule 34-99%. Two rows of N/b tiles are at most
    4 / (N/b + 1) of dense attention's tiles: 12% at 4K with b = 128, under 0.4% at 128K."""
    return last_q >= end - block_size


def compact(off: torch.Tensor, diag: torch.Tensor, block_size: int, q_block0: int = 0,
            masked_off: torch.Tensor | None = None) -> BlockList:
    """Turn [B, HQ, NQB, NKB] masks into a BlockList: unmasked earlier-segment blocks first, then
    `masked_off` (earlier-segment blocks that straddle a sliding window's edge), then `diag`."""
    B, HQ, nqb, nb = off.shape
    if masked_off is None:
        masked_off = torch.zeros_like(off)
    n_off = off.sum(-1)
    n_mid = n_off + masked_off.sum(-1)
    slot_off = torch.cumsum(off, -1) - 1
    slot_mid = n_off[..., None] + torch.cumsum(masked_off, -1) - 1
    slot_diag = n_mid[..., None] + torch.cumsum(diag, -1) - 1
    slot = torch.where(off, slot_off, torch.where(masked_off, slot_mid, torch.where(diag, slot_diag, nb)))
    idx = torch.zeros(B, HQ, nqb, nb + 1, dtype=torch.int32, device=off.device)
    src = torch.arange(nb, dtype=torch.int32, device=off.device).expand(B, HQ, nqb, nb)
    idx.scatter_(3, slot, src)
    return BlockList(
        idx=idx[..., :nb].contiguous(),
        n_off=n_off.to(torch.int32),
        n_total=(n_mid + diag.sum(-1)).to(torch.int32),
        block_size=block_size,
        q_block0=q_block0,
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


def select_blocks_naive(q, k_perm, pos, settings: PbsSettings, *, packed=None) -> BlockList:
    """q: [B, HQ, M, D] (the last M of the N positions); k_perm: [B, H, N, D] (permuted); pos:
    [B, H, N] original positions. From `settings` (`pbs_kernels.settings.PbsSettings`):
    block_size, segment_size, threshold, scale (None: 1/sqrt(D)), window, and estimator /
    threshold_mass (see `pbs_kernels.limits.ESTIMATORS` and `THRESHOLD_MASS`). With a sliding
    `window`, blocks wholly outside every query's window are never kept (nor counted in the mass),
    and earlier-segment blocks that straddle the window's edge go to the masked part of the list.

    packed (a `pbs_kernels.packing.PackedLayout`): a packed batch. q is then [1, HQ, total_q, D]
    in packed rows, k_perm / pos [1, H, n_virtual(, D)] in virtual slots, and the list has one
    row per virtual block: a query block only considers key blocks of its own sequence, its
    sink is the block holding its sequence's first key, a dense sequence's rows keep every
    earlier block, and blocks with no query keep nothing."""
    B, HQ, M, D = q.shape
    H, N = k_perm.shape[1], k_perm.shape[2]
    G = HQ // H
    block_size, segment_size, window = settings.block_size, settings.segment_size, settings.window
    threshold, estimator, threshold_mass = settings.threshold, settings.estimator, settings.threshold_mass
    scale = default_scale(D) if settings.scale is None else settings.scale
    nb = -(-N // block_size)
    seg_k = torch.arange(nb, device=q.device) // (segment_size // block_size)
    if packed is None:
        q0, seg_q, first_q, last_q = query_geometry(N, M, block_size, segment_size, q.device)
        q_pool = pool_query_blocks(q, block_size, N - M)
        k_pool, min_pos = key_block_stats(k_perm, pos, block_size)  # min_pos: [B, H, NKB]
    else:
        from ...blocks import pool_query_blocks_packed
        from ...packing import DENSE, KB0, KEND, QHI, QLO, block_counts, packed_sinks, slot_valid

        q0, seg_q = 0, seg_k
        first_q, last_q = packed.blk[QLO].long(), packed.blk[QHI].long()
        q_pool = pool_query_blocks_packed(q, packed)
        k_pool, min_pos = key_block_stats(k_perm, pos, block_size, slot_valid(pos, packed))
    count = block_counts(packed) if packed is not None and estimator == "top" else None
    reps, logw = block_representatives(k_perm, k_pool, block_size, estimator, count)
    # [B, HQ, NQB, NKB] estimated log-mass of each tile
    s_all = estimated_block_logits(q_pool, reps, logw, scale)
    earlier = (seg_k[None, :] < seg_q[:, None])[None, None]  # [1, 1, NQB, NKB]
    if packed is not None:
        blocks_k = torch.arange(nb, device=q.device)
        earlier = earlier & (blocks_k[None, :] >= packed.blk[KB0].long()[:, None])
    in_window = torch.ones_like(earlier)
    straddle = torch.zeros_like(earlier)
    if window is not None:
        max_pos = key_block_max_pos(pos, block_size).repeat_interleave(G, dim=1)[:, :, None, :]
        mn = min_pos.repeat_interleave(G, dim=1)[:, :, None, :]
        in_window = max_pos > (first_q - window)[:, None]  # some (query, key) pair in the window
        straddle = mn <= (last_q - window)[:, None]  # some pair outside it
    cand = earlier & in_window
    s = s_all.masked_fill(~cand, float("-inf"))
    has_earlier = cand.any(-1, keepdim=True)
    p = torch.softmax(torch.where(has_earlier, s, torch.zeros_like(s)), dim=-1)
    p = torch.where(cand, p, torch.zeros_like(p))

    # Own segment: every block that holds a key at or before the query block's last position.
    same = seg_k[None, :] == seg_q[:, None]
    diag = same & (min_pos[:, :, None, :] <= last_q[:, None])  # [B, H, NQB, NKB]
    diag = diag.repeat_interleave(G, dim=1) & in_window

    if threshold_mass == "total" and threshold < 1.0:
        tau = earlier_threshold(threshold, own_segment_share(s_all, cand.expand_as(diag), diag))
        off = topp_keep(p, tau[..., None]) & cand
    elif threshold_mass in ("earlier", "total"):
        off = topp_keep(p, threshold) & cand
    elif threshold_mass == "head":
        if packed is not None:
            raise ValueError("select_blocks: threshold_mass 'head' cuts per sequence; pbs_attention_varlen runs "
                             "it one sequence at a time, not packed")
        off = head_keep(p, threshold) & cand
    else:
        raise ValueError(f"select_blocks: unknown threshold_mass {threshold_mass!r}")

    # The final rows keep every causal tile (a chunk's final rows too: see final_rows).
    tail = final_rows(last_q, N, block_size) if packed is None else final_rows(last_q, packed.blk[KEND].long(),
                                                                               block_size)
    off = torch.where(tail[:, None], cand, off)

    # The sink: the block that holds original token 0, for every query block past segment 0
    # (unless a sliding window has left it behind).
    if packed is None:
        sink = (min_pos == 0).repeat_interleave(G, dim=1)[:, :, None, :] & cand
    else:
        sink_blk = packed_sinks(min_pos, packed).repeat_interleave(G, dim=1)  # [B, HQ, NQB]
        sink = (blocks_k == sink_blk[..., None].long()) & cand
        off = torch.where((packed.blk[DENSE] != 0)[:, None], cand, off)  # dense rows keep all
    off = off | sink
    if packed is not None:
        has_q = (first_q <= last_q)[:, None]
        off, diag = off & has_q, diag & has_q
    return compact(off & ~straddle, diag, block_size, q0, masked_off=off & straddle)
