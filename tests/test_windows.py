"""glassgpt.windows, the one "each position once, with at least half a window of context" rule that
eval, trace-neurons and trace-knn share: checked position by position, and against the three rules
those commands had before they shared it (kept here as references)."""

from __future__ import annotations

import numpy as np
import pytest

from glassgpt.errors import UserError
from glassgpt.windows import sliding_windows, window_starts

CASES = [(n, w, s) for n in (0, 1, 2, 5, 16, 17, 31, 32, 33, 100, 101) for w in (1, 4, 7, 16, 32)
         for s in sorted({1, max(1, w // 2), w})]


@pytest.mark.parametrize("n,window,stride", CASES)
def test_each_position_once_with_the_most_context(n, window, stride):
    seen = np.zeros(n, dtype=int)
    for begin, end, first in sliding_windows(n, window, stride):
        assert 0 <= begin <= first <= end <= n and end - begin == min(window, n)
        seen[first:end] += 1
        # a position not in the first window sees at least window - stride tokens before it
        if begin > 0:
            assert first - begin >= window - stride
    assert (seen == 1).all(), seen


def eval_reference(n, block, stride):
    """evaluate.sliding_windows as it was: windows tiling [0, n) exactly once."""
    done = 0
    while done < n:
        end = min(block if done == 0 else done + stride, n)
        yield max(0, end - block), end, done
        done = end


def neurons_reference(n, window):
    """trace/neurons.scan_windows as it was: (start, score_from), position 0 never scored."""
    if n < 2:
        return []
    window = min(window, n)
    stride = max(window // 2, 1)
    out, covered, start = [], 1, 0
    while covered < n:
        start = min(start, n - window)
        out.append((start, covered))
        covered = start + window
        start += stride
    return out


def knn_reference(n, context, stride):
    """trace/knn.query_window_starts as it was."""
    if n <= context:
        return [0]
    starts = list(range(0, n - context + 1, stride))
    if starts[-1] != n - context:
        starts.append(n - context)
    return starts


@pytest.mark.parametrize("n,window,stride", CASES)
def test_same_windows_as_the_three_rules_it_replaces(n, window, stride):
    assert sliding_windows(n, window, stride) == list(eval_reference(n, window, stride))
    assert window_starts(n, window, stride) == knn_reference(n, window, stride)
    if window > 1:  # window 1: the old scan listed an empty first window
        assert [(b, f) for b, _, f in sliding_windows(n, window, skip=1)] == neurons_reference(n, window)


def test_stride_outside_the_window_is_one_line():
    with pytest.raises(UserError, match="stride=17 must be between 1 and the window length 16"):
        sliding_windows(50, 16, 17)
    with pytest.raises(UserError, match="stride=0"):
        window_starts(50, 16, 0)
