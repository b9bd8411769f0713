"""How good and how fast is trace-knn? Planted canaries, a BM25 baseline, build time and query latency.

    python benchmarks/bench_knn.py --work_dir=/tmp/bench-knn [--max_iters=500] [--model_dir=DIR]
    # what produced benchmarks/RESULTS.md on a busy 2-core CPU (each part separately):
    python benchmarks/bench_knn.py --work_dir=/tmp/knnbench --max_iters=300 --sections=quality --threads=1
    python benchmarks/bench_knn.py --work_dir=/tmp/knnbench --sections=timing --timing_windows=48 --threads=1
    python benchmarks/bench_knn.py --work_dir=/tmp/knnbench --sections=scale --threads=1

1. Quality. tiny-shakespeare with `n_canaries` unique canary lines planted in the training part
   (benchmarks/canaries.py); a small char GPT (4x128, context 256) trained briefly on it. Each canary is
   traced three ways: (a) its first half plus the model's own continuation, (b) the canary shifted right
   by a quarter of its length (the last 3/4 and what follows it in the training text), (c) an exact copy.
   A hit is a window holding at least half of the canary's characters; we report source-in-top-1 and
   top-5 for the model's embeddings (several layers / poolings / window lengths, with and without
   centering) and for BM25 (rank_bm25, lower-cased words) over the very same windows.
2. Speed. Store build over the whole train split (context 256, stride 128) for nanoGPT's baby 6x384
   model (random weights: the cost does not depend on them) in float32 and bfloat16, and the query
   latency (embed + search); exact search over a synthetic 1M-window store (memory-mapped).
3. faiss recall@k against exact search on the real store.

Prints a summary and a JSON file; `--results=benchmarks/RESULTS.md` appends the markdown section.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
for p in (REPO, REPO / "benchmarks"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from glassgpt.checkpoint import save_checkpoint  # noqa: E402
from glassgpt.config import load_config  # noqa: E402
from glassgpt.corpus import Corpus  # noqa: E402
from glassgpt.model import GPT, GPTConfig  # noqa: E402
from glassgpt.runtime import load_for_inference  # noqa: E402
from glassgpt.trace import knn  # noqa: E402


@dataclass
class BenchKnnConfig:
    work_dir: str = "/tmp/glassgpt-bench-knn"
    """Data, models and stores go here."""
    n_canaries: int = 32
    seed: int = 0
    max_iters: int = 500
    """Training iterations for the canary model (when model_dir has no checkpoint)."""
    model_dir: str | None = None
    """A trained canary model to reuse; default work_dir/model."""
    contexts: str = "256,64"
    """Window lengths tried for quality (stride = half)."""
    timing: bool = True
    """Time the baby 6x384 store build (minutes on a 2-core CPU)."""
    timing_dtypes: str = "float32,bfloat16"
    timing_windows: int = 0
    """0: build the whole store per dtype (timed); N: time embedding N windows per dtype and thread count
    and extrapolate to the whole split (for a CPU too busy to finish full builds; labelled as such)."""
    scale_rows: int = 1_000_000
    """Rows of the synthetic store for exact-search latency at scale (0: skip)."""
    sections: str = "quality,timing,scale"
    """Which parts to run: quality (canaries, BM25, faiss recall, canary-model latency), timing (baby
    model store build + latency), scale (synthetic 1M-window exact search)."""
    threads: int | None = None
    """torch.set_num_threads (1 is much faster on a CPU shared with other jobs)."""
    results: str | None = None
    """Append the markdown section to this file (benchmarks/RESULTS.md)."""


# -------------------------------------------------------------------------------------------- setup


def canary_setup(cfg: BenchKnnConfig) -> tuple[Path, list[dict], Path]:
    """(data_dir, canaries, model out_dir): dataset planted, model trained unless one exists."""
    from canaries import prepare_canary_dataset, train_canary_model

    work = Path(cfg.work_dir)
    data_dir = work / "data"
    if (data_dir / "canaries.json").exists() and (data_dir / "train.bin").exists():
        canaries = json.loads((data_dir / "canaries.json").read_text())["canaries"]
    else:
        data_dir, canaries = prepare_canary_dataset(work, n=cfg.n_canaries, seed=cfg.seed, repeats=1)
    model_dir = Path(cfg.model_dir) if cfg.model_dir else work / "model"
    if not (model_dir / "ckpt.pt").exists():
        t = time.perf_counter()
        train_canary_model(data_dir, model_dir, cfg.max_iters, block_size=256, eval_interval=cfg.max_iters,
                           eval_iters=10, log_interval=50)
        print(f"trained the canary model in {time.perf_counter() - t:.0f} s")
    return data_dir, canaries, model_dir


# -------------------------------------------------------------------------------------------- embeddings


@torch.inference_mode()
def variant_states(model: GPT, x: torch.Tensor, layers: list[int]) -> dict[int, torch.Tensor]:
    """Hidden states of several layers from one forward pass: {-1: final layer-normed, i: after block i}.
    knn.layer_states gives one layer per pass; the test below checks this against it."""
    t = x.size(1)
    h = model.transformer.wte(x) + model.transformer.wpe(torch.arange(t))
    out = {}
    for i, block in enumerate(model.transformer.h):
        h = block(h)
        if i in layers:
            out[i] = h
    out[-1] = model.transformer.ln_f(h)
    return out


def embed_variants(model: GPT, token_lists: list[np.ndarray], layers: list[int],
                   batch_size: int = 32) -> dict[tuple[int, str], np.ndarray]:
    """{(layer, pooling): (n, C) unit float32} for a list of token arrays (equal lengths batched)."""
    n = len(token_lists)
    out = {(l, p): np.zeros((n, model.config.n_embd), np.float32) for l in [-1, *layers] for p in knn.POOLINGS}
    lengths = np.array([len(t) for t in token_lists])
    for length in np.unique(lengths):
        ids = np.flatnonzero(lengths == length)
        for b in range(0, len(ids), batch_size):
            rows = ids[b:b + batch_size]
            x = torch.from_numpy(np.stack([token_lists[r] for r in rows]).astype(np.int64))
            for layer, h in variant_states(model, x, layers).items():
                for p in knn.POOLINGS:
                    out[(layer, p)][rows] = knn.normalize(knn.pool(h, p)).numpy()
    return out


# -------------------------------------------------------------------------------------------- quality


def canary_queries(model: GPT, tok, text: str, canaries: list[dict]) -> dict[str, list[str]]:
    """The three query kinds for every canary."""
    from glassgpt.generate import complete

    q = {"a_prefix+continuation": [], "b_shifted_quarter": [], "c_exact_copy": []}
    for c in canaries:
        line, o = c["text"], c["char_offset"]
        half, quarter = len(line) // 2, len(line) // 4
        cont = complete(model, tok, line[:half], len(line) - half, temperature=0.0).text
        q["a_prefix+continuation"].append(line[:half] + cont)
        q["b_shifted_quarter"].append(text[o + quarter:o + quarter + len(line)])
        q["c_exact_copy"].append(line)
    return q


def source_windows(windows: np.ndarray, canaries: list[dict]) -> list[set[int]]:
    """Windows holding at least half of each canary's characters (char data: token = char position)."""
    out = []
    for c in canaries:
        a, b = c["char_offset"], c["char_offset"] + len(c["text"])
        overlap = np.minimum(windows[:, 2], b) - np.maximum(windows[:, 1], a)
        out.append(set(np.flatnonzero(overlap * 2 >= b - a).tolist()))
    return out


def hit_rates(ranked: np.ndarray, sources: list[set[int]]) -> tuple[float, float]:
    top1 = np.mean([r[0] in s for r, s in zip(ranked, sources)])
    top5 = np.mean([bool(set(r[:5].tolist()) & s) for r, s in zip(ranked, sources)])
    return float(top1), float(top5)


def words(s: str) -> list[str]:
    return re.findall(r"[a-z']+", s.lower())


def quality(model: GPT, tok, corpus: Corpus, canaries: list[dict], contexts: list[int]) -> dict:
    text = corpus.decode("train", 0, len(corpus.tokens("train")))
    queries = canary_queries(model, tok, text, canaries)
    tokens = corpus.tokens("train")
    layers = sorted({0, model.config.n_layer // 2, model.config.n_layer - 1})
    rows, examples = [], {}
    for context in contexts:
        spans = knn.window_spans(corpus.segments("train"), context, context // 2)
        sources = source_windows(spans, canaries)
        t = time.perf_counter()
        store = embed_variants(model, [tokens[s:e] for _, s, e in spans], layers)
        t_embed = time.perf_counter() - t
        # the one-pass adapter must equal the product path (knn.embed_windows) for the default variant
        check = knn.embed_windows(model, tokens, spans[:64], -1, "mean")
        diff = float(np.abs(check.astype(np.float32) - store[(-1, "mean")][:64]).max())
        assert diff < 2e-3, f"bench embedding differs from knn.embed_windows by {diff}"
        from rank_bm25 import BM25Okapi

        bm25 = BM25Okapi([words(corpus.decode("train", int(s), int(e))) or ["_"] for _, s, e in spans])
        for kind, texts in queries.items():
            ids = [np.array(tok.encode(t)) for t in texts]
            qv = embed_variants(model, ids, layers)
            for (layer, pooling), emb in store.items():
                for center in (False, True):
                    e, q = emb, qv[(layer, pooling)]
                    if center:  # remove the direction every window shares (all-but-the-top style)
                        mu = emb.mean(0)
                        e, q = knn.normalize(emb - mu), knn.normalize(q - mu)
                    _, ranked = knn.query_exact(e.astype(np.float16), q, 5)
                    t1, t5 = hit_rates(ranked, sources)
                    rows.append({"context": context, "method": f"emb L{layer} {pooling}" + (" centered" if center else ""),
                                 "query": kind, "top1": t1, "top5": t5})
            ranked = np.array([np.argsort(-bm25.get_scores(words(t)), kind="stable")[:5] for t in texts])
            t1, t5 = hit_rates(ranked, sources)
            rows.append({"context": context, "method": "BM25", "query": kind, "top1": t1, "top5": t5})
            examples[kind] = texts[0]
        print(f"context {context}: {len(spans)} windows embedded ({len(store)} variants, one pass) in {t_embed:.0f} s")
    return {"rows": rows, "examples": examples, "layers": layers}


# -------------------------------------------------------------------------------------------- speed


def baby_checkpoint(work: Path, data_dir: Path) -> Path:
    """nanoGPT's baby shakespeare-char model (6x384, block 256), random weights, as a checkpoint."""
    meta = json.loads((data_dir / "meta.json").read_text())
    cfg = GPTConfig(block_size=256, vocab_size=meta["vocab_size"], n_layer=6, n_head=6, n_embd=384, bias=False)
    torch.manual_seed(0)
    model = GPT(cfg)
    out = work / "baby"
    save_checkpoint(out / "ckpt.pt", {
        "model": model.state_dict(), "optimizer": {}, "model_args": cfg.to_dict(), "iter_num": 0,
        "best_val_loss": 1e9, "config": {"dataset": data_dir.name, "data_dir": str(data_dir)},
        "tokenizer": {k: meta[k] for k in ("tokenizer", "vocab_size", "stoi", "itos")}})
    return out


def plain_shakespeare(work: Path) -> Path:
    """tiny-shakespeare itself as a char dataset (canaries.write_char_dataset, nanoGPT's 90/10 split)."""
    from canaries import write_char_dataset

    from glassgpt.download import TINYSHAKESPEARE, local_or_fetch

    d = work / "shakespeare_char"
    if not (d / "train.bin").exists():
        write_char_dataset(d, local_or_fetch(TINYSHAKESPEARE, work / "download").read_text(), "tinyshakespeare")
    return d


def time_build(out_dir: Path, dtype: str, extra: list[str]) -> dict:
    argv = [f"--out_dir={out_dir}", "--build", "--progress=False", f"--embed_dtype={dtype}",
            f"--store_dir={out_dir}/knn_{dtype}", *extra]
    t = time.perf_counter()
    knn.main(argv)
    wall = time.perf_counter() - t
    meta = knn.load_store(out_dir / f"knn_{dtype}").meta
    return {"dtype": dtype, "windows": meta["n_windows"], "build_s": meta["build_seconds"], "wall_s": round(wall, 1)}


def query_latency(out_dir: Path, store_dir: Path, text: str, n: int = 20) -> dict:
    """Median ms of embedding a text + exact search (model already loaded, as in an interactive session)."""
    model, tok, _ = load_for_inference(out_dir, "cpu")
    store = knn.load_store(store_dir)
    m = store.meta
    model.to(knn_dtype(m["embed_dtype"]))
    ids = tok.encode(text)
    embed_ms, search_ms = [], []
    for _ in range(n):
        t0 = time.perf_counter()
        q = knn.embed_text_ids(model, ids, m["context"], m["stride"], m["layer"], m["pooling"])
        t1 = time.perf_counter()
        knn.search_store(store, q, 5, "exact")
        t2 = time.perf_counter()
        embed_ms.append((t1 - t0) * 1000)
        search_ms.append((t2 - t1) * 1000)
    return {"store": store_dir.name, "n_tokens": len(ids), "embed_ms": round(float(np.median(embed_ms)), 1),
            "search_ms": round(float(np.median(search_ms)), 2),
            "total_ms": round(float(np.median(np.add(embed_ms, search_ms))), 1)}


def sampled_throughput(out_dir: Path, dtype: str, threads: int, n: int) -> dict:
    """Windows/s of embedding the first n windows (after a warm-up batch), extrapolated to the split."""
    model, _, ckpt = load_for_inference(out_dir, "cpu")
    model.to(knn_dtype(dtype))
    corpus = Corpus(ckpt["config"]["data_dir"])
    spans = knn.window_spans(corpus.segments("train"), 256, 128)
    tokens = corpus.tokens("train")
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        knn.embed_windows(model, tokens, spans[:16])
        t = time.perf_counter()
        emb = knn.embed_windows(model, tokens, spans[16:16 + n])
        dt = time.perf_counter() - t
    finally:
        torch.set_num_threads(before)
    t = time.perf_counter()
    knn.locate_windows(corpus, "train", spans)
    locate_s = time.perf_counter() - t
    return {"dtype": dtype, "threads": threads, "sampled_windows": n, "windows_per_s": round(n / dt, 2),
            "windows": len(spans), "extrapolated_build_s": round(len(spans) * dt / n + locate_s, 1),
            "embeddings": emb}


def sample_agreement(a: np.ndarray, b: np.ndarray, k: int = 5) -> dict:
    """How far another precision moves the same windows: row cosines and top-k neighbour overlap among them."""
    a, b = a.astype(np.float32), b.astype(np.float32)
    cos = (a * b).sum(1)
    _, na = knn.query_exact(a.astype(np.float16), a, k + 1)
    _, nb = knn.query_exact(b.astype(np.float16), b, k + 1)
    return {"min_cos": round(float(cos.min()), 5), "mean_cos": round(float(cos.mean()), 6),
            f"top{k}_overlap": round(knn.recall_at_k(na[:, 1:], nb[:, 1:]), 4), "windows": len(a)}


def synthetic_latency(out_dir: Path, dtype: str, n_windows: int, text: str, n: int = 20) -> dict:
    """Query latency without a built store: embed `text` with the model, then exact search over a
    random unit float16 matrix of the store's shape (the search cost depends only on the shape)."""
    model, tok, _ = load_for_inference(out_dir, "cpu")
    model.to(knn_dtype(dtype))
    emb = knn.normalize(np.random.default_rng(0).standard_normal((n_windows, model.config.n_embd))).astype(np.float16)
    ids = tok.encode(text)
    embed_ms, search_ms = [], []
    for _ in range(n):
        t0 = time.perf_counter()
        q = knn.embed_text_ids(model, ids, 256, 128)
        t1 = time.perf_counter()
        knn.query_exact(emb, knn.normalize(q[None]), 5)
        t2 = time.perf_counter()
        embed_ms.append((t1 - t0) * 1000)
        search_ms.append((t2 - t1) * 1000)
    return {"store": f"baby 6x384 {dtype} ({n_windows:,} x {model.config.n_embd}, synthetic rows)", "n_tokens": len(ids),
            "embed_ms": round(float(np.median(embed_ms)), 1), "search_ms": round(float(np.median(search_ms)), 2),
            "total_ms": round(float(np.median(np.add(embed_ms, search_ms))), 1)}


def knn_dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


def scale_search(work: Path, rows: int, dim: int = 384) -> dict:
    """Exact search over a synthetic memory-mapped float16 store of `rows` windows, in a fresh process so
    that its peak RSS is the search's own: latency and memory."""
    path = work / f"synthetic_{rows}.npy"
    if not path.exists():
        mm = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(rows, dim))
        rng = np.random.default_rng(0)
        for lo in range(0, rows, 100_000):
            mm[lo:lo + 100_000] = knn.normalize(rng.standard_normal((min(100_000, rows - lo), dim)))
        mm.flush()
        del mm
    # RSS counts the store's file-backed pages too (the page cache, reclaimable): sample the anonymous
    # part (what the search itself allocates) from /proc while it runs.
    code = f"""
import json, re, threading, time, numpy as np
from glassgpt.trace import knn
def anon_mb():
    return int(re.search(r"RssAnon:\\s+(\\d+)", open("/proc/self/status").read()).group(1)) / 1024
emb = np.load({str(path)!r}, mmap_mode="r")
q = knn.normalize(np.random.default_rng(1).standard_normal((1, {dim})))
base, peak, done = anon_mb(), [0.0], [False]
def watch():
    while not done[0]:
        peak[0] = max(peak[0], anon_mb()); time.sleep(0.005)
threading.Thread(target=watch, daemon=True).start()
times = []
for _ in range(3):
    t = time.perf_counter(); s, i = knn.query_exact(emb, q, 10); times.append(time.perf_counter() - t)
done[0] = True
print(json.dumps({{"exact_ms": round(min(times) * 1000), "anon_mb_before": round(base),
                  "anon_mb_peak": round(peak[0])}}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    return {"rows": rows, "dim": dim, "file_mb": round(path.stat().st_size / 2**20), **json.loads(out.stdout)}


def faiss_recall(store: knn.KnnStore, n_queries: int = 300) -> list[dict]:
    """recall@k of each faiss index against exact search, queries = perturbed store rows."""
    rng = np.random.default_rng(0)
    base = np.asarray(store.embeddings[rng.choice(len(store), n_queries, replace=False)], dtype=np.float32)
    q = knn.normalize(base + 0.05 * rng.standard_normal(base.shape).astype(np.float32))
    out = []
    for kind in knn.FAISS_KINDS:
        t = time.perf_counter()
        index = knn.build_faiss_index(store.embeddings, kind)
        build_s = time.perf_counter() - t
        for k in (1, 5, 10):
            _, exact = knn.query_exact(store.embeddings, q, k)
            t = time.perf_counter()
            _, approx = knn.query_faiss(index, q, k)
            ms = (time.perf_counter() - t) * 1000 / n_queries
            out.append({"index": kind, "k": k, "recall": round(knn.recall_at_k(exact, approx), 4),
                        "ms_per_query": round(ms, 3), "build_s": round(build_s, 2)})
    return out


# -------------------------------------------------------------------------------------------- report


def markdown(res: dict) -> str:
    lines = [f"\n## trace-knn (benchmarks/bench_knn.py) — {res['date']}", "",
             f"Machine: {res['machine']}; `uptime` load before/after: {res['load_before']} / {res['load_after']} "
             "(the 2 cores are shared with other engineers' jobs: timings are upper bounds).", ""]
    if "quality" in res:
        q = res["quality"]
        lines += [f"Quality: {res['n_canaries']} unique canary lines planted once each in tiny-shakespeare's train "
                  f"split; char GPT {res['canary_model']} trained {res['canary_iters']} iters (val loss "
                  f"{res['canary_val_loss']}). Hit = a window holding >= half of the canary. "
                  "Source-in-top-1 / top-5 over the same windows:", "",
                  "| context | method | (a) prefix + model's continuation | (b) shifted by 1/4 | (c) exact copy |",
                  "|---|---|---|---|---|"]
        table: dict[tuple, dict] = {}
        for r in q["rows"]:
            table.setdefault((r["context"], r["method"]), {})[r["query"]] = f"{r['top1']:.2f} / {r['top5']:.2f}"
        for (context, method), cells in table.items():
            lines.append(f"| {context} | {method} | " + " | ".join(cells.get(k, "") for k in
                         ("a_prefix+continuation", "b_shifted_quarter", "c_exact_copy")) + " |")
        lines += ["", f"Store build with the canary model (product path, context 256, stride 128): "
                      f"{res['canary_store_build_s']} s.", ""]
    if res.get("builds"):
        lines += ["Store build, whole tiny-shakespeare train split (1,003,854 tokens), context 256, stride 128, "
                  "baby 6x384 model (nanoGPT's shakespeare-char config), CPU:", "",
                  "| embed dtype | windows | build s (in build_store) | wall s (load + fingerprint + build) |",
                  "|---|---|---|---|"]
        lines += [f"| {b['dtype']} | {b['windows']:,} | {b['build_s']} | {b['wall_s']} |" for b in res["builds"]]
        lines.append("")
    if res.get("sampled"):
        lines += ["Store build throughput, baby 6x384 model (random weights), windows of 256 tokens from the "
                  "tiny-shakespeare train split (stride 128). Sampled: the CPU was too busy for whole builds, so "
                  "N windows were timed and the whole-split build time extrapolated (+ the measured window "
                  "location pass):", "",
                  "| embed dtype | threads | sampled windows | windows/s | windows in split | extrapolated build s |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {r['dtype']} | {r['threads']} | {r['sampled_windows']} | {r['windows_per_s']} | {r['windows']:,} "
                  f"| {r['extrapolated_build_s']} |" for r in res["sampled"]]
        lines.append("")
    if "bf16_sample_agreement" in res:
        b = res["bf16_sample_agreement"]
        lines += [f"bfloat16 vs float32 on the same {b['windows']} sampled windows: cosine min {b['min_cos']}, mean "
                  f"{b['mean_cos']}; top-5 neighbour overlap among them {b['top5_overlap']}.", ""]
    if "latency" in res:
        lines += ["Query latency (model loaded; median of 20; embed the text + exact search over the store):", "",
                  "| store | tokens | embed ms | search ms | total ms |", "|---|---|---|---|---|"]
        lines += [f"| {l['store']} | {l['n_tokens']} | {l['embed_ms']} | {l['search_ms']} | {l['total_ms']} |"
                  for l in res["latency"]]
        lines.append("")
    if "scale" in res:
        s = res["scale"]
        lines += [f"Exact search at scale: synthetic {s['rows']:,} x {s['dim']} float16 store ({s['file_mb']} MB, "
                  f"memory-mapped): {s['exact_ms']} ms per query; anonymous memory of a fresh process "
                  f"{s['anon_mb_before']} MB after imports, {s['anon_mb_peak']} MB at its peak during the searches "
                  "(the store itself stays in the page cache, not the heap).", ""]
    if "faiss" in res:
        lines += ["faiss vs exact on the canary store (perturbed store rows as queries):", "",
                  "| index | k | recall@k | ms/query | build s |", "|---|---|---|---|---|"]
        lines += [f"| {f['index']} | {f['k']} | {f['recall']} | {f['ms_per_query']} | {f['build_s']} |" for f in res["faiss"]]
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    cfg = load_config(BenchKnnConfig, sys.argv[1:] if argv is None else argv)
    work = Path(cfg.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    uptime = lambda: subprocess.run(["uptime"], capture_output=True, text=True).stdout.split("load average:")[-1].strip()
    res: dict = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "config": asdict(cfg),
                 "machine": f"{os.cpu_count()} CPU cores, torch {torch.__version__}, {torch.get_num_threads()} threads",
                 "load_before": uptime(), "n_canaries": cfg.n_canaries}
    sections = set(cfg.sections.split(","))
    threads = [f"--threads={cfg.threads}"] if cfg.threads else []
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
        res["machine"] += f" (set to {cfg.threads})"
    if "quality" in sections:
        data_dir, canaries, model_dir = canary_setup(cfg)
        model, tok, ckpt = load_for_inference(model_dir, "cpu")
        a = ckpt["model_args"]
        res.update(canary_model=f"{a['n_layer']}x{a['n_embd']} (block {a['block_size']})",
                   canary_iters=ckpt.get("iter_num"), canary_val_loss=round(float(ckpt.get("best_val_loss", float("nan"))), 3))
        corpus = Corpus(data_dir)
        res["quality"] = quality(model, tok, corpus, canaries, [int(c) for c in cfg.contexts.split(",")])
        for r in res["quality"]["rows"]:
            print(f"  ctx {r['context']:>3} {r['method']:<24} {r['query']:<22} top1 {r['top1']:.2f} top5 {r['top5']:.2f}")
        # the product path on the canary model: a store for faiss recall and a latency figure
        knn.main([f"--out_dir={model_dir}", "--build", "--progress=False", *threads])
        store = knn.load_store(model_dir / "knn_train")
        res["canary_store_build_s"] = store.meta["build_seconds"]
        res["faiss"] = faiss_recall(store)
        res["latency"] = [query_latency(model_dir, model_dir / "knn_train",
                                        res["quality"]["examples"]["a_prefix+continuation"])]
    if "timing" in sections:
        baby = baby_checkpoint(work, plain_shakespeare(work))
        dtypes = cfg.timing_dtypes.split(",")
        if cfg.timing_windows:
            res["sampled"] = [sampled_throughput(baby, d, th, cfg.timing_windows) for d in dtypes for th in (1, 2)]
            by = {(r["dtype"], r["threads"]): r.pop("embeddings") for r in res["sampled"]}
            if ("float32", 1) in by and ("bfloat16", 1) in by:
                res["bf16_sample_agreement"] = sample_agreement(by[("float32", 1)], by[("bfloat16", 1)])
            for r in res["sampled"]:
                print(r)
            n_windows = res["sampled"][0]["windows"]
            res["latency"] = res.get("latency", []) + [
                synthetic_latency(baby, d, n_windows, Corpus(work / "shakespeare_char").decode("train", 5000, 5256))
                for d in dtypes]
        res["builds"] = [time_build(baby, d, threads) for d in dtypes] if not cfg.timing_windows else []
        sample = Corpus(work / "shakespeare_char").decode("train", 5000, 5256)
        res["latency"] = res.get("latency", []) + [query_latency(baby, baby / f"knn_{d}", sample) for d in dtypes
                                                   if (baby / f"knn_{d}" / "store.json").exists()]
        if len(res["builds"]) > 1:  # how far bfloat16 moves the stored embeddings and the neighbours
            e32 = np.asarray(knn.load_store(baby / "knn_float32").embeddings, np.float32)
            e16 = np.asarray(knn.load_store(baby / "knn_bfloat16").embeddings, np.float32)
            cos = (e32 * e16).sum(1)
            idx = np.random.default_rng(0).choice(len(e32), 200, replace=False)
            _, n32 = knn.query_exact(e32.astype(np.float16), e32[idx], 10)
            _, n16 = knn.query_exact(e16.astype(np.float16), e16[idx], 10)
            res["bf16_agreement"] = {"min_cos": round(float(cos.min()), 5), "mean_cos": round(float(cos.mean()), 6),
                                     "top10_overlap": round(knn.recall_at_k(n32, n16), 4)}
    if "scale" in sections and cfg.scale_rows:
        res["scale"] = scale_search(work, cfg.scale_rows)
    res["load_after"] = uptime()
    (work / f"bench_knn.{'+'.join(sorted(sections))}.json").write_text(json.dumps(res, indent=1, default=str))
    md = markdown(res)
    if "bf16_agreement" in res:
        b = res["bf16_agreement"]
        md += (f"bfloat16 vs float32 store (baby model): window cosine min {b['min_cos']}, mean {b['mean_cos']}; "
               f"top-10 neighbour overlap {b['top10_overlap']}.\n")
    print(md)
    if cfg.results:
        with open(cfg.results, "a") as f:
            f.write(md + "\n")
    return res


if __name__ == "__main__":
    main()
