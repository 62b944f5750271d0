"""`pbs analyze`: the chunked figures against brute-force N x N attention, and the command."""

import json
import math

import pytest
import torch
from typer.testing import CliRunner

import pbs_kernels.analysis as analysis
from pbs_cli.workflows.errors import DeviceError, ModelError, PbsError, UsageError
from pbs_cli.app import app, main
from pbs_kernels.analysis import analyze_layer, cover_count
from pbs_kernels.attention import pbs_plan
from pbs_kernels.ops.permute import permute_keys
from pbs_kernels.ops.select import select_blocks
from pbs_kernels.settings import PbsSettings

runner = CliRunner()


# ---------------------------------------------------------------------------------------------
# Figures against a brute-force dense computation.


def _brute(q, k, bs, S, coverage, threshold, softcap=None, window=None):
    """Everything from the full [B, HQ, N, N] softmax (small inputs only)."""
    B, HQ, N, D = q.shape
    G = HQ // k.shape[1]
    scale = 1 / math.sqrt(D)
    s = (q.double() @ k.repeat_interleave(G, 1).double().transpose(-1, -2)) * scale
    if softcap:
        s = torch.tanh(s / softcap) * softcap
    qp, kp = torch.arange(N)[:, None], torch.arange(N)[None, :]
    banned = kp > qp
    if window:
        banned |= kp <= qp - window
    P = torch.softmax(s.masked_fill(banned, float("-inf")), -1)
    nb = math.ceil(N / bs)
    rows = torch.full((nb,), float(bs), dtype=torch.float64)
    rows[-1] = N - (nb - 1) * bs

    def block_mass(P):
        Pp = torch.nn.functional.pad(P, (0, nb * bs - N, 0, nb * bs - N))
        return Pp.view(B, HQ, nb, bs, nb, bs).sum((3, 5)) / rows[:, None]

    _, _, pos = permute_keys(q, k, k, block_size=bs, segment_size=S, scale=scale)
    P_perm = torch.gather(P, 3, pos.long().repeat_interleave(G, 1)[:, :, None, :].expand(B, HQ, N, N))
    A, A_perm = block_mass(P), block_mass(P_perm)
    tiles = nb * (nb + 1) / 2
    k_perm = torch.gather(k, 2, pos.long()[..., None].expand(-1, -1, -1, D))
    # PBS's selection as the runtime makes it for the layer: inside the window, if any
    s = PbsSettings(block_size=bs, segment_size=S, threshold=threshold, scale=scale, window=window)
    kept = select_blocks(q, k_perm, pos, s).dense_mask()
    blk = torch.arange(N) // bs
    recall = (P_perm * kept[:, :, blk][..., blk]).sum(-1).mean(-1)
    sink = P[..., :bs].sum(-1)[..., bs:].mean(-1) if N > bs else P[..., :bs].sum(-1).mean(-1)
    near = (blk[None, :] == blk[:, None]) | (blk[None, :] == blk[:, None] - 1)
    local = (P * near).sum(-1).mean(-1)
    # The oracle at PBS's recall: tiles added one at a time, largest mass first, per (batch, head).
    at_recall = torch.zeros(B, HQ, dtype=torch.float64)
    for b in range(B):
        for h in range(HQ):
            gain = sorted((A_perm[b, h] * rows[:, None] / N).flatten().tolist(), reverse=True)
            total, n = 0.0, 0
            while total < float(recall[b, h]) - 1e-6 and gain[n] > 0:
                total, n = total + gain[n], n + 1
            at_recall[b, h] = n / tiles
    return dict(
        oracle_density_at_recall=at_recall.mean(0),
        oracle_density=(cover_count(A.float(), coverage).sum(-1) / tiles).mean(0),
        oracle_density_perm=(cover_count(A_perm.float(), coverage).sum(-1) / tiles).mean(0),
        pbs_recall=recall.mean(0), sink_mass=sink.mean(0), local_mass=local.mean(0),
        block_mass=A.mean(0), block_mass_perm=A_perm.mean(0),
    )


CASES = [
    pytest.param(203, 16, 64, 4, 2, None, None, id="N203-b16-S64-HQ4-H2"),
    pytest.param(333, 16, 32, 2, 1, 30.0, None, id="N333-b16-S32-softcap"),
    pytest.param(257, 32, 64, 3, 3, None, 70, id="N257-b32-S64-window70"),
    pytest.param(40, 16, 32, 2, 1, None, None, id="N40-short"),
]


@pytest.mark.parametrize("gather_path", [False, True], ids=["onehot", "gather"])
@pytest.mark.parametrize("N,bs,S,HQ,H,softcap,window", CASES)
def test_figures_match_brute_force(N, bs, S, HQ, H, softcap, window, gather_path, monkeypatch):
    if gather_path:
        monkeypatch.setattr(analysis, "_ONEHOT_MAX_BLOCKS", 0)
    torch.manual_seed(N)
    q = torch.randn(2, HQ, N, 64) * 1.5
    k = torch.randn(2, H, N, 64) * 1.5
    k[:, :, 5] *= 4  # a few strong keys so the oracle has something to find
    # A tiny chunk budget forces several chunks per head (chunk edges inside segments).
    got = analyze_layer(q, k, PbsSettings(block_size=bs, segment_size=S, threshold=0.7, softcap=softcap, window=window),
                        coverage=0.8, return_maps=True, chunk_bytes=150_000)
    want = _brute(q, k, bs, S, 0.8, 0.7, softcap, window)
    tiles = math.ceil(N / bs) * (math.ceil(N / bs) + 1) / 2
    for name, ref in want.items():
        val = getattr(got, name)
        assert val.shape == ref.shape, name
        err = (val.double() - ref.double()).abs().max().item()
        # The oracle count may differ by one tile where fp32 and fp64 recalls straddle a cut.
        tol = 1.01 / tiles if name == "oracle_density_at_recall" else 1e-5
        assert err < tol, f"{name}: max error {err:.2e}"
    assert 0 < got.selection_efficiency <= 1.0 + 1e-6
    assert got.selection_efficiency == pytest.approx(
        float(got.oracle_density_at_recall.mean() / got.pbs_work.mean()), rel=1e-5)
    assert torch.all(got.pbs_density > 0) and torch.all(got.pbs_density_noperm > 0)


@pytest.mark.parametrize("gather_path", [False, True], ids=["onehot", "gather"])
def test_vertical_keys_match_the_attend_reference(gather_path, monkeypatch):
    # Recall with vertical keys = the true softmax mass on the keys the attend reference reads:
    # exp(LSE over its keys - LSE over all causal keys), per query, from a dense fp64 softmax.
    if gather_path:
        monkeypatch.setattr(analysis, "_ONEHOT_MAX_BLOCKS", 0)
    N, bs, S, HQ, H, n = 700, 32, 64, 4, 2, 3
    torch.manual_seed(7)
    q = torch.randn(1, HQ, N, 64) * 1.5
    k = torch.randn(1, H, N, 64) * 1.5
    k[:, :, ::37] *= 3  # scattered strong keys, what vertical keys are for
    kw = dict(block_size=bs, segment_size=S, threshold=0.6)
    # 3 query blocks of 2 heads per chunk: chunk edges inside segments.
    base = analyze_layer(q, k, PbsSettings(**kw), coverage=0.8, chunk_bytes=1_300_000)
    got = analyze_layer(q, k, PbsSettings(vertical_keys=n, **kw), coverage=0.8, chunk_bytes=1_300_000)
    s = (q.double() @ k.repeat_interleave(HQ // H, 1).double().transpose(-1, -2)) / 8.0
    lse_dense = s.masked_fill(torch.ones(N, N, dtype=torch.bool).triu(1), float("-inf")).logsumexp(-1)
    for permute, la, recall, vdens in ((True, got, got.pbs_recall, got.pbs_vertical_density),
                                       (False, got, got.pbs_recall_noperm, got.pbs_vertical_density_noperm),
                                       (True, base, base.pbs_recall, base.pbs_vertical_density)):
        plan = pbs_plan(q, k, k, permute=permute, vertical_keys=la.vertical_keys, backend="torch", **kw)
        _, lse = plan.attend(q, return_lse=True)
        want = torch.exp(lse.double() - lse_dense).mean(-1)[0]
        err = (recall.double() - want).abs().max().item()
        assert err < 1e-5, f"permute={permute} vertical_keys={la.vertical_keys}: recall error {err:.2e}"
        assert float(vdens.mean()) == pytest.approx(plan.vertical_density(), rel=1e-6)
        if permute:  # work = kept tiles + own-segment extras + vertical keys, per causal tile
            work = plan.density_per_head() + plan.blocks.extra_density_per_head() + vdens
            torch.testing.assert_close(la.pbs_work, work)
    assert got.vertical_keys == n and base.vertical_keys == 0
    assert torch.all(got.pbs_vertical_density > 0) and torch.all(base.pbs_vertical_density == 0)
    assert torch.all(got.pbs_recall > base.pbs_recall) and torch.all(got.pbs_recall_noperm > base.pbs_recall_noperm)
    # Vertical keys change the selection figures only through recall and work.
    for name in ("oracle_density", "oracle_density_perm", "pbs_density", "pbs_density_noperm", "sink_mass",
                 "local_mass"):
        assert torch.equal(getattr(got, name), getattr(base, name)), name
    assert torch.all(got.oracle_density_at_recall >= base.oracle_density_at_recall)
    assert got.selection_efficiency == pytest.approx(
        float(got.oracle_density_at_recall.mean() / got.pbs_work.mean()), rel=1e-5)


@pytest.mark.parametrize("bad", [33, -1, 1.5, True])
def test_vertical_keys_out_of_range(bad):
    q, k = torch.randn(1, 2, 80, 64), torch.randn(1, 1, 80, 64)
    with pytest.raises(ValueError, match="vertical_keys .* must be an integer from 0 to block_size 32") as exc:
        analyze_layer(q, k, PbsSettings(block_size=32, segment_size=64, vertical_keys=bad))
    assert "\n" not in str(exc.value)


def test_oracle_finds_scattered_keys_and_permutation_gathers_them():
    # Every query attends almost only to 12 strong keys spread over the past: without
    # permutation they sit in 12 different blocks; PBS's permutation pulls each segment's strong
    # keys into its first block, so the oracle needs fewer tiles.
    torch.manual_seed(0)
    N, bs, S = 512, 16, 128
    q = torch.randn(1, 1, N, 64) * 0.1
    k = torch.randn(1, 1, N, 64) * 0.1
    direction = torch.randn(64)
    strong = torch.tensor([3, 40, 77, 100, 150, 200, 260, 300, 333, 390, 420, 470])
    k[0, 0, strong] += 8 * direction / direction.norm()
    q[0, 0] += 8 * direction / direction.norm()
    got = analyze_layer(q, k, PbsSettings(block_size=bs, segment_size=S), coverage=0.9)
    assert got.oracle_density_perm[0] < 0.8 * got.oracle_density[0]


def test_triton_scoring_gives_the_same_figures():
    # On CUDA the permutation is scored by the Triton kernel; here it runs in the interpreter.
    torch.manual_seed(1)
    q, k = torch.randn(1, 2, 80, 64), torch.randn(1, 1, 80, 64)
    s = PbsSettings(block_size=16, segment_size=32, threshold=0.8)
    a = analyze_layer(q, k, s.replace(backend="torch"), coverage=0.9)
    b = analyze_layer(q, k, s.replace(backend="triton"), coverage=0.9)
    for name in ("oracle_density", "oracle_density_perm", "pbs_density", "pbs_recall"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=1e-5, atol=1e-5)


def test_cover_count():
    mass = torch.tensor([[0.5, 0.3, 0.2, 0.0], [0.25, 0.25, 0.25, 0.25], [1.0, 0.0, 0.0, 0.0]])
    assert cover_count(mass, 0.8).tolist() == [2, 4, 1]
    assert cover_count(mass, 1.0).tolist() == [3, 4, 1]  # zero mass is never counted


# ---------------------------------------------------------------------------------------------
# The command on a tiny saved model.


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from transformers import AutoModelForCausalLM, LlamaConfig

    from pbs_kernels.demo import VOCAB, build_demo_tokenizer

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny")
    config = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=2,
                         num_key_value_heads=1, head_dim=64, vocab_size=len(VOCAB), max_position_embeddings=2048)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    build_demo_tokenizer().save_pretrained(folder)
    return folder


FAST = ["--seq-len", "512", "--block-size", "32", "--segment-size", "64"]


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args], prog_name="pbs")


def test_analyze_table(tiny, tmp_path):
    out = tmp_path / "out"
    r = invoke("analyze", tiny, *FAST, "--out", out, "--device", "cpu")
    assert r.exit_code == 0, r.output
    assert r.stdout == ""  # human output goes to stderr
    for text in ("oracle", "recall", "layers: 3/3 done", "sparsest head", "report.json"):
        assert text in r.stderr, text
    doc = json.loads((out / "report.json").read_text())
    assert [lr["layer"] for lr in doc["layers"]] == [0, 1, 2]
    for name in ("heatmap_most_sparse.png", "heatmap_least_sparse.png", "density_grid.png"):
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000, name
    assert not list(out.glob(".*.tmp"))  # atomic writes leave no temp files


def test_analyze_json(tiny, tmp_path):
    r = invoke("analyze", tiny, *FAST, "--out", tmp_path, "--format", "json", "--layers", "0,2",
               "--coverage", "0.8", "--threshold", "0.7")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["seq_len"] == 512 and doc["coverage"] == 0.8 and doc["threshold"] == 0.7
    assert [lr["layer"] for lr in doc["layers"]] == [0, 2]
    head = doc["layers"][0]["heads"][0]
    for key in ("oracle_density", "oracle_density_perm", "pbs_density", "pbs_recall", "sink_mass", "local_mass"):
        assert 0.0 <= head[key] <= 1.5, key
    assert head["verdict"] in ("helps", "neutral", "hurts")
    assert doc["summary"]["heads_analyzed"] == 4
    assert doc["files"]["report"].endswith("report.json")
    assert json.loads((tmp_path / "report.json").read_text())["layers"] == doc["layers"]


def test_no_model_uses_demo(tiny, tmp_path, monkeypatch):
    import pbs_kernels.demo

    monkeypatch.setattr(pbs_kernels.demo, "demo_model_path", lambda: tiny)
    r = invoke("analyze", *FAST, "--out", tmp_path, "--format", "json", "--layers", "1")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["model"] == "pbs-demo"


def test_vertical_keys_option(tiny, tmp_path, monkeypatch):
    import pbs_kernels.demo

    monkeypatch.setattr(pbs_kernels.demo, "demo_model_path", lambda: tiny)
    r = invoke("analyze", *FAST, "--out", tmp_path, "--format", "json", "--layers", "1", "--vertical-keys", "2")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["vertical_keys"] == 2 and doc["summary"]["vertical_keys"] == 2
    head = doc["layers"][0]["heads"][0]
    # Work counts the vertical keys on top of the kept tiles.
    assert head["pbs_vertical_density"] > 0 and head["pbs_work"] >= head["pbs_density"] + head["pbs_vertical_density"]
    assert json.loads((tmp_path / "report.json").read_text())["vertical_keys"] == 2
    r = invoke("analyze", *FAST, "--out", tmp_path / "t", "--layers", "1", "--vertical-keys", "2")
    assert r.exit_code == 0 and "vertical keys 2" in r.stderr, r.output

    r = invoke("analyze", *FAST, "--out", tmp_path / "bad", "--vertical-keys", "999")
    assert r.exit_code == 2, r.output
    assert "999 is not from 0 to --block-size 32" in " ".join(r.stderr.split()) and r.stdout == ""
    assert not (tmp_path / "bad").exists()  # refused before any work


def test_threshold_mass_head_option(tiny, tmp_path):
    args = ("analyze", tiny, *FAST, "--format", "json", "--layers", "1", "--threshold", "0.8")
    row = json.loads(invoke(*args, "--out", tmp_path / "row").stdout)
    r = invoke(*args, "--threshold-mass", "head", "--out", tmp_path / "head")
    assert r.exit_code == 0, r.output
    head = json.loads(r.stdout)
    assert head["summary"]["threshold_mass"] == "head" and row["summary"]["threshold_mass"] == "earlier"
    # One cut per head: the same threshold for the mean of the rows keeps fewer tiles than for each row.
    assert head["summary"]["pbs_density"] < row["summary"]["pbs_density"]
    r = invoke("analyze", tiny, *FAST, "--threshold-mass", "rows", "--out", tmp_path / "bad")
    assert r.exit_code == 2 and "earlier, total, head" in " ".join(r.stderr.split()), r.output


def test_short_input_is_repeated_or_refused(tiny, tmp_path):
    text = tmp_path / "prompt.txt"
    text.write_text("put k0001 v002 ; the cat sees a dog . get k0001 v002 ;")
    r = invoke("analyze", tiny, *FAST, "--input", text, "--out", tmp_path / "o", "--layers", "0")
    assert r.exit_code == 0, r.output
    assert "fewer than --seq-len 512: repeated it" in r.stderr

    r = invoke("analyze", tiny, *FAST, "--input", text, "--no-extend", "--out", tmp_path / "o")
    assert isinstance(r.exception, UsageError) and r.exit_code == 1
    assert "fewer than --seq-len 512" in str(r.exception)


def _error(args, exc_type, text):
    r = invoke("analyze", *args)
    assert r.exit_code == 1, r.output
    assert isinstance(r.exception, exc_type), repr(r.exception)
    message = str(r.exception)
    assert "\n" not in message and text in message, message
    return message


def test_error_model_not_found(tmp_path):
    _error(["pbs-test-org/no-such-model", "--out", tmp_path], ModelError,
           "neither a local folder nor in the local Hugging Face cache")
    _error([tmp_path / "missing" / "folder", "--out", tmp_path], ModelError, "no such folder")


def test_error_architecture_without_attention_interface(tmp_path):
    from transformers import AutoModelForCausalLM, BloomConfig

    AutoModelForCausalLM.from_config(BloomConfig(hidden_size=64, n_layer=1, n_head=2, vocab_size=300)).save_pretrained(tmp_path)
    _error([tmp_path, *FAST, "--out", tmp_path / "o"], ModelError, "AttentionInterface")


def test_error_seq_len_beyond_model(tiny, tmp_path):
    _error([tiny, "--seq-len", "4k", "--out", tmp_path], UsageError, "exceeds")


def test_error_bad_layers(tiny, tmp_path):
    _error([tiny, *FAST, "--layers", "5", "--out", tmp_path], UsageError, "the model has 3 layers")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_error_no_gpu(tiny, tmp_path):
    _error([tiny, *FAST, "--device", "cuda", "--out", tmp_path], DeviceError, "no CUDA GPU")


def test_error_cuda_out_of_memory(tiny, tmp_path, monkeypatch):
    import pbs_cli.workflows.analyze as workflow

    def oom(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(workflow, "run_analysis", oom)
    _error([tiny, *FAST, "--out", tmp_path], DeviceError, "smaller --seq-len or fewer --layers")


def test_bad_block_size_is_a_usage_error(tiny, tmp_path):
    r = invoke("analyze", tiny, "--block-size", "48", "--out", tmp_path)
    assert r.exit_code == 2
    r = invoke("analyze", tiny, "--block-size", "32", "--segment-size", "48", "--out", tmp_path)
    assert r.exit_code == 2


def test_main_prints_one_line(capsys, tmp_path):
    with pytest.raises(SystemExit) as exc:
        main(["analyze", "pbs-test-org/no-such-model", "--out", str(tmp_path)])
    assert exc.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("error: model 'pbs-test-org/no-such-model' is neither")
    assert len(err.strip().splitlines()) == 2  # the message and the PBS_DEBUG hint


def test_pbs_error_family():
    assert issubclass(ModelError, PbsError) and issubclass(DeviceError, PbsError)
