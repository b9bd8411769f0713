"""Every explanation engine as one function: (model, pool, queries) -> scores (Q, N), the score of each
finetune window for each query, higher = more to blame for (more of a proponent of) the query.

- random: seeded noise, the control.
- spans: verbatim spans of the query's continuation found in a window (glassgpt.trace.suffix_array's suffix
  array and OLMoTrace span rules over the pool); a window scores the sum of squared lengths of the
  maximal spans it holds (>= MIN_SPAN characters).
- bm25: BM25 over the windows' words (bm25s, as glassgpt.trace.knn builds it), query = its whole text.
- emb-<calibration>: cosine of mean-pooled final-layer states, each calibration kept in glassgpt.trace.knn_store.
- hybrid: z-score of emb-whiten plus z-score of bm25 (trace-knn's `rank=hybrid` fusion, over all windows).
- tracin: gradient dot product at the final weights (TracIn with one checkpoint, no Hessian):
  grad(query's summed continuation loss) . grad(window's summed loss).
- influence: EK-FAC influence from glassgpt.trace.influence (predicted rise of the query's summed
  loss if the window were removed).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from benchmarks.attribution.data import VOCAB, decode
from benchmarks.attribution.retrain import query_xy
from glassgpt.model import GPT

MIN_SPAN = 8  # characters: shorter shared strings ("the ", "tion") are everywhere in char data
CALIBRATIONS = ("none", "center", "standardize", "whiten")


@dataclass
class Pool:
    """What the engines see: the model trained on every window, the windows, the query prompt length."""

    model: GPT
    windows: np.ndarray  # (N, T+1) int64
    prompt_len: int
    seed: int = 0
    damping: float | None = None  # influence's relative damping (None: glassgpt.trace.influence's default)
    cache: dict = field(default_factory=dict)

    @property
    def texts(self) -> list[str]:
        if "texts" not in self.cache:
            self.cache["texts"] = [decode(w) for w in self.windows]
        return self.cache["texts"]


Scorer = Callable[[Pool, list[np.ndarray]], np.ndarray]


def random_scores(pool: Pool, queries: list[np.ndarray]) -> np.ndarray:
    return np.random.default_rng([pool.seed, 99]).standard_normal((len(queries), len(pool.windows)))


def span_scores(pool: Pool, queries: list[np.ndarray]) -> np.ndarray:
    from glassgpt.trace import span_rules as rules
    from glassgpt.trace import suffix_array as sp

    n, L = pool.windows.shape
    if "span_arrays" not in pool.cache:
        starts = np.arange(n, dtype=np.int64) * L
        zero = np.zeros(n, np.int64)
        segments = np.stack([zero, starts, starts + L, zero, zero + 1], 1)  # [doc, start, end, char, line]
        tokens = pool.windows.reshape(-1).astype(np.uint16)
        pool.cache["span_arrays"] = sp.build_span_arrays(tokens, segments, len(VOCAB))
    arrays = pool.cache["span_arrays"]
    out = np.zeros((len(queries), n))
    for qi, q in enumerate(queries):
        ids = [int(i) for i in q]
        ms, _ = sp.matching_statistics(arrays, ids, pool.prompt_len)
        start_ok, end_ok, breaks = rules.token_rules(decode(ids), list(range(len(ids) + 1)))
        maximal = rules.maximal_spans(ms, start_ok, end_ok, breaks, pool.prompt_len)
        found = [(a, e) for a, e in maximal if e - a >= MIN_SPAN]
        if not found:
            continue
        lo, hi = sp.sa_range(arrays, [ids[a:e] for a, e in found])
        for (a, e), lo_, hi_ in zip(found, lo, hi, strict=True):
            where = np.unique(np.asarray(arrays.sa[lo_:hi_], np.int64) // (L + 1))  # separator after each window
            out[qi, where] += (e - a) ** 2
    return out


def bm25_scores(pool: Pool, queries: list[np.ndarray]) -> np.ndarray:
    import bm25s

    from glassgpt.trace.knn_store import bm25_tokens

    if "bm25" not in pool.cache:
        retriever = bm25s.BM25()
        retriever.index(bm25s.tokenize(pool.texts, stopwords="en", show_progress=False), show_progress=False)
        pool.cache["bm25"] = retriever
    retriever = pool.cache["bm25"]
    vocab = set(retriever.vocab_dict)
    out = np.zeros((len(queries), len(pool.windows)))
    for qi, ids in enumerate(queries):
        words = [w for w in bm25_tokens([decode(ids)])[0] if w in vocab]
        if words:
            out[qi] = retriever.get_scores(words)
    return out


def _raw_embeddings(pool: Pool, queries: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    from glassgpt.trace import knn_store as knn

    model = pool.model
    T = pool.windows.shape[1] - 1
    layer = model.config.n_layer
    if "emb_raw" not in pool.cache:
        n = len(pool.windows)
        starts = np.arange(n, dtype=np.int64) * (T + 1)
        spans = np.stack([np.zeros(n, np.int64), starts, starts + T], 1)  # the inputs: first T tokens
        pool.cache["emb_raw"] = knn.embed_windows(model, pool.windows.reshape(-1), spans, layer, "mean")
    q = np.stack([knn.embed_query(model, [int(i) for i in ids[:T]], T, T, layer, "mean").mean(0) for ids in queries])
    return pool.cache["emb_raw"], q


def embedding_scorer(calibration: str) -> Scorer:
    def score(pool: Pool, queries: list[np.ndarray]) -> np.ndarray:
        from glassgpt.trace import knn_store as knn

        raw, q = _raw_embeddings(pool, queries)
        key = f"calib-{calibration}"
        if key not in pool.cache:
            pool.cache[key] = knn.fit_calibration(raw, calibration)
        calib = pool.cache[key]
        return (knn.calibrate(q, calib) @ knn.calibrate(raw, calib).T).astype(np.float64)
    return score


def _z(x: np.ndarray) -> np.ndarray:
    return (x - x.mean(1, keepdims=True)) / np.maximum(x.std(1, keepdims=True), 1e-9)


def hybrid_scores(pool: Pool, queries: list[np.ndarray]) -> np.ndarray:
    return _z(embedding_scorer("whiten")(pool, queries)) + _z(bm25_scores(pool, queries))


# ---------------------------------------------------------------------------------------------------- gradients


def _grad_fn(model: torch.nn.Module):
    """Per-example gradient of the summed loss over the targets that are not -1, flattened: (B, P)."""
    from torch.func import functional_call, grad, vmap

    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p, x, y):
        _, mean = functional_call(model, p, (x[None], y[None]))
        return mean * (y >= 0).sum()

    per_example = vmap(grad(loss), in_dims=(None, 0, 0))

    def flat(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        g = per_example(params, x, y)
        return torch.cat([g[k].reshape(len(x), -1) for k in params], 1)
    return flat


def tracin_scores(pool: Pool, queries: list[np.ndarray], batch_size: int = 32) -> np.ndarray:
    model = pool.model
    model.eval()
    flat = _grad_fn(model)
    qx, qy = query_xy(queries, pool.prompt_len)
    gq = torch.cat([flat(qx[a:a + batch_size], qy[a:a + batch_size]) for a in range(0, len(queries), batch_size)])
    W = torch.from_numpy(pool.windows)
    out = np.zeros((len(queries), len(W)))
    for a in range(0, len(W), batch_size):
        b = W[a:a + batch_size]
        gw = flat(b[:, :-1].contiguous(), b[:, 1:].contiguous())
        out[:, a:a + batch_size] = (gq @ gw.T).double().numpy()
    return out


def influence_available() -> bool:
    try:
        from glassgpt.trace import influence  # noqa: F401
    except ImportError:
        return False
    return True


def influence_scores_all(pool: Pool, queries: list[np.ndarray]) -> np.ndarray:
    from glassgpt.trace.influence import fit_ekfac, influence_scores

    W = torch.from_numpy(pool.windows)
    if "ekfac" not in pool.cache:
        pool.cache["ekfac"] = fit_ekfac(pool.model, W, damping=pool.damping)
    factors = pool.cache["ekfac"]
    return np.stack([np.asarray(influence_scores(pool.model, factors, W, [int(i) for i in q], pool.prompt_len),
                                np.float64) for q in queries])


def engines(with_influence: bool | None = None) -> dict[str, Scorer]:
    """Every engine by name, in table order (influence only where glassgpt has it)."""
    out: dict[str, Scorer] = {"random": random_scores, "spans": span_scores, "bm25": bm25_scores}
    out.update({f"emb-{c}": embedding_scorer(c) for c in CALIBRATIONS})
    out.update({"hybrid": hybrid_scores, "tracin": tracin_scores})
    if influence_available() if with_influence is None else with_influence:
        out["influence"] = influence_scores_all
    return out


def score_all(pool: Pool, queries: list[np.ndarray],
              names: dict[str, Scorer]) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """({engine: (Q, N) scores}, {engine: seconds})."""
    scores, seconds = {}, {}
    for name, fn in names.items():
        t0 = time.perf_counter()
        with torch.no_grad() if name not in ("tracin", "influence") else torch.enable_grad():
            s = np.asarray(fn(pool, queries), np.float64)
        seconds[name] = time.perf_counter() - t0
        if s.shape != (len(queries), len(pool.windows)):
            raise RuntimeError(f"engine {name} returned shape {s.shape}, expected {(len(queries), len(pool.windows))}")
        scores[name] = s
    return scores, seconds
