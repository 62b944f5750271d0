"""`pbs bench` on the CPU: option parsing, the synthetic workload's structure, the correctness
gate, the JSON/CSV outputs and the no-GPU path. Timing itself needs a GPU (test_bench_gpu.py)."""

import csv
import json
import math

import pytest
import torch
from typer.testing import CliRunner

from pbs_cli.workflows.bench import workflow as bw
from pbs_kernels.reference import dense_reference, tile_reference
from pbs_cli.workflows.errors import DeviceError, PbsError
from pbs_cli.commands._options import parse_lengths
from pbs_cli.app import app, main
from pbs_kernels.ops.attend import attend
from pbs_kernels.ops.permute import permute_keys_naive
from pbs_kernels.ops.select import select_blocks
from pbs_kernels.settings import PbsSettings
from pbs_kernels.workloads import HEAD_KINDS, make_workload, workload_info

from _ref import dense_ref, rel_err

runner = CliRunner()
TINY = ["--device", "cpu", "--seq-len", "512", "--heads", "4", "--kv-heads", "2", "--head-dim", "64"]


def invoke(*args):
    return runner.invoke(app, ["bench", *args], prog_name="pbs")


@pytest.fixture
def small_profile(tmp_path):
    """Blocks of 32 so that 512-1024 tokens have several segments (the defaults keep every tile)."""
    path = tmp_path / "small.yaml"
    path.write_text("schema_version: 1\ndefaults: {block_size: 32, segment_size: 64, threshold: 0.9, "
                    "permute: true, min_seq_len: 0, dense: false}\n")
    return path


# ---------------------------------------------------------------------------------------------
# Options.


def test_seq_len_forms():
    assert parse_lengths("8192") == [8192]
    assert parse_lengths("8k,32k,128K") == [8192, 32768, 131072]
    assert parse_lengths("1m") == [1 << 20]


@pytest.mark.parametrize("args,needle", [
    (["--seq-len", "12q"], "not a length"),
    (["--seq-len", "0"], "positive"),
    (["--baselines", "cudnn,bogus"], "unknown baseline"),
    (["--head-dim", "112"], "64, 80, 96, 128, 256"),
    (["--workload", "recorded"], "recorded"),
])
def test_bad_options_exit_2(args, needle):
    r = invoke(*args)
    assert r.exit_code == 2, r.output
    assert needle in r.output


def test_heads_must_divide_exit_1():
    r = invoke("--device", "cpu", "--seq-len", "512", "--heads", "6", "--kv-heads", "4", "--head-dim", "64")
    assert r.exit_code == 1
    assert isinstance(r.exception, PbsError) and "multiple of --kv-heads" in str(r.exception)


def test_missing_profile_is_one_line(tmp_path):
    r = invoke(*TINY, "--profile", str(tmp_path / "nope.yaml"), "--out", str(tmp_path))
    assert r.exit_code == 1
    assert isinstance(r.exception, PbsError) and "file not found" in str(r.exception)


def test_no_gpu_is_one_line_suggesting_cpu(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("PBS_DEBUG", raising=False)
    with pytest.raises(SystemExit) as e:
        main(["bench", "--seq-len", "8k"])
    assert e.value.code == 1
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("error: no CUDA GPU found") and "--device cpu" in err[0]
    assert len(err) == 2  # the message and the PBS_DEBUG hint
    with pytest.raises(DeviceError):
        bw.resolve_bench_device("cuda")


# ---------------------------------------------------------------------------------------------
# The synthetic workload.


def test_workload_shapes_and_determinism():
    q, k, v = make_workload(300, heads=4, kv_heads=2, head_dim=64, dtype=torch.float16, seed=3)
    assert q.shape == (1, 4, 300, 64) and k.shape == v.shape == (1, 2, 300, 64)
    assert q.dtype == k.dtype == v.dtype == torch.float16
    q2, k2, v2 = make_workload(300, heads=4, kv_heads=2, head_dim=64, dtype=torch.float16, seed=3)
    assert torch.equal(q, q2) and torch.equal(k, k2) and torch.equal(v, v2)
    q3, _, _ = make_workload(300, heads=4, kv_heads=2, head_dim=64, dtype=torch.float16, seed=4)
    assert not torch.equal(q, q3)
    assert all(torch.isfinite(t).all() for t in (q, k, v))
    # Batch entries share the structure but not the noise.
    qb, _, _ = make_workload(300, heads=4, kv_heads=2, head_dim=64, batch=2, seed=3)
    assert not torch.equal(qb[0], qb[1])
    with pytest.raises(ValueError):
        make_workload(300, heads=6, kv_heads=4)


def test_workload_mixes_every_kind():
    info = workload_info(8192, heads=32, kv_heads=8, seed=0)
    kinds = [h.kind for h in info.heads]
    assert set(kinds) == set(HEAD_KINDS)
    # Kinds are spread over the KV groups: no group is all one kind.
    assert all(len(set(kinds[g * 4:(g + 1) * 4])) > 1 for g in range(8))


N_S, HQ_S, H_S, D_S = 2048, 8, 2, 64


@pytest.fixture(scope="module")
def structured():
    """Exact fp32 attention probabilities of a small workload: [HQ, N, N]."""
    q, k, v, info = make_workload(N_S, HQ_S, H_S, D_S, dtype=torch.float32, seed=0, return_info=True)
    G = HQ_S // H_S
    s = q[0] @ k[0].repeat_interleave(G, 0).transpose(-1, -2) * D_S ** -0.5
    s = s.masked_fill(torch.ones(N_S, N_S, dtype=torch.bool).triu(1), float("-inf"))
    return q, k, v, info, torch.softmax(s, dim=-1)


def _heads(info, kind):
    heads = info.heads_of_kind(kind)
    assert heads, f"no {kind} head in the test workload"
    return heads


def test_sink_heads_put_most_mass_on_the_first_tokens(structured):
    _, _, _, info, p = structured
    sink = p[:, 256:, :4].sum(-1).mean(-1)  # queries past the first segment
    for h in _heads(info, "sink"):
        assert sink[h] > 0.5, f"head {h}: sink mass {sink[h]:.2f}"
    assert sink.mean() > 20 * 4 / N_S  # every head leans on the sink more than uniform would


def test_local_heads_attend_to_recent_keys(structured):
    _, _, _, info, p = structured
    back = torch.arange(N_S)[:, None] - torch.arange(N_S)[None, :]
    local = (p * ((back >= 0) & (back < 512))).sum(-1)[:, 1024:].mean(-1)
    for h in _heads(info, "local"):
        assert local[h] > 0.6, f"head {h}: local mass {local[h]:.2f}"


def test_slash_heads_attend_at_fixed_offsets(structured):
    _, _, _, info, p = structured
    G = HQ_S // H_S
    back = torch.arange(N_S)[:, None] - torch.arange(N_S)[None, :]
    for h in _heads(info, "slash"):
        near = info.kv_heads[h // G].slash_offsets[0]
        line = (back - near).abs() <= 2
        mass = (p[h] * line).sum(-1)[near + 256:].mean()
        assert mass > 20 * 5 / N_S, f"head {h}: mass on the slash at offset {near}: {mass:.3f}"


def _oracle_density(p, key_order, b, tau=0.9):
    """Fewest tiles per query block that hold `tau` of its exact attention mass / causal tiles."""
    N = p.shape[-1]
    nb = N // b
    tiles = p[:, key_order].reshape(nb, b, nb, b).sum(dim=(1, 3))
    kept = 0
    for i in range(nb):
        mass = torch.sort(tiles[i, : i + 1] / tiles[i, : i + 1].sum(), descending=True).values
        kept += min(i + 1, int((torch.cumsum(mass, 0) < tau).sum()) + 1)
    return kept / (nb * (nb + 1) / 2)


def test_permutation_lowers_oracle_density_of_needle_heads(structured):
    q, k, v, info, p = structured
    G = HQ_S // H_S
    b, S = 64, 128
    _, _, pos = permute_keys_naive(q, k, v, block_size=b, segment_size=S, scale=D_S ** -0.5)
    for h in _heads(info, "needle"):
        order = pos[0, h // G].long()
        with_perm = _oracle_density(p[h], order, b)
        without = _oracle_density(p[h], torch.arange(N_S), b)
        assert with_perm < 0.9 * without, f"head {h}: oracle density {with_perm:.3f} permuted vs {without:.3f}"
        # The needle keys really are scattered: many blocks hold some.
        assert info.needle_mask[0, h // G].reshape(-1, b).any(-1).sum() >= 8


def test_pbs_on_the_workload_is_sparse_and_accurate():
    """With the method's defaults (blocks of 128, threshold 0.9), PBS keeps a minority of the
    tiles with a small output error, already at 4K tokens (density falls with length: about 0.2
    at 8K and 0.1 at 32K on the GPU bench's 32-head workload)."""
    from pbs_kernels import pbs_attention

    q, k, v = make_workload(4096, 4, 1, 128, dtype=torch.float32, seed=0)
    out, stats = pbs_attention(q, k, v, threshold=0.9, backend="torch", return_stats=True)
    assert stats.density < 0.45
    assert rel_err(out, dense_reference(q, k, v, 128 ** -0.5)) < 0.05


# ---------------------------------------------------------------------------------------------
# Workflow pieces.


def test_reference_fp32_matches_dense_in_chunks():
    q, k, v = make_workload(300, 4, 2, 64, dtype=torch.float32, seed=2)
    ref = dense_reference(q, k, v, 0.125, budget_bytes=4 * 2 * 300 * 37)  # forces small row chunks
    assert rel_err(ref, dense_ref(q, k, v)) < 1e-5


def test_tile_reference_and_kernel_error():
    q, k, v = make_workload(640, 4, 2, 64, dtype=torch.float32, seed=5)
    scale = 0.125
    kp, vp, pos = permute_keys_naive(q, k, v, block_size=32, segment_size=64, scale=scale)
    blocks = select_blocks(q, kp, pos, PbsSettings(block_size=32, segment_size=64, threshold=0.8, scale=scale))
    out = attend(q, kp, vp, pos, blocks, scale=scale)
    qblocks = bw.check_blocks(blocks.num_blocks, 32, 64)
    assert qblocks[-1] == blocks.num_blocks - 1 and qblocks[0] == 2 and len(qblocks) == bw.N_CHECK_BLOCKS
    ref_rows, rows = tile_reference(q, kp, vp, pos, blocks, qblocks, scale)
    assert bw.kernel_error(out, ref_rows, rows) < 1e-5
    assert bw.kernel_error(out.flip(2), ref_rows, rows) > 0.1


def test_flex_block_mask_holds_exactly_the_kept_tiles():
    pytest.importorskip("torch.nn.attention.flex_attention")
    q, k, v = make_workload(512, 4, 2, 64, dtype=torch.float32, seed=6)
    kp, vp, pos = permute_keys_naive(q, k, v, block_size=32, segment_size=64, scale=0.125)
    blocks = select_blocks(q, kp, pos, PbsSettings(block_size=32, segment_size=64, threshold=0.8, scale=0.125))
    for checked in (False, True):
        bm = bw.flex_block_mask(blocks, pos, 2, 512, tile_checked_mask=checked)
        assert torch.equal(bm.to_dense().bool(), blocks.dense_mask())
        # Earlier-segment tiles are full blocks (no mask), own-segment tiles are partial.
        assert torch.equal(bm.full_kv_num_blocks, blocks.n_off)
        assert torch.equal(bm.kv_num_blocks, blocks.n_total - blocks.n_off)


def test_flops_are_exact():
    # Dense causal: 4*D flops per allowed pair, N(N+1)/2 pairs per head.
    assert bw.causal_flops(1, 32, 128, 131072) == 4 * 128 * 32 * 131072 * 131073 / 2
    assert bw.tile_flops(10, 128, 128) == 10 * 4 * 128 * 128 * 128


def test_timing_helpers_without_a_gpu():
    from pbs_cli.workflows.timing import expand_kv, fastest_dense_ms, sdpa_runner

    q, k, v = make_workload(256, 4, 2, 64, dtype=torch.float32, seed=7)
    kx, vx = expand_kv(q, k, v)
    assert kx.shape == vx.shape == q.shape and torch.equal(kx[:, 1], k[:, 0]) and torch.equal(kx[:, 2], k[:, 1])
    run = sdpa_runner("flash", q, k, v)
    assert not run.available and "CUDA" in run.reason
    with pytest.raises(RuntimeError):
        run()
    math_run = sdpa_runner("math", q, k, v, scale=0.125)
    assert math_run.available and rel_err(math_run(), dense_ref(q, k, v)) < 1e-5
    with pytest.raises(RuntimeError, match="no dense SDPA backend"):
        fastest_dense_ms(q, k, v)
    with pytest.raises(ValueError):
        sdpa_runner("fastest", q, k, v)


def test_a_wrong_kernel_is_failed(monkeypatch):
    """The gate compares the kernel with exact attention on the same tiles: a broken attend
    fails even when the error bound vs dense would let it through."""
    import pbs_kernels.attention as attend_mod  # where PbsPlan.attend looks the kernel up

    real = attend_mod.attend

    def broken(q, k_perm, v_perm, pos, blocks, **kw):
        res = real(q, k_perm, v_perm, pos, blocks, **kw)
        if kw.get("return_lse"):
            return res[0] * 1.2, res[1]
        return res * 1.2

    monkeypatch.setattr(attend_mod, "attend", broken)
    s = bw.BenchSettings(seq_lens=[512], heads=4, kv_heads=2, head_dim=64, device="cpu", baselines=("noperm",),
                         max_error=10.0)
    report = bw.run_bench(s)
    rows = {m.method: m for m in report.results[0].methods}
    assert rows["pbs"].status == "FAILED" and rows["pbs"].kernel_error > 0.1
    assert "kernel_error" in rows["pbs"].note
    assert rows["pbs-noperm"].status == "FAILED"
    assert rows["pbs"].speedup is None
    assert set(report.failed) >= {"512:pbs", "512:pbs-noperm"}


# ---------------------------------------------------------------------------------------------
# The command end to end (cpu: correctness only).


@pytest.fixture(scope="module")
def json_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    r = runner.invoke(app, ["bench", *TINY, "--format", "json", "--out", str(out)], prog_name="pbs")
    return r, out


METHODS = ["sdpa-cudnn", "sdpa-flash", "sdpa-efficient", "pbs", "pbs.permute", "pbs.select", "pbs.attend",
           "pbs-auto", "flex", "flex.attend", "pbs-noperm"]


def test_json_schema(json_run):
    r, _ = json_run
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)  # exactly one JSON document on stdout
    assert set(doc) == {"env", "settings", "pbs", "workload", "results", "e2e", "notes", "failed", "ok"}
    assert doc["ok"] is True and doc["failed"] == [] and doc["e2e"] == []
    env = doc["env"]
    assert env["device"] == "cpu" and env["dtype"] == "float32" and isinstance(env["torch"], str)
    assert "correctness only" in env["timing"]
    assert doc["pbs"] == {"block_size": 128, "segment_size": 256, "threshold": 0.9, "permute": True,
                          "source": "defaults", "min_seq_len": 16384, "estimator": "mean",
                          "threshold_mass": "earlier", "vertical_keys": 0}
    assert doc["workload"] == "synthetic" and doc["settings"]["seq_lens"] == [512]
    (res,) = doc["results"]
    assert (res["seq_len"], res["heads"], res["kv_heads"], res["head_dim"], res["batch"]) == (512, 4, 2, 64, 1)
    assert res["reference"] == "fp32" and res["fastest_dense"] is None
    assert [m["method"] for m in res["methods"]] == METHODS
    fields = {"method", "status", "ms", "flops", "tflops", "density", "recall", "error", "kernel_error", "speedup",
              "selection_efficiency", "note"}
    for m in res["methods"]:
        assert set(m) == fields
        assert m["ms"] is None and m["speedup"] is None  # no timing on the cpu
        for key in ("density", "recall", "error", "kernel_error", "flops"):
            assert m[key] is None or isinstance(m[key], float)
    rows = {m["method"]: m for m in res["methods"]}
    for name in ("sdpa-cudnn", "sdpa-flash", "sdpa-efficient"):
        assert rows[name]["status"] == "unavailable" and "CUDA" in rows[name]["note"]
    for name in ("pbs", "flex", "flex.attend", "pbs-noperm"):
        row = rows[name]
        assert row["status"] == "ok", row
        assert row["error"] < 0.05 and row["kernel_error"] < 1e-4 and 0.9 < row["recall"] <= 1.0
    assert rows["pbs"]["flops"] == rows["flex.attend"]["flops"] > 0
    # Oracle tiles at PBS's recall / PBS's tiles: in (0, 1]; only the pbs row has one.
    assert 0.0 < rows["pbs"]["selection_efficiency"] <= 1.0
    assert rows["flex"]["selection_efficiency"] is None


def test_csv_and_markdown_files(json_run):
    r, out = json_run
    assert r.exit_code == 0, r.output
    with open(out / "results.csv", newline="") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == bw.CSV_COLUMNS
        rows = list(reader)
    assert [row["method"] for row in rows] == METHODS
    assert all(row["seq_len"] == "512" for row in rows)
    pbs = next(row for row in rows if row["method"] == "pbs")
    assert pbs["status"] == "ok" and pbs["ms"] == "" and math.isfinite(float(pbs["error"]))
    doc = json.loads((out / "results.json").read_text())
    assert doc == json.loads(r.stdout)
    md = (out / "results.md").read_text()
    assert "| method | status |" in md and "| pbs | ok |" in md
    assert not (out / "time_vs_seq_len.png").exists()  # nothing timed, nothing to plot
    assert sorted(p.name for p in out.iterdir()) == ["results.csv", "results.json", "results.md"]


def test_table_output_goes_to_stderr(tmp_path):
    r = invoke(*TINY, "--baselines", "none", "--out", str(tmp_path))
    assert r.exit_code == 0, r.output
    assert r.stdout == ""
    for text in ("device cpu", "pbs.attend", "512 tokens", "reference fp32", "wrote"):
        assert text in r.stderr, text
    assert "sdpa-cudnn" not in r.stderr


def test_cpu_caps_lengths_and_profile_knobs_apply(tmp_path, small_profile):
    r = invoke("--device", "cpu", "--seq-len", "8k", "--heads", "4", "--kv-heads", "2", "--head-dim", "64",
               "--profile", str(small_profile), "--baselines", "none", "--max-error", "1",
               "--format", "json", "--out", str(tmp_path))
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert [res["seq_len"] for res in doc["results"]] == [bw.CPU_MAX_SEQ_LEN]
    assert any("capped" in n for n in doc["notes"])
    assert doc["pbs"]["block_size"] == 32 and doc["pbs"]["source"].endswith("layer 0")
    pbs = doc["results"][0]["methods"][0]
    assert 0 < pbs["density"] < 0.6 and 0.5 < pbs["recall"] < 1 and pbs["kernel_error"] < 1e-4


def test_flex_and_noperm_on_small_blocks(tmp_path, small_profile):
    r = invoke(*TINY, "--profile", str(small_profile), "--baselines", "flex,noperm", "--max-error", "1",
               "--format", "json", "--out", str(tmp_path))
    assert r.exit_code == 0, r.output
    rows = {m["method"]: m for m in json.loads(r.stdout)["results"][0]["methods"]}
    assert 0 < rows["pbs"]["density"] < 1
    # FlexAttention on the same tiles gives the same output.
    assert rows["flex"]["density"] == rows["flex.attend"]["density"] == rows["pbs"]["density"]
    assert rows["flex.attend"]["error"] == pytest.approx(rows["pbs"]["error"], rel=1e-3, abs=1e-5)
    assert rows["flex.attend"]["kernel_error"] < 1e-4 and rows["pbs"]["kernel_error"] < 1e-4
    assert rows["pbs-noperm"]["status"] == "ok" and rows["pbs-noperm"]["density"] > 0


def test_vertical_keys_from_the_profile(tmp_path):
    # The same tiles as without them, more work, a lower error on the vertical-slash workload, and
    # the kernel still checked against a reference that adds the same keys; flex has none.
    docs = {}
    for n in (0, 2):
        prof = tmp_path / f"v{n}.yaml"
        prof.write_text("schema_version: 1\ndefaults: {block_size: 32, segment_size: 128, threshold: 0.7, "
                        f"permute: true, min_seq_len: 0, dense: false, vertical_keys: {n}}}\n")
        r = invoke(*TINY[:3], "1024", *TINY[4:], "--workload", "vertical", "--profile", str(prof),
                   "--baselines", "flex", "--max-error", "1", "--format", "json", "--out", str(tmp_path / f"o{n}"))
        assert r.exit_code == 0, r.output
        docs[n] = json.loads(r.stdout)
    assert docs[2]["pbs"]["vertical_keys"] == 2
    off, on = (next(m for m in docs[n]["results"][0]["methods"] if m["method"] == "pbs") for n in (0, 2))
    assert on["density"] == off["density"] and on["flops"] > off["flops"]
    # The efficiency counts the vertical keys' mass and work (analyze_layer(vertical_keys=)).
    assert on["selection_efficiency"] != off["selection_efficiency"]
    assert on["kernel_error"] < 1e-4 and on["error"] < 0.7 * off["error"], (on["error"], off["error"])
    flex = next(m for m in docs[2]["results"][0]["methods"] if m["method"] == "flex")
    assert flex["status"] == "skipped" and "vertical keys" in flex["note"]


def test_error_gate_is_an_absolute_floor_at_every_threshold_below_one():
    # harness.MAX_ERROR: the floor a speedup is credited at, whatever tau (a tau-derived gate
    # would pass any tau); 2e-2 at threshold 1.0 (dense); --max-error overrides both.
    from types import SimpleNamespace

    from pbs_cli.workflows.bench.harness import MAX_ERROR, Harness
    from pbs_cli.workflows.bench.results import PbsConfig
    from pbs_kernels.profile import LayerConfig

    def gate(tau, max_error=None):
        cfg = PbsConfig(LayerConfig(threshold=tau), "defaults")
        return Harness(SimpleNamespace(max_error=max_error), cfg, torch.device("cpu"), torch.float32,
                       lambda *a: None).max_error

    assert MAX_ERROR == 0.05
    assert [gate(t) for t in (0.5, 0.9, 0.93, 0.99)] == [MAX_ERROR] * 4
    assert gate(1.0) == 2e-2 and gate(0.9, max_error=0.07) == 0.07


def test_error_gate_fails_rows_and_exits_1(tmp_path):
    r = invoke(*TINY, "--baselines", "noperm", "--max-error", "1e-12", "--format", "json", "--out", str(tmp_path))
    assert r.exit_code == 1
    assert isinstance(r.exception, PbsError) and "FAILED" in str(r.exception)
    doc = json.loads(r.stdout)  # results are still printed and written
    assert doc["ok"] is False and "512:pbs" in doc["failed"]
    pbs = doc["results"][0]["methods"][0]
    assert pbs["method"] == "pbs" and pbs["status"] == "FAILED" and pbs["speedup"] is None
    assert "max error" in pbs["note"]
    assert json.loads((tmp_path / "results.json").read_text())["ok"] is False


def test_threshold_one_is_dense(tmp_path):
    prof = tmp_path / "t1.yaml"
    prof.write_text("schema_version: 1\ndefaults: {block_size: 32, segment_size: 64, threshold: 1.0, "
                    "permute: true, min_seq_len: 0, dense: false}\n")
    r = invoke(*TINY, "--profile", str(prof), "--baselines", "none", "--format", "json", "--out", str(tmp_path / "o"))
    assert r.exit_code == 0, r.output
    pbs = json.loads(r.stdout)["results"][0]["methods"][0]
    assert pbs["error"] < 1e-5 and pbs["recall"] == pytest.approx(1.0, abs=1e-5) and pbs["density"] >= 1.0


def test_pbs_auto_row_below_min_seq_len(tmp_path):
    # Below the profile's min_seq_len a model runs dense: the bench times that path as "pbs-auto".
    prof = tmp_path / "auto.yaml"
    prof.write_text("schema_version: 1\ndefaults: {block_size: 32, segment_size: 64, threshold: 0.9, "
                    "permute: true, min_seq_len: 1024, dense: false}\n")
    r = invoke(*TINY, "--profile", str(prof), "--baselines", "none", "--max-error", "1", "--format", "json",
               "--out", str(tmp_path / "o"))
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    rows = {m["method"]: m for m in doc["results"][0]["methods"]}
    assert rows["pbs"]["density"] < 1.0  # the sparse path is still benched
    auto = rows["pbs-auto"]
    assert auto["status"] == "ok" and auto["density"] == 1.0 and auto["error"] < 1e-5
    assert "min_seq_len 1024" in auto["note"] and any("pbs-auto" in n for n in doc["notes"])
    # At or above min_seq_len the pbs row is what runs: no extra row.
    r = invoke("--device", "cpu", "--seq-len", "1024", "--heads", "4", "--kv-heads", "2", "--head-dim", "64",
               "--profile", str(prof), "--baselines", "none", "--max-error", "1", "--format", "json",
               "--out", str(tmp_path / "o2"))
    assert r.exit_code == 0, r.output
    assert "pbs-auto" not in {m["method"] for m in json.loads(r.stdout)["results"][0]["methods"]}


@pytest.fixture
def demo_model():
    """Skips when the shipped demo model cannot be loaded here."""
    try:
        from pbs_kernels.demo import demo_model_path

        return demo_model_path()
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"demo model unavailable: {e}")


def test_captured_workload_from_the_demo_model(tmp_path, demo_model):
    pytest.importorskip("transformers")
    r = invoke("--device", "cpu", "--workload", "captured", "--seq-len", "512", "--layer", "1",
               "--baselines", "noperm", "--max-error", "1", "--format", "json", "--out", str(tmp_path))
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    res = doc["results"][0]
    assert (res["heads"], res["kv_heads"], res["head_dim"]) == (4, 2, 64)  # the demo model's, not --heads
    assert any("captured pbs-demo layer 1" in n for n in doc["notes"])
    pbs = res["methods"][0]
    assert pbs["status"] == "ok" and pbs["kernel_error"] < 1e-4
    r = invoke("--device", "cpu", "--workload", "captured", "--seq-len", "512", "--layer", "9", "--out", str(tmp_path))
    assert r.exit_code == 1 and "--layer 9" in str(r.exception)


def test_e2e_on_the_demo_model(small_profile, demo_model):
    pytest.importorskip("pbs_kernels.integrations.hf")
    s = bw.BenchSettings(seq_lens=[512], heads=4, kv_heads=2, head_dim=64, device="cpu", baselines=(),
                         profile=str(small_profile), max_error=1.0, e2e=True, e2e_warmup=0, e2e_reps=1)
    report = bw.run_bench(s)
    (e2e,) = report.e2e
    assert e2e.seq_len == 512 and e2e.ttft_dense_ms > 0 and e2e.ttft_pbs_ms > 0 and e2e.speedup > 0
    assert [row["method"] for row in bw.csv_rows(report)][-2:] == ["ttft-dense", "ttft-pbs"]
    assert any("not meaningful" in n for n in report.notes)


def test_plot_of_timed_results(tmp_path):
    pytest.importorskip("matplotlib")
    from pbs_cli.commands.bench import write_outputs
    from pbs_cli.workflows.bench.render import plot_png
    from pbs_kernels.profile import LayerConfig

    env = bw.EnvInfo("NVIDIA test card", "12.8", None, "2.11", "3.6", None, "bfloat16", "median of do_bench")
    cfg = bw.PbsConfig(LayerConfig(128, 256, 0.9, True), "defaults")
    report = bw.BenchReport(env, {}, cfg, "synthetic")
    for n, dense_ms, pbs_ms in ((8192, 2.0, 3.0), (32768, 30.0, 12.0)):
        res = bw.SeqLenResult(n, 1, 32, 8, 128, "fp32", "cudnn", dense_ms)
        res.methods = [bw.MethodResult("sdpa-cudnn", "ok", ms=dense_ms, speedup=1.0),
                       bw.MethodResult("pbs", "ok", ms=pbs_ms, speedup=dense_ms / pbs_ms),
                       bw.MethodResult("pbs.attend", "ok", ms=pbs_ms / 2),
                       bw.MethodResult("flex", "FAILED", ms=1.0)]
        report.results.append(res)
    png = plot_png(report)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    files = write_outputs(report, tmp_path)
    assert [f.name for f in files] == ["results.json", "results.csv", "results.md", "time_vs_seq_len.png"]
    assert "| pbs | ok | 3.000 |" in (tmp_path / "results.md").read_text()


def test_timed_path_simulated_on_cpu(monkeypatch):
    """The GPU-only branches (timing, dense baselines, speedups, the dense reference) run here
    with wall-clock timing and SDPA's math backend standing in for cuDNN/flash/efficient."""
    import time

    import pbs_cli.workflows.timing as timing

    def wall_ms(fn, **kw):
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3

    real_runner = timing.sdpa_runner

    def math_runner(name, q, k, v, **kw):
        if name == "efficient":
            return timing.SdpaRun(name, None, "not on this card")
        run = real_runner("math", q, k, v, **kw)
        return timing.SdpaRun(name, run.fn)

    real_init = bw.Harness.__init__

    def timed_init(self, *a, **kw):
        real_init(self, *a, **kw)
        self.timed = True

    monkeypatch.setattr(timing, "time_ms", wall_ms)
    monkeypatch.setattr(timing, "sdpa_runner", math_runner)
    monkeypatch.setattr(bw.Harness, "__init__", timed_init)
    s = bw.BenchSettings(seq_lens=[512], heads=4, kv_heads=2, head_dim=64, device="cpu",
                         baselines=("cudnn", "flash", "efficient", "noperm"), fp32_ref_max_len=256)
    report = bw.run_bench(s)
    result, = report.results
    rows = {m.method: m for m in result.methods}
    assert result.fastest_dense in ("cudnn", "flash") and result.reference == f"sdpa-{result.fastest_dense}"
    assert rows["sdpa-efficient"].status == "unavailable" and rows["sdpa-efficient"].note == "not on this card"
    for name in ("sdpa-cudnn", "sdpa-flash"):
        assert rows[name].status == "ok" and rows[name].error < 1e-5 and rows[name].tflops > 0
    assert rows[f"sdpa-{result.fastest_dense}"].speedup == 1.0
    for name in ("pbs", "pbs-noperm"):
        m = rows[name]
        assert m.status == "ok" and m.ms > 0 and m.speedup == pytest.approx(result.fastest_dense_ms / m.ms)
    for name in ("pbs.permute", "pbs.select", "pbs.attend"):
        assert rows[name].ms > 0 and rows[name].speedup is None
    assert rows["pbs.attend"].tflops == pytest.approx(rows["pbs"].flops / (rows["pbs.attend"].ms * 1e-3) / 1e12)


def test_pbs_auto_row_with_measured_min_seq_len(tmp_path):
    # min_seq_len: auto: the pbs-auto row runs what pbs_attention measured faster and says which.
    from pbs_kernels import crossover

    crossover.forget()
    prof = tmp_path / "measured.yaml"
    prof.write_text("schema_version: 1\ndefaults: {block_size: 32, segment_size: 64, threshold: 0.9, "
                    "permute: true, min_seq_len: auto, dense: false}\n")
    r = invoke(*TINY, "--profile", str(prof), "--baselines", "none", "--max-error", "1", "--format", "json",
               "--out", str(tmp_path / "o"))
    crossover.forget()
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["pbs"]["min_seq_len"] == "auto" and any("min_seq_len auto" in n for n in doc["notes"])
    auto = {m["method"]: m for m in doc["results"][0]["methods"]}["pbs-auto"]
    assert auto["status"] == "ok" and auto["note"].startswith("min_seq_len auto: ")
    chose_dense = "dense measured faster" in auto["note"]
    assert chose_dense == (auto["density"] == 1.0)
