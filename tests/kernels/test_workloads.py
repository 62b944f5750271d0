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


def test_logit_noise_does_not_depend_on_head_dim():
    # A pattern's component against the other side's noise adds logit noise of std
    # k_size * noise * scale (keys' components, k_size = 3 D^(1/4)) and logit * noise / k_size
    # (queries' components): measured on random draws, equal at D = 64 and 128; D = 128 keeps 0.6.
    from pbs_kernels.workloads import _noise_std

    assert _noise_std(128) == 0.6
    g = torch.Generator().manual_seed(0)
    stds = {}
    for D in (64, 128):
        scale, k_size = D ** -0.5, 3.0 * D ** 0.25
        u = torch.nn.functional.normalize(torch.randn(D, generator=g), dim=0)
        noise = _noise_std(D) * torch.randn(20000, D, generator=g)
        stds[D] = float((noise @ (k_size * u) * scale).std())
    assert abs(stds[64] / stds[128] - 1) < 0.03, stds


def test_head_dim_64_meets_the_bench_gate_at_threshold_093():
    # BENCHMARKS.md section 17: at D 64 the bench workload sits at the 5% gate with tau 0.9
    # (8K: 3.4-5.0% over seeds 0-3 on the CPU, 5.33% on the H200) and under it at 0.93. At 2K
    # (seconds on the CPU) the same order: more mass kept, less error, under the gate; and
    # tau's promise (true dropped mass <= 1 - tau) holds at both.
    from pbs_cli.workflows.bench.harness import MAX_ERROR
    from pbs_kernels.attention import pbs_plan
    from pbs_kernels.metrics import output_error, recall_from_lse
    from pbs_kernels.reference import dense_reference
    from pbs_kernels.workloads import make_workload

    q, k, v = make_workload(2048, 9, 3, 64, dtype=torch.float32, seed=0)
    ref = dense_reference(q, k, v)
    _, lse_full = pbs_plan(q, k, v, threshold=1.0, backend="torch").attend(q, return_lse=True)
    err, recall = {}, {}
    for tau in (0.9, 0.93):
        out, lse = pbs_plan(q, k, v, threshold=tau, backend="torch").attend(q, return_lse=True)
        err[tau], recall[tau] = output_error(out, ref), recall_from_lse(lse, lse_full)
        assert 1.0 - recall[tau] <= 1.0 - tau, (tau, recall[tau])
    assert recall[0.93] > recall[0.9] and err[0.93] < err[0.9], (err, recall)
    assert err[0.93] < MAX_ERROR, err
