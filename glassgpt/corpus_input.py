"""Reading a corpus for `glassgpt prepare corpus`: its configuration, the documents of local files (text,
JSON Lines, folders) and of Hugging Face datasets, and their tokenization in worker processes, in order.
glassgpt/prepare.py drives these and writes the dataset."""

from __future__ import annotations

import json
import multiprocessing
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from glassgpt.bpe import BPETokenizer
from glassgpt.corpus import check_uint16
from glassgpt.errors import UserError
from glassgpt.own_text import LOCAL_SUFFIXES, looks_like_path, read_text_exact
from glassgpt.tokenizer import CharTokenizer, GPT2Tokenizer

JSONL_SUFFIXES = (".jsonl", ".json")  # a named .json file is read as JSON Lines too


@dataclass
class CorpusConfig:
    """`prepare corpus` (and `prepare openwebtext`): many documents, split into train/val by document."""

    input: str | None = None
    """A Hugging Face dataset name, or local .txt files (one document each), .jsonl files (one
    {"text": ..., "id": ...} document a line), or directories of them; several separated by commas."""
    out_dir: str | None = None
    """Where to write; default data/<name>."""
    tokenizer: str = "gpt2"
    """'gpt2' (GPT-2's BPE), 'bpe' (a byte-level BPE trained on the train documents, saved as
    tokenizer.json; <|endoftext|> after each document for both), 'char' (the corpus's characters), or a
    path whose tokenizer to reuse (a prepared dataset directory, a run's out_dir, a tokenizer.json): the
    way to prepare new text for finetuning a run."""
    vocab_size: int = 4096
    """--tokenizer=bpe: tokens in the trained vocabulary, <|endoftext|> included (257..65536)."""
    vocab_dir: str | None = None
    """Directory with GPT-2's encoder.json + vocab.bpe when offline (else $GLASSGPT_MIRROR/gpt2, else
    tiktoken's download)."""
    num_proc: int | None = None
    """Tokenizer worker processes (and load_dataset's); default min(8, CPU count). 1 = no workers."""
    val_fraction: float = 0.0005
    """Share of documents held out for val (nanoGPT's test_size), rounded up, at least one."""
    seed: int = 2357
    """Seed of the train/val document split (nanoGPT's)."""
    text_key: str = "text"
    """JSONL / Hugging Face field holding a document's text."""
    id_key: str = "id"
    """JSONL / Hugging Face field holding a document's id (else file:line or name:split:index)."""
    on_bad_line: Literal["stop", "skip"] = "stop"
    """A JSONL line that is not a JSON object with a string text field: 'stop' with an error naming
    file and line, or 'skip' it (and count the skipped lines)."""
    hf_split: str = "train"
    """Hugging Face: the split to load and divide into train/val."""
    batch_chars: int = 1 << 20
    """Characters of text per worker task: bounds memory at ~2 x num_proc tasks in flight."""


@dataclass
class Document:
    id: str
    source: str  # file path, or hf:<name>
    line: int  # line of the source where the document starts (JSONL: its line number)
    text: str
    seg_char: int = 0  # where `text` starts in the document: a part of one text split in two
    seg_line: int = 1

    def record(self, split: str) -> dict:
        return {"id": self.id, "source": self.source, "char_offset": 0, "line": self.line, "split": split}


# ---------------------------------------------------------------- corpus sources


class BadLines:
    """--on_bad_line: stop at the first bad JSONL line, or skip and count them."""

    def __init__(self, mode: str):
        self.mode, self.count, self.first = mode, 0, ""

    def report(self, path: Path, lineno: int, problem: str) -> None:
        where = f"{path}:{lineno}: {problem}"
        if self.mode == "stop":
            raise UserError(f"{where}; fix or remove the line, or pass --on_bad_line=skip")
        self.count += 1
        self.first = self.first or where


def iter_jsonl(path: Path, cfg: CorpusConfig, bad: BadLines) -> Iterator[Document]:
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue  # blank lines (a trailing newline) are not documents
            try:
                obj = json.loads(raw)
            except UnicodeDecodeError as e:
                bad.report(path, lineno, f"not UTF-8 ({e.reason} at byte {e.start})")
                continue
            except json.JSONDecodeError as e:
                bad.report(path, lineno, f"not valid JSON ({e.msg} at column {e.colno})")
                continue
            if not isinstance(obj, dict) or not isinstance(obj.get(cfg.text_key), str):
                what = f"a JSON {type(obj).__name__}" if not isinstance(obj, dict) else \
                    f"an object without a string {cfg.text_key!r} field"
                bad.report(path, lineno, f"{what}, expected {{\"{cfg.text_key}\": \"...\"}}")
                continue
            doc_id = obj.get(cfg.id_key)
            yield Document(str(doc_id) if doc_id is not None else f"{path.name}:{lineno}", str(path), lineno,
                           obj[cfg.text_key])


def local_files(spec: str) -> list[tuple[Path, str]] | None:
    """(file, name) for each file `--input` names when it is local: a file (named by its file name),
    a directory (its .txt/.jsonl files, recursively, sorted, named by their path inside it), or several
    of those separated by commas. None when it is no path at all (a Hugging Face dataset name)."""
    parts = [p.strip() for p in spec.split(",") if p.strip()]
    files: list[tuple[Path, str]] = []
    for part in parts:
        p = Path(part).expanduser()
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in LOCAL_SUFFIXES)
            files += [(f, str(f.relative_to(p))) for f in found]
        elif p.exists():
            files.append((p, p.name))
        elif len(parts) == 1 and not looks_like_path(part):
            return None
        else:
            raise UserError(f"input {part} does not exist; give an existing .txt/.jsonl file or directory")
    return files


class LocalSource:
    """Local .txt (one document per file) and .jsonl (one document per line) files, in order."""

    def __init__(self, files: list[tuple[Path, str]], cfg: CorpusConfig):
        self.files, self.cfg = files, cfg

    def documents(self, bad: BadLines) -> Iterator[Document]:
        for path, name in self.files:
            if path.suffix in JSONL_SUFFIXES:
                yield from iter_jsonl(path, self.cfg, bad)
            else:
                yield Document(name, str(path), 1, read_text_exact(path))


def load_hf_splits(cfg: CorpusConfig, num_proc: int) -> dict[str, Any]:
    """nanoGPT's openwebtext recipe for any hub dataset: load, then train_test_split(test_size, seed)."""
    try:
        import datasets  # optional: pip install 'glassgpt[hf]'
    except ImportError:
        raise UserError(f"input {cfg.input!r} is not a local file or directory, and loading it as a Hugging "
                        "Face dataset needs the `datasets` package (pip install datasets); check the path") from None
    try:
        ds = datasets.load_dataset(cfg.input, num_proc=num_proc)
    except Exception as e:  # unknown names, no network, gated sets: many exception types, one answer
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise UserError(f"unknown dataset {cfg.input!r}: not a local path, and Hugging Face could not load it "
                        f"({first}); check the name, or give a .txt/.jsonl path") from None
    if cfg.hf_split not in ds:
        raise UserError(f"dataset {cfg.input!r} has no split {cfg.hf_split!r} (it has {', '.join(ds)}); "
                        "pass --hf_split=NAME")
    split = ds[cfg.hf_split].train_test_split(test_size=cfg.val_fraction, seed=cfg.seed, shuffle=True)
    return {"train": split["train"], "val": split["test"]}  # nanoGPT renames 'test' to 'val'


def iter_hf(dataset: Any, split: str, cfg: CorpusConfig) -> Iterator[Document]:
    if cfg.text_key not in dataset.column_names:
        raise UserError(f"dataset {cfg.input!r} has no {cfg.text_key!r} column (it has "
                        f"{', '.join(dataset.column_names)}); pass --text_key=NAME")
    has_id = cfg.id_key in dataset.column_names
    i = 0
    for batch in dataset.iter(batch_size=1000):
        for j, text in enumerate(batch[cfg.text_key]):
            doc_id = batch[cfg.id_key][j] if has_id else f"{cfg.input}:{split}:{i}"
            yield Document(str(doc_id), f"hf:{cfg.input}", 1, text or "")
            i += 1


# ---------------------------------------------------------------- parallel tokenization

_worker_encode: Callable[[str], np.ndarray] | None = None


def make_encoder(spec: tuple[str, str | None]) -> Callable[[str], np.ndarray]:
    """('gpt2', vocab_dir) / ('bpe', tokens as JSON): BPE ids of a document + <|endoftext|>;
    ('char', chars): ids of its characters."""
    kind, arg = spec
    if kind in ("gpt2", "bpe"):
        tok = GPT2Tokenizer(arg) if kind == "gpt2" else BPETokenizer.from_meta({"bpe": json.loads(arg or "")})
        eot = tok.eot_token
        return lambda text: check_uint16(np.array(tok.encode_ordinary(text) + [eot], dtype=np.int64))
    chars = CharTokenizer.from_text(arg or "")
    return lambda text: check_uint16(chars.encode_array(text))


def _init_worker(spec: tuple[str, str | None]) -> None:
    global _worker_encode
    _worker_encode = make_encoder(spec)


def _encode_batch(texts: list[str]) -> list[np.ndarray]:
    assert _worker_encode is not None, "_init_worker did not run"
    return [_worker_encode(t) for t in texts]


def batched(docs: Iterable[tuple[str, Document]], batch_chars: int) -> Iterator[list[tuple[str, Document]]]:
    batch: list[tuple[str, Document]] = []
    size = 0
    for item in docs:
        batch.append(item)
        size += len(item[1].text)
        if size >= batch_chars:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def tokenize_in_order(batches: Iterable[list[tuple[str, Document]]], spec: tuple[str, str | None],
                      num_proc: int) -> Iterator[tuple[str, Document, np.ndarray]]:
    """(split, document, uint16 ids) in input order. Workers get at most 2 x num_proc batches ahead
    (Pool.imap would read the whole input into its queue); num_proc=1 tokenizes in this process."""
    if num_proc == 1:
        _init_worker(spec)
        for batch in batches:
            encoded = _encode_batch([d.text for _, d in batch])
            yield from ((s, d, ids) for (s, d), ids in zip(batch, encoded, strict=True))
        return
    with multiprocessing.get_context().Pool(num_proc, _init_worker, (spec,)) as pool:
        pending: deque = deque()
        for batch in batches:
            pending.append((batch, pool.apply_async(_encode_batch, ([d.text for _, d in batch],))))
            while len(pending) > 2 * num_proc or (pending and pending[0][1].ready()):
                done, result = pending.popleft()
                yield from ((s, d, ids) for (s, d), ids in zip(done, result.get(), strict=False))
        while pending:
            done, result = pending.popleft()
            yield from ((s, d, ids) for (s, d), ids in zip(done, result.get(), strict=False))


class SplitWriter:
    """Appends documents' tokens to one split's .bin file and keeps its segment table."""

    def __init__(self, path: Path):
        self.file = open(path, "wb")
        self.n_tokens = 0
        self.segments: list[list[int]] = []

    def append(self, doc_index: int, ids: np.ndarray, char_start: int = 0, line_start: int = 1) -> None:
        ids.tofile(self.file)
        self.segments.append([doc_index, self.n_tokens, self.n_tokens + len(ids), char_start, line_start])
        self.n_tokens += len(ids)

    def close(self) -> None:
        self.file.close()
