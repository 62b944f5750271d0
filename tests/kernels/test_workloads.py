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
    # BENCHMARKS.md section 17: at D 64, 8K, the bench workload's error at tau 0.9 spans
    # 2.6-4.6% over seeds 0-3 on the CPU (3.4-5.0% before its code fix; 5.33% on the H200), at
    # 0.93 2.0-3.4%. At 2K (seconds on the CPU) the same order: more mass kept, less error,
    # under the gate; and tau's promise (true dropped mass <= 1 - tau) holds at both.
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


def test_positional_code_keeps_its_kernel_below_head_dim_128():
    # Below D=128 the codes map their features exactly (workloads._n_freq, an orthonormal map):
    # code(n).code(m) is the kernel mean_f cos(w_f (n - m)) itself. The random map of 48 features
    # made far-apart positions correlate more (std 0.150 at D 64 against 0.125 at D 128 and 0.097
    # for the exact kernel, 8K), which widened D 64's attention and raised its PBS error
    # (BENCHMARKS.md section 17). D >= 128 keeps 48 features and the random map.
    import math

    from pbs_kernels.workloads import _N_FREQ, _code, _code_mix, _frequencies, _n_freq, _unit_directions

    assert _n_freq(128, 5) == _n_freq(256, 5) == _N_FREQ == 48 and _n_freq(64, 5) == 29
    pos = torch.arange(4096)
    far = pos[None, :] <= pos[-256:, None] - 1024
    g = torch.Generator().manual_seed(1)
    new, old = [], []
    for _ in range(8):
        D, F = 64, _n_freq(64, 5)
        dirs = _unit_directions(5, D, g)
        mix = _code_mix(dirs, D, g)
        assert float((mix @ dirs.T).abs().max()) < 1e-5  # the codes never leak into sink/needle
        om = _frequencies(500.0, g, F)
        code = _code(pos, om, mix)
        ang = pos[-256:, None].double() - pos[None, :].double()
        kernel = torch.cos(ang[..., None] * om.double()).mean(-1).float()
        corr = code[-256:] @ code.T
        assert float((corr - kernel).abs().max()) < 1e-4
        new.append(float(corr[far].std()))
        # The old map at D=64: 48 features, random, not isometric.
        rand = torch.randn(2 * _N_FREQ, D, generator=g)
        rand = rand - (rand @ dirs.T) @ dirs
        old_code = _code(pos, _frequencies(500.0, g), rand)
        old.append(float((old_code[-256:] @ old_code.T)[far].std()))
    assert sum(new) < 0.9 * sum(old), (new, old)
