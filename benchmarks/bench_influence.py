"""How fast and how right is trace-influence? Each part prints its figures and a reference measured in
the same run.

    python -m benchmarks.bench_influence --smoke                       # all parts on a tiny model, seconds
    python -m benchmarks.bench_influence speed --out_dir=DIR --windows=2000   # build vs one training epoch
    python -m benchmarks.bench_influence query --out_dir=DIR --chars=300      # query time (store built)
    python -m benchmarks.bench_influence recall --out_dir=DIR --windows=2000  # recall@10 vs projection size
    python -m benchmarks.bench_influence damping --out_dir=DIR --windows=200  # LOO (convex) and tail-patch
    python -m benchmarks.bench_influence head --out_dir=DIR --windows=1000     # scores with vs without lm_head
    python -m benchmarks.bench_influence union --out_dir=DIR --queries=2       # candidates vs exhaustive top-10

speed: the store's two passes (EK-FAC fit on min(fit_windows, windows) windows, then every window's
projected gradient) against one AdamW training epoch over the same windows in the same batches.
recall: exact EK-FAC scores of `windows` windows for 5 queries against the recall index's cosine at
each projection size: the share of the exact top-10 proponents inside the index's top 1.6% (256 of
the README model's 15,685 windows). damping: Spearman of predicted against measured effects per
damping, (1) leave-one-out retraining of a convex model (softmax regression, exact retraining) and
(2) one-step SGD tail-patch gains of `windows` windows of the run.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time

import numpy as np
import torch

from glassgpt.trace import influence as inf
from glassgpt.trace import influence_store as st


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def open_or_tiny(out_dir: str | None, smoke: bool):
    """The run at out_dir; --smoke: a random tiny char model over a tiny dataset in a temp dir."""
    from glassgpt.run import open_run

    if smoke:
        import tempfile
        from pathlib import Path

        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from conftest import make_char_dataset, make_checkpoint

        tmp = Path(tempfile.mkdtemp(prefix="bench-influence-"))
        make_checkpoint(tmp / "out", make_char_dataset(tmp / "data" / "tiny_char"))
        out_dir = str(tmp / "out")
    return open_run(out_dir or "out-shakespeare-char")


def texts(run, n: int, chars: int, step: int) -> list[str]:
    """n query texts of `chars` characters, `step` apart, from the validation split (the training
    split where the validation one is too short: --smoke)."""
    split = "val" if len(run.corpus.tokens("val")) >= n * step + chars else "train"
    whole = run.corpus.decode(split, 0, min(len(run.corpus.tokens(split)), n * step + chars))
    return [whole[(step * i) % max(1, len(whole) - chars):][:chars] for i in range(n)]


def load_rows(run, spans: np.ndarray, rows: np.ndarray) -> torch.Tensor:
    toks = run.corpus.tokens("train")
    return torch.tensor(np.stack([toks[spans[i, 1]:spans[i, 2]] for i in rows]).astype(np.int64))


def full_rows(run, n: int) -> tuple[np.ndarray, np.ndarray]:
    spans = st.training_windows(run.corpus, "train", inf.block_size(run.model))
    full = np.flatnonzero(spans[:, 2] - spans[:, 1] == spans[:, 2].__sub__(spans[:, 1]).max())
    return spans, full[:n]


def speed(run, windows: int, batch_size: int, fit_windows: int) -> None:
    spans, rows = full_rows(run, windows)
    model = run.model
    t0, c0 = time.perf_counter(), time.process_time()
    f = inf.fit_ekfac(model, load_rows(run, spans, rows[:fit_windows]), batch_size=batch_size, n_train=len(rows))
    t_fit = time.perf_counter() - t0
    proj = st.projections(f, st.PROJ_DIM)
    st.embed_windows(model, f, proj, run.corpus.tokens("train"), spans, rows, batch_size)
    t_build, c_build = time.perf_counter() - t0, time.process_time() - c0
    m = copy.deepcopy(model).train()
    opt = m.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu")
    data = load_rows(run, spans, rows)
    t0, c0 = time.perf_counter(), time.process_time()
    for lo in range(0, len(data), batch_size):
        w = data[lo:lo + batch_size]
        _, loss = m(w[:, :-1].contiguous(), targets=w[:, 1:].contiguous())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    t_epoch, c_epoch = time.perf_counter() - t0, time.process_time() - c0
    print(f"speed ({len(rows)} windows x {data.size(1) - 1} tokens, batch {batch_size}, loadavg "
          f"{os.getloadavg()[0]:.1f}): build {t_build:.1f} s (fit on {min(fit_windows, len(rows))}: {t_fit:.1f} s) "
          f"vs one AdamW epoch {t_epoch:.1f} s -> ratio {t_build / t_epoch:.2f}; CPU time {c_build:.1f} vs "
          f"{c_epoch:.1f} s -> ratio {c_build / c_epoch:.2f}")


def query(run, chars: int, recall: int, bm25: int) -> None:
    from glassgpt.trace.influence_query import explain
    from glassgpt.trace.influence_store import open_store

    store = open_store(run)
    times, cpu = [], []
    for text in texts(run, 3, chars, 1000):
        ids = run.tokenizer.encode(text)
        t0, c0 = time.perf_counter(), time.process_time()
        r = explain(run, store, ids, 1, recall=recall, bm25=bm25)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    print(f"query ({chars} chars, {len(store):,} windows, {r['n_candidates']} candidates (recall {recall}, bm25 "
          f"{bm25}), loadavg {os.getloadavg()[0]:.1f}): {np.median(times):.2f} s median of 3 (min {min(times):.2f}); "
          f"CPU time {np.median(cpu):.2f} s")


def recall_vs_dim(run, windows: int, batch_size: int, dims: list[int], top: int = 10,
                  budgets: tuple[int, ...] = (64, 128, 256, 512), of: int = 15686, n_queries: int = 5) -> None:
    """Share of the exact top-`top` found in the recall index's top `b / of` of the windows, for the
    README model's `of` windows and candidate budgets `b`, at each projection size."""
    spans, rows = full_rows(run, windows)
    model = run.model
    data = load_rows(run, spans, rows)
    f = inf.fit_ekfac(model, data[:2048], batch_size=batch_size, n_train=len(rows))
    queries = [run.tokenizer.encode(t) for t in texts(run, n_queries, 200, 700)]
    exact = [inf.influence_scores(model, f, data, q, 1, batch_size=batch_size) for q in queries]
    cuts = [max(1, int(round(b / of * len(rows)))) for b in budgets]
    print(f"recall: exact top-{top} proponents inside the recall index's top k of {len(rows)} windows "
          f"(k = {', '.join(map(str, cuts))} = {', '.join(map(str, budgets))} of {of:,}), mean of {len(queries)} "
          f"queries; random windows would find k/{len(rows)}")
    for k in dims:
        proj = st.projections(f, k)
        vec = st.embed_windows(model, f, proj, run.corpus.tokens("train"), spans, rows, batch_size).astype(np.float32)
        hits = np.zeros(len(cuts))
        for q, ex in zip(queries, exact, strict=True):
            order = np.argsort(-(vec @ st_query_vector(model, f, proj, q)))
            best = set(np.argsort(-ex)[:top].tolist())
            hits += [len(set(order[:c].tolist()) & best) / top / len(queries) for c in cuts]
        print(f"  proj_dim {k:>3} ({vec.shape[1]:>6} dims, {vec.shape[1] * 2:>6} B/window): "
              + ", ".join(f"{c}: {h:.2f}" for c, h in zip(cuts, hits, strict=True)))


def union(run, n_queries: int, chars: int, top: int = 10) -> None:
    """Share of the exhaustive top-`top` proponents among the default candidates (recall + BM25 + spans),
    on the built store, against every window scored exactly."""
    from glassgpt.trace.influence_query import all_windows_scores, candidates, query_recall_vector
    from glassgpt.trace.influence_store import open_store

    store = open_store(run)
    found = {"recall": [], "bm25": [], "union": []}
    for text in texts(run, n_queries, chars, 1300):
        ids = run.tokenizer.encode(text)
        best = set(np.argsort(-all_windows_scores(run, store, ids, 1))[:top].tolist())
        g = inf.query_gradient(run.model, store.factors.layers, ids, 1)
        cos = store.cosines(query_recall_vector(g, store.proj))
        cand, _ = candidates(run, store, cos, ids, 1, text, 256, 64, False)
        rec, _ = candidates(run, store, cos, ids, 1, text, 256, 0, False)
        bm, _ = candidates(run, store, cos, ids, 1, text, 0, 64, False)
        for name, c in (("recall", rec), ("bm25", bm), ("union", cand)):
            found[name].append(len(best & set(c.tolist())) / top)
    print(f"union ({len(store):,} windows, {n_queries} queries of {chars} chars): share of the exhaustive "
          f"top-{top} among the candidates: " + ", ".join(f"{k} {np.mean(v):.2f}" for k, v in found.items()))


def st_query_vector(model, f, proj, ids) -> np.ndarray:
    from glassgpt.trace.influence_query import query_recall_vector

    return query_recall_vector(inf.query_gradient(model, f.layers, ids, 1), proj)


def head(run, windows: int, batch_size: int) -> None:
    spans, rows = full_rows(run, windows)
    data = load_rows(run, spans, rows)
    with_head = inf.fit_ekfac(run.model, data, batch_size=batch_size)
    layers = [n for n in with_head.layers if n != "lm_head"]
    without = inf.fit_ekfac(run.model, data, batch_size=batch_size, layers=layers)
    rhos = []
    for t in texts(run, 3, 200, 900):
        q = run.tokenizer.encode(t)
        a = inf.influence_scores(run.model, with_head, data, q, 1, batch_size=batch_size)
        b = inf.influence_scores(run.model, without, data, q, 1, batch_size=batch_size)
        rhos.append(spearman(a, b))
    print(f"head: Spearman of scores with vs without lm_head over {len(rows)} windows, 3 queries: "
          f"{', '.join(f'{r:.3f}' for r in rhos)}")


def convex_damping(n: int = 24, l2: float = 1e-2) -> None:
    """Softmax regression (convex: leave-one-out retraining is exact) against influence per damping."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
    from test_influence import convex_loo

    windows, base, q, actual = convex_loo(n, l2)
    act = np.array(actual)
    fm = base.float()
    f = inf.fit_ekfac(fm, windows.repeat(40, 1), n_train=n)
    match = l2 / float(f.lambdas[0].mean())
    print(f"damping, convex (softmax regression, {n} windows, L2 {l2} = damping {match:.3f}): "
          "Spearman(predicted, leave-one-out retrained)")
    for d in (1e-3, 1e-2, 0.1, match, 1.0, 10.0):
        f.damping = d
        pred = inf.influence_scores(fm, f, windows, q, 2)
        print(f"  damping {d:.3g}: Spearman {spearman(pred, act):+.3f}, sign agreement "
              f"{np.mean(np.sign(pred) == np.sign(act)):.2f}")


def tail_patch_damping(run, windows: int, batch_size: int, lr: float = 1e-3) -> None:
    """Spearman between each window's score and its one-step SGD tail-patch gain, per damping."""
    spans, rows = full_rows(run, 10 * windows)
    rows = rows[::10][:windows]  # spread over the data
    data = load_rows(run, spans, rows)
    model = run.model
    f = inf.fit_ekfac(model, data, batch_size=batch_size, n_train=len(spans))
    print(f"damping, tail-patch ({len(rows)} windows; one SGD step, lr {lr}, on each): Spearman(score, gain in "
          "the query's log-probability), mean of 3 queries")
    qs = [run.tokenizer.encode(t) for t in texts(run, 3, 200, 800)]
    gains = []
    for q in qs:
        x, y = inf.query_rows(q, 1, inf.block_size(model))
        base = qloss(model, x, y)
        g = []
        for i in range(len(data)):
            m = copy.deepcopy(model)
            _, loss = m(data[i:i + 1, :-1].contiguous(), targets=data[i:i + 1, 1:].contiguous())
            loss.backward()
            with torch.no_grad():
                for p in m.parameters():
                    if p.grad is not None:
                        p -= lr * p.grad
            g.append(base - qloss(m, x, y))
        gains.append(np.array(g))
    for d in (1e-3, 1e-2, 0.1, 1.0, 10.0, 1e3):
        f.damping = d
        rho = [spearman(inf.influence_scores(model, f, data, q, 1, batch_size=batch_size), g)
               for q, g in zip(qs, gains, strict=True)]
        print(f"  damping {d:g}: Spearman {np.mean(rho):+.3f}")


def qloss(m, x, y) -> float:
    with torch.no_grad():
        lg, _ = m(x, targets=x)
        return float(torch.nn.functional.cross_entropy(lg.transpose(1, 2), y, ignore_index=-1, reduction="sum"))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("part", nargs="?", default="all",
                    choices=["all", "speed", "query", "recall", "damping", "head", "union"])
    ap.add_argument("--out_dir", default=None)
    ap.add_argument("--windows", type=int, default=2000)
    ap.add_argument("--batch_size", type=int, default=32)
    ap.add_argument("--fit_windows", type=int, default=st.FIT_WINDOWS)
    ap.add_argument("--chars", type=int, default=300)
    ap.add_argument("--dims", default="8,16,32")
    ap.add_argument("--queries", type=int, default=5)
    ap.add_argument("--recall", type=int, default=256)
    ap.add_argument("--bm25", type=int, default=64)
    ap.add_argument("--smoke", action="store_true", help="every part on a tiny random model, in seconds")
    a = ap.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    if a.smoke:
        run = open_or_tiny(None, True)
        speed(run, 40, 8, 20)
        recall_vs_dim(run, 40, 8, [4, 8])
        head(run, 40, 8)
        convex_damping(n=8)
        tail_patch_damping(run, 10, 8)
        from glassgpt.trace.influence_cli import main as cli_main

        cli_main([f"--out_dir={run.out_dir}", "--build", "--progress=False"])
        union(run, 1, 40)
        return
    run = open_or_tiny(a.out_dir, False)
    if a.part in ("all", "speed"):
        speed(run, a.windows, a.batch_size, a.fit_windows)
    if a.part in ("all", "query"):
        query(run, a.chars, a.recall, a.bm25)
    if a.part in ("all", "recall"):
        recall_vs_dim(run, a.windows, a.batch_size, [int(d) for d in a.dims.split(",")], n_queries=a.queries)
    if a.part in ("all", "head"):
        head(run, min(a.windows, 1000), a.batch_size)
    if a.part in ("all", "union"):
        union(run, min(a.queries, 3), a.chars)
    if a.part in ("all", "damping"):
        convex_damping()
        tail_patch_damping(run, min(a.windows, 200), a.batch_size)


if __name__ == "__main__":
    main()
