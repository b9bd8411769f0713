"""A byte-level BPE tokenizer trained on your own corpus: rustbpe trains it, tiktoken runs it.

    tok = train_bpe(texts, vocab_size=2048)       # merges learned from the texts (GPT-2's split pattern)
    tok.encode("ROMEO:"), tok.decode(ids)
    write_tokenizer_json(tok, "data/mine/tokenizer.json")   # Hugging Face's format; loads in
    tok = read_tokenizer_json("data/mine/tokenizer.json")   # transformers' PreTrainedTokenizerFast

Why these libraries: on the English corpus (12 MB) rustbpe trained a 4096-token vocabulary ~4x faster
than Hugging Face `tokenizers`, and tiktoken encoded ~9x faster, with identical ids (one thread each;
benchmarks/bench_tokenizer.py, figures in benchmarks/RESULTS.md). The saved file is still Hugging
Face's tokenizer.json, so an exported model's tokenizer loads in transformers.

Like GPT-2's, it is byte-level: the 256 byte values are tokens, so any text encodes and decodes back
exactly, and `<|endoftext|>` (the last id) separates documents. Text read with
errors="surrogateescape" carries each byte that is not UTF-8 as a lone surrogate U+DC80..U+DCFF;
`encode` turns it back into that byte's token, and `decode_bytes` gives the original bytes.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

from glassgpt.errors import UserError

GPT2_PAT = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
EOT_TEXT = "<|endoftext|>"
MIN_VOCAB = 257  # the 256 bytes and <|endoftext|>
MAX_VOCAB = 1 << 16  # ids are stored as uint16 in train.bin / val.bin
_SURROGATES = re.compile("[\ud800-\udfff]+")


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in for each byte, as Hugging Face's ByteLevel pre-tokenizer uses."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


def _to_unicode(b: bytes) -> str:
    table = bytes_to_unicode()
    return "".join(table[x] for x in b)


def _from_unicode(s: str) -> bytes:
    inverse = {c: b for b, c in bytes_to_unicode().items()}
    try:
        return bytes(inverse[c] for c in s)
    except KeyError:
        raise UserError(f"token {s!r} is not a byte-level BPE token; the tokenizer file is not one glassgpt "
                        "wrote") from None


def _escaped_bytes(run: str) -> bytes:
    """The bytes a run of surrogates stands for: U+DC80..U+DCFF is one undecodable byte
    (surrogateescape); any other lone surrogate (JSON can carry them) its 3-byte surrogatepass form."""
    return b"".join(bytes([ord(c) - 0xDC00]) if 0xDC80 <= ord(c) <= 0xDCFF else c.encode("utf-8", "surrogatepass")
                    for c in run)


def encode_escaped(text: str, encode: Callable[[str], list[int]], byte_ids: Sequence[int]) -> list[int]:
    """`encode(text)`, except that lone surrogates (bytes that were not UTF-8) become byte tokens:
    tiktoken would replace them with U+FFFD and lose the bytes."""
    if not _SURROGATES.search(text):
        return encode(text)
    ids: list[int] = []
    pos = 0
    for m in _SURROGATES.finditer(text):
        ids += encode(text[pos:m.start()]) + [byte_ids[b] for b in _escaped_bytes(m.group())]
        pos = m.end()
    return ids + encode(text[pos:])


class BPETokenizer:
    """Byte-level BPE over `tokens` (id = position, most frequent merges last) plus `<|endoftext|>`."""

    name = "bpe"

    def __init__(self, tokens: Sequence[bytes]):
        import tiktoken

        if len(tokens) < 256 or len(set(tokens)) != len(tokens):
            raise UserError("a BPE vocabulary needs all 256 bytes and no duplicate tokens; re-run prepare")
        self.tokens = [bytes(t) for t in tokens]
        self.eot_token = len(self.tokens)
        self.vocab_size = len(self.tokens) + 1
        ranks = {t: i for i, t in enumerate(self.tokens)}
        self.enc = tiktoken.Encoding(name=f"glassgpt-bpe-{self.vocab_size}", pat_str=GPT2_PAT, mergeable_ranks=ranks,
                                     special_tokens={EOT_TEXT: self.eot_token}, explicit_n_vocab=self.vocab_size)
        self._byte_ids = [ranks[bytes([b])] for b in range(256)]

    def _encode(self, text: str, special: bool) -> list[int]:
        encode = (lambda s: self.enc.encode(s, allowed_special={EOT_TEXT})) if special else self.enc.encode_ordinary
        return encode_escaped(text, encode, self._byte_ids)

    def encode(self, text: str) -> list[int]:
        """Ids of `text`; the literal `<|endoftext|>` becomes the separator token (as GPT2Tokenizer)."""
        return self._encode(text, special=True)

    def encode_ordinary(self, text: str) -> list[int]:
        """Ids of `text`, every character as text (what prepare writes)."""
        return self._encode(text, special=False)

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`; bytes that are not UTF-8 (a generation cut mid-character) become U+FFFD."""
        return self.enc.decode([int(i) for i in ids])

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        """The exact bytes of `ids`: `decode_bytes(encode(t))` is t's UTF-8 (undecodable bytes as read)."""
        return self.enc.decode_bytes([int(i) for i in ids])

    def token_bytes(self, i: int) -> bytes:
        return self.tokens[int(i)] if int(i) < len(self.tokens) else b""  # <|endoftext|> stands for no text

    def meta(self) -> dict:
        return {"tokenizer": "bpe", "vocab_size": self.vocab_size, "eot_token": self.eot_token,
                "bpe": {"pattern": "gpt2", "tokens": [_to_unicode(t) for t in self.tokens]}}

    @classmethod
    def from_meta(cls, meta: dict) -> BPETokenizer:
        bpe = meta.get("bpe")
        if not isinstance(bpe, dict) or not isinstance(bpe.get("tokens"), list):
            raise UserError("the BPE tokenizer's vocabulary is missing (tokenizer.json beside meta.json); "
                            "re-run prepare with --tokenizer=bpe")
        if bpe.get("pattern", "gpt2") != "gpt2":
            raise UserError(f"BPE split pattern {bpe.get('pattern')!r} is not supported; glassgpt uses 'gpt2'")
        return _cached(tuple(bpe["tokens"]))


@lru_cache(maxsize=4)
def _cached(tokens: tuple[str, ...]) -> BPETokenizer:
    return BPETokenizer([_from_unicode(t) for t in tokens])


def train_bpe(texts: Iterable[str], vocab_size: int) -> BPETokenizer:
    """Learn `vocab_size - 1` byte-level tokens (+ `<|endoftext|>`) from `texts` with rustbpe."""
    if not MIN_VOCAB <= vocab_size <= MAX_VOCAB:
        raise UserError(f"--vocab_size must be between {MIN_VOCAB} (the 256 bytes + <|endoftext|>) and {MAX_VOCAB} "
                        f"(uint16 token files), got {vocab_size}")
    try:
        import rustbpe
    except ImportError:
        raise UserError("training a BPE tokenizer needs the rustbpe package: pip install rustbpe") from None

    # rustbpe takes valid UTF-8 only; undecodable bytes are rare: it learns no merges for them
    def clean() -> Iterable[str]:
        for t in texts:
            yield _SURROGATES.sub("\ufffd", t) if _SURROGATES.search(t) else t

    trainer = rustbpe.Tokenizer()
    trainer.train_from_iterator(clean(), vocab_size - 1, pattern=GPT2_PAT)
    ranks = sorted(((bytes(t), int(r)) for t, r in trainer.get_mergeable_ranks()), key=lambda x: x[1])
    if [r for _, r in ranks] != list(range(len(ranks))):
        raise RuntimeError("rustbpe returned ranks that are not 0..n-1")
    return BPETokenizer([t for t, _ in ranks])


# ---------------------------------------------------------------- Hugging Face tokenizer.json


def hf_merges(tokens: Sequence[bytes]) -> list[list[str]]:
    """BPE merges in Hugging Face's form from tiktoken-style ranks: every split of a token into two
    tokens, ordered by the rank of the token they make (how tiktoken chooses which pair to merge);
    transformers' TikTokenConverter does the same."""
    ranks = {t: i for i, t in enumerate(tokens)}
    merges = []
    for rank, tok in enumerate(tokens):
        local = [(ranks[tok[:k]], ranks[tok[k:]], rank, k) for k in range(1, len(tok))
                 if tok[:k] in ranks and tok[k:] in ranks]
        merges += sorted(local)
    merges.sort(key=lambda m: m[2])
    return [[_to_unicode(tokens[a]), _to_unicode(tokens[b])] for a, b, _, _ in merges]


def tokenizer_json(tok: BPETokenizer) -> dict[str, Any]:
    """The tokenizer as Hugging Face's tokenizer.json (byte-level BPE, GPT-2's pre-tokenizer)."""
    vocab = {_to_unicode(t): i for i, t in enumerate(tok.tokens)}
    return {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [{"id": tok.eot_token, "content": EOT_TEXT, "single_word": False, "lstrip": False,
                          "rstrip": False, "normalized": False, "special": True}],
        "normalizer": None,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": vocab, "merges": hf_merges(tok.tokens)},
    }


def write_tokenizer_json(tok: BPETokenizer, path: str | Path) -> None:
    from glassgpt.artifacts import write_json_atomic

    write_json_atomic(path, tokenizer_json(tok))


def write_hf_tokenizer_files(out: Path, meta: dict, block_size: int) -> None:
    """An exported model's tokenizer: tokenizer.json + tokenizer_config.json for transformers'
    PreTrainedTokenizerFast (AutoTokenizer), and glassgpt_tokenizer.json naming it for glassgpt."""
    tok = BPETokenizer.from_meta(meta)
    write_tokenizer_json(tok, out / "tokenizer.json")
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": block_size, "bos_token": EOT_TEXT,
           "eos_token": EOT_TEXT, "unk_token": None, "add_prefix_space": False, "clean_up_tokenization_spaces": False}
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    small = {k: v for k, v in tok.meta().items() if k != "bpe"} | {"tokenizer_file": "tokenizer.json"}
    (out / "glassgpt_tokenizer.json").write_text(json.dumps(small, indent=2) + "\n")


def read_tokenizer_json(path: str | Path) -> BPETokenizer:
    """A tokenizer.json glassgpt wrote (byte-level BPE, `<|endoftext|>` last)."""
    return BPETokenizer.from_meta(bpe_meta_from_file(path))


def bpe_meta_from_file(path: str | Path) -> dict:
    """meta()'s dict from a tokenizer.json: the vocabulary in id order, `<|endoftext|>` left out."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        vocab: dict[str, int] = data["model"]["vocab"]
    except FileNotFoundError:
        raise UserError(f"{path} is missing; the dataset's BPE tokenizer lives there: re-run prepare") from None
    except (ValueError, KeyError, TypeError):
        raise UserError(f"{path} is not a BPE tokenizer.json; re-run prepare with --tokenizer=bpe") from None
    tokens = sorted(vocab, key=vocab.__getitem__)
    if [vocab[t] for t in tokens] != list(range(len(tokens))):
        raise UserError(f"{path}: token ids are not 0..{len(tokens) - 1}; it is not a tokenizer glassgpt wrote")
    return {"tokenizer": "bpe", "vocab_size": len(tokens) + 1, "eot_token": len(tokens),
            "bpe": {"pattern": "gpt2", "tokens": tokens}}
