"""Nearest training windows in the model's own embedding space: `glassgpt trace-knn`.

The training split is cut into windows (block_size tokens, stride block_size // 2 by default) that never
cross a document/segment boundary. Each window is embedded by the model itself — by default the final
layer-normed hidden states, mean-pooled over positions — and stored unit-normalised as float16. A traced
text (prompt + generated output: the prompt alone does not explain a generation) is embedded the same
way, sliding windows of block_size averaged when it is longer, and its cosine top-k windows are returned
with their place in the training data (document, token range, char offset, line, text).

    glassgpt trace-knn --out_dir=out-shakespeare-char --build            # build the store (once)
    glassgpt trace-knn --out_dir=out-shakespeare-char --start="ROMEO:" --k=5
    glassgpt trace-knn --out_dir=out-shakespeare-char --text=FILE:poem.txt --json

On disk, `<out_dir>/knn_<split>/`:

    embeddings.npy   float16 (n_windows, n_embd), unit rows; memory-mapped on load
    windows.npy      int64 (n_windows, 5) rows [doc, tok_start, tok_end, char_offset, line]
    store.json       sidecar: how it was built and from what (weights + data fingerprints); written last,
                     so a store without it is an unfinished one
    faiss.<kind>.index / .json   the approximate index, when one was asked for or needed

Embeddings move as the model trains, so a store is tied to the checkpoint weights and data files it was
built from; a mismatch is reported in one line and the store is not used unless --allow_stale.
docs/knn.md has the walkthrough and the measured quality (benchmarks/bench_knn.py).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from glassgpt.config import load_config, read_text_arg, wants_help
from glassgpt.corpus import Corpus, write_json
from glassgpt.errors import UserError

STORE_FORMAT = "glassgpt-knn/1"
POOLINGS = ("mean", "last")
SEARCHES = ("auto", "exact", "faiss")
FAISS_KINDS = ("hnsw", "ivf")
EXACT_MAX = 1_000_000  # `search=auto` uses exact search up to this many windows, faiss beyond
CHUNK_ROWS = 65_536  # store rows scored per matmul: 65536 x 768 float32 = 200 MB at GPT-2 small's width


@dataclass
class TraceKnnConfig:
    """`glassgpt trace-knn`: build a window store, then trace a generation (or a given text) to it."""

    out_dir: str = "out"
    """Checkpoint directory (ckpt.pt); the store goes in out_dir/knn_<split> unless store_dir is set."""
    start: str | None = None
    """Prompt to generate from (or FILE:path); the traced text is prompt + output."""
    text: str | None = None
    """Trace this text (or FILE:path) instead of generating."""
    max_new_tokens: int = 200
    temperature: float = 0.8
    top_k: int | None = 200
    top_p: float | None = None
    seed: int = 1337
    k: int = 5
    """Neighbours to return."""
    json: bool = False
    """Print a machine-readable result instead of the readable one."""
    build: bool = False
    """Build (or rebuild) the store first; alone, only build."""
    allow_stale: bool = False
    """Use a store built from other weights or data anyway, with a warning (never silently)."""
    store_dir: str | None = None
    split: str = "train"
    context: int | None = None
    """Window length in tokens when building; default the model's block_size."""
    stride: int | None = None
    """Step between window starts when building; default context // 2."""
    query_stride: int | None = None
    """Step between the sliding windows of a long traced text; default the store's stride."""
    layer: int | None = None
    """-1: final layer-normed states (default); i: residual stream after block i. Build only."""
    pooling: str | None = None
    """'mean' over positions (default) or 'last' position. Build only."""
    embed_dtype: str = "float32"
    """Model precision while embedding: 'float32', or 'bfloat16' (faster on CPUs with AVX512-BF16;
    docs/knn.md has its measured agreement with float32)."""
    batch_size: int = 16
    search: str = "auto"
    """'exact' (chunked torch matmul over the memory-mapped store), 'faiss' (approximate), or 'auto':
    exact up to 1M windows, faiss beyond."""
    faiss_index: str = "hnsw"
    """Approximate index kind: 'hnsw' or 'ivf'."""
    nprobe: int = 16
    """IVF lists searched per query."""
    ef_search: int = 128
    """HNSW search breadth."""
    device: str = "cpu"
    threads: int | None = None
    """torch.set_num_threads for embedding; default torch's (one per core). On a CPU shared with other
    jobs, 1 can be several times faster (docs/knn.md)."""
    data_dir: str | None = None
    """Dataset the store indexes; default the checkpoint's data_dir (or data/<dataset>)."""
    show_chars: int = 240
    """Characters of each neighbour shown in the readable output (0: all)."""
    progress: bool = True


# ----------------------------------------------------------------------------------------------------
# windows


def window_spans(segments: np.ndarray, context: int, stride: int) -> np.ndarray:
    """(n, 3) int64 rows [doc, tok_start, tok_end]: windows of `context` tokens every `stride` tokens
    inside each segment, never crossing one. A segment's last window may be shorter; a window that
    would only repeat the tail of the previous one is not made."""
    if context < 1 or stride < 1:
        raise UserError(f"context ({context}) and stride ({stride}) must be positive")
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
    """(n, 5) rows [doc, tok_start, tok_end, char_offset, line], the same as Corpus.locate gives, in one
    pass: decoding from each segment's start for every window would be quadratic in the segment."""
    segs = corpus.segments(split)
    out = np.zeros((len(spans), 5), dtype=np.int64)
    out[:, :3] = spans
    order = np.argsort(spans[:, 1], kind="stable")
    seg_i, pos, char, line = -1, 0, 0, 1
    for i in order:
        start = int(spans[i, 1])
        j = int(np.searchsorted(segs[:, 1], start, side="right")) - 1
        if j != seg_i:  # entered a new segment: restart from its recorded offset
            seg_i = j
            pos, char, line = int(segs[j, 1]), int(segs[j, 3]), int(segs[j, 4])
        before = corpus.decode(split, pos, start)
        char, line, pos = char + len(before), line + before.count("\n"), start
        out[i, 3:] = (char, line)
    return out


# ----------------------------------------------------------------------------------------------------
# embedding


def _check_layer(model: torch.nn.Module, layer: int) -> None:
    n = len(model.transformer.h)
    if layer != -1 and not 0 <= layer < n:
        raise UserError(f"layer={layer} is out of range: use -1 (final layer-normed) or a block 0..{n - 1}")


def layer_states(model: torch.nn.Module, idx: torch.Tensor, layer: int = -1) -> torch.Tensor:
    """(B, T, C) hidden states: layer -1 = final layer-normed (GPT.hidden_states), i = the residual
    stream after block i. A plain loop over the blocks stops at `layer`, so early layers are cheaper
    than a hooked full forward (tests check it against the `blocks.{i}.hook_resid_post` hook)."""
    if layer == -1:
        return model.hidden_states(idx)
    _check_layer(model, layer)
    t = idx.size(1)
    pos = torch.arange(0, t, dtype=torch.long, device=idx.device)
    x = model.transformer.drop(model.transformer.wte(idx) + model.transformer.wpe(pos))
    for block in model.transformer.h[: layer + 1]:
        x = block(x)
    return x


def pool(states: torch.Tensor, pooling: str) -> torch.Tensor:
    """(B, T, C) -> (B, C)."""
    if pooling == "mean":
        return states.mean(dim=1)
    if pooling == "last":
        return states[:, -1, :]
    raise UserError(f"pooling={pooling!r} is not one of {', '.join(POOLINGS)}")


def normalize(x: np.ndarray | torch.Tensor) -> Any:
    """Unit rows (cosine = dot product); an all-zero row stays zero."""
    if isinstance(x, torch.Tensor):
        return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


@torch.inference_mode()
def embed_windows(model: torch.nn.Module, tokens: np.ndarray, spans: np.ndarray, layer: int = -1,
                  pooling: str = "mean", batch_size: int = 16, out: np.ndarray | None = None,
                  progress: bool = False) -> np.ndarray:
    """Pooled states of every window (unit rows, float16), written into `out` when given (a memmap).
    Windows of equal length are batched together (no padding, so no mask is needed)."""
    from tqdm import tqdm

    device = next(model.parameters()).device
    n = len(spans)
    if out is None:
        out = np.zeros((n, model.config.n_embd), dtype=np.float16)
    lengths = spans[:, 2] - spans[:, 1]
    bar = tqdm(total=n, unit="win", desc="embedding windows", disable=not progress, file=sys.stderr)
    for length in np.unique(lengths)[::-1]:
        ids = np.flatnonzero(lengths == length)
        for b in range(0, len(ids), batch_size):
            rows = ids[b:b + batch_size]
            x = np.stack([tokens[spans[r, 1]:spans[r, 2]] for r in rows]).astype(np.int64)
            h = pool(layer_states(model, torch.from_numpy(x).to(device), layer), pooling).float()
            out[rows] = normalize(h).cpu().numpy().astype(np.float16)
            bar.update(len(rows))
    bar.close()
    return out


def query_window_starts(n_tokens: int, context: int, stride: int) -> list[int]:
    """Starts of the sliding windows over a text of n_tokens: every `stride`, plus one ending exactly at
    the end so that the tail is covered."""
    if n_tokens <= context:
        return [0]
    starts = list(range(0, n_tokens - context + 1, stride))
    if starts[-1] != n_tokens - context:
        starts.append(n_tokens - context)
    return starts


@torch.inference_mode()
def embed_text_ids(model: torch.nn.Module, ids: list[int], context: int, stride: int, layer: int = -1,
                   pooling: str = "mean") -> np.ndarray:
    """(C,) float32 embedding of a token sequence: pooled states of its sliding windows of `context`
    tokens, averaged (a text longer than the context cannot be forwarded in one piece). Not normalised."""
    if not ids:
        raise UserError("the text to trace is empty; pass --text=... or --start=...")
    device = next(model.parameters()).device
    starts = query_window_starts(len(ids), context, stride)
    x = torch.tensor([ids[s:s + context] for s in starts], dtype=torch.long, device=device)
    return pool(layer_states(model, x, layer), pooling).float().mean(dim=0).cpu().numpy()


# ----------------------------------------------------------------------------------------------------
# fingerprints: what a store was built from


def weights_fingerprint(state_dict: dict[str, torch.Tensor]) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes, in name order."""
    from glassgpt.checkpoint import clean_state_dict

    h = hashlib.sha256()
    for name, t in sorted(clean_state_dict(state_dict).items()):
        if name.endswith(".attn.bias"):  # nanoGPT's causal-mask buffer, not a weight
            continue
        t = t.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy())
    return h.hexdigest()


def file_fingerprint(path: Path, full_limit: int = 1 << 30) -> str:
    """sha256 of a file; above `full_limit` bytes, of its size and 64 evenly spaced 1 MiB samples (a
    full hash of a many-GB corpus on every query would cost more than the query)."""
    size = path.stat().st_size
    h = hashlib.sha256()
    if size <= full_limit:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        return h.hexdigest()
    h.update(str(size).encode())
    with open(path, "rb") as f:
        for i in range(64):
            f.seek(i * (size - (1 << 20)) // 63)
            h.update(f.read(1 << 20))
    return "sampled:" + h.hexdigest()


def data_fingerprint(data_dir: Path, split: str) -> dict[str, str]:
    names = [f"{split}.bin", f"{split}.docs.npy", "meta.json", "meta.pkl", "documents.json"]
    return {n: file_fingerprint(data_dir / n) for n in names if (data_dir / n).exists()}


# ----------------------------------------------------------------------------------------------------
# the store


@dataclass
class KnnStore:
    """A loaded store: memory-mapped embeddings, window table, sidecar."""

    path: Path
    embeddings: np.ndarray  # float16 (n, C) memmap, unit rows
    windows: np.ndarray  # int64 (n, 5) [doc, tok_start, tok_end, char_offset, line]
    meta: dict

    def __len__(self) -> int:
        return len(self.windows)


def build_store(model: torch.nn.Module, corpus: Corpus, split: str, store_dir: str | Path, *,
                context: int, stride: int, layer: int = -1, pooling: str = "mean", batch_size: int = 16,
                provenance: dict | None = None, progress: bool = False) -> KnnStore:
    """Embed every window of `split` and write the store; the sidecar goes last, so an interrupted build
    leaves no store that looks complete."""
    if pooling not in POOLINGS:
        raise UserError(f"pooling={pooling!r} is not one of {', '.join(POOLINGS)}")
    _check_layer(model, layer)
    if context > model.config.block_size:
        raise UserError(f"context={context} exceeds the model's block_size {model.config.block_size}")
    store_dir = Path(store_dir)
    store_dir.mkdir(parents=True, exist_ok=True)
    (store_dir / "store.json").unlink(missing_ok=True)  # invalid from here until the new one is written
    for old in store_dir.glob("faiss.*"):
        old.unlink()
    t0 = time.perf_counter()
    spans = window_spans(corpus.segments(split), context, stride)
    if len(spans) == 0:
        raise UserError(f"the {split} split of {corpus.data_dir} has no tokens to index")
    windows = locate_windows(corpus, split, spans)
    tmp = store_dir / ".embeddings.tmp.npy"
    emb = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=(len(spans), model.config.n_embd))
    embed_windows(model, corpus.tokens(split), spans, layer, pooling, batch_size, out=emb, progress=progress)
    emb.flush()
    del emb
    os.replace(tmp, store_dir / "embeddings.npy")
    np.save(store_dir / ".windows.tmp.npy", windows)
    os.replace(store_dir / ".windows.tmp.npy", store_dir / "windows.npy")
    meta = {
        "format": STORE_FORMAT, "build_id": uuid.uuid4().hex, "split": split, "n_windows": len(spans),
        "dim": model.config.n_embd, "context": context, "stride": stride, "layer": layer, "pooling": pooling,
        "embed_dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "build_seconds": round(time.perf_counter() - t0, 2),
        **(provenance or {}),
    }
    write_json(store_dir / "store.json", meta)
    return load_store(store_dir)


def load_store(store_dir: str | Path, build_hint: str = "glassgpt trace-knn --build") -> KnnStore:
    """Memory-map a store, checking that its files exist and have the shapes the sidecar promises."""
    store_dir = Path(store_dir)
    side = store_dir / "store.json"
    if not side.exists():
        raise UserError(f"no kNN store in {store_dir}; build it with `{build_hint}`")
    try:
        meta = json.loads(side.read_text())
    except json.JSONDecodeError:
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
    return KnnStore(store_dir, arrays["embeddings"], np.asarray(arrays["windows"]), meta)


def stale_reasons(meta: dict, provenance: dict) -> list[str]:
    """What differs between the store's provenance and the current checkpoint/data ([] = fresh)."""
    reasons = []
    if meta.get("weights_sha256") != provenance.get("weights_sha256"):
        reasons.append(f"built from other weights (iter {meta.get('iter_num')}; the checkpoint is now at iter "
                       f"{provenance.get('iter_num')})")
    if meta.get("data_files") != provenance.get("data_files"):
        changed = sorted(set(meta.get("data_files", {}).items()) ^ set(provenance.get("data_files", {}).items()))
        reasons.append(f"data files changed ({', '.join(sorted({n for n, _ in changed}))})")
    return reasons


# ----------------------------------------------------------------------------------------------------
# search


def query_exact(embeddings: np.ndarray, queries: np.ndarray, k: int,
                chunk_rows: int = CHUNK_ROWS) -> tuple[np.ndarray, np.ndarray]:
    """Cosine top-k of unit `queries` (m, C) over unit `embeddings` (n, C): (scores (m, k), ids (m, k)),
    best first. The store is read `chunk_rows` rows at a time, so a memory-mapped store of any size is
    searched in bounded memory (a float16 chunk and its float32 copy)."""
    q = torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float32))
    n = len(embeddings)
    k = min(k, n)
    best_s = torch.full((len(q), 0), -math.inf)
    best_i = torch.zeros((len(q), 0), dtype=torch.long)
    for lo in range(0, n, chunk_rows):
        chunk = torch.from_numpy(np.asarray(embeddings[lo:lo + chunk_rows], dtype=np.float32))
        s, i = torch.topk(q @ chunk.T, min(k, len(chunk)), dim=1)
        s, j = torch.topk(torch.cat([best_s, s], 1), k, dim=1)
        best_i = torch.gather(torch.cat([best_i, i + lo], 1), 1, j)
        best_s = s
    return best_s.numpy(), best_i.numpy()


def build_faiss_index(embeddings: np.ndarray, kind: str = "hnsw", chunk_rows: int = CHUNK_ROWS,
                      seed: int = 0):
    """An approximate inner-product index over unit rows: HNSW (no training) or IVF-Flat (k-means
    lists on a sample). Rows are added chunk by chunk as float32."""
    faiss = _import_faiss()
    n, d = embeddings.shape
    if kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, 32, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = 80
    elif kind == "ivf":
        nlist = max(1, min(int(4 * math.sqrt(n)), n // 39))  # faiss wants >= 39 training points per list
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
        rng = np.random.default_rng(seed)
        sample = np.sort(rng.choice(n, size=min(n, 256 * nlist), replace=False))
        index.train(np.asarray(embeddings[sample], dtype=np.float32))
    else:
        raise UserError(f"faiss_index={kind!r} is not one of {', '.join(FAISS_KINDS)}")
    for lo in range(0, n, chunk_rows):
        index.add(np.ascontiguousarray(embeddings[lo:lo + chunk_rows], dtype=np.float32))
    return index


def query_faiss(index, queries: np.ndarray, k: int, nprobe: int = 16,
                ef_search: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """(scores, ids) from a faiss index, best first."""
    faiss = _import_faiss()
    if hasattr(index, "nprobe"):
        index.nprobe = nprobe
    if hasattr(index, "hnsw"):
        index.hnsw.efSearch = max(ef_search, k)
    faiss.omp_set_num_threads(torch.get_num_threads())
    s, i = index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
    return s, i.astype(np.int64)


def recall_at_k(exact_ids: np.ndarray, approx_ids: np.ndarray) -> float:
    """Fraction of the exact top-k found in the approximate top-k, averaged over queries."""
    k = exact_ids.shape[1]
    return float(np.mean([len(set(e) & set(a)) / k for e, a in zip(exact_ids, approx_ids)]))


def _import_faiss():
    try:
        import faiss
    except ImportError:
        raise UserError("approximate search needs faiss: `pip install glassgpt[faiss]` (faiss-cpu), "
                        "or use --search=exact") from None
    return faiss


def load_or_build_faiss(store: KnnStore, kind: str):
    """The store's faiss index of `kind`, built and saved beside it on first use (tied to the store's
    build_id, so a rebuilt store never meets an old index)."""
    faiss = _import_faiss()
    path, side = store.path / f"faiss.{kind}.index", store.path / f"faiss.{kind}.json"
    if path.exists() and side.exists():
        info = json.loads(side.read_text())
        if info.get("build_id") == store.meta["build_id"]:
            return faiss.read_index(str(path))
    index = build_faiss_index(store.embeddings, kind)
    faiss.write_index(index, str(path))
    write_json(side, {"build_id": store.meta["build_id"], "kind": kind, "n": len(store)})
    return index


def search_store(store: KnnStore, query: np.ndarray, k: int, search: str = "auto", faiss_index: str = "hnsw",
                 nprobe: int = 16, ef_search: int = 128) -> tuple[np.ndarray, np.ndarray, str]:
    """Top-k (scores, ids) of one (C,) query embedding; returns which search ran."""
    if search not in SEARCHES:
        raise UserError(f"search={search!r} is not one of {', '.join(SEARCHES)}")
    if k < 1 or k > len(store):
        raise UserError(f"k={k} but the store has {len(store)} windows; pass --k between 1 and {len(store)}")
    q = normalize(query.reshape(1, -1))
    if search == "faiss" or (search == "auto" and len(store) > EXACT_MAX):
        index = load_or_build_faiss(store, faiss_index)
        s, i = query_faiss(index, q, k, nprobe, ef_search)
        return s[0], i[0], f"faiss-{faiss_index}"
    s, i = query_exact(store.embeddings, q, k)
    return s[0], i[0], "exact"


# ----------------------------------------------------------------------------------------------------
# the command


def generate_text(model: torch.nn.Module, tok, prompt: str, cfg: TraceKnnConfig) -> str:
    """The prompt's continuation: glassgpt.generate's engine when it is installed, else the model's own
    reference sampler (the same distribution, recomputing the context each step)."""
    if not tok.encode(prompt) and getattr(tok, "eot_token", None) is None:
        raise UserError("the prompt is empty and this char-level model has no start token; pass --start=TEXT")
    try:
        from glassgpt.generate import complete
    except ImportError:
        complete = None
    if complete is not None:
        return complete(model, tok, prompt, cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k,
                        top_p=cfg.top_p, seed=cfg.seed).text
    if cfg.top_p is not None:
        raise UserError("top_p needs glassgpt.generate, which is not installed here; drop --top_p")
    ids = tok.encode(prompt) or [tok.eot_token]  # GPT-2 starts an empty prompt after <|endoftext|>
    torch.manual_seed(cfg.seed)
    x = torch.tensor([ids], dtype=torch.long, device=next(model.parameters()).device)
    y = model.generate(x, cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k)
    return tok.decode(y[0, len(ids):].tolist())


def _store_dir(cfg: TraceKnnConfig) -> Path:
    return Path(cfg.store_dir) if cfg.store_dir else Path(cfg.out_dir) / f"knn_{cfg.split}"


def _data_dir(cfg: TraceKnnConfig, ckpt: dict) -> Path:
    if cfg.data_dir:
        return Path(cfg.data_dir)
    c = ckpt.get("config") or {}
    if c.get("data_dir"):
        return Path(c["data_dir"])
    if c.get("dataset"):
        return Path("data") / str(c["dataset"])
    raise UserError("the checkpoint does not say which dataset it was trained on; pass --data_dir=DIR")


def provenance_of(cfg: TraceKnnConfig, ckpt: dict, data_dir: Path) -> dict[str, Any]:
    """What a store built now would be built from: checkpoint, weights and data fingerprints."""
    return {
        "checkpoint": str(Path(cfg.out_dir).resolve() / "ckpt.pt"), "iter_num": ckpt.get("iter_num"),
        "weights_sha256": weights_fingerprint(ckpt["model"]), "data_dir": str(data_dir.resolve()),
        "data_files": data_fingerprint(data_dir, cfg.split),
    }


def open_checked_store(cfg: TraceKnnConfig, model: torch.nn.Module, provenance: dict, hint: str) -> tuple[KnnStore, bool]:
    """Load the store and refuse it when it was built with other settings or is stale (unless
    --allow_stale, which prints a warning). Returns (store, stale)."""
    store_dir = _store_dir(cfg)
    store = load_store(store_dir, hint)
    m = store.meta
    for key in ("layer", "pooling", "context", "stride"):
        want = getattr(cfg, key)
        if want is not None and want != m[key] and not cfg.build:
            raise UserError(f"the store in {store_dir} was built with {key}={m[key]}, not {want}; rebuild with "
                            f"`{hint} --{key}={want}` or drop --{key}")
    if m["dim"] != model.config.n_embd:
        raise UserError(f"the store has {m['dim']}-dim embeddings, the model {model.config.n_embd}; rebuild with `{hint}`")
    reasons = stale_reasons(m, provenance)
    if reasons and not cfg.allow_stale:
        raise UserError(f"the kNN store in {store_dir} is stale: {'; '.join(reasons)}; rebuild it with "
                        f"`{hint}` or pass --allow_stale to use it anyway")
    if reasons:
        print(f"warning: using a STALE kNN store ({'; '.join(reasons)}): scores and neighbours come from "
              f"other embeddings; rebuild with `{hint}`", file=sys.stderr)
    if not 1 <= cfg.k <= len(store):  # checked before generating, which can take a while
        raise UserError(f"k={cfg.k} but the store has {len(store)} windows; pass --k between 1 and {len(store)}")
    return store, bool(reasons)


def trace_knn(cfg: TraceKnnConfig) -> dict[str, Any] | None:
    """Build the store if asked, then trace `start` + its generation (or `text`) to its k nearest
    windows. Returns the result dict (None when only building)."""
    from glassgpt.runtime import DTYPES, load_for_inference, resolve_device

    if cfg.start is not None and cfg.text is not None:
        raise UserError("pass either --start (generate, then trace) or --text (trace as is), not both")
    if cfg.embed_dtype not in ("float32", "bfloat16"):
        raise UserError(f"embed_dtype={cfg.embed_dtype!r} is not float32 or bfloat16")
    if cfg.threads is not None:
        if cfg.threads < 1:
            raise UserError(f"threads={cfg.threads} must be at least 1")
        torch.set_num_threads(cfg.threads)
    model, tok, ckpt = load_for_inference(cfg.out_dir, resolve_device(cfg.device))
    data_dir = _data_dir(cfg, ckpt)
    corpus = Corpus(data_dir)
    provenance = provenance_of(cfg, ckpt, data_dir)
    store_dir = _store_dir(cfg)
    hint = f"glassgpt trace-knn --out_dir={cfg.out_dir} --build" + (f" --store_dir={cfg.store_dir}" if cfg.store_dir else "")
    if cfg.build:
        context = cfg.context or model.config.block_size
        model.to(DTYPES[cfg.embed_dtype])  # in place; back to float32 for generation below
        store = build_store(model, corpus, cfg.split, store_dir, context=context,
                            stride=cfg.stride or max(1, context // 2), layer=-1 if cfg.layer is None else cfg.layer,
                            pooling=cfg.pooling or "mean", batch_size=cfg.batch_size, provenance=provenance,
                            progress=cfg.progress)
        model.float()
        print(f"built {store_dir}: {len(store):,} windows of {store.meta['context']} tokens (stride "
              f"{store.meta['stride']}) in {store.meta['build_seconds']:.1f} s", file=sys.stderr)
        if cfg.start is None and cfg.text is None:
            return None
    elif cfg.start is None and cfg.text is None:
        raise UserError("nothing to trace: pass --start=PROMPT or --text=TEXT (or --build to build the store)")
    store, stale = open_checked_store(cfg, model, provenance, hint)
    m = store.meta

    prompt = read_text_arg(cfg.start, "start") if cfg.start is not None else ""
    generated = generate_text(model, tok, prompt, cfg) if cfg.start is not None else ""
    text = prompt + generated if cfg.start is not None else read_text_arg(cfg.text)
    ids = tok.encode(text)
    query_stride = cfg.query_stride or m["stride"]
    t0 = time.perf_counter()
    model.to(DTYPES[m["embed_dtype"]])  # embed the query exactly as the store was embedded
    q = embed_text_ids(model, ids, m["context"], query_stride, m["layer"], m["pooling"])
    scores, rows, how = search_store(store, q, cfg.k, cfg.search, cfg.faiss_index, cfg.nprobe, cfg.ef_search)
    elapsed = time.perf_counter() - t0
    neighbours = []
    for rank, (score, row) in enumerate(zip(scores, rows), 1):
        doc, s, e, char, line = (int(v) for v in store.windows[row])
        d = corpus.documents[doc]
        neighbours.append({"rank": rank, "score": round(float(score), 6), "window": int(row), "doc": doc,
                           "doc_id": str(d["id"]), "source": str(d.get("source", "")), "token_start": s,
                           "token_end": e, "char_offset": char, "line": line, "text": corpus.decode(cfg.split, s, e)})
    generating = cfg.start is not None
    return {"prompt": prompt if generating else None, "generated": generated if generating else None,
            "text": text, "n_tokens": len(ids),
            "n_query_windows": len(query_window_starts(len(ids), m["context"], query_stride)),
            "store": str(store_dir), "stale": stale, "search": how, "query_ms": round(elapsed * 1000, 2),
            "split": cfg.split, "neighbours": neighbours}


def format_result(r: dict[str, Any], show_chars: int = 240) -> str:
    """The readable report: traced text, then each neighbour with score and location."""
    lines = []
    if r["generated"] is not None:
        lines += [f"prompt: {r['prompt']!r}", f"generated: {r['generated']!r}"]
    else:
        lines.append(f"text: {r['text'][:show_chars or None]!r}")
    lines.append(f"traced {r['n_tokens']} tokens ({r['n_query_windows']} window(s) pooled) against "
                 f"{r['store']} [{r['search']}, {r['query_ms']:.1f} ms]" + ("  ** STALE STORE **" if r["stale"] else ""))
    for nb in r["neighbours"]:
        lines.append(f"#{nb['rank']}  cos {nb['score']:.4f}  {nb['doc_id']} line {nb['line']} char {nb['char_offset']}"
                     f"  ({r['split']} tokens {nb['token_start']}:{nb['token_end']})")
        body = nb["text"] if not show_chars or len(nb["text"]) <= show_chars else nb["text"][:show_chars] + " ..."
        lines += ["    " + ln for ln in body.splitlines() or [""]]
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
