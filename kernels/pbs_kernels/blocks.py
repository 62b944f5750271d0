"""Block geometry and the compact list of kept tiles: the types every op and tool shares.

Production code (the Triton launchers import these); the plain-torch references of the ops live
in each op's naive.py.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import _host


NO_POS = 2**31 - 1  # "no key here": the earliest position of a block with no key (packed padding)


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for non-negative integers: blocks of b that cover a rows."""
    return (a + b - 1) // b


@dataclass
class BlockList:
    """Kept key blocks per query block, compact (never a dense N x N mask).

    idx:     [B, HQ, NQB, W] int32 key-block indices; for each query block the first n_off are
             blocks of earlier segments (no mask needed), then n_total - n_off blocks of the
             query's own segment (masked by original positions); the rest is unused.
    n_off:   [B, HQ, NQB] int32
    n_total: [B, HQ, NQB] int32
    q_block0: index of the first query block among the key blocks. 0 for prefill; for queries
             that are the last M of N positions (a chunk against its cached prefix) the rows are
             the key blocks q_block0 .. NB - 1 that hold a query (the first may be partial).
    """

    idx: torch.Tensor
    n_off: torch.Tensor
    n_total: torch.Tensor
    block_size: int
    q_block0: int = 0

    @property
    def num_blocks(self) -> int:
        """Key blocks NB (also the index one past the last query block)."""
        return self.q_block0 + self.idx.shape[2]

    @property
    def num_query_blocks(self) -> int:
        return self.idx.shape[2]

    @property
    def causal_tiles(self) -> int:
        """Tiles of dense causal attention per head over the query blocks: sum of (i + 1) for
        i = q_block0 .. NB - 1 (nb (nb + 1) / 2 for prefill)."""
        nb, q0 = self.num_blocks, self.q_block0
        return nb * (nb + 1) // 2 - q0 * (q0 + 1) // 2

    def tiles_per_head(self) -> torch.Tensor:
        """Computed tiles per (batch, head), the work the kernel does: [B, HQ] int64."""
        return self.n_total.sum(dim=-1, dtype=torch.int64)

    def _above_diagonal(self) -> torch.Tensor:
        # [B, HQ, NQB, W]: kept own-segment tiles whose key block comes after the query block.
        # Permutation can move an early key behind the diagonal block, so such a tile is computed.
        W = self.idx.shape[-1]
        valid = torch.arange(W, device=self.idx.device) < self.n_total[..., None]
        qb = torch.arange(self.q_block0, self.num_blocks, device=self.idx.device)[:, None]
        return valid & (self.idx > qb)

    def extra_tiles_per_head(self) -> torch.Tensor:
        """Computed tiles above the block diagonal per (batch, head): [B, HQ] int64."""
        return self._above_diagonal().sum(dim=(-1, -2), dtype=torch.int64)

    def density_per_head(self) -> torch.Tensor:
        """Kept causal tiles (key block <= query block) / causal tiles, mean over the batch: [HQ]
        float32, in [0, 1]. The tiles above the diagonal are in `extra_density_per_head`."""
        kept = self.tiles_per_head() - self.extra_tiles_per_head()
        return (kept.float() / self.causal_tiles).mean(dim=0)

    def extra_density_per_head(self) -> torch.Tensor:
        """Computed own-segment tiles above the block diagonal / causal tiles: [HQ] float32.
        density + extra density is the work relative to dense causal attention."""
        return (self.extra_tiles_per_head().float() / self.causal_tiles).mean(dim=0)

    def dense_mask(self) -> torch.Tensor:
        """[B, HQ, NQB, NKB] bool of kept tiles (for tests and analysis on small inputs)."""
        B, HQ, nqb, W = self.idx.shape
        nb = self.num_blocks
        valid = torch.arange(W, device=self.idx.device) < self.n_total[..., None]
        mask = torch.zeros(B, HQ, nqb, nb + 1, dtype=torch.bool, device=self.idx.device)
        idx = torch.where(valid, self.idx.long(), nb)
        mask.scatter_(3, idx, True)
        return mask[..., :nb]

    def vertical_segments(self, segment_size: int) -> torch.Tensor:
        """[B, HQ, NQB, NSEG] bool: for each query block, the earlier segments whose first block
        it does not keep. Their top slots (after permutation, the keys the last query block
        attends to most) are the extra keys `vertical_keys` attends to exactly. Built on the
        device with no host sync, so a call stays capturable in a CUDA graph."""
        spb = segment_size // self.block_size
        kept_first = self.dense_mask()[..., ::spb]  # [B, HQ, NQB, NSEG]
        nseg = kept_first.shape[-1]
        seg_q = torch.arange(self.q_block0, self.num_blocks, device=self.idx.device) // spb
        earlier = torch.arange(nseg, device=self.idx.device)[None, :] < seg_q[:, None]
        return earlier & ~kept_first

    def vertical_keys_per_head(self, segment_size: int, vertical_keys: int) -> torch.Tensor:
        """Extra keys each query block attends to under `vertical_keys`, summed per (batch,
        head): [B, HQ] int64 (an upper bound: the last segment's slots may be short)."""
        return self.vertical_segments(segment_size).sum(dim=(-1, -2), dtype=torch.int64) * int(vertical_keys)


def identity_positions(B: int, H: int, N: int, device) -> torch.Tensor:
    """Slot positions of keys in their original order: [B, H, N] int32 (a contiguous tensor, as
    the kernels want)."""
    return torch.arange(N, device=device, dtype=torch.int32).expand(B, H, N).contiguous()


def block_geometry(N: int, block_size: int, segment_size: int, device):
    """(number of blocks, segment of each block [NB], last query position of each block [NB])."""
    nb = cdiv(N, block_size)
    blocks = torch.arange(nb, device=device)
    seg = blocks // (segment_size // block_size)
    last_q = torch.clamp((blocks + 1) * block_size - 1, max=N - 1)
    return nb, seg, last_q


def query_geometry(N: int, M: int, block_size: int, segment_size: int, device):
    """For queries that are the last M of N positions: (first query block q_block0, segment of
    each query block [NQB], first and last query position of each query block [NQB])."""
    q_off = N - M
    nb = cdiv(N, block_size)
    qb0 = q_off // block_size
    blocks = torch.arange(qb0, nb, device=device)
    seg = blocks // (segment_size // block_size)
    first_q = torch.clamp(blocks * block_size, min=q_off)
    last_q = torch.clamp((blocks + 1) * block_size - 1, max=N - 1)
    return qb0, seg, first_q, last_q


def pool_query_blocks(q: torch.Tensor, block_size: int, q_offset: int = 0) -> torch.Tensor:
    """Mean query of each query block when the M rows of q sit at positions q_offset ..
    q_offset + M - 1 (blocks aligned to absolute positions, so the first block may be partial):
    [B, HQ, NQB, D] float32. q_offset = 0 is `pool_blocks`."""
    lead = q_offset % block_size
    if lead == 0:
        return pool_blocks(q, block_size)
    B, H, M, D = q.shape
    first = min(M, block_size - lead)
    head = q[:, :, :first].sum(dim=2, keepdim=True, dtype=torch.float32) / first
    if first == M:
        return head
    return torch.cat([head, pool_blocks(q[:, :, first:], block_size)], dim=2)


def pool_query_blocks_packed(q: torch.Tensor, layout) -> torch.Tensor:
    """Packed batches: the mean query of every virtual block, each sequence's blocks pooled as
    `pool_query_blocks` pools them (a partial first or last block averages its queries), zero
    for blocks with no query. q [1, HQ, total_q, D] packed rows -> [1, HQ, NB, D] float32."""
    b = layout.block_size
    out = torch.zeros(1, q.shape[1], layout.num_blocks, q.shape[-1], device=q.device, dtype=torch.float32)
    for s in layout.seqs:
        qb0 = (s.offset + s.n - s.m) // b
        pooled = pool_query_blocks(q[:, :, s.q0:s.q1], b, s.n - s.m)
        out[:, :, qb0:qb0 + pooled.shape[2]] = pooled
    return out


def pool_blocks(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """Mean over each block of `block_size` rows (a partial last block averages its valid rows).

    x: [B, H, N, D] -> [B, H, NB, D] float32.
    """
    B, H, N, D = x.shape
    n_full = N // block_size
    if N % block_size == 0 and not _host.LEGACY_HOST:
        # One reduction launch (not sum, fill, divide): the fixed cost of a call at 8K tokens
        # is launches, not bytes.
        return x.reshape(B, H, n_full, block_size, D).mean(dim=3, dtype=torch.float32)
    # Sum in fp32 straight from the 16-bit input: an fp32 copy of Q would cost more than the
    # whole selection at 128K tokens.
    sums = x[:, :, : n_full * block_size].reshape(B, H, n_full, block_size, D).sum(dim=3, dtype=torch.float32)
    if N % block_size:
        tail = x[:, :, n_full * block_size:].sum(dim=2, keepdim=True, dtype=torch.float32)
        sums = torch.cat([sums, tail], dim=2)
    # Rows per block, made on the device: writing the tail's count from Python is a host-to-device
    # copy, which a CUDA graph capture refuses (the first H200 run of graph=True at 3000 tokens).
    counts = torch.clamp(N - torch.arange(cdiv(N, block_size), device=x.device) * block_size, max=block_size)
    return sums / counts[:, None].float()


def key_block_max_pos(pos: torch.Tensor, block_size: int) -> torch.Tensor:
    """The latest original position each key block holds: [B, H, NB] int32 (sliding windows)."""
    B, H, N = pos.shape
    nb = cdiv(N, block_size)
    pos_blk = torch.nn.functional.pad(pos, (0, nb * block_size - N), value=-1).reshape(B, H, nb, block_size)
    return pos_blk.amax(-1).to(torch.int32).contiguous()


def key_block_stats(k_perm: torch.Tensor, pos: torch.Tensor, block_size: int, valid: torch.Tensor | None = None):
    """What selection needs from the (permuted) keys: the mean key of each block [B, H, NB, D]
    float32 and the earliest original position each block holds [B, H, NB] int32. The Triton
    gather computes the same while it permutes (`gather_keys_triton(..., pool_block=b)`).

    valid [B, H, N] bool (packed batches): which slots hold a key; a block averages those only
    (zero with none) and its earliest position counts those only (`NO_POS` with none)."""
    B, H, N = pos.shape
    nb = cdiv(N, block_size)
    if valid is not None:
        vb = valid.reshape(B, H, nb, block_size)  # packed batches: N is a multiple of the block
        sums = torch.where(vb[..., None], k_perm.reshape(B, H, nb, block_size, -1), 0).sum(3, dtype=torch.float32)
        count = vb.sum(-1, keepdim=True).clamp_min(1).float()
        min_pos = torch.where(vb, pos.reshape(B, H, nb, block_size), NO_POS).amin(-1)
        return sums / count, min_pos.to(torch.int32).contiguous()
    pos_blk = torch.nn.functional.pad(pos, (0, nb * block_size - N), value=N).reshape(B, H, nb, block_size)
    return pool_blocks(k_perm, block_size), pos_blk.amin(-1).to(torch.int32).contiguous()


# Representatives per key block for the "top" estimator: its first slots, which after permutation
# hold the block's highest-scored keys (the keys the last query block attends to most).
TOP_KEYS = 2


def block_representatives(k_perm: torch.Tensor, k_pool: torch.Tensor, block_size: int, estimator: str,
                          count: torch.Tensor | None = None):
    """Keys that stand for each key block in selection's mass estimate, and their log weights.

    Block j's estimated logit for pooled query qbar is logsumexp_r(qbar . rep[r, j] * scale +
    logw[r, j]). "mean": one representative, the block mean, weight 1 (log 0). "top": the block's
    first `TOP_KEYS` slots (its top keys once permuted) with weight 1 each, and the mean of its
    other keys weighted by how many there are; a padded slot of the last block weighs 0.

    k_perm [B, H, N, D], k_pool [B, H, NB, D] fp32 block means ->
    reps [B, H, R, NB, D] fp32, logw [B, H, R, NB] fp32 (None for "mean"). count [NB]: keys in
    each block, its first slots (packed batches, `packing.block_counts`); default: all but the
    last block's tail past N.
    """
    if estimator == "mean":
        return k_pool[:, :, None], None
    if estimator != "top":
        raise ValueError(f"block_representatives: unknown estimator {estimator!r}")
    B, H, N, D = k_perm.shape
    nb = k_pool.shape[2]
    t = min(TOP_KEYS, block_size)
    dev = k_perm.device
    # Only the nb * t representative rows are read (a padded copy of K cost 0.125 ms at 128K),
    # and every size is computed on the device, so the call can be captured in a CUDA graph.
    first = torch.arange(nb, device=dev) * block_size
    if count is None:
        count = torch.clamp(N - first, max=block_size).float()  # [NB] keys per block
    r = torch.arange(t, device=dev)
    valid = r[None, :] < count[:, None]  # [NB, t]
    rows = torch.clamp(first[:, None] + r[None, :], max=N - 1).flatten()
    top = k_perm.index_select(2, rows).view(B, H, nb, t, D).float()  # [B, H, NB, t, D]
    n_top = valid.sum(-1).float()
    rest_n = count - n_top
    top = top * valid[None, None, :, :, None]
    rest = (k_pool * count[:, None] - top.sum(3)) / rest_n.clamp_min(1.0)[:, None]
    reps = torch.cat([top.permute(0, 1, 3, 2, 4), rest[:, :, None]], dim=2).contiguous()
    zero = torch.zeros((), device=dev)
    ninf = torch.full((), float("-inf"), device=dev)
    logw = torch.cat([torch.where(valid.T, zero, ninf), torch.where(rest_n > 0, rest_n.log(), ninf)[None]], 0)
    return reps, logw.expand(B, H, t + 1, nb).contiguous()


def estimated_block_logits(q_pool: torch.Tensor, reps: torch.Tensor, logw, scale: float) -> torch.Tensor:
    """[B, HQ, NQB, NKB] estimated log-mass of each (query block, key block) tile (fp32 reference
    of what the Triton selection combines in registers). q_pool [B, HQ, NQB, D]."""
    B, HQ, nq, D = q_pool.shape
    H = reps.shape[1]
    G = HQ // H
    s = torch.einsum("bhgid,bhrjd->bhgirj", q_pool.reshape(B, H, G, nq, D), reps) * scale
    if logw is None:
        return s[:, :, :, :, 0].reshape(B, HQ, nq, -1)
    s = s + logw[:, :, None, None]
    return torch.logsumexp(s, dim=4).reshape(B, HQ, nq, -1)


def window_density(n_tokens: int, block_size: int, window: int | None) -> float:
    """Share of the causal b x b tiles that meet a sliding window (q_pos - window < k_pos <=
    q_pos): the work of exact windowed attention that skips the tiles wholly outside it (as
    FlashAttention's window and PBS's selection do), per causal tile. 1.0 without a window.
    Query block i's earliest visible key is i*b - window + 1, so its tiles are key blocks
    max(0, (i*b - window + 1) // b) .. i."""
    nb = cdiv(n_tokens, block_size)
    if window is None or nb == 0:
        return 1.0
    tiles = sum(i - max(0, (i * block_size - window + 1) // block_size) + 1 for i in range(nb))
    return tiles / (nb * (nb + 1) / 2)
