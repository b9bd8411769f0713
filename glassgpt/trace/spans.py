"""Verbatim spans of a generation found in the training data, OLMoTrace-style, exact and fast.

`trace_text` / `explain` trace a text over a span index, and `main` is `glassgpt trace-spans`. The
parts it stands on: suffix_array.py (suffix arrays and the vectorised searches), span_rules.py
(OLMoTrace's rules: where a span may start and end, which are kept) and span_index.py (the sharded
index on disk). Run it:

    glassgpt trace-spans --build --data_dir=data/shakespeare_char          (once)
    glassgpt trace-spans --out_dir=out-shakespeare-char --start="ROMEO:" [--json]
    glassgpt trace-spans --data_dir=data/shakespeare_char --text=FILE:story.txt | --locate="First Citizen:"

docs/spans.md has the details and the measurements.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from glassgpt.config import load_config, read_text_arg, wants_help
from glassgpt.errors import UserError
from glassgpt.sampling import SamplingSettings
from glassgpt.trace.span_index import SpanIndex, build_index
from glassgpt.trace.span_rules import Span, count_words, maximal_spans, merge_ranges, select_spans, token_rules, trim

# ---------------------------------------------------------------- tracing a text

@dataclass
class Trace:
    text: str  # prompt + generation
    generation_start: int  # char offset where the generation begins in `text`
    spans: list[Span]  # the kept (rarest) spans, in text order
    highlights: list[tuple[int, int]]  # merged char ranges of the kept spans
    coverage: float  # fraction of traced tokens inside an occurring span of >= coverage_n tokens
    coverage_n: int
    n_maximal: int  # maximal spans before the density cut
    n_tokens: int  # tokens traced

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def token_offsets(tokenizer, ids: Sequence[int]) -> tuple[str, list[int]]:
    """(decoded text, char offset of each token + the end): exact for char and GPT-2 BPE."""
    ids = [int(i) for i in ids]
    if getattr(tokenizer, "name", "") == "char":
        return tokenizer.decode(ids), list(range(len(ids) + 1))
    enc = getattr(tokenizer, "enc", None)
    if enc is not None and hasattr(enc, "decode_with_offsets"):
        try:
            text, offs = enc.decode_with_offsets(ids)
            return text, list(offs) + [len(text)]
        except UnicodeDecodeError:  # bytes that are no UTF-8 (a generation cut mid-character): generic path
            pass
    offs = [len(tokenizer.decode(ids[:k])) for k in range(len(ids) + 1)]  # generic, quadratic
    return tokenizer.decode(ids), offs


def encode_text(index: SpanIndex, text: str) -> tuple[list[int], str, list[int]]:
    """(ids, text, offsets) of a given text. For char data, characters the data never had become the
    separator id (they cannot match) instead of an error: they are simply never part of a span."""
    tok = index.tokenizer
    if getattr(tok, "name", "") == "char":
        stoi: dict[str, int] = getattr(tok, "stoi", {})
        return [stoi.get(c, index.separator) for c in text], text, list(range(len(text) + 1))
    ids = tok.encode(text)
    return (ids, *token_offsets(tok, ids))


def find_spans(index: SpanIndex, ids: Sequence[int], text: str, offsets: Sequence[int], first: int = 0,
               min_len: int = 1, min_words: int = 1) -> tuple[list[Span], list]:
    """All maximal self-contained spans of ids[first:] found in the index, >= min_len tokens and
    >= min_words words, with their occurrence counts and rarity, and per span its (shard, lo, hi)
    suffix-array ranges (for sources)."""
    ms, per_shard = index.matching_statistics(ids, first)
    start_ok, end_ok, breaks = token_rules(text, offsets)
    spans = []
    for a, e in maximal_spans(ms, start_ok, end_ok, breaks, first):
        ca, cb = trim(text, offsets[a], offsets[e])
        if e - a >= min_len and count_words(text[ca:cb]) >= min_words:
            spans.append(Span(a, e, ca, cb, text[ca:cb], logprob=float(index.logp[np.asarray(ids[a:e])].sum())))
    ranges = index.ranges([list(ids[s.start:s.end]) for s in spans], [s.start for s in spans], per_shard)
    for s, r in zip(spans, ranges, strict=False):
        s.count = sum(hi - lo for _, lo, hi in r)
    return spans, ranges


def trace_text(index: SpanIndex, ids: Sequence[int], prompt_len: int = 0, include_prompt: bool = False,
               min_len: int = 1, min_words: int = 1, density: float = 0.05, max_sources: int = 10,
               context: int = 32, coverage_n: int | None = None, text: str | None = None,
               offsets: Sequence[int] | None = None, seed: int = 0) -> Trace:
    """Spans, rarest-first selection, highlights, sources and coverage for one tokenized text
    (`text`/`offsets`: its characters and each token's char offset, when not just decode(ids)).
    Sources are a seeded sample of up to max_sources occurrences over all shards."""
    ids = [int(i) for i in ids]
    if text is None or offsets is None:
        text, offsets = token_offsets(index.tokenizer, ids)
    first = 0 if include_prompt else prompt_len
    n = len(ids) - first
    if n <= 0 or not text[offsets[first]:].strip():
        raise UserError("nothing to trace: the generation is empty; give --text=... or a prompt with "
                        "--max_new_tokens > 0")
    if min_len > n:
        raise UserError(f"min_len={min_len} is longer than the text to trace ({n} tokens); lower --min_len")
    coverage_n = min_len if coverage_n is None else coverage_n
    found, ranges = find_spans(index, ids, text, offsets, first, min(min_len, coverage_n), min_words)
    covered = np.zeros(len(ids), dtype=bool)
    for s in found:
        if s.end - s.start >= coverage_n:
            covered[s.start:s.end] = True
    long_enough = [i for i, s in enumerate(found) if s.end - s.start >= min_len]
    spans = [found[i] for i in long_enough]
    keep = select_spans(spans, n, density)
    where = {id(found[i]): ranges[i] for i in long_enough}
    for s in keep:
        pos = index.sample_positions(where[id(s)], max_sources, seed)
        s.sources = [index.source(int(p), s.end - s.start, context) for p in pos]
    return Trace(text=text, generation_start=offsets[prompt_len], spans=keep,
                 highlights=merge_ranges([(s.char_start, s.char_end) for s in keep]),
                 coverage=float(covered[first:].mean()), coverage_n=coverage_n, n_maximal=len(spans),
                 n_tokens=n)


# ---------------------------------------------------------------- command line


@dataclass
class TraceSpansConfig(SamplingSettings):
    """`glassgpt trace-spans`: verbatim spans of a generation in the training data."""

    out_dir: str = "out"
    """Checkpoint directory to generate with (and to find the training data from)."""
    ckpt_iter: str | None = None
    """Open out_dir/ckpt-<iter>.pt kept by train.py --keep_every (or 'best': ckpt-best.pt) instead of ckpt.pt."""
    data_dir: str | None = None
    """Prepared training data; default: the checkpoint's own (its config's data_dir or data/<dataset>)."""
    index_dir: str | None = None
    """Where the span index lives; default <data_dir>/spans."""
    split: Literal["train", "val"] = "train"
    build: bool = False
    """(Re)build the span index first (shards already built from the same data are kept); with no
    --start/--text, only build."""
    max_memory: str = "4G"
    """Memory budget of a build, all worker processes together: sets the shard size (~24 bytes/token)."""
    num_proc: int = 1
    """Worker processes building shards in parallel."""
    start: str | None = None
    """Prompt to generate from (FILE:path reads a file); default '\\n'."""
    text: str | None = None
    """Trace this text instead of generating (FILE:path reads a file)."""
    locate: str | None = None
    """Only count this exact text in the data and list up to max_sources of its locations (FILE:path reads a
    file). BPE matches tokens: ' the state' (leading space) is the mid-sentence form, 'the state' is not."""
    device: str = "auto"
    include_prompt: bool = False
    """Trace the prompt too."""
    min_len: int | None = None
    """Shortest span in tokens (characters for char data); default 12 for char data, 4 for BPE."""
    min_words: int = 1
    """Shortest span in whole words."""
    density: float = 0.05
    """Keep the rarest ceil(density x tokens) spans (OLMoTrace's default 0.05)."""
    max_sources: int = 10
    """Source locations listed per span."""
    context: int = 32
    """Tokens of context each side of a source."""
    coverage_n: int | None = None
    """Coverage counts spans of at least this many tokens; default min_len."""
    sample_seed: int = 0
    """Seed of the sample of sources drawn when a span occurs more than max_sources times."""
    json: bool = False
    """Print JSON instead of highlighted text."""
    vocab_dir: str | None = None


def generate_ids(cfg: TraceSpansConfig, prompt: str, index: SpanIndex, run=None) -> tuple[list[int], int]:
    """(prompt + generated ids, prompt length) from the checkpoint in cfg.out_dir, generated as sample.py
    generates (glassgpt.sampling.generate_from)."""
    from glassgpt.run import open_run
    from glassgpt.sampling import generate_from

    run = run or open_run(cfg.out_dir, ckpt_iter=cfg.ckpt_iter, device=cfg.device,
                          data_dir=cfg.data_dir, vocab_dir=cfg.vocab_dir)
    model, tok = run.model, run.tokenizer
    data_tok = index.tokenizer
    if (getattr(tok, "name", ""), getattr(tok, "stoi", None)) != (getattr(data_tok, "name", ""),
                                                                  getattr(data_tok, "stoi", None)):
        raise UserError(f"the checkpoint in {cfg.out_dir} and the data in {index.data_dir} use different tokenizers; "
                        "point --data_dir at the data the model was trained on")
    g = generate_from(model, tok, prompt, cfg)
    return g.prompt_ids + g.outputs[0], len(g.prompt_ids)


def render(trace: dict[str, Any], color: bool) -> str:
    """The text with highlights ([brackets] or ANSI), then each kept span's sources."""
    on, off = ("\x1b[1;33m", "\x1b[0m") if color else ("[", "]")
    text, parts, prev = trace["text"], [], 0
    for a, b in trace["highlights"]:
        parts += [text[prev:a], on, text[a:b], off]
        prev = b
    parts.append(text[prev:])
    lines = ["".join(parts), "",
             f"{len(trace['spans'])} span(s) shown of {trace['n_maximal']} maximal; coverage "
             f"{trace['coverage']:.1%} of {trace['n_tokens']} tokens by spans of >= {trace['coverage_n']} tokens"]

    def flat(s: str) -> str:
        return s.replace("\n", " / ")

    for s in trace["spans"]:
        lines.append(f"\n{on}{s['text']}{off}  chars {s['char_start']}-{s['char_end']}, {s['count']} occurrence(s), "
                     f"log p {s['logprob']:.1f}")
        for src in s["sources"]:
            t = src["text"]
            core = t.strip()
            lead, trail = t[:len(t) - len(t.lstrip())], t[len(t.rstrip()):]  # BPE: " mind" -> ' ' + [mind]
            lines.append(f"  {src['doc_id']} line {src['line']} (tokens {src['token_start']}-{src['token_end']}): "
                         f"...{flat(src['context_before'] + lead)}{on}{flat(core)}{off}"
                         f"{flat(trail + src['context_after'])}...")
    return "\n".join(lines)


def locate_main(index: SpanIndex, text: str, cfg: TraceSpansConfig) -> None:
    """`--locate=TEXT`: its occurrence count and up to max_sources locations."""
    ids, _, _ = encode_text(index, text)
    if not ids:
        raise UserError("nothing to locate: --locate is empty")
    count, sources = index.locate(ids, cfg.max_sources, cfg.context, cfg.sample_seed)
    if cfg.json:
        print(json.dumps({"text": text, "count": count, "sources": sources}, ensure_ascii=False, indent=1))
        return
    print(f"{text!r}: {count} occurrence(s) in {index.data_dir}/{index.split}.bin" + (":" if sources else ""))
    for src in sources:
        where = f"{src['doc_id']} line {src['line']}, char {src['char_offset']} (tokens {src['token_start']}-" \
                f"{src['token_end']})"
        print(f"  {where}: ...{src['context_before']}[{src['text']}]{src['context_after']}...".replace("\n", " / "))


def open_index(data_dir: str | Path, index_dir: str | Path | None = None, split: str = "train") -> SpanIndex:
    """The span index of a prepared dataset; a UserError naming the build command when it is missing,
    stale or damaged."""
    return SpanIndex(data_dir, index_dir, split)


def trace_dict(index: SpanIndex, ids: Sequence[int], prompt_len: int, text: str, offsets: Sequence[int], *,
               include_prompt: bool = False, min_len: int | None = None, min_words: int = 1, density: float = 0.05,
               max_sources: int = 10, context: int = 32, coverage_n: int | None = None,
               seed: int = 0) -> dict[str, Any]:
    """trace_text with the command's defaults and checks, as the JSON-ready dict `--json` prints."""
    min_len = min_len if min_len is not None else (12 if index.is_char else 4)
    if min_len < 1 or not 0 < density <= 1:
        raise UserError(f"--min_len must be >= 1 and --density in (0, 1], got {min_len} and {density}")
    return trace_text(index, ids, prompt_len, include_prompt, min_len, min_words, density, max_sources, context,
                      coverage_n, text, offsets, seed).to_dict()


def explain(index: SpanIndex, text: str, **opts: Any) -> dict[str, Any]:
    """The spans of `text` in the index: exactly what `trace-spans --text=... --json` prints (and the
    viewer returns). `opts`: trace_dict's keywords."""
    ids, text, offsets = encode_text(index, text)
    return trace_dict(index, ids, 0, text, offsets, **opts)


def main(argv: list[str] | None = None) -> dict | None:
    if wants_help(TraceSpansConfig, argv, "glassgpt trace-spans"):
        return None
    cfg = load_config(TraceSpansConfig, argv)
    run = None
    if cfg.data_dir is None:  # the checkpoint's own training data (glassgpt.run); a query on --data_dir needs no torch
        from glassgpt.run import open_run

        run = open_run(cfg.out_dir, ckpt_iter=cfg.ckpt_iter, device=cfg.device, vocab_dir=cfg.vocab_dir)
        if run.data_dir is None:
            raise UserError(f"the checkpoint in {cfg.out_dir} does not name its training data; pass --data_dir=...")
    data_dir = Path(cfg.data_dir) if cfg.data_dir else run.data_dir if run is not None else None
    assert data_dir is not None
    if cfg.build:
        build_index(data_dir, cfg.index_dir, cfg.split, cfg.max_memory, cfg.num_proc,
                    lambda m: print(m, file=sys.stderr))
        if cfg.start is None and cfg.text is None and cfg.locate is None:
            return None
    index = open_index(data_dir, cfg.index_dir, cfg.split)
    if cfg.locate is not None:
        locate_main(index, read_text_arg(cfg.locate, "locate"), cfg)
        return None
    opts: dict[str, Any] = dict(min_len=cfg.min_len, min_words=cfg.min_words, density=cfg.density,
                                max_sources=cfg.max_sources, context=cfg.context, coverage_n=cfg.coverage_n,
                                seed=cfg.sample_seed)
    if cfg.text is not None:
        out = explain(index, read_text_arg(cfg.text), **opts)
    else:
        prompt = read_text_arg(cfg.start if cfg.start is not None else "\n", "start")
        ids, prompt_len = generate_ids(cfg, prompt, index, run)
        out = trace_dict(index, ids, prompt_len, *token_offsets(index.tokenizer, ids),
                         include_prompt=cfg.include_prompt, **opts)
    print(json.dumps(out, ensure_ascii=False, indent=1) if cfg.json else render(out, color=sys.stdout.isatty()))
    return out


if __name__ == "__main__":
    from glassgpt.errors import run_main

    sys.exit(run_main(main))

