"""Dataset preparation (glassgpt/prepare.py) and the coordinates it leaves (glassgpt/corpus.py).

Each fast path is checked against a slow reference: nanoGPT's own prepare code for tiny-shakespeare,
decoding every segment back to its source text, and a plain scan of the source for Corpus.locate.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from glassgpt.cli import main as cli_main
from glassgpt.corpus import Corpus, check_uint16
from glassgpt.errors import UserError, run_main
from glassgpt.prepare import main as prepare_main
from glassgpt.tokenizer import gpt2_encoding

REPO = Path(__file__).resolve().parents[1]
OUTPUT_FILES = ("train.bin", "val.bin", "train.docs.npy", "val.docs.npy", "documents.json", "meta.json")

DOCS = [
    {"id": "a", "text": "Call me Ishmael.\nSome years ago - never mind how long precisely -\nhaving little money"},
    {"id": "b", "text": "Fellow-Citizens:\n\nI meet you, caf\u00e9 na\u00efvet\u00e9 \u2014 r\u00e9sum\u00e9 \U0001f40b\n" * 3},
    {"text": "no id here\nsecond line\nthird line"},  # id becomes file:line
    {"id": 7, "text": "\u65e5\u672c\u8a9e\u306e\u6587\u7ae0\u3002\n\u4e8c\u884c\u76ee\u3002" * 4},
    {"id": "e", "text": "short"},
    {"id": "f", "text": "  leading spaces\n\n\n trailing newline\n"},
] + [{"id": f"doc{i}", "text": f"Document number {i}.\n" + "word " * (i % 7) + "\nend"} for i in range(14)]


def write_jsonl(path: Path, docs: list[dict], extra_lines: dict[int, str] | None = None) -> Path:
    """One JSON object per line; `extra_lines` inserts raw lines at given 0-based positions."""
    lines = [json.dumps(d, ensure_ascii=False) for d in docs]
    for pos, raw in sorted((extra_lines or {}).items()):
        lines.insert(pos, raw)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def prepare(*args: str) -> dict:
    return prepare_main([str(a) for a in args])


def files_bytes(d: Path) -> dict[str, bytes]:
    return {name: (d / name).read_bytes() for name in OUTPUT_FILES}


def expect_user_error(argv: list[str], *needles: str, capsys=None) -> str:
    """The command fails with one line naming the problem (and exit status 2 through run_main)."""
    with pytest.raises(UserError) as e:
        prepare_main(argv)
    msg = str(e.value)
    assert "\n" not in msg, msg
    for n in needles:
        assert n in msg, f"{n!r} not in {msg!r}"
    assert run_main(prepare_main, argv) == 2
    if capsys is not None:
        err = capsys.readouterr().err
        assert err.strip().splitlines()[-1] == f"error: {msg}", err
    return msg


# ---------------------------------------------------------------- tiny-shakespeare = nanoGPT


def test_shakespeare_char_matches_nanogpt(tmp_path, mirror):
    out = tmp_path / "shakespeare_char"
    prepare("shakespeare_char", f"--out_dir={out}")
    data = (mirror / "tinyshakespeare" / "input.txt").read_text()
    # nanoGPT's data/shakespeare_char/prepare.py, verbatim in substance
    chars = sorted(list(set(data)))
    stoi = {ch: i for i, ch in enumerate(chars)}
    n = len(data)
    train_ids = np.array([stoi[c] for c in data[:int(n * 0.9)]], dtype=np.uint16)
    val_ids = np.array([stoi[c] for c in data[int(n * 0.9):]], dtype=np.uint16)

    got_train = np.fromfile(out / "train.bin", dtype=np.uint16)
    got_val = np.fromfile(out / "val.bin", dtype=np.uint16)
    assert (len(chars), len(got_train), len(got_val)) == (65, 1_003_854, 111_540)
    np.testing.assert_array_equal(got_train, train_ids)
    np.testing.assert_array_equal(got_val, val_ids)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["stoi"] == stoi and meta["itos"] == chars and meta["vocab_size"] == 65
    assert (meta["train_tokens"], meta["val_tokens"]) == (1_003_854, 111_540)
    # the val segment starts mid-file at its character offset and line
    cut = int(n * 0.9)
    np.testing.assert_array_equal(np.load(out / "val.docs.npy"), [[0, 0, 111_540, cut, data[:cut].count("\n") + 1]])
    corpus = Corpus(out)
    assert corpus.decode("train", 0, len(got_train)) + corpus.decode("val", 0, len(got_val)) == data
    assert (out / "input.txt").read_text() == data  # copied from the mirror, like nanoGPT's download


def test_shakespeare_bpe_matches_nanogpt(tmp_path, mirror):
    out = tmp_path / "shakespeare"
    prepare("shakespeare", f"--out_dir={out}")
    data = (mirror / "tinyshakespeare" / "input.txt").read_text()
    n = len(data)
    enc = gpt2_encoding(None)
    train, val = np.fromfile(out / "train.bin", np.uint16), np.fromfile(out / "val.bin", np.uint16)
    assert (len(train), len(val)) == (301_966, 36_059)
    np.testing.assert_array_equal(train, enc.encode_ordinary(data[:int(n * 0.9)]))
    np.testing.assert_array_equal(val, enc.encode_ordinary(data[int(n * 0.9):]))
    corpus = Corpus(out)
    assert corpus.decode("train", 0, len(train)) + corpus.decode("val", 0, len(val)) == data
    assert json.loads((out / "meta.json").read_text())["tokenizer"] == "gpt2"


def test_shakespeare_char_locate_matches_source_scan(tmp_path, mirror):
    out = tmp_path / "sc"
    prepare("shakespeare_char", f"--out_dir={out}")
    data = (mirror / "tinyshakespeare" / "input.txt").read_text()
    cut = int(len(data) * 0.9)
    corpus = Corpus(out)
    rng = np.random.default_rng(0)
    for split, base, n in (("train", 0, cut), ("val", cut, len(data) - cut)):
        for pos in [0, n - 5, *rng.integers(0, n - 5, 40)]:
            loc = corpus.locate(split, int(pos), int(pos) + 5)
            char = base + int(pos)  # slow reference: count in the source text itself
            assert (loc.doc_id, loc.char_offset, loc.line, loc.text) == \
                ("tinyshakespeare", char, data[:char].count("\n") + 1, data[char:char + 5])


def test_input_file_replaces_download(tmp_path):
    src = tmp_path / "mine.txt"
    src.write_text("hello world\nthis is my own text\n" * 20)
    out = tmp_path / "mine"
    prepare("shakespeare_char", f"--out_dir={out}", f"--input={src}")
    corpus = Corpus(out)
    assert corpus.decode("train", 0, len(corpus.tokens("train"))) + corpus.decode("val", 0, len(corpus.tokens("val"))) \
        == src.read_text()
    assert corpus.documents[0]["id"] == "mine" and not (out / "input.txt").exists()


# ---------------------------------------------------------------- corpora


def check_corpus_against_sources(out: Path, texts: dict[str, str], eot: str) -> None:
    """Every segment decodes to its document's text (+ EOT), every document is in exactly one split,
    and locate() agrees with a slow scan of the document at many positions."""
    corpus = Corpus(out)
    docs = corpus.documents
    seen = []
    checked = skipped = 0
    rng = np.random.default_rng(1)
    for split in ("train", "val"):
        seg = corpus.segments(split)
        assert seg[0, 1] == 0 and seg[-1, 2] == len(corpus.tokens(split))
        np.testing.assert_array_equal(seg[1:, 1], seg[:-1, 2])  # segments tile the split
        for doc, start, end, char_start, line_start in seg.tolist():
            assert docs[doc]["split"] == split and (char_start, line_start) == (0, 1)
            text = texts[docs[doc]["id"]]
            assert corpus.decode(split, start, end) == text + eot
            seen.append(doc)
            for pos in {start, end - 1, *rng.integers(start, end, 8).tolist()}:
                loc = corpus.locate(split, pos, min(pos + 3, end))
                prefix = corpus.decode(split, start, pos)  # slow reference: decode the prefix ...
                if not text.startswith(prefix):
                    skipped += 1
                    continue  # ... a BPE token that cuts a character has no exact char offset
                checked += 1
                assert (loc.doc, loc.doc_id, loc.char_offset, loc.line) == \
                    (doc, docs[doc]["id"], len(prefix), text[:len(prefix)].count("\n") + 1)
    assert sorted(seen) == list(range(len(docs)))
    assert checked >= 4 * len(docs) and skipped < checked / 10, (checked, skipped)  # the oracle did run


@pytest.mark.parametrize("tokenizer", ["gpt2", "char"])
def test_jsonl_corpus_segments_point_to_the_text(tmp_path, tokenizer):
    src = write_jsonl(tmp_path / "docs.jsonl", DOCS)
    out = tmp_path / "out"
    info = prepare("corpus", f"--input={src}", f"--out_dir={out}", f"--tokenizer={tokenizer}",
                   "--val_fraction=0.25", "--num_proc=1")
    assert info["documents"] == len(DOCS)
    docs = json.loads((out / "documents.json").read_text())
    ids = [str(d.get("id", f"docs.jsonl:{i + 1}")) for i, d in enumerate(DOCS)]
    assert [d["id"] for d in docs] == ids and docs[2]["id"] == "docs.jsonl:3"
    assert [d["line"] for d in docs] == list(range(1, len(DOCS) + 1)) and docs[0]["source"] == str(src)
    assert sum(d["split"] == "val" for d in docs) == 5  # ceil(0.25 * 20)
    check_corpus_against_sources(out, dict(zip(ids, (d["text"] for d in DOCS))),
                                 "<|endoftext|>" if tokenizer == "gpt2" else "")
    meta = json.loads((out / "meta.json").read_text())
    if tokenizer == "char":
        assert meta["itos"] == sorted(set("".join(d["text"] for d in DOCS)))


def test_locate_fast_path_equals_decoding_the_prefix(tmp_path):
    """Corpus.locate sums per-token character/newline counts; the slow oracle decodes the prefix."""
    src = write_jsonl(tmp_path / "docs.jsonl", [{"id": "long", "text": "\n".join(
        f"line {i}: caf\u00e9 \u2014 {'x' * (i % 13)}" for i in range(400))}, {"id": "x", "text": "other"}])
    out = tmp_path / "out"
    prepare("corpus", f"--input={src}", f"--out_dir={out}", "--val_fraction=0.5", "--num_proc=1", "--seed=0")
    corpus = Corpus(out)
    split = next(s for s in ("train", "val") if len(corpus.segments(s)) and corpus.documents[corpus.segments(s)[0, 0]]["id"] == "long")
    _, start, end, _, _ = corpus.segments(split)[0].tolist()
    for pos in range(start, end, 7):
        before = corpus.decode(split, start, pos)
        loc = corpus.locate(split, pos, pos + 1)
        assert (loc.char_offset, loc.line) == (len(before), before.count("\n") + 1), pos


def test_directory_of_text_files(tmp_path):
    d = tmp_path / "books"
    (d / "sub").mkdir(parents=True)
    texts = {"a.txt": "alpha\nbeta\n", "b.txt": "gamma delta\n\nepsilon", "sub/c.txt": "zeta " * 50}
    for name, t in texts.items():
        (d / name).write_text(t)
    (d / "notes.md").write_text("ignored: directories contribute .txt and .jsonl files only")
    out = tmp_path / "out"
    prepare("corpus", f"--input={d}", f"--out_dir={out}", "--val_fraction=0.3", "--num_proc=1")
    docs = json.loads((out / "documents.json").read_text())
    assert [doc["id"] for doc in docs] == list(texts)  # sorted, recursive, named inside the directory
    assert [doc["source"] for doc in docs] == [str(d / n) for n in texts]
    check_corpus_against_sources(out, texts, "<|endoftext|>")


def test_parallel_output_identical_to_serial(tmp_path):
    src = write_jsonl(tmp_path / "docs.jsonl", DOCS * 3)
    outs = {}
    for num_proc in (1, 2):
        outs[num_proc] = tmp_path / f"p{num_proc}"
        # small batches: many tasks in flight, results must still come back in order
        prepare("corpus", f"--input={src}", f"--out_dir={outs[num_proc]}", f"--num_proc={num_proc}",
                "--batch_chars=200", "--val_fraction=0.1")
    assert files_bytes(outs[1]) == files_bytes(outs[2])


def test_split_is_deterministic_and_seeded(tmp_path):
    src = write_jsonl(tmp_path / "docs.jsonl", DOCS)

    def val_ids(name: str, seed: int) -> list[str]:
        prepare("corpus", f"--input={src}", f"--out_dir={tmp_path / name}", f"--seed={seed}",
                "--val_fraction=0.2", "--num_proc=1")
        return [d["id"] for d in json.loads((tmp_path / name / "documents.json").read_text()) if d["split"] == "val"]

    first = val_ids("s1", 2357)
    assert val_ids("s2", 2357) == first and len(first) == 4
    assert files_bytes(tmp_path / "s1") == files_bytes(tmp_path / "s2")
    assert val_ids("s3", 1) != first


def test_default_split_holds_out_at_least_one_document(tmp_path, capsys):
    src = write_jsonl(tmp_path / "docs.json", DOCS)  # a named .json file is JSON Lines too
    stale = tmp_path / "o" / ".prepare-tmp-999999999"  # left inside out_dir by an older glassgpt
    stale.mkdir(parents=True)
    killed = tmp_path / ".o.tmp999999999"  # left beside it by a killed run: its process is gone
    killed.mkdir()
    info = prepare("corpus", f"--input={src}", f"--out_dir={tmp_path / 'o'}", "--num_proc=1")
    docs = json.loads((tmp_path / "o" / "documents.json").read_text())
    assert len(docs) == len(DOCS) and not stale.exists() and not killed.exists()
    assert sum(d["split"] == "val" for d in docs) == 1 and info["val_tokens"] > 0  # ceil(0.0005 * 20)
    assert "warning: val holds only" in capsys.readouterr().err  # too small for a 1024-token block


class FakeDataset:
    """The slice of `datasets.Dataset` that prepare uses, to run the Hugging Face path offline."""

    def __init__(self, rows: list[dict]):
        self.rows = rows
        self.column_names = list(rows[0]) if rows else ["text"]

    def __len__(self) -> int:
        return len(self.rows)

    def train_test_split(self, test_size: float, seed: int, shuffle: bool) -> dict:
        perm = np.random.default_rng(seed).permutation(len(self.rows))
        n_test = int(np.ceil(test_size * len(self.rows)))
        return {"train": FakeDataset([self.rows[i] for i in perm[n_test:]]),
                "test": FakeDataset([self.rows[i] for i in perm[:n_test]])}

    def iter(self, batch_size: int):
        for i in range(0, len(self.rows), batch_size):
            chunk = self.rows[i:i + batch_size]
            yield {k: [r[k] for r in chunk] for k in self.column_names}


def test_hugging_face_dataset_path(tmp_path, monkeypatch):
    calls = []
    rows = [{"text": d["text"], "id": f"hf{i}"} for i, d in enumerate(DOCS)]

    def load_dataset(name, num_proc=None):
        calls.append((name, num_proc))
        if name != "openwebtext":
            raise FileNotFoundError(f"Dataset '{name}' doesn't exist on the Hub or cannot be accessed.")
        return {"train": FakeDataset(rows)}

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    out = tmp_path / "owt"
    info = prepare("openwebtext", f"--out_dir={out}", "--num_proc=2")
    assert calls == [("openwebtext", 2)] and info["documents"] == len(rows)
    docs = json.loads((out / "documents.json").read_text())
    assert [d["split"] for d in docs] == ["train"] * (len(rows) - 1) + ["val"]  # nanoGPT's 0.0005 -> 1
    assert docs[0]["source"] == "hf:openwebtext"
    check_corpus_against_sources(out, {r["id"]: r["text"] for r in rows}, "<|endoftext|>")
    expect_user_error(["corpus", "--input=no_such_dataset_xyz", f"--out_dir={tmp_path / 'x'}"],
                      "unknown dataset 'no_such_dataset_xyz'", "doesn't exist on the Hub")


def test_cli_and_script(tmp_path, mirror):
    assert cli_main(["prepare", "shakespeare_char", f"--out_dir={tmp_path / 'cli'}"]) == 0
    env = {**os.environ, "GLASSGPT_MIRROR": str(mirror)}
    script = REPO / "data" / "shakespeare_char" / "prepare.py"
    r = subprocess.run([sys.executable, str(script), f"--out_dir={tmp_path / 'script'}"], env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert files_bytes(tmp_path / "cli") == files_bytes(tmp_path / "script")
    r = subprocess.run([sys.executable, str(script), f"--input={tmp_path / 'missing.txt'}",
                        f"--out_dir={tmp_path / 'script'}"], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        f"error: input file {tmp_path / 'missing.txt'} does not exist; check the path"], r.stderr


# ---------------------------------------------------------------- bad input


def test_bad_inputs_keep_an_older_dataset(tmp_path, capsys):
    good = write_jsonl(tmp_path / "good.jsonl", DOCS)
    out = tmp_path / "out"
    prepare("corpus", f"--input={good}", f"--out_dir={out}", "--num_proc=1")
    before = files_bytes(out)
    bad = write_jsonl(tmp_path / "bad.jsonl", DOCS, {2: '{"id": "broken", "text": "unterminated'})
    expect_user_error(["corpus", f"--input={bad}", f"--out_dir={out}"],
                      f"{bad}:3: not valid JSON", "--on_bad_line=skip", capsys=capsys)
    assert files_bytes(out) == before
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []  # no temp dir left behind


def test_failure_after_tokenizing_keeps_older_dataset(tmp_path, monkeypatch):
    good = write_jsonl(tmp_path / "good.jsonl", DOCS)
    out = tmp_path / "out"
    prepare("corpus", f"--input={good}", f"--out_dir={out}", "--num_proc=1")
    before = files_bytes(out)
    import glassgpt.corpus as gc

    def boom(*a, **k):
        raise UserError("simulated failure while writing meta.json")

    monkeypatch.setattr(gc, "write_json", boom)
    with pytest.raises(UserError, match="simulated"):
        prepare("corpus", f"--input={good}", f"--out_dir={out}", "--num_proc=1", "--seed=5")
    assert files_bytes(out) == before and not [p for p in out.iterdir() if p.name.startswith(".")]


def test_corrupt_jsonl_lines(tmp_path, capsys):
    bad = write_jsonl(tmp_path / "bad.jsonl", DOCS, {
        1: '{"id": "x", "text": "cut off',  # line 2
        4: '["a", "list"]',  # line 5
        6: '{"id": "no text", "body": "..."}',  # line 7
        8: '{"text": 42}',  # line 9
    })
    expect_user_error(["corpus", f"--input={bad}", f"--out_dir={tmp_path / 'o'}"], f"{bad}:2: not valid JSON")
    # skip: the bad lines are counted and left out, every good document kept in order
    info = prepare("corpus", f"--input={bad}", f"--out_dir={tmp_path / 'o'}", "--on_bad_line=skip", "--num_proc=1")
    err = capsys.readouterr().err
    assert f"skipped 4 bad JSONL line(s); first: {bad}:2" in err
    assert info["documents"] == len(DOCS)
    docs = json.loads((tmp_path / "o" / "documents.json").read_text())
    assert [d["line"] for d in docs][:4] == [1, 3, 4, 6]  # lines in the file, around the bad ones
    for line, needle in ((5, "a JSON list"), (7, "an object without a string 'text' field"), (9, "an object without a string 'text' field")):
        only = write_jsonl(tmp_path / f"only{line}.jsonl", DOCS[:3], {1: bad.read_text().splitlines()[line - 1]})
        expect_user_error(["corpus", f"--input={only}", f"--out_dir={tmp_path / 'o'}"], f"{only}:2: {needle}")
    expect_user_error(["corpus", f"--input={bad}", "--on_bad_line=maybe"],
                      "on_bad_line='maybe' is not one of stop, skip")


def test_missing_input_file(tmp_path, capsys):
    expect_user_error(["corpus", f"--input={tmp_path / 'nope.jsonl'}", f"--out_dir={tmp_path / 'o'}"],
                      f"input {tmp_path / 'nope.jsonl'} does not exist", capsys=capsys)
    expect_user_error(["shakespeare_char", f"--input={tmp_path / 'nope.txt'}", f"--out_dir={tmp_path / 'o'}"],
                      "does not exist", capsys=capsys)
    expect_user_error(["corpus", f"--out_dir={tmp_path / 'o'}"], "give the corpus with --input=")


def test_empty_corpus(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n\n")
    (tmp_path / "blank.jsonl").write_text('{"text": ""}\n{"text": ""}\n')
    (tmp_path / "emptydir").mkdir()
    (tmp_path / "empty.txt").write_text("")
    for name in ("empty.jsonl", "blank.jsonl", "emptydir", "empty.txt"):
        expect_user_error(["corpus", f"--input={tmp_path / name}", f"--out_dir={tmp_path / 'o'}"],
                          "is empty: no documents with text")
    expect_user_error(["shakespeare_char", f"--input={tmp_path / 'empty.txt'}", f"--out_dir={tmp_path / 'o'}"],
                      "too few to split")
    # one document is one text: split 90/10 at a line start, like tiny-shakespeare (tests/test_bpe.py)
    one = write_jsonl(tmp_path / "one.jsonl", DOCS[:1])
    info = prepare_main(["corpus", f"--input={one}", f"--out_dir={tmp_path / 'o'}", "--num_proc=1"])
    assert info is not None and info["documents"] == 1 and info["val_tokens"] > 0


def test_tokens_above_uint16(tmp_path):
    # 65,537 distinct characters: more char-level ids than uint16 storage holds
    cps = [c for c in range(0x100, 0x100 + 65_537 + 2048) if not 0xD800 <= c <= 0xDFFF][:65_537]
    text = "".join(map(chr, cps))
    src = write_jsonl(tmp_path / "wide.jsonl", [{"text": text[:40_000]}, {"text": text[40_000:]}])
    expect_user_error(["corpus", f"--input={src}", f"--out_dir={tmp_path / 'o'}", "--tokenizer=char"],
                      "65,537 distinct characters", "--tokenizer=gpt2")
    with pytest.raises(UserError, match="token id 70000 does not fit uint16"):
        check_uint16(np.array([1, 70000]))
    np.testing.assert_array_equal(check_uint16(np.array([0, 65535])), np.array([0, 65535], dtype=np.uint16))


def test_missing_gpt2_vocabulary_offline(tmp_path, monkeypatch):
    src = write_jsonl(tmp_path / "docs.jsonl", DOCS)
    empty = tmp_path / "novocab"
    empty.mkdir()
    expect_user_error(["corpus", f"--input={src}", f"--out_dir={tmp_path / 'o'}", f"--vocab_dir={empty}"],
                      f"{empty / 'encoder.json'} is missing", f"put encoder.json and vocab.bpe", str(empty))
    # through the mirror: $GLASSGPT_MIRROR/gpt2 is where the files are looked for
    text = tmp_path / "t.txt"
    text.write_text("some text\n" * 50)
    monkeypatch.setenv("GLASSGPT_MIRROR", str(empty))
    gpt2_encoding.cache_clear()  # the encoding is cached per vocab_dir; the mirror is read on a miss
    try:
        expect_user_error(["shakespeare", f"--input={text}", f"--out_dir={tmp_path / 'o'}"],
                          str(empty / "gpt2" / "encoder.json"))
    finally:
        gpt2_encoding.cache_clear()


def test_unknown_dataset_and_keys(tmp_path, monkeypatch):
    expect_user_error(["shakespear"], "unknown dataset 'shakespear'", "did you mean shakespeare?")
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if not installed
    expect_user_error(["corpus", "--input=openwebtxt", f"--out_dir={tmp_path / 'o'}"],
                      "'openwebtxt' is not a local file or directory", "pip install datasets")
    expect_user_error(["corpus", "--input=x.jsonl", "--tokeniser=char"], "did you mean tokenizer?")
    expect_user_error(["corpus", "--input=x.jsonl", "--tokenizer=wordpiece"],
                      "--tokenizer must be 'gpt2', 'bpe', 'char'")


def test_bad_text_and_out_dir(tmp_path):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\u00e9\n".encode("latin-1") * 10)
    expect_user_error(["shakespeare_char", f"--input={bad}", f"--out_dir={tmp_path / 'o'}"], "is not UTF-8 text")
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    src = write_jsonl(tmp_path / "docs.jsonl", DOCS)
    expect_user_error(["corpus", f"--input={src}", f"--out_dir={blocker / 'sub'}"], "cannot write to")


def test_tokenizing_streams_with_a_bounded_window():
    """Workers get at most 2 x num_proc batches ahead of the writer: the input is read lazily, so
    memory holds a few batches, never the corpus (Pool.imap would queue all of it)."""
    from glassgpt.corpus_input import Document, tokenize_in_order

    pulled = []

    def batches():
        for i in range(40):
            pulled.append(i)
            yield [("train", Document(f"d{i}", "mem", 1, f"batch {i} text\n" * 20))]

    results = tokenize_in_order(batches(), ("gpt2", None), num_proc=2)
    first = next(results)
    assert first[1].id == "d0" and len(pulled) <= 2 * 2 + 2, len(pulled)
    rest = list(results)
    assert [d.id for _, d, _ in rest] == [f"d{i}" for i in range(1, 40)]  # in order
    assert all(ids.dtype == np.uint16 and ids[-1] == 50256 for _, _, ids in [first, *rest])


def test_prepare_records_the_fingerprint_once(tmp_path, monkeypatch):
    """meta.json holds the dataset's fingerprint (taken at prepare); open_data reads it, never hashes."""
    import glassgpt.artifacts as artifacts
    from glassgpt.artifacts import fingerprint_files
    from glassgpt.corpus import data_files, open_data

    out = tmp_path / "out"
    prepare("corpus", f"--input={write_jsonl(tmp_path / 'd.jsonl', DOCS)}", f"--out_dir={out}", "--num_proc=1",
            "--tokenizer=char")
    meta = json.loads((out / "meta.json").read_text())
    assert meta["fingerprint"] == fingerprint_files(data_files(out), cache=False)
    monkeypatch.setattr(artifacts, "_hash_file_into", lambda h, p: pytest.fail("hashed on open"))
    assert open_data(out)[1] == meta["fingerprint"]
    monkeypatch.undo()
    # a file replaced by hand (sizes differ from the record): recomputed, and different
    (out / "val.bin").write_bytes((out / "val.bin").read_bytes()[:-2])
    assert open_data(out)[1] != meta["fingerprint"]


def test_prepare_writes_nanogpt_meta_pkl_and_keeps_other_files(tmp_path, mirror):
    import pickle

    out = tmp_path / "shakespeare_char"
    out.mkdir()
    (out / "prepare.py").write_text("# the shim nanoGPT keeps here\n")
    prepare("shakespeare_char", f"--out_dir={out}")
    prepare("shakespeare_char", f"--out_dir={out}")  # again: replaces the dataset, keeps prepare.py
    assert (out / "prepare.py").read_text() == "# the shim nanoGPT keeps here\n"
    meta = pickle.loads((out / "meta.pkl").read_bytes())  # what nanoGPT's sample.py reads
    chars = json.loads((out / "meta.json").read_text())["itos"]
    assert meta["vocab_size"] == 65 and meta["itos"] == dict(enumerate(chars))
    assert meta["stoi"] == {c: i for i, c in enumerate(chars)}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shakespeare_char"]  # no temporaries beside it


def test_hugging_face_dataset_with_an_empty_text_row(tmp_path, monkeypatch):
    rows = [{"text": d["text"], "id": f"hf{i}"} for i, d in enumerate(DOCS)]
    rows.insert(3, {"text": "", "id": "empty"})
    rows.insert(5, {"text": None, "id": "none"})
    monkeypatch.setitem(sys.modules, "datasets",
                        types.SimpleNamespace(load_dataset=lambda name, num_proc=None: {"train": FakeDataset(rows)}))
    out = tmp_path / "owt"
    info = prepare("openwebtext", f"--out_dir={out}", "--num_proc=1", "--val_fraction=0.1")
    assert info["documents"] == len(rows) - 2
    ids = {d["id"] for d in json.loads((out / "documents.json").read_text())}
    assert "empty" not in ids and "none" not in ids and len(ids) == len(rows) - 2
