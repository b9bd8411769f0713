"""Verbatim spans of a generation found in the training data, OLMoTrace-style, exact and fast.

The pure parts: suffix arrays of a token stream (`build_span_arrays`, pydivsufsort), vectorised searches
over one shard or all shards at once (`sa_bound`, `sa_range`, `matching_statistics` over a `Stack`),
OLMoTrace's span rules (`token_rules`, `maximal_spans`, `select_spans`), and `trace_text` / `explain`
over an index; the on-disk sharded index is glassgpt/trace/shards.py. Run it:

    glassgpt trace-spans --build --data_dir=data/shakespeare_char          (once)
    glassgpt trace-spans --out_dir=out-shakespeare-char --start="ROMEO:" [--json]
    glassgpt trace-spans --data_dir=data/shakespeare_char --text=FILE:story.txt | --locate="First Citizen:"

docs/spans.md has the details and the measurements.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Sequence

import numpy as np

from glassgpt.config import load_config, read_text_arg, wants_help
from glassgpt.errors import UserError
from glassgpt.sampling import SamplingSettings

if TYPE_CHECKING:
    from glassgpt.trace.shards import SpanIndex

PAD_LOW = -1  # after a query's end: sorts before every token, so "query is a prefix" < suffix
PAD_HIGH = 1 << 30  # after a query's end: sorts after every token (upper bounds)
NO_MATCH = -2  # query tokens the index cannot contain (>= separator): never equal to a text value
COUNT_STRIDE = 1024  # prefix character/newline counts are stored every this many tokens
BUCKET_LIMIT = 1 << 21  # k-gram bucket table entries (char data: k = 3; GPT-2: k = 1)
CHUNK = 1 << 22  # tokens per step of the O(n) build passes: no n-sized temporaries
SENTENCE_ENDS = ".!?"
NO_START = ",.;:!?)]}"  # a span does not begin with closing or joining punctuation (", never mind how")


# ---------------------------------------------------------------- index: pure functions over arrays


@dataclass
class SpanArrays:
    """The arrays of a span index (in memory after a build, memory-mapped after a load)."""

    text: np.ndarray  # uint16: the split's tokens, a separator after every segment
    sa: np.ndarray  # int32/int64: suffix array of `text`
    seps: np.ndarray  # int64: positions of the separators in `text` (sorted)
    unigram: np.ndarray  # int64: count of each token id in the split
    separator: int
    buckets: np.ndarray  # int64: buckets[key(first k tokens)] = where those suffixes start in `sa`
    bucket_k: int  # tokens per bucket key: the most whose (separator + 2)^k keys fit BUCKET_LIMIT


def bucket_k_for(separator: int) -> int:
    k = 0
    while (separator + 2) ** (k + 1) < BUCKET_LIMIT:
        k += 1
    return k


def build_buckets(text: np.ndarray, separator: int, k: int) -> np.ndarray:
    """Start of each k-token prefix's range in the suffix array: suffixes sort by their first k tokens
    first, so counting keys is enough. Digit = token + 1, 0 past the end (a shorter suffix sorts first).
    Counted in chunks, so a billion-token shard needs no n-sized int64 temporaries."""
    base, n = separator + 2, len(text)
    counts = np.zeros(base ** k, dtype=np.int64)
    for a in range(0, n, CHUNK):
        b = min(n, a + CHUNK)
        key = np.zeros(b - a, dtype=np.int64)
        for j in range(k):
            key *= base
            part = text[a + j:b + j]  # shorter near the end: digit 0 there
            key[:len(part)] += part.astype(np.int64) + 1
        counts += np.bincount(key, minlength=base ** k)
    return np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)


def bincount(values: np.ndarray, size: int) -> np.ndarray:
    """np.bincount(values, minlength=size)[:size] in chunks (bincount's intp copy is 8 bytes/value)."""
    out = np.zeros(size, dtype=np.int64)
    for a in range(0, len(values), CHUNK):
        out += np.bincount(values[a:a + CHUNK], minlength=size)[:size]
    return out


def separated_text(tokens: np.ndarray, segments: np.ndarray, separator: int) -> tuple[np.ndarray, np.ndarray]:
    """(text, seps): each segment [tok_start, tok_end)'s tokens followed by a separator, copied straight
    from the (memory-mapped) split: no pass over tokens outside the segments."""
    seg = np.asarray(segments, dtype=np.int64).reshape(-1, 5)
    lengths = seg[:, 2] - seg[:, 1]
    seps = np.cumsum(lengths + 1) - 1
    text = np.full(int(lengths.sum()) + len(seg), separator, dtype=np.uint16)
    at = 0
    for (_, s, e, _, _), sep in zip(seg.tolist(), seps.tolist(), strict=False):
        text[at:sep] = tokens[s:e]
        at = sep + 1
    return text, seps.astype(np.int64)


def build_span_arrays(tokens: np.ndarray, segments: np.ndarray, separator: int,
                      eot: int | None = None) -> SpanArrays:
    """Suffix array over the segments [tok_start, tok_end) of `tokens`, a separator after each.

    `separator` must exceed every token id a query may hold (we use the vocabulary size), so it never
    matches. `eot` (GPT-2's <|endoftext|>) is replaced by the separator too: it joins documents.
    """
    from pydivsufsort import divsufsort

    text, seps = separated_text(tokens, segments, separator)
    unigram = bincount(text, separator + 1)
    if unigram[separator] != len(seps):
        raise UserError(f"the data holds token ids >= the vocabulary size {separator}; the dataset's meta.json "
                        "does not describe its .bin file; re-run its prepare script")
    if eot is not None:
        for a in range(0, len(text), CHUNK):
            part = text[a:a + CHUNK]
            part[part == eot] = separator
    # pydivsufsort sorts uint16 as big-endian byte pairs (byte order = token order) and keeps even
    # suffixes; with a small vocabulary (char data) it shrinks the text to one byte per token.
    sa = np.asarray(divsufsort(text))
    sa = sa.astype(np.int32 if len(text) < 2**31 else np.int64, copy=False)
    k = bucket_k_for(separator)
    return SpanArrays(text=text, sa=sa, seps=seps, unigram=unigram[:separator], separator=int(separator),
                      buckets=build_buckets(text, separator, k), bucket_k=k)


@dataclass
class Queries:
    """Token queries for a vectorised search: row r is flat[offset[r]:offset[r] + width], and every row
    ends in a pad (PAD_LOW or PAD_HIGH) before its last column. One flat array serves both a padded
    matrix (offset = r * width) and all suffixes of one text (offset = r: row r = ids[r:] + pads)."""

    flat: np.ndarray  # int32
    offset: np.ndarray  # int64
    width: int

    @classmethod
    def from_seqs(cls, seqs: Sequence[Sequence[int]], pad: int, separator: int) -> Queries:
        width = max((len(q) for q in seqs), default=0) + 1
        out = np.full((len(seqs), width), pad, dtype=np.int32)
        for r, q in enumerate(seqs):
            out[r, :len(q)] = np.where(np.asarray(q) >= separator, NO_MATCH, q) if len(q) else []
        return cls(out.ravel(), np.arange(len(seqs), dtype=np.int64) * width, width)

    @classmethod
    def suffixes(cls, ids: np.ndarray, separator: int) -> Queries:
        n = len(ids)
        flat = np.full(2 * n + 1, PAD_LOW, dtype=np.int32)
        flat[:n] = np.where(ids >= separator, NO_MATCH, ids)
        return cls(flat, np.arange(n, dtype=np.int64), n + 1)


def count_checkpoints(tokens: np.ndarray, per_token: np.ndarray, stride: int = COUNT_STRIDE) -> np.ndarray:
    """(ceil(n / stride) + 1, 2): characters and newlines in tokens[:k * stride], for every k."""
    blocks = [np.zeros((1, 2), dtype=np.int64)]
    step = stride * (CHUNK // stride)
    for a in range(0, len(tokens), step):
        part = per_token[np.asarray(tokens[a:a + step])]
        blocks.append(np.add.reduceat(part, np.arange(0, len(part), stride), axis=0))
    return np.cumsum(np.concatenate(blocks), axis=0)


def prefix_counts(tokens: np.ndarray, per_token: np.ndarray, checkpoints: np.ndarray, pos: int,
                  stride: int = COUNT_STRIDE) -> np.ndarray:
    """Characters and newlines in tokens[:pos]: a stored checkpoint plus at most stride - 1 tokens."""
    k = pos // stride
    return checkpoints[k] + per_token[np.asarray(tokens[k * stride:pos])].sum(axis=0)


class Stack:
    """One or more shards searched as one: search row r reads shard shard[r], rows sorted by
    shard, so a round's numpy calls are paid once and only the reads go shard by shard."""

    def __init__(self, parts: Sequence[SpanArrays]):
        self.text, self.sa, self.buckets = [a.text for a in parts], [a.sa for a in parts], [a.buckets for a in parts]
        self.n = np.array([len(a.sa) for a in parts], dtype=np.int64)
        self.last = self.n - 1  # every shard's text ends in a separator, so reads stop by then
        self.separator, self.bucket_k = (parts[0].separator, parts[0].bucket_k) if parts else (0, 0)  # one vocabulary
        self.edges = np.arange(len(parts) + 1)

    @classmethod
    def of(cls, arrays: SpanArrays | Sequence[SpanArrays] | Stack) -> Stack:
        return arrays if isinstance(arrays, Stack) else cls([arrays] if isinstance(arrays, SpanArrays) else arrays)

    def take(self, parts: list[np.ndarray], shard: np.ndarray, idx: np.ndarray) -> np.ndarray:
        """parts[shard[r]][idx[r]] for every row r (shard sorted), one gather per shard."""
        if len(parts) == 1:
            return parts[0][idx]
        cut = np.searchsorted(shard, self.edges).tolist()
        got = [p[idx[a:b]] for p, a, b in zip(parts, cut, cut[1:], strict=False) if b > a]
        return np.concatenate(got) if got else parts[0][idx[:0]]

    def pairs(self, n_rows: int) -> tuple[np.ndarray, np.ndarray]:  # (rows, shard): each row in each shard
        return np.tile(np.arange(n_rows), len(self.sa)), np.repeat(np.arange(len(self.sa)), n_rows)


def _compare(stack: Stack, shard: np.ndarray, at: np.ndarray, queries: Queries, rows: np.ndarray,
             skip: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(sign of query - suffix at the first difference, common prefix length) of each query row and
    the suffix at suffix-array index at[r] of shard shard[r]. The first skip[r] tokens are known to
    match. Every row ends in a pad no token equals, so every row is decided; columns are read in
    chunks of doubling width (most comparisons end in a few tokens)."""
    starts = stack.take(stack.sa, shard, at).astype(np.int64)
    n_rows = len(rows)
    sign = np.zeros(n_rows, dtype=np.int8)
    lcp = np.zeros(n_rows, dtype=np.int64)
    todo = np.arange(n_rows)
    base = np.zeros(n_rows, dtype=np.int64) if skip is None else np.asarray(skip, dtype=np.int64)
    qoff, last, c0, chunk = queries.offset[rows], stack.last[shard], 0, 8
    while todo.size:
        cols = base[todo, None] + np.arange(c0, c0 + chunk)
        np.minimum(cols, queries.width - 1, out=cols)  # the last column is a pad for every row
        idx = starts[todo, None] + cols
        np.minimum(idx, last[todo, None], out=idx)  # past the end reads the final separator
        s = stack.take(stack.text, shard[todo], idx)
        q = queries.flat[qoff[todo, None] + cols]
        neq = q != s
        hit = neq.any(axis=1)
        first = neq.argmax(axis=1)[hit]
        done = todo[hit]
        lcp[done] = cols[hit, first]
        sign[done] = np.where(q[hit, first] < s[hit, first], -1, 1)
        todo = todo[~hit]
        c0, chunk = c0 + chunk, chunk * 2
        if c0 > queries.width and todo.size:
            raise AssertionError("query rows must end in a pad column")
    return sign, lcp


def bucket_range(stack: Stack, shard: np.ndarray, queries: Queries, rows: np.ndarray) -> tuple[np.ndarray, ...]:
    """(lo, hi, known lcp): the suffix-array range of the suffixes that share the first k tokens of each
    query row (k = bucket_k), read from its shard's bucket table; the whole array (known lcp 0) for
    rows shorter than k or holding an id the index cannot contain."""
    k = stack.bucket_k
    lo = np.zeros(len(rows), dtype=np.int64)
    hi = stack.n[shard]
    known = np.zeros(len(rows), dtype=np.int64)
    if k == 0 or not len(rows) or queries.width < k:
        return lo, hi, known
    head = queries.flat[queries.offset[rows, None] + np.arange(k)].astype(np.int64)
    ok = ((head >= 0) & (head < stack.separator)).all(axis=1)
    key = ((head[ok] + 1) * (stack.separator + 2) ** np.arange(k - 1, -1, -1)).sum(axis=1)
    bounds = stack.take(stack.buckets, shard[ok], np.stack([key, key + 1], axis=1))
    lo[ok], hi[ok], known[ok] = bounds[:, 0], bounds[:, 1], k
    return lo, hi, known


def sa_bound(stack: Stack, queries: Queries, rows: np.ndarray, shard: np.ndarray, lo: np.ndarray | None = None,
             hi: np.ndarray | None = None, with_lcp: bool = False):
    """For each query row r in shard shard[r], the first suffix-array index in [lo, hi] (default: the
    row's k-gram bucket) whose suffix sorts after the padded query: with PAD_LOW padding the lower bound
    of its occurrences, with PAD_HIGH the upper. All rows advance together, one vectorised round per
    halving; each round skips the tokens every suffix between the bounds shares with the query (Manber
    & Myers 1993). `with_lcp` also returns lower bounds of the common prefix with the suffixes just
    below and at the answer."""
    if lo is None or hi is None:
        lo, hi, known = bucket_range(stack, shard, queries, rows)
        lcp_lo, lcp_hi = known, known.copy()  # every suffix inside the bucket shares its k tokens
    else:
        lo, hi = np.array(lo, dtype=np.int64), np.array(hi, dtype=np.int64)
        lcp_lo, lcp_hi = np.zeros(len(rows), dtype=np.int64), np.zeros(len(rows), dtype=np.int64)
    moved_lo, moved_hi = np.zeros(len(rows), dtype=bool), np.zeros(len(rows), dtype=bool)
    while True:
        act = np.flatnonzero(lo < hi)
        if not act.size:
            if not with_lcp:
                return lo
            # a bound that never moved may sit outside the bucket: nothing is known about its suffix
            return lo, np.where(moved_lo, lcp_lo, 0), np.where(moved_hi, lcp_hi, 0)
        mid, sh = (lo[act] + hi[act]) // 2, shard[act]
        skip = np.minimum(lcp_lo[act], lcp_hi[act])
        sign, lcp = _compare(stack, sh, mid, queries, rows[act], skip)
        after = sign > 0  # query sorts after the suffix: the bound is to the right
        lo[act[after]], lcp_lo[act[after]], moved_lo[act[after]] = mid[after] + 1, lcp[after], True
        hi[act[~after]], lcp_hi[act[~after]], moved_hi[act[~after]] = mid[~after], lcp[~after], True


def _pair(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a[0], b[0], a[1], b[1], ...: two search rows per row (both bounds, both neighbours) in one search,
    and rows sorted by shard stay sorted."""
    return np.stack([a, b], axis=1).ravel()


def _bound_queries(seqs: Sequence[Sequence[int]], separator: int) -> Queries:
    pads = np.tile([[PAD_LOW], [PAD_HIGH]], (len(seqs), 1))
    return Queries.from_seqs([q for q in seqs for _ in (0, 1)], pads, separator)


def sa_range(arrays: SpanArrays | Sequence[SpanArrays], seqs: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    """[lo, hi) suffix-array ranges of the occurrences of each token sequence (hi - lo = count): of
    shape (len(seqs),) for one SpanArrays, (shards, len(seqs)) for a list of shards."""
    stack = Stack.of(arrays)
    rows, shard = stack.pairs(len(seqs))
    b = sa_bound(stack, _bound_queries(seqs, stack.separator), _pair(2 * rows, 2 * rows + 1), np.repeat(shard, 2))
    lo, hi = b[0::2], b[1::2]
    empty = np.array([len(q) == 0 for q in seqs], dtype=bool)[rows]
    hi[empty], lo[empty] = stack.n[shard[empty]], 0  # the empty sequence occurs everywhere
    lo, hi = lo.reshape(len(stack.sa), len(seqs)), hi.reshape(len(stack.sa), len(seqs))
    return (lo[0], hi[0]) if isinstance(arrays, SpanArrays) else (lo, hi)


def sa_range_near(arrays: SpanArrays | Stack, seqs: Sequence[Sequence[int]], anchors: np.ndarray,
                  shard: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """sa_range, given for each sequence (in shard shard[r], sorted) an `anchor` index inside or at
    the edge of its range (the insertion point of any longer query it prefixes, as
    `matching_statistics` returns). Gallops out from the anchor, then binary-searches: ~2 log2(count)
    rounds instead of 2 log2(len(sa))."""
    stack = Stack.of(arrays)
    queries = _bound_queries(seqs, stack.separator)  # row 2r: seqs[r] padded low, which a probe compares
    lengths = np.array([len(q) for q in seqs], dtype=np.int64)
    rows = np.arange(len(seqs))
    shard = np.zeros(len(seqs), dtype=np.int64) if shard is None else np.asarray(shard, dtype=np.int64)
    anchors, n = np.asarray(anchors, dtype=np.int64), stack.n[shard]

    def gallop(direction: int) -> np.ndarray:
        """Per row, the first step 2^k whose probe anchor + direction * step (- 1 going up) lacks the prefix."""
        step = np.ones(len(seqs), dtype=np.int64)
        todo = rows
        while todo.size:
            j = anchors[todo] + (step[todo] - 1 if direction > 0 else -step[todo])
            inside = (j >= 0) & (j < n[todo])
            has = np.zeros(len(todo), dtype=bool)
            if inside.any():
                r, sh = todo[inside], shard[todo[inside]]
                _, lcp = _compare(stack, sh, j[inside], queries, 2 * r)
                has[inside] = lcp >= lengths[r]
            step[todo[has]] *= 2
            todo = todo[has]
        return step

    down, up = gallop(-1), gallop(+1)
    lo = _pair(np.maximum(anchors - down, 0), anchors + up // 2)  # [lo, hi] of the lower, then the upper bound
    hi = _pair(anchors - down // 2, np.minimum(anchors + up - 1, n))
    b = sa_bound(stack, queries, _pair(2 * rows, 2 * rows + 1), np.repeat(shard, 2), lo, hi)
    return b[0::2], b[1::2]


def matching_statistics(arrays: SpanArrays | Sequence[SpanArrays], ids: Sequence[int],
                        first: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(ms, lb): ms[i] = length of the longest prefix of ids[i:] that occurs in the index, lb[i] = the
    suffix-array index where ids[i:] would be inserted (both 0 for i < first); for a list of shards,
    one row of each per shard. One search for all suffixes in all shards; the longest match of a
    query is shared with one of the two suffixes next to its insertion point."""
    stack = Stack.of(arrays)
    ids = np.asarray(ids, dtype=np.int64)
    n = len(ids)
    ms, lbs = np.zeros((2, len(stack.sa), n), dtype=np.int64)
    if n - first > 0 and len(stack.sa):
        queries = Queries.suffixes(ids, stack.separator)
        rows, shard = stack.pairs(n - first)
        rows += first
        lb, lcp_below, lcp_at = sa_bound(stack, queries, rows, shard, with_lcp=True)
        # both neighbours of every row in one comparison
        near, known, sh, r2 = _pair(lb - 1, lb), _pair(lcp_below, lcp_at), np.repeat(shard, 2), np.repeat(rows, 2)
        ok = (near >= 0) & (near < stack.n[sh])
        lcp = np.zeros(len(near), dtype=np.int64)
        _, lcp[ok] = _compare(stack, sh[ok], near[ok], queries, r2[ok], known[ok])
        ms[:, first:] = lcp.reshape(-1, 2).max(axis=1).reshape(len(stack.sa), -1)
        lbs[:, first:] = lb.reshape(len(stack.sa), -1)
    return (ms[0], lbs[0]) if isinstance(arrays, SpanArrays) else (ms, lbs)


# ---------------------------------------------------------------- spans: pure functions over a text


def _is_word(ch: str) -> bool:
    return ch.isalnum() or ch in "'_"


def token_rules(text: str, offsets: Sequence[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """OLMoTrace's self-containment rules, per token of `text` (token t = text[offsets[t]:offsets[t+1]]).

    start_ok[t]: a span may begin at token t (not inside a word, not a whitespace token, not starting
                 with closing or joining punctuation);
    end_ok[e]:   a span may end just before token e (idem for token e-1);
    breaks[t]:   token t holds a newline or a sentence end, so it may only be a span's last token.
    """
    n = len(offsets) - 1

    def boundary(c: int) -> bool:  # not between two characters of one word
        return c <= 0 or c >= len(text) or not (_is_word(text[c - 1]) and _is_word(text[c]))

    pieces = [text[offsets[t]:offsets[t + 1]] for t in range(n)]
    solid = np.array([p.strip() != "" for p in pieces], dtype=bool)
    at = np.array([boundary(c) for c in offsets], dtype=bool)
    leading = np.array([p.strip()[:1] not in tuple(NO_START) for p in pieces], dtype=bool)
    start_ok = at[:n] & solid & leading
    end_ok = np.zeros(n + 1, dtype=bool)
    end_ok[1:] = at[1:] & solid
    breaks = np.array([("\n" in p) or any(c in p for c in SENTENCE_ENDS) for p in pieces], dtype=bool)
    return start_ok, end_ok, breaks


def maximal_spans(ms: np.ndarray, start_ok: np.ndarray, end_ok: np.ndarray, breaks: np.ndarray,
                  first: int = 0) -> list[tuple[int, int]]:
    """Maximal self-contained spans [a, e) with a >= first, given matching statistics `ms`.

    Every sub-span of an occurring span occurs, so the longest valid span from `a` ends at the last
    allowed end within reach: a + ms[a], and the token after the first break from `a`. A candidate is
    maximal when no earlier start reaches as far (a later start with the same end is contained).
    """
    n = len(ms)
    # next_break[a] = first t >= a with breaks[t] (n if none)
    idx = np.where(breaks, np.arange(n), n)
    next_break = np.minimum.accumulate(idx[::-1])[::-1] if n else idx
    # last_end[x] = largest e <= x with end_ok[e] (-1 if none)
    last_end = np.maximum.accumulate(np.where(end_ok, np.arange(n + 1), -1))
    spans: list[tuple[int, int]] = []
    reach = -1
    for a in range(first, n):
        if not start_ok[a] or ms[a] == 0:
            continue
        e = int(last_end[min(a + int(ms[a]), int(next_break[a]) + 1, n)])
        if e > a and e > reach:
            spans.append((a, e))
            reach = e
    return spans


def count_words(s: str) -> int:
    words, inside = 0, False
    for ch in s:
        w = _is_word(ch)
        words += w and not inside
        inside = w
    return words


# ---------------------------------------------------------------- tracing a text


@dataclass
class Span:
    start: int  # token index into the traced ids (prompt + generation)
    end: int
    char_start: int  # into the traced text, whitespace at the edges trimmed
    char_end: int
    text: str
    count: int = 0
    logprob: float = 0.0  # sum of unigram log-probabilities: lower = rarer
    sources: list[dict] = field(default_factory=list)


@dataclass
class Trace:
    text: str  # prompt + generation
    generation_start: int  # char offset where the generation begins in `text`
    spans: list[Span]  # the kept (rarest) spans, in text order
    highlights: list[tuple[int, int]]  # merged char ranges of the kept spans
    coverage: float  # fraction of traced tokens inside an occurring span of >= coverage_n tokens
    coverage_n: int
    n_maximal: int  # maximal spans before the density cut
    n_tokens: int  # tokens traced

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def token_offsets(tokenizer, ids: Sequence[int]) -> tuple[str, list[int]]:
    """(decoded text, char offset of each token + the end): exact for char and GPT-2 BPE."""
    ids = [int(i) for i in ids]
    if getattr(tokenizer, "name", "") == "char":
        return tokenizer.decode(ids), list(range(len(ids) + 1))
    enc = getattr(tokenizer, "enc", None)
    if enc is not None and hasattr(enc, "decode_with_offsets"):
        try:
            text, offs = enc.decode_with_offsets(ids)
            return text, list(offs) + [len(text)]
        except UnicodeDecodeError:  # bytes that are no UTF-8 (a generation cut mid-character): generic path
            pass
    offs = [len(tokenizer.decode(ids[:k])) for k in range(len(ids) + 1)]  # generic, quadratic
    return tokenizer.decode(ids), offs


def encode_text(index: "SpanIndex", text: str) -> tuple[list[int], str, list[int]]:
    """(ids, text, offsets) of a given text. For char data, characters the data never had become the
    separator id (they cannot match) instead of an error: they are simply never part of a span."""
    tok = index.tokenizer
    if getattr(tok, "name", "") == "char":
        return [tok.stoi.get(c, index.separator) for c in text], text, list(range(len(text) + 1))
    ids = tok.encode(text)
    return (ids, *token_offsets(tok, ids))


def trim(text: str, a: int, b: int) -> tuple[int, int]:
    """[a, b) without the whitespace at its edges (all whitespace: empty at b)."""
    a += len(text[a:b]) - len(text[a:b].lstrip())
    return a, max(a, a + len(text[a:b].rstrip()))


def merge_ranges(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[list[int]] = []
    for a, b in sorted(ranges):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return [(a, b) for a, b in out]


def find_spans(index: SpanIndex, ids: Sequence[int], text: str, offsets: Sequence[int], first: int = 0,
               min_len: int = 1, min_words: int = 1) -> tuple[list[Span], list]:
    """All maximal self-contained spans of ids[first:] found in the index, >= min_len tokens and
    >= min_words words, with their occurrence counts and rarity, and per span its (shard, lo, hi)
    suffix-array ranges (for sources)."""
    ms, per_shard = index.matching_statistics(ids, first)
    start_ok, end_ok, breaks = token_rules(text, offsets)
    spans = []
    for a, e in maximal_spans(ms, start_ok, end_ok, breaks, first):
        ca, cb = trim(text, offsets[a], offsets[e])
        if e - a >= min_len and count_words(text[ca:cb]) >= min_words:
            spans.append(Span(a, e, ca, cb, text[ca:cb], logprob=float(index.logp[np.asarray(ids[a:e])].sum())))
    ranges = index.ranges([list(ids[s.start:s.end]) for s in spans], [s.start for s in spans], per_shard)
    for s, r in zip(spans, ranges, strict=False):
        s.count = sum(hi - lo for _, lo, hi in r)
    return spans, ranges


def trace_text(index: SpanIndex, ids: Sequence[int], prompt_len: int = 0, include_prompt: bool = False,
               min_len: int = 1, min_words: int = 1, density: float = 0.05, max_sources: int = 10,
               context: int = 32, coverage_n: int | None = None, text: str | None = None,
               offsets: Sequence[int] | None = None, seed: int = 0) -> Trace:
    """Spans, rarest-first selection, highlights, sources and coverage for one tokenized text
    (`text`/`offsets`: its characters and each token's char offset, when not just decode(ids)).
    Sources are a seeded sample of up to max_sources occurrences over all shards."""
    ids = [int(i) for i in ids]
    if text is None or offsets is None:
        text, offsets = token_offsets(index.tokenizer, ids)
    first = 0 if include_prompt else prompt_len
    n = len(ids) - first
    if n <= 0 or not text[offsets[first]:].strip():
        raise UserError("nothing to trace: the generation is empty; give --text=... or a prompt with "
                        "--max_new_tokens > 0")
    if min_len > n:
        raise UserError(f"min_len={min_len} is longer than the text to trace ({n} tokens); lower --min_len")
    coverage_n = min_len if coverage_n is None else coverage_n
    found, ranges = find_spans(index, ids, text, offsets, first, min(min_len, coverage_n), min_words)
    covered = np.zeros(len(ids), dtype=bool)
    for s in found:
        if s.end - s.start >= coverage_n:
            covered[s.start:s.end] = True
    long_enough = [i for i, s in enumerate(found) if s.end - s.start >= min_len]
    spans = [found[i] for i in long_enough]
    keep = select_spans(spans, n, density)
    where = {id(found[i]): ranges[i] for i in long_enough}
    for s in keep:
        pos = index.sample_positions(where[id(s)], max_sources, seed)
        s.sources = [index.source(int(p), s.end - s.start, context) for p in pos]
    return Trace(text=text, generation_start=offsets[prompt_len], spans=keep,
                 highlights=merge_ranges([(s.char_start, s.char_end) for s in keep]),
                 coverage=float(covered[first:].mean()), coverage_n=coverage_n, n_maximal=len(spans),
                 n_tokens=n)


def select_spans(spans: list[Span], n_tokens: int, density: float) -> list[Span]:
    """OLMoTrace's cut: the ceil(density x length) spans with the lowest unigram log-probability."""
    k = math.ceil(density * n_tokens)
    rarest = sorted(spans, key=lambda s: (s.logprob, s.start))[:k]
    return sorted(rarest, key=lambda s: s.start)


# ---------------------------------------------------------------- command line


@dataclass
class TraceSpansConfig(SamplingSettings):
    """`glassgpt trace-spans`: verbatim spans of a generation in the training data."""

    out_dir: str = "out"
    """Checkpoint directory to generate with (and to find the training data from)."""
    ckpt_iter: str | None = None
    """Open out_dir/ckpt-<iter>.pt kept by train.py --keep_every (or 'best': ckpt-best.pt) instead of ckpt.pt."""
    data_dir: str | None = None
    """Prepared training data; default: the checkpoint's own (its config's data_dir or data/<dataset>)."""
    index_dir: str | None = None
    """Where the span index lives; default <data_dir>/spans."""
    split: Literal["train", "val"] = "train"
    build: bool = False
    """(Re)build the span index first (shards already built from the same data are kept); with no
    --start/--text, only build."""
    max_memory: str = "4G"
    """Memory budget of a build, all worker processes together: sets the shard size (~24 bytes/token)."""
    num_proc: int = 1
    """Worker processes building shards in parallel."""
    start: str | None = None
    """Prompt to generate from (FILE:path reads a file); default '\\n'."""
    text: str | None = None
    """Trace this text instead of generating (FILE:path reads a file)."""
    locate: str | None = None
    """Only count this exact text in the data and list up to max_sources of its locations (FILE:path reads a
    file). BPE matches tokens: ' the state' (leading space) is the mid-sentence form, 'the state' is not."""
    device: str = "auto"
    include_prompt: bool = False
    """Trace the prompt too."""
    min_len: int | None = None
    """Shortest span in tokens (characters for char data); default 12 for char data, 4 for BPE."""
    min_words: int = 1
    """Shortest span in whole words."""
    density: float = 0.05
    """Keep the rarest ceil(density x tokens) spans (OLMoTrace's default 0.05)."""
    max_sources: int = 10
    """Source locations listed per span."""
    context: int = 32
    """Tokens of context each side of a source."""
    coverage_n: int | None = None
    """Coverage counts spans of at least this many tokens; default min_len."""
    sample_seed: int = 0
    """Seed of the sample of sources drawn when a span occurs more than max_sources times."""
    json: bool = False
    """Print JSON instead of highlighted text."""
    vocab_dir: str | None = None


def generate_ids(cfg: TraceSpansConfig, prompt: str, index: SpanIndex, run=None) -> tuple[list[int], int]:
    """(prompt + generated ids, prompt length) from the checkpoint in cfg.out_dir, generated as sample.py
    generates (glassgpt.sampling.generate_from)."""
    from glassgpt.run import open_run
    from glassgpt.sampling import generate_from

    run = run or open_run(cfg.out_dir, ckpt_iter=cfg.ckpt_iter, device=cfg.device,
                          data_dir=cfg.data_dir, vocab_dir=cfg.vocab_dir)
    model, tok = run.model, run.tokenizer
    data_tok = index.tokenizer
    if getattr(tok, "name", "") != getattr(data_tok, "name", "") or getattr(tok, "stoi", None) != getattr(data_tok, "stoi", None):
        raise UserError(f"the checkpoint in {cfg.out_dir} and the data in {index.data_dir} use different tokenizers; "
                        "point --data_dir at the data the model was trained on")
    g = generate_from(model, tok, prompt, cfg)
    return g.prompt_ids + g.outputs[0], len(g.prompt_ids)


def render(trace: dict[str, Any], color: bool) -> str:
    """The text with highlights ([brackets] or ANSI), then each kept span's sources."""
    on, off = ("\x1b[1;33m", "\x1b[0m") if color else ("[", "]")
    text, parts, prev = trace["text"], [], 0
    for a, b in trace["highlights"]:
        parts += [text[prev:a], on, text[a:b], off]
        prev = b
    parts.append(text[prev:])
    lines = ["".join(parts), "",
             f"{len(trace['spans'])} span(s) shown of {trace['n_maximal']} maximal; coverage "
             f"{trace['coverage']:.1%} of {trace['n_tokens']} tokens by spans of >= {trace['coverage_n']} tokens"]

    def flat(s: str) -> str:
        return s.replace("\n", " / ")

    for s in trace["spans"]:
        lines.append(f"\n{on}{s['text']}{off}  chars {s['char_start']}-{s['char_end']}, {s['count']} occurrence(s), "
                     f"log p {s['logprob']:.1f}")
        for src in s["sources"]:
            t = src["text"]
            core = t.strip()
            lead, trail = t[:len(t) - len(t.lstrip())], t[len(t.rstrip()):]  # BPE: " mind" -> ' ' + [mind]
            lines.append(f"  {src['doc_id']} line {src['line']} (tokens {src['token_start']}-{src['token_end']}): "
                         f"...{flat(src['context_before'] + lead)}{on}{flat(core)}{off}"
                         f"{flat(trail + src['context_after'])}...")
    return "\n".join(lines)


def locate_main(index: SpanIndex, text: str, cfg: TraceSpansConfig) -> None:
    """`--locate=TEXT`: its occurrence count and up to max_sources locations."""
    ids, _, _ = encode_text(index, text)
    if not ids:
        raise UserError("nothing to locate: --locate is empty")
    count, sources = index.locate(ids, cfg.max_sources, cfg.context, cfg.sample_seed)
    if cfg.json:
        print(json.dumps({"text": text, "count": count, "sources": sources}, ensure_ascii=False, indent=1))
        return
    print(f"{text!r}: {count} occurrence(s) in {index.data_dir}/{index.split}.bin" + (":" if sources else ""))
    for src in sources:
        print(f"  {src['doc_id']} line {src['line']}, char {src['char_offset']} (tokens {src['token_start']}-"
              f"{src['token_end']}): ...{src['context_before']}[{src['text']}]{src['context_after']}...".replace("\n", " / "))


def open_index(data_dir: str | Path, index_dir: str | Path | None = None, split: str = "train") -> SpanIndex:
    """The span index of a prepared dataset; a UserError naming the build command when it is missing,
    stale or damaged."""
    from glassgpt.trace.shards import SpanIndex

    return SpanIndex(data_dir, index_dir, split)


def trace_dict(index: SpanIndex, ids: Sequence[int], prompt_len: int, text: str, offsets: Sequence[int], *,
               include_prompt: bool = False, min_len: int | None = None, min_words: int = 1, density: float = 0.05,
               max_sources: int = 10, context: int = 32, coverage_n: int | None = None, seed: int = 0) -> dict[str, Any]:
    """trace_text with the command's defaults and checks, as the JSON-ready dict `--json` prints."""
    min_len = min_len if min_len is not None else (12 if index.is_char else 4)
    if min_len < 1 or not 0 < density <= 1:
        raise UserError(f"--min_len must be >= 1 and --density in (0, 1], got {min_len} and {density}")
    return trace_text(index, ids, prompt_len, include_prompt, min_len, min_words, density, max_sources, context,
                      coverage_n, text, offsets, seed).to_dict()


def explain(index: SpanIndex, text: str, **opts: Any) -> dict[str, Any]:
    """The spans of `text` in the index: exactly what `trace-spans --text=... --json` prints (and the
    viewer returns). `opts`: trace_dict's keywords."""
    ids, text, offsets = encode_text(index, text)
    return trace_dict(index, ids, 0, text, offsets, **opts)


def main(argv: list[str] | None = None) -> dict | None:
    if wants_help(TraceSpansConfig, argv, "glassgpt trace-spans"):
        return None
    cfg = load_config(TraceSpansConfig, argv)
    run = None
    if cfg.data_dir is None:  # the checkpoint's own training data (glassgpt.run); a query on --data_dir needs no torch
        from glassgpt.run import open_run

        run = open_run(cfg.out_dir, ckpt_iter=cfg.ckpt_iter, device=cfg.device, vocab_dir=cfg.vocab_dir)
        if run.data_dir is None:
            raise UserError(f"the checkpoint in {cfg.out_dir} does not name its training data; pass --data_dir=...")
    data_dir = Path(cfg.data_dir) if cfg.data_dir else run.data_dir
    if cfg.build:
        from glassgpt.trace.shards import build_index

        build_index(data_dir, cfg.index_dir, cfg.split, cfg.max_memory, cfg.num_proc, lambda m: print(m, file=sys.stderr))
        if cfg.start is None and cfg.text is None and cfg.locate is None:
            return None
    index = open_index(data_dir, cfg.index_dir, cfg.split)
    if cfg.locate is not None:
        return locate_main(index, read_text_arg(cfg.locate, "locate"), cfg)
    opts = dict(min_len=cfg.min_len, min_words=cfg.min_words, density=cfg.density, max_sources=cfg.max_sources,
                context=cfg.context, coverage_n=cfg.coverage_n, seed=cfg.sample_seed)
    if cfg.text is not None:
        out = explain(index, read_text_arg(cfg.text), **opts)
    else:
        ids, prompt_len = generate_ids(cfg, read_text_arg(cfg.start if cfg.start is not None else "\n", "start"), index, run)
        out = trace_dict(index, ids, prompt_len, *token_offsets(index.tokenizer, ids),
                         include_prompt=cfg.include_prompt, **opts)
    print(json.dumps(out, ensure_ascii=False, indent=1) if cfg.json else render(out, color=sys.stdout.isatty()))
    return out


if __name__ == "__main__":
    from glassgpt.errors import run_main

    sys.exit(run_main(main))


def __getattr__(name: str) -> Any:
    """`spans.SpanIndex`, `spans.write_span_index` (= shards.build_index, which builds the sharded index of
    a prepared split), ...: the on-disk index lives in glassgpt.trace.shards, imported on first use (it
    imports this module)."""
    if name in ("SpanIndex", "INDEX_DIRNAME", "INDEX_FORMAT", "build_command", "default_index_dir", "write_span_index"):
        from glassgpt.trace import shards

        return getattr(shards, "build_index" if name == "write_span_index" else name)
    raise AttributeError(name)
