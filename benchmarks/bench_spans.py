"""Span index benchmarks: build time, spans of a 500-character generation, infini-gram side by side,
scaling 1 MB -> 100 MB of tokens, and canary recall of a trained model.

    python -m benchmarks.bench_spans                    # build + query on tiny-shakespeare (+ infini-gram if installed)
    python -m benchmarks.bench_spans --scale            # + build/query at 1, 10, 100 MB of GPT-2 tokens
    python -m benchmarks.bench_spans --canary_dir=/tmp/canary_bench   # + recall on a canary model
                                                        # (python -m benchmarks.canaries trains one)

Prints a markdown section for benchmarks/RESULTS.md. Timings: wall-clock best and median of repeats,
and the median CPU time of this process (what the work costs when other jobs hold the cores); the
machine is shared, so `uptime` is printed next to them.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the old `python benchmarks/bench_spans.py` form

from benchmarks.canaries import write_char_dataset  # noqa: E402
from glassgpt.download import TINYSHAKESPEARE, local_or_fetch  # noqa: E402
from glassgpt.trace import span_index as SI  # noqa: E402
from glassgpt.trace import spans as S  # noqa: E402

MIRROR = Path(os.environ.setdefault("GLASSGPT_MIRROR", str(REPO.parent / "shared" / "data")))


def timed(fn, repeats: int, unit: str = "ms") -> tuple[str, object]:
    """(formatted timing, last result)."""
    wall, cpu, out = [], [], None
    for _ in range(repeats):
        t, c = time.perf_counter(), time.process_time()
        out = fn()
        wall.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    k = 1e3 if unit == "ms" else 1.0
    fmt = "{:.1f}" if unit == "ms" else "{:.2f}"
    return (f"{fmt.format(min(wall) * k)} / {fmt.format(statistics.median(wall) * k)} {unit} | "
            f"{fmt.format(statistics.median(cpu) * k)} {unit}"), out


def sample_generations(text: str, seed: int = 0) -> dict[str, str]:
    """500-character texts: verbatim (worst case: every position matches far), a patchwork of corpus
    pieces (what a char model writes), and random letters (nothing matches)."""
    rng = random.Random(seed)
    patch = ""
    while len(patch) < 500:
        i = rng.randrange(len(text) - 100)
        patch += text[i:i + rng.randint(5, 60)]
    return {"verbatim": text[5000:5500], "patchwork": patch[:500],
            "random": "".join(rng.choice("abcdefghij \n") for _ in range(500))}


# ---------------------------------------------------------------- infini-gram, built from the same tokens


def build_infini_gram(tokens: np.ndarray, segments: np.ndarray, save_dir: Path) -> float:
    """infini-gram's own on-disk format (tokenized.0 = 0xff separator + u8 tokens per document,
    offset.0) and its Rust suffix-array builder; returns the build seconds."""
    import infini_gram

    save_dir.mkdir(parents=True, exist_ok=True)
    data, offsets, pos = bytearray(), [], 0
    for _, s, e, _, _ in segments:
        offsets.append(pos)
        chunk = b"\xff" + np.asarray(tokens[s:e], dtype=np.uint8).tobytes()
        data += chunk
        pos += len(chunk)
    (save_dir / "tokenized.0").write_bytes(bytes(data))
    (save_dir / "offset.0").write_bytes(np.array(offsets, dtype=np.uint64).tobytes())
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "infini_gram.indexing", "--data_dir", str(save_dir), "--save_dir",
                    str(save_dir), "--token_dtype", "u8", "--cpus", "2", "--mem", "4",
                    "--ulimit", str(resource.getrlimit(resource.RLIMIT_NOFILE)[1])],
                   check=True, capture_output=True, cwd=Path(infini_gram.__file__).parent)
    return time.perf_counter() - t


def bench_tiny_shakespeare(work: Path, repeats: int) -> list[str]:
    text = local_or_fetch(TINYSHAKESPEARE, work / "download").read_text()
    data_dir = write_char_dataset(work / "ts_char", text, "tinyshakespeare")
    lines = ["| what | wall best / median | CPU median | notes |", "|---|---|---|---|"]
    t, _ = timed(lambda: SI.build_index(data_dir, log=lambda m: None), repeats)
    n_tok = len(np.fromfile(data_dir / "train.bin", dtype=np.uint16))
    lines.append(f"| index build, tiny-shakespeare char ({n_tok:,} tokens), incl. writing files | "
                 f"{t} | pydivsufsort, 1 byte/token |")
    index = SI.SpanIndex(data_dir)
    t, _ = timed(lambda: SI.SpanIndex(data_dir), repeats)
    lines.append(f"| open index (fingerprint check: sha256 of train.bin + mmap) | {t} | |")
    gens = sample_generations(text)
    for name, g in gens.items():
        ids, t, offs = S.encode_text(index, g)
        S.trace_text(index, ids, min_len=12, text=t, offsets=offs)  # warm caches (Corpus newline table)
        tm, tr = timed(lambda ids=ids, t=t, offs=offs: S.trace_text(index, ids, min_len=12, text=t, offsets=offs),
                       repeats * 5)
        lines.append(f"| spans of a 500-char text, {name} (all steps: spans, counts, 10 sources each, coverage) | "
                     f"{tm} | {len(tr.spans)} spans kept of {tr.n_maximal}, "
                     f"coverage {tr.coverage:.0%} |")
    lines += bench_bpe(work, text, gens, repeats)
    try:
        import infini_gram  # noqa: F401
        from infini_gram.engine import InfiniGramEngine
    except ImportError:
        lines.append("| infini-gram | - | - | not installed (`pip install infini-gram`) |")
        return lines
    from glassgpt.corpus import Corpus

    corpus = Corpus(data_dir)
    ig_dir = work / "ts_infini_gram"
    build_s = build_infini_gram(np.asarray(corpus.tokens("train")), corpus.segments("train"), ig_dir)
    lines.append(f"| infini-gram index build, same tokens (u8) | {build_s * 1e3:.0f} ms (once) | - | Rust indexer, "
                 "2 cpus, incl. its process start |")
    tok = index.tokenizer
    engine = InfiniGramEngine(index_dir=str(ig_dir), eos_token_id=254, vocab_size=255, token_dtype="u8")
    delims = [tok.stoi[c] for c in "\n.!?" if c in tok.stoi]
    for name, g in gens.items():
        ids = tok.encode(g)
        tm, r = timed(lambda ids=ids: engine.attribute(input_ids=ids, delim_ids=delims, min_len=12, max_cnt=10,
                                                       enforce_bow=False), repeats * 5)
        lines.append(f"| infini-gram attribute(), {name} (spans + counts, no sources decoded) | {tm} | "
                     f"{len(r['spans'])} spans |")
    return lines


def bench_bpe(work: Path, text: str, gens: dict[str, str], repeats: int) -> list[str]:
    """The same on tiny-shakespeare as GPT-2 BPE tokens (one document, 90% train as nanoGPT's prepare)."""
    from glassgpt.corpus import write_dataset
    from glassgpt.tokenizer import GPT2Tokenizer

    tok = GPT2Tokenizer(MIRROR / "gpt2")
    n = int(len(text) * 0.9)
    parts = {"train": (text[:n], 0), "val": (text[n:], n)}
    ids = {s: tok.encode_ordinary(p) for s, (p, _) in parts.items()}
    data_dir = write_dataset(work / "ts_bpe", tok.meta(), ids,
                             [{"id": "tinyshakespeare", "source": "input.txt", "char_offset": 0, "line": 1}],
                             segments={s: [[0, 0, len(ids[s]), c, 1 + text.count("\n", 0, c)]]
                                       for s, (_, c) in parts.items()})
    t, _ = timed(lambda: SI.build_index(data_dir, log=lambda m: None), repeats)
    n_tok = len(np.fromfile(data_dir / "train.bin", dtype=np.uint16))
    lines = [f"| index build, tiny-shakespeare GPT-2 BPE ({n_tok:,} tokens), incl. writing files | {t} | "
             "pydivsufsort, 2 bytes/token |"]
    index = SI.SpanIndex(data_dir)
    for name, g in gens.items():
        ids, t, offs = S.encode_text(index, g)
        S.trace_text(index, ids, min_len=4, text=t, offsets=offs)
        tm, tr = timed(lambda ids=ids, t=t, offs=offs: S.trace_text(index, ids, min_len=4, text=t, offsets=offs),
                       repeats * 5)
        lines.append(f"| BPE: spans of the same 500-char text, {name} ({len(ids)} tokens, min_len 4) | {tm} | "
                     f"{len(tr.spans)} spans kept of {tr.n_maximal}, coverage {tr.coverage:.0%} |")
    return lines


# ---------------------------------------------------------------- scaling 1 MB -> 100 MB


SCALE_CHILD = r"""
import json, resource, sys, time, numpy as np
sys.path.insert(0, {repo!r})
from glassgpt.trace import suffix_array as SA
toks = np.load({path!r}, mmap_mode="r")[:{n}]
seg = np.array([[0, 0, len(toks), 0, 1]])
rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t, c = time.perf_counter(), time.process_time()
a = SA.build_span_arrays(np.asarray(toks), seg, separator=50257)
build, build_cpu = time.perf_counter() - t, time.process_time() - c
rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
rng = np.random.default_rng(0)
times = []
for r in range(10):
    i = int(rng.integers(0, len(toks) - 200))
    q = np.concatenate([toks[i:i + 60], rng.integers(0, 50257, 20), toks[i + 500:i + 620]])  # ~200 tokens
    t = time.perf_counter(); SA.matching_statistics(a, q); times.append(time.perf_counter() - t)
print(json.dumps({{"n": len(toks), "build_s": build, "build_cpu_s": build_cpu, "peak_rss_mb": rss1 / 1024,
                  "rss_before_mb": rss0 / 1024,
                  "index_bytes": a.text.nbytes + a.sa.nbytes, "ms_query_ms": 1e3 * min(times),
                  "ms_query_med_ms": 1e3 * sorted(times)[5]}}))
"""


def scale_tokens(work: Path, max_tokens: int) -> Path:
    """GPT-2 tokens of the english corpus (SOTU + Moby-Dick), extended to max_tokens by copies whose ids
    go through a fresh random permutation each: real text statistics, no cross-copy repeats."""

    from glassgpt.tokenizer import GPT2Tokenizer

    path = work / "scale_tokens.npy"
    if path.exists() and len(np.load(path, mmap_mode="r")) >= max_tokens:
        return path
    tok = GPT2Tokenizer(MIRROR / "gpt2")
    docs = [json.loads(line)["text"] for line in (MIRROR / "english" / "sotu_mobydick.jsonl").open()]
    base = np.concatenate([np.array(ids, dtype=np.uint16)
                           for ids in tok.enc.encode_ordinary_batch(docs, num_threads=2)])
    rng = np.random.default_rng(0)
    parts, total = [base], len(base)
    while total < max_tokens:
        parts.append(rng.permutation(50257).astype(np.uint16)[base])
        total += len(base)
    np.save(path, np.concatenate(parts)[:max_tokens])
    return path


def bench_scale(work: Path, sizes_mb: list[int]) -> list[str]:
    path = scale_tokens(work, max(sizes_mb) * (1 << 20) // 2)
    lines = ["| token stream | tokens | build wall (CPU) | build memory: peak RSS - RSS before | index on disk | "
             "matching statistics, 200 tokens (best / median) |", "|---|---|---|---|---|---|"]
    for mb in sizes_mb:
        n = mb * (1 << 20) // 2
        out = subprocess.run([sys.executable, "-c", SCALE_CHILD.format(repo=str(REPO), path=str(path), n=n)],
                             check=True, capture_output=True, text=True).stdout
        r = json.loads(out.strip().splitlines()[-1])
        lines.append(f"| {mb} MB | {r['n']:,} | {r['build_s']:.2f} s ({r['build_cpu_s']:.2f} s) | "
                     f"{r['peak_rss_mb'] - r['rss_before_mb']:.0f} MB "
                     f"({r['peak_rss_mb']:.0f} - {r['rss_before_mb']:.0f}) | "
                     f"{r['index_bytes'] / 2**20:.0f} MB | {r['ms_query_ms']:.1f} / {r['ms_query_med_ms']:.1f} ms |")
    return lines


# ---------------------------------------------------------------- canary recall with a trained model


def bench_canaries(canary_dir: Path, max_new_tokens: int) -> list[str]:
    """Prompt the model with a newline and each canary's first word, greedy-decode, and check that every
    canary it reproduces is traced to all its planted locations (recall must be 1.0). Recall is over
    all maximal spans (density 1); the table also says whether the canary's span survives the default
    density cut (the rarest ceil(0.05 x length) spans)."""
    import torch

    from glassgpt.sampling import complete

    data_dir = canary_dir / "data"
    canaries = json.loads((data_dir / "canaries.json").read_text())["canaries"]
    if not (data_dir / SI.INDEX_DIRNAME / "train.index.json").exists():
        SI.build_index(data_dir, log=lambda m: None)
    index = SI.SpanIndex(data_dir)
    from glassgpt.run import open_run

    opened = open_run(canary_dir / "model")
    model, tok = opened.model, opened.tokenizer
    torch.set_num_threads(2)
    reproduced = found = kept = 0
    rows = []
    for c in canaries:
        prompt = "\n" + c["text"].split(" ")[0]
        comp = complete(model, tok, prompt, max_new_tokens)
        ids = list(comp.prompt_ids) + list(comp.output_ids)
        full = prompt + comp.text
        if c["text"] not in full:
            rows.append(f"| {c['text']} | no: {full.strip().splitlines()[0][:60]!r} | - | - |")
            continue
        reproduced += 1
        tr = S.trace_text(index, ids, len(comp.prompt_ids), include_prompt=True, min_len=12, density=1.0,
                          max_sources=len(c["char_offsets"]) + 5)
        a = full.index(c["text"])
        hit = [s for s in tr.spans if s.char_start <= a and a + len(c["text"]) <= s.char_end]
        shift = a - hit[0].char_start if hit else 0
        offsets = sorted(src["char_offset"] + shift for src in hit[0].sources) if hit else []
        ok = bool(hit) and hit[0].count == len(c["char_offsets"]) and offsets == c["char_offsets"]
        found += ok
        rank = sorted(tr.spans, key=lambda s: (s.logprob, s.start)).index(hit[0]) if hit else None
        survives = rank is not None and rank < np.ceil(0.05 * tr.n_tokens)
        kept += survives
        where = f"all {len(c['char_offsets'])} planted offsets, count {hit[0].count}" if ok else "MISSED"
        rows.append(f"| {c['text']} | yes | {where} | {'yes' if survives else 'no'} (rank {rank}) |")
    recall = found / reproduced if reproduced else float("nan")
    return [f"canary model `{canary_dir / 'model'}`: {reproduced}/{len(canaries)} canaries reproduced verbatim "
            f"(greedy, prompt = newline + first word, {max_new_tokens} new tokens); traced to every planted "
            f"location: {found}/{reproduced} = recall {recall:.2f}; kept at density 0.05: {kept}/{reproduced}", "",
            "| canary | reproduced | traced to | kept at density 0.05 |", "|---|---|---|---|", *rows]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--scale", action="store_true", help="also build at 1, 10, 100 MB of tokens")
    p.add_argument("--sizes_mb", default="1,10,100")
    p.add_argument("--canary_dir", default=None)
    p.add_argument("--max_new_tokens", type=int, default=80)
    p.add_argument("--work", default=None, help="scratch directory (default: a temporary one)")
    p.add_argument("--smoke", action="store_true", help="seconds: one repeat, scale at 1 MB, canary recall on a "
                   "2-iteration canary model (recall is not meaningful there: the model has learned nothing)")
    a = p.parse_args(argv)
    work = Path(a.work or tempfile.mkdtemp(prefix="bench_spans_"))
    if a.smoke:
        from benchmarks.canaries import prepare_canary_dataset, train_canary_model

        a.repeats, a.scale, a.sizes_mb, a.max_new_tokens = 1, True, "1", 16
        data, _ = prepare_canary_dataset(work / "canary", n=2, chars=8000)
        train_canary_model(data, work / "canary" / "model", 2, n_embd=32, block_size=32, batch_size=4, eval_iters=1)
        a.canary_dir = str(work / "canary")
    out = [f"## trace-spans — {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", "",
           f"machine: {os.cpu_count()} CPUs, `uptime`: {os.popen('uptime').read().strip()}", ""]
    out += bench_tiny_shakespeare(work, a.repeats)
    if a.scale:
        out += ["", *bench_scale(work, [int(x) for x in a.sizes_mb.split(",")])]
    if a.canary_dir:
        out += ["", *bench_canaries(Path(a.canary_dir), a.max_new_tokens)]
    out += ["", f"load after: {os.popen('uptime').read().strip()}"]
    print("\n".join(out))


if __name__ == "__main__":
    main()
