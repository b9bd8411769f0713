"""OLMoTrace's span rules over a text: where a span may start and end, which spans are maximal, and
which of them are kept (the rarest ceil(density x length)). Pure functions over a text, its token
offsets and matching statistics (glassgpt/trace/suffix_array.py computes those).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

SENTENCE_ENDS = ".!?"
NO_START = ",.;:!?)]}"  # a span does not begin with closing or joining punctuation (", never mind how")


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


def select_spans(spans: list[Span], n_tokens: int, density: float) -> list[Span]:
    """OLMoTrace's cut: the ceil(density x length) spans with the lowest unigram log-probability."""
    k = math.ceil(density * n_tokens)
    rarest = sorted(spans, key=lambda s: (s.logprob, s.start))[:k]
    return sorted(rarest, key=lambda s: s.start)
