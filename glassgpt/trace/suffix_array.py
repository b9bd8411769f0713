"""Suffix arrays of a token stream and vectorised searches over them: the index's primitives.

`build_span_arrays` sorts the suffixes of the segments of a split (pydivsufsort), each followed by a
separator, with a k-gram bucket table for the first steps of a search. `sa_range` (occurrence
ranges), `sa_range_near` (galloping from a known position) and `matching_statistics` (the longest
occurring prefix of every suffix of a query) search one shard or all shards at once (a `Stack`).
Pure functions over numpy arrays; glassgpt/trace/span_index.py stores them on disk.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from glassgpt.errors import UserError

PAD_LOW = -1  # after a query's end: sorts before every token, so "query is a prefix" < suffix
PAD_HIGH = 1 << 30  # after a query's end: sorts after every token (upper bounds)
NO_MATCH = -2  # query tokens the index cannot contain (>= separator): never equal to a text value
COUNT_STRIDE = 1024  # prefix character/newline counts are stored every this many tokens
BUCKET_LIMIT = 1 << 21  # k-gram bucket table entries (char data: k = 3; GPT-2: k = 1)
CHUNK = 1 << 22  # tokens per step of the O(n) build passes: no n-sized temporaries



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
    def from_seqs(cls, seqs: Sequence[Sequence[int]], pad: int | np.ndarray, separator: int) -> Queries:
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


def sa_range(arrays: SpanArrays | Sequence[SpanArrays] | Stack,
             seqs: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
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


def matching_statistics(arrays: SpanArrays | Sequence[SpanArrays] | Stack, ids: Sequence[int],
                        first: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(ms, lb): ms[i] = length of the longest prefix of ids[i:] that occurs in the index, lb[i] = the
    suffix-array index where ids[i:] would be inserted (both 0 for i < first); for a list of shards,
    one row of each per shard. One search for all suffixes in all shards; the longest match of a
    query is shared with one of the two suffixes next to its insertion point."""
    stack = Stack.of(arrays)
    toks = np.asarray(ids, dtype=np.int64)
    n = len(toks)
    ms, lbs = np.zeros((2, len(stack.sa), n), dtype=np.int64)
    if n - first > 0 and len(stack.sa):
        queries = Queries.suffixes(toks, stack.separator)
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
