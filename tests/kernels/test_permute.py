"""Permutation (ops/permute): the score kernel, the segment sort and the gather against the
plain-torch reference."""
import pytest
import torch

from pbs_kernels.ops.permute import gather_keys, permute_keys, score_keys_naive, sort_within_segments
from pbs_kernels.ops.permute.score import score_keys_triton

from _ref import max_err, rand_qkv, rel_err


@pytest.mark.parametrize("N,G,D", [(300, 1, 64), (1000, 4, 128), (257, 2, 64)], ids=["T300-G1", "T1000-G4", "T257-G2"])
@pytest.mark.parametrize("tiles_per_chunk", [None, 3], ids=["chunk-auto", "chunk-3"])
def test_score_keys_triton_matches_naive(N, G, D, tiles_per_chunk):
    # Chunks of 3 tiles put chunk edges (online-softmax restarts) and the causal edge mid-chunk.
    q, k, _ = rand_qkv(1, 2 * G, 2, N, D)
    ref = score_keys_naive(q, k, block_size=64, scale=D ** -0.5)
    got = score_keys_triton(q, k, block_size=64, scale=D ** -0.5, tiles_per_chunk=tiles_per_chunk)
    assert rel_err(got, ref) < 1e-4, f"rel {rel_err(got, ref):.2e} max {max_err(got, ref):.2e}"
    # Each query row's probabilities sum to one: the mean over rows of the key scores sums to 1.
    assert torch.allclose(got.sum(-1), torch.ones_like(got.sum(-1)), atol=1e-4)


def test_permutation_sorts_inside_full_segments_only():
    q, k, v = rand_qkv(2, 4, 2, 300, 64)
    kp, vp, pos = permute_keys(q, k, v, block_size=32, segment_size=128, scale=0.125)
    scores = score_keys_naive(q, k, block_size=32, scale=0.125)
    for seg_start in (0, 128):
        seg = pos[..., seg_start:seg_start + 128].long()
        assert ((seg >= seg_start) & (seg < seg_start + 128)).all()
        s = torch.gather(scores, 2, seg)
        assert (s[..., :-1] >= s[..., 1:]).all()
    # The trailing partial segment (256..299) stays in place.
    assert torch.equal(pos[..., 256:], torch.arange(256, 300, dtype=torch.int32).expand(2, 2, 44))
    assert torch.equal(kp, torch.gather(k, 2, pos.long()[..., None].expand(-1, -1, -1, 64)))
    assert torch.equal(vp, torch.gather(v, 2, pos.long()[..., None].expand(-1, -1, -1, 64)))


def test_triton_permutation_equals_reference():
    from pbs_kernels.ops.permute import permute_keys_naive

    q, k, v = rand_qkv(2, 4, 2, 520, 64, torch.float16)
    k = k.transpose(1, 2).contiguous().transpose(1, 2)  # strided, as transformers hands it over
    got = permute_keys(q, k, v, block_size=64, segment_size=128, scale=0.125, backend="triton")
    want = permute_keys_naive(q, k, v, block_size=64, segment_size=128, scale=0.125)
    # Same order up to near-ties of the scores; where the order agrees, K and V rows are identical.
    same = (got[2] == want[2]).float().mean()
    assert same > 0.99
    if same == 1:
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize("N,S,G", [(1000, 256, 4), (700, 192, 2), (383, 128, 1)], ids=["S256", "S192", "S128-G1"])
def test_segment_order_kernel_equals_stable_sort(N, S, G):
    from pbs_kernels.ops.permute.order import segment_order_triton

    B, H = 2, 2
    g = torch.Generator().manual_seed(N)
    # Small integers: group sums are exact in fp32 and ties are everywhere, so the tie rule
    # (lower original position first) is what decides most of the order.
    per_head = torch.randint(0, 4, (B * H * G, N), generator=g).float()
    got = segment_order_triton(per_head, B, H, N, S)
    want = sort_within_segments(per_head.view(B, H, G, N).sum(2), S)
    assert got.dtype == torch.int32 and torch.equal(got.long(), want)


def test_gather_pools_key_blocks():
    from pbs_kernels.ops.permute.gather import gather_keys_triton
    from pbs_kernels.blocks import key_block_stats

    q, k, v = rand_qkv(2, 4, 2, 300, 64, torch.float16)
    pos = sort_within_segments(torch.rand(2, 2, 300), 128).to(torch.int32)
    k_p, v_p, (k_pool, min_pos) = gather_keys_triton(k, v, pos, pool_block=64)
    want_pool, want_min = key_block_stats(k_p, pos, 64)
    assert torch.equal(k_p, gather_keys(k, v, pos.long())[0]) and torch.equal(v_p, gather_keys(k, v, pos.long())[1])
    assert k_pool.shape == (2, 2, 5, 64) and torch.allclose(k_pool, want_pool, atol=1e-6)  # 44-row last block
    assert torch.equal(min_pos, want_min)
