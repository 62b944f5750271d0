"""The embedded demo model: where it lives, the synthetic corpus it was trained on, and a check
of how well it retrieves.

The corpus is built so that a small model needs long-range, scattered attention to predict it:

* filler: sentences from a small grammar (determiner / adjective / noun / verb agreement, topic
  nouns that recur within a paragraph), which trains local, previous-token and sink heads;
* records ``put k0412 v017 v233 ;`` scattered through the filler, and later queries
  ``get k0412 v017 v233 ;`` whose value can only be predicted by finding the record, often
  thousands of tokens back (a key-value lookup: induction through a unique key);
* quoted spans ``quote s012 s045 ... unquote`` repeated much later as ``repeat s012 s045 ...
  unquote`` (copying a long span from far back).

Everything here is pure Python (``random.Random``) so the text is the same on every platform for
a given seed, and the runtime needs no extra dependency. The vocabulary is fixed, one token per
whitespace-separated word, so a text of ``n`` words plus the BOS token is exactly ``n + 1`` tokens.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "DemoDoc",
    "DemoEval",
    "DemoModelMissing",
    "VOCAB",
    "build_demo_tokenizer",
    "demo_doc",
    "demo_eval",
    "demo_model_path",
    "demo_text",
]

# ---------------------------------------------------------------------------------------------
# Vocabulary. Order is part of the model: token id = index in VOCAB. Never reorder; only append.

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
SPECIALS = (PAD, BOS, EOS, UNK)

N_KEYS = 1024  # unique keys per document: ~8 records per 1000 tokens -> enough for 128K tokens
N_VALUES = 256
N_SPAN_SYMBOLS = 128
KEYS = tuple(f"k{i:04d}" for i in range(N_KEYS))
VALUES = tuple(f"v{i:03d}" for i in range(N_VALUES))
SPAN_SYMBOLS = tuple(f"s{i:03d}" for i in range(N_SPAN_SYMBOLS))
STRUCTURE = ("put", "get", ";", "quote", "repeat", "unquote")

_DETS_SG = ("the", "a", "this", "that", "every", "my", "our", "one")
_DETS_PL = ("the", "these", "those", "some", "many", "my", "our", "two")
_ADJS = (
    "red", "blue", "green", "old", "young", "small", "large", "quiet", "loud", "bright",
    "dark", "warm", "cold", "quick", "slow", "tall", "short", "happy", "sad", "clever",
    "brave", "calm", "busy", "empty", "heavy", "light", "round", "sharp", "soft", "strange",
)  # fmt: skip
_NOUNS = (
    "cat", "dog", "bird", "fish", "horse", "tree", "river", "house", "city", "road",
    "farmer", "doctor", "teacher", "child", "king", "queen", "boat", "train", "lamp", "book",
    "garden", "forest", "stone", "cloud", "window", "door", "table", "letter", "song", "market",
    "bridge", "tower", "field", "island", "engine", "painter", "sailor", "baker", "mountain", "valley",
)  # fmt: skip
# (singular, plural) verb forms; subject number decides which one follows.
_VERBS = (
    ("sees", "see"), ("finds", "find"), ("likes", "like"), ("takes", "take"), ("builds", "build"),
    ("paints", "paint"), ("follows", "follow"), ("carries", "carry"), ("visits", "visit"),
    ("watches", "watch"), ("helps", "help"), ("moves", "move"), ("opens", "open"),
    ("keeps", "keep"), ("draws", "draw"), ("meets", "meet"), ("reads", "read"), ("hears", "hear"),
    ("calls", "call"), ("leaves", "leave"), ("brings", "bring"), ("holds", "hold"),
    ("wants", "want"), ("knows", "know"), ("cleans", "clean"), ("guards", "guard"),
    ("fixes", "fix"), ("pushes", "push"), ("sells", "sell"), ("loves", "love"),
)  # fmt: skip
_PREPS = ("near", "under", "behind", "beside", "above", "inside", "across", "beyond", "along", "past")
_ADVS = ("today", "again", "slowly", "quickly", "often", "rarely", "together", "alone", "early", "late")
_CONJS = ("and", "but", "while", "because", "so")
_PUNCT = (".", ",")

_PLURAL_NOUNS = tuple(n + "s" if not n.endswith(("ch", "sh")) else n + "es" for n in _NOUNS)
_WORDS = tuple(
    dict.fromkeys(  # dedupe, keep order ("the", "my", "our" are in both determiner lists)
        _DETS_SG + _DETS_PL + _ADJS + _NOUNS + _PLURAL_NOUNS
        + tuple(v for pair in _VERBS for v in pair) + _PREPS + _ADVS + _CONJS + _PUNCT
    )
)  # fmt: skip

VOCAB: tuple[str, ...] = SPECIALS + STRUCTURE + _WORDS + KEYS + VALUES + SPAN_SYMBOLS
TOKEN_ID = {w: i for i, w in enumerate(VOCAB)}
assert len(TOKEN_ID) == len(VOCAB), "demo vocabulary has duplicate words"

# Token kinds in a generated document (what each position is, for weighting and scoring).
KIND_OTHER = 0
KIND_KV_FIRST = 1  # first value token of a `get` answer: needs the lookup itself
KIND_KV_REST = 2  # later value tokens and the closing ';' of a `get` answer
KIND_COPY = 3  # tokens of a `repeat` span after its first symbol, and its closing 'unquote'

# Events per generated step, chosen so that per 1000 tokens there are about 8 records,
# 8 queries, 0.5 quoted spans and 0.5 repeats, the rest filler (~85% of tokens).
_P_RECORD = 0.075
_P_QUERY = 0.075
_P_QUOTE = 0.005
_P_REPEAT = 0.005
_SEED_SALT = 0x5EED_DE70  # keeps demo_text(n, 0) unrelated to other users of Random(0)


def _ids(words) -> list[int]:
    return [TOKEN_ID[w] for w in words]


_I = TOKEN_ID
_ID_DETS_SG = _ids(_DETS_SG)
_ID_DETS_PL = _ids(_DETS_PL)
_ID_ADJS = _ids(_ADJS)
_ID_NOUNS = _ids(_NOUNS)
_ID_PLURALS = _ids(_PLURAL_NOUNS)
_ID_VERBS_SG = _ids(v[0] for v in _VERBS)
_ID_VERBS_PL = _ids(v[1] for v in _VERBS)
_ID_PREPS = _ids(_PREPS)
_ID_ADVS = _ids(_ADVS)
_ID_CONJS = _ids(_CONJS)
_ID_KEYS = _ids(KEYS)
_ID_VALUES = _ids(VALUES)
_ID_SPANS = _ids(SPAN_SYMBOLS)


# ---------------------------------------------------------------------------------------------
# Corpus generator.


@dataclass
class DemoDoc:
    """One generated document.

    ids: token ids, ``ids[0]`` is BOS, exactly the requested length.
    kinds: per-position KIND_* code (what the token at that position is).
    distance: for KIND_KV_FIRST positions, how many tokens back the matching record's value
        starts; 0 elsewhere.
    """

    ids: list[int]
    kinds: list[int]
    distance: list[int]

    def text(self) -> str:
        return " ".join(VOCAB[i] for i in self.ids[1:])


class _Writer:
    """Appends words with their kinds; the generator's only mutable state besides the rng."""

    __slots__ = ("ids", "kinds", "distance")

    def __init__(self):
        self.ids = [_I[BOS]]
        self.kinds = [KIND_OTHER]
        self.distance = [0]

    def put(self, tokens: list[int], kind: int = KIND_OTHER):
        self.ids.extend(tokens)
        self.kinds.extend([kind] * len(tokens))
        self.distance.extend([0] * len(tokens))


def _noun_phrase(rng: random.Random, topic: list[int], out: list[int]) -> bool:
    """Append a noun phrase; return True if it is plural (the verb must agree)."""
    plural = rng.random() < 0.35
    out.append(rng.choice(_ID_DETS_PL if plural else _ID_DETS_SG))
    if rng.random() < 0.5:
        out.append(rng.choice(_ID_ADJS))
    # Topic nouns recur within a paragraph: mid-range structure that is not a lookup.
    noun = rng.choice(topic) if rng.random() < 0.7 else rng.randrange(len(_NOUNS))
    out.append(_ID_PLURALS[noun] if plural else _ID_NOUNS[noun])
    return plural


def _clause(rng: random.Random, topic: list[int], out: list[int]):
    plural = _noun_phrase(rng, topic, out)
    verb = rng.randrange(len(_VERBS))
    out.append(_ID_VERBS_PL[verb] if plural else _ID_VERBS_SG[verb])
    _noun_phrase(rng, topic, out)
    r = rng.random()
    if r < 0.3:
        out.append(rng.choice(_ID_PREPS))
        _noun_phrase(rng, topic, out)
    elif r < 0.5:
        out.append(rng.choice(_ID_ADVS))


def _sentence(rng: random.Random, topic: list[int]) -> list[int]:
    out: list[int] = []
    _clause(rng, topic, out)
    if rng.random() < 0.3:
        if rng.random() < 0.5:
            out.append(_I[","])
        out.append(rng.choice(_ID_CONJS))
        _clause(rng, topic, out)
    out.append(_I["."])
    return out


def demo_doc(n_tokens: int, seed: int = 0) -> DemoDoc:
    """Generate one document of exactly ``n_tokens`` token ids (BOS included), seeded."""
    if n_tokens < 1:
        raise ValueError(f"demo_doc: n_tokens must be >= 1, got {n_tokens}")
    rng = random.Random((int(seed) * 1_000_003) ^ _SEED_SALT)
    w = _Writer()
    free_keys = list(_ID_KEYS)
    rng.shuffle(free_keys)
    records: list[tuple[int, list[int], int]] = []  # (key id, value ids, position of value)
    spans: list[list[int]] = []
    topic = rng.sample(range(len(_NOUNS)), 6)
    paragraph_left = rng.randint(4, 16)

    while len(w.ids) < n_tokens:
        r = rng.random()
        if r < _P_RECORD:
            if not free_keys:
                continue  # every key used (documents > ~128K tokens): no more records
            key = free_keys.pop()
            value = [rng.choice(_ID_VALUES) for _ in range(rng.randint(1, 3))]
            w.put([_I["put"], key])
            records.append((key, value, len(w.ids)))
            w.put(value + [_I[";"]])
        elif r < _P_RECORD + _P_QUERY:
            if not records:
                continue
            key, value, at = rng.choice(records)
            w.put([_I["get"], key])
            w.distance.append(len(w.ids) - at)
            w.ids.extend(value + [_I[";"]])
            w.kinds.extend([KIND_KV_FIRST] + [KIND_KV_REST] * len(value))
            w.distance.extend([0] * len(value))
        elif r < _P_RECORD + _P_QUERY + _P_QUOTE:
            span = [rng.choice(_ID_SPANS) for _ in range(rng.randint(12, 32))]
            spans.append(span)
            w.put([_I["quote"]] + span + [_I["unquote"]])
        elif r < _P_RECORD + _P_QUERY + _P_QUOTE + _P_REPEAT:
            if not spans:
                continue
            span = rng.choice(spans)
            # The first symbol says which span is meant; everything after it is a copy.
            w.put([_I["repeat"], span[0]])
            w.put(span[1:] + [_I["unquote"]], KIND_COPY)
        else:
            w.put(_sentence(rng, topic))
            paragraph_left -= 1
            if paragraph_left == 0:
                topic = rng.sample(range(len(_NOUNS)), 6)
                paragraph_left = rng.randint(4, 16)

    return DemoDoc(w.ids[:n_tokens], w.kinds[:n_tokens], w.distance[:n_tokens])


def demo_text(n_tokens: int, seed: int = 0) -> str:
    """A demo-corpus text that the demo tokenizer encodes to exactly ``n_tokens`` ids.

    The count includes the BOS token the tokenizer adds, so ``n_tokens - 1`` words. Same seed,
    same text. Use it as a long prompt of the demo model's own distribution (analysis,
    calibration) at any length.
    """
    if n_tokens < 2:
        raise ValueError(f"demo_text: n_tokens must be >= 2 (BOS plus one word), got {n_tokens}")
    return demo_doc(n_tokens, seed).text()


# ---------------------------------------------------------------------------------------------
# Tokenizer and model location.


def build_demo_tokenizer():
    """The demo tokenizer as a ``transformers.PreTrainedTokenizerFast``.

    One token per whitespace-separated word of VOCAB; BOS prepended on encode. Built with the
    ``tokenizers`` library so it saves as a plain tokenizer.json that AutoTokenizer loads.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel(vocab=dict(TOKEN_ID), unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, TOKEN_ID[BOS])]
    )
    # WordPiece's decoder with an impossible prefix just joins tokens with single spaces.
    core.decoder = decoders.WordPiece(prefix="\x00", cleanup=False)
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        pad_token=PAD,
        # Without this, decode() glues ' .' and ' ,' to the previous word and breaks round trips.
        clean_up_tokenization_spaces=False,
        model_max_length=32768,
    )


class DemoModelMissing(FileNotFoundError):
    """The package was installed without the demo model's files."""


_DEMO_FILES = ("config.json", "model.safetensors", "tokenizer.json")


def demo_model_path() -> Path:
    """Folder of the embedded demo model (load it with ``from_pretrained(demo_model_path())``)."""
    path = Path(__file__).resolve().parent / "demo_model"
    missing = [name for name in _DEMO_FILES if not (path / name).is_file()]
    if missing:
        raise DemoModelMissing(
            f"the embedded demo model is incomplete ({', '.join(missing)} missing in {path}); "
            "reinstall pbs, or rebuild it with `python scripts/train_demo.py --out "
            f"{path}`, or pass a model id or folder"
        )
    return path


# ---------------------------------------------------------------------------------------------
# Retrieval check.

# Record-to-query distance buckets for the lookup accuracy (tokens back).
DISTANCE_BUCKETS = ((0, 512), (512, 2048), (2048, 8192), (8192, 1 << 62))


def _bucket_name(lo: int, hi: int) -> str:
    def short(x: int) -> str:
        return f"{x // 1024}k" if x >= 1024 and x % 1024 == 0 else str(x)

    return f">={short(lo)}" if hi >= 1 << 62 else f"{short(lo)}-{short(hi)}"


@dataclass
class DemoEval:
    """Teacher-forced scores of a model on held-out demo documents.

    loss: mean next-token cross entropy over all positions (nats).
    kv_acc: argmax accuracy on every answer token of `get` queries (values and ';').
    kv_first_acc: accuracy on the first value token only (the lookup itself).
    kv_first_by_distance: bucket name -> (accuracy, count) of first value tokens by how far back
        the record is.
    copy_acc: accuracy on `repeat` span tokens after the first symbol.
    """

    n_tokens: int
    n_docs: int
    loss: float
    kv_acc: float
    kv_first_acc: float
    copy_acc: float
    kv_first_by_distance: dict[str, tuple[float, int]] = field(default_factory=dict)
    mean_distance: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "n_tokens": self.n_tokens,
            "n_docs": self.n_docs,
            "loss": round(self.loss, 4),
            "kv_acc": round(self.kv_acc, 4),
            "kv_first_acc": round(self.kv_first_acc, 4),
            "copy_acc": round(self.copy_acc, 4),
            "mean_distance": round(self.mean_distance, 1),
            "kv_first_by_distance": {k: [round(a, 4), n] for k, (a, n) in self.kv_first_by_distance.items()},
        }


def _ratio(hit: int, total: int) -> float:
    return hit / total if total else float("nan")


def demo_eval(
    model,
    tokenizer=None,
    *,
    n_tokens: int = 8192,
    n_docs: int = 4,
    seed: int = 1_000_000,
    device=None,
    autocast_dtype=None,
) -> DemoEval:
    """Score ``model`` on ``n_docs`` held-out documents of ``n_tokens`` tokens.

    With a tokenizer, each document goes through it as text (and must give the generator's ids,
    which checks that the tokenizer is the demo one); without, ids are used directly. Seeds from
    1_000_000 up are never used for training by scripts/train_demo.py. One document per forward
    pass, so memory is that of a single prefill of ``n_tokens``.
    """
    import torch
    import torch.nn.functional as F

    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    loss_sum, loss_n = 0.0, 0
    hits = {KIND_KV_FIRST: 0, KIND_KV_REST: 0, KIND_COPY: 0}
    counts = dict.fromkeys(hits, 0)
    bucket_hits = [0] * len(DISTANCE_BUCKETS)
    bucket_counts = [0] * len(DISTANCE_BUCKETS)
    dist_sum = 0
    try:
        for d in range(n_docs):
            doc = demo_doc(n_tokens, seed + d)
            if tokenizer is not None:
                ids = tokenizer(doc.text())["input_ids"]
                if list(ids) != doc.ids:
                    raise ValueError("demo_eval: the tokenizer does not encode the demo corpus like the demo tokenizer")
            x = torch.tensor([doc.ids], device=device)
            with torch.no_grad(), torch.autocast(
                device.type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None
            ):
                logits = model(input_ids=x, use_cache=False).logits[0, :-1].float()
            target = x[0, 1:]
            loss_sum += F.cross_entropy(logits, target, reduction="sum").item()
            loss_n += target.numel()
            correct = (logits.argmax(-1) == target).tolist()
            # Position p (>= 1) is predicted from the logits at p - 1.
            for p in range(1, n_tokens):
                kind = doc.kinds[p]
                if kind == KIND_OTHER:
                    continue
                hits[kind] += correct[p - 1]
                counts[kind] += 1
                if kind == KIND_KV_FIRST:
                    dist = doc.distance[p]
                    dist_sum += dist
                    for b, (lo, hi) in enumerate(DISTANCE_BUCKETS):
                        if lo <= dist < hi:
                            bucket_hits[b] += correct[p - 1]
                            bucket_counts[b] += 1
    finally:
        model.train(was_training)

    kv_hits = hits[KIND_KV_FIRST] + hits[KIND_KV_REST]
    kv_counts = counts[KIND_KV_FIRST] + counts[KIND_KV_REST]
    return DemoEval(
        n_tokens=n_tokens,
        n_docs=n_docs,
        loss=loss_sum / max(loss_n, 1),
        kv_acc=_ratio(kv_hits, kv_counts),
        kv_first_acc=_ratio(hits[KIND_KV_FIRST], counts[KIND_KV_FIRST]),
        copy_acc=_ratio(hits[KIND_COPY], counts[KIND_COPY]),
        kv_first_by_distance={
            _bucket_name(lo, hi): (_ratio(h, c), c)
            for (lo, hi), h, c in zip(DISTANCE_BUCKETS, bucket_hits, bucket_counts)
            if c
        },
        mean_distance=dist_sum / counts[KIND_KV_FIRST] if counts[KIND_KV_FIRST] else 0.0,
    )
