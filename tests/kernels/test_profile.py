"""PbsProfile / LayerConfig: round trips, one-line load errors, atomic save, shipped profiles."""

import json
import os
import re
from pathlib import Path

import pytest
import yaml

from pbs_kernels.profile import LayerConfig, PbsProfile, ProfileError, builtin_profile

ROOT = Path(__file__).resolve().parents[2]


def _tuned() -> PbsProfile:
    p = PbsProfile(
        model="org/tiny",
        tuned_for={"seq_len": 32768, "target_speedup": 2.0, "objective": "min_error"},
        defaults=LayerConfig(block_size=64, segment_size=192, threshold=0.85),
        metrics={"predicted_speedup": 2.1, "recall": 0.97, "device": "cpu", "ppl_change": None},
    )
    p.set_layer(0, LayerConfig(block_size=64, segment_size=192, threshold=0.85, dense=True))
    p.set_layer(3, LayerConfig(block_size=64, segment_size=192, threshold=0.95, permute=False))
    return p


def test_defaults_are_the_methods():
    cfg = PbsProfile.default().layer(7)
    assert cfg == LayerConfig(block_size=128, segment_size=256, threshold=0.9, permute=True, min_seq_len=16384, dense=False)


def test_layer_merges_override():
    p = _tuned()
    assert p.layers == {0: {"dense": True}, 3: {"threshold": 0.95, "permute": False}}
    assert p.layer(3) == LayerConfig(block_size=64, segment_size=192, threshold=0.95, permute=False)
    assert p.layer(0).dense and p.layer(0).block_size == 64
    assert p.layer(1) == p.defaults
    p.set_layer(3, p.defaults)  # back to the defaults: the override disappears
    assert 3 not in p.layers


def test_round_trip_yaml(tmp_path):
    p = _tuned()
    path = p.save(tmp_path / "sub" / "tiny.yaml")  # parents are created
    assert path == tmp_path / "sub" / "tiny.yaml"
    assert PbsProfile.load(path) == p
    assert PbsProfile.from_dict(p.to_dict()) == p


def test_round_trip_json_string_layer_keys():
    # `pbs profile show --format json` turns layer keys into strings; from_dict takes them back.
    p = _tuned()
    assert PbsProfile.from_dict(json.loads(json.dumps(p.to_dict()))) == p


def test_threshold_int_becomes_float_and_partial_defaults(tmp_path):
    p = PbsProfile.loads("schema_version: 1\ndefaults: {threshold: 1}\n")
    assert p.defaults.threshold == 1.0 and isinstance(p.defaults.threshold, float)
    assert p.defaults.block_size == 128  # missing fields take the method's defaults


def test_unquoted_timestamp_is_kept_as_text():
    p = PbsProfile.loads("schema_version: 1\ncreated: 2025-01-31T12:00:00Z\n")
    assert isinstance(p.created, str) and p.created.startswith("2025-01-31T12:00:00")


def test_layer_config_validates_on_construction():
    with pytest.raises(ProfileError, match=r"LayerConfig\.threshold = 1\.5 is out of range; allowed \(0, 1\]"):
        LayerConfig(threshold=1.5)
    with pytest.raises(ProfileError, match="LayerConfig.segment_size"):
        LayerConfig(block_size=128, segment_size=192)
    with pytest.raises(ProfileError, match="LayerConfig.block_size"):
        LayerConfig(block_size=True)
    assert LayerConfig(block_size=16, segment_size=32).validate().block_size == 16


GOOD = "schema_version: 1\n"

# (YAML text, the key path the message must name, a piece of the allowed range/type)
MALFORMED = [
    pytest.param(GOOD + "colour: red\n", "unknown key colour", "allowed keys: schema_version", id="unknown-top"),
    pytest.param(GOOD + "defaults: {blocksize: 64}\n", "unknown key defaults.blocksize", "block_size", id="unknown-defaults"),
    pytest.param(GOOD + "layers: {3: {treshold: 0.8}}\n", "unknown key layers.3.treshold", "threshold", id="unknown-layer"),
    pytest.param(GOOD + "tuned_for: {seq: 8}\n", "unknown key tuned_for.seq", "seq_len", id="unknown-tuned-for"),
    pytest.param(GOOD + "defaults: {threshold: '0.9'}\n", "defaults.threshold = '0.9' has type str", "a number in (0, 1]", id="str-as-float"),
    pytest.param(GOOD + "defaults: {block_size: true}\n", "defaults.block_size = True has type bool", "an integer", id="bool-as-int"),
    pytest.param(GOOD + "layers: {2: {min_seq_len: 1.5}}\n", "layers.2.min_seq_len = 1.5 has type float", "an integer", id="float-as-int"),
    pytest.param(GOOD + "defaults: {permute: 1}\n", "defaults.permute = 1 has type int", "true or false", id="int-as-bool"),
    pytest.param(GOOD + "layers: {3: {threshold: 1.5}}\n", "layers.3.threshold = 1.5 is out of range", "allowed (0, 1]", id="threshold-high"),
    pytest.param(GOOD + "defaults: {threshold: 0}\n", "defaults.threshold = 0.0 is out of range", "allowed (0, 1]", id="threshold-zero"),
    pytest.param(GOOD + "defaults: {threshold: .nan}\n", "defaults.threshold = nan is out of range", "(0, 1]", id="threshold-nan"),
    pytest.param(GOOD + "defaults: {block_size: 96, segment_size: 192}\n", "defaults.block_size = 96 is out of range", "16, 32, 64, 128", id="block-size"),
    pytest.param(GOOD + "layers: {1: {block_size: 256}}\n", "layers.1.block_size = 256", "16, 32, 64, 128", id="block-size-layer"),
    pytest.param(GOOD + "defaults: {min_seq_len: -1}\n", "defaults.min_seq_len = -1 is out of range", ">= 0", id="min-seq-len"),
    pytest.param(GOOD + "defaults: {segment_size: 200}\n", "defaults.segment_size = 200 is not a multiple of block_size 128", "multiple", id="segment-multiple"),
    pytest.param(GOOD + "defaults: {segment_size: 0}\n", "defaults.segment_size = 0 is out of range", "positive multiple", id="segment-zero"),
    pytest.param(
        GOOD + "defaults: {block_size: 64, segment_size: 192}\nlayers: {2: {block_size: 128}}\n",
        "layers.2.block_size = 128 does not divide segment_size 192", "divides", id="override-breaks-segment",
    ),
    pytest.param(GOOD + "layers: {x: {dense: true}}\n", "layers key 'x'", "integer >= 0", id="layer-index"),
    pytest.param(GOOD + "layers: {-1: {dense: true}}\n", "layers key -1", "integer >= 0", id="layer-index-negative"),
    pytest.param(GOOD + "layers: {3: 0.5}\n", "layers.3 = 0.5 has type float", "mapping", id="layer-not-mapping"),
    pytest.param(GOOD + "layers: {3: {dense: true}, '3': {dense: false}}\n", "layers.3 is given twice", "once", id="layer-twice"),
    pytest.param(GOOD + "defaults: [1, 2]\n", "defaults = [1, 2] has type list", "mapping", id="defaults-not-mapping"),
    pytest.param(GOOD + "metrics: {recall: [0.9]}\n", "metrics.recall = [0.9] has type list", "number, string or null", id="metric-type"),
    pytest.param(GOOD + "tuned_for: {seq_len: -5}\n", "tuned_for.seq_len = -5 is out of range", "positive integer", id="tuned-seq-len"),
    pytest.param(GOOD + "tuned_for: {target_speedup: 0.5}\n", "tuned_for.target_speedup = 0.5 is out of range", ">= 1", id="tuned-speedup"),
    pytest.param(GOOD + "model: 42\n", "model = 42 has type int", "string", id="model-type"),
    pytest.param(GOOD + "created: yesterday\n", "created = 'yesterday'", "ISO 8601", id="created"),
    pytest.param("schema_version: 2\n", "schema_version = 2 is not supported", "allowed 1", id="schema-2"),
    pytest.param("schema_version: '1'\n", "schema_version = '1' is not supported", "allowed 1", id="schema-str"),
    pytest.param("model: x\n", "schema_version is missing", "allowed 1", id="schema-missing"),
    pytest.param("- 1\n- 2\n", "the document is a list", "expected a mapping", id="not-mapping"),
    pytest.param("just text\n", "the document is a str", "expected a mapping", id="scalar"),
    pytest.param("", "the document is empty", "expected a mapping", id="empty"),
    pytest.param("schema_version: 1\ndefaults: [\n", "not valid YAML (line", "", id="not-yaml"),
    pytest.param(GOOD + "defaults:\n  threshold: 0.8\n  threshold: 0.7\n", "duplicate key 'threshold'", "line 4", id="duplicate-key"),
]


@pytest.mark.parametrize("text, key, allowed", MALFORMED)
def test_load_errors_name_file_key_and_range(tmp_path, text, key, allowed):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ProfileError) as e:
        PbsProfile.load(path)
    message = str(e.value)
    assert message.startswith(f"{path}: "), message
    assert key in message and allowed in message, message
    assert "\n" not in message


def test_example_message_format(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text(GOOD + "layers: {3: {threshold: 1.5}}\n")
    with pytest.raises(ProfileError) as e:
        PbsProfile.load(path)
    assert str(e.value) == f"{path}: layers.3.threshold = 1.5 is out of range; allowed (0, 1]"


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(ProfileError, match=re.escape(f"{tmp_path / 'nope.yaml'}: file not found")):
        PbsProfile.load(tmp_path / "nope.yaml")
    with pytest.raises(ProfileError, match=re.escape(f"{tmp_path}: cannot read")):
        PbsProfile.load(tmp_path)


def test_from_dict_names_source():
    with pytest.raises(ProfileError, match=r"^<dict>: unknown key foo"):
        PbsProfile.from_dict({"schema_version": 1, "foo": 1})
    assert issubclass(ProfileError, ValueError)


def _listing(folder: Path) -> list[str]:
    return sorted(os.listdir(folder))


def test_save_is_atomic_and_leaves_no_temp_files(tmp_path):
    path = tmp_path / "p.yaml"
    PbsProfile.default().save(path)
    assert _listing(tmp_path) == ["p.yaml"]
    assert (path.stat().st_mode & 0o777) == 0o644  # not mkstemp's 0600
    before = path.read_bytes()

    # An invalid profile is refused before anything is written.
    bad = PbsProfile.default()
    bad.layers[2] = {"threshold": 2.0}
    with pytest.raises(ProfileError, match=r"layers\.2\.threshold"):
        bad.save(path)
    assert path.read_bytes() == before and _listing(tmp_path) == ["p.yaml"]


def test_save_failure_keeps_existing_file(tmp_path, monkeypatch):
    path = tmp_path / "p.yaml"
    _tuned().save(path)
    before = path.read_bytes()

    # Serialisation fails: nothing is written.
    def broken_dump(*a, **k):
        raise yaml.YAMLError("boom")

    monkeypatch.setattr(yaml, "safe_dump", broken_dump)
    with pytest.raises(yaml.YAMLError):
        PbsProfile.default().save(path)
    monkeypatch.undo()
    assert path.read_bytes() == before and _listing(tmp_path) == ["p.yaml"]

    # The rename fails after the temp file was written: the temp file is removed.
    def broken_replace(src, dst):
        raise OSError("disk gone")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk gone"):
        PbsProfile.default().save(path)
    monkeypatch.undo()
    assert path.read_bytes() == before and _listing(tmp_path) == ["p.yaml"]
    assert PbsProfile.load(path) == _tuned()


def test_numpy_like_metrics_are_saved_as_plain_numbers(tmp_path):
    class Scalar:  # stands in for numpy.float32 / a 0-d tensor
        def item(self):
            return 0.5

    p = PbsProfile.default()
    p.metrics["recall"] = Scalar()
    p.save(tmp_path / "p.yaml")
    assert PbsProfile.load(tmp_path / "p.yaml").metrics == {"recall": 0.5}


def test_shipped_default_profile():
    repo_copy = ROOT / "profiles" / "default.yaml"
    package_copy = ROOT / "kernels" / "pbs_kernels" / "profiles" / "default.yaml"
    assert repo_copy.read_bytes() == package_copy.read_bytes(), "keep the two default.yaml copies identical"
    loaded = PbsProfile.load(repo_copy)
    assert builtin_profile("default") == loaded
    assert loaded.defaults == LayerConfig() and loaded.layers == {}
    with pytest.raises(ProfileError, match="no built-in profile 'nope'; available: default"):
        builtin_profile("nope")


def test_readme_example_is_valid():
    readme = (ROOT / "profiles" / "README.md").read_text()
    example = readme.split("## Example", 1)[1].split("```yaml\n", 1)[1].split("```", 1)[0]
    p = PbsProfile.loads(example, source="profiles/README.md")
    assert p.layer(0).dense and p.layer(3).threshold == 0.95 and not p.layer(17).permute
