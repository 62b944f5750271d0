"""Selection (ops/select): top-p, pooling and the fused Triton kernel against brute force and the
plain-torch reference."""
import pytest
import torch

from pbs_kernels.blocks import block_geometry, pool_blocks
from pbs_kernels.ops.permute import permute_keys
from pbs_kernels.ops.select import select_blocks, topp_keep
from pbs_kernels.settings import PbsSettings

from _ref import rand_qkv


def test_topp_keep_is_smallest_set():
    g = torch.Generator().manual_seed(1)
    for _ in range(20):
        p = torch.rand(7, generator=g) ** 3
        p = p / p.sum()
        tau = float(torch.rand(1, generator=g)) * 0.98 + 0.01
        keep = topp_keep(p[None], tau)[0]
        order = torch.argsort(p, descending=True)
        need = int((torch.cumsum(p[order], 0) < tau).sum()) + 1
        assert keep.sum() == need
        assert set(order[:need].tolist()) == set(torch.nonzero(keep).flatten().tolist())


def test_pool_blocks_partial_last_block():
    x = torch.randn(1, 1, 70, 4)
    pooled = pool_blocks(x, 32)
    assert torch.allclose(pooled[0, 0, 2], x[0, 0, 64:].mean(0))


def _brute_select(q, kp, pos, b, S, tau, scale):
    """Per-row loop: the selection rules of docs/design.md ("The method", step 2), written plainly."""
    B, HQ, N, D = q.shape
    G = HQ // kp.shape[1]
    nb, seg, last_q = block_geometry(N, b, S, q.device)
    qp, kpool = pool_blocks(q, b), pool_blocks(kp, b)
    keep = torch.zeros(B, HQ, nb, nb, dtype=torch.bool)
    for bi in range(B):
        for h in range(HQ):
            hk = h // G
            for i in range(nb):
                earlier = [j for j in range(nb) if seg[j] < seg[i]]
                if earlier:
                    s = torch.stack([qp[bi, h, i] @ kpool[bi, hk, j] * scale for j in earlier])
                    p = torch.softmax(s, 0)
                    order = torch.argsort(p, descending=True, stable=True)
                    mass = 0.0
                    for o in order.tolist():
                        if mass >= tau:
                            break
                        keep[bi, h, i, earlier[o]] = True
                        mass += float(p[o])
                    sink = int((pos[bi, hk] == 0).nonzero()[0]) // b
                    keep[bi, h, i, sink] = True
                    if last_q[i] >= N - b:  # the final rows keep every earlier block
                        keep[bi, h, i, earlier] = True
                for j in range(nb):
                    if seg[j] == seg[i]:
                        lo = pos[bi, hk, j * b:(j + 1) * b].min()
                        keep[bi, h, i, j] = bool(lo <= last_q[i])
    return keep


@pytest.mark.parametrize("tau", [0.5, 0.8, 1.0])
def test_select_matches_brute_force(tau):
    q, k, v = rand_qkv(1, 4, 2, 333, 64, seed=None)
    kp, vp, pos = permute_keys(q, k, v, block_size=32, segment_size=64, scale=0.125)
    blocks = select_blocks(q, kp, pos, PbsSettings(block_size=32, segment_size=64, threshold=tau, scale=0.125))
    want = _brute_select(q, kp, pos, 32, 64, tau, 0.125)
    got = blocks.dense_mask()
    # Exact up to ties at the top-p boundary (fp32 rounding of cumulative sums).
    assert (got != want).float().mean() < 0.01
    # Lists are well formed: earlier-segment blocks first, then own-segment blocks.
    nb, seg, _ = block_geometry(333, 32, 64, q.device)
    for i in range(nb):
        n_off, n_tot = int(blocks.n_off[0, 0, i]), int(blocks.n_total[0, 0, i])
        ids = blocks.idx[0, 0, i, :n_tot].long()
        assert (seg[ids[:n_off]] < seg[i]).all() and (seg[ids[n_off:]] == seg[i]).all()


@pytest.mark.parametrize("N,b,S,tau,HQ,H", [
    pytest.param(333, 32, 64, 0.5, 4, 2, id="T333-b32-S64-tau0.5"),
    pytest.param(1000, 64, 256, 0.9, 4, 1, id="T1000-b64-S256-tau0.9"),
    pytest.param(700, 64, 128, 1.0, 2, 2, id="T700-b64-S128-tau1"),
])
def test_select_triton_matches_naive(N, b, S, tau, HQ, H):
    from pbs_kernels.ops.select import select_blocks_naive
    from pbs_kernels.ops.select.fused import select_blocks_triton

    q, k, v = rand_qkv(2, HQ, H, N, 64)
    kp, vp, pos = permute_keys(q, k, v, block_size=b, segment_size=S, scale=0.125)
    want = select_blocks_naive(q, kp, pos, PbsSettings(block_size=b, segment_size=S, threshold=tau, scale=0.125))
    got = select_blocks_triton(q, kp, pos, PbsSettings(block_size=b, segment_size=S, threshold=tau, scale=0.125))
    # Same tiles (bisection vs sort can differ only at exact ties) and the same list order.
    assert (got.dense_mask() != want.dense_mask()).float().mean() < 0.005
    if torch.equal(got.n_total, want.n_total):
        valid = torch.arange(got.idx.shape[-1]) < got.n_total[..., None]
        assert torch.equal(torch.where(valid, got.idx, 0), torch.where(valid, want.idx, 0))
        assert torch.equal(got.n_off, want.n_off)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_threshold_one_keeps_blocks_whose_probability_underflows(backend):
    q, k, v = rand_qkv(1, 2, 2, 512, 64)
    k[:, :, :64] *= 200.0  # pooled scores far apart: other blocks' softmax mass is exactly 0
    pos = torch.arange(512, dtype=torch.int32).expand(1, 2, 512).contiguous()
    blocks = select_blocks(q, k, pos, PbsSettings(block_size=64, segment_size=128, threshold=1.0, scale=0.125,
                                                  backend=backend))
    assert blocks.density_per_head().tolist() == pytest.approx([1.0, 1.0])


@pytest.mark.parametrize("step", [1e-6, 1e-5])
def test_select_bisection_separates_near_ties(step):
    # Every key block's pooled logit differs from the others by a multiple of `step`, so the
    # probabilities at the top-p cut are a few float steps apart: the bisection on their bit
    # patterns must split them exactly where the sorted reference does (a bisection that stops
    # 11 steps short keeps hundreds of extra tiles here).
    from pbs_kernels.ops.select.naive import select_blocks_naive

    N, b = 1024, 32
    q = torch.zeros(1, 2, N, 32)
    q[..., 0] = 1.0
    k = torch.zeros(1, 1, N, 32)
    for j in range(N // b):
        k[0, 0, j * b:(j + 1) * b, 0] = 1.0 + step * ((j * 7) % (N // b))
    pos = torch.arange(N, dtype=torch.int32).expand(1, 1, N).contiguous()
    for tau in (0.3, 0.7):
        got = select_blocks(q, k, pos, PbsSettings(block_size=b, segment_size=64, threshold=tau, scale=1.0,
                                                   backend="triton"))
        want = select_blocks_naive(q, k, pos, PbsSettings(block_size=b, segment_size=64, threshold=tau, scale=1.0))
        assert torch.equal(got.dense_mask(), want.dense_mask())


@pytest.mark.parametrize("N,b,S,tau,HQ,H,est,mass", [
    pytest.param(333, 32, 64, 0.5, 4, 2, "top", "earlier", id="T333-b32-S64-tau0.5-top"),
    pytest.param(333, 32, 64, 0.7, 4, 2, "top", "total", id="T333-b32-S64-tau0.7-top-total"),
    pytest.param(1000, 64, 256, 0.9, 4, 1, "mean", "total", id="T1000-b64-S256-tau0.9-mean-total"),
    pytest.param(1000, 64, 128, 0.9, 2, 2, "top", "total", id="T1000-b64-S128-tau0.9-top-total"),
    pytest.param(700, 64, 128, 1.0, 2, 2, "top", "total", id="T700-b64-S128-tau1-top-total"),
    pytest.param(333, 32, 64, 0.5, 4, 2, "top", "head", id="T333-b32-S64-tau0.5-top-head"),
    pytest.param(1000, 64, 256, 0.9, 4, 1, "mean", "head", id="T1000-b64-S256-tau0.9-mean-head"),
    pytest.param(1000, 64, 128, 0.97, 2, 2, "top", "head", id="T1000-b64-S128-tau0.97-top-head"),
])
def test_select_estimators_triton_matches_naive(N, b, S, tau, HQ, H, est, mass):
    from pbs_kernels.ops.select import select_blocks_naive
    from pbs_kernels.ops.select.fused import select_blocks_triton

    q, k, v = rand_qkv(2, HQ, H, N, 64)
    # A trend over positions gives the rows uneven masses, so the total-mass rule has work to do.
    q[..., :4] += 2.0
    k[..., :4] += torch.linspace(-1.0, 2.0, N)[:, None]
    kp, vp, pos = permute_keys(q, k, v, block_size=b, segment_size=S, scale=0.125)
    kw = dict(block_size=b, segment_size=S, threshold=tau, scale=0.125, estimator=est, threshold_mass=mass)
    want = select_blocks_naive(q, kp, pos, PbsSettings(**kw))
    got = select_blocks_triton(q, kp, pos, PbsSettings(**kw))
    assert (got.dense_mask() != want.dense_mask()).float().mean() < 0.005
    assert (got.n_total - want.n_total).abs().float().mean() < 0.05


def test_top_estimate_is_exact_when_the_other_keys_of_a_block_are_equal():
    from pbs_kernels.blocks import TOP_KEYS, block_representatives, estimated_block_logits, key_block_stats

    g = torch.Generator().manual_seed(3)
    N, b, D = 200, 32, 16  # partial last block of 8 keys
    base = torch.randn(1, 1, N // b + 1, 1, D, generator=g).expand(1, 1, N // b + 1, b, D).reshape(1, 1, -1, D)
    k = base[:, :, :N].clone()
    for j in range(-(-N // b)):
        n = min(b, N - j * b)
        k[0, 0, j * b: j * b + min(TOP_KEYS, n)] = torch.randn(min(TOP_KEYS, n), D, generator=g) * 3.0
    pos = torch.arange(N, dtype=torch.int32).view(1, 1, N)
    q_pool = torch.randn(1, 2, 5, D, generator=g)
    k_pool, _ = key_block_stats(k, pos, b)
    reps, logw = block_representatives(k, k_pool, b, "top")
    got = estimated_block_logits(q_pool, reps, logw, 0.25)
    kpad = torch.nn.functional.pad(k, (0, 0, 0, -N % b), value=float("nan"))
    s = torch.einsum("bhid,bhnd->bhin", q_pool, kpad.expand(1, 2, -1, D)) * 0.25
    want = torch.logsumexp(s.view(1, 2, 5, -1, b).nan_to_num(float("-inf")), dim=-1)
    assert torch.allclose(got, want, atol=1e-4), (got - want).abs().max()


def test_top_estimator_keeps_the_block_of_one_strong_key():
    # One key in block 5 matches every query strongly (logit 16); every other key matches a little
    # (0.8). The block mean dilutes the strong key 32-fold (0.5 < 0.8), so "mean" ranks block 5
    # last and misses it at threshold 0.5, while "top" sees it and keeps it.
    from pbs_kernels.ops.select import select_blocks_naive

    g = torch.Generator().manual_seed(0)
    N, b, D = 512, 32, 32
    q = torch.randn(1, 1, N, D, generator=g) * 0.3
    k = torch.randn(1, 1, N, D, generator=g) * 0.3
    q[..., 0] += 4.0
    k[..., 0] += 0.2
    k[0, 0, 5 * b: 6 * b, 0] -= 0.2
    k[0, 0, 5 * b, 0] = 4.0  # the block's first slot, where permutation puts its top key
    pos = torch.arange(N, dtype=torch.int32).view(1, 1, N)
    kw = dict(block_size=b, segment_size=64, threshold=0.5, scale=1.0)
    row = N // b - 2  # the last block but one (segment 7's first); the final block keeps every tile
    mean = select_blocks_naive(q, k, pos, PbsSettings(estimator="mean", **kw)).dense_mask()[0, 0, row]
    top = select_blocks_naive(q, k, pos, PbsSettings(estimator="top", **kw)).dense_mask()[0, 0, row]
    assert bool(top[5]) and not bool(mean[5])
    assert int(top[:row].sum()) < 6  # of the 14 earlier blocks: the strong key's, the sink and few others


def test_total_mass_keeps_no_earlier_block_for_a_local_row():
    # A local head: each query matches its own and nearby keys strongly, so the own segment holds
    # most of the estimated mass and the total-mass rule keeps only the sink from earlier segments;
    # the earlier-mass rule still spends tiles on the diffuse earlier mass.
    from pbs_kernels.ops.select import select_blocks_naive
    from pbs_kernels.ops.select.naive import earlier_threshold, own_segment_share

    N, b, D = 512, 32, 64
    t = torch.arange(N, dtype=torch.float32)
    freqs = torch.linspace(0.001, 0.02, D // 2)
    code = torch.cat([torch.cos(t[:, None] * freqs), torch.sin(t[:, None] * freqs)], 1)
    g = torch.Generator().manual_seed(1)
    q = (code * 3.0 + 0.1 * torch.randn(N, D, generator=g)).view(1, 1, N, D)
    k = (code * 3.0 + 0.1 * torch.randn(N, D, generator=g)).view(1, 1, N, D)
    pos = torch.arange(N, dtype=torch.int32).view(1, 1, N)
    kw = dict(block_size=b, segment_size=64, threshold=0.8, scale=1.0)
    earlier = select_blocks_naive(q, k, pos, PbsSettings(threshold_mass="earlier", **kw))
    total = select_blocks_naive(q, k, pos, PbsSettings(threshold_mass="total", **kw))
    assert int(total.n_off.sum()) < int(earlier.n_off.sum())
    # The rule itself: a row whose own share reaches the threshold keeps only the sink.
    assert float(earlier_threshold(0.8, torch.tensor(0.9))) < 0 < float(earlier_threshold(0.8, torch.tensor(0.5)))
    s = torch.tensor([[0.0, 0.0, 5.0]])
    share = own_segment_share(s, torch.tensor([[True, True, False]]), torch.tensor([[False, False, True]]))
    assert float(share) == pytest.approx(torch.exp(torch.tensor(5.0)) / (2 + torch.exp(torch.tensor(5.0))))


def _exact_head_cut(p, tau):
    """Brute force of the "head" rule without its grid: per (batch, head), the tiles of largest
    share across all rows until their sum reaches tau x the head's earlier mass."""
    keep = torch.zeros_like(p, dtype=torch.bool)
    for b in range(p.shape[0]):
        for h in range(p.shape[1]):
            flat = p[b, h].flatten()
            order = torch.argsort(flat, descending=True)
            before = torch.cumsum(flat[order], 0) - flat[order]
            chosen = order[(before < tau * flat.sum()) & (flat[order] > 0)]
            keep[b, h].view(-1)[chosen] = True
    return keep


@pytest.mark.parametrize("tau", [0.5, 0.9, 0.99])
def test_head_rule_is_the_exact_cut_up_to_one_grid_bin(tau):
    from pbs_kernels.ops.select.naive import HEAD_BINS_PER_OCTAVE, head_bins, head_keep

    g = torch.Generator().manual_seed(int(tau * 100))
    # Rows of different spread: some put their mass on a few tiles, some on many; row 0 has none.
    logits = torch.randn(2, 3, 12, 40, generator=g) * torch.linspace(0.2, 4.0, 12)[:, None]
    p = torch.softmax(logits, -1)
    p[:, :, 0] = 0.0
    got = head_keep(p, tau)
    exact = _exact_head_cut(p, tau)
    assert bool((exact <= got).all())  # never fewer tiles than the exact cut
    # What it adds lies in the exact cut's last bin: shares within a factor 2^(1/4) of the cut.
    smallest = torch.where(exact, p, torch.ones_like(p)).flatten(2).amin(-1)[:, :, None, None]
    extra = got & ~exact
    assert bool((p[extra.nonzero(as_tuple=True)] * 2 ** (1 / HEAD_BINS_PER_OCTAVE) >=
                 smallest.expand_as(p)[extra.nonzero(as_tuple=True)]).all())
    assert bool((head_bins(p)[got] >= 0).all())
    rows = (p.sum(-1) > 0).sum(-1)
    kept = (p * got).sum((-1, -2)) / rows
    assert bool((kept >= tau - 1e-6).all()), kept  # the mean share kept reaches tau, head by head
    # Unlike the per-row rule, rows differ: the concentrated rows keep fewer tiles than tau of theirs needs.
    per_row = topp_keep(p, tau)
    assert int(got.sum()) < int(per_row.sum())
    assert bool(head_keep(p, 1.0).all())


def test_head_rule_cuts_each_batch_element_and_head_alone():
    from pbs_kernels.ops.select.naive import head_keep

    g = torch.Generator().manual_seed(5)
    p = torch.softmax(torch.randn(2, 2, 8, 30, generator=g) * 3, -1)
    both = head_keep(p, 0.8)
    for b in range(2):
        for h in range(2):
            assert torch.equal(both[b, h], head_keep(p[b:b + 1, h:h + 1], 0.8)[0, 0])


@pytest.mark.parametrize("window, chunk", [(None, 0), (150, 0), (None, 300)], ids=["prefill", "window", "chunk"])
def test_head_rule_triton_matches_naive_on_windows_and_chunks(window, chunk):
    from pbs_kernels.ops.select import select_blocks_naive
    from pbs_kernels.ops.select.fused import select_blocks_triton

    N, b, S = 777, 32, 64
    q, k, v = rand_qkv(1, 4, 2, N, 64)
    q[..., :4] += 2.0
    k[..., :4] += torch.linspace(-1.0, 2.0, N)[:, None]
    kp, vp, pos = permute_keys(q, k, v, block_size=b, segment_size=S, scale=0.125)
    qc = q[:, :, chunk:]
    kw = dict(block_size=b, segment_size=S, threshold=0.8, scale=0.125, threshold_mass="head", window=window)
    want = select_blocks_naive(qc, kp, pos, PbsSettings(**kw))
    got = select_blocks_triton(qc, kp, pos, PbsSettings(**kw))
    assert (got.dense_mask() != want.dense_mask()).float().mean() < 0.005
    row = select_blocks_naive(qc, kp, pos, PbsSettings(**{**kw, "threshold_mass": "earlier"}))
    if not chunk:
        # The same tau buys fewer tiles here. Not asserted for the 300-row chunk: its 15 query
        # blocks hold two final ones kept whole (issue 21), and the head rule then kept 855 tiles
        # against the row rule's 851.
        assert int(want.n_total.sum()) < int(row.n_total.sum())
