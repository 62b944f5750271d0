"""PBS profiles: per-layer attention settings as typed dataclasses, stored as YAML.

A profile holds method defaults plus per-layer overrides. Everything is checked at load, so
kernels receive plain, valid ints and floats; every load error is one line naming the file, the
key path and what is allowed. The schema is described in profiles/README.md.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from datetime import date, datetime, timezone
from pathlib import Path
from typing import Any, Mapping

import yaml

from ._io import write_atomic
from .limits import BLOCK_SIZES, ESTIMATORS, THRESHOLD_MASS
from .settings import LAYER_FIELDS, PbsSettings

__all__ = ["LayerConfig", "PbsProfile", "ProfileError", "builtin_profile"]

SCHEMA_VERSION = 1
TUNED_FOR_KEYS = ("seq_len", "target_speedup", "objective")


class ProfileError(ValueError):
    """A profile that cannot be used; the message is one line: file, key path, what is allowed."""


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _show(value: Any) -> str:
    # repr() keeps the message on one line (newlines escaped) and shows '0.9' vs 0.9.
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


# ---------------------------------------------------------------------------------------------
# Field checks, shared by LayerConfig.validate() and the loader (which adds file and key path).


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)  # True is an int to Python, not to us


def _is_number(v: Any) -> bool:
    return _is_int(v) or isinstance(v, float)


# field -> (kind, range check, allowed text). kind: "int" | "float" | "bool".
_LAYER_FIELDS: dict[str, tuple[str, Any, str]] = {
    "block_size": ("int", lambda v: v in BLOCK_SIZES, f"one of {', '.join(map(str, BLOCK_SIZES))}"),
    "segment_size": ("int", lambda v: v > 0, "a positive multiple of block_size"),
    "threshold": ("float", lambda v: 0.0 < v <= 1.0, "(0, 1]"),  # NaN fails both comparisons
    "permute": ("bool", None, "true or false"),
    "min_seq_len": ("int_or_auto", lambda v: v == "auto" or v >= 0, "an integer >= 0 or auto"),
    "dense": ("bool", None, "true or false"),
    "estimator": ("str", lambda v: v in ESTIMATORS, f"one of {', '.join(ESTIMATORS)}"),
    "threshold_mass": ("str", lambda v: v in THRESHOLD_MASS, f"one of {', '.join(THRESHOLD_MASS)}"),
    "vertical_keys": ("int", lambda v: 0 <= v <= max(BLOCK_SIZES), "an integer from 0 to block_size"),
}


def _check_field(name: str, value: Any, where: str) -> Any:
    """Return the value in canonical type (ints as float for float fields) or raise."""
    kind, in_range, allowed = _LAYER_FIELDS[name]
    if kind == "int_or_auto" and not (_is_int(value) or value == "auto"):
        raise ProfileError(f"{where} = {_show(value)} has type {_type_name(value)}; expected {allowed}")
    if kind == "int" and not _is_int(value):
        expected = allowed if allowed.startswith("an integer") else f"an integer, {allowed}"
        raise ProfileError(f"{where} = {_show(value)} has type {_type_name(value)}; expected {expected}")
    if kind == "float":
        if not _is_number(value):
            raise ProfileError(f"{where} = {_show(value)} has type {_type_name(value)}; expected a number in {allowed}")
        value = float(value)
    if kind == "str" and not isinstance(value, str):
        raise ProfileError(f"{where} = {_show(value)} has type {_type_name(value)}; expected {allowed}")
    if kind == "bool" and not isinstance(value, bool):
        raise ProfileError(f"{where} = {_show(value)} has type {_type_name(value)}; expected true or false")
    if in_range is not None and not in_range(value):
        raise ProfileError(f"{where} = {_show(value)} is out of range; allowed {allowed}")
    return value


def _check_layer(values: Mapping[str, Any], where: str, explicit: Mapping[str, Any] | None = None) -> dict:
    """Check a complete set of layer fields; `explicit` (an override) decides which key to blame."""
    out = {name: _check_field(name, values[name], f"{where}.{name}") for name in _LAYER_FIELDS}
    block, segment = out["block_size"], out["segment_size"]
    if segment % block:
        # Blame the key the user wrote: an override of block_size alone breaks the default segment.
        if explicit is not None and "segment_size" not in explicit:
            raise ProfileError(
                f"{where}.block_size = {block} does not divide segment_size {segment} (from defaults); "
                f"allowed one of {', '.join(map(str, BLOCK_SIZES))} that divides segment_size"
            )
        raise ProfileError(
            f"{where}.segment_size = {segment} is not a multiple of block_size {block}; "
            "allowed a positive multiple of block_size"
        )
    if out["vertical_keys"] > block:
        raise ProfileError(f"{where}.vertical_keys = {out['vertical_keys']} exceeds block_size {block}; "
                           "allowed an integer from 0 to block_size")
    return out


def _check_keys(d: Mapping[str, Any], allowed: tuple[str, ...], where: str) -> None:
    for key in d:
        if key not in allowed:
            path = f"{where}.{key}" if where else str(key)
            raise ProfileError(f"unknown key {path}; allowed keys: {', '.join(allowed)}")


def _check_mapping(value: Any, where: str, what: str) -> dict:
    if not isinstance(value, Mapping):
        raise ProfileError(f"{where} = {_show(value)} has type {_type_name(value)}; expected a mapping of {what}")
    return dict(value)


# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerConfig:
    """PBS settings of one attention layer; the defaults are the method's (docs/design.md, "The method")."""

    block_size: int = 128
    segment_size: int = 256
    threshold: float = 0.9
    permute: bool = True
    # Below it a prompt runs dense: the kernel lost to dense attention below ~16K tokens at 32 / 8
    # heads, D 128. "auto": the faster path measured once per shape (pbs_kernels.crossover).
    min_seq_len: int | str = 16384
    dense: bool = False  # this layer always runs dense attention
    # How selection estimates a tile's mass and what the threshold is a share of
    # (pbs_kernels.limits); neither wins everywhere (BENCHMARKS.md, section 8), so tune searches them.
    estimator: str = "mean"
    threshold_mass: str = "earlier"
    # Exact keys per earlier segment beyond the kept tiles (pbs_kernels.limits.VERTICAL_KEYS).
    vertical_keys: int = 0

    def __post_init__(self) -> None:
        self.validate()
        # threshold: 1 (an int) is valid; store a float so kernels see one type.
        object.__setattr__(self, "threshold", float(self.threshold))

    def plan_kwargs(self) -> dict[str, Any]:
        """The pbs_plan / pbs_attention keywords this layer sets (`settings.LAYER_FIELDS`;
        min_seq_len and dense are the caller's to apply)."""
        return {name: getattr(self, name) for name in LAYER_FIELDS}

    def settings(self, **call: Any) -> PbsSettings:
        """The runtime's settings for this layer: its fields and min_seq_len, plus the call's
        (window, softcap, scale, backend; any field of `PbsSettings`). `dense` is the caller's."""
        return PbsSettings(**self.plan_kwargs(), **{"min_seq_len": self.min_seq_len, **call})

    def short_for(self, n_keys: int) -> bool:
        """Whether a prompt of `n_keys` keys runs dense by its length alone, as pbs_attention
        decides: one segment or less, or under an integer min_seq_len ("auto" is decided at run
        time, by measurement). `dense` is the caller's to check."""
        return n_keys <= self.segment_size or (self.min_seq_len != "auto" and n_keys < self.min_seq_len)

    def validate(self) -> LayerConfig:
        """Raise ProfileError naming the field and its allowed range; return self when valid."""
        _check_layer(dataclasses.asdict(self), "LayerConfig")
        return self


_LAYER_KEYS = tuple(f.name for f in dataclasses.fields(LayerConfig))
# A per-layer knob of the runtime is a key of the profile schema too.
assert set(LAYER_FIELDS) <= set(_LAYER_KEYS) and set(LAYER_FIELDS) <= set(_LAYER_FIELDS)
# A layer override may also say why it is what it is (`pbs tune` writes it, e.g. for a sliding-
# window layer kept exact inside its window): free text, not a setting.
REASON_KEY = "reason"
_TOP_KEYS = ("schema_version", "model", "created", "tuned_for", "defaults", "layers", "metrics")


@dataclass(kw_only=True)
class PbsProfile:
    """Defaults plus per-layer overrides. `layers[i]` holds only the fields that differ (or
    `{"dense": True}`); `layer(i)` merges them. Checked on load and before save. Keyword-only
    construction: `PbsProfile(model=..., defaults=LayerConfig(...))`."""

    schema_version: int = SCHEMA_VERSION
    model: str | None = None
    created: str | None = field(default_factory=_now)  # ISO 8601; None when unknown
    tuned_for: dict[str, Any] = field(default_factory=lambda: dict.fromkeys(TUNED_FOR_KEYS))
    defaults: LayerConfig = field(default_factory=LayerConfig)
    layers: dict[int, dict[str, Any]] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)

    # -- queries ---------------------------------------------------------------------------

    def layer(self, idx: int) -> LayerConfig:
        """The settings of layer `idx`: defaults merged with its override, if any."""
        override = {k: v for k, v in (self.layers.get(idx) or {}).items() if k != REASON_KEY}
        return dataclasses.replace(self.defaults, **override) if override else self.defaults

    def reason(self, idx: int) -> str | None:
        """Why layer `idx` has its settings, when the profile says (`reason:` in its override)."""
        return (self.layers.get(idx) or {}).get(REASON_KEY)

    def set_layer(self, idx: int, config: LayerConfig) -> None:
        """Store `config` for layer `idx` as the fields that differ from the defaults."""
        diff = {
            k: v for k, v in dataclasses.asdict(config).items() if getattr(self.defaults, k) != v
        }
        if diff:
            self.layers[idx] = diff
        else:
            self.layers.pop(idx, None)

    # -- conversion ------------------------------------------------------------------------

    @classmethod
    def default(cls) -> PbsProfile:
        """The method's defaults for every layer, no overrides."""
        return cls()

    def to_dict(self) -> dict[str, Any]:
        """Plain data in schema order (YAML/JSON-ready); layer keys stay ints."""
        return {
            "schema_version": self.schema_version,
            "model": self.model,
            "created": self.created,
            "tuned_for": {k: _plain(self.tuned_for.get(k)) for k in TUNED_FOR_KEYS},
            "defaults": dataclasses.asdict(self.defaults),
            "layers": {i: dict(self.layers[i]) for i in sorted(self.layers)},
            "metrics": {k: _plain(v) for k, v in self.metrics.items()},
        }

    @classmethod
    def from_dict(cls, d: Any, source: str = "<dict>") -> PbsProfile:
        """Build and check a profile; a ProfileError message starts with `source: `."""
        try:
            return cls._parse(d)
        except ProfileError as e:
            raise ProfileError(f"{source}: {e}") from None

    def validate(self) -> PbsProfile:
        """Re-check a profile built or edited in code; return self."""
        type(self).from_dict(self.to_dict(), source="<PbsProfile>")
        return self

    # -- files -----------------------------------------------------------------------------

    @classmethod
    def load(cls, path: str | os.PathLike) -> PbsProfile:
        """Read a profile YAML; any problem is a one-line ProfileError naming the file."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ProfileError(f"{path}: file not found") from None
        except UnicodeDecodeError:
            raise ProfileError(f"{path}: not a text file; expected a YAML profile") from None
        except OSError as e:
            raise ProfileError(f"{path}: cannot read ({e.strerror or e})") from None
        return cls.loads(text, source=str(path))

    @classmethod
    def loads(cls, text: str, source: str = "<string>") -> PbsProfile:
        """Parse profile YAML text; `source` names it in errors."""
        try:
            data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
        except yaml.YAMLError as e:
            raise ProfileError(f"{source}: not valid YAML ({_yaml_problem(e)})") from None
        return cls.from_dict(data, source=source)

    def dumps(self) -> str:
        header = f"# PBS profile, schema_version {SCHEMA_VERSION}; keys are described in profiles/README.md\n"
        return header + yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=False)

    def save(self, path: str | os.PathLike) -> Path:
        """Write atomically: a temp file in the same folder, then os.replace. An existing file is
        either fully replaced or untouched, never half-written."""
        self.validate()
        text = self.dumps()  # serialise before touching the disk: a failure here writes nothing
        return write_atomic(Path(path), text)

    # -- parsing ---------------------------------------------------------------------------

    @classmethod
    def _parse(cls, d: Any) -> PbsProfile:
        if not isinstance(d, Mapping):
            kind = "empty" if d is None else f"a {_type_name(d)}"
            raise ProfileError(f"the document is {kind}; expected a mapping with keys {', '.join(_TOP_KEYS)}")
        _check_keys(d, _TOP_KEYS, "")
        if "schema_version" not in d:
            raise ProfileError(f"schema_version is missing; allowed {SCHEMA_VERSION}")
        version = d["schema_version"]
        if not _is_int(version) or version != SCHEMA_VERSION:
            raise ProfileError(f"schema_version = {_show(version)} is not supported; allowed {SCHEMA_VERSION}")

        model = d.get("model")
        if model is not None and not isinstance(model, str):
            raise ProfileError(f"model = {_show(model)} has type {_type_name(model)}; expected a string or null")

        created = d.get("created")
        if isinstance(created, date):  # YAML turns an unquoted timestamp into a date(time)
            created = created.isoformat()
        if created is not None:
            if not isinstance(created, str) or not _is_iso_time(created):
                raise ProfileError(f"created = {_show(created)} is not an ISO 8601 time; expected e.g. 2025-01-31T12:00:00+00:00")

        tuned_for = _check_mapping(d.get("tuned_for") or {}, "tuned_for", "seq_len, target_speedup, objective")
        _check_keys(tuned_for, TUNED_FOR_KEYS, "tuned_for")
        tuned_for = {k: tuned_for.get(k) for k in TUNED_FOR_KEYS}
        _check_optional(tuned_for["seq_len"], _is_int, lambda v: v > 0, "tuned_for.seq_len", "a positive integer")
        _check_optional(tuned_for["target_speedup"], _is_number, lambda v: v >= 1.0, "tuned_for.target_speedup", "a number >= 1")
        _check_optional(tuned_for["objective"], lambda v: isinstance(v, str), None, "tuned_for.objective", "a string")
        if tuned_for["target_speedup"] is not None:
            tuned_for["target_speedup"] = float(tuned_for["target_speedup"])

        raw_defaults = _check_mapping(d.get("defaults") or {}, "defaults", "layer settings")
        _check_keys(raw_defaults, _LAYER_KEYS, "defaults")
        # Missing default fields take the method's defaults, so a profile can say only what differs.
        base = dataclasses.asdict(LayerConfig())
        defaults = _check_layer({**base, **raw_defaults}, "defaults")

        layers: dict[int, dict[str, Any]] = {}
        raw_layers = _check_mapping(d.get("layers") or {}, "layers", "layer index -> settings")
        for raw_idx, raw in raw_layers.items():
            idx = _layer_index(raw_idx)
            where = f"layers.{raw_idx}"
            if idx in layers:
                raise ProfileError(f"{where} is given twice (as {idx!r} and {str(idx)!r}); allowed once per layer")
            override = _check_mapping(raw, where, "layer settings, e.g. {threshold: 0.8} or {dense: true}")
            _check_keys(override, _LAYER_KEYS + (REASON_KEY,), where)
            reason = override.pop(REASON_KEY, None)
            if reason is not None and not isinstance(reason, str):
                raise ProfileError(f"{where}.{REASON_KEY} = {_show(reason)} has type {_type_name(reason)}; "
                                   "expected a string")
            merged = _check_layer({**defaults, **override}, where, explicit=override)
            layers[idx] = {k: merged[k] for k in override}
            if reason is not None:
                layers[idx][REASON_KEY] = reason

        metrics = _check_mapping(d.get("metrics") or {}, "metrics", "name -> number or string")
        for key, value in metrics.items():
            if not isinstance(key, str):
                raise ProfileError(f"metrics key {_show(key)} has type {_type_name(key)}; expected a string")
            if isinstance(value, float) and not math.isfinite(value):
                continue  # .nan / .inf are valid YAML numbers; a failed measurement may record them
            if value is not None and not isinstance(value, (int, float, str)):
                raise ProfileError(f"metrics.{key} = {_show(value)} has type {_type_name(value)}; expected a number, string or null")

        return cls(
            defaults=LayerConfig(**defaults),
            layers=layers,
            model=model,
            created=created,
            tuned_for=tuned_for,
            metrics=metrics,
            schema_version=version,
        )


def _plain(value: Any) -> Any:
    # numpy/torch scalars subclass or mimic float/int but YAML's safe dumper refuses them.
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    item = getattr(value, "item", None)  # numpy.float32, 0-d tensors
    return item() if callable(item) else value


def _check_optional(value: Any, type_ok: Any, in_range: Any, where: str, allowed: str) -> None:
    if value is None:
        return
    if not type_ok(value):
        raise ProfileError(f"{where} = {_show(value)} has type {_type_name(value)}; expected {allowed} or null")
    if in_range is not None and not in_range(value):
        raise ProfileError(f"{where} = {_show(value)} is out of range; allowed {allowed}")


def _layer_index(key: Any) -> int:
    # YAML gives int keys; JSON (profile show --format json) turns them into strings: take both.
    if _is_int(key) and key >= 0:
        return key
    if isinstance(key, str) and key.isdigit() and key.isascii():
        return int(key)
    raise ProfileError(f"layers key {_show(key)} is not a layer index; allowed an integer >= 0")


def _is_iso_time(text: str) -> bool:
    try:
        datetime.fromisoformat(text.replace("Z", "+00:00"))  # Python 3.10 rejects a bare Z
    except ValueError:
        return False
    return True


def _yaml_problem(e: yaml.YAMLError) -> str:
    mark = getattr(e, "problem_mark", None)
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return where + " ".join(str(problem).split())


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys, which PyYAML would otherwise let the last win
    silently (a hand-edited profile with two `threshold:` lines)."""

    def construct_mapping(self, node, deep=False):  # type: ignore[override]
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, (str, int, float, bool)) and key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            if isinstance(key, (str, int, float, bool)):
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


def builtin_profile(name: str = "default") -> PbsProfile:
    """A profile shipped inside the package (kernels/pbs_kernels/profiles/NAME.yaml)."""
    folder = Path(__file__).parent / "profiles"
    available = sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))
    if name not in available:
        raise ProfileError(f"no built-in profile {name!r}; available: {', '.join(available)}")
    return PbsProfile.loads((folder / f"{name}.yaml").read_text(encoding="utf-8"), source=f"<builtin {name}>")
