"""Tokenizers: character-level (a vocabulary from the data), GPT-2 BPE (tiktoken), and a byte-level
BPE trained on the dataset (glassgpt/bpe.py, saved as the dataset's tokenizer.json).

Both map text <-> lists of ints and say how to describe themselves in a dataset's meta.json, so a
checkpoint or a prepared dataset can rebuild the exact tokenizer later. nanoGPT's `meta.pkl` is read
with a restricted unpickler that admits only plain dicts, lists, strings and numbers.
"""

from __future__ import annotations

import io
import json
import os
import pickle
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Protocol

import numpy as np

from glassgpt.bpe import encode_escaped
from glassgpt.download import GPT2_ENCODER_JSON, GPT2_VOCAB_BPE, MIRROR_ENV, mirror_dir, sha256_file
from glassgpt.errors import UserError

GPT2_EOT = 50256
# GPT-2's pre-tokenizer split pattern (tiktoken's r50k_pat_str).
GPT2_PAT = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


class Tokenizer(Protocol):
    name: str
    vocab_size: int

    @property
    def eot_token(self) -> int | None: ...

    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: list[int]) -> str: ...
    def meta(self) -> dict: ...


class CharTokenizer:
    """One token per character, over the characters seen in the training text."""

    name = "char"
    eot_token: int | None = None

    def __init__(self, stoi: dict[str, int], itos: dict[int, str] | list[str]):
        self.stoi = dict(stoi)
        self.itos = {int(i): s for i, s in (itos.items() if isinstance(itos, dict) else enumerate(itos))}
        self.vocab_size = len(self.itos)

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        chars = sorted(set(text))
        return cls({ch: i for i, ch in enumerate(chars)}, chars)

    def encode(self, text: str) -> list[int]:
        try:
            return [self.stoi[c] for c in text]
        except KeyError:
            unseen = sorted({c for c in text if c not in self.stoi})
            shown = ", ".join(repr(c) for c in unseen[:10]) + (" ..." if len(unseen) > 10 else "")
            raise UserError(
                f"the text has {len(unseen)} character(s) this char-level model never saw: {shown}; "
                "remove or replace them"
            ) from None

    def encode_array(self, text: str) -> np.ndarray:
        """`encode` as an int64 array, vectorized: tiny-shakespeare takes milliseconds, not a Python loop
        per character. Characters outside the vocabulary raise encode's UserError."""
        if not hasattr(self, "_lookup"):
            # sorted code points of the vocabulary and the id of each, for a binary search per character
            points = sorted((ord(s), i) for s, i in self.stoi.items() if len(s) == 1)
            self._lookup = (np.array([p for p, _ in points], dtype=np.int64),
                            np.array([i for _, i in points], dtype=np.int64))
        keys, ids = self._lookup
        # surrogatepass: JSON can carry lone surrogates, which are characters to Python too
        cps = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype="<u4").astype(np.int64)
        pos = np.minimum(np.searchsorted(keys, cps), max(len(keys) - 1, 0))
        if len(keys) == 0 or not np.array_equal(keys[pos], cps):
            return np.asarray(self.encode(text), dtype=np.int64)  # raises, naming the unseen characters
        return ids[pos]

    def decode(self, ids: list[int]) -> str:
        return "".join(self.itos[int(i)] for i in ids)

    def meta(self) -> dict:
        return {"tokenizer": "char", "vocab_size": self.vocab_size, "stoi": self.stoi,
                "itos": [self.itos[i] for i in range(self.vocab_size)]}


class GPT2Tokenizer:
    """GPT-2 BPE via tiktoken; `<|endoftext|>` (50256) separates documents."""

    name = "gpt2"
    eot_token: int | None = GPT2_EOT
    vocab_size = 50257

    def __init__(self, vocab_dir: str | Path | None = None):
        self.enc = gpt2_encoding(str(vocab_dir) if vocab_dir else None)

    def encode(self, text: str) -> list[int]:
        return encode_escaped(text, lambda s: self.enc.encode(s, allowed_special={"<|endoftext|>"}), self._byte_ids)

    def encode_ordinary(self, text: str) -> list[int]:
        # bytes that are not UTF-8 (read with errors="surrogateescape") become their byte tokens
        return encode_escaped(text, self.enc.encode_ordinary, self._byte_ids)

    @cached_property
    def _byte_ids(self) -> list[int]:
        return [self.enc.encode_single_token(bytes([b])) for b in range(256)]

    def decode(self, ids: list[int]) -> str:
        return self.enc.decode([int(i) for i in ids])

    def token_bytes(self, i: int) -> bytes:
        return self.enc.decode_single_token_bytes(int(i))

    def meta(self) -> dict:
        return {"tokenizer": "gpt2", "vocab_size": self.vocab_size, "eot_token": GPT2_EOT}


def _gpt2_from_files(vocab_dir: Path):
    import tiktoken
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks

    enc_json, bpe = vocab_dir / "encoder.json", vocab_dir / "vocab.bpe"
    for f, remote in ((enc_json, GPT2_ENCODER_JSON), (bpe, GPT2_VOCAB_BPE)):
        if not f.exists():
            raise UserError(f"GPT-2 vocabulary file {f} is missing; put encoder.json and vocab.bpe "
                            f"(from {remote.url}) in {vocab_dir}")
        if sha256_file(f) != remote.sha256:
            raise UserError(f"{f} does not have GPT-2's sha256 {remote.sha256}; it is another vocabulary")
    ranks = data_gym_to_mergeable_bpe_ranks(
        vocab_bpe_file=str(bpe), encoder_json_file=str(enc_json),
        vocab_bpe_hash=GPT2_VOCAB_BPE.sha256, encoder_json_hash=GPT2_ENCODER_JSON.sha256,
    )
    return tiktoken.Encoding(name="gpt2", pat_str=GPT2_PAT, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": GPT2_EOT}, explicit_n_vocab=50257)


@lru_cache(maxsize=4)
def gpt2_encoding(vocab_dir: str | None = None):
    """The exact `gpt2` encoding: from `vocab_dir`, else from $GLASSGPT_MIRROR/gpt2, else tiktoken's
    own download (online)."""
    if vocab_dir:
        return _gpt2_from_files(Path(vocab_dir))
    mirror = mirror_dir()
    if mirror is not None:
        return _gpt2_from_files(mirror / "gpt2")
    try:
        import tiktoken

        return tiktoken.get_encoding("gpt2")
    except Exception as e:  # network errors come in many types from requests/urllib
        raise UserError(
            f"could not get the GPT-2 vocabulary ({type(e).__name__}); offline, put encoder.json and vocab.bpe "
            f"in a directory and pass --vocab_dir=DIR, or set {MIRROR_ENV} to a directory with gpt2/ in it"
        ) from None


class _PlainUnpickler(pickle.Unpickler):
    """Admits only builtin containers and scalars: a meta.pkl cannot run code on load."""

    def find_class(self, module: str, name: str):
        raise pickle.UnpicklingError(f"meta.pkl refers to {module}.{name}; only plain data is allowed")


def complete_meta(meta: dict, directory: Path) -> dict:
    """A trained BPE's meta names its tokenizer.json (in `directory`); read the vocabulary from it,
    so the dict describes the whole tokenizer (as a checkpoint stores it)."""
    if isinstance(meta, dict) and meta.get("tokenizer") == "bpe" and "bpe" not in meta:
        from glassgpt.bpe import bpe_meta_from_file

        meta["bpe"] = bpe_meta_from_file(directory / str(meta.get("tokenizer_file", "tokenizer.json")))["bpe"]
    return meta


def read_meta(data_dir: str | Path) -> dict | None:
    """A dataset's metadata: glassgpt's meta.json, else nanoGPT's meta.pkl read safely; None if neither."""
    data_dir = Path(data_dir)
    if (data_dir / "meta.json").exists():
        return complete_meta(json.loads((data_dir / "meta.json").read_text()), data_dir)
    if (data_dir / "meta.pkl").exists():
        try:
            meta = _PlainUnpickler(io.BytesIO((data_dir / "meta.pkl").read_bytes())).load()
        except Exception as e:
            raise UserError(f"{data_dir / 'meta.pkl'} is not plain metadata ({e}); "
                            "re-run the dataset's prepare.py") from None
        if not isinstance(meta, dict):
            raise UserError(f"{data_dir / 'meta.pkl'} holds a {type(meta).__name__}, expected a dict")
        meta.setdefault("tokenizer", "char" if "stoi" in meta else "gpt2")
        return meta
    return None


def tokenizer_from_meta(meta: dict | None, vocab_dir: str | None = None) -> Tokenizer:
    """Rebuild the tokenizer a dataset or checkpoint was made with (GPT-2 when nothing says otherwise,
    as nanoGPT assumes)."""
    if meta and (meta.get("tokenizer") == "char" or "stoi" in meta):
        return CharTokenizer(meta["stoi"], meta["itos"])
    if meta and meta.get("tokenizer") == "bpe":
        from glassgpt.bpe import BPETokenizer

        return BPETokenizer.from_meta(meta)
    return GPT2Tokenizer(vocab_dir or os.environ.get("GLASSGPT_VOCAB_DIR") or None)
