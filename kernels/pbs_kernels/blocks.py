"""Block geometry and the compact list of kept tiles: the types every op and tool shares.

Production code (the Triton launchers import these); the plain-torch references of the ops live
in each op's naive.py.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .ops._common import cdiv


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

    @property
    def causal_tiles(self) -> int:
        """Tiles of dense causal attention per head: nb (nb + 1) / 2."""
        nb = self.num_blocks
        return nb * (nb + 1) // 2

    def tiles_per_head(self) -> torch.Tensor:
        """Computed tiles per (batch, head), the work the kernel does: [B, HQ] int64."""
        return self.n_total.sum(dim=-1, dtype=torch.int64)

    def _above_diagonal(self) -> torch.Tensor:
        # [B, HQ, NQB, W]: kept own-segment tiles whose key block comes after the query block.
        # Permutation can move an early key behind the diagonal block, so such a tile is computed.
        W = self.idx.shape[-1]
        valid = torch.arange(W, device=self.idx.device) < self.n_total[..., None]
        qb = torch.arange(self.num_blocks, device=self.idx.device)[:, None]
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
        B, HQ, nb, W = self.idx.shape
        valid = torch.arange(W, device=self.idx.device) < self.n_total[..., None]
        mask = torch.zeros(B, HQ, nb, nb + 1, dtype=torch.bool, device=self.idx.device)
        idx = torch.where(valid, self.idx.long(), nb)
        mask.scatter_(3, idx, True)
        return mask[..., :nb]


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
