"""The scores: Spearman correlation, LDS, bootstrap intervals over queries, success@k, top fractions.

LDS (linear datamodeling score, Park et al. 2023, https://arxiv.org/abs/2303.14186): for one query,
the Spearman correlation, over random training subsets S, between an engine's prediction
sum_{i in S} score_i and the measured output of the model trained on S. The output here is the
query's negative loss (a proponent's score is positive and keeping it should lower the loss), so a
perfect linear datamodel scores +1 and random scores ~0. LDS = the mean over queries.
"""

from __future__ import annotations

import numpy as np


def rankdata(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n along the last axis, ties sharing their average rank (scipy.stats.rankdata)."""
    x = np.asarray(x, dtype=np.float64)
    order = np.argsort(x, axis=-1, kind="stable")
    ranks = np.empty_like(x)
    np.put_along_axis(ranks, order, np.arange(1, x.shape[-1] + 1, dtype=np.float64) * np.ones_like(x), axis=-1)
    out = np.empty_like(x)
    for idx in np.ndindex(x.shape[:-1]):  # average the ranks of tied values
        v, r = x[idx], ranks[idx]
        _, inv, counts = np.unique(v, return_inverse=True, return_counts=True)
        out[idx] = (np.bincount(inv, weights=r) / counts)[inv]
    return out


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of two 1-D arrays; 0.0 when either is constant (it predicts nothing)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    a, b = a - a.mean(), b - b.mean()
    den = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / den) if den > 0 else 0.0


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    return pearson(rankdata(a), rankdata(b))


def lds_per_query(scores: np.ndarray, masks: np.ndarray, losses: np.ndarray) -> np.ndarray:
    """scores (Q, N) an engine's score of each window for each query; masks (S, N) bool, the windows
    kept in each retrain; losses (S, Q) each retrain's measured query loss. Returns (Q,): Spearman
    between predicted sum over kept windows and -loss, per query."""
    pred = masks.astype(np.float64) @ np.asarray(scores, np.float64).T  # (S, Q)
    return np.array([spearman(pred[:, q], -losses[:, q]) for q in range(losses.shape[1])])


def bootstrap_ci(values: np.ndarray, n_boot: int = 10_000, seed: int = 0,
                 level: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): the mean over queries and its percentile bootstrap interval (queries
    resampled with replacement)."""
    v = np.asarray(values, np.float64)
    idx = np.random.default_rng(seed).integers(0, len(v), size=(n_boot, len(v)))
    means = v[idx].mean(1)
    a = (1 - level) / 2
    return float(v.mean()), float(np.quantile(means, a)), float(np.quantile(means, 1 - a))


def paired_ci(a: np.ndarray, b: np.ndarray, n_boot: int = 10_000, seed: int = 0) -> tuple[float, float, float]:
    """Bootstrap interval of mean(a - b) over the same queries: is engine a better than b?"""
    return bootstrap_ci(np.asarray(a) - np.asarray(b), n_boot, seed)


def ratio_ci(a: np.ndarray, b: np.ndarray, n_boot: int = 10_000, seed: int = 0) -> tuple[float, float, float]:
    """mean(a) / mean(b) over the same queries, with a paired bootstrap interval of the resamples where
    mean(b) > 0; all nan when mean(b) <= 0 (a ratio to a non-positive effect means nothing)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if b.mean() <= 0:
        return float("nan"), float("nan"), float("nan")
    idx = np.random.default_rng(seed).integers(0, len(a), size=(n_boot, len(a)))
    ma, mb = a[idx].mean(1), b[idx].mean(1)
    r = np.where(mb > 0, ma / np.where(mb > 0, mb, 1), np.nan)
    r = r[np.isfinite(r)]
    point = a.mean() / b.mean()
    return float(point), float(np.quantile(r, 0.025)), float(np.quantile(r, 0.975))


def ranked(scores: np.ndarray, seed: int = 0) -> np.ndarray:
    """Window ids best first; ties in a seeded random order (an engine that scores many windows
    equally, e.g. spans scoring 0, must not win or lose by the windows' order)."""
    s = np.asarray(scores, np.float64)
    tie = np.random.default_rng(seed).random(len(s))
    return np.lexsort((tie, -s))


def top_fraction(scores: np.ndarray, fraction: float, seed: int = 0) -> np.ndarray:
    """The ceil(fraction * N) best-scored window ids (at least 1)."""
    k = max(1, int(np.ceil(fraction * len(scores))))
    return ranked(scores, seed)[:k]


def success_at_k(scores: np.ndarray, targets: list[int], k: int = 5, seed: int = 0) -> bool:
    """True when one of the k best-scored windows is one of `targets`."""
    return bool(set(ranked(scores, seed)[:k].tolist()) & set(targets))


def reciprocal_rank(scores: np.ndarray, targets: list[int], seed: int = 0) -> float:
    order = ranked(scores, seed)
    pos = np.flatnonzero(np.isin(order, targets))
    return float(1 / (pos[0] + 1)) if len(pos) else 0.0
