"""The on-disk span index: shards split at document boundaries, built in parallel, memory-mapped.

`build_index` plans shards so each build stays within `max_memory`, builds the stale ones in worker
processes (each shard through `save_artifact`, so a killed build leaves whole shards that a rerun
keeps), then writes the index sidecar last. `SpanIndex` opens it (`open_artifact`: format, data
fingerprint and the data files' size and mtime), checks every array against its sidecar, and answers
across shards: matching statistics are the maximum over shards, counts add up,
sources are a seeded sample of all occurrences. docs/spans.md has the layout and the measurements.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np

from glassgpt.artifacts import (
    ARTIFACTS,
    check_writable,
    open_artifact,
    read_json,
    rebuild_command,
    save_artifact,
    sidecar_dict,
    write_json_atomic,
)
from glassgpt.corpus import Corpus, Location
from glassgpt.errors import UserError
from glassgpt.progress import Progress, ProgressFn
from glassgpt.tokenizer import Tokenizer
from glassgpt.trace import suffix_array as S

INDEX_DIRNAME = "spans"
# Peak bytes per token of one shard build, measured (benchmarks/bench_spans_scale.py): pydivsufsort
# sorts the 2n bytes of the uint16 text into 2n int32 (8n) and keeps the even half (4n), plus the text.
BUILD_BYTES_PER_TOKEN = 24
SHARD_SIDECAR = "shard.json"
MAX_SHARD_TOKENS = (1 << 30) - 1  # 2 bytes per token must stay under libdivsufsort's 2^31-byte limit
SCAN_LIMIT = 1 << 16  # occurrences per shard read when sampling sources (beyond: the first ones)


def default_index_dir(data_dir: str | Path) -> Path:
    return Path(data_dir) / INDEX_DIRNAME


def build_command(data_dir: str | Path, index_dir: str | Path | None = None) -> str:
    custom = index_dir if index_dir and Path(index_dir) != default_index_dir(data_dir) else None
    return rebuild_command("spans", data_dir=data_dir, index_dir=custom)


def parse_bytes(value: str | int) -> int:
    """'8G', '500M', '64k' or a plain number of bytes."""
    s = str(value).strip().upper().removesuffix("B").removesuffix("I")
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}.get(s[-1:], 1)
    try:
        n = int(float(s[:-1] if mult > 1 else s) * mult)
    except ValueError:
        n = 0
    if n <= 0:
        raise UserError(f"--max_memory={value} is not a size; give bytes or e.g. 8G, 500M")
    return n


def plan_shards(segments: np.ndarray, max_tokens: int) -> list[tuple[int, int]]:
    """[seg_lo, seg_hi) ranges of consecutive segments of at most max_tokens tokens (+ separators)
    each; a segment longer than that is a shard by itself (documents are never cut)."""
    sizes = segments[:, 2] - segments[:, 1] + 1
    plan, lo, acc = [], 0, 0
    for i, n in enumerate(sizes.tolist()):
        if acc and acc + n > max_tokens:
            plan.append((lo, i))
            lo, acc = i, 0
        acc += n
    if len(sizes):
        plan.append((lo, len(sizes)))
    return plan


# ---------------------------------------------------------------- building


def build_shard(data_dir: str, split: str, spec: dict[str, Any], shard_dir: str, per_token: np.ndarray,
                data_fp: str, rebuild: str) -> None:
    """Build one shard (in a worker process) and write it with its sidecar in one rename. The sidecar's
    params are the shard's place in the plan; built_from is the data's fingerprint."""
    corpus = Corpus(data_dir)
    tokens = corpus.tokens(split).view(np.ndarray)
    segs = corpus.segments(split)[spec["seg_lo"]:spec["seg_hi"]]
    a = S.build_span_arrays(tokens, segs, spec["separator"], spec["eot_token"])
    checkpoints = S.count_checkpoints(tokens[spec["tok_lo"]:spec["tok_hi"]], per_token)
    with save_artifact(shard_dir, "spans", params=spec, built_from={"data": data_fp}, rebuild=rebuild,
                       sidecar=SHARD_SIDECAR) as w:
        a.text.tofile(w.dir / "tokens.bin")
        a.sa.tofile(w.dir / "sa.bin")
        arrays = {"seps": a.seps, "unigram": a.unigram, "checkpoints": checkpoints, "buckets": a.buckets}
        for name, arr in arrays.items():
            np.save(w.dir / f"{name}.npy", arr)
        w.meta.update(n_text=len(a.text), n_segments=len(a.seps), sa_dtype=str(a.sa.dtype), bucket_k=a.bucket_k)


def _fresh(shard_dir: Path, spec: dict[str, Any], data_fp: str) -> bool:
    """Built from the same data with the same plan, and whole (every array checked as a query would)."""
    try:
        load_shard(shard_dir, spec, data_fp, int(spec["separator"]), "")
    except UserError:
        return False
    return True


def _per_token_counts(corpus: Corpus, vocab: int) -> np.ndarray:
    """(vocab, 2): characters each token id starts, newlines it holds (the one table, glassgpt/corpus.py)."""
    per_token = np.zeros((vocab, 2), dtype=np.int64)
    counts = np.stack(corpus._token_text_counts, axis=1)
    per_token[:min(vocab, len(counts))] = counts[:vocab]
    return per_token


def _build_shards(jobs: list[tuple], sizes: list[int], num_proc: int, progress: Progress) -> None:
    if num_proc == 1 or len(jobs) <= 1:
        for job, n in zip(jobs, sizes, strict=True):
            build_shard(*job)
            progress.update(n)
        return
    # fork: workers share the parent's numpy state and never import torch
    with ProcessPoolExecutor(min(num_proc, len(jobs)), mp_context=get_context("fork")) as pool:
        for _, n in zip(pool.map(build_shard, *zip(*jobs, strict=True)), sizes, strict=True):
            progress.update(n)


def build_index(data_dir: str | Path, index_dir: str | Path | None = None, split: str = "train",
                max_memory: str | int = "4G", num_proc: int = 1, log: Callable[[str], None] = print,
                progress: ProgressFn | None = None) -> Path:
    """Build (or finish building) the sharded span index of a prepared split. Shards already built
    from the same data with the same plan are kept, so an interrupted build resumes. `progress`
    (done, total, what) is called as shards finish, in tokens."""
    data_dir = Path(data_dir)
    index_dir = Path(index_dir) if index_dir else default_index_dir(data_dir)
    if num_proc < 1:
        raise UserError(f"--num_proc must be at least 1, got {num_proc}")
    corpus = Corpus(data_dir)
    built_from, fix = corpus.provenance(), build_command(data_dir, index_dir)  # fingerprint recorded at prepare
    segments, n_tokens = corpus.segments(split), len(corpus.tokens(split))
    vocab = int(corpus.meta.get("vocab_size") or corpus.tokenizer.vocab_size)
    eot = getattr(corpus.tokenizer, "eot_token", None)
    per_shard = min(MAX_SHARD_TOKENS, max(1, parse_bytes(max_memory) // (num_proc * BUILD_BYTES_PER_TOKEN)))
    specs = [{"seg_lo": lo, "seg_hi": hi, "separator": vocab, "eot_token": eot, "tok_lo": int(segments[lo, 1]),
              "tok_hi": int(segments[hi - 1, 2])} for lo, hi in plan_shards(segments, per_shard)]
    names = [f"{split}.shard-{i:05d}" for i in range(len(specs))]
    side = index_dir / f"{split}.index.json"
    check_writable(side)
    side.unlink(missing_ok=True)  # the index is complete again only at the end
    todo = [i for i in range(len(specs)) if not _fresh(index_dir / names[i], specs[i], built_from["data"])]
    log(f"span index of {data_dir}/{split}.bin ({n_tokens:,} tokens) in {index_dir}: {len(specs)} shard(s) "
        f"of <= {per_shard:,} tokens, {len(specs) - len(todo)} already built, {num_proc} process(es)")
    per_token = _per_token_counts(corpus, vocab)
    sizes = [specs[i]["tok_hi"] - specs[i]["tok_lo"] for i in todo]
    jobs = [(str(data_dir), split, specs[i], str(index_dir / names[i]), per_token, built_from["data"], fix)
            for i in todo]
    with Progress(sum(sizes), "span shards", unit="tok", unit_scale=True, callback=progress) as bar:
        _build_shards(jobs, sizes, num_proc, bar)
    for old in index_dir.glob(f"{split}.shard-*"):  # shards of an earlier, longer plan
        if old.name not in names and old.is_dir():
            shutil.rmtree(old)
    np.save(index_dir / f"{split}.token_counts.npy", per_token)
    shards = [{"dir": n, **{k: s[k] for k in ("seg_lo", "seg_hi", "tok_lo", "tok_hi")}}
              for n, s in zip(names, specs, strict=True)]
    write_json_atomic(side, sidecar_dict(
        "spans", params={"split": split, "max_memory": str(max_memory), "num_proc": num_proc},
        built_from=built_from, rebuild=fix, split=split, tokenizer=corpus.meta.get("tokenizer", "gpt2"),
        vocab_size=vocab, separator=vocab, eot_token=eot, n_tokens=n_tokens, n_segments=len(segments), shards=shards))
    log(f"span index built: {len(specs)} shard(s), {len(todo)} built now")
    return index_dir


# ---------------------------------------------------------------- loading, checked against the sidecars


@dataclass
class Shard:
    arrays: S.SpanArrays
    seg_lo: int
    tok_lo: int
    checkpoints: np.ndarray


def _check(cond: bool, what: str, fix: str) -> None:
    if not cond:
        raise UserError(f"the span index is damaged ({what}); rebuild it with `{fix}`")


def _load_npy(path: Path, shape: tuple[int, ...], fix: str) -> np.ndarray:
    try:
        arr = np.load(path, mmap_mode="r").view(np.ndarray)
    except FileNotFoundError:
        raise UserError(f"the span index is incomplete ({path} missing); rebuild it with `{fix}`") from None
    except (ValueError, OSError, EOFError) as e:
        raise UserError(f"the span index is damaged ({path}: {e}); rebuild it with `{fix}`") from None
    _check(arr.shape == shape, f"{path} has shape {arr.shape}, its sidecar says {shape}", fix)
    return arr


def _map(path: Path, dtype: str, n: int, fix: str) -> np.ndarray:
    size = path.stat().st_size if path.exists() else -1
    _check(size == n * np.dtype(dtype).itemsize, f"{path} is {size:,} bytes, its sidecar says "
           f"{n:,} x {dtype}", fix)
    # viewed as a plain ndarray: np.memmap's per-index bookkeeping costs more than the search itself
    return np.memmap(path, dtype=dtype, mode="r").view(np.ndarray) if n else np.zeros(0, dtype)


def load_shard(d: Path, entry: dict[str, Any], data_fp: str, separator: int, fix: str) -> Shard:
    """One shard, every array checked against its sidecar, the sidecar against the index's `entry`."""
    side = read_json(d / SHARD_SIDECAR, default=None, strict=False)
    params = side.get("params") if isinstance(side, dict) else None
    ok = isinstance(side, dict) and isinstance(params, dict) and side.get("format") == ARTIFACTS["spans"].format \
        and all(params.get(k) == entry[k] for k in ("seg_lo", "seg_hi", "tok_lo", "tok_hi")) \
        and (side.get("built_from") or {}).get("data") == data_fp
    _check(ok, f"{d.name} is missing or from another build", fix)
    assert isinstance(side, dict) and isinstance(params, dict)
    n, sep, k = int(side["n_text"]), int(params["separator"]), int(side["bucket_k"])
    _check(side["n_segments"] == entry["seg_hi"] - entry["seg_lo"] and sep == separator,
           f"{d.name}/{SHARD_SIDECAR} disagrees with the index sidecar", fix)
    stride = S.COUNT_STRIDE
    arrays = S.SpanArrays(
        text=_map(d / "tokens.bin", "uint16", n, fix), sa=_map(d / "sa.bin", side["sa_dtype"], n, fix),
        seps=_load_npy(d / "seps.npy", (side["n_segments"],), fix),
        unigram=np.asarray(_load_npy(d / "unigram.npy", (sep,), fix)), separator=sep,
        buckets=np.asarray(_load_npy(d / "buckets.npy", ((sep + 2) ** k + 1,), fix)), bucket_k=k)
    # cheap consistency checks that catch an aligned truncation or a mixed-up file
    _check(arrays.buckets[-1] == n and (n == 0 or arrays.seps[-1] == n - 1), f"{d.name}'s arrays disagree", fix)
    n_tok = entry["tok_hi"] - entry["tok_lo"]
    checkpoints = _load_npy(d / "checkpoints.npy", (-(-n_tok // stride) + 1 if n_tok else 1, 2), fix)
    return Shard(arrays, int(entry["seg_lo"]), int(entry["tok_lo"]), np.asarray(checkpoints))


class SpanIndex:
    """A built span index, memory-mapped, with the corpus it points into."""

    def __init__(self, data_dir: str | Path, index_dir: str | Path | None = None, split: str = "train"):
        self.data_dir = Path(data_dir)
        self.index_dir = Path(index_dir) if index_dir else default_index_dir(self.data_dir)
        self.split = split
        fix = build_command(self.data_dir, self.index_dir)
        self.corpus = Corpus(self.data_dir)
        # fresh = the data fingerprint recorded at prepare time is the one built from (a string compare),
        # and the data files' size and mtime are as they were (else their bytes are re-fingerprinted)
        self.meta = open_artifact(self.index_dir, "spans", rebuild=fix, source=self.corpus,
                                  sidecar=f"{split}.index.json").meta
        self.tokens = self.corpus.tokens(split).view(np.ndarray)
        self.segments = self.corpus.segments(split)
        _check(len(self.tokens) == self.meta["n_tokens"] and len(self.segments) == self.meta["n_segments"],
               f"{split}.bin or {split}.docs.npy differ from the index sidecar", fix)
        data_fp = self.meta["built_from"]["data"]
        self.shards = [load_shard(self.index_dir / e["dir"], e, data_fp, int(self.meta["separator"]), fix)
                       for e in self.meta["shards"]]
        self.stack = S.Stack([s.arrays for s in self.shards])
        self.separator = int(self.meta["separator"])
        self.token_counts = _load_npy(self.index_dir / f"{split}.token_counts.npy", (self.separator, 2), fix)
        unigram = sum((s.arrays.unigram for s in self.shards), np.zeros(self.separator, dtype=np.int64))
        # unigram log-probabilities; +1 keeps unseen ids finite (they are never inside a span anyway)
        self.logp = np.log((unigram + 1) / (max(int(unigram.sum()), 1) + len(unigram)))
        self.is_char = getattr(self.tokenizer, "name", "") == "char"

    @property
    def tokenizer(self) -> Tokenizer:
        return self.corpus.tokenizer

    # -- queries across shards: one search over all of them (suffix_array.Stack), not one per shard
    def matching_statistics(self, ids: Sequence[int],
                            first: int = 0) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray]]:
        """(ms, (ms, lb) per shard): the longest occurring prefix of each ids[i:] is the longest over
        shards, because no match crosses a document and shards end at documents."""
        per = S.matching_statistics(self.stack, ids, first)
        return per[0].max(axis=0, initial=0), per

    def ranges(self, seqs: list[list[int]], starts: Sequence[int], per: tuple) -> list[list[tuple[int, int, int]]]:
        """Per sequence (= ids[start:start+len]), its (shard, lo, hi) suffix-array ranges where it occurs,
        galloping out from matching_statistics' insertion points, in every shard at once."""
        out: list[list[tuple[int, int, int]]] = [[] for _ in seqs]
        ms, lb = per
        at = np.asarray(starts, dtype=np.int64)
        shard, rows = np.nonzero(ms[:, at] >= np.array([len(q) for q in seqs], dtype=np.int64))  # shard-major
        lo, hi = S.sa_range_near(self.stack, [seqs[r] for r in rows], lb[shard, at[rows]], shard)
        for r, j, a, b in zip(rows.tolist(), shard.tolist(), lo.tolist(), hi.tolist(), strict=False):
            out[r].append((j, a, b))
        return out

    def count(self, seq: Sequence[int]) -> int:
        return sum(hi - lo for _, lo, hi in self.full_ranges(seq))

    def full_ranges(self, seq: Sequence[int]) -> list[tuple[int, int, int]]:
        """(shard, lo, hi) of every shard where seq occurs: one search over all shards."""
        lo, hi = S.sa_range(self.stack, [list(seq)])
        return [(j, int(a), int(b)) for j, (a, b) in enumerate(zip(lo[:, 0], hi[:, 0], strict=False)) if b > a]

    def sample_positions(self, ranges: list[tuple[int, int, int]], k: int, seed: int = 0) -> np.ndarray:
        """Split positions of up to k occurrences, ascending: the k with the smallest seeded hash of
        their position, so the sample is uniform over all shards (each contributes in proportion to its
        count) and the same whichever way the split was sharded."""
        parts = [self.split_positions(j, self.shards[j].arrays.sa[lo:min(hi, lo + SCAN_LIMIT)])
                 for j, lo, hi in ranges]
        if not parts or k <= 0:
            return np.zeros(0, dtype=np.int64)
        pos = np.concatenate(parts)
        keep = np.argsort(_mix(pos, seed), kind="stable")[:k]
        return np.sort(pos[keep])

    def split_positions(self, j: int, text_pos: np.ndarray) -> np.ndarray:
        """Positions in shard j's separated text -> positions in the split's token stream."""
        a = self.shards[j].arrays
        p = np.asarray(text_pos, dtype=np.int64)
        seg = np.searchsorted(a.seps, p, side="left")  # the separator ending p's segment
        seg_text_start = np.where(seg > 0, a.seps[np.maximum(seg - 1, 0)] + 1, 0)
        return self.segments[self.shards[j].seg_lo + seg, 1] + p - seg_text_start

    def locate(self, seq: Sequence[int], k: int = 10, context: int = 0, seed: int = 0) -> tuple[int, list[dict]]:
        """(occurrence count, up to k sources: doc, token offsets, char offset, line, text, context)."""
        ranges = self.full_ranges(seq)
        pos = self.sample_positions(ranges, k, seed)
        return sum(hi - lo for _, lo, hi in ranges), [self.source(int(p), len(seq), context) for p in pos]

    def location(self, pos: int, length: int) -> Location:
        """What Corpus.locate returns, from the shard's stored prefix counts: no pass over the document
        before `pos`, however long."""
        i = int(np.searchsorted(self.segments[:, 1], pos, side="right")) - 1
        doc, seg_start, _, char_start, line_start = (int(v) for v in self.segments[i])
        shard = self.shards[int(np.searchsorted([s.seg_lo for s in self.shards], i, side="right")) - 1]
        toks = self.tokens[shard.tok_lo:]
        at = S.prefix_counts(toks, self.token_counts, shard.checkpoints, pos - shard.tok_lo)
        at -= S.prefix_counts(toks, self.token_counts, shard.checkpoints, seg_start - shard.tok_lo)
        d = self.corpus.documents[doc]
        return Location(split=self.split, doc=doc, doc_id=str(d["id"]), source=str(d.get("source", "")),
                        token_start=pos, token_end=pos + length, char_offset=char_start + int(at[0]),
                        line=line_start + int(at[1]), text=self.corpus.decode(self.split, pos, pos + length))

    def source(self, pos: int, length: int, context: int) -> dict[str, Any]:
        """Document, offsets, line and text of an occurrence, plus `context` tokens each side within
        its segment."""
        loc = self.location(pos, length).to_dict()
        i = int(np.searchsorted(self.segments[:, 1], pos, side="right")) - 1
        seg_start, seg_end = int(self.segments[i, 1]), int(self.segments[i, 2])
        loc["context_before"] = self.corpus.decode(self.split, max(seg_start, pos - context), pos)
        loc["context_after"] = self.corpus.decode(self.split, pos + length, min(seg_end, pos + length + context))
        return loc


def _mix(x: np.ndarray, seed: int) -> np.ndarray:
    """splitmix64 of x + seed: a fixed pseudo-random order of positions (uint64 arithmetic wraps)."""
    with np.errstate(over="ignore"):
        z = x.astype(np.uint64) + np.uint64(seed % (1 << 63)) * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))
