"""PBS's kept tiles as a FlexAttention BlockMask, and a call of FlexAttention over them (the `flex`
baseline: same tiles, another kernel).

torch is imported inside the functions: baselines.py imports this module and must stay
torch-free at import (the command reads its registry for --baselines)."""

from __future__ import annotations

import functools
import inspect
import warnings
from typing import Any, Callable


def flex_block_mask(blocks, pos, G: int, N: int, *, tile_checked_mask: bool = False,
                    compute_q_blocks: bool = False):
    """A FlexAttention BlockMask with exactly the kept tiles of `blocks`, in permuted key order.

    Earlier-segment tiles become full blocks (no mask_mod, as PBS computes them unmasked); the
    own-segment tiles become partial blocks whose mask_mod allows a key iff its original
    position (`pos`) is <= the query's. Block size = PBS's block size.

    Compiled FlexAttention visits only the BlockMask's blocks; eager FlexAttention (the CPU)
    evaluates mask_mod everywhere and uses the BlockMask only to skip work, so for it
    `tile_checked_mask=True` also makes mask_mod say which tiles are kept.
    """
    import torch
    from torch.nn.attention.flex_attention import BlockMask

    b = blocks.block_size
    nb = blocks.num_blocks
    idx, n_off, n_tot = blocks.idx, blocks.n_off, blocks.n_total
    W = idx.shape[-1]
    # Own-segment entries start at n_off in each row of idx: shift them to the front.
    src = (n_off[..., None].long() + torch.arange(W, device=idx.device)).clamp(max=W - 1)
    part_idx = torch.gather(idx, 3, src).contiguous()
    part_num = (n_tot - n_off).contiguous()
    # Padding slots past N get a position no query reaches.
    pos_pad = torch.nn.functional.pad(pos.long(), (0, nb * b - N), value=1 << 40)
    if tile_checked_mask:
        tiles = blocks.dense_mask()

        def mask_mod(bb, h, q_idx, kv_idx):
            return tiles[bb, h, q_idx // b, kv_idx // b] & (pos_pad[bb, h // G, kv_idx] <= q_idx)
    else:
        def mask_mod(bb, h, q_idx, kv_idx):
            return pos_pad[bb, h // G, kv_idx] <= q_idx

    kwargs: dict[str, Any] = {"BLOCK_SIZE": b, "mask_mod": mask_mod}
    params = inspect.signature(BlockMask.from_kv_blocks).parameters
    if "seq_lengths" in params:
        kwargs["seq_lengths"] = (N, N)
    if "compute_q_blocks" in params:
        kwargs["compute_q_blocks"] = compute_q_blocks  # the transposed index serves backward only
    return BlockMask.from_kv_blocks(part_num, part_idx, n_off.contiguous(), idx, **kwargs)


@functools.cache
def _compiled():
    import torch
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def flex_call(q, plan, *, compiled: bool, compute_q_blocks: bool = False) -> Callable[[], Any]:
    """A no-argument call of FlexAttention over `plan`'s kept tiles (a PbsPlan: K/V in slot order,
    positions, tiles): compiled (the GPU), or eager with the tiles checked in mask_mod (the CPU)."""
    from torch.nn.attention.flex_attention import flex_attention

    k_p, v_p, blocks, scale = plan.k, plan.v, plan.blocks, plan.scale
    G = q.shape[1] // k_p.shape[1]
    b = blocks.block_size
    bm = flex_block_mask(blocks, plan.pos, G, q.shape[2], tile_checked_mask=not compiled,
                         compute_q_blocks=compute_q_blocks)
    opts: dict[str, Any] = {}
    if b < 128:
        # The kernel's tiles must divide the mask's blocks.
        opts["kernel_options"] = {"BLOCK_M": b, "BLOCK_N": b}
    if G > 1:
        opts["enable_gqa"] = True
    if compiled:
        flex = _compiled()
        return lambda: flex(q, k_p, v_p, block_mask=bm, scale=scale, **opts)

    def call_eager():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "flex_attention called without torch.compile()"
            return flex_attention(q, k_p, v_p, block_mask=bm, scale=scale, **opts)

    return call_eager
