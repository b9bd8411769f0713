"""How good and how fast is trace-knn? Planted canaries, build speed vs the bare forward, FAISS at scale,
query latency. Each section prints its figures and the reference measured in the same run.

    python -m benchmarks.bench_knn quality --model_dir=DIR [--contexts=64,128,256]  # canary table
    python -m benchmarks.bench_knn build --model_dir=DIR                            # build / bare forward
    python -m benchmarks.bench_knn latency --model_dir=DIR --chars=300              # query ms, hybrid
    python -m benchmarks.bench_knn faiss --work_dir=/tmp/knn-big --rows=5000000 --dim=128

The canary model: a char GPT trained on tiny-shakespeare with unique canary lines planted once each in
the training part (benchmarks/canaries.py: `prepare_canary_dataset`, `train_canary_model`; the run in
docs/knn.md is written there). Query variants per canary: alone; plus the ~150 characters that follow it
in the corpus (shifted); two words swapped; preceded by ~150 characters of unrelated (validation) text.
Success@k: one of the top-k windows holds at least half of the canary's planted copy.
Results: `--results=benchmarks/RESULTS.md` appends the markdown printed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
for p in (REPO, REPO / "benchmarks"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from glassgpt.trace import knn, knn_rank, knn_search, knn_store  # noqa: E402

VARIANTS = ("alone", "shifted", "swapped", "preceded")


def load(model_dir: str):
    from glassgpt.run import open_run

    return open_run(model_dir)


def canary_variants(corpus, canaries: list[dict]) -> dict[str, list[str]]:
    """The four query texts of every canary (char data: a token is a character)."""
    train = corpus.decode("train", 0, len(corpus.tokens("train")))
    val = corpus.decode("val", 0, min(len(corpus.tokens("val")), 20_000))
    rng = np.random.default_rng(0)
    out = {v: [] for v in VARIANTS}
    for c in canaries:
        line, o = c["text"], c["char_offset"]
        w = line.rstrip(".").split(" ")
        i = int(rng.integers(0, len(w) - 1))
        w[i], w[i + 1] = w[i + 1], w[i]
        s = int(rng.integers(0, len(val) - 150))
        out["alone"].append(line)
        out["shifted"].append(train[o:o + len(line) + 150])
        out["swapped"].append(" ".join(w) + ".")
        out["preceded"].append(val[s:s + 150] + line)
    return out


def sources(windows: np.ndarray, canaries: list[dict]) -> list[set[int]]:
    """Per canary, the windows holding at least half of it."""
    out = []
    for c in canaries:
        a, b = c["char_offset"], c["char_offset"] + len(c["text"])
        overlap = np.minimum(windows[:, 2], b) - np.maximum(windows[:, 1], a)
        out.append(set(np.flatnonzero(overlap * 2 >= b - a).tolist()))
    return out


def success(ranked: list[list[int]], src: list[set[int]]) -> tuple[float, float]:
    return (float(np.mean([r[0] in s for r, s in zip(ranked, src, strict=True)])),
            float(np.mean([bool(set(r[:5]) & s) for r, s in zip(ranked, src, strict=True)])))


def quality(a: argparse.Namespace) -> str:
    """Top-1/top-5 per variant for every embedding variant, BM25 and hybrid, at each context."""
    import bm25s

    run = load(a.model_dir)
    model, tok, corpus = run.model, run.tokenizer, run.corpus
    canaries = json.loads((Path(run.data_dir) / "canaries.json").read_text())["canaries"]
    queries = canary_variants(corpus, canaries)
    n = model.config.n_layer
    layers = sorted({int(x) for x in a.layers.split(",")}) if a.layers else sorted({n // 2, n - 1, n})
    calibs = [(c, int(d) if d else None) for c, _, d in (x.partition(":") for x in a.calibrations.split(","))]
    rows = []
    for context in [int(c) for c in a.contexts.split(",")]:
        spans = knn_store.window_spans(corpus.segments("train"), context, context // 2)
        src = sources(spans, canaries)
        with tempfile.TemporaryDirectory() as d:
            knn_store.build_bm25([corpus.decode("train", int(s), int(e)) for _, s, e in spans], Path(d) / "bm25")
            bm = bm25s.BM25.load(str(Path(d) / "bm25"))
        bm_sig = {v: [knn_rank.Signal.of(bm.get_scores(knn_store.bm25_tokens([t])[0]).astype(np.float32)) for t in ts]
                  for v, ts in queries.items()}
        for v, sig in bm_sig.items():
            rows.append((context, "BM25", v, *success([list(s.ids) for s in sig], src)))
        t0 = time.perf_counter()
        for layer in layers:
            for pooling in ("mean", "last") if layer == n and a.last else ("mean",):
                raw = knn_store.embed_windows(model, corpus.tokens("train"), spans, layer, pooling, a.batch_size)
                qraw = {v: [knn_store.embed_query(model, tok.encode(t), context, context // 2, layer, pooling).mean(0)
                            for t in ts] for v, ts in queries.items()}
                for cal, dim in calibs if pooling == "mean" else [("whiten", None)]:
                    calib = knn_store.fit_calibration(raw, cal, dim)
                    emb = knn_store.calibrate(raw, calib)
                    name = f"emb L{layer} {pooling} {cal}{dim or ''}"
                    for v, qs in qraw.items():
                        full = knn_search.exact_scores(emb, knn_store.calibrate(np.stack(qs), calib))
                        emb_sig = [knn_rank.Signal.of(f) for f in full]
                        rows.append((context, name, v, *success([list(s.ids) for s in emb_sig], src)))
                        for how in ("z", "rrf"):
                            hyb = [[i for i, _, _ in knn_rank.fuse({"embedding": e, "bm25": b}, 5, how)]
                                   for e, b in zip(emb_sig, bm_sig[v], strict=True)]
                            rows.append((context, f"hybrid-{how} " + name.removeprefix("emb "), v, *success(hyb, src)))
        print(f"context {context}: {len(spans)} windows, {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    md = ["| context | method | " + " | ".join(f"{v} top1/top5" for v in VARIANTS) + " |",
          "|---|---|" + "---|" * len(VARIANTS)]
    table: dict[tuple[int, str], dict[str, str]] = {}
    for context, method, v, t1, t5 in rows:
        table.setdefault((context, method), {})[v] = f"{t1:.2f} / {t5:.2f}"
    md += [f"| {c} | {m} | " + " | ".join(cells[v] for v in VARIANTS) + " |" for (c, m), cells in table.items()]
    (Path(a.work_dir) / "quality.json").write_text(json.dumps(rows))
    return (f"{len(canaries)} canaries planted once each; model {a.model_dir} ({n}x{model.config.n_embd}, "
            f"block {model.config.block_size}); stride = context/2; L{n} = final layer-normed.\n\n" + "\n".join(md))


@torch.inference_mode()
def bare_forward(model, tokens: np.ndarray, spans: np.ndarray, batch_size: int) -> float:
    """Seconds of the model's plain forward (nanoGPT's, lm_head on the last position) over the same
    batches of the same windows: the reference a store build is measured against."""
    t0 = time.perf_counter()
    lengths = spans[:, 2] - spans[:, 1]
    for length in np.unique(lengths)[::-1]:
        ids = np.flatnonzero(lengths == length)
        for b in range(0, len(ids), batch_size):
            x = np.stack([tokens[spans[r, 1]:spans[r, 2]] for r in ids[b:b + batch_size]]).astype(np.int64)
            model(torch.from_numpy(x))
    return time.perf_counter() - t0


def build(a: argparse.Namespace) -> str:
    """Whole store build (windows, forward, calibration, BM25, write) / bare forward, interleaved."""
    run = load(a.model_dir)
    model, corpus = run.model, run.corpus
    context = model.config.block_size
    spans = knn_store.window_spans(corpus.segments("train"), context, context // 2)
    out = []
    for dtype in a.dtypes.split(","):
        model.to(getattr(torch, dtype))
        bare, built = [], []
        for _ in range(a.repeats):
            bare.append(bare_forward(model, corpus.tokens("train"), spans, a.batch_size))
            with tempfile.TemporaryDirectory(dir=a.work_dir) as d:
                t0 = time.perf_counter()
                knn_store.build_store(model, corpus, "train", Path(d) / "s", context=context, stride=context // 2,
                                batch_size=a.batch_size, built_from=run.provenance())
                built.append(time.perf_counter() - t0)
        b, s = min(bare), min(built)
        out.append(f"| {dtype} | {len(spans):,} x {context} | {b:.2f} s | {s:.2f} s | **{s / b:.2f}** |")
    model.float()
    return ("| dtype | windows | bare forward (min of runs) | store build | build / forward |\n|---|---|---|---|---|\n"
            + "\n".join(out))


def latency(a: argparse.Namespace) -> str:
    """Median ms of open_store (staleness check) + explain (embed, exact + BM25, fusion) for a text."""
    run = load(a.model_dir)
    text = run.corpus.decode("val", 0, a.chars)
    ids = run.tokenizer.encode(text)
    rows = []
    for rank in ("hybrid", "embedding", "bm25"):
        ms, fwd = [], []
        for i in range(a.repeats + 3):
            t0 = time.perf_counter()
            store = knn_store.open_store(run)
            r = knn_rank.explain(run, store, text, k=5, rank=rank)
            t1 = time.perf_counter()
            m = store.meta
            knn_store.embed_query(run.model, ids, m["context"], m["stride"], m["layer"], m["pooling"])
            if i >= 3:  # the first calls load BM25 and warm torch
                ms.append((t1 - t0) * 1000)
                fwd.append((time.perf_counter() - t1) * 1000)
        rows.append(f"| {rank} | {len(text)} chars, {r['n_query_windows']} window(s) | {len(store):,} | "
                    f"{np.median(ms):.1f} ms | {np.percentile(ms, 90):.1f} ms | {np.median(fwd):.1f} ms |")
    return ("| rank | query | store windows | median (open_store + explain) | p90 | the model's forward of the "
            "query windows alone (reference) |\n|---|---|---|---|---|---|\n" + "\n".join(rows))


def recall_at_k(exact_ids: np.ndarray, approx_ids: np.ndarray) -> float:
    """Fraction of the exact top-k found in the approximate top-k, averaged over queries."""
    return float(np.mean([len(set(e) & set(a)) / exact_ids.shape[1]
                          for e, a in zip(exact_ids, approx_ids, strict=True)]))


def faiss_scale(a: argparse.Namespace) -> str:
    """IVF-PQ on a synthetic store (clustered unit rows, the real embeddings.npy format, memory-mapped)."""
    work = Path(a.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    path = work / "embeddings.npy"
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((2000, a.dim)).astype(np.float32)
    if not path.exists():
        emb = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(a.rows, a.dim))
        for lo in range(0, a.rows, 500_000):
            m = min(500_000, a.rows - lo)
            x = centres[rng.integers(0, len(centres), m)] + 0.7 * rng.standard_normal((m, a.dim)).astype(np.float32)
            emb[lo:lo + m] = knn_store.normalize(x)
        emb.flush()
        del emb
    emb = np.load(path, mmap_mode="r")
    qid = np.sort(rng.choice(len(emb), 100, replace=False))
    noise = 0.05 * rng.standard_normal((100, a.dim)).astype(np.float32)
    q = knn_store.normalize(np.asarray(emb[qid], np.float32) + noise)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    index = knn_search.build_faiss_index(emb)
    t_build = time.perf_counter() - t0
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # peak, before the exact reference
    t0 = time.perf_counter()
    exact = np.stack([knn_search.top_ids(s, 10) for lo in range(0, len(q), 10)
                      for s in knn_search.exact_scores(emb, q[lo:lo + 10])])
    t_exact = (time.perf_counter() - t0) / len(q)
    rows = []
    for nprobe in (32, 64, 128):
        t0 = time.perf_counter()
        _, approx = knn_search.query_faiss(index, emb, q, 10, nprobe=nprobe)
        ms = (time.perf_counter() - t0) / len(q) * 1000
        rows.append(f"| {nprobe} | {recall_at_k(exact, approx):.3f} | {ms:.1f} ms |")
    return (f"synthetic store {a.rows:,} x {a.dim} float16 ({path.stat().st_size / 2**30:.2f} GiB, memory-mapped), "
            f"IVF-PQ nlist {index.nlist}, {index.pq.M} sub-quantizers x {index.pq.nbits} bits, exact re-rank of "
            f"100 candidates; build {t_build:.0f} s; peak RSS {rss0:.0f} MB before the build, {rss1:.0f} MB after "
            f"(index {index.ntotal * index.pq.code_size / 2**20:.0f} MB of codes); exact search "
            f"{t_exact * 1000:.0f} ms per query (the reference).\n\n| nprobe | recall@10 vs exact | ms per query |\n"
            "|---|---|---|\n" + "\n".join(rows))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("section", nargs="?", choices=("quality", "build", "latency", "faiss"))
    p.add_argument("--model_dir")
    p.add_argument("--work_dir", default="/tmp/bench-knn")
    p.add_argument("--contexts", default="64,128,256")
    p.add_argument("--layers", default="", help="comma list (default n_layer//2, n_layer-1, n_layer)")
    p.add_argument("--calibrations", default="none,center,standardize,whiten,whiten:64")
    p.add_argument("--last", type=int, default=1, help="also last-position pooling at the final layer")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--dtypes", default="float32")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--chars", type=int, default=300)
    p.add_argument("--rows", type=int, default=5_000_000)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--results", help="append the markdown to this file")
    p.add_argument("--smoke", action="store_true", help="seconds: every section on a 2-iteration canary model "
                   "(4 canaries in 8,000 characters) and a 5,000-row synthetic store, in a temporary work_dir")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    if a.smoke:
        smoke(a)
        return
    if a.section is None:
        p.error("name a section: quality, build, latency or faiss (or pass --smoke)")
    run_section(a)


def run_section(a: argparse.Namespace) -> str:
    Path(a.work_dir).mkdir(parents=True, exist_ok=True)
    load_before = Path("/proc/loadavg").read_text().split()[:3]
    md = {"quality": quality, "build": build, "latency": latency, "faiss": faiss_scale}[a.section](a)
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    md = (f"### trace-knn {a.section} ({time.strftime('%Y-%m-%d')}, {os.cpu_count()}-core "
          f"{platform.processor() or platform.machine()}, {gpu}, {a.threads} thread(s), load "
          f"{' '.join(load_before)} -> {' '.join(Path('/proc/loadavg').read_text().split()[:3])})\n\n{md}\n")
    print(md)
    if a.results:
        with open(a.results, "a") as f:
            f.write(md + "\n")
    return md


def smoke(a: argparse.Namespace) -> None:
    """Each section, tiny, on a canary model trained for 2 iterations: checks the code runs, not quality."""
    from benchmarks.canaries import prepare_canary_dataset, train_canary_model

    with tempfile.TemporaryDirectory(prefix="bench-knn-smoke-") as work:
        data, _ = prepare_canary_dataset(work, n=4, chars=8000)
        model_dir = Path(work) / "model"
        train_canary_model(data, model_dir, 2, n_embd=32, block_size=32, batch_size=4, eval_iters=1)
        assert knn.main([f"--out_dir={model_dir}", "--build", "--device=cpu"]) in (0, None)
        a.model_dir, a.work_dir = str(model_dir), work
        a.contexts, a.layers, a.calibrations, a.last, a.repeats, a.chars = "32", "2", "none", 0, 1, 100
        a.rows, a.dim = 5000, 16
        for a.section in ("quality", "build", "latency", "faiss"):
            run_section(a)


if __name__ == "__main__":
    main()
