"""A prepared dataset on disk and the coordinates that point back into it.

Layout of `data/<dataset>/` (docs/FORMATS.md has the full story):

    train.bin, val.bin        uint16 token ids, one stream per split (nanoGPT's format)
    meta.json                 tokenizer description (+ stoi/itos for char) and split sizes
    documents.json            [{"id", "source", "char_offset", "line", "split"}]: each source document, where
                              it starts in its source file (a JSONL document: the file's line number) and
                              the split(s) holding it
    train.docs.npy, val.docs.npy
                              int64 (n_segments, 5) rows [doc, tok_start, tok_end, char_start, line_start]:
                              tokens [tok_start, tok_end) of the split come from document `doc`, starting
                              at character `char_start` (line `line_start`, 1-based) of that document.

A split may cut a document (tiny-shakespeare's 90/10 split does), so segments, not documents, tile a
split. Every attribution result is resolved here into a `Location`: document id, token range, text,
character offset and line number. `locate` never decodes the text before a position: a char-level
token is one character (lines come from cached newline positions), and for BPE per-token counts of
characters and newlines are summed over the segment's prefix. glassgpt/prepare.py writes this layout.

Here too: THE data-directory rule (`resolve_data_dir`), the files a dataset's fingerprint covers
(`DATA_FILES`), and the data's fingerprint and freshness (`Corpus.fingerprint`, `.provenance()`,
`.stale_reasons()`), which every index built from the data records and checks.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from glassgpt.artifacts import cached_fingerprint, fingerprint_files, write_file_atomic, write_json_atomic
from glassgpt.errors import UserError
from glassgpt.tokenizer import CharTokenizer, Tokenizer, read_meta, tokenizer_from_meta

SEGMENT_COLUMNS = ("doc", "tok_start", "tok_end", "char_start", "line_start")
DATA_FORMAT = "glassgpt-data/1"
# What a prepared dataset's fingerprint covers (meta.json holds it, so it is not among them).
DATA_FILES = ("train.bin", "val.bin", "train.docs.npy", "val.docs.npy", "documents.json", "tokenizer.json")


# ---------------------------------------------------------------- where the data is, and its fingerprint


def resolve_data_dir(config: dict[str, Any] | None = None, data_dir: str | Path | None = None) -> Path | None:
    """THE data-directory rule: an explicit `data_dir` wins; else the training config's `data_dir`;
    else nanoGPT's `data/<dataset>`; None when nothing names one."""
    if data_dir:
        return Path(data_dir)
    cfg = config or {}
    if cfg.get("data_dir"):
        return Path(cfg["data_dir"])
    if cfg.get("dataset"):
        return Path("data") / str(cfg["dataset"])
    return None


def data_files(data_dir: str | Path) -> list[Path]:
    d = Path(data_dir)
    return [d / n for n in DATA_FILES if (d / n).exists()]


def file_stats(files: list[Path]) -> dict[str, list[int]]:
    """{name: [size, mtime_ns]}: what an index records beside the data's fingerprint, so that opening
    it notices a file rewritten in place (same size) without hashing it."""
    return {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in files}


def _no_data(data_dir: str | Path) -> UserError:
    return UserError(f"no prepared data in {data_dir} (train.bin missing); run its prepare script, e.g. "
                     f"`python data/{Path(data_dir).name}/prepare.py`")


def hashed_fingerprint(data_dir: str | Path) -> str:
    """The fingerprint of the data files' bytes as they are now, hashed once per (size, mtime) of
    each file and cached beside train.bin."""
    files = data_files(data_dir)
    if not files:
        raise _no_data(data_dir)
    return cached_fingerprint(files, lambda: fingerprint_files(files, cache=False))


def data_fingerprint_of(data_dir: str | Path, meta: dict | None = None) -> str:
    """The fingerprint prepare recorded in meta.json, when the recorded sizes still match and no data
    file is newer than meta.json; else (nanoGPT data, files replaced by hand) `hashed_fingerprint`."""
    files = data_files(data_dir)
    if not files:
        raise _no_data(data_dir)
    meta = read_meta(data_dir) if meta is None else meta
    recorded, sizes = (meta or {}).get("fingerprint"), (meta or {}).get("files")
    meta_path = Path(data_dir) / "meta.json"
    written = meta_path.stat().st_mtime_ns if meta_path.exists() else -1
    if recorded and sizes == {p.name: p.stat().st_size for p in files} and \
            all(p.stat().st_mtime_ns <= written for p in files):
        return str(recorded)
    return hashed_fingerprint(data_dir)


def open_data(data_dir: str | Path) -> tuple[Corpus, str]:
    """(Corpus, data fingerprint) of a prepared dataset directory."""
    corpus = Corpus(data_dir)
    return corpus, corpus.fingerprint


def data_stale_reasons(data_dir: str | Path | None, built_from: dict[str, Any]) -> list[str]:
    """Why an index built from `built_from` (its "data" fingerprint and "data_files" stats) does not
    fit the data in `data_dir` now ([] = fresh). When a file's size or mtime moved since the build,
    the bytes are re-fingerprinted (cached), so a file rewritten in place with the same size is caught."""
    then, now = built_from.get("data"), None
    if data_dir is not None and data_files(data_dir):
        now = data_fingerprint_of(data_dir)
        if built_from.get("data_files") not in (None, file_stats(data_files(data_dir))):
            now = hashed_fingerprint(data_dir)
    if then is None and now is not None:
        return ["it records no data fingerprint (built by an older glassgpt)"]
    if then != now:
        return [f"the training data changed since it was built ({_short(then)} -> {_short(now)})"]
    return []


def _short(fp: Any) -> str:
    return str(fp)[:15] if fp else "none"


@dataclass
class Location:
    """Where a token range of a split sits in the training data."""

    split: str
    doc: int  # index into documents.json
    doc_id: str
    source: str
    token_start: int  # in the split's token stream (train.bin / val.bin)
    token_end: int
    char_offset: int  # character offset of token_start in the source document
    line: int  # 1-based line of token_start in the source document
    text: str

    def to_dict(self) -> dict:
        return asdict(self)


def write_json(path: str | Path, obj) -> None:
    write_json_atomic(path, obj)


def write_segments(data_dir: str | Path, split: str, segments: np.ndarray | list) -> None:
    seg = np.asarray(segments, dtype=np.int64).reshape(-1, len(SEGMENT_COLUMNS))
    write_file_atomic(Path(data_dir) / f"{split}.docs.npy", lambda f: np.save(f, seg))


def check_uint16(ids: np.ndarray, where: str = "") -> np.ndarray:
    """uint16 storage holds ids < 65536; refuse (rather than wrap) anything larger."""
    ids = np.asarray(ids)
    if ids.size and (ids.max() > 65535 or ids.min() < 0):
        raise UserError(f"token id {int(ids.max())} does not fit uint16 storage{where}; "
                        "this tokenizer's vocabulary is too large for .bin files")
    return ids.astype(np.uint16)


def write_dataset(data_dir: str | Path, tokenizer_meta: dict, tokens: dict[str, Any], documents: list[dict], *,
                  segments: dict[str, Any] | None = None, fingerprint: bool = True, **meta: Any) -> Path:
    """Write a prepared dataset in the layout above: each split's token ids (`tokens[split]`, as uint16
    .bin) and segment table, documents.json, and meta.json (`tokenizer_meta` + format + `meta`). The one
    writer that `prepare`, the tests and the benchmarks use. `segments[split]` defaults to one segment of document
    0 from its first character. With `fingerprint`, meta.json records the data's fingerprint (as
    prepare does); without, it is computed when first read, as for nanoGPT data."""
    d = Path(data_dir)
    d.mkdir(parents=True, exist_ok=True)
    for split, ids in tokens.items():
        check_uint16(np.asarray(ids, dtype=np.int64), f" in split {split}").tofile(d / f"{split}.bin")
        seg = (segments or {}).get(split)
        write_segments(d, split, seg if seg is not None else [[0, 0, len(ids), 0, 1]])
    finish_dataset(d, tokenizer_meta, documents, fingerprint=fingerprint, **meta)
    return d


def finish_dataset(data_dir: str | Path, tokenizer_meta: dict, documents: list[dict], *, fingerprint: bool = True,
                   **meta: Any) -> None:
    """documents.json and meta.json beside splits already written (prepare streams big corpora into
    the .bin files itself); for char data also nanoGPT's meta.pkl, so nanoGPT's sample.py decodes it."""
    import pickle

    d = Path(data_dir)
    write_json(d / "documents.json", documents)
    meta = {**tokenizer_meta, "format": DATA_FORMAT, **meta}
    if fingerprint:  # taken now, once: readers compare strings (and the sizes it covers)
        files = data_files(d)
        meta.update(fingerprint=fingerprint_files(files, cache=False), files={p.name: p.stat().st_size for p in files})
    write_json(d / "meta.json", meta)
    if meta.get("tokenizer") == "char":
        itos = meta["itos"]
        itos = dict(enumerate(itos)) if isinstance(itos, list) else {int(k): v for k, v in itos.items()}
        plain = {"vocab_size": meta["vocab_size"], "stoi": meta["stoi"], "itos": itos}
        write_file_atomic(d / "meta.pkl", pickle.dumps(plain))


class Corpus:
    """Read-only view of a prepared dataset directory: token streams, segments, locations."""

    def __init__(self, data_dir: str | Path):
        self.data_dir = Path(data_dir)
        if not (self.data_dir / "train.bin").exists():
            raise _no_data(self.data_dir)
        self.meta = read_meta(self.data_dir) or {}
        # per split: memmap, segment table, newline positions (char-level); loaded once, on first use
        self._tokens: dict[str, np.memmap] = {}
        self._segments: dict[str, np.ndarray] = {}
        self._newlines: dict[str, np.ndarray] = {}

    @cached_property
    def tokenizer(self) -> Tokenizer:
        return tokenizer_from_meta(self.meta)

    @cached_property
    def fingerprint(self) -> str:
        """The data's fingerprint, recorded when it was prepared (data_fingerprint_of)."""
        return data_fingerprint_of(self.data_dir, self.meta)

    def provenance(self) -> dict[str, Any]:
        """What an index built from this data records as `built_from`."""
        return {"data": self.fingerprint, "data_files": file_stats(data_files(self.data_dir))}

    def stale_reasons(self, built_from: dict[str, Any] | None) -> list[str]:
        return data_stale_reasons(self.data_dir, built_from or {})

    @cached_property
    def documents(self) -> list[dict]:
        p = self.data_dir / "documents.json"
        if p.exists():
            return json.loads(p.read_text())
        return [{"id": self.data_dir.name, "source": "", "char_offset": 0, "line": 1}]

    def tokens(self, split: str) -> np.memmap:
        if split not in self._tokens:
            path = self.data_dir / f"{split}.bin"
            if not path.exists():
                raise UserError(f"{path} is missing; run the dataset's prepare script")
            self._tokens[split] = np.memmap(path, dtype=np.uint16, mode="r")
        return self._tokens[split]

    def segments(self, split: str) -> np.ndarray:
        """(n, 5) int64 segment table; a single whole-split segment for nanoGPT-prepared data."""
        if split not in self._segments:
            p = self.data_dir / f"{split}.docs.npy"
            self._segments[split] = (np.load(p) if p.exists() else
                                     np.array([[0, 0, len(self.tokens(split)), 0, 1]], dtype=np.int64))
        return self._segments[split]

    def segment_of(self, split: str, pos: int) -> np.ndarray:
        seg = self.segments(split)
        i = int(np.searchsorted(seg[:, 1], pos, side="right")) - 1
        if i < 0 or pos >= seg[i, 2] and not (pos == seg[i, 2] == seg[-1, 2]):
            raise IndexError(f"token position {pos} is outside the {split} split")
        return seg[i]

    def decode(self, split: str, start: int, end: int) -> str:
        return self.tokenizer.decode(self.tokens(split)[start:end].tolist())

    @cached_property
    def _char_level(self) -> bool:
        tok = self.tokenizer
        return isinstance(tok, CharTokenizer) and all(len(s) == 1 for s in tok.itos.values())

    @cached_property
    def _token_text_counts(self) -> tuple[np.ndarray, np.ndarray]:
        """Per token id: the characters it starts and the newlines it holds. Summed over the tokens
        before a position they give its character offset and line, without decoding the prefix.
        GPT-2 tokens are byte sequences that may cut a character: a token "starts" a character for
        each byte that is not a UTF-8 continuation byte (0b10xxxxxx)."""
        tok = self.tokenizer
        chars = np.zeros(tok.vocab_size, dtype=np.int64)
        newlines = np.zeros(tok.vocab_size, dtype=np.int64)
        token_bytes = getattr(tok, "token_bytes", None)
        for i in range(tok.vocab_size):
            if token_bytes is not None:
                b = token_bytes(i)
                chars[i] = sum(1 for c in b if c & 0xC0 != 0x80)
                newlines[i] = b.count(b"\n")
            else:
                s = tok.decode([i])
                chars[i], newlines[i] = len(s), s.count("\n")
        return chars, newlines

    def _newline_positions(self, split: str) -> np.ndarray:
        """Sorted token positions of newlines in a char-level split (one token = one character)."""
        if split not in self._newlines:
            nl = self.tokenizer.stoi.get("\n")  # type: ignore[attr-defined]
            self._newlines[split] = (np.flatnonzero(self.tokens(split) == nl) if nl is not None
                                     else np.zeros(0, dtype=np.int64))
        return self._newlines[split]

    def text_counts(self, split: str, start: int, end: int) -> tuple[int, int]:
        """(characters, newlines) in tokens [start, end) of a split. Char-level: the token count and
        a binary search in the cached newline positions; otherwise vectorized per-token counts."""
        if self._char_level:
            nl = self._newline_positions(split)
            return end - start, int(np.searchsorted(nl, end) - np.searchsorted(nl, start))
        chars, newlines = self._token_text_counts
        ids = np.asarray(self.tokens(split)[start:end], dtype=np.int64)
        return int(chars[ids].sum()), int(newlines[ids].sum())

    def locate(self, split: str, token_start: int, token_end: int) -> Location:
        """Resolve a token range of a split to its document, character offset, line and text."""
        doc, seg_start, _, char_start, line_start = (int(v) for v in self.segment_of(split, token_start))
        n_chars, n_newlines = self.text_counts(split, seg_start, token_start)
        d = self.documents[doc]
        return Location(
            split=split, doc=doc, doc_id=str(d["id"]), source=str(d.get("source", "")),
            token_start=int(token_start), token_end=int(token_end),
            char_offset=char_start + n_chars, line=line_start + n_newlines,
            text=self.decode(split, token_start, token_end),
        )
