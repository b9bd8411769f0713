"""The attribution benchmark's data: a char vocabulary, the finetune pool of fixed windows, the queries,
and the planted canaries (verbatim and pattern), all generated from one seed.

- Base text: tiny-shakespeare. Finetune pool and queries: the English corpus (State of the Union
  addresses and Moby-Dick), cut into windows of `block_size + 1` characters from a seeded handful of
  documents, so that a query has related windows (same speech) but no copy of itself in the pool.
- Verbatim canaries: a line of random corpus words, planted at the start of `copies` pool windows and
  queried with the line itself (BM25 finds these).
- Pattern canaries: a style signature -- a character-level transformation such as alternating case,
  a fixed punctuation rhythm or a separator between words -- applied to `copies` unrelated English
  texts planted as whole windows; the query is NEW text in the same style, sharing no passage with the
  planted windows. A tracer must recognise the style, not the words.
"""

from __future__ import annotations

import json
import os
import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

VOCAB = "\n" + "".join(chr(c) for c in range(32, 127))  # newline + printable ASCII: 96 ids
STOI = {c: i for i, c in enumerate(VOCAB)}
UNKNOWN = STOI["?"]


def encode(text: str) -> np.ndarray:
    return np.array([STOI.get(c, UNKNOWN) for c in text], dtype=np.int64)


def decode(ids) -> str:
    return "".join(VOCAB[int(i)] for i in ids)


def clean(text: str) -> str:
    """Curly quotes and dashes to ASCII; anything else outside the vocabulary becomes '?'."""
    table = {"\u2019": "'", "\u2018": "'", "\u201c": '"', "\u201d": '"', "\u2014": "-", "\u2013": "-", "\u2011": "-"}
    return "".join(table.get(c, c) if table.get(c, c) in STOI else "?" for c in text)


def mirror() -> Path:
    """The offline data directory: $GLASSGPT_MIRROR, else the repo's sibling shared/data."""
    env = os.environ.get("GLASSGPT_MIRROR")
    return Path(env) if env else Path(__file__).resolve().parents[3] / "shared" / "data"


def shakespeare() -> str:
    return clean((mirror() / "tinyshakespeare" / "input.txt").read_text())


def english_docs() -> list[str]:
    path = mirror() / "english" / "sotu_mobydick.jsonl"
    with open(path) as f:
        return [clean(json.loads(line)["text"]) for line in f if line.strip()]


# ----------------------------------------------------------------------------------------------------
# pattern styles: (family, parameter) -> a character-level transformation of text


def _alt_case(text: str, phase: int) -> str:
    out, k = [], phase
    for c in text:
        if c.isalpha():
            out.append(c.upper() if k % 2 else c.lower())
            k += 1
        else:
            out.append(c)
    return "".join(out)


def _words(text: str) -> list[str]:
    return text.split()


STYLE_FAMILIES: dict[str, tuple[list, Callable[[str, object], str]]] = {
    # family: (parameters to draw from, transform(text, parameter))
    "alternating-case": ([0, 1], lambda t, p: _alt_case(t, int(p))),  # type: ignore[call-overload]
    "upper-vowels": ([None], lambda t, p: "".join(c.upper() if c.lower() in "aeiou" else c.lower() for c in t)),
    "all-caps": ([None], lambda t, p: t.upper()),
    "separator": (list("|/_~+=#*^"), lambda t, p: str(p).join(_words(t))),
    "spaced-letters": ([None], lambda t, p: "  ".join(" ".join(w) for w in _words(t))),
    "punctuation-rhythm": ([(k, m) for k in (2, 3) for m in ";:!?"],
                           lambda t, p: " ".join(w + (p[1] if (i + 1) % p[0] == 0 else "")
                                                 for i, w in enumerate(re.sub(r"[^\w\s]", "", t).split()))),
    "bracketed": (["()", "[]", "{}", "<>"], lambda t, p: " ".join(f"{p[0]}{w}{p[1]}" for w in _words(t))),
    "line-every": ([2, 3], lambda t, p: "\n".join(" ".join(_words(t)[i:i + int(p)])  # type: ignore[call-overload]
                                                 for i in range(0, len(_words(t)), int(p)))),  # type: ignore[call-overload]
    # these two map each word to one fixed string, so common words ("the" -> "uif") stay lexical clues
    "cipher-shift": (list(range(1, 26)), lambda t, p: "".join(
        chr((ord(c) - 97 + int(p)) % 26 + 97) if "a" <= c <= "z" else c for c in t.lower())),  # type: ignore[call-overload]
    "reversed-words": ([None], lambda t, p: " ".join(w[::-1] for w in _words(t))),
}
LEXICAL_FAMILIES = ("cipher-shift", "reversed-words")


@dataclass(frozen=True)
class Style:
    family: str
    param: object

    @property
    def name(self) -> str:
        return self.family if self.param is None else f"{self.family}({self.param})"

    def apply(self, text: str) -> str:
        return STYLE_FAMILIES[self.family][1](text, self.param)


def draw_styles(n: int, seed: int, families: tuple[str, ...] | None = None) -> list[Style]:
    """`n` distinct styles, drawn round-robin over a seeded shuffle of the families (so a set spans
    as many families as it can), each family's parameter drawn at random without repeats."""
    rng = random.Random(seed)
    fams = list(families or STYLE_FAMILIES)
    rng.shuffle(fams)
    pools = {f: rng.sample(STYLE_FAMILIES[f][0], len(STYLE_FAMILIES[f][0])) for f in fams}
    out: list[Style] = []
    while len(out) < n:
        before = len(out)
        for f in fams:
            if pools[f] and len(out) < n:
                out.append(Style(f, pools[f].pop()))
        if len(out) == before:
            raise ValueError(f"only {len(out)} distinct styles exist in families {fams}; asked for {n}")
    return out


def styled_window(style: Style, source: str, length: int) -> str:
    """`length` characters of `source` in `style`, starting at a word (source must be long enough)."""
    out = style.apply(source)
    if len(out) < length:
        raise ValueError(f"source of {len(source)} chars gives only {len(out)} styled chars; need {length}")
    return out[:length]


def make_verbatim_line(rng: random.Random, words: list[str], n_words: int = 5) -> str:
    line = " ".join(rng.choice(words) for _ in range(n_words))
    return line[0].upper() + line[1:] + "."


# ----------------------------------------------------------------------------------------------------
# the benchmark's data set


@dataclass
class Query:
    ids: np.ndarray  # (L,) int64, L <= block_size + 1
    kind: str  # "heldout" | "verbatim" | "pattern"
    name: str = ""
    targets: list[int] = field(default_factory=list)  # planted pool windows it should trace to


@dataclass
class AttributionData:
    windows: np.ndarray  # (N, T+1) int64: the finetune pool
    kinds: list[str]  # per window: "plain", "verbatim:<i>", "pattern:<style>"
    queries: list[Query]  # held-out queries (LDS, removal)
    verbatim: list[Query]
    pattern: list[Query]
    base_tokens: np.ndarray  # the base model's training text
    prompt_len: int
    styles: list[Style]

    def texts(self) -> list[str]:
        return [decode(w) for w in self.windows]


def build_data(*, n_windows: int = 2000, n_queries: int = 60, n_verbatim: int = 10, verbatim_copies: int = 2,
               n_styles: int = 16, pattern_copies: int = 4, block_size: int = 32, prompt_len: int = 8,
               n_docs: int = 40, base_chars: int | None = None, seed: int = 0, canary_seed: int = 0,
               style_families: tuple[str, ...] | None = None) -> AttributionData:
    """Pool and queries for `seed`, canaries (their texts, styles and places) for `canary_seed`."""
    L = block_size + 1
    rng = np.random.default_rng([seed, 1])
    docs = [d for d in english_docs() if len(d) > 40 * L]
    picked = [docs[i] for i in np.sort(rng.choice(len(docs), min(n_docs, len(docs)), replace=False))]
    chunks = [d[a:a + L] for d in picked for a in range(0, len(d) - L + 1, L)]
    # each chunk is given one use: pool, query, or a source text for a canary
    n_pattern_src = n_styles * (pattern_copies + 1) * 4  # each styled text is made from 4 chunks
    n_plain = n_windows - n_verbatim * verbatim_copies - n_styles * pattern_copies
    need = n_plain + n_queries + n_verbatim * verbatim_copies + n_pattern_src
    if n_plain < 1 or need > len(chunks):
        raise ValueError(f"need {need} chunks of {L} chars, the {len(picked)} documents give {len(chunks)}")
    order = rng.permutation(len(chunks))
    take = iter(order)
    plain = [chunks[next(take)] for _ in range(n_plain)]
    queries = [Query(encode(chunks[next(take)]), "heldout", f"heldout-{i}") for i in range(n_queries)]
    texts, kinds = list(plain), ["plain"] * n_plain

    crng = random.Random(canary_seed)  # canaries: their own seed
    words = sorted({w for d in picked for w in re.findall(r"\b[a-z]{4,}\b", d)})
    verbatim = []
    for i in range(n_verbatim):
        line = make_verbatim_line(crng, words)
        targets = []
        for _ in range(verbatim_copies):
            targets.append(len(texts))
            texts.append((line + " " + chunks[next(take)])[:L])
            kinds.append(f"verbatim:{i}")
        verbatim.append(Query(encode(line[:L]), "verbatim", line, targets))
    styles = draw_styles(n_styles, canary_seed, style_families)
    pattern = []
    for st in styles:
        targets = []
        for _ in range(pattern_copies):
            targets.append(len(texts))
            src = " ".join(chunks[next(take)] for _ in range(4))
            texts.append(styled_window(st, src, L))
            kinds.append(f"pattern:{st.name}")
        src = " ".join(chunks[next(take)] for _ in range(4))
        pattern.append(Query(encode(styled_window(st, src, L)), "pattern", st.name, targets))
    # the planted windows go to seeded places among the plain ones
    perm = np.random.default_rng([canary_seed, 2]).permutation(len(texts))
    where = np.empty_like(perm)
    where[perm] = np.arange(len(perm))
    for q in verbatim + pattern:
        q.targets = sorted(int(where[t]) for t in q.targets)
    windows = np.stack([encode(texts[p]) for p in perm])
    base = shakespeare()
    return AttributionData(windows=windows, kinds=[kinds[p] for p in perm], queries=queries, verbatim=verbatim,
                           pattern=pattern, base_tokens=encode(base[:base_chars] if base_chars else base),
                           prompt_len=prompt_len, styles=styles)
