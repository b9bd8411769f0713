"""Searching a kNN store's embeddings: exact (chunked matmul over the memory map) or faiss IVF-PQ
with an exact re-rank, chosen by `uses_faiss`.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from glassgpt.artifacts import read_json, write_file_atomic, write_json_atomic
from glassgpt.errors import UserError
from glassgpt.trace.knn_store import CHUNK_ROWS, KnnStore

EXACT_MAX = 1_000_000  # `search=auto` is exact up to this many windows, faiss beyond


# ----------------------------------------------------------------------------------------------------
# search


def exact_scores(embeddings: np.ndarray, queries: np.ndarray, chunk_rows: int = CHUNK_ROWS) -> np.ndarray:
    """(m, n) cosine of unit `queries` (m, D) against every stored unit row, reading the memory-mapped
    store `chunk_rows` rows at a time (bounded memory whatever its size)."""
    q = torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float32))
    out = np.empty((len(q), len(embeddings)), np.float32)
    for lo in range(0, len(embeddings), chunk_rows):
        chunk = torch.from_numpy(np.asarray(embeddings[lo:lo + chunk_rows], dtype=np.float32))
        out[:, lo:lo + len(chunk)] = (q @ chunk.T).numpy()
    return out


def top_ids(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest scores, best first (ties: lower index first)."""
    k = min(k, len(scores))
    part = np.argpartition(-scores, k - 1)[:k]
    return part[np.lexsort((part, -scores[part]))]


def build_faiss_index(embeddings: np.ndarray, chunk_rows: int = CHUNK_ROWS, seed: int = 0):
    """IVF-PQ over unit rows for inner product, trained on a sample and filled chunk by chunk from the
    memory map (the store is never loaded whole). PQ codes are coarse; query_faiss re-ranks exactly."""
    faiss = _import_faiss()
    n, d = embeddings.shape
    nlist = max(1, min(int(math.sqrt(n)), n // 64))
    m = max(s for s in range(1, d + 1) if d % s == 0 and s <= max(1, d // 4))  # sub-quantizers of 4+ dims
    nbits = max(4, min(8, int(math.log2(max(n // 64, 16)))))
    index = faiss.IndexIVFPQ(faiss.IndexFlatIP(d), d, nlist, m, nbits, faiss.METRIC_INNER_PRODUCT)
    sample = np.sort(np.random.default_rng(seed).choice(n, size=min(n, max(64 * nlist, 4096), 262_144), replace=False))
    index.train(np.asarray(embeddings[sample], dtype=np.float32))
    for lo in range(0, n, chunk_rows):
        index.add(np.ascontiguousarray(embeddings[lo:lo + chunk_rows], dtype=np.float32))
    return index


def query_faiss(index, embeddings: np.ndarray, queries: np.ndarray, k: int, nprobe: int = 64,
                rerank: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """(scores, ids), best first: `rerank * k` IVF-PQ candidates re-scored exactly from the memory map."""
    _import_faiss().omp_set_num_threads(torch.get_num_threads())
    index.nprobe = nprobe
    _, cand = index.search(np.ascontiguousarray(queries, dtype=np.float32), k * rerank)
    out_s, out_i = np.full((len(queries), k), -np.inf, np.float32), np.full((len(queries), k), -1, np.int64)
    for r, ids in enumerate(cand):
        ids = np.unique(ids[ids >= 0])
        s = np.asarray(embeddings[ids], np.float32) @ np.asarray(queries[r], np.float32)
        best = top_ids(s, k)
        out_s[r, :len(best)], out_i[r, :len(best)] = s[best], ids[best]
    return out_s, out_i


def _import_faiss():
    try:
        import faiss
    except ImportError:
        raise UserError("--search=faiss needs faiss: `pip install glassgpt[faiss]`, or use --search=exact") from None
    return faiss


def load_or_build_faiss(store: KnnStore):
    """The store's IVF-PQ index, built on first use and saved beside it, tied to the store's build_id."""
    faiss = _import_faiss()
    path, side = store.path / "faiss.ivfpq.index", store.path / "faiss.json"
    if path.exists() and side.exists() and read_json(side).get("build_id") == store.meta["build_id"]:
        return faiss.read_index(str(path))
    index = build_faiss_index(store.embeddings)
    write_file_atomic(path, faiss.serialize_index(index).tobytes())
    write_json_atomic(side, {"build_id": store.meta["build_id"], "kind": "ivfpq", "n": len(store)})
    return index


def uses_faiss(store: KnnStore, search: str) -> bool:
    return search == "faiss" or (search == "auto" and len(store) > EXACT_MAX)


