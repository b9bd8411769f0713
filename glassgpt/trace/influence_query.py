"""Trace one text to the training windows that taught it: candidates from the store, exact EK-FAC scores.

    result = explain(run, store, ids, prompt_len)    # what `glassgpt trace-influence --json` prints

Candidates are the union of the store's top `recall` windows by cosine of K-FAC-whitened projected
gradients, BM25's top `bm25` windows for the traced text, and the windows holding the verbatim spans
trace-spans finds (when the dataset has a span index); `exhaustive` scores every window instead. Each
candidate gets the exact EK-FAC influence (glassgpt.trace.influence) and, for the windows shown, two
breakdowns that sum exactly to its score: per token of the window (which characters carry it) and per
token of the traced text (which part of it the window explains). A breakdown is per position of the
factorised gradient, sum_t g_t^T v a_t: position t's share of the score, put on the token predicted
there (the gradient at t carries the losses of t and, through attention, of later positions).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from glassgpt.errors import UserError
from glassgpt.trace import influence as inf
from glassgpt.trace.influence_store import InfluenceStore, training_windows, window_batches

RECALL = 256  # store candidates; docs/influence.md measures recall of the exact top-k against this
BM25_CANDIDATES = 64
SPAN_SOURCES = 10  # occurrences sampled per span


def query_recall_vector(grads: list[torch.Tensor], proj: list[tuple[torch.Tensor, torch.Tensor]]) -> np.ndarray:
    """The query's unit recall vector from its per-layer gradients (dout, din'), as the store's rows."""
    v = torch.cat([(rs @ g @ ra.T).flatten() for g, (ra, rs) in zip(grads, proj, strict=True)])
    return (v / v.norm().clamp(min=1e-30)).numpy()


def bm25_candidates(store: InfluenceStore, text: str, k: int) -> np.ndarray:
    from glassgpt.trace.knn_search import top_ids
    from glassgpt.trace.knn_store import bm25_tokens

    if k <= 0 or not text.strip():
        return np.zeros(0, np.int64)
    scores = store.bm25.get_scores(bm25_tokens([text])[0])
    ids = top_ids(np.asarray(scores, np.float32), k)
    return ids[scores[ids] > 0]


def span_candidates(run: Any, store: InfluenceStore, ids: Sequence[int], prompt_len: int) -> np.ndarray | None:
    """Windows holding sampled occurrences of the traced text's verbatim spans; None without a span index."""
    from glassgpt.trace import spans as sp

    if run.data_dir is None:
        return None
    try:
        index = sp.open_index(run.data_dir, split=store.meta["split"])
    except UserError:  # no span index (or a stale one): the other candidates still come
        return None
    try:
        trace = sp.trace_text(index, ids, prompt_len, max_sources=SPAN_SOURCES, min_len=12 if index.is_char else 4)
    except UserError:  # e.g. the traced part is shorter than a span
        return np.zeros(0, np.int64)
    starts = [int(s["token_start"]) for span in trace.spans for s in span.sources]
    w = store.windows
    rows = np.searchsorted(w[:, 1], np.asarray(starts, np.int64), side="right") - 1
    return np.unique(rows[(rows >= 0) & (np.asarray(starts) < w[np.maximum(rows, 0), 2])])


def score_rows(run: Any, store: InfluenceStore, v: list[torch.Tensor], rows: np.ndarray,
               batch_size: int) -> tuple[np.ndarray, dict[int, np.ndarray]]:
    """Exact scores of the windows `rows` (aligned) and each one's per-position contributions."""
    tokens = run.corpus.tokens(store.meta["split"])
    spans = store.windows[:, :3]
    scores = np.zeros(len(rows), np.float64)
    where = {int(r): i for i, r in enumerate(rows)}
    per: dict[int, np.ndarray] = {}
    dev = next(run.model.parameters()).device
    for r, w in window_batches(tokens, spans, np.asarray(rows, np.int64), batch_size, dev):
        s, pp = inf.score_batch(run.model, store.factors, v, w[:, :-1], w[:, 1:])
        for i, row in enumerate(r):
            scores[where[int(row)]] = float(s[i])
            per[int(row)] = pp[i].cpu().numpy()
    return scores, per


def query_breakdown(run: Any, store: InfluenceStore, rows: Sequence[int], q_ag: dict, starts: list[int],
                    n_ids: int) -> np.ndarray:
    """(len(rows), n_ids): per traced token, the share of each window's score: the window's
    H^-1 g_i / N against the query's factorised gradient, position by position."""
    f = store.factors
    tokens, spans = run.corpus.tokens(store.meta["split"]), store.windows[:, :3]
    out = np.zeros((len(rows), n_ids), np.float64)
    dev = next(run.model.parameters()).device
    for r_ids, w in window_batches(tokens, spans, np.asarray(rows, np.int64), 16, dev):
        x, y = w[:, :-1], w[:, 1:]
        mean = torch.full((len(x),), 1.0 / y.size(1), device=dev)  # each window's loss is its mean token loss
        g = inf.per_example_grads(run.model, f.layers, x, y, weights=mean)
        u = inf.ihvp(f, [g[n] / f.n_train for n in f.layers])  # (B, dout, din') per layer
        pos = sum(torch.einsum("rpo,boi,rpi->brp", q_ag[n][1], ul, q_ag[n][0])
                  for n, ul in zip(f.layers, u, strict=True))  # (B, rows, positions)
        for b, row in enumerate(r_ids):
            j = list(rows).index(int(row))
            for r, s in enumerate(starts):  # row r position p predicts token s + p + 1
                n = min(pos.size(2), n_ids - s - 1)
                out[j, s + 1:s + 1 + n] += pos[b, r, :n].double().cpu().numpy()
    return out


def window_dict(run: Any, store: InfluenceStore, row: int, score: float, per_pos: np.ndarray,
                cosine: float) -> dict[str, Any]:
    from glassgpt.trace.spans import token_offsets

    doc, s, e, char, line = (int(v) for v in store.windows[row])
    d = run.corpus.documents[doc]
    ids = run.corpus.tokens(store.meta["split"])[s:e].tolist()
    text, offs = token_offsets(run.tokenizer, ids)
    contrib = np.concatenate([[0.0], per_pos])  # token 0 is never predicted inside the window
    return {"score": float(score), "recall_cosine": round(cosine, 6), "window": int(row), "doc": doc,
            "doc_id": str(d["id"]), "source": str(d.get("source", "")), "token_start": s, "token_end": e,
            "char_offset": char, "line": line, "text": text,
            "pieces": [[text[offs[i]:offs[i + 1]], float(c)] for i, c in enumerate(contrib)]}


def candidates(run: Any, store: InfluenceStore, cos: np.ndarray, ids: Sequence[int], prompt_len: int, text: str,
               recall: int, bm25: int, exhaustive: bool) -> tuple[np.ndarray, dict[str, int | None]]:
    from glassgpt.trace.knn_search import top_ids

    if exhaustive:
        return np.arange(len(store)), {"all": len(store)}
    parts = {"recall": top_ids(cos, recall) if recall > 0 else np.zeros(0, np.int64),
             "bm25": bm25_candidates(store, text, bm25)}
    found = span_candidates(run, store, ids, prompt_len)
    counts: dict[str, int | None] = {k: len(v) for k, v in parts.items()}
    counts["spans"] = None if found is None else len(found)
    if found is not None:
        parts["spans"] = found
    return np.unique(np.concatenate(list(parts.values())).astype(np.int64)), counts


def explain(run: Any, store: InfluenceStore, ids: Sequence[int], prompt_len: int, *, k: int = 5,
            recall: int = RECALL, bm25: int = BM25_CANDIDATES, exhaustive: bool = False, batch_size: int = 32,
            prompt: str | None = None, generated: str | None = None, window: str = "chunked") -> dict[str, Any]:
    """Top-k proponents and opponents of the traced tokens ids[prompt_len:] (each given the context the
    sampler's `window` rule gives it): exactly what --json prints."""
    from glassgpt.trace.spans import token_offsets

    if k < 1 or recall < 0 or bm25 < 0:
        raise UserError(f"k must be >= 1 and recall, bm25 >= 0; got k={k}, recall={recall}, bm25={bm25}")
    t0 = time.perf_counter()
    model, f = run.model, store.factors
    if len(ids) > 1 and max(ids) >= model.config.vocab_size:
        raise UserError(f"the text has token id {max(ids)} but the model's vocabulary is {model.config.vocab_size}")
    qx, qy, starts = inf.query_layout(ids, prompt_len, inf.block_size(model), window)
    dev = next(model.parameters()).device
    q_ag, q_ce = inf.layer_grads(model, f.layers, qx.to(dev), qy.to(dev))
    g_q = [torch.einsum("rpo,rpi->oi", q_ag[n][1], q_ag[n][0]) for n in f.layers]
    v = [t / f.n_train for t in inf.ihvp(f, g_q)]
    text, offs = token_offsets(run.tokenizer, ids)
    cos = store.cosines(query_recall_vector(g_q, store.proj))
    cand, counts = candidates(run, store, cos, ids, prompt_len, text[offs[max(prompt_len, 1)]:], recall, bm25,
                              exhaustive)
    scores, per = score_rows(run, store, v, cand, batch_size)
    order = np.argsort(-scores, kind="stable")
    pro = [i for i in order[:k] if scores[i] > 0]
    con = [i for i in order[::-1][:k] if scores[i] < 0]
    shown = [int(cand[i]) for i in pro + con]
    qb = query_breakdown(run, store, shown, q_ag, starts, len(ids))
    wins = []
    for j, i in enumerate(pro + con):
        d = window_dict(run, store, int(cand[i]), scores[i], per[int(cand[i])], float(cos[cand[i]]))
        wins.append({**d, "query_scores": [float(c) for c in qb[j]]})
    for r, w in enumerate(wins[:len(pro)], 1):
        w["rank"] = r
    for r, w in enumerate(wins[len(pro):], 1):
        w["rank"] = r
    return {"prompt": prompt, "generated": generated, "text": text, "n_tokens": len(ids), "prompt_tokens": prompt_len,
            "tokens": [text[offs[i]:offs[i + 1]] for i in range(len(ids))],
            "query_loss": float(q_ce.sum()), "units": "nats: predicted change of the traced tokens' summed loss if "
            "the window were left out of training (+ proponent, - opponent)",
            "store": str(store.path), "stale": bool(store.stale), "stale_reasons": store.stale,
            "split": store.meta["split"], "n_windows": len(store), "n_candidates": int(len(cand)),
            "candidates_from": counts, "exhaustive": exhaustive, "damping": f.damping,
            "scored_sum": float(scores.sum()), "query_ms": round((time.perf_counter() - t0) * 1000, 1),
            "proponents": wins[:len(pro)], "opponents": wins[len(pro):]}


def all_windows_scores(run: Any, store: InfluenceStore, ids: Sequence[int], prompt_len: int,
                       batch_size: int = 32, window: str = "chunked") -> np.ndarray:
    """Every window's exact score (the slow reference the candidate search is measured against)."""
    v = inf.query_direction(run.model, store.factors, ids, prompt_len, window)
    return score_rows(run, store, v, np.arange(len(store)), batch_size)[0]


__all__ = ["explain", "all_windows_scores", "training_windows", "RECALL", "BM25_CANDIDATES"]
