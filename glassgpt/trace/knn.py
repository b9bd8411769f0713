"""Nearest training windows, ranked by BM25 (the default) or by the model's own embeddings: `glassgpt trace-knn`.

    glassgpt trace-knn --out_dir=out-shakespeare-char --build            # build the store (once)
    glassgpt trace-knn --out_dir=out-shakespeare-char --start="ROMEO:" --k=5
    glassgpt trace-knn --out_dir=out-shakespeare-char --text=FILE:poem.txt --per_window --json
    torchrun --nproc_per_node=2 --no-python glassgpt trace-knn --out_dir=... --build   # sharded build

docs/knn.md has the walkthrough, the store's layout, the measured quality and when to trust which signal.
"""

from __future__ import annotations

import json
import math
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from glassgpt.artifacts import check_writable, read_json, write_artifact, write_file_atomic, write_json_atomic
from glassgpt.config import load_config, read_text_arg, wants_help
from glassgpt.corpus import Corpus
from glassgpt.errors import UserError
from glassgpt.sampling import SamplingSettings
from glassgpt.windows import window_starts

STORE_FORMAT = "glassgpt-knn/2"
EXACT_MAX = 1_000_000  # `search=auto` is exact up to this many windows, faiss beyond
CHUNK_ROWS = 65_536  # store rows scored per matmul: 65536 x 768 float32 = 200 MB at GPT-2 small's width
CALIB_SAMPLE = 100_000  # rows the calibration statistics are fitted on (a random sample of the store)
RRF_K = 60  # reciprocal-rank fusion constant (Cormack et al. 2009)
FUSION = "z"  # how hybrid fuses the two signals: "z" (sum of z-scores) or "rrf"; chosen by measurement
CANDIDATES = 100  # per signal, the top windows that enter the fusion
_CACHE: dict[tuple[str, Any], dict[str, Any]] = {}


@dataclass
class TraceKnnConfig(SamplingSettings):
    """`glassgpt trace-knn`: build a window store, then trace a generation (or a given text) to it."""

    out_dir: str = "out"
    """Run to trace (out_dir, ckpt.pt or HF dir); the store goes in <run out_dir>/knn_<split>."""
    ckpt_iter: str | None = None
    """Open out_dir/ckpt-<iter>.pt kept by train.py --keep_every (or 'best': ckpt-best.pt) instead of ckpt.pt."""
    start: str | None = None
    """Prompt to generate from (or FILE:path); the traced text is prompt + output."""
    text: str | None = None
    """Trace this text (or FILE:path) instead of generating."""
    k: int = 5
    """Neighbours to return."""
    rank: Literal["bm25", "embedding", "hybrid"] = "bm25"
    """Order by 'bm25' (the words; measured best on planted canaries, docs/knn.md), 'embedding' (the
    model's view), or 'hybrid' (both, fused by z-scores). Every neighbour shows both signals."""
    per_window: bool = False
    """Also search each query window on its own: a long text can point to several sources."""
    json: bool = False
    """Print a machine-readable result (what `explain` returns) instead of the readable one."""
    build: bool = False
    """Build (or rebuild) the store first; alone, only build."""
    allow_stale: bool = False
    """Use a store built from other weights or data anyway, with a warning (never silently)."""
    store_dir: str | None = None
    split: Literal["train", "val"] = "train"
    window: int | None = None
    """Window length in tokens when building; default the model's block_size."""
    stride: int | None = None
    """Step between window starts when building; default window // 2; at most window."""
    query_stride: int | None = None
    """Step between the sliding windows of a long traced text; default the store's stride."""
    layer: int | None = None
    """Blocks run before pooling: n_layer (default; -1 also) = final layer-normed, i = residual after i."""
    pooling: Literal["mean", "last"] = "mean"
    """'mean' over positions or 'last' position. Build only."""
    calibration: Literal["none", "center", "standardize", "whiten"] = "whiten"
    """'none', 'center', 'standardize' or 'whiten', fitted on the store's own windows. Build only."""
    whiten_dim: int | None = None
    """Keep this many principal directions when whitening (default all)."""
    embed_dtype: Literal["float32", "bfloat16"] = "float32"
    """Model precision while embedding: 'float32' or 'bfloat16' (faster where the CPU/GPU has it)."""
    batch_size: int = 32
    search: Literal["auto", "exact", "faiss"] = "auto"
    """'exact' (chunked matmul over the memory-mapped store), 'faiss' (IVF-PQ + exact re-rank), 'auto'."""
    nprobe: int = 64
    """IVF lists searched per query."""
    device: str = "auto"
    threads: int | None = None
    """CPU threads (open_run picks one per core by default); on a CPU shared with other jobs 1 can be faster."""
    data_dir: str | None = None
    """Dataset the store indexes; default the run's own training data."""
    show_chars: int = 240
    """Characters of each neighbour shown in the readable output (0: all)."""
    progress: bool = True


# ----------------------------------------------------------------------------------------------------
# windows


def window_spans(segments: np.ndarray, context: int, stride: int) -> np.ndarray:
    """(n, 3) int64 rows [doc, tok_start, tok_end]: windows of `context` tokens every `stride` tokens
    inside each segment, never crossing one. A segment's last window may be shorter; a window that
    would only repeat the tail of the previous one is not made. stride <= context, so every token is
    in at least one window."""
    if context < 1 or not 1 <= stride <= context:
        raise UserError(f"stride={stride} must be between 1 and window={context}: a larger stride leaves "
                        f"{max(0, stride - context)} of every {stride} tokens in no window")
    rows = []
    for doc, start, end, *_ in np.asarray(segments, dtype=np.int64):
        s = int(start)
        while s < end:
            e = min(s + context, int(end))
            rows.append((int(doc), s, e))
            if e == end:
                break
            s += stride
    return np.array(rows, dtype=np.int64).reshape(-1, 3)


def locate_windows(corpus: Corpus, split: str, spans: np.ndarray) -> np.ndarray:
    """(n, 5) rows [doc, tok_start, tok_end, char_offset, line], as Corpus.locate gives, in one pass
    (counting from each segment's start for every window would be quadratic in the segment)."""
    segs = corpus.segments(split)
    out = np.zeros((len(spans), 5), dtype=np.int64)
    out[:, :3] = spans
    seg_i, pos, char, line = -1, 0, 0, 1
    for i in np.argsort(spans[:, 1], kind="stable"):
        start = int(spans[i, 1])
        j = int(np.searchsorted(segs[:, 1], start, side="right")) - 1
        if j != seg_i:  # entered a new segment: restart from its recorded offset
            seg_i, pos, char, line = j, int(segs[j, 1]), int(segs[j, 3]), int(segs[j, 4])
        n_chars, n_lines = corpus.text_counts(split, pos, start)
        char, line, pos = char + n_chars, line + n_lines, start
        out[i, 3:] = (char, line)
    return out


# ----------------------------------------------------------------------------------------------------
# embedding: the model's forward, stopped at the layer, pooled, calibrated


def resolve_layer(model: torch.nn.Module, layer: int | None) -> int:
    n = model.config.n_layer
    layer = n if layer is None or layer == -1 else layer
    if not 0 <= layer <= n:
        raise UserError(f"layer={layer} is out of range: use 0..{n} ({n} or -1: final layer-normed)")
    return layer


def pool(states: torch.Tensor, pooling: str) -> torch.Tensor:
    """(B, T, C) -> (B, C)."""
    if pooling == "mean":
        return states.mean(dim=1)
    return states[:, -1, :]


def normalize(x: np.ndarray) -> np.ndarray:
    """Unit rows (cosine = dot product); an all-zero row stays zero."""
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


@torch.inference_mode()
def embed_windows(model: torch.nn.Module, tokens: np.ndarray, spans: np.ndarray, layer: int,
                  pooling: str = "mean", batch_size: int = 32, progress: bool = False) -> np.ndarray:
    """Raw pooled states (float32, not calibrated) of every window.
    Windows of equal length are batched (no padding, no mask); the forward stops at `layer` and never
    computes lm_head. Overlapping windows cannot share one forward: with absolute positions and causal
    attention a window's states depend on where it starts."""
    from tqdm import tqdm

    device = next(model.parameters()).device
    out = np.zeros((len(spans), model.config.n_embd), np.float32)
    lengths = spans[:, 2] - spans[:, 1]
    bar = tqdm(total=len(spans), unit="win", desc="embedding windows", disable=not progress, file=sys.stderr)
    for length in np.unique(lengths)[::-1]:
        ids = np.flatnonzero(lengths == length)
        for b in range(0, len(ids), batch_size):
            rows = ids[b:b + batch_size]
            x = np.stack([tokens[spans[r, 1]:spans[r, 2]] for r in rows]).astype(np.int64)
            h = model(torch.from_numpy(x).to(device), stop_at_layer=layer)
            out[rows] = pool(h, pooling).float().cpu().numpy()
            bar.update(len(rows))
    bar.close()
    return out


def fit_calibration(raw: np.ndarray, kind: str, dim: int | None = None, seed: int = 0) -> dict[str, np.ndarray]:
    """Statistics of the store's own windows (a random sample of at most CALIB_SAMPLE rows) that remove
    what every window shares: the common direction (center), rogue dimensions (standardize), or all
    correlations (whiten, optionally to the top `dim` principal directions)."""
    if kind == "none":
        return {}
    n, c = raw.shape
    rows = np.sort(np.random.default_rng(seed).choice(n, min(n, CALIB_SAMPLE), replace=False))
    x = np.asarray(raw[rows], dtype=np.float64)
    mean = x.mean(0)
    if kind == "center":
        return {"mean": mean.astype(np.float32)}
    if kind == "standardize":
        return {"mean": mean.astype(np.float32), "scale": (1 / np.maximum(x.std(0), 1e-6)).astype(np.float32)}
    dim = c if dim is None else dim
    vals, vecs = np.linalg.eigh(np.cov(x - mean, rowvar=False).reshape(c, c))
    top = np.argsort(vals)[::-1][:dim]
    floor = 1e-6 * max(float(vals.max()), 1e-12)  # directions with ~no variance would only add noise
    white = vecs[:, top] / np.sqrt(np.maximum(vals[top], floor))
    return {"mean": mean.astype(np.float32), "whiten": white.astype(np.float32)}


def calibrate(raw: np.ndarray, calib: dict[str, np.ndarray]) -> np.ndarray:
    """Raw pooled vectors (m, C) -> calibrated unit rows (m, D), as the store's rows were made."""
    x = np.asarray(raw, dtype=np.float32) - calib.get("mean", 0)
    if "scale" in calib:
        x = x * calib["scale"]
    if "whiten" in calib:
        x = x @ calib["whiten"]
    return normalize(x)


@torch.inference_mode()
def embed_query(model: torch.nn.Module, ids: list[int], context: int, stride: int, layer: int,
                pooling: str) -> np.ndarray:
    """(n_windows, C) raw pooled states of the sliding windows of a token sequence, in one batch (the
    last one may overlap the one before it; a text shorter than the context is one window)."""
    if not ids:
        raise UserError("the text to trace is empty; pass --text=... or --start=...")
    starts = window_starts(len(ids), context, stride)
    x = torch.tensor([ids[s:s + context] for s in starts], dtype=torch.long, device=next(model.parameters()).device)
    return pool(model(x, stop_at_layer=layer), pooling).float().cpu().numpy()


# ----------------------------------------------------------------------------------------------------
# BM25 over the same windows


def bm25_tokens(texts: list[str]) -> list[list[str]]:
    import bm25s

    return bm25s.tokenize(texts, stopwords="en", return_ids=False, show_progress=False)


def build_bm25(texts: list[str], save_dir: Path) -> None:
    import bm25s

    retriever = bm25s.BM25()
    retriever.index(bm25s.tokenize(texts, stopwords="en", show_progress=False), show_progress=False)
    retriever.save(str(save_dir), show_progress=False)


# ----------------------------------------------------------------------------------------------------
# the store


@dataclass
class KnnStore:
    """A loaded store: memory-mapped calibrated embeddings, window table, calibration, BM25, sidecar."""

    path: Path
    embeddings: np.ndarray  # float16 (n, D) memmap, unit rows
    windows: np.ndarray  # int64 (n, 5) [doc, tok_start, tok_end, char_offset, line]
    meta: dict
    calib: dict[str, np.ndarray]
    stale: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.windows)

    def cached(self, key: str, make: Any) -> Any:
        """Loaded once per process and store build (a viewer opens the store on every request)."""
        c = _CACHE.setdefault((str(self.path), self.meta.get("build_id")), {})
        if key not in c:
            c[key] = make()
        return c[key]

    @property
    def bm25(self):
        import bm25s

        return self.cached("bm25", lambda: bm25s.BM25.load(str(self.path / "bm25"), mmap=True, show_progress=False))

    @property
    def rows(self) -> np.ndarray:
        """The embeddings as float32 in memory when small (<= 256 MB), else the float16 memory map."""
        if self.embeddings.nbytes > 1 << 27:
            return self.embeddings
        return self.cached("f32", lambda: np.asarray(self.embeddings, np.float32))


def score_reference(emb: np.ndarray, seed: int = 0) -> dict[str, float]:
    """Cosines between 2,000 random pairs of stored windows: what "unrelated" scores in this store."""
    rng = np.random.default_rng(seed)
    a, b = (np.sort(rng.integers(0, len(emb), 2000)) for _ in range(2))
    cos = (np.asarray(emb[a], np.float32) * np.asarray(emb[rng.permutation(b)], np.float32)).sum(1)
    return {"p50": round(float(np.quantile(cos, 0.5)), 4), "p99": round(float(np.quantile(cos, 0.99)), 4),
            "mean": round(float(cos.mean()), 4), "std": round(max(float(cos.std()), 1e-4), 4)}


def write_store(store_dir: Path, corpus: Corpus, split: str, spans: np.ndarray, raw: np.ndarray,
                settings: dict[str, Any], built_from: dict, t0: float) -> None:
    """Calibrate the raw pooled states, write embeddings, windows, calibration, BM25 and the sidecar in
    one artifact (one rename: a store is the old one or the new one, never a mix)."""
    calib = fit_calibration(raw, settings["calibration"], settings["whiten_dim"])
    dim = calib["whiten"].shape[1] if "whiten" in calib else raw.shape[1]
    texts = [corpus.decode(split, int(s), int(e)) for _, s, e in spans]
    with write_artifact(store_dir) as tmp:
        emb = np.lib.format.open_memmap(tmp / "embeddings.npy", mode="w+", dtype=np.float16, shape=(len(spans), dim))
        for lo in range(0, len(spans), CHUNK_ROWS):
            emb[lo:lo + CHUNK_ROWS] = calibrate(raw[lo:lo + CHUNK_ROWS], calib)
        emb.flush()
        np.save(tmp / "windows.npy", locate_windows(corpus, split, spans))
        np.savez(tmp / "calibration.npz", **calib)
        build_bm25(texts, tmp / "bm25")
        write_json_atomic(tmp / "store.json", {
            "format": STORE_FORMAT, "build_id": uuid.uuid4().hex, "split": split, "n_windows": len(spans),
            "dim": dim, **settings, "score_reference": score_reference(emb),
            "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "build_seconds": round(time.perf_counter() - t0, 2),
            "built_from": built_from})
        del emb


def build_store(model: torch.nn.Module, corpus: Corpus, split: str, store_dir: str | Path, *, context: int,
                stride: int, layer: int | None = None, pooling: str = "mean", calibration: str = "whiten",
                whiten_dim: int | None = None, batch_size: int = 32, built_from: dict | None = None,
                dist_info: Any = None, progress: bool = False) -> KnnStore | None:
    """Embed every window of `split` and write the store. Under torchrun each rank embeds a contiguous
    share of the windows and rank 0 gathers them and writes (the same store as one process)."""
    from glassgpt.distributed import gather_objects

    layer = resolve_layer(model, layer)
    if whiten_dim is not None and not 1 <= whiten_dim <= model.config.n_embd:
        raise UserError(f"whiten_dim={whiten_dim} must be between 1 and the model's width {model.config.n_embd}")
    if context > model.config.block_size:
        raise UserError(f"window={context} exceeds the model's block_size {model.config.block_size}")
    check_writable(store_dir)
    t0 = time.perf_counter()
    spans = window_spans(corpus.segments(split), context, stride)
    if len(spans) == 0:
        raise UserError(f"the {split} split of {corpus.data_dir} has no tokens to index")
    tokens = corpus.tokens(split)
    if dist_info is not None and dist_info.enabled:
        lo, hi = np.array_split(np.arange(len(spans)), dist_info.world_size)[dist_info.rank][[0, -1]]
        parts = gather_objects(embed_windows(model, tokens, spans[lo:hi + 1], layer, pooling, batch_size), dist_info)
        if not dist_info.master:
            return None
        raw = np.concatenate(parts)
    else:
        raw = embed_windows(model, tokens, spans, layer, pooling, batch_size, progress=progress)
    settings = {"context": context, "stride": stride, "layer": layer, "pooling": pooling,
                "calibration": calibration, "whiten_dim": whiten_dim,
                "embed_dtype": str(next(model.parameters()).dtype).removeprefix("torch.")}
    write_store(Path(store_dir), corpus, split, spans, raw, settings, built_from or {}, t0)
    return load_store(store_dir)


def load_store(store_dir: str | Path, build_hint: str = "glassgpt trace-knn --build") -> KnnStore:
    """Memory-map a store, checking that its files exist and have the shapes the sidecar promises."""
    store_dir = Path(store_dir)
    side = store_dir / "store.json"
    if not side.exists():
        raise UserError(f"no kNN store in {store_dir}; build it with `{build_hint}`")
    meta = read_json(side, None, strict=False)
    if not isinstance(meta, dict):
        raise UserError(f"{side} is not valid JSON (corrupt); rebuild with `{build_hint}`") from None
    if meta.get("format") != STORE_FORMAT:
        raise UserError(f"{side} is not a {STORE_FORMAT} store; rebuild with `{build_hint}`")
    arrays = {}
    for name, shape, dtype in (("embeddings", (meta["n_windows"], meta["dim"]), np.float16),
                               ("windows", (meta["n_windows"], 5), np.int64)):
        p = store_dir / f"{name}.npy"
        if not p.exists():
            raise UserError(f"{p} is missing; rebuild the store with `{build_hint}`")
        try:
            a = np.load(p, mmap_mode="r")
        except (ValueError, OSError, EOFError) as e:  # truncated: "mmap length is greater than file size"
            raise UserError(f"{p} is truncated or corrupt ({str(e)[:80]}); rebuild with `{build_hint}`") from None
        if a.shape != shape or a.dtype != dtype:
            raise UserError(f"{p} holds {a.dtype}{a.shape}, the sidecar says {np.dtype(dtype)}{shape}; "
                            f"rebuild with `{build_hint}`")
        arrays[name] = a
    with np.load(store_dir / "calibration.npz", allow_pickle=False) as z:
        calib = {k: z[k] for k in z.files}
    return KnnStore(store_dir, arrays["embeddings"], np.asarray(arrays["windows"]), meta, calib)


def build_command(run: Any, store_dir: str | Path | None = None) -> str:
    return f"glassgpt trace-knn --out_dir={run.out_dir} --build" + (f" --store_dir={store_dir}" if store_dir else "")


def open_store(run: Any, *, split: str = "train", store_dir: str | Path | None = None,
               allow_stale: bool = False) -> KnnStore:
    """The run's store, checked fresh against run.provenance() by string comparison (no hashing); a
    missing or stale one is a UserError naming the build command (stale + allow_stale: a warning)."""
    hint = build_command(run, store_dir)
    path = Path(store_dir) if store_dir else Path(run.out_dir) / f"knn_{split}"
    store = load_store(path, hint)
    if store.meta["dim"] > run.model.config.n_embd or store.meta["layer"] > run.model.config.n_layer:
        raise UserError(f"the store in {path} was built for another model shape; rebuild with `{hint}`")
    store.stale = run.stale_reasons(store.meta.get("built_from", {}))
    if store.stale and not allow_stale:
        raise UserError(f"the kNN store in {path} is stale: {'; '.join(store.stale)}; rebuild it with "
                        f"`{hint}` or pass --allow_stale to use it anyway")
    if store.stale:
        print(f"warning: using a STALE kNN store ({'; '.join(store.stale)}): scores and neighbours come from "
              f"other embeddings; rebuild with `{hint}`", file=sys.stderr)
    return store


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


def signals_for(store: KnnStore, qvec: np.ndarray, text: str, rank: str, search: str, nprobe: int) -> dict[str, Signal]:
    """Both signals, whatever the ranking, so that every neighbour shows both (BM25 is left out when no
    query word is in the store's vocabulary and it is not the ranking: it has nothing to say)."""
    out = {}
    if uses_faiss(store, search):
        s, i = query_faiss(load_or_build_faiss(store), store.embeddings, qvec[None], CANDIDATES, nprobe)
        ref = store.meta["score_reference"]
        out["embedding"] = Signal(i[0][i[0] >= 0], scores=s[0][i[0] >= 0], mean=ref["mean"], std=ref["std"])
    else:
        out["embedding"] = Signal.of(exact_scores(store.rows, qvec[None])[0])
    full = store.bm25.get_scores(bm25_tokens([text])[0]).astype(np.float32)
    if full.max() > 0 or rank == "bm25":
        out["bm25"] = Signal.of(full)
    return out


def fuse(signals: dict[str, Signal], k: int, how: str = FUSION, by: str | None = None) -> list[tuple[int, float, dict]]:
    """Top-k (window, score, {signal: {rank, score}}) over both signals' candidates: ordered `by` one
    signal (or the only one), or fused: 'z', the sum of each signal's z-score (standard deviations
    above the average window; a confident signal dominates), or 'rrf', reciprocal-rank fusion
    sum(1 / (RRF_K + rank)). docs/knn.md compares them."""
    cand = list(dict.fromkeys(int(i) for s in signals.values() for i in s.ids))
    per = {i: {name: dict(zip(("rank", "score"), s.rank_score(i), strict=False)) for name, s in signals.items()} for i in cand}
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


# ----------------------------------------------------------------------------------------------------
# the command


def _build(cfg: TraceKnnConfig, run: Any) -> None:
    from glassgpt import distributed

    model = run.model
    info = distributed.setup("gloo", run.device)
    try:
        context = cfg.window or model.config.block_size
        model.to({"float32": torch.float32, "bfloat16": torch.bfloat16}[cfg.embed_dtype])
        store = build_store(model, run.corpus, cfg.split, cfg.store_dir or Path(run.out_dir) / f"knn_{cfg.split}",
                            context=context, stride=cfg.stride or max(1, context // 2), layer=cfg.layer,
                            pooling=cfg.pooling, calibration=cfg.calibration, whiten_dim=cfg.whiten_dim,
                            batch_size=cfg.batch_size, built_from=run.provenance(), dist_info=info,
                            progress=cfg.progress and info.master)
        model.float()
        if store is not None:
            m = store.meta
            print(f"built {store.path}: {len(store):,} windows of {m['context']} tokens (stride {m['stride']}, "
                  f"layer {m['layer']}, {m['calibration']}) in {m['build_seconds']:.1f} s", file=sys.stderr)
    finally:
        distributed.teardown(info, finished=True)
    if info.enabled:
        sys.exit(distributed.finish_process(0))


def trace_knn(cfg: TraceKnnConfig) -> dict[str, Any] | None:
    """Build the store if asked, then trace `start` + its generation (or `text`): explain()'s dict."""
    from glassgpt.run import open_run
    from glassgpt.sampling import generate_from

    if cfg.start is not None and cfg.text is not None:
        raise UserError("pass either --start (generate, then trace) or --text (trace as is), not both")
    run = open_run(cfg.out_dir, ckpt_iter=cfg.ckpt_iter, device=cfg.device, data_dir=cfg.data_dir,
                   threads=cfg.threads)
    if cfg.build:
        _build(cfg, run)
        if cfg.start is None and cfg.text is None:
            return None
    elif cfg.start is None and cfg.text is None:
        raise UserError("nothing to trace: pass --start=PROMPT or --text=TEXT (or --build to build the store)")
    store = open_store(run, split=cfg.split, store_dir=cfg.store_dir, allow_stale=cfg.allow_stale)
    for key, meta_key in (("layer", "layer"), ("window", "context"), ("stride", "stride")):  # never mixed
        want = resolve_layer(run.model, cfg.layer) if key == "layer" and cfg.layer is not None else getattr(cfg, key)
        if want is not None and not cfg.build and want != store.meta[meta_key]:
            raise UserError(f"the store in {store.path} was built with {key}={store.meta[meta_key]}, not {want}; "
                            f"rebuild with `{build_command(run, cfg.store_dir)} --{key}={want}` or drop --{key}")
    if not 1 <= cfg.k <= len(store):  # checked before generating, which can take a while
        raise UserError(f"k={cfg.k} but the store has {len(store)} windows; pass --k between 1 and {len(store)}")
    prompt = generated = None
    if cfg.start is not None:
        prompt = read_text_arg(cfg.start, "start")
        generated = run.tokenizer.decode(generate_from(run.model, run.tokenizer, prompt, cfg).outputs[0])
    text = prompt + generated if prompt is not None else read_text_arg(cfg.text)
    return explain(run, store, text, k=cfg.k, rank=cfg.rank, per_window=cfg.per_window, query_stride=cfg.query_stride,
                   search=cfg.search, nprobe=cfg.nprobe, prompt=prompt, generated=generated)


def _signals_line(nb: dict) -> str:
    return ", ".join(f"{n} #{nb[n]['rank']} ({nb[n]['score']:.3f})" if nb[n]["rank"] else f"{n} -"
                     for n in ("embedding", "bm25") if n in nb)


def format_result(r: dict[str, Any], show_chars: int = 240) -> str:
    """The readable report: traced text, then each neighbour with its scores and location."""
    def clip(s):
        return (s if not show_chars or len(s) <= show_chars else s[:show_chars] + " ...")
    lines = [f"prompt: {r['prompt']!r}", f"generated: {r['generated']!r}"] if r["generated"] is not None \
        else [f"text: {clip(r['text'])!r}"]
    ref = r["score_reference"]
    lines.append(f"traced {r['n_tokens']} tokens ({r['n_query_windows']} window(s) pooled) against {r['store']} "
                 f"[{r['rank']}, {r['search']}, {r['query_ms']:.1f} ms; random window pairs score cos "
                 f"{ref['p50']:+.2f} (median), {ref['p99']:+.2f} (p99)]"
                 + ("  ** STALE STORE **" if r["stale"] else ""))
    if r["signals_disagree"]:
        lines.append("** the two signals disagree: no top window by the model's embedding overlaps one by BM25 "
                     "(the words); neither is the answer on its own **")
    for nb in r["neighbours"]:
        lines.append(f"#{nb['rank']}  {nb['doc_id']} line {nb['line']} char {nb['char_offset']}  [{_signals_line(nb)}]")
        lines += ["    " + ln for ln in clip(nb["text"]).splitlines() or [""]]
    for w in r["per_window"]:
        lines.append(f"query chars {w['char_start']}:{w['char_end']} -> " + "; ".join(
            f"{nb['doc_id']} line {nb['line']} [{_signals_line(nb)}]" for nb in w["neighbours"]))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    argv = sys.argv[1:] if argv is None else argv
    if wants_help(TraceKnnConfig, argv, "glassgpt trace-knn"):
        return None
    cfg = load_config(TraceKnnConfig, argv)
    result = trace_knn(cfg)
    if result is not None:
        print(json.dumps(result, indent=1, ensure_ascii=False) if cfg.json else format_result(result, cfg.show_chars))
    return result


if __name__ == "__main__":
    from glassgpt.errors import run_main

    sys.exit(run_main(main))
