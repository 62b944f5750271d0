"""How sparse one layer's attention is, measured from its Q and K, never holding N x N.

`analyze_layer(q, k, ...)` computes, per query head:

* oracle block density: for each query block, the fewest key blocks (of `block_size`) that hold
  `coverage` of the block's attention mass (mass = mean over the block's queries of the softmax
  weight on the key block's keys), summed over query blocks and divided by the causal tile count
  nb(nb+1)/2, the denominator of docs/design.md ("Metrics"). Once with keys in original order, once in PBS's
  own permuted order (`permute_stage`). Lower is sparser; the gap says what permuting buys.
* PBS's estimated selection at `threshold` (`select_stage`), with and without permutation: its
  density (docs/design.md, "Metrics") and recall (true softmax mass on the kept tiles, mean over queries).
  With `vertical_keys` n > 0 the recall also counts the true mass on the n vertical slots of every
  earlier segment whose first block a query block did not keep (`BlockList.vertical_segments`,
  the keys `pbs_attention(..., vertical_keys=n)` attends to exactly), and those keys are work too
  (`pbs_vertical_density`: keys x queries in tiles of block_size^2, as `PbsPlan.vertical_density`).
  The figures without permutation are those of `pbs_attention(..., permute=False,
  vertical_keys=n)`: its slots are the keys in original order, so its vertical slots are each
  segment's first n keys.
* selection efficiency: the fewest tiles an oracle that knows every tile's true mass (keys in
  PBS's permuted order) needs to reach PBS's recall, over the tiles PBS computes, its vertical
  keys included (`metrics.oracle_tiles_at_recall`, `metrics.selection_efficiency`); per head and
  for the layer.
* sink mass: mass on the first key block (token 0 and its neighbours), mean over the queries past
  the first block; local mass: mass on the query's own and the previous key block, mean over
  queries.

The exact softmax is computed chunk by chunk: a few query blocks of a few heads at a time against
the causal prefix of K, so memory is O(rows x N) for a row count set by `chunk_bytes`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .attention import permute_with, select_with
from .blocks import window_density
from .limits import HEAD_DIMS
from .metrics import oracle_tiles_at_recall, selection_efficiency
from .ops._common import default_scale, resolve_backend
from .blocks import cdiv
from .settings import PbsSettings

__all__ = ["LayerAnalysis", "analyze_layer", "cover_count"]

_ONEHOT_MAX_BLOCKS = 128


@dataclass
class LayerAnalysis:
    """Per-head figures of one layer: [HQ] float32 CPU tensors (mean over the batch).

    block_mass / block_mass_perm: [HQ, NB, NB] mean attention mass of query block i on key block
    j, keys in original / permuted order (only with `return_maps=True`; rows sum to 1).
    """

    n_tokens: int
    block_size: int
    segment_size: int
    coverage: float
    threshold: float
    oracle_density: torch.Tensor
    oracle_density_perm: torch.Tensor
    pbs_density: torch.Tensor
    pbs_recall: torch.Tensor
    pbs_density_noperm: torch.Tensor
    pbs_recall_noperm: torch.Tensor
    sink_mass: torch.Tensor
    local_mass: torch.Tensor
    oracle_density_at_recall: torch.Tensor | None = None  # [HQ] oracle tiles at PBS's recall / causal tiles
    # [HQ] tiles PBS computes (extra own-segment ones and vertical keys included) / causal tiles
    pbs_work: torch.Tensor | None = None
    selection_efficiency: float = float("nan")  # oracle tiles at PBS's recall / PBS's computed tiles, all heads
    estimator: str = "mean"
    threshold_mass: str = "earlier"
    vertical_keys: int = 0
    # [HQ] keys attended through vertical keys, in tiles of block_size^2 pairs / causal tiles
    # (zeros when off), with and without permutation.
    pbs_vertical_density: torch.Tensor | None = None
    pbs_vertical_density_noperm: torch.Tensor | None = None
    # The layer's sliding window (None: full causal attention) and the share of causal tiles that
    # meet it (blocks.window_density: the work of exact windowed attention; 1.0 without one).
    window: int | None = None
    window_density: float = 1.0
    block_mass: torch.Tensor | None = None
    block_mass_perm: torch.Tensor | None = None


def cover_count(mass: torch.Tensor, coverage: float) -> torch.Tensor:
    """Fewest entries per row whose sum reaches `coverage` of 1 (rows are probability masses).

    mass: [..., M] -> [...] int64. Same rule as select's top-p: keep entries, largest first, while
    the mass kept before them is below `coverage`; zero entries are never counted.
    """
    sorted_mass = torch.sort(mass, dim=-1, descending=True).values
    before = torch.cumsum(sorted_mass, dim=-1) - sorted_mass
    return ((before < coverage) & (sorted_mass > 0)).sum(dim=-1)


def _rows_per_chunk(heads: int, N: int, block_size: int, chunk_bytes: int) -> int:
    """Query blocks per chunk: the work buffer [heads, rows, N] float32, plus the permuted copy
    of the gather path."""
    per_block = heads * block_size * N * 4 * 2
    return max(1, chunk_bytes // max(per_block, 1))


@torch.no_grad()
def analyze_layer(
    q: torch.Tensor,
    k: torch.Tensor,
    settings: PbsSettings | None = None,
    *,
    coverage: float = 0.9,
    return_maps: bool = False,
    chunk_bytes: int | None = None,
) -> LayerAnalysis:
    """Sparsity figures of one layer (see the module docstring).

    q: [B, HQ, N, D], k: [B, H, N, D] post-RoPE, HQ a multiple of H. settings: the
    `PbsSettings` PBS's permutation and selection run with (default: the method's defaults):
    block_size, segment_size, threshold, estimator, threshold_mass, vertical_keys (recall and
    work count the vertical keys), scale, backend ("auto": Triton on CUDA, torch on CPU), and
    the model's softcap / window as the model runs the layer: both apply to the true
    attention, and the window to PBS's selection too (the runtime never keeps a tile wholly
    outside the window); densities stay per causal tile, and `window_density` is the share the
    window alone leaves. `permute` and `min_seq_len` are not read (both orders are measured).
    chunk_bytes: memory for the exact-softmax chunks (default 32 MiB on CPU, 1 GiB on CUDA).
    """
    s = PbsSettings() if settings is None else settings
    B, HQ, N, D = q.shape
    H = k.shape[1]
    if k.shape[0] != B or k.shape[2] != N or k.shape[3] != D or HQ % H:
        raise ValueError(f"analyze_layer: q {tuple(q.shape)} and k {tuple(k.shape)} do not match")
    if not 0.0 < coverage <= 1.0:
        raise ValueError(f"analyze_layer: coverage {coverage} must be in (0, 1]")
    block_size, segment_size, threshold = s.block_size, s.segment_size, s.threshold
    softcap, sliding_window = s.softcap, s.window
    n_vert = int(s.vertical_keys)
    G = HQ // H
    bs = block_size
    nb = cdiv(N, bs)
    scale = default_scale(D) if s.scale is None else s.scale
    if chunk_bytes is None:
        chunk_bytes = (1 << 30) if q.is_cuda else (32 << 20)  # CPU: cache-sized chunks ran 1.5x faster than 256 MiB
    be = resolve_backend(s.backend, q)
    if D not in HEAD_DIMS:
        be = "torch"  # the Triton scorer is built for the kernel head dims only
    dev = q.device

    # PBS's own view: its permutation and its block selections, with and without permuting.
    s = s.replace(scale=scale, backend=be, permute=True)
    keys = permute_with(q, k, k, s)
    pos = keys.pos
    sel = select_with(q, keys, s)
    plain = permute_with(q, k, k, s.replace(permute=False))
    sel_np = select_with(q, plain, s)
    kept_perm = sel.dense_mask()  # [B, HQ, nb, nb]
    kept_orig = sel_np.dense_mask()
    if n_vert:
        vert_perm = sel.vertical_segments(segment_size)  # [B, HQ, nb, NSEG]
        vert_orig = sel_np.vertical_segments(segment_size)
    del keys, plain

    count_orig = torch.zeros(B, HQ, dtype=torch.float64, device=dev)
    count_perm = torch.zeros_like(count_orig)
    recall_perm = torch.zeros_like(count_orig)
    recall_orig = torch.zeros_like(count_orig)
    sink = torch.zeros_like(count_orig)
    local = torch.zeros_like(count_orig)
    maps = maps_perm = None
    # Tile masses in PBS's key order, for the oracle at PBS's recall ([B, HQ, nb, nb] fp32:
    # 128 MiB at 128K tokens and 32 heads).
    tile_mass = torch.zeros(B, HQ, nb, nb, dtype=torch.float32, device=dev)
    if return_maps:
        maps = torch.zeros(HQ, nb, nb, dtype=torch.float32)
        maps_perm = torch.zeros(HQ, nb, nb, dtype=torch.float32)

    # Permuted block sums: on the CPU (and for short prompts) a matmul with a one-hot key ->
    # permuted-block matrix is 2.3x faster than gather + reshape-sum (measured at N = 8K on 2
    # cores); beyond 128 blocks the one-hot matmul's nb-fold work loses to a gather.
    use_onehot = nb <= _ONEHOT_MAX_BLOCKS
    n_pad = nb * bs
    hc = G
    if _rows_per_chunk(hc, n_pad, bs, chunk_bytes) == 1 and G > 1:
        hc = 1  # even one block of the whole group is too big: go head by head
    blocks_per_chunk = _rows_per_chunk(hc, n_pad, bs, chunk_bytes)
    # One work buffer for every chunk: fresh multi-MB tensors cost page faults (mm into a reused
    # buffer ran 1.9x faster on the CPU).
    work = torch.empty(hc * min(nb, blocks_per_chunk) * bs * n_pad, device=dev, dtype=torch.float32)
    k_pos = torch.arange(n_pad, device=dev)
    slot_blk = (torch.arange(n_pad, device=dev) // bs)

    for b in range(B):
        for h in range(H):
            # Keys padded to whole blocks; padded keys sit past every query, so the causal mask
            # removes them.
            kT = F.pad(k[b, h].float(), (0, 0, 0, n_pad - N)).T.contiguous()  # [D, n_pad]
            pos_bh = F.pad(pos[b, h].long(), (0, n_pad - N))
            pos_bh[N:] = torch.arange(N, n_pad, device=dev)
            if use_onehot:
                # onehot[original key, permuted block] = 1
                onehot = torch.zeros(n_pad, nb, device=dev, dtype=torch.float32)
                onehot[pos_bh, slot_blk] = 1.0
            for g0 in range(0, G, hc):
                heads = slice(h * G + g0, h * G + g0 + hc)
                qh = q[b, heads].float() * scale  # [hc, N, D]
                for i0 in range(0, nb, blocks_per_chunk):
                    i1 = min(nb, i0 + blocks_per_chunk)
                    nq = i1 - i0
                    r0, r1 = i0 * bs, min(N, i1 * bs)
                    R = r1 - r0
                    # Keys needed: the causal prefix; the gather path reads up to the end of the
                    # last segment, since permutation moves keys within a segment.
                    seg_end = min(n_pad, cdiv(i1 * bs, segment_size) * segment_size)
                    L = i1 * bs if use_onehot else seg_end
                    nbl = L // bs  # key blocks in original order
                    nbp = seg_end // bs  # permuted blocks the chunk's keys can land in
                    q_pos = torch.arange(r0, r1, device=dev)
                    e = work[: hc * R * L].view(hc * R, L)
                    torch.mm(qh[:, r0:r1].reshape(hc * R, D), kT[:, :L], out=e)
                    e3 = e.view(hc, R, L)
                    if softcap is not None:
                        e.div_(softcap).tanh_().mul_(softcap)  # q was pre-scaled: e holds scaled scores
                    if sliding_window is not None:
                        e3.masked_fill_((k_pos[None, :L] <= q_pos[:, None] - sliding_window), float("-inf"))
                    # Only the chunk's diagonal part can hold future keys.
                    e3[:, :, r0:].masked_fill_(k_pos[None, r0:L] > q_pos[:, None], float("-inf"))
                    # Unnormalised softmax in place; block sums are divided by the row sums after.
                    e.sub_(e.amax(dim=-1, keepdim=True)).exp_()
                    m_orig = e.view(hc * R, nbl, bs).sum(-1)  # [hc*R, nbl]
                    if use_onehot:
                        m_perm = torch.mm(e, onehot[:L, :nbp])
                    else:
                        m_perm = torch.gather(e3, 2, pos_bh[:L].expand(hc, R, L)).view(hc * R, nbp, bs).sum(-1)
                    row_sum = m_orig.sum(-1, keepdim=True)
                    m_orig = (m_orig / row_sum).view(hc, R, nbl)
                    m_perm = (m_perm / row_sum).view(hc, R, nbp)

                    q_blk = q_pos // bs  # [R] query block of each row
                    # Recall of PBS's kept tiles, per row.
                    kp = kept_perm[b, heads][:, q_blk, :nbp]  # [hc, R, nbp]
                    recall_perm[b, heads] += (m_perm * kp).sum((-1, -2)).double()
                    ko = kept_orig[b, heads][:, q_blk, :nbl]
                    recall_orig[b, heads] += (m_orig * ko).sum((-1, -2)).double()
                    # Vertical keys: the first n slots of each earlier segment whose first block
                    # the row's query block did not keep (all before the chunk's last segment).
                    nsv = (i1 - 1) * bs // segment_size
                    if n_vert and nsv:
                        vslot = (torch.arange(nsv, device=dev)[:, None] * segment_size
                                 + torch.arange(n_vert, device=dev)).reshape(-1)
                        for key_pos, vert, rec in ((pos_bh[vslot], vert_perm, recall_perm),
                                                   (vslot, vert_orig, recall_orig)):
                            m_v = e3[:, :, key_pos].view(hc, R, nsv, n_vert).sum(-1) / row_sum.view(hc, R, 1)
                            rec[b, heads] += (m_v * vert[b, heads][:, q_blk, :nsv]).sum((-1, -2)).double()
                    # Sink (first key block) past the first query block; local window.
                    if N > bs:
                        past_first = (q_pos >= bs).to(m_orig.dtype)
                        sink[b, heads] += (m_orig[..., 0] * past_first).sum(-1).double()
                    else:
                        sink[b, heads] += m_orig[..., 0].sum(-1).double()
                    idx = q_blk[None, :, None].expand(hc, R, 1)
                    own = m_orig.gather(2, idx).squeeze(-1)
                    prev = m_orig.gather(2, (idx - 1).clamp_min(0)).squeeze(-1) * (q_blk >= 1)
                    local[b, heads] += (own + prev).sum(-1).double()

                    # Per query block: mean row mass, then the oracle count.
                    rows_pad = nq * bs - R
                    a_orig = F.pad(m_orig, (0, 0, 0, rows_pad)).view(hc, nq, bs, nbl).sum(2)
                    a_perm = F.pad(m_perm, (0, 0, 0, rows_pad)).view(hc, nq, bs, nbp).sum(2)
                    n_rows = torch.full((nq,), float(bs), device=dev)
                    n_rows[-1] = bs - rows_pad
                    a_orig /= n_rows[None, :, None]
                    a_perm /= n_rows[None, :, None]
                    count_orig[b, heads] += cover_count(a_orig, coverage).sum(-1).double()
                    count_perm[b, heads] += cover_count(a_perm, coverage).sum(-1).double()
                    tile_mass[b, heads, i0:i1, :nbp] = a_perm
                    if return_maps:
                        maps[heads, i0:i1, :nbl] += a_orig.cpu() / B
                        maps_perm[heads, i0:i1, :nbp] += a_perm.cpu() / B

    causal_tiles = nb * (nb + 1) / 2
    n_sink_rows = N - bs if N > bs else N

    def per_head(x: torch.Tensor, denom: float) -> torch.Tensor:
        return (x / denom).mean(0).float().cpu()

    rows = torch.full((nb,), float(bs), device=dev)
    rows[-1] = N - (nb - 1) * bs
    oracle = torch.zeros(B, HQ, dtype=torch.float64)
    for b in range(B):
        for h in range(HQ):
            oracle[b, h] = oracle_tiles_at_recall(tile_mass[b, h], rows, float(recall_perm[b, h]) / N)
    # Vertical keys as tile-equivalents: n keys for a query block's b rows are n / b tiles.
    vert_tiles, vert_tiles_np = (
        blocks.vertical_keys_per_head(segment_size, n_vert).double().cpu() / bs if n_vert
        else torch.zeros(B, HQ, dtype=torch.float64) for blocks in (sel, sel_np))  # [B, HQ]
    work = sel.tiles_per_head().double().cpu() + vert_tiles  # [B, HQ]
    del tile_mass

    return LayerAnalysis(
        n_tokens=N,
        block_size=bs,
        segment_size=segment_size,
        coverage=float(coverage),
        threshold=float(threshold),
        oracle_density=per_head(count_orig, causal_tiles),
        oracle_density_perm=per_head(count_perm, causal_tiles),
        pbs_density=sel.density_per_head().float().cpu(),
        pbs_recall=per_head(recall_perm, N),
        pbs_density_noperm=sel_np.density_per_head().float().cpu(),
        pbs_recall_noperm=per_head(recall_orig, N),
        sink_mass=per_head(sink, n_sink_rows),
        local_mass=per_head(local, N),
        oracle_density_at_recall=per_head(oracle, causal_tiles),
        pbs_work=per_head(work, causal_tiles),
        selection_efficiency=selection_efficiency(float(oracle.sum()), float(work.sum())),
        estimator=s.estimator,
        threshold_mass=s.threshold_mass,
        vertical_keys=n_vert,
        pbs_vertical_density=per_head(vert_tiles, causal_tiles),
        pbs_vertical_density_noperm=per_head(vert_tiles_np, causal_tiles),
        window=sliding_window,
        window_density=window_density(N, bs, sliding_window),
        block_mass=maps,
        block_mass_perm=maps_perm,
    )
