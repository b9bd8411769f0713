"""The kNN store: every training window embedded by the model, calibrated, beside a BM25 index.

`build_store` embeds the windows of a split (the model's forward, stopped at a layer, pooled,
calibrated on the store's own windows) and saves them with BM25 through the artifact protocol;
`open_store` opens the run's store, fresh or stale (`run.stale_reasons`). A long-running process
(the viewer) keeps the loaded parts of at most STORE_CACHE_SIZE stores. docs/knn.md has the layout.
"""

from __future__ import annotations

import sys
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from glassgpt.artifacts import check_writable, open_artifact, rebuild_command, save_artifact
from glassgpt.corpus import Corpus
from glassgpt.errors import UserError
from glassgpt.progress import Progress, ProgressFn
from glassgpt.windows import window_starts

CHUNK_ROWS = 65_536  # store rows scored per matmul: 65536 x 768 float32 = 200 MB at GPT-2 small's width
CALIB_SAMPLE = 100_000  # rows the calibration statistics are fitted on (a random sample of the store)
STORE_CACHE_SIZE = 4  # stores whose loaded parts (BM25, float32 rows) a process keeps, least recently used out
_CACHE: OrderedDict[tuple[str, Any], dict[str, Any]] = OrderedDict()


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


def resolve_layer(model: Any, layer: int | None) -> int:
    n: int = model.config.n_layer
    at = n if layer is None or layer == -1 else layer
    if not 0 <= at <= n:
        raise UserError(f"layer={at} is out of range: use 0..{n} ({n} or -1: final layer-normed)")
    return at


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
                  pooling: str = "mean", batch_size: int = 32, progress: bool = False,
                  on_progress: ProgressFn | None = None) -> np.ndarray:
    """Raw pooled states (float32, not calibrated) of every window.
    Windows of equal length are batched (no padding, no mask); the forward stops at `layer` and never
    computes lm_head. Overlapping windows cannot share one forward: with absolute positions and causal
    attention a window's states depend on where it starts."""
    device = next(model.parameters()).device
    width: int = model.config.n_embd  # type: ignore[assignment]
    out = np.zeros((len(spans), width), np.float32)
    lengths = spans[:, 2] - spans[:, 1]
    bar = Progress(len(spans), "embedding windows", unit="win", callback=on_progress, disable=not progress)
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
        """Loaded once per process and store build (a viewer opens the store on every request); the
        parts of at most STORE_CACHE_SIZE stores are kept, the least recently used dropped first."""
        at = (str(self.path), self.meta.get("build_id"))
        c = _CACHE.setdefault(at, {})
        _CACHE.move_to_end(at)
        while len(_CACHE) > STORE_CACHE_SIZE:
            _CACHE.popitem(last=False)
        if key not in c:
            c[key] = make()
        return c[key]

    @property
    def bm25(self) -> Any:
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
                settings: dict[str, Any], built_from: dict, t0: float, rebuild: str) -> None:
    """Calibrate the raw pooled states, write embeddings, windows, calibration, BM25 and the sidecar in
    one artifact (one rename: a store is the old one or the new one, never a mix). The settings are
    the sidecar's params, and also stay at its top level, where every glassgpt-knn/2 reader finds them."""
    calib = fit_calibration(raw, settings["calibration"], settings["whiten_dim"])
    dim = calib["whiten"].shape[1] if "whiten" in calib else raw.shape[1]
    texts = [corpus.decode(split, int(s), int(e)) for _, s, e in spans]
    with save_artifact(store_dir, "knn", params=settings, built_from=built_from, rebuild=rebuild) as w:
        emb = np.lib.format.open_memmap(w.dir / "embeddings.npy", mode="w+", dtype=np.float16,
                                        shape=(len(spans), dim))
        for lo in range(0, len(spans), CHUNK_ROWS):
            emb[lo:lo + CHUNK_ROWS] = calibrate(raw[lo:lo + CHUNK_ROWS], calib)
        emb.flush()
        np.save(w.dir / "windows.npy", locate_windows(corpus, split, spans))
        np.savez(w.dir / "calibration.npz", **calib)  # type: ignore[arg-type]
        build_bm25(texts, w.dir / "bm25")
        w.meta.update(build_id=uuid.uuid4().hex, split=split, n_windows=len(spans), dim=dim, **settings,
                      score_reference=score_reference(emb), build_seconds=round(time.perf_counter() - t0, 2))
        del emb


def build_store(model: torch.nn.Module, corpus: Corpus, split: str, store_dir: str | Path, *, context: int,
                stride: int, layer: int | None = None, pooling: str = "mean", calibration: str = "whiten",
                whiten_dim: int | None = None, batch_size: int = 32, built_from: dict | None = None,
                dist_info: Any = None, progress: bool = False, on_progress: ProgressFn | None = None,
                rebuild: str = "glassgpt trace-knn --build") -> KnnStore | None:
    """Embed every window of `split` and write the store. Under torchrun each rank embeds a contiguous
    share of the windows and rank 0 gathers them and writes (the same store as one process).
    `progress` draws a bar; `on_progress(done, total, what)` is called as windows are embedded."""
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
        raw = embed_windows(model, tokens, spans, layer, pooling, batch_size, progress, on_progress)
    settings = {"context": context, "stride": stride, "layer": layer, "pooling": pooling,
                "calibration": calibration, "whiten_dim": whiten_dim,
                "embed_dtype": str(next(model.parameters()).dtype).removeprefix("torch.")}
    write_store(Path(store_dir), corpus, split, spans, raw, settings, built_from or {}, t0, rebuild)
    return load_store(store_dir, rebuild)


def load_store(store_dir: str | Path, build_hint: str = "glassgpt trace-knn --build", *, source: Any = None,
               allow_stale: bool = False, stale_hint: str = "") -> KnnStore:
    """Memory-map a store (open_artifact: present, this format, fresh against `source` when given),
    checking that its files exist and have the shapes the sidecar promises."""
    art = open_artifact(store_dir, "knn", rebuild=build_hint, source=source, allow_stale=allow_stale,
                        stale_hint=stale_hint)
    meta, arrays = art.meta, {}
    for name, shape, dtype in (("embeddings", (meta["n_windows"], meta["dim"]), np.float16),
                               ("windows", (meta["n_windows"], 5), np.int64)):
        p = art.path / f"{name}.npy"
        if not p.exists():
            raise art.damaged(f"{p.name} is missing")
        try:
            a = np.load(p, mmap_mode="r")
        except (ValueError, OSError, EOFError) as e:  # truncated: "mmap length is greater than file size"
            raise art.damaged(f"{p.name} is truncated or corrupt: {str(e)[:80]}") from None
        if a.shape != shape or a.dtype != dtype:
            raise art.damaged(f"{p.name} holds {a.dtype}{a.shape}, the sidecar says {np.dtype(dtype)}{shape}")
        arrays[name] = a
    with np.load(art.path / "calibration.npz", allow_pickle=False) as z:
        calib = {k: z[k] for k in z.files}
    return KnnStore(art.path, arrays["embeddings"], np.asarray(arrays["windows"]), meta, calib, art.stale)


def build_command(run: Any, store_dir: str | Path | None = None) -> str:
    return rebuild_command("knn", out_dir=run.out_dir, store_dir=store_dir)


def open_store(run: Any, *, split: str = "train", store_dir: str | Path | None = None,
               allow_stale: bool = False) -> KnnStore:
    """The run's store, checked fresh against run.provenance() by string comparison (no hashing); a
    missing or stale one is a UserError naming the build command (stale + allow_stale: a warning)."""
    hint = build_command(run, store_dir)
    path = Path(store_dir) if store_dir else Path(run.out_dir) / f"knn_{split}"
    store = load_store(path, hint, source=run, allow_stale=allow_stale,
                       stale_hint=" or pass --allow_stale to use it anyway")
    if store.meta["dim"] > run.model.config.n_embd or store.meta["layer"] > run.model.config.n_layer:
        raise UserError(f"the store in {path} was built for another model shape; rebuild with `{hint}`")
    if store.stale:
        print(f"warning: using a STALE kNN store ({'; '.join(store.stale)}): scores and neighbours come from "
              f"other embeddings; rebuild with `{hint}`", file=sys.stderr)
    return store
