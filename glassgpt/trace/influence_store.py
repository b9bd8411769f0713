"""The influence store: EK-FAC factors plus a recall index of every training window's gradient.

    store = build_store(model, corpus, "train", out_dir / "influence_train", built_from=run.provenance())
    store = open_store(run)                      # checked fresh against the run's fingerprints

Training windows are `context + 1` tokens every `context` tokens inside each document segment, so
every next-token prediction of the split is in exactly one window (overlapping windows would count
a prediction twice). Per window the store keeps a K-FAC-whitened, low-rank projected, unit-normalised
gradient (TrackStar, arXiv 2410.17413, with a K-FAC metric; LoGra's factored projection, arXiv
2405.13954): per layer phi = (P_S W_S g)^T (P_A W_A a) summed over positions, W = the damped K-FAC
factor's inverse square root, P a seeded Gaussian projection to `proj_dim` per side, so no
per-window gradient matrix is ever formed. Its cosine with the query's phi finds candidates fast;
glassgpt/trace/influence_query.py then scores candidates exactly. Layout (docs/influence.md):

    store.json      sidecar: format, settings, sizes, timings, built_from (checkpoint + data fingerprints)
    windows.npy     int64 (n, 5) [doc, tok_start, tok_end, char_offset, line]
    vectors.npy     float16 (n, D) unit rows, D = layers x proj_dim^2 (fewer where a side is smaller)
    factors.npz     EK-FAC eigenvectors / eigenvalues per layer
    projection.npz  per layer the (k, din') and (k, dout) whiten-and-project matrices
    bm25/           BM25 over the windows' text (glassgpt.trace.knn's), for candidates too
"""

from __future__ import annotations

import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from glassgpt.artifacts import check_writable, open_artifact, rebuild_command, save_artifact
from glassgpt.corpus import Corpus
from glassgpt.errors import UserError
from glassgpt.trace import influence as inf
from glassgpt.trace.knn_store import build_bm25, locate_windows, window_spans

STORE_FORMAT = "glassgpt-influence/1"
PROJ_DIM = 32  # per side and layer: recall of the exact top-10 0.70 at 32, 0.40 at 16 (docs/influence.md)
FIT_WINDOWS = 2048  # windows the EK-FAC factors are fitted on (a seeded sample), two passes each
_CACHE: dict[tuple[str, Any], dict[str, Any]] = {}


def training_windows(corpus: Corpus, split: str, context: int) -> np.ndarray:
    """(n, 3) [doc, tok_start, tok_end]: `context + 1` tokens every `context` tokens per segment
    (inputs [start, end-1), targets [start+1, end)); windows with no prediction are dropped."""
    spans = window_spans(corpus.segments(split), context + 1, context)
    return spans[spans[:, 2] - spans[:, 1] >= 2]


def window_batches(tokens: np.ndarray, spans: np.ndarray, rows: np.ndarray, batch_size: int,
                   device: Any = "cpu") -> Iterator[tuple[np.ndarray, torch.Tensor]]:
    """(row ids, (B, L) token ids) for the given rows of `spans`, equal lengths batched together."""
    lengths = spans[rows, 2] - spans[rows, 1]
    for length in np.unique(lengths)[::-1]:
        ids = rows[lengths == length]
        for b in range(0, len(ids), batch_size):
            r = ids[b:b + batch_size]
            x = np.stack([tokens[spans[i, 1]:spans[i, 2]] for i in r]).astype(np.int64)
            yield r, torch.from_numpy(x).to(device)


def fit_rows(spans: np.ndarray, n_fit: int, seed: int = 0) -> np.ndarray:
    """The full-length windows the factors are fitted on: all, or a seeded sample of n_fit, ascending."""
    lengths = spans[:, 2] - spans[:, 1]
    full = np.flatnonzero(lengths == lengths.max())
    if len(full) <= n_fit:
        return full
    return np.sort(np.random.default_rng(seed).choice(full, n_fit, replace=False))


# ----------------------------------------------------------------------------------------------------
# the recall vectors


def projections(factors: inf.EkfacFactors, k: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer (R_A (ka, din'), R_S (ks, dout)): P diag(eig + delta)^-1/2 Q^T with a seeded Gaussian P
    (k x d, scaled 1/sqrt(k)); a side no wider than k is whitened but not projected."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for qa, qs, ea, es in zip(factors.q_a, factors.q_s, factors.eig_a, factors.eig_s, strict=True):
        sides = []
        for q, e in ((qa, ea), (qs, es)):
            white = q / torch.sqrt(e + factors.damping * float(e.mean()) + 1e-12)  # columns scaled: Q diag^-1/2
            d = q.size(0)
            p = torch.randn(k, d, generator=gen) / k ** 0.5 if d > k else torch.eye(d)
            sides.append((p @ white.T).contiguous())
        out.append((sides[0], sides[1]))
    return out


def recall_vectors(ag: dict[str, tuple[torch.Tensor, torch.Tensor]], layers: list[str],
                   proj: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """(B, D) unit rows: per layer sum_t (R_S g_t)(R_A a_t)^T, flattened and concatenated."""
    parts = []
    for n, (ra, rs) in zip(layers, proj, strict=True):
        a, g = ag[n]
        parts.append(torch.einsum("bto,bti->boi", g @ rs.T.to(g.device), a @ ra.T.to(a.device)).flatten(1))
    v = torch.cat(parts, 1)
    return v / v.norm(dim=1, keepdim=True).clamp(min=1e-30)  # a zero gradient stays zero (no NaN)


def embed_windows(model: torch.nn.Module, factors: inf.EkfacFactors, proj: list, tokens: np.ndarray,
                  spans: np.ndarray, rows: np.ndarray, batch_size: int, progress: bool = False) -> np.ndarray:
    """(len(rows), D) float16 recall vectors (unit rows) of the windows `rows`, with their true next tokens."""
    from tqdm import tqdm

    dev = next(model.parameters()).device
    dim = sum(ra.size(0) * rs.size(0) for ra, rs in proj)
    out = np.zeros((len(rows), dim), np.float16)
    where = {int(r): i for i, r in enumerate(rows)}
    bar = tqdm(total=len(rows), unit="win", desc="window gradients", disable=not progress, file=sys.stderr)
    for r, w in window_batches(tokens, spans, rows, batch_size, dev):
        ag, _ = inf.layer_grads(model, factors.layers, w[:, :-1], w[:, 1:])
        out[[where[int(i)] for i in r]] = recall_vectors(ag, factors.layers, proj).cpu().numpy()
        bar.update(len(r))
    bar.close()
    return out


# ----------------------------------------------------------------------------------------------------
# the store


@dataclass
class InfluenceStore:
    path: Path
    vectors: np.ndarray  # float16 (n, D) memmap, unit rows
    windows: np.ndarray  # int64 (n, 5)
    factors: inf.EkfacFactors
    proj: list[tuple[torch.Tensor, torch.Tensor]]
    meta: dict
    stale: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.windows)

    def cached(self, key: str, make: Any) -> Any:
        c = _CACHE.setdefault((str(self.path), self.meta.get("build_id")), {})
        if key not in c:
            c[key] = make()
        return c[key]

    @property
    def bm25(self):
        import bm25s

        return self.cached("bm25", lambda: bm25s.BM25.load(str(self.path / "bm25"), mmap=True, show_progress=False))

    def cosines(self, query: np.ndarray) -> np.ndarray:
        """(n,) cosine of a unit query vector with every window's, read from the memory map in chunks
        (bounded memory whatever the store's size)."""
        from glassgpt.trace.knn_search import exact_scores

        return exact_scores(self.vectors, query[None], chunk_rows=8192)[0]


def _fit(model: torch.nn.Module, tokens: np.ndarray, spans: np.ndarray, fit: np.ndarray, n_train: int,
         damping: float | None, batch_size: int, dist_info: Any) -> inf.EkfacFactors:
    """fit_ekfac on the windows `fit`; under torchrun each rank takes a contiguous share and the sums meet."""
    from glassgpt.distributed import all_reduce_sum

    lo, hi = 0, len(fit)
    if dist_info is not None and dist_info.enabled:
        part = np.array_split(np.arange(len(fit)), dist_info.world_size)[dist_info.rank]
        lo, hi = (int(part[0]), int(part[-1]) + 1) if len(part) else (0, 0)
    w = torch.from_numpy(np.stack([tokens[spans[i, 1]:spans[i, 2]] for i in fit[lo:hi]]).astype(np.int64)) \
        if hi > lo else torch.zeros(0, int(spans[fit[0], 2] - spans[fit[0], 1]), dtype=torch.long)
    info = dist_info

    def reduce(t: torch.Tensor) -> torch.Tensor:
        return all_reduce_sum(t, info) if info is not None and info.enabled else t

    # labels are seeded by a window's place in the fit sample, so every sharding draws the same ones
    return inf.fit_ekfac(model, w, damping=damping, batch_size=batch_size, n_train=n_train, reduce=reduce,
                         first_index=lo, allow_empty=True)


def build_store(model: torch.nn.Module, corpus: Corpus, split: str, store_dir: str | Path, *,
                context: int | None = None, proj_dim: int = PROJ_DIM, fit_windows: int = FIT_WINDOWS,
                damping: float | None = None, batch_size: int = 32, built_from: dict | None = None,
                dist_info: Any = None, progress: bool = False) -> InfluenceStore | None:
    """Fit EK-FAC on (a sample of) the split's windows, embed every window's gradient, write the store.
    Under torchrun each rank takes a share of both passes; rank 0 writes (the same store as one process)."""
    from glassgpt.distributed import gather_objects

    context = context or inf.block_size(model)
    if not 1 <= context <= inf.block_size(model):
        raise UserError(f"context={context} must be between 1 and the model's block_size {inf.block_size(model)}")
    if proj_dim < 1 or fit_windows < 1:
        raise UserError(f"proj_dim and fit_windows must be >= 1, got {proj_dim} and {fit_windows}")
    check_writable(store_dir)
    t0 = time.perf_counter()
    spans = training_windows(corpus, split, context)
    if len(spans) == 0:
        raise UserError(f"the {split} split of {corpus.data_dir} has no window of 2+ tokens to score")
    tokens = corpus.tokens(split)
    factors = _fit(model, tokens, spans, fit_rows(spans, fit_windows), len(spans), damping, batch_size, dist_info)
    t_fit = time.perf_counter() - t0
    proj = projections(factors, proj_dim)
    rows = np.arange(len(spans))
    enabled = dist_info is not None and dist_info.enabled
    if enabled:
        rows = np.array_split(rows, dist_info.world_size)[dist_info.rank]
    vecs = embed_windows(model, factors, proj, tokens, spans, rows, batch_size, progress)
    if enabled:
        parts = gather_objects(vecs, dist_info)
        if not dist_info.master:
            return None
        vecs = np.concatenate(parts)
    settings = {"context": context, "proj_dim": proj_dim, "fit_windows": fit_windows, "damping": factors.damping,
                "batch_size": batch_size, "layers": factors.layers}
    timings = {"fit_seconds": round(t_fit, 2), "build_seconds": round(time.perf_counter() - t0, 2),
               "world_size": dist_info.world_size if enabled else 1}
    write_store(Path(store_dir), corpus, split, spans, vecs, factors, proj, settings, timings, built_from or {})
    return load_store(store_dir)


def write_store(store_dir: Path, corpus: Corpus, split: str, spans: np.ndarray, vecs: np.ndarray,
                factors: inf.EkfacFactors, proj: list, settings: dict, timings: dict, built_from: dict) -> None:
    """One artifact through the protocol (glassgpt.artifacts.save_artifact): the settings are the
    sidecar's params and also stay at its top level, where the readers find them."""
    texts = [corpus.decode(split, int(s), int(e)) for _, s, e in spans]
    rebuild = rebuild_command("influence", out_dir=store_dir.parent)
    with save_artifact(store_dir, "influence", params=settings, built_from=built_from, rebuild=rebuild) as w:
        np.save(w.dir / "vectors.npy", vecs.astype(np.float16))
        np.save(w.dir / "windows.npy", locate_windows(corpus, split, spans))
        arrays: dict[str, Any] = {f"{s}_{i}": t.numpy() for i, (ra, rs) in enumerate(proj)
                                  for s, t in (("a", ra), ("s", rs))}
        state: dict[str, Any] = factors.state()
        np.savez(w.dir / "factors.npz", **state)
        np.savez(w.dir / "projection.npz", **arrays)
        build_bm25(texts, w.dir / "bm25")
        factor_bytes = sum(p.stat().st_size for p in (w.dir / "factors.npz", w.dir / "projection.npz"))
        w.meta.update(build_id=uuid.uuid4().hex, split=split, n_windows=len(spans), dim=int(vecs.shape[1]),
                      **settings, factors=factors.meta(), **timings,
                      n_tokens=int((spans[:, 2] - spans[:, 1] - 1).sum()),
                      bytes_per_window=int(vecs.shape[1] * 2 + 5 * 8), factor_bytes=factor_bytes)


def load_store(store_dir: str | Path, build_hint: str = "glassgpt trace-influence --build", *,
               source: Any = None, allow_stale: bool = False, stale_hint: str = "") -> InfluenceStore:
    """Open a store (open_artifact: present, this format, fresh against `source` when given), checking
    that its files exist and have the shapes the sidecar promises."""
    store_dir = Path(store_dir)
    art = open_artifact(store_dir, "influence", rebuild=build_hint, source=source, allow_stale=allow_stale,
                        stale_hint=stale_hint)
    meta = art.meta
    arrays = {}
    for name, shape, dtype in (("vectors", (meta["n_windows"], meta["dim"]), np.float16),
                               ("windows", (meta["n_windows"], 5), np.int64)):
        p = store_dir / f"{name}.npy"
        try:
            a = np.load(p, mmap_mode="r")
        except (ValueError, OSError, EOFError) as e:
            raise UserError(f"{p} is missing or corrupt ({str(e)[:80]}); rebuild with `{build_hint}`") from None
        if a.shape != shape or a.dtype != dtype:
            raise UserError(f"{p} holds {a.dtype}{a.shape}, the sidecar says {np.dtype(dtype)}{shape}; "
                            f"rebuild with `{build_hint}`")
        arrays[name] = a
    try:
        with np.load(store_dir / "factors.npz", allow_pickle=False) as z:
            factors = inf.EkfacFactors.from_state(meta["factors"], {k: z[k] for k in z.files})
        with np.load(store_dir / "projection.npz", allow_pickle=False) as z:
            proj = [(torch.from_numpy(z[f"a_{i}"]), torch.from_numpy(z[f"s_{i}"])) for i in range(len(factors.layers))]
    except (OSError, KeyError, ValueError) as e:
        raise UserError(f"the factors in {store_dir} are missing or corrupt ({str(e)[:80]}); "
                        f"rebuild with `{build_hint}`") from None
    return InfluenceStore(store_dir, arrays["vectors"], np.asarray(arrays["windows"]), factors, proj, meta,
                          stale=art.stale)


def build_command(run: Any, store_dir: str | Path | None = None) -> str:
    where = f" --store_dir={store_dir}" if store_dir else ""
    return f"glassgpt trace-influence --out_dir={run.out_dir} --build{where}"


def open_store(run: Any, *, split: str = "train", store_dir: str | Path | None = None,
               allow_stale: bool = False) -> InfluenceStore:
    """The run's store, checked against run.provenance() by string comparison; missing or stale: a
    UserError naming the rebuild command (stale + allow_stale: a warning)."""
    hint = build_command(run, store_dir)
    path = Path(store_dir) if store_dir else Path(run.out_dir) / f"influence_{split}"
    store = load_store(path, hint, source=run, allow_stale=allow_stale,
                       stale_hint=" or pass --allow_stale to use it anyway")
    mods = dict(run.model.named_modules())
    if any(n not in mods for n in store.factors.layers):
        raise UserError(f"the influence store in {path} was built for another model; rebuild with `{hint}`")
    if store.stale:
        print(f"warning: using a STALE influence store ({'; '.join(store.stale)}); rebuild with `{hint}`",
              file=sys.stderr)
    return store
