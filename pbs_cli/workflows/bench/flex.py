"""PBS's kept tiles as a FlexAttention BlockMask (the `flex` baseline: same tiles, another kernel)."""

from __future__ import annotations

from typing import Any


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
    import inspect

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
