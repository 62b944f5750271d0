"""The final rows (the query blocks holding a sequence's last block_size query positions,
`ops.select.naive.final_rows`) keep every causal tile under every rule and threshold: they are
the rows that produce a prompt's answer (issue 21: the head and total rules starved them on
SmolLM2). Checked on both backends, for whole prompts, chunks and packed batches."""
import pytest
import torch

from pbs_kernels import pbs_attention
from pbs_kernels.attention import pbs_attention_varlen, pbs_plan

from _ref import dense_reference, max_err, rand_qkv, rel_err

B16, S = 32, 64  # block and segment of the CPU-sized shapes
RULES = [
    pytest.param(dict(threshold_mass="earlier"), id="earlier"),
    pytest.param(dict(threshold_mass="total"), id="total"),
    pytest.param(dict(threshold_mass="head", estimator="top", vertical_keys=2), id="head-top-vk2"),
]
TOL = {"torch": 1e-5, "triton": 1e-4}  # fp32: summation order only


def _final_rows(N: int, M: int) -> int:
    """How many of the M query rows lie in the final blocks (those holding one of the last B16
    positions): the rows from the start of the block holding position N - B16 on."""
    first = max(0, (N - B16) // B16 * B16)
    return N - max(first, N - M)


def _sparse_rows_see_a_difference(out, ref, n_final):
    # The selection is sparse elsewhere: some row before the final blocks differs from dense.
    return max_err(out[:, :, :-n_final], ref[:, :, :-n_final]) > 1e-3


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("N,M", [
    pytest.param(777, 777, id="T777"),  # ends 9 rows into a block: two final blocks
    pytest.param(640, 640, id="T640"),  # ends on a block edge: one final block
    pytest.param(777, 300, id="T777-chunk300"),
    pytest.param(777, 20, id="T777-chunk20"),  # a chunk shorter than a block
])
def test_final_rows_equal_dense_rows(backend, rule, N, M):
    q, k, v = rand_qkv(1, 4, 2, N, 64)
    qc = q[:, :, N - M:]
    out, st = pbs_attention(qc, k, v, block_size=B16, segment_size=S, threshold=0.3, backend=backend,
                            return_stats=True, **rule)
    ref = dense_reference(qc, k, v)
    n = _final_rows(N, M)
    err = max_err(out[:, :, -n:], ref[:, :, -n:])
    assert err < TOL[backend], f"final rows: max {err:.2e} rel {rel_err(out[:, :, -n:], ref[:, :, -n:]):.2e}"
    if n < M:  # (a chunk of final rows only is all dense)
        assert st.density < 0.9 and _sparse_rows_see_a_difference(out, ref, n)
    # The final blocks' lists hold every causal block (extra own-segment blocks aside).
    mask = st.blocks.dense_mask()[0]  # [HQ, NQB, NKB]
    nb = -(-N // B16)
    for i in range(max(st.blocks.q_block0, (N - B16) // B16), nb):
        assert bool(mask[:, i - st.blocks.q_block0, : i + 1].all()), f"block {i}"


@pytest.mark.parametrize("rule", RULES)
def test_final_rows_same_tiles_in_both_backends(rule):
    """Triton's lists equal the torch reference's in the final rows (all causal tiles) and
    agree elsewhere up to the rule's ties, on an odd shape with grouped heads."""
    N = 1000
    q, k, v = rand_qkv(2, 8, 2, N, 64)
    kw = dict(block_size=B16, segment_size=S, threshold=0.5, **rule)
    plans = {be: pbs_plan(q, k, v, backend=be, **kw) for be in ("torch", "triton")}
    want, got = (plans[be].blocks.dense_mask() for be in ("torch", "triton"))
    assert torch.equal(got[:, :, -2:], want[:, :, -2:])
    assert (got != want).float().mean() < 0.005


def test_threshold_one_still_equals_dense():
    q, k, v = rand_qkv(1, 4, 2, 777, 64)
    for be in ("torch", "triton"):
        for mass in ("earlier", "total", "head"):
            out = pbs_attention(q, k, v, block_size=B16, segment_size=S, threshold=1.0, threshold_mass=mass,
                                backend=be)
            assert rel_err(out, dense_reference(q, k, v)) < TOL[be] * 10, (be, mass)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("mass", ["earlier", "total"])
def test_packed_batch_final_rows_equal_dense_rows(backend, mass):
    """In a packed batch each sequence's final rows are its own (the block holding its last
    query), whatever its neighbours; a chunk's final rows are its last ones."""
    shapes = [(333, 333), (500, 170), (200, 200), (640, 640)]  # (keys, queries)
    seqs = [rand_qkv(1, 4, 2, n, 64, seed=10 + i) for i, (n, _) in enumerate(shapes)]
    q = torch.cat([s[0][0, :, n - m:].transpose(0, 1) for s, (n, m) in zip(seqs, shapes)]).contiguous()
    k, v = (torch.cat([s[j][0].transpose(0, 1) for s in seqs]).contiguous() for j in (1, 2))
    cu_q = torch.tensor([0] + [m for _, m in shapes]).cumsum(0).to(torch.int32)
    cu_k = torch.tensor([0] + [n for n, _ in shapes]).cumsum(0).to(torch.int32)
    out, stats = pbs_attention_varlen(q, k, v, cu_q, cu_k, 640, 640, block_size=B16, segment_size=S,
                                      threshold=0.3, threshold_mass=mass, backend=backend, packed=True,
                                      return_stats=True)
    for i, ((n, m), (qs, ks, vs)) in enumerate(zip(shapes, seqs)):
        ref = dense_reference(qs[:, :, n - m:], ks, vs)[0].transpose(0, 1)  # [m, HQ, D]
        got = out[int(cu_q[i]):int(cu_q[i + 1])]
        r = _final_rows(n, m)
        assert max_err(got[-r:], ref[-r:]) < TOL[backend], f"sequence {i}"
        assert stats[i].density < 1.0
        if r < m:
            assert max_err(got[:-r], ref[:-r]) > 1e-3, f"sequence {i} is not sparse"
