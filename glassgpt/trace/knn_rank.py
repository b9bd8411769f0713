"""Ranking a kNN store's windows for a text, by the model's embedding, by BM25, or both fused, and
`explain`: the dict `trace-knn --json` prints and the viewer returns.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from glassgpt.corpus import Corpus
from glassgpt.errors import UserError
from glassgpt.trace.knn_search import exact_scores, load_or_build_faiss, query_faiss, top_ids, uses_faiss
from glassgpt.trace.knn_store import KnnStore, bm25_tokens, calibrate, embed_query
from glassgpt.windows import window_starts

RRF_K = 60  # reciprocal-rank fusion constant (Cormack et al. 2009)
FUSION = "z"  # how hybrid fuses the two signals: "z" (sum of z-scores) or "rrf"; chosen by measurement
CANDIDATES = 100  # per signal, the top windows that enter the fusion


@dataclass
class Signal:
    """One ranking of the windows: its top candidates and, when known, every window's score."""

    ids: np.ndarray
    full: np.ndarray | None = None
    scores: np.ndarray | None = None
    mean: float = 0.0  # of every window's score (faiss: of random window pairs), for z-scores
    std: float = 1.0
    _sorted: np.ndarray | None = None

    @classmethod
    def of(cls, full: np.ndarray) -> Signal:
        return cls(top_ids(full, CANDIDATES), full, mean=float(full.mean()), std=max(float(full.std()), 1e-9))

    def rank_score(self, i: int) -> tuple[int | None, float | None]:
        if self.full is not None:  # 1 + the number of windows scoring higher: ties share the best rank
            if self._sorted is None:
                self._sorted = np.sort(self.full)
            s = self.full[i]
            return len(self.full) - int(np.searchsorted(self._sorted, s, side="right")) + 1, float(s)
        pos = np.flatnonzero(self.ids == i)
        return (int(pos[0]) + 1, float(self.scores[pos[0]])) if len(pos) else (None, None)


def signals_for(store: KnnStore, qvec: np.ndarray, text: str, rank: str, search: str,
                nprobe: int) -> dict[str, Signal]:
    """Both signals, whatever the ranking, so that every neighbour shows both. BM25 is left out when the
    text has no word BM25 indexes (only stopwords, single letters, punctuation), or, unless it is the
    ranking, when no query word is in the store's vocabulary: it has nothing to say."""
    out = {}
    if uses_faiss(store, search):
        s, i = query_faiss(load_or_build_faiss(store), store.embeddings, qvec[None], CANDIDATES, nprobe)
        ref = store.meta["score_reference"]
        out["embedding"] = Signal(i[0][i[0] >= 0], scores=s[0][i[0] >= 0], mean=ref["mean"], std=ref["std"])
    else:
        out["embedding"] = Signal.of(exact_scores(store.rows, qvec[None])[0])
    words = bm25_tokens([text])[0]
    if not words:  # bm25s fails on an empty query (an IndexError inside it)
        return out
    full = store.bm25.get_scores(words).astype(np.float32)
    if full.max() > 0 or rank == "bm25":
        out["bm25"] = Signal.of(full)
    return out


def fuse(signals: dict[str, Signal], k: int, how: str = FUSION,
         by: str | None = None) -> list[tuple[int, float, dict]]:
    """Top-k (window, score, {signal: {rank, score}}) over both signals' candidates: ordered `by` one
    signal (or the only one), or fused: 'z', the sum of each signal's z-score (standard deviations
    above the average window; a confident signal dominates), or 'rrf', reciprocal-rank fusion
    sum(1 / (RRF_K + rank)). docs/knn.md compares them."""
    cand = list(dict.fromkeys(int(i) for s in signals.values() for i in s.ids))
    per: dict[int, dict[str, dict[str, Any]]] = {
        i: {name: dict(zip(("rank", "score"), s.rank_score(i), strict=True)) for name, s in signals.items()}
        for i in cand}
    by = next(iter(signals)) if len(signals) == 1 else by if by in signals else None
    if by is not None:  # a window outside faiss's candidates has no embedding score: last
        fused = {i: -math.inf if per[i][by]["score"] is None else per[i][by]["score"] for i in cand}
    elif how == "rrf":
        fused = {i: sum(1 / (RRF_K + v["rank"]) for v in per[i].values() if v["rank"] is not None) for i in cand}
    else:  # a window outside faiss's candidates counts as average (z = 0) for the embedding
        fused = {i: sum((v["score"] - s.mean) / s.std for s, v in zip(signals.values(), per[i].values(), strict=False)
                        if v["score"] is not None) for i in cand}
    best = sorted(cand, key=lambda i: (-fused[i], i))[:k]
    return [(i, fused[i], per[i]) for i in best]


def signals_disagree(store: KnnStore, signals: dict[str, Signal], k: int) -> bool:
    """True when no top-k window by embedding overlaps (shares a token with) any top-k window by BM25."""
    if len(signals) < 2:
        return False
    a, b = (store.windows[s.ids[:k]] for s in signals.values())
    return not any(x[0] == y[0] and x[1] < y[2] and y[1] < x[2] for x in a for y in b)


# ----------------------------------------------------------------------------------------------------
# explain: what --json prints and the viewer's API returns


def neighbour_dict(corpus: Corpus, split: str, store: KnnStore, row: int, score: float, per: dict) -> dict:
    doc, s, e, char, line = (int(v) for v in store.windows[row])
    d = corpus.documents[doc]
    return {"score": round(float(score), 6), **{name: {"rank": v["rank"], "score": None if v["score"] is None
                                                      else round(v["score"], 6)} for name, v in per.items()},
            "window": int(row), "doc": doc, "doc_id": str(d["id"]), "source": str(d.get("source", "")),
            "token_start": s, "token_end": e, "char_offset": char, "line": line, "text": corpus.decode(split, s, e)}


def _ranked(run: Any, store: KnnStore, raw: np.ndarray, text: str, k: int, rank: str, search: str,
            nprobe: int) -> tuple[list[dict], bool]:
    signals = signals_for(store, calibrate(raw.mean(0, keepdims=True), store.calib)[0], text, rank, search, nprobe)
    top = fuse(signals, k, by=None if rank == "hybrid" else rank)
    nbs = [{"rank": r, **neighbour_dict(run.corpus, store.meta["split"], store, i, s, per)}
           for r, (i, s, per) in enumerate(top, 1)]
    return nbs, signals_disagree(store, signals, k)


def explain(run: Any, store: KnnStore, text: str, *, k: int = 5, rank: str = "bm25", per_window: bool = False,
            query_stride: int | None = None, search: str = "auto", nprobe: int = 64, prompt: str | None = None,
            generated: str | None = None) -> dict[str, Any]:
    """Trace `text` to its k nearest windows of `store`: exactly the dict `--json` prints."""
    if not 1 <= k <= len(store):
        raise UserError(f"k={k} but the store has {len(store)} windows; pass --k between 1 and {len(store)}")
    if rank == "bm25" and not bm25_tokens([text])[0]:
        raise UserError(f"BM25 has nothing to rank {text[:40]!r} by: it has no word BM25 indexes (only stopwords, "
                        "single letters or punctuation); rank by the model's embedding with --rank=embedding")
    t0 = time.perf_counter()
    m, tok = store.meta, run.tokenizer
    ids = tok.encode(text)
    stride = query_stride or m["stride"]
    raw = embed_query(run.model, ids, m["context"], stride, m["layer"], m["pooling"])
    nbs, disagree = _ranked(run, store, raw, text, k, rank, search, nprobe)
    windows = []
    if per_window and len(raw) > 1:  # each query window alone: the part of the text each source matches
        for j, s in enumerate(window_starts(len(ids), m["context"], stride)):
            part = ids[s:s + m["context"]]
            c0 = len(tok.decode(ids[:s]))
            w_nbs, w_dis = _ranked(run, store, raw[j:j + 1], tok.decode(part), min(k, 3), rank, search, nprobe)
            windows.append({"token_start": s, "token_end": s + len(part), "char_start": c0,
                            "char_end": c0 + len(tok.decode(part)), "signals_disagree": w_dis, "neighbours": w_nbs})
    return {"prompt": prompt, "generated": generated, "text": text, "n_tokens": len(ids), "n_query_windows": len(raw),
            "store": str(store.path), "stale": bool(store.stale), "stale_reasons": store.stale, "rank": rank,
            "search": "faiss" if uses_faiss(store, search) else "exact",
            "calibration": m["calibration"], "layer": m["layer"], "pooling": m["pooling"],
            "score_reference": m["score_reference"], "signals_disagree": disagree,
            "query_ms": round((time.perf_counter() - t0) * 1000, 2), "split": m["split"], "neighbours": nbs,
            "per_window": windows}


