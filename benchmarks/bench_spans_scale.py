"""Sharded span index at scale: build wall time, peak memory, bytes/token and 200-token trace latency
at 10 M, 100 M and >= 1 B GPT-2 tokens.

    nice -n 10 python -m benchmarks.bench_spans_scale --work=/work/scratch/spans --sizes=10M,100M,1100M \\
        --max_memory=6G --num_proc=2          # make the corpora, build, query; prints a RESULTS.md table
    python -m benchmarks.bench_spans_scale --work=... --sizes=... --only=query   # query an existing build
    python -m benchmarks.bench_spans_scale --work=... --clean                    # delete the corpora and indexes
    python -m benchmarks.bench_spans_scale --work=/work/scratch/spans12 --sizes=12M --shards_vs_one=8
        # one corpus built as 1 shard and as 8: the trace latency of each, searched per shard (the code
        # before the shards were searched together) and in one search over all shards (suffix_array.Stack),
        # with the ratios

The corpora are written straight in glassgpt's prepared-data format (train.bin + train.docs.npy +
documents.json + meta.json): the GPT-2 tokens of the shared English corpus (SOTU + Moby-Dick, 370
documents), then copies of every document whose ids go through a fresh random permutation each (real
text statistics, no cross-copy repeats), so a billion tokens need no 4 GB tokenizing pass. The build
runs as `glassgpt trace-spans --build` in a child process; its peak memory is the largest sum of the
resident sets of the process tree, sampled every 0.2 s from /proc. Queries run in a fresh process:
100 texts of 200 tokens, each a patchwork of 5 pieces of 40 tokens from random places of the corpus
(so spans are found and sources read), traced with all steps (spans, counts, 10 sources each).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
MIRROR = Path(os.environ.setdefault("GLASSGPT_MIRROR", str(REPO.parent / "shared" / "data")))


def parse_size(s: str) -> int:
    mult = {"K": 10**3, "M": 10**6, "B": 10**9, "G": 10**9}.get(s[-1].upper(), 1)
    return int(float(s[:-1] if mult > 1 else s) * mult)


def base_documents() -> tuple[list[np.ndarray], list[str]]:
    from glassgpt.tokenizer import GPT2Tokenizer

    tok = GPT2Tokenizer(MIRROR / "gpt2")
    rows = [json.loads(line) for line in (MIRROR / "english" / "sotu_mobydick.jsonl").open()]
    ids = tok.enc.encode_ordinary_batch([r["text"] for r in rows], num_threads=2)
    return [np.array(i, dtype=np.uint16) for i in ids], [r["id"] for r in rows]


def make_corpus(out: Path, n_tokens: int, docs: list[np.ndarray], names: list[str]) -> None:
    """Prepared data of >= n_tokens tokens (whole documents), written in 2.4 M-token copies."""
    if (out / "meta.json").exists():
        return
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    segs, documents, pos, copy = [], [], 0, 0
    with open(out / "train.bin", "wb") as f:
        while pos < n_tokens:
            perm = np.arange(50257, dtype=np.uint16) if copy == 0 else rng.permutation(50257).astype(np.uint16)
            for d, name in zip(docs, names, strict=True):
                f.write(perm[d].tobytes())
                segs.append((len(documents), pos, pos + len(d), 0, 1))
                documents.append({"id": f"copy{copy}/{name}", "source": "synthetic", "char_offset": 0, "line": 1,
                                  "split": "train"})
                pos += len(d)
            copy += 1
    np.save(out / "train.docs.npy", np.array(segs, dtype=np.int64))
    (out / "documents.json").write_text(json.dumps(documents))
    (out / "meta.json").write_text(json.dumps({
        "tokenizer": "gpt2", "vocab_size": 50257, "eot_token": 50256, "format": "glassgpt-data/1",
        "dataset": out.name, "train_tokens": pos,
        "splits": {"train": {"tokens": pos, "documents": len(documents), "segments": len(segs)}}}))


def tree_rss(root: int) -> int:
    """Sum of the resident sets (bytes) of `root` and its descendants."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for p in os.listdir("/proc"):
        if not p.isdigit():
            continue
        try:
            stat = Path(f"/proc/{p}/stat").read_text()
            fields = stat[stat.rindex(")") + 2:].split()
            children.setdefault(int(fields[1]), []).append(int(p))
            rss[int(p)] = int(fields[21]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError):
            continue
    total, todo = 0, [root]
    while todo:
        p = todo.pop()
        total += rss.get(p, 0)
        todo += children.get(p, [])
    return total


def run_measured(cmd: list[str], log: Path) -> tuple[float, int, int]:
    """(wall seconds, peak summed RSS bytes of the process tree, exit code)."""
    t = time.perf_counter()
    with open(log, "a") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)
        peak = [0]

        def poll() -> None:
            while proc.poll() is None:
                peak[0] = max(peak[0], tree_rss(proc.pid))
                time.sleep(0.2)

        th = threading.Thread(target=poll, daemon=True)
        th.start()
        rc = proc.wait()
        th.join()
    return time.perf_counter() - t, peak[0], rc


QUERY_CHILD = r"""
import json, sys, time, numpy as np
sys.path.insert(0, {repo!r})
from glassgpt.trace import spans as S
t0 = time.perf_counter(); index = S.open_index({data!r}); open_s = time.perf_counter() - t0
toks = index.tokens; rng = np.random.default_rng(1); times = []; found = 0
for q in range({n_queries}):
    ids = np.concatenate([toks[p:p + 40] for p in rng.integers(0, len(toks) - 40, 5)]).tolist()
    text, offsets = S.token_offsets(index.tokenizer, ids)
    t = time.perf_counter()
    tr = S.trace_text(index, ids, 0, False, 4, 1, 0.05, 10, 32, None, text, offsets)
    times.append(time.perf_counter() - t); found += len(tr.spans)
print(json.dumps({{"open_s": open_s, "p50_ms": 1e3 * float(np.percentile(times, 50)),
                  "p95_ms": 1e3 * float(np.percentile(times, 95)), "first_ms": 1e3 * times[0],
                  "shards": len(index.shards), "spans": found}}))
"""


SHARDS_CHILD = r"""
import json, sys, time, numpy as np
sys.path.insert(0, {repo!r})
from glassgpt.trace import spans as S
from glassgpt.trace import suffix_array as SA
from glassgpt.trace.span_index import SpanIndex

def per_shard(index):
    # the reference: one whole search per shard, as the first sharded index did (the same answers, checked)
    def ms(ids, first=0):
        per = [SA.matching_statistics(s.arrays, ids, first) for s in index.shards]
        return np.max([m for m, _ in per], axis=0), tuple(np.stack(x) for x in zip(*per))
    def ranges(seqs, starts, per):
        out = [[] for _ in seqs]
        for j, (m, lb) in enumerate(zip(*per)):
            rows = [r for r, (q, s) in enumerate(zip(seqs, starts)) if m[s] >= len(q)]
            if rows:
                lo, hi = SA.sa_range_near(index.shards[j].arrays, [seqs[r] for r in rows],
                                          lb[[starts[r] for r in rows]])
                for r, a, b in zip(rows, lo.tolist(), hi.tolist()):
                    out[r].append((j, a, b))
        return out
    index.matching_statistics, index.ranges = ms, ranges
    return index

engines = {{}}
for name in {dirs!r}:
    for how in ("per shard", "one search"):
        index = SpanIndex({data!r}, {data!r} + "/" + name)
        engines[(name, how)] = per_shard(index) if how == "per shard" else index
toks = next(iter(engines.values())).tokens; rng = np.random.default_rng(1)
times = {{k: [] for k in engines}}; answers = {{k: [] for k in engines}}
for q in range({n_queries}):
    ids = np.concatenate([toks[p:p + 40] for p in rng.integers(0, len(toks) - 40, 5)]).tolist()
    text, offsets = S.token_offsets(next(iter(engines.values())).tokenizer, ids)
    for k, index in engines.items():  # interleaved: the machine's load hits all four alike
        t = time.perf_counter()
        tr = S.trace_text(index, ids, 0, False, 4, 1, 0.05, 10, 32, None, text, offsets)
        times[k].append(time.perf_counter() - t); answers[k].append(tr.to_dict())
first = next(iter(answers.values()))
print(json.dumps({{"same_answers": all(a == first for a in answers.values()),
                  "rows": [[k[0], len(engines[k].shards), k[1], 1e3 * float(np.percentile(t, 50)),
                            1e3 * float(np.percentile(t, 95))] for k, t in times.items()]}}))
"""


def shards_vs_one(work: Path, size: str, n_shards: int, num_proc: int, n_queries: int) -> None:
    """Build one corpus as 1 shard and as about n_shards, and time 200-token traces on both, per-shard
    search vs one search over all shards, in one process; print the figures and the ratios."""
    d = work / f"c{size}"
    if not (d / "meta.json").exists():
        make_corpus(d, parse_size(size), *base_documents())
    n = int(json.loads((d / "meta.json").read_text())["train_tokens"]) + len(np.load(d / "train.docs.npy"))
    # the build sizes shards as max_memory // (num_proc * 24 bytes); 3% slack for whole documents
    for name, tokens in (("spans-1", n), (f"spans-{n_shards}", int(n * 1.03 / n_shards))):
        cmd = [sys.executable, "-m", "glassgpt.cli", "trace-spans", "--build", f"--data_dir={d}",
               f"--index_dir={d / name}", f"--max_memory={(tokens + 1) * 24 * num_proc}", f"--num_proc={num_proc}"]
        build_s, peak, rc = run_measured(cmd, work / f"build-{size}-{name}.log")
        if rc:
            raise SystemExit(f"build of {d / name} failed; see {work}/build-{size}-{name}.log")
    load0 = open("/proc/loadavg").read().strip()
    out = subprocess.run([sys.executable, "-c", SHARDS_CHILD.format(repo=str(REPO), data=str(d), n_queries=n_queries,
                                                                   dirs=["spans-1", f"spans-{n_shards}"])],
                         check=True, capture_output=True, text=True).stdout
    load1 = open("/proc/loadavg").read().strip()
    r = json.loads(out.strip().splitlines()[-1])
    p50 = {(row[1], row[2]): row[3] for row in r["rows"]}
    print(f"{n:,} tokens, {n_queries} traces of 200 tokens; loadavg {load0} -> {load1}; "
          f"same answers in all four: {r['same_answers']}")
    print("| shards | search | p50 | p95 | p50 vs 1 shard |\n|---|---|---|---|---|")
    for _, shards, how, a, b in r["rows"]:
        print(f"| {shards} | {how} | {a:.1f} ms | {b:.1f} ms | {a / p50[(1, how)]:.2f}x |")
    many = max(row[1] for row in r["rows"])
    speedup = p50[(many, 'per shard')] / p50[(many, 'one search')]
    print(f"one search over {many} shards vs per shard: {speedup:.2f}x faster")


def bench_infini_gram(d: Path, n_queries: int) -> str:
    """infini-gram 2.6 side by side on the same tokens (u16, 0xffff before each document): its Rust
    indexer's build time and its `attribute()` (spans + counts, no sources) on the same 200-token
    queries, vs our trace of them (spans + counts + 10 sources each)."""
    import infini_gram
    from infini_gram.engine import InfiniGramEngine

    from glassgpt.trace import spans as S

    ig = d / "infini_gram"
    ig.mkdir(exist_ok=True)
    toks = np.memmap(d / "train.bin", dtype=np.uint16, mode="r")
    segs = np.load(d / "train.docs.npy")
    with open(ig / "tokenized.0", "wb") as f:
        offsets, pos = [], 0
        for _, s, e, _, _ in segs:
            offsets.append(pos)
            f.write(b"\xff\xff" + np.asarray(toks[s:e]).tobytes())
            pos += 2 * (e - s + 1)
    (ig / "offset.0").write_bytes(np.array(offsets, dtype=np.uint64).tobytes())
    import resource
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "infini_gram.indexing", "--data_dir", str(ig), "--save_dir", str(ig),
                    "--token_dtype", "u16", "--cpus", "2", "--mem", "4",
                    "--ulimit", str(resource.getrlimit(resource.RLIMIT_NOFILE)[1])],
                   check=True, capture_output=True, cwd=Path(infini_gram.__file__).parent)
    build_s = time.perf_counter() - t
    ig_bytes = sum(p.stat().st_size for p in ig.iterdir() if p.name.startswith(("table", "tokenized")))
    engine = InfiniGramEngine(index_dir=str(ig), eos_token_id=50256, vocab_size=65535, token_dtype="u16")
    index = S.open_index(d)
    rng = np.random.default_rng(1)
    ours, theirs = [], []
    for _ in range(n_queries):
        ids = np.concatenate([toks[p:p + 40] for p in rng.integers(0, len(toks) - 40, 5)]).tolist()
        text, offs = S.token_offsets(index.tokenizer, ids)
        t = time.perf_counter()
        S.trace_text(index, ids, 0, False, 4, 1, 0.05, 10, 32, None, text, offs)
        ours.append(time.perf_counter() - t)
        t = time.perf_counter()
        engine.attribute(input_ids=ids, delim_ids=[], min_len=4, max_cnt=10, enforce_bow=False)
        theirs.append(time.perf_counter() - t)

    def q(xs: list[float]) -> str:
        return f"{1e3 * np.percentile(xs, 50):.1f} / {1e3 * np.percentile(xs, 95):.1f} ms"

    version = getattr(infini_gram, "__version__", "2.6")
    return (f"infini-gram {version} on {len(toks):,} tokens: "
            f"build {build_s:.0f} s, {ig_bytes / len(toks):.2f} bytes/token; 200-token queries p50 / p95: "
            f"infini-gram attribute() {q(theirs)} vs ours (with sources) {q(ours)}")


def index_bytes(index_dir: Path) -> int:
    return sum(p.stat().st_size for p in index_dir.rglob("*") if p.is_file())


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", default="/work/scratch/spans")
    p.add_argument("--sizes", default="10M,100M,1100M")
    p.add_argument("--max_memory", default="6G")
    p.add_argument("--num_proc", type=int, default=2)
    p.add_argument("--queries", type=int, default=100)
    p.add_argument("--only", choices=["data", "build", "query"], default=None)
    p.add_argument("--clean", action="store_true")
    p.add_argument("--infini_gram", default=None, help="size whose corpus to compare with infini-gram, e.g. 10M")
    p.add_argument("--shards_vs_one", type=int, default=0, metavar="S",
                   help="build the first --sizes corpus as 1 and as S shards; time per-shard vs one search")
    p.add_argument("--smoke", action="store_true", help="seconds: one 300K-token corpus in 2 shards "
                   "(--max_memory=4M), 5 queries, in a temporary --work that is deleted after")
    a = p.parse_args(argv)
    if a.smoke:
        import tempfile

        with tempfile.TemporaryDirectory(prefix="bench-spans-scale-smoke-") as tmp:
            main([f"--work={tmp}", "--sizes=300K", "--max_memory=4M", "--num_proc=1", "--queries=5"])
        return
    work = Path(a.work)
    if a.clean:
        shutil.rmtree(work, ignore_errors=True)
        return
    work.mkdir(parents=True, exist_ok=True)
    if a.shards_vs_one:
        shards_vs_one(work, a.sizes.split(",")[0], a.shards_vs_one, a.num_proc, a.queries)
        return
    if a.infini_gram:
        print(bench_infini_gram(work / f"c{a.infini_gram}", a.queries))
        return
    docs, names = base_documents() if a.only in (None, "data") else ([], [])
    rows = ["| tokens | shards | build wall | peak RSS (all processes) | index bytes/token | open | "
            f"200-token trace p50 / p95 ({a.queries} queries) | loadavg before -> after |",
            "|---|---|---|---|---|---|---|---|"]
    for size in a.sizes.split(","):
        d, load0 = work / f"c{size}", open("/proc/loadavg").read().split()[0]
        if a.only in (None, "data"):
            make_corpus(d, parse_size(size), docs, names)
        n = int(json.loads((d / "meta.json").read_text())["train_tokens"])
        build_s = peak = None
        if a.only in (None, "build"):
            cmd = [sys.executable, "-m", "glassgpt.cli", "trace-spans", "--build", f"--data_dir={d}",
                   f"--max_memory={a.max_memory}", f"--num_proc={a.num_proc}"]
            build_s, peak, rc = run_measured(cmd, work / f"build-{size}.log")
            if rc:
                raise SystemExit(f"build of {d} failed; see {work}/build-{size}.log")
            print(json.dumps({"size": size, "build_s": build_s, "peak_rss": peak}), flush=True)
        q = {}
        if a.only in (None, "query"):
            child = QUERY_CHILD.format(repo=str(REPO), data=str(d), n_queries=a.queries)
            out = subprocess.run([sys.executable, "-c", child], check=True, capture_output=True, text=True).stdout
            q = json.loads(out.strip().splitlines()[-1])
            print(json.dumps({"size": size, **q}), flush=True)
        load1 = open("/proc/loadavg").read().split()[0]
        rows.append(f"| {n:,} | {q.get('shards', '?')} | {f'{build_s:.0f} s' if build_s else '-'} | "
                    f"{f'{peak / 2**30:.2f} GiB' if peak else '-'} | {index_bytes(d / 'spans') / n:.2f} | "
                    f"{q.get('open_s', 0):.2f} s | {q.get('p50_ms', 0):.1f} / {q.get('p95_ms', 0):.1f} ms | "
                    f"{load0} -> {load1} |")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
