"""Windows over a sequence longer than the model's context: each position once, with context.

A model reads at most block_size tokens at a time. To score (eval), record (neurons) or embed (kNN
queries) a longer sequence, it is read in windows of `window` tokens that start every `stride`
tokens; each position is taken from exactly one window, the one that gives it the most context
before it. With stride = window // 2 every position but those of the first window sees at least half a
window of context (the same trade as lm-evaluation-harness's rolling loglikelihood and HF's
perplexity guide, https://huggingface.co/docs/transformers/perplexity).

    for begin, end, first in sliding_windows(n, window, stride):
        run the model on seq[begin:end]; keep its positions first..end-1

Every window has min(window, n) tokens (the first starts at 0, the last ends at n), so windows stack
into batches. Used by `glassgpt eval` (token_nlls), trace-neurons (record_text, the neuron scan) and
trace-knn (the query windows).
"""

from __future__ import annotations

from glassgpt.errors import UserError


def sliding_windows(n: int, window: int, stride: int | None = None, skip: int = 0) -> list[tuple[int, int, int]]:
    """(begin, end, first) for windows seq[begin:end] over n positions: positions [first, end) of each
    window are its own, and together they are [skip, n), each exactly once. stride defaults to
    window // 2; `skip` leaves out the first positions (trace-neurons skips position 0, which has no
    context at all)."""
    stride = max(1, window // 2) if stride is None else stride
    if not 1 <= stride <= window:
        raise UserError(f"stride={stride} must be between 1 and the window length {window}")
    out: list[tuple[int, int, int]] = []
    done = skip
    while done < n:
        end = min(window if not out else done + stride, n)
        out.append((max(0, end - window), end, done))
        done = end
    return out


def window_starts(n: int, window: int, stride: int) -> list[int]:
    """Where the windows of sliding_windows(n, window, stride) begin: every stride, the last ending at
    n (a sequence of at most `window` positions is one window)."""
    return [b for b, _, _ in sliding_windows(n, window, stride)] or [0]


__all__ = ["sliding_windows", "window_starts"]
