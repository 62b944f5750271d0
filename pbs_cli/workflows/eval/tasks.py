"""RULER-style synthetic retrieval tasks, generated offline with the model's own tokenizer.

    hay = Haystack.builtin(tokenizer)                       # or Haystack.from_text(tokenizer, text)
    sample = make_sample("niah_single", tokenizer, hay, seq_len=8192, depth=0.5, seed=0, index=0)
    sample.input_ids   # exactly 8192 token ids, the question at the end
    sample.answers     # what a correct greedy continuation must contain

Tasks (names are what `TASKS` lists):

* ``passkey``: a five-digit pass key stated once in natural prose, at a depth, asked at the end
  (the classic pass-key retrieval test). English only: the haystack is the built-in prose (Lewis
  Carroll's *Alice's Adventures in Wonderland*, public domain, data/alice.txt) or a user text.
* ``niah_single``: one key-value fact (the needle) at a depth of a long haystack, asked at the end.
* ``niah_multikey``: the same, with distractor facts of other keys scattered through the haystack.
* ``niah_multivalue``: one key written several times with different values; all must be returned.
* ``vt`` (variable tracking): a value assigned to a first variable, then a chain of variables each
  assigned the previous one; the question asks the last variable's value (it takes every hop).
* ``cwe`` (common-word extraction): a long list of words where a few recur far more often than the
  rest; the question asks for the most common ones.

Two renderings ("grammars") of the same tasks (``passkey`` has only the English one). Models whose tokenizer knows the demo corpus's
vocabulary (``put k0412 v017 ;`` records and ``get k0412`` lookups, see pbs_kernels.demo) get the
record grammar, the only questions the embedded demo model understands; every other model gets
plain English sentences and questions. Both are pure functions of (task, seed, index, length,
depth), so the same arguments give the same prompt on every platform.

The haystack is a user text, or by default the built-in prose for English prompts and the demo
corpus's grammar filler (its records, lookups and quoted spans removed) for record prompts; prompts are cut on sentence boundaries so a needle never splits a word, and are
exactly ``seq_len`` tokens long (the first filler sentence is cut to fit).
"""

from __future__ import annotations

import random
import re
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any, Sequence

from .errors import DepthError, HaystackError, LengthTooShortForTask, TaskNeedsEnglish, UnknownTaskError

__all__ = [
    "DEPTH_TASKS",
    "ENGLISH_TASKS",
    "default_tasks",
    "GRAMMARS",
    "TASKS",
    "Haystack",
    "Sample",
    "check_tasks",
    "detect_grammar",
    "make_sample",
    "make_samples",
]

TASKS = ("passkey", "niah_single", "niah_multikey", "niah_multivalue", "vt", "cwe")
# Tasks whose needle sits at a chosen depth; the others spread their facts at random positions.
DEPTH_TASKS = ("passkey", "niah_single", "niah_multikey")
# Tasks written in natural English only (a model that reads only the record grammar cannot do them).
ENGLISH_TASKS = ("passkey",)
GRAMMARS = ("records", "english")

_N_MULTIVALUE = 4  # values written for one key (RULER's multi-value task uses 4)
_VT_HOPS = 2  # variables after the first in a chain
_CWE_COMMON = 3  # words asked for
_CWE_COMMON_FREQ = 30  # occurrences of each common word in RULER's cwe; scaled down to fit short lists
_CWE_RARE_FREQ = 3
_MIN_BODY = 64  # tokens of haystack a prompt needs at least besides needles and question

# The demo vocabulary (kept in sync with pbs_kernels.demo; checked by detect_grammar).
_N_KEYS, _N_VALUES = 1024, 256


# ---------------------------------------------------------------------------------------------
# Tokenizer helpers.


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _prefix_ids(tokenizer) -> list[int]:
    """The special tokens the tokenizer puts before a text (BOS), or []."""
    full = list(tokenizer("x", add_special_tokens=True)["input_ids"])
    bare = _encode(tokenizer, "x")
    if bare and full[-len(bare):] == bare:
        return full[: len(full) - len(bare)]
    return []


def detect_grammar(tokenizer) -> str:
    """"records" when every demo-corpus word (put, get, ;, k0000.., v000..) is one known token
    of `tokenizer` (the embedded demo model's tokenizer), else "english"."""
    probe = "put k0000 k1023 v000 v255 ; get"
    ids = _encode(tokenizer, probe)
    unk = getattr(tokenizer, "unk_token_id", None)
    if len(ids) == len(probe.split()) and (unk is None or unk not in ids):
        return "records"
    return "english"


# ---------------------------------------------------------------------------------------------
# Haystack.

_PROSE = Path(__file__).with_name("data") / "alice.txt"
_STRUCTURED = {"put": ";", "get": ";", "quote": "unquote", "repeat": "unquote"}
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n\s*\n+")


def _demo_filler_sentences(n_words: int, seed: int) -> list[str]:
    """Sentences of the demo corpus's grammar with its records, lookups and spans removed (they
    would be keys the model could confuse with the task's own)."""
    from pbs_kernels.demo import demo_text

    words = demo_text(n_words + 1, seed).split()
    sentences: list[str] = []
    current: list[str] = []
    closing = None
    for w in words:
        if closing is not None:
            if w == closing:
                closing = None
            continue
        if w in _STRUCTURED:
            closing = _STRUCTURED[w]
            continue
        current.append(w)
        if w == ".":
            sentences.append(" ".join(current))
            current = []
    return sentences


@dataclass
class Haystack:
    """Filler text as token-id sentences. `sentences[i]` is a list of ids; a prompt is made of
    consecutive sentences starting at an offset that depends on the sample (so samples differ)."""

    sentences: list[list[int]]
    source: str  # "builtin" or the file it came from

    @property
    def n_tokens(self) -> int:
        return sum(len(s) for s in self.sentences)

    @classmethod
    def builtin(cls, tokenizer, *, n_tokens: int = 40_000, seed: int = 0) -> Haystack:
        """The demo corpus's grammar filler (plain English-like sentences), `n_tokens` words,
        tokenized with `tokenizer`. Held-out haystacks: another seed."""
        texts = _demo_filler_sentences(n_tokens, 7_000_000 + int(seed))
        return cls._from_sentences(tokenizer, texts, "builtin")

    @classmethod
    def prose(cls, tokenizer) -> Haystack:
        """The built-in natural prose (data/alice.txt: Alice's Adventures in Wonderland, 143 KB,
        about 35K tokens for SmolLM2's tokenizer), cut into sentences. Samples start at offsets
        drawn from their seed, so other seeds give other stretches of the book."""
        return cls.from_text(tokenizer, _PROSE.read_text(encoding="utf-8"), source="builtin prose")

    @classmethod
    def default(cls, tokenizer, grammar: str, *, n_tokens: int = 40_000, seed: int = 0) -> Haystack:
        """The haystack a grammar's prompts use unless the user gives a text: prose for English,
        the demo corpus's filler for records."""
        if grammar == "english":
            return cls.prose(tokenizer)
        return cls.builtin(tokenizer, n_tokens=n_tokens, seed=seed)

    @classmethod
    def from_text(cls, tokenizer, text: str, source: str = "<text>") -> Haystack:
        """A user text cut into sentences (at . ! ? followed by space, or blank lines)."""
        texts = [t.strip() for t in _SENTENCE_END.split(text) if t and t.strip()]
        if not texts:
            raise HaystackError(source, "the text is empty; a haystack needs a text with sentences")
        hay = cls._from_sentences(tokenizer, texts, source)
        if hay.n_tokens == 0:
            raise HaystackError(source, "the text gives no tokens with this tokenizer")
        return hay

    @classmethod
    def _from_sentences(cls, tokenizer, texts: Sequence[str], source: str) -> Haystack:
        # A leading space keeps word-initial tokens for BPE tokenizers (no effect on word-level).
        enc = tokenizer([" " + t for t in texts], add_special_tokens=False)["input_ids"]
        return cls([list(e) for e in enc if len(e)], source)

    def take(self, n: int, rng: random.Random) -> list[list[int]]:
        """Consecutive sentences (wrapping around) with at least `n` tokens in all."""
        if not self.sentences:
            raise HaystackError(self.source, "the text has no sentences")
        i = rng.randrange(len(self.sentences))
        out, total = [], 0
        while total < n:
            s = self.sentences[i % len(self.sentences)]
            out.append(s)
            total += len(s)
            i += 1
        return out


# ---------------------------------------------------------------------------------------------
# Samples.


@dataclass
class Sample:
    """One prompt of a task.

    input_ids: exactly seq_len ids (BOS first when the tokenizer adds one), question last.
    answers: strings a correct answer holds; match "prefix": the continuation starts with
        answers[0] (words compared after whitespace normalisation); match "all": every answer
        appears as a word of the continuation, in any order.
    max_new_tokens: greedy steps enough for a correct answer plus its terminator.
    needle_pos: token positions where the facts start (the needle first); depth: the requested
        depth of the needle (None for tasks that spread their facts).
    """

    task: str
    seq_len: int
    depth: float | None
    index: int
    grammar: str
    input_ids: list[int]
    answers: list[str]
    match: str
    max_new_tokens: int
    needle_pos: list[int] = field(default_factory=list)

    @property
    def answer(self) -> str:
        return " ".join(self.answers)


@dataclass
class _Fact:
    ids: list[int]
    depth: float  # fraction of the haystack where it goes


def _sample_rng(task: str, seed: int, index: int, seq_len: int, depth: float | None) -> random.Random:
    depth_key = -1 if depth is None else round(depth * 10_000)
    # A string seed: random.Random hashes it with SHA-512, the same on every platform and run.
    return random.Random(f"pbs-eval:{task}:{seed}:{index}:{seq_len}:{depth_key}")


def _keys(rng: random.Random, n: int) -> list[str]:
    return [f"k{i:04d}" for i in rng.sample(range(_N_KEYS), n)]


def _records_values(rng: random.Random, n: int) -> list[str]:
    return [f"v{rng.randrange(_N_VALUES):03d}" for _ in range(n)]


def _english_number(rng: random.Random) -> str:
    return str(rng.randrange(1000, 10000))


# Each builder returns (facts, question text, answers, match). Facts are texts placed in the
# haystack; the question text ends the prompt.


def _build_niah(rng, grammar, n_distractors):
    keys = _keys(rng, 1 + n_distractors)
    facts: list[tuple[str, float | None]] = []
    if grammar == "records":
        values = [_records_values(rng, rng.randint(1, 3)) for _ in keys]
        for k, v in zip(keys, values):
            facts.append((f"put {k} {' '.join(v)} ;", None))
        question = f"get {keys[0]}"
        answers = [" ".join(values[0]) + " ;"]
    else:
        values = [_english_number(rng) for _ in keys]
        for k, v in zip(keys, values):
            facts.append((f"One of the special magic numbers for {k} is: {v}.", None))
        question = (f"What is the special magic number for {keys[0]} mentioned in the provided text? "
                    f"The special magic number for {keys[0]} mentioned in the provided text is")
        answers = [values[0]]
    return facts, question, answers, "prefix"


def _build_multivalue(rng, grammar):
    (key,) = _keys(rng, 1)
    if grammar == "records":
        values = _records_values(rng, _N_MULTIVALUE)
        facts = [(f"put {key} {v} ;", None) for v in values]
        question = f"get {key}"
    else:
        values = [_english_number(rng) for _ in range(_N_MULTIVALUE)]
        facts = [(f"One of the special magic numbers for {key} is: {v}.", None) for v in values]
        question = (f"What are all the special magic numbers for {key} mentioned in the provided text? "
                    f"The special magic numbers for {key} mentioned in the provided text are")
    return facts, question, list(dict.fromkeys(values)), "all"


def _build_vt(rng, grammar):
    names = _keys(rng, _VT_HOPS + 1)
    if grammar == "records":
        (value,) = _records_values(rng, 1)
        facts = [(f"put {names[0]} {value} ;", None)]
        facts += [(f"put {b} {a} ;", None) for a, b in zip(names, names[1:])]
        question = f"get {names[-1]}"
        answers = [f"{value} ;"]
    else:
        value = _english_number(rng)
        facts = [(f"VAR {names[0]} = {value}.", None)]
        facts += [(f"VAR {b} = VAR {a}.", None) for a, b in zip(names, names[1:])]
        question = f"Question: what is the value of VAR {names[-1]}? Answer: VAR {names[-1]} ="
        answers = [value]
    return facts, question, answers, "prefix"


def _cwe_words(grammar) -> list[str]:
    if grammar == "records":
        return [f"v{i:03d}" for i in range(_N_VALUES)]
    from pbs_kernels.demo import VOCAB

    # Plain English words of the demo grammar (nouns, adjectives, verbs), at least 3 letters.
    return sorted({w for w in VOCAB if w.isalpha() and len(w) >= 3 and not re.fullmatch(r"[kvs]\d+", w)
                   and w not in _STRUCTURED and w not in ("unquote",)})


def _build_cwe(rng, grammar, tokenizer, budget: int):
    """A word list filling about `budget` tokens: _CWE_COMMON words each repeated far more than
    the rest (RULER's 30 vs 3, scaled down when the list is short)."""
    words = _cwe_words(grammar)
    rng.shuffle(words)
    common, rare = words[:_CWE_COMMON], words[_CWE_COMMON:]
    per_item = max(1, len(_encode(tokenizer, " " + " ".join(rare[:20]))) / 20)
    if grammar == "english":
        per_item += 2  # "12." numbering
    n_items = max(int(budget / per_item * 0.9), 4 * _CWE_COMMON)
    freq_c = _CWE_COMMON_FREQ
    # Fit the common words' share: the list must still have room for rarer words.
    while freq_c > 2 and freq_c * _CWE_COMMON > n_items // 2:
        freq_c -= 1
    freq_r = max(1, min(_CWE_RARE_FREQ, freq_c - 2 if freq_c > 2 else 1))
    items = [w for w in common for _ in range(freq_c)]
    n_rare = max(0, (n_items - len(items)) // freq_r)
    items += [w for w in (rare * (n_rare // len(rare) + 1))[:n_rare] for _ in range(freq_r)]
    rng.shuffle(items)
    if grammar == "records":
        body = " ".join(items) + " ;"
        question = "get"
    else:
        body = "Below is a numbered list of words. " + " ".join(f"{i + 1}. {w}" for i, w in enumerate(items))
        question = (f"Question: What are the {_CWE_COMMON} most common words in the above list? "
                    f"Answer: The top {_CWE_COMMON} words that appear most often in the list are:")
    return body, question, common


def default_tasks(grammar: str) -> tuple[str, ...]:
    """The tasks an eval runs when none are named: every task the grammar can pose."""
    return TASKS if grammar == "english" else tuple(t for t in TASKS if t not in ENGLISH_TASKS)


def check_tasks(tasks: Sequence[str]) -> list[str]:
    """Task names, checked (UnknownTaskError naming the allowed ones); order kept, no duplicates."""
    out = list(dict.fromkeys(t.strip() for t in tasks if t.strip()))
    if not out:
        raise UnknownTaskError(None, TASKS)
    for t in out:
        if t not in TASKS:
            raise UnknownTaskError(t, TASKS)
    return out


def check_depths(depths: Sequence[float]) -> list[float]:
    out = [float(d) for d in depths]
    if not out:
        raise DepthError(None)
    for d in out:
        if not 0.0 <= d <= 1.0:  # NaN fails too
            raise DepthError(d)
    return list(dict.fromkeys(out))


def _assemble(prefix: list[int], filler: list[list[int]], facts: list[_Fact], tail: list[int],
              seq_len: int) -> tuple[list[int], list[int]]:
    """prefix + filler sentences with facts inserted at their depths + tail, exactly seq_len ids.
    The first filler sentence is cut to fit. Returns (ids, fact start positions in order of
    `facts`)."""
    budget = seq_len - len(prefix) - len(tail) - sum(len(f.ids) for f in facts)
    # Exactly `budget` filler tokens: whole sentences, the first one cut at its start (a haystack
    # that begins mid-sentence, like any chunk of a longer text), so the boundary before the
    # question follows a whole sentence.
    sentences, total = [], 0
    for s in filler:
        if total >= budget:
            break
        sentences.append(s)
        total += len(s)
    excess = total - budget
    while sentences and excess >= len(sentences[0]):
        excess -= len(sentences.pop(0))
    if excess > 0:
        sentences[0] = sentences[0][excess:]
    # Sentence boundaries: token offsets into the filler where a fact may go.
    bounds, acc = [0], 0
    for s in sentences:
        acc += len(s)
        bounds.append(acc)
    # Each fact goes to the boundary nearest its depth; facts at one boundary keep their order.
    slots: dict[int, list[int]] = {}
    for j, f in enumerate(facts):
        target = f.depth * budget
        b = min(range(len(bounds)), key=lambda i: (abs(bounds[i] - target), i))
        slots.setdefault(b, []).append(j)
    ids = list(prefix)
    pos = [0] * len(facts)
    for b in range(len(bounds)):
        for j in slots.get(b, ()):
            pos[j] = len(ids)
            ids.extend(facts[j].ids)
        if b < len(sentences):
            ids.extend(sentences[b])
    ids.extend(tail)
    assert len(ids) == seq_len, (len(ids), seq_len)
    return ids, pos


def make_sample(task: str, tokenizer, haystack: Haystack, *, seq_len: int, depth: float | None = None,
                seed: int = 0, index: int = 0, grammar: str | None = None,
                max_positions: int | None = None) -> Sample:
    """One prompt of `task`, exactly `seq_len` tokens, deterministic in (task, seed, index,
    seq_len, depth). `depth` (0 = right after BOS, 1 = just before the question) is used by
    DEPTH_TASKS and ignored (None) by the others. `grammar` defaults to detect_grammar().

    max_positions: the model's limit. A prompt whose answer would run past it is shortened (less
    haystack) so that prompt plus answer tokens fit: `--seq-len 8k` works on an 8K model, with
    prompts of 8192 minus the answer's tokens (Sample.seq_len keeps the length asked for)."""
    check_tasks([task])
    grammar = grammar or detect_grammar(tokenizer)
    if task in ENGLISH_TASKS and grammar != "english":
        raise TaskNeedsEnglish(task)
    if task not in DEPTH_TASKS:
        depth = None
    elif depth is None:
        depth = 0.5
    rng = _sample_rng(task, seed, index, seq_len, depth)
    prefix = _prefix_ids(tokenizer)
    sep = "" if grammar == "records" else "\n"

    def fit(max_new: int) -> int:
        if max_positions is None or seq_len + max_new <= max_positions:
            return seq_len
        return max_positions - max_new

    if task == "cwe":
        room = seq_len - len(prefix)
        body, question, answers = _build_cwe(rng, grammar, tokenizer, int(room * 0.8))
        max_new = _max_new(tokenizer, answers, "all")
        n = fit(max_new)
        body_ids = _encode(tokenizer, " " + body)
        tail = _encode(tokenizer, " " + sep + question)
        filler_n = n - len(prefix) - len(body_ids) - len(tail)
        if filler_n < 0:
            raise LengthTooShortForTask(seq_len, "cwe", seq_len - filler_n)
        filler = haystack.take(filler_n, rng)
        # The list sits at the end, right before its question; filler before it pads to length.
        ids, _ = _assemble(prefix, filler, [_Fact(body_ids, 1.0)], tail, n)
        needle_pos = [n - len(tail) - len(body_ids)]
        return Sample(task, seq_len, None, index, grammar, ids, answers, "all", max_new, needle_pos)

    if task == "passkey":
        raw, question, answers, match = _build_passkey(rng)
        prefix = prefix + _encode(tokenizer, _PASSKEY_INTRO)
    elif task == "niah_single":
        raw, question, answers, match = _build_niah(rng, grammar, 0)
    elif task == "niah_multikey":
        # Distractor facts about as dense as the demo corpus's records (one per ~512 tokens).
        raw, question, answers, match = _build_niah(rng, grammar, max(3, seq_len // 512))
    elif task == "niah_multivalue":
        raw, question, answers, match = _build_multivalue(rng, grammar)
    else:
        raw, question, answers, match = _build_vt(rng, grammar)

    facts = [_Fact(_encode(tokenizer, " " + text), 0.0) for text, _ in raw]
    if task in DEPTH_TASKS:
        facts[0].depth = depth
        for f in facts[1:]:
            f.depth = rng.random()
    elif task == "vt":
        # Chain links in order through the haystack, each in its own stretch.
        k = len(facts)
        for j, f in enumerate(facts):
            f.depth = (j + rng.random()) / k
    else:
        for f in facts:
            f.depth = rng.random()
    tail = _encode(tokenizer, " " + sep + question)
    max_new = _max_new(tokenizer, answers, match)
    n = fit(max_new)
    need = len(prefix) + len(tail) + sum(len(f.ids) for f in facts) + _MIN_BODY
    if need > n:
        raise LengthTooShortForTask(seq_len, task, need + seq_len - n)
    filler = haystack.take(n - need + _MIN_BODY, rng)
    ids, pos = _assemble(prefix, filler, facts, tail, n)
    return Sample(task, seq_len, depth, index, grammar, ids, answers, match, max_new, pos)


# The pass-key prompt (after the format of the pass-key tests of long-context papers): an intro
# line, prose with the key stated once, the question completed by the answer.
_PASSKEY_INTRO = "There is a pass key hidden inside the following text. Find it and remember it.\n"


def _build_passkey(rng):
    key = str(rng.randrange(10_000, 100_000))
    facts = [(f"The pass key is {key}. Remember it.", None)]
    question = "What is the pass key? The pass key is"
    return facts, question, [key], "prefix"


def _max_new(tokenizer, answers: list[str], match: str) -> int:
    text = " ".join(answers) if match == "all" else answers[0]
    # +2: a terminator, and a separator a tokenizer may emit first.
    return len(_encode(tokenizer, " " + text)) + 2 + (len(answers) if match == "all" else 0)


def make_samples(tasks: Sequence[str], tokenizer, haystack: Haystack, *, seq_lens: Sequence[int],
                 depths: Sequence[float], samples: int, seed: int = 0, max_positions: int | None = None,
                 skipped: list[tuple[str, int, Exception]] | None = None) -> list[Sample]:
    """Every (task, length, depth, index) prompt: DEPTH_TASKS get `samples` prompts per depth,
    the others `samples` per length. With `skipped` (a list), a task that cannot be posed at a
    length (too short for it, or English-only for a record model) is left out and
    (task, length, the error) appended; without it that raises."""
    tasks = check_tasks(tasks)
    depths = check_depths(depths)
    grammar = detect_grammar(tokenizer)
    out = []
    for task in tasks:
        for n in seq_lens:
            cell = []
            try:
                for d in (depths if task in DEPTH_TASKS else [None]):
                    for i in range(samples):
                        cell.append(make_sample(task, tokenizer, haystack, seq_len=n, depth=d, seed=seed,
                                                index=i, grammar=grammar, max_positions=max_positions))
            except (LengthTooShortForTask, TaskNeedsEnglish) as e:
                if skipped is None:
                    raise
                skipped.append((task, n, e))
                continue
            out.extend(cell)
    return out


def describe(sample: Sample) -> dict[str, Any]:
    """Plain data of a sample without its ids (for reports)."""
    return {"task": sample.task, "seq_len": sample.seq_len, "depth": sample.depth, "index": sample.index,
            "answers": sample.answers, "needle_pos": sample.needle_pos}
