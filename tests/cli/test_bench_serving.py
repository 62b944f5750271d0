"""`pbs bench` serving rows on the CPU pass: a chunk against its cached prefix and a packed varlen
batch, each checked against fp32 dense attention in the same run."""
import json

from typer.testing import CliRunner

from pbs_cli.app import app, main

runner = CliRunner()
SMALL = ["--device", "cpu", "--heads", "4", "--kv-heads", "2", "--head-dim", "64", "--dtype", "fp32",
         "--baselines", "none"]


def test_chunk_and_varlen_rows(tmp_path):
    r = runner.invoke(app, ["bench", *SMALL, "--seq-len", "700", "--chunk", "300", "--lengths", "100,600,600",
                            "--serving-only", "--format", "json", "--out", str(tmp_path)], prog_name="pbs")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["ok"]
    cases = {res["case"]: res for res in doc["results"]}
    assert set(cases) == {"chunk 300 of 700", "varlen 100+600+600"}
    chunk = {m["method"]: m for m in cases["chunk 300 of 700"]["methods"]}
    assert chunk["sdpa-lower-right"]["error"] < 1e-5
    for name in ("pbs-chunk", "pbs-chunk-nocache"):
        assert chunk[name]["status"] == "ok" and 0 < chunk[name]["density"] <= 1 and chunk[name]["error"] < 0.05
    varlen = {m["method"]: m for m in cases["varlen 100+600+600"]["methods"]}
    assert varlen["dense-per-seq"]["error"] < 1e-5 and varlen["pbs-varlen"]["status"] == "ok"
    assert cases["varlen 100+600+600"]["seq_len"] == 1300
    assert "chunk 300 of 700" in (tmp_path / "results.md").read_text()


def test_chunk_not_shorter_than_prompt_is_one_line_error(tmp_path, capsys):
    import pytest

    with pytest.raises(SystemExit) as e:
        main(["bench", *SMALL, "--seq-len", "700", "--chunk", "1k", "--serving-only", "--out", str(tmp_path)])
    assert e.value.code == 1
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("error: ") and "not shorter than the 700-token prompt" in err[0]
    assert not (tmp_path / "results.json").exists()
