"""Dataset preparation: text in, nanoGPT's train.bin / val.bin out, plus the coordinates that point back.

    python data/shakespeare_char/prepare.py [--input=PATH]   # = glassgpt prepare shakespeare_char
    python data/shakespeare/prepare.py                       # tiny-shakespeare in GPT-2 BPE
    glassgpt prepare corpus --input=docs.jsonl --out_dir=data/english [--tokenizer=char] [--num_proc=2]
    glassgpt prepare my.txt --out_dir=data/mine --tokenizer=bpe --vocab_size=2048   # = corpus --input=my.txt
    python data/openwebtext/prepare.py                       # = corpus from the Hugging Face hub

The layout written is glassgpt/corpus.py's. The Shakespeare datasets reproduce nanoGPT exactly: one
text, its first 90% of characters train and the rest val, cutting the one document in two (the val
segment starts mid-file, with its character offset and line). A corpus is split by whole documents:
a seeded random `val_fraction` of them (at least one) goes to val, the rest to train, each split in
source order; every document gets one segment, and GPT-2's `<|endoftext|>` after it. A corpus of
one text (a single .txt file) is split as tiny-shakespeare is, at a line start (glassgpt/own_text.py).
`--tokenizer=bpe --vocab_size=N` trains a byte-level BPE on the train documents (glassgpt/bpe.py)
and saves it as the dataset's tokenizer.json.

Large corpora: documents are read twice (a cheap first pass validates them, counts them for the split
and, for `tokenizer=char`, collects the vocabulary), and the second pass tokenizes them in batches in
`num_proc` worker processes, appending each batch's tokens to the split files as it arrives, so memory
holds a few batches, never the corpus. Results come back in submission order, so the output does not
depend on `num_proc`.

Everything is written into a temporary directory beside out_dir that replaces it in one rename when
all of it is done: a run that fails (bad input, Ctrl-C, kill -9) leaves an older prepared dataset as
it was. meta.json records the dataset's fingerprint, taken once, here.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from glassgpt.artifacts import write_artifact
from glassgpt.bpe import BPETokenizer, train_bpe, write_tokenizer_json
from glassgpt.config import load_config, wants_help
from glassgpt.corpus import check_uint16, finish_dataset, write_dataset, write_segments
from glassgpt.corpus_input import (
    BadLines,
    CorpusConfig,
    Document,
    LocalSource,
    SplitWriter,
    batched,
    iter_hf,
    load_hf_splits,
    local_files,
    tokenize_in_order,
)
from glassgpt.download import TINYSHAKESPEARE, fetch
from glassgpt.errors import UserError
from glassgpt.own_text import (
    ONE_TEXT_VAL,
    default_out_dir,
    encoder_spec,
    line_at,
    looks_like_tokenizer_path,
    one_text_cut,
    route,
    tokenizer_from_path,
)
from glassgpt.tokenizer import CharTokenizer, GPT2Tokenizer

UINT16_IDS = 1 << 16


@dataclass
class ShakespeareConfig:
    """`prepare shakespeare_char` and `prepare shakespeare`: nanoGPT's 90/10 character split of one text."""

    out_dir: str | None = None
    """Where to write; default data/<name> (the data/*/prepare.py scripts pass their own directory)."""
    input: str | None = None
    """A local text file to prepare instead of tiny-shakespeare (downloaded and sha256-checked, or
    copied from $GLASSGPT_MIRROR)."""
    vocab_dir: str | None = None
    """BPE only: directory with GPT-2's encoder.json + vocab.bpe when offline (else $GLASSGPT_MIRROR/gpt2,
    else tiktoken's download)."""


# ---------------------------------------------------------------- output staging


def staging(out_dir: Path):
    """Everything a prepare writes goes into a fresh directory beside out_dir that replaces it in one
    rename when all of it is done (glassgpt.artifacts.write_artifact); files of the old out_dir that
    are not written anew (prepare.py, input.txt) are carried over."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot write to {out_dir} ({e.strerror}); choose another --out_dir") from None
    for old in out_dir.glob(".prepare-tmp-*"):  # temporaries of glassgpt <= 0.1 lived inside out_dir
        shutil.rmtree(old, ignore_errors=True)
    return write_artifact(out_dir, keep_others=True)


def read_text_file(path: str | Path) -> str:
    path = Path(path)
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"input file {path} does not exist; check the path") from None
    except IsADirectoryError:
        raise UserError(f"{path} is a directory; prepare it with `glassgpt prepare corpus --input={path}`") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}); convert it to UTF-8") from None
    except OSError as e:
        raise UserError(f"cannot read {path} ({e.strerror})") from None


def source_name(src: Path, out_dir: Path) -> str:
    """How documents.json names a source: relative to the dataset directory when inside it (the
    downloaded input.txt), so the dataset can move; else as given."""
    try:
        return str(src.resolve().relative_to(out_dir.resolve()))
    except ValueError:
        return str(src)


def split_record(tokens: int, documents: int, segments: int) -> dict:
    return {"tokens": tokens, "documents": documents, "segments": segments}


# ---------------------------------------------------------------- tiny-shakespeare (nanoGPT)


def prepare_shakespeare(cfg: ShakespeareConfig, name: str = "shakespeare_char") -> dict:
    """nanoGPT's data/shakespeare_char (char) or data/shakespeare (GPT-2 BPE, encode_ordinary, no EOT)."""
    bpe = name == "shakespeare"
    out_dir = Path(cfg.out_dir or Path("data") / name)
    t0 = time.time()
    with staging(out_dir) as tmp:
        if cfg.input:
            src, doc_id = Path(cfg.input), Path(cfg.input).stem
        else:
            src, doc_id = fetch(TINYSHAKESPEARE, out_dir / "input.txt"), "tinyshakespeare"
        text, source = read_text_file(src), source_name(src, out_dir)
        tok = GPT2Tokenizer(cfg.vocab_dir) if bpe else CharTokenizer.from_text(text)
        cut = int(len(text) * 0.9)  # nanoGPT: data[:int(n*0.9)] / data[int(n*0.9):]
        if cut == 0 or cut == len(text):
            raise UserError(f"{src} has {len(text)} characters, too few to split 90/10 into train and val")
        ids, segments, sizes = {}, {}, {}
        for split, part, char_start in (("train", text[:cut], 0), ("val", text[cut:], cut)):
            ids[split] = check_uint16(np.asarray(tok.encode_ordinary(part) if bpe else tok.encode_array(part)),
                                      f" in {src}")
            # the val segment starts mid-document: record where, so locations point into the file
            segments[split] = [[0, 0, len(ids[split]), char_start, 1 + text.count("\n", 0, char_start)]]
            sizes[split] = split_record(len(ids[split]), 1, 1)
        write_dataset(tmp, tok.meta(), ids, [{"id": doc_id, "source": source, "char_offset": 0, "line": 1,
                                              "split": "train,val"}], segments=segments, dataset=name,
                      source=source, train_tokens=sizes["train"]["tokens"], val_tokens=sizes["val"]["tokens"],
                      splits=sizes)
    print(f"{name}: vocab {tok.vocab_size}, train {sizes['train']['tokens']:,} tokens, "
          f"val {sizes['val']['tokens']:,} tokens -> {out_dir} ({time.time() - t0:.1f}s)")
    return {"out_dir": str(out_dir), "vocab_size": tok.vocab_size,
            **{f"{s}_tokens": v["tokens"] for s, v in sizes.items()}}


# ---------------------------------------------------------------- corpus preparation


def choose_val(n_docs: int, val_fraction: float, seed: int) -> np.ndarray:
    """Boolean mask of val documents: ceil(val_fraction * n) of them (as HF's train_test_split),
    at least one, chosen by a seeded permutation, so the split depends only on (n, fraction, seed)."""
    if n_docs < 2:
        raise UserError(f"the corpus has {n_docs} document(s); a document-level train/val split needs at least 2 "
                        "(add files, or prepare one text with `glassgpt prepare shakespeare_char --input=FILE`)")
    n_val = min(n_docs - 1, max(1, math.ceil(val_fraction * n_docs)))
    is_val = np.zeros(n_docs, dtype=bool)
    is_val[np.random.default_rng(seed).permutation(n_docs)[:n_val]] = True
    return is_val


def check_corpus_config(cfg: CorpusConfig) -> int:
    if not cfg.input:
        raise UserError("give the corpus with --input=PATH (a .txt/.jsonl file or directory) "
                        "or a Hugging Face dataset name")
    if cfg.tokenizer not in ("gpt2", "char", "bpe") and not looks_like_tokenizer_path(cfg.tokenizer) \
            and not Path(cfg.tokenizer).exists():
        raise UserError(f"--tokenizer must be 'gpt2', 'bpe', 'char' or a path to reuse a tokenizer from (a prepared "
                        f"dataset directory, a run's out_dir or a tokenizer.json), got {cfg.tokenizer!r}")
    if not 0 < cfg.val_fraction < 1:
        raise UserError(f"--val_fraction must be between 0 and 1, got {cfg.val_fraction}")
    num_proc = cfg.num_proc if cfg.num_proc is not None else min(8, os.cpu_count() or 1)
    if num_proc < 1 or cfg.batch_chars < 1:
        raise UserError("--num_proc and --batch_chars must be at least 1")
    return num_proc


class CorpusDocuments:
    """The corpus's documents with text, as (split, document): local files are read twice (pass 1
    here validates, counts and collects characters; iterating reads them again), a Hugging Face
    dataset once per pass. `n_docs` counts the documents; for HF it starts at the row count and
    rows with empty text are counted out as iteration passes them."""

    def __init__(self, cfg: CorpusConfig, num_proc: int, bad: BadLines):
        self.cfg, self.charset, self.one_text = cfg, set(), False
        files = local_files(cfg.input)  # type: ignore[arg-type]
        self.local = LocalSource(files, cfg) if files is not None else None
        if self.local is not None:
            self.n_docs = 0
            for doc in tqdm(self.local.documents(bad), unit="doc", desc="checking", disable=None, leave=False):
                if doc.text:
                    self.n_docs += 1
                    if cfg.tokenizer == "char":
                        self.charset.update(doc.text)
            self.one_text = self.n_docs == 1  # split by characters, as tiny-shakespeare
            self.is_val = choose_val(self.n_docs, cfg.val_fraction, cfg.seed) if self.n_docs > 1 else None
        else:
            self.hf = load_hf_splits(cfg, num_proc)
            self.n_docs = sum(len(d) for d in self.hf.values())
            if cfg.tokenizer == "char":
                for split, dset in self.hf.items():
                    for doc in iter_hf(dset, split, cfg):
                        self.charset.update(doc.text)

    def __iter__(self) -> Iterator[tuple[str, Document]]:
        if self.local is not None:
            docs = (d for d in self.local.documents(BadLines("skip")) if d.text)
            if self.one_text:
                doc = next(docs)
                if not doc.text.strip():
                    raise UserError(f"{self.cfg.input} holds only whitespace: no document with text to learn from; "
                                    "give a file with text in it")
                cut = one_text_cut(doc.text)
                yield "train", dataclasses.replace(doc, text=doc.text[:cut])
                yield "val", dataclasses.replace(doc, text=doc.text[cut:], seg_char=cut,
                                                 seg_line=line_at(doc.text, cut))
                return
            for i, doc in enumerate(docs):
                if i >= self.n_docs:
                    raise UserError(f"{self.cfg.input} changed while being prepared; run again")
                yield ("val" if self.is_val is not None and self.is_val[i] else "train"), doc
            return
        for split, dset in self.hf.items():
            for d in iter_hf(dset, split, self.cfg):
                if d.text:
                    yield split, d
                else:
                    self.n_docs -= 1


def corpus_tokenizer(cfg: CorpusConfig, docs: CorpusDocuments, charset: set[str]) -> tuple[Any, tuple[str, str | None]]:
    """(tokenizer, spec for the tokenizer workers): the corpus's characters, GPT-2's BPE, or a BPE
    trained here on the train documents, or one reused from a path (--tokenizer=data/english)."""
    reused = tokenizer_from_path(cfg.tokenizer)
    if reused is not None:
        print(f"tokenizing with the {reused.name} tokenizer of {cfg.tokenizer} (vocab {reused.vocab_size})")
        spec = encoder_spec(reused)
        return reused, (spec if spec[0] != "gpt2" else ("gpt2", cfg.vocab_dir))
    if cfg.tokenizer == "char":
        if len(charset) > UINT16_IDS:
            raise UserError(f"the corpus has {len(charset):,} distinct characters, more than the {UINT16_IDS:,} "
                            "token ids uint16 .bin files can hold; use --tokenizer=gpt2 or --tokenizer=bpe")
        chars = "".join(sorted(charset))
        if any(0xD800 <= ord(c) <= 0xDFFF for c in chars):
            raise UserError(f"{cfg.input} has bytes that are not UTF-8, which a char vocabulary cannot store; use "
                            "--tokenizer=bpe or gpt2 (byte-level: kept exactly), or convert the text to UTF-8")
        return CharTokenizer.from_text(chars), ("char", chars)
    if cfg.tokenizer == "bpe":
        t0 = time.time()
        tok = train_bpe((d.text for split, d in docs if split == "train"), cfg.vocab_size)
        fewer = f" (asked for {cfg.vocab_size}: the text has no more pairs to merge)" \
            if tok.vocab_size < cfg.vocab_size else ""
        print(f"trained a {tok.vocab_size}-token byte-level BPE on the train documents{fewer} "
              f"({time.time() - t0:.1f}s)")
        return tok, ("bpe", json.dumps(tok.meta()["bpe"]))
    # fails here, before any work, when the vocabulary is missing
    return GPT2Tokenizer(cfg.vocab_dir), ("gpt2", cfg.vocab_dir)


def prepare_corpus(cfg: CorpusConfig, name: str = "corpus") -> dict:
    """Tokenize a corpus of documents into train.bin / val.bin, split by document; see the module doc."""
    num_proc = check_corpus_config(cfg)
    out_dir = Path(cfg.out_dir or Path("data") / name)
    t0 = time.time()
    bad = BadLines(cfg.on_bad_line)
    docs = CorpusDocuments(cfg, num_proc, bad)
    n_docs, charset = docs.n_docs, docs.charset
    if n_docs == 0:
        raise UserError(f"the corpus {cfg.input} is empty: no documents with text"
                        + (f" ({bad.count} bad lines skipped, first {bad.first})" if bad.count else ""))
    if bad.count:
        print(f"warning: skipped {bad.count} bad JSONL line(s); first: {bad.first}", file=sys.stderr)
    tok, spec = corpus_tokenizer(cfg, docs, charset)

    with staging(out_dir) as tmp:
        writers = {s: SplitWriter(tmp / f"{s}.bin") for s in ("train", "val")}
        documents: list[dict] = []
        bar = tqdm(total=n_docs, unit="doc", desc=f"tokenizing ({num_proc} proc)", disable=None)
        try:
            for split, doc, ids in tokenize_in_order(batched(iter(docs), cfg.batch_chars), spec, num_proc):
                if docs.one_text and split == "val":  # the second part of the one document
                    writers[split].append(0, ids, doc.seg_char, doc.seg_line)
                    documents[0]["split"] = "train,val"
                    continue
                writers[split].append(len(documents), ids)
                documents.append(doc.record(split))
                bar.update(1)
        finally:
            bar.close()
            for w in writers.values():
                w.close()
        # HF rows with empty text were counted out as they passed
        if len(documents) != docs.n_docs and not docs.one_text:
            raise UserError(f"{cfg.input} changed while being prepared; run again")
        sizes = {s: split_record(w.n_tokens, len(w.segments), len(w.segments)) for s, w in writers.items()}
        if not sizes["train"]["tokens"] or not sizes["val"]["tokens"]:
            raise UserError(f"the corpus {cfg.input} gave an empty train or val split; add documents")
        for s, w in writers.items():
            write_segments(tmp, s, w.segments)
        tok_meta = tok.meta()
        if isinstance(tok, BPETokenizer):  # the vocabulary goes in tokenizer.json, not in meta.json
            write_tokenizer_json(tok, tmp / "tokenizer.json")
            tok_meta = {k: v for k, v in tok_meta.items() if k != "bpe"} | {"tokenizer_file": "tokenizer.json"}
        split_rule = ({"by": "characters, at a line start", "val_fraction": ONE_TEXT_VAL} if docs.one_text else
                      {"by": "document", "val_fraction": cfg.val_fraction, "seed": cfg.seed})
        finish_dataset(tmp, tok_meta, documents, dataset=name, source=cfg.input,
                       train_tokens=sizes["train"]["tokens"], val_tokens=sizes["val"]["tokens"], splits=sizes,
                       split=split_rule, skipped_bad_lines=bad.count)
    seconds = time.time() - t0
    total = sizes["train"]["tokens"] + sizes["val"]["tokens"]
    if sizes["val"]["tokens"] <= 1024 and not docs.one_text:
        print(f"warning: val holds only {sizes['val']['tokens']} tokens, fewer than one GPT-2 block (1024 + 1); "
              "for validation at that block_size raise --val_fraction", file=sys.stderr)
    what = "1 text split 90/10 at a line start" if docs.one_text else \
        f"{len(documents):,} documents ({sizes['val']['documents']} val)"
    print(f"{name}: {what}, train {sizes['train']['tokens']:,} tokens, val {sizes['val']['tokens']:,} tokens, "
          f"{tok.name} vocab {tok.vocab_size} -> {out_dir} ({seconds:.1f}s, {total / seconds:,.0f} tokens/s, "
          f"{num_proc} proc)")
    if isinstance(tok, BPETokenizer):
        n_bytes = sum(len(t) for t in tok.tokens)  # a cheap figure to show; bench_tokenizer measures properly
        print(f"tokenizer: byte-level BPE, {tok.vocab_size} tokens (mean token {n_bytes / len(tok.tokens):.1f} bytes), "
              f"saved as {out_dir / 'tokenizer.json'}")
    from glassgpt.advice import suggest

    # the size advice for this machine; a GPU is told apart without importing torch (nvidia-smi on PATH)
    print(suggest(sizes["train"]["tokens"], "cuda" if shutil.which("nvidia-smi") else "cpu"))
    print(f"train on it: glassgpt train --data_dir={out_dir} --out_dir=out-{out_dir.name}")
    return {"out_dir": str(out_dir), "documents": len(documents), "train_tokens": sizes["train"]["tokens"],
            "val_tokens": sizes["val"]["tokens"], "seconds": seconds, "num_proc": num_proc}


# ---------------------------------------------------------------- command line

# name -> (config class, config defaults, preparer)
DATASETS: dict[str, tuple[type, dict, Callable[[Any, str], dict]]] = {
    "shakespeare_char": (ShakespeareConfig, {}, prepare_shakespeare),
    "shakespeare": (ShakespeareConfig, {}, prepare_shakespeare),
    "corpus": (CorpusConfig, {}, prepare_corpus),
    "openwebtext": (CorpusConfig, {"input": "openwebtext"}, prepare_corpus),
}


def usage() -> str:
    return ("usage: glassgpt prepare NAME [config.py ...] [--key=value ...]\n"
            "       glassgpt prepare PATH [--key=value ...]   (= corpus --input=PATH: a .txt, a folder, JSON Lines or "
            "a Hugging Face dataset name)\n\n"
            "NAME: shakespeare_char (char-level, nanoGPT), shakespeare (GPT-2 BPE, nanoGPT), "
            "corpus (--input=.txt/.jsonl files, directories or a Hugging Face dataset), "
            "openwebtext (corpus --input=openwebtext)\n`glassgpt prepare NAME --help` lists its keys.")


def main(argv: list[str] | None = None) -> dict | None:
    """`glassgpt prepare NAME --key=value ...`; the data/*/prepare.py scripts call this too."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return None
    name, rest = argv[0], argv[1:]
    as_input = None if name in DATASETS else route(name, list(DATASETS))
    if as_input is not None:  # `glassgpt prepare my.txt ...` = `glassgpt prepare corpus --input=my.txt ...`
        if not any(a.startswith("--out_dir=") for a in rest):
            rest = [*rest, f"--out_dir={default_out_dir(name)}"]
        name, rest = "corpus", [*as_input, *rest]
    if name not in DATASETS:
        close = difflib.get_close_matches(name, DATASETS, n=1)
        raise UserError(f"unknown dataset {name!r}" + (f"; did you mean {close[0]}?" if close else "")
                        + f"; choose one of {', '.join(DATASETS)}")
    cls, defaults, prepare = DATASETS[name]
    if wants_help(cls, rest, f"glassgpt prepare {name}"):
        return None
    cfg = load_config(cls, rest, base=dataclasses.replace(cls(), **defaults))
    return prepare(cfg, name)


if __name__ == "__main__":
    from glassgpt.errors import run_main

    sys.exit(run_main(main))
