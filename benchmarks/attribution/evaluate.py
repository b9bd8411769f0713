"""The three tests every engine takes, over the retrain harness (retrain.py) and the scorers (scorers.py):

- lds(): retrain on random 50% subsets, correlate each engine's summed scores with the measured losses;
- removal(): per query and engine, drop the top 1% blamed windows, retrain, measure the rise of the
  query's loss (random 1% is the `random` engine's top 1%);
- canaries(): success@k and reciprocal rank of the planted windows for verbatim and pattern queries.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from benchmarks.attribution import metrics
from benchmarks.attribution.data import Query
from benchmarks.attribution.retrain import query_losses
from glassgpt.model import GPT

Train = Callable[[np.ndarray | None], GPT]  # keep mask (None = all) -> trained model


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def subset_masks(n_windows: int, n_subsets: int, fraction: float = 0.5, seed: int = 0) -> np.ndarray:
    """(S, N) bool: each row keeps exactly round(fraction * N) windows, drawn independently (seeded)."""
    rng = np.random.default_rng([seed, 7])
    k = int(round(fraction * n_windows))
    masks = np.zeros((n_subsets, n_windows), dtype=bool)
    for s in range(n_subsets):
        masks[s, rng.choice(n_windows, k, replace=False)] = True
    return masks


@dataclass
class LdsResult:
    masks: np.ndarray  # (S, N)
    losses: np.ndarray  # (S, Q)
    per_query: dict[str, np.ndarray]  # engine -> (Q,) Spearman
    seconds: float


def lds(train: Train, queries: list[np.ndarray], prompt_len: int, scores: dict[str, np.ndarray],
        n_subsets: int, seed: int = 0) -> LdsResult:
    n = next(iter(scores.values())).shape[1]
    masks = subset_masks(n, n_subsets, 0.5, seed)
    losses = np.zeros((n_subsets, len(queries)))
    t0 = time.perf_counter()
    for s, keep in enumerate(masks):
        losses[s] = query_losses(train(keep), queries, prompt_len)
        if (s + 1) % max(1, n_subsets // 10) == 0:
            log(f"LDS retrain {s + 1}/{n_subsets} ({time.perf_counter() - t0:.0f} s)")
    per_query = {name: metrics.lds_per_query(sc, masks, losses) for name, sc in scores.items()}
    return LdsResult(masks, losses, per_query, time.perf_counter() - t0)


@dataclass
class RemovalResult:
    full_loss: np.ndarray  # (Q,)
    delta: dict[str, np.ndarray]  # engine -> (Q,) measured rise of the query's loss
    predicted: dict[str, np.ndarray]  # engine -> (Q,) sum of the engine's scores over the removed windows
    order_noise: np.ndarray  # (Q,) |loss(other data order) - loss(seed order)| with nothing removed
    retrains: int
    seconds: float


def removal(train: Train, train_other_order: Train | None, queries: list[np.ndarray], prompt_len: int,
            scores: dict[str, np.ndarray], fraction: float = 0.01) -> RemovalResult:
    """For each query and engine: retrain without the engine's top `fraction` windows for that query
    (same seed and order); retrains removing the same set are shared."""
    t0 = time.perf_counter()
    full = query_losses(train(None), queries, prompt_len)
    noise = np.zeros(len(queries))
    if train_other_order is not None:
        noise = np.abs(query_losses(train_other_order(None), queries, prompt_len) - full)
    n = next(iter(scores.values())).shape[1]
    cache: dict[bytes, np.ndarray] = {}
    delta = {name: np.zeros(len(queries)) for name in scores}
    predicted = {name: np.zeros(len(queries)) for name in scores}
    for q in range(len(queries)):
        for name, sc in scores.items():
            removed = np.sort(metrics.top_fraction(sc[q], fraction, seed=q))
            key = removed.tobytes()
            if key not in cache:
                keep = np.ones(n, dtype=bool)
                keep[removed] = False
                cache[key] = query_losses(train(keep), queries, prompt_len)
            delta[name][q] = cache[key][q] - full[q]
            predicted[name][q] = sc[q, removed].sum()
        log(f"removal query {q + 1}/{len(queries)}: {len(cache)} retrains ({time.perf_counter() - t0:.0f} s)")
    return RemovalResult(full, delta, predicted, noise, len(cache), time.perf_counter() - t0)


def canaries(scores: dict[str, np.ndarray], queries: list[Query], k: int = 5) -> dict[str, dict[str, Any]]:
    """engine -> {success@k, mrr}; scores rows follow `queries`."""
    out = {}
    for name, sc in scores.items():
        hits = [metrics.success_at_k(sc[i], q.targets, k, seed=i) for i, q in enumerate(queries)]
        rr = [metrics.reciprocal_rank(sc[i], q.targets, seed=i) for i, q in enumerate(queries)]
        out[name] = {"success": float(np.mean(hits)), "mrr": float(np.mean(rr)), "hits": [bool(h) for h in hits]}
    return out
