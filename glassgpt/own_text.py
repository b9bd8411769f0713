"""Your own text in one command: `glassgpt prepare my.txt --out_dir=data/mine [--tokenizer=bpe]`.

`glassgpt prepare PATH` (a .txt file, a folder, JSON Lines, or a Hugging Face dataset name) is
`glassgpt prepare corpus --input=PATH`. This module holds the pieces that make that work on any
text:

- reading a .txt exactly: bytes that are not UTF-8 are kept (errors="surrogateescape": each such
  byte becomes one lone surrogate U+DC80..U+DCFF), and the byte-level tokenizers (GPT-2's and a
  trained BPE) turn each back into its byte's token, so decoding the token bytes gives the file's
  bytes back; a char-level vocabulary refuses them (its meta.json could not store them);
- one text (a single .txt, or a corpus of one document) is split as nanoGPT splits tiny-shakespeare:
  its first ~90% train, the rest val, cut at a line start so that val begins on a line of its own;
  its one document keeps one id, and the val segment records the character offset and line where it
  starts, so every trace still points into the file;
- the closing summary: how many tokens there are.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from glassgpt.errors import UserError

ONE_TEXT_VAL = 0.1  # nanoGPT's 90/10 split of a single text
_warned: set[Path] = set()


def read_text_exact(path: str | Path) -> str:
    """A text file as str, bytes that are not UTF-8 kept as lone surrogates (with one warning)."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"input file {path} does not exist; check the path") from None
    except IsADirectoryError:
        raise UserError(f"{path} is a directory; prepare it with `glassgpt prepare {path}`") from None
    except OSError as e:
        raise UserError(f"cannot read {path} ({e.strerror})") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        text = raw.decode("utf-8", "surrogateescape")
        if path in _warned:  # prepare reads a file more than once
            return text
        _warned.add(path)
        n_bad = sum(1 for c in text if 0xDC80 <= ord(c) <= 0xDCFF)
        print(f"warning: {path} is not all UTF-8 ({n_bad} byte(s) are not, the first at byte {e.start}); they are "
              "kept as raw bytes (the byte-level tokenizers bpe and gpt2 encode them exactly; char refuses them)",
              file=sys.stderr)
        return text


def one_text_cut(text: str, val_fraction: float = ONE_TEXT_VAL) -> int:
    """Where val begins in a single text: the first line start at or after (1 - val_fraction) of its
    characters, or exactly there when no line starts in the last part (one long line)."""
    at = int(len(text) * (1 - val_fraction))
    nl = text.find("\n", max(at - 1, 0))
    cut = nl + 1 if 0 <= nl < len(text) - 1 else at
    if cut <= 0 or cut >= len(text):
        raise UserError(f"the text has {len(text)} characters, too few to split into train and val; give more text")
    return cut


def line_at(text: str, char: int) -> int:
    """1-based line number of character `char`."""
    return 1 + text.count("\n", 0, char)


def route(name: str, known: list[str]) -> list[str] | None:
    """`glassgpt prepare PATH-or-HF-NAME ...` -> the arguments of `prepare corpus` (None: not ours).
    An existing path, or something that is not a near-miss of a known dataset name, is an input."""
    import difflib

    if name.startswith("-"):
        return None
    p = Path(name).expanduser()
    if p.exists() or looks_like_path(name) or "/" in name:
        return [f"--input={name}"]
    if difflib.get_close_matches(name, known, n=1, cutoff=0.75):
        return None  # a typo of a dataset name: let prepare say "did you mean"
    return [f"--input={name}"]  # a Hugging Face dataset name


LOCAL_SUFFIXES = (".txt", ".jsonl")  # what a directory contributes; a named file may be any text


def looks_like_path(s: str) -> bool:
    """A file suffix or a leading / . ~ means a path; Hugging Face names are "name" or "owner/name"."""
    return Path(s).suffix in (*LOCAL_SUFFIXES, ".json", ".text") or s.startswith(("/", ".", "~")) or "\\" in s


def default_out_dir(spec: str) -> Path:
    """data/<stem of the input> (my.txt -> data/my; owner/name -> data/name)."""
    first = spec.split(",")[0].rstrip("/")
    return Path("data") / (Path(first).stem or "corpus")


def tokenizer_from_path(spec: str) -> Any:
    """`--tokenizer=PATH`: reuse the tokenizer of a prepared dataset directory, a run's out_dir or
    ckpt .pt (the tokenizer stored in its checkpoint), or a tokenizer.json; None when `spec` is no
    path (a tokenizer kind: gpt2, bpe, char)."""
    from glassgpt.tokenizer import read_meta, tokenizer_from_meta

    p = Path(spec).expanduser()
    if not p.exists():
        if looks_like_tokenizer_path(spec):
            raise UserError(f"--tokenizer={spec}: no such file or directory; give gpt2, bpe, char, a prepared "
                            "dataset directory, a run's out_dir or a tokenizer.json")
        return None
    if p.is_dir() and ((p / "meta.json").exists() or (p / "meta.pkl").exists()):
        return tokenizer_from_meta(read_meta(p))
    if p.suffix == ".pt" or (p / "ckpt.pt").exists():
        # the checkpoint's JSON sidecar (ckpt.json) holds its tokenizer: no torch, no model needed
        from glassgpt.artifacts import read_json

        side = (p if p.suffix == ".pt" else p / "ckpt.pt").with_suffix(".json")
        meta = read_json(side, default=None, strict=False)
        tok = meta.get("tokenizer") if isinstance(meta, dict) else None
        if not tok:
            raise UserError(f"--tokenizer={spec}: {side} is missing or names no tokenizer (a nanoGPT checkpoint?); "
                            "pass the run's dataset directory instead")
        return tokenizer_from_meta(tok)
    if p.is_file() and p.suffix == ".json":
        from glassgpt.bpe import read_tokenizer_json

        return read_tokenizer_json(p)
    raise UserError(f"--tokenizer={spec} is neither a prepared dataset directory (meta.json), a run (ckpt.pt) "
                    "nor a tokenizer.json")


def looks_like_tokenizer_path(spec: str) -> bool:
    return spec not in ("gpt2", "bpe", "char") and ("/" in spec or "." in spec or "\\" in spec)


def encoder_spec(tok: Any) -> tuple[str, str | None]:
    """How prepare's tokenizer workers rebuild `tok` (glassgpt.corpus_input.make_encoder)."""
    import json

    if tok.name == "char":
        return "char", "".join(tok.itos[i] for i in range(tok.vocab_size))
    if tok.name == "bpe":
        return "bpe", json.dumps(tok.meta()["bpe"])
    return "gpt2", None
