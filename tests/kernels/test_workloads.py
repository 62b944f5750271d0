"""The vertical-slash workload: shapes, determinism, and the pattern it promises."""
import torch

from pbs_kernels.workloads import WORKLOADS, make_vertical_slash


def test_vertical_slash_is_seeded_and_has_scattered_keys_every_query_needs():
    q, k, v = make_vertical_slash(2048, heads=4, kv_heads=2, head_dim=64, dtype=torch.float32, vertical_every=256)
    q2, k2, _ = make_vertical_slash(2048, heads=4, kv_heads=2, head_dim=64, dtype=torch.float32, vertical_every=256)
    assert q.shape == (1, 4, 2048, 64) and k.shape == v.shape == (1, 2, 2048, 64)
    assert torch.equal(q, q2) and torch.equal(k, k2)
    assert WORKLOADS["vertical"] is make_vertical_slash
    # The last query's attention beyond its recency window sits on a few scattered keys.
    s = torch.softmax(q[0, 0, -1] @ k[0, 0].T / 8.0, -1)[1:2048 - 512]  # past the sink, before the window
    top = torch.topk(s, 8)
    assert float(top.values.sum()) > 0.5 * float(s.sum())
    assert int(top.indices.max() - top.indices.min()) > 512  # spread out, not one cluster
