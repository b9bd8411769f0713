"""The trained byte-level BPE (glassgpt/bpe.py): exact round trips on any text and on bytes that are
not UTF-8, tiktoken's ids against Hugging Face `tokenizers` running the saved tokenizer.json (the
slow reference), and prepare's one-text split, coordinates and tokenizer reuse."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
from conftest import TINY_TEXT

from glassgpt.bpe import (
    BPETokenizer,
    bpe_meta_from_file,
    read_tokenizer_json,
    tokenizer_json,
    train_bpe,
    write_tokenizer_json,
)
from glassgpt.corpus import Corpus
from glassgpt.errors import UserError
from glassgpt.own_text import one_text_cut, read_text_exact
from glassgpt.prepare import main as prepare_main
from glassgpt.tokenizer import GPT2Tokenizer, read_meta, tokenizer_from_meta

ODD_TEXTS = [
    "",
    "plain ASCII, with  two spaces and a tab\tand\r\nwindows lines",
    "héllo wörld — “quotes” ½ ∑ √ naïve café",
    "日本語のテキスト、中文文本, 한국어 텍스트",
    "emoji 🎉🎉 👩‍👩‍👧‍👦 flags 🇫🇷 skin 👍🏽 keycap 1️⃣",
    "combining e\u0301 and zero-width\u200bjoin, RTL \u202eabc\u202c, BOM \ufeff",
    "numbers 1234567890 3.14159 -42 and 'contractions' don't we'll I'm",
    "<|endoftext|> as text",
    "\x00\x01 control \x7f chars \U0010ffff last code point",
]


@pytest.fixture(scope="module")
def tok() -> BPETokenizer:
    return train_bpe([TINY_TEXT, *ODD_TEXTS], 400)


def random_text(rng: random.Random, n: int) -> str:
    """Code points from every plane (no lone surrogates: those are bytes, tested apart)."""
    pools = [(0x20, 0x7E), (0xA0, 0x24F), (0x400, 0x4FF), (0x3040, 0x30FF), (0x4E00, 0x4FFF), (0x1F300, 0x1FAFF),
             (0x0, 0x1F), (0xE000, 0xF8FF), (0x10000, 0x10FFFF)]
    out = []
    for _ in range(n):
        a, b = rng.choice(pools)
        out.append(chr(rng.randint(a, b)))
    return "".join(out)


def test_round_trip_on_any_unicode(tok):
    rng = random.Random(0)
    texts = ODD_TEXTS + [random_text(rng, rng.randint(1, 200)) for _ in range(200)]
    for t in texts:
        ids = tok.encode_ordinary(t)
        assert tok.decode(ids) == t, repr(t)
        assert tok.decode_bytes(ids) == t.encode("utf-8")
        assert all(0 <= i < tok.eot_token for i in ids)  # encode_ordinary never emits the separator
    assert tok.encode("a<|endoftext|>b").count(tok.eot_token) == 1
    assert tok.encode_ordinary("a<|endoftext|>b").count(tok.eot_token) == 0


def test_invalid_utf8_bytes_round_trip_exactly(tmp_path, tok, capsys):
    raw = b"valid \xc3\xa9 then bad \xff\xfe\x80 and a cut char \xe6\x97 then \xed\xa0\x80 end\n"
    p = tmp_path / "bad.txt"
    p.write_bytes(raw)
    text = read_text_exact(p)
    assert "not all UTF-8" in capsys.readouterr().err
    assert text.encode("utf-8", "surrogateescape") == raw  # the read is lossless
    for t in (tok, GPT2Tokenizer()):
        ids = t.encode_ordinary(text)
        data = tok.decode_bytes(ids) if t is tok else t.enc.decode_bytes(ids)
        assert data == raw, type(t).__name__
    assert "\ufffd" in tok.decode(tok.encode_ordinary(text))  # what a user sees: replacement characters


def test_tiktoken_ids_equal_hugging_face_running_the_saved_file(tmp_path, tok):
    import tokenizers  # installed with transformers (the test extra)
    path = tmp_path / "tokenizer.json"
    write_tokenizer_json(tok, path)
    hf = tokenizers.Tokenizer.from_file(str(path))
    rng = random.Random(1)
    texts = [TINY_TEXT] + ODD_TEXTS[:-2] + [random_text(rng, 100) for _ in range(50)]
    for t in texts:
        assert hf.encode(t, add_special_tokens=False).ids == tok.encode_ordinary(t), repr(t[:40])
        assert hf.decode(tok.encode_ordinary(t)) == t
    assert read_tokenizer_json(path).tokens == tok.tokens
    assert hf.token_to_id("<|endoftext|>") == tok.eot_token == tok.vocab_size - 1


def test_merges_matter_the_control_can_fail(tmp_path, tok):
    """A tokenizer.json with its merges reversed must encode differently: the equality above is no accident."""
    import tokenizers
    data = tokenizer_json(tok)
    data["model"]["merges"] = data["model"]["merges"][::-1]
    path = tmp_path / "reversed.json"
    path.write_text(json.dumps(data))
    hf = tokenizers.Tokenizer.from_file(str(path))
    assert hf.encode(TINY_TEXT, add_special_tokens=False).ids != tok.encode_ordinary(TINY_TEXT)


def test_vocab_size_limits_and_bad_files(tmp_path):
    with pytest.raises(UserError, match="between 257"):
        train_bpe(["abc"], 100)
    t = train_bpe(["abc abc abd"], 257)  # the bytes and the separator only: no merges
    assert t.vocab_size == 257 and len(t.encode_ordinary("abc")) == 3
    (tmp_path / "x.json").write_text("{}")
    with pytest.raises(UserError, match="not a BPE tokenizer.json"):
        bpe_meta_from_file(tmp_path / "x.json")
    with pytest.raises(UserError, match="missing"):
        bpe_meta_from_file(tmp_path / "none.json")


def write_text(tmp_path, text: str, name: str = "my.txt"):
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


def test_prepare_one_text_with_bpe(tmp_path, capsys):
    text = TINY_TEXT + "Émile 🎉 ends here.\n"
    src = write_text(tmp_path, text)
    out = tmp_path / "data" / "mine"
    prepare_main([str(src), f"--out_dir={out}", "--tokenizer=bpe", "--vocab_size=300", "--num_proc=1"])
    printed = capsys.readouterr().out
    assert "1 text split 90/10" in printed and f"--data_dir={out}" in printed
    meta = read_meta(out)
    assert meta["tokenizer"] == "bpe" and meta["vocab_size"] == 300 and (out / "tokenizer.json").exists()
    # the vocabulary lives in tokenizer.json, not in meta.json
    assert "tokens" not in json.loads((out / "meta.json").read_text()).get("bpe", {})
    tok = tokenizer_from_meta(meta)
    cut = one_text_cut(text)
    assert text[cut - 1] == "\n"  # val starts on a line of its own
    corpus = Corpus(out)
    train, val = corpus.tokens("train"), corpus.tokens("val")
    assert tok.decode(train[:-1].tolist()) == text[:cut] and tok.decode(val[:-1].tolist()) == text[cut:]
    assert train[-1] == val[-1] == tok.eot_token
    seg = corpus.segments("val")[0]
    assert seg[3] == cut and seg[4] == text[:cut].count("\n") + 1
    # every location points into the file: character offset and line of a token deep in val
    for split, pos in (("train", 50), ("val", 7)):
        loc = corpus.locate(split, pos, pos + 3)
        assert text[loc.char_offset:].startswith(loc.text) and loc.line == text[:loc.char_offset].count("\n") + 1
    assert json.loads((out / "documents.json").read_text())[0]["split"] == "train,val"


def test_prepare_reuses_a_tokenizer_and_refuses_mismatches(tmp_path, capsys):
    a = write_text(tmp_path, TINY_TEXT, "a.txt")
    b = write_text(tmp_path, TINY_TEXT.upper() + "\nnew words here\n", "b.txt")
    da, db = tmp_path / "da", tmp_path / "db"
    prepare_main([str(a), f"--out_dir={da}", "--tokenizer=bpe", "--vocab_size=300", "--num_proc=1"])
    prepare_main([str(b), f"--out_dir={db}", f"--tokenizer={da}", "--num_proc=1"])
    assert (da / "tokenizer.json").read_bytes() == (db / "tokenizer.json").read_bytes()
    prepare_main([str(b), f"--out_dir={tmp_path / 'dc'}", f"--tokenizer={da / 'tokenizer.json'}", "--num_proc=1"])
    reused = np.fromfile(tmp_path / "dc" / "train.bin", np.uint16)
    assert np.array_equal(np.fromfile(db / "train.bin", np.uint16), reused)
    char = tmp_path / "dchar"
    prepare_main([str(a), f"--out_dir={char}", "--tokenizer=char", "--num_proc=1"])
    with pytest.raises(UserError, match="never saw"):  # b has upper-case letters a's characters lack
        prepare_main([str(b), f"--out_dir={tmp_path / 'dd'}", f"--tokenizer={char}", "--num_proc=1"])
    with pytest.raises(UserError, match="no such file"):
        prepare_main([str(b), "--tokenizer=nowhere/tokenizer.json"])
    capsys.readouterr()


def test_char_refuses_bytes_that_are_not_utf8(tmp_path, capsys):
    p = tmp_path / "bad.txt"
    p.write_bytes(TINY_TEXT.encode() + b"\xff\n")
    with pytest.raises(UserError, match="not UTF-8"):
        prepare_main([str(p), f"--out_dir={tmp_path / 'd'}", "--tokenizer=char", "--num_proc=1"])
    prepare_main([str(p), f"--out_dir={tmp_path / 'e'}", "--tokenizer=bpe", "--vocab_size=280", "--num_proc=1"])
    tok = tokenizer_from_meta(read_meta(tmp_path / "e"))
    ids = np.concatenate([Corpus(tmp_path / "e").tokens(s)[:-1] for s in ("train", "val")]).tolist()
    assert tok.decode_bytes(ids) == p.read_bytes()
    capsys.readouterr()


def test_prepare_routes_paths_and_names(tmp_path, monkeypatch, capsys):
    from glassgpt.own_text import route

    known = ["shakespeare_char", "shakespeare", "corpus", "openwebtext"]
    assert route("shakespeare_chr", known) is None  # a typo: "did you mean"
    assert route("roneneldan/TinyStories", known) == ["--input=roneneldan/TinyStories"]
    assert route("notes.txt", known) == ["--input=notes.txt"]
    monkeypatch.chdir(tmp_path)
    write_text(tmp_path, TINY_TEXT, "story.txt")
    prepare_main(["story.txt", "--tokenizer=char", "--num_proc=1"])  # default out_dir: data/<stem>
    assert (tmp_path / "data" / "story" / "train.bin").exists()
    with pytest.raises(UserError, match="did you mean shakespeare_char"):
        prepare_main(["shakespeare_chr"])
    capsys.readouterr()
