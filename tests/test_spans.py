"""Span index and span finding (glassgpt/trace/suffix_array.py, span_rules.py, span_index.py, spans.py)
against brute-force substring scans;
every oracle test runs on a one-shard and a several-shard index."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import make_char_dataset

from glassgpt.corpus import Corpus, write_dataset
from glassgpt.errors import UserError, run_main
from glassgpt.tokenizer import CharTokenizer, GPT2Tokenizer
from glassgpt.trace import span_index as SI
from glassgpt.trace import span_rules as R
from glassgpt.trace import spans as S
from glassgpt.trace import suffix_array as SA

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- datasets and the slow oracle


def make_docs_dataset(data_dir: Path, docs: list[str], tokenizer=None) -> Path:
    """A dataset whose train split is `docs`, one segment each (val: the last doc again)."""
    tok = tokenizer or CharTokenizer.from_text("".join(docs) + "\n")
    ids: dict[str, list[int]] = {}
    segs: dict[str, list[list[int]]] = {}
    for split, part in (("train", docs), ("val", docs[-1:])):
        ids[split], segs[split] = [], []
        for i, d in enumerate(part):
            t = tok.encode(d)
            segs[split].append([i, len(ids[split]), len(ids[split]) + len(t), 0, 1])
            ids[split] += t
    return write_dataset(data_dir, tok.meta(), ids, [{"id": f"d{i}", "source": f"d{i}.txt", "char_offset": 0,
                                                      "line": 1} for i in range(len(docs))],
                         segments=segs, fingerprint=False)


def doc_strings(corpus: Corpus) -> list[str]:
    """Each training segment's ids as a string of one code point per token: `in` is an exact scan."""
    toks = np.asarray(corpus.tokens("train"))
    return ["".join(chr(0x10000 + int(t)) for t in toks[s:e]) for _, s, e, _, _ in corpus.segments("train")]


def as_str(ids) -> str:
    return "".join(chr(0x10000 + int(t)) for t in ids)


def brute_count(corpus: Corpus, seq: list[int]) -> list[int]:
    """Split positions of every occurrence of seq inside one segment, by scanning."""
    toks = np.asarray(corpus.tokens("train")).tolist()
    out = []
    for _, s, e, _, _ in corpus.segments("train"):
        out += [p for p in range(s, e - len(seq) + 1) if toks[p:p + len(seq)] == seq]
    return out


def is_word(c: str) -> bool:
    return c.isalnum() or c in "'_"


def brute_spans(ids: list[int], text: str, offs: list[int], first: int, docs: list[str]) -> list[tuple[int, int]]:
    """Every valid occurring span checked one by one, then the maximal ones (OLMoTrace's definition)."""
    n = len(ids)

    def boundary(c: int) -> bool:
        return c <= 0 or c >= len(text) or not (is_word(text[c - 1]) and is_word(text[c]))

    def valid(a: int, e: int) -> bool:
        inner = text[offs[a]:offs[e - 1]]  # every token but the last: no newline, no sentence end
        return (boundary(offs[a]) and boundary(offs[e]) and text[offs[a]:offs[a + 1]].strip() != ""
                and text[offs[a]:offs[a + 1]].strip()[0] not in ",.;:!?)]}"
                and text[offs[e - 1]:offs[e]].strip() != "" and "\n" not in inner
                and not any(c in inner for c in ".!?"))

    good = [(a, e) for a in range(first, n) for e in range(a + 1, n + 1)
            if valid(a, e) and any(as_str(ids[a:e]) in d for d in docs)]
    return [(a, e) for a, e in good
            if not any(a2 <= a and e <= e2 and (a2, e2) != (a, e) for a2, e2 in good)]


def brute_ms(ids: list[int], docs: list[str]) -> list[int]:
    out = []
    for i in range(len(ids)):
        L = 0
        while i + L < len(ids) and any(as_str(ids[i:i + L + 1]) in d for d in docs):
            L += 1
        out.append(L)
    return out


def fast_spans(index: SI.SpanIndex, ids: list[int], first: int = 0, min_words: int = 0) -> list[tuple[int, int]]:
    text, offs = S.token_offsets(index.tokenizer, ids)
    return [(s.start, s.end) for s in S.find_spans(index, ids, text, offs, first, min_words=min_words)[0]]


def check_against_oracle(index: SI.SpanIndex, ids: list[int], first: int = 0) -> list[tuple[int, int]]:
    # one string, documents joined by a code point no token maps to: one scan instead of one per document
    docs = [chr(0x10000 + 65535).join(doc_strings(index.corpus))]
    ms, _ = index.matching_statistics(ids, first)
    want_ms = brute_ms(ids, docs)
    want_ms[:first] = [0] * first
    assert ms.tolist() == want_ms, f"matching statistics differ at {np.flatnonzero(ms != np.array(want_ms))[:5]}"
    text, offs = S.token_offsets(index.tokenizer, ids)
    got, want = fast_spans(index, ids, first), brute_spans(ids, text, offs, first, docs)
    assert got == want, f"spans differ:\n got  {got}\n want {want}"
    # the default keeps spans with at least one word: the same list, punctuation-only spans dropped
    worded = [(a, e) for a, e in want if any(is_word(c) for c in text[offs[a]:offs[e]])]
    assert fast_spans(index, ids, first, min_words=1) == worded
    return worded


TINY_SHARDS = 24 * 80  # --max_memory that makes shards of <= 80 tokens (BUILD_BYTES_PER_TOKEN = 24)


@pytest.fixture(params=["one shard", "sharded"])
def random_index(tmp_path: Path, request):
    rng = random.Random(0)
    alphabet = "ab c.\n"
    docs = ["".join(rng.choice(alphabet) for _ in range(rng.randint(20, 120))) for _ in range(6)]
    d = make_docs_dataset(tmp_path / "rand", docs)
    SI.build_index(d, log=lambda m: None, max_memory=TINY_SHARDS if request.param == "sharded" else "1G")
    index = SI.SpanIndex(d)
    assert (len(index.shards) > 2) == (request.param == "sharded")
    return index, docs, rng


# ---------------------------------------------------------------- index: count / locate


def test_count_and_locate_match_a_scan(random_index):
    index, docs, rng = random_index
    tok = index.tokenizer
    text = "".join(docs)
    queries = [text[i:i + L] for i in range(0, len(text) - 8, 7) for L in (1, 2, 4, 8)]
    queries += ["zz" if "z" in tok.stoi else "a" * 30, "ab c"]
    # sequences that exist only across a document boundary must not count
    for i in range(len(docs) - 1):
        queries.append(docs[i][-3:] + docs[i + 1][:3])
    checked = 0
    for q in queries:
        ids = tok.encode(q)
        want = brute_count(index.corpus, ids)
        count, sources = index.locate(ids, k=1000)
        assert count == len(want), f"count({q!r}) = {count}, scan says {len(want)}"
        assert [s["token_start"] for s in sources] == want
        for s in sources:
            loc = index.corpus.locate("train", s["token_start"], s["token_end"])
            assert (s["doc"], s["char_offset"], s["line"], s["text"]) == (loc.doc, loc.char_offset, loc.line, loc.text)
            assert s["text"] == q
        checked += count
    assert checked > 100  # the queries did find things


def test_boundary_crossing_never_matches(tmp_path):
    docs = ["the cat sat on the mat hello wor", "ld again and again the dog", "hello world"]
    index_dir = SI.build_index(make_docs_dataset(tmp_path / "b", docs), log=lambda m: None)
    index = SI.SpanIndex(tmp_path / "b", index_dir)
    tok = index.tokenizer
    assert index.count(tok.encode("hello wor")) == 2
    assert index.count(tok.encode("wor" + "ld")) == 1  # only inside doc 2
    assert index.count(tok.encode("hello world again")) == 0
    assert index.count(tok.encode("dog" + "hello")) == 0
    ids = tok.encode("hello world again and again")
    assert check_against_oracle(index, ids) == [(0, 11), (12, 27)]


def test_sa_is_sorted_and_complete(random_index):
    index, _, _ = random_index
    for shard in index.shards:
        text, sa = np.asarray(shard.arrays.text).tolist(), np.asarray(shard.arrays.sa).tolist()
        assert sorted(sa) == list(range(len(text)))
        suffixes = [text[p:] for p in sa]
        assert suffixes == sorted(suffixes)


# ---------------------------------------------------------------- spans vs brute force


def test_spans_random_texts(random_index):
    index, docs, rng = random_index
    tok = index.tokenizer
    alphabet = "ab c.\n"
    n_spans = 0
    for trial in range(25):
        pieces = []
        while sum(map(len, pieces)) < 60:  # copied pieces, mutations, boundary-straddling bits
            kind = rng.random()
            d = rng.choice(docs)
            i = rng.randrange(len(d))
            if kind < 0.5:
                pieces.append(d[i:i + rng.randint(3, 25)])
            elif kind < 0.7:
                j = rng.randrange(len(docs) - 1)
                pieces.append(docs[j][-rng.randint(1, 6):] + docs[j + 1][:rng.randint(1, 6)])
            else:
                pieces.append("".join(rng.choice(alphabet) for _ in range(rng.randint(1, 5))))
        ids = tok.encode("".join(pieces))
        first = rng.choice([0, 0, 5])
        n_spans += len(check_against_oracle(index, ids, first))
    assert n_spans > 50


def test_spans_at_start_end_and_repeated(tmp_path):
    docs = ["Speak, speak.\nYou are all resolved rather to die than to famish?\n", "Resolved. resolved.\n"]
    d = make_docs_dataset(tmp_path / "e", docs)
    SI.build_index(d, log=lambda m: None)
    index = SI.SpanIndex(d)
    tok = index.tokenizer
    text = "You are all resolved. Speak, speak. Speak, speak. to die than to famish"
    spans = check_against_oracle(index, tok.encode(text))
    got = [text[a:e] for a, e in spans]
    assert got[0] == "You are all resolved"  # at the very start
    assert got[-1] == "to die than to famish"  # at the very end
    assert got.count("Speak, speak.") == 2  # repeated span found twice
    assert "resolved." in got


def test_spans_real_text(tmp_path, mirror):
    text = (mirror / "tinyshakespeare" / "input.txt").read_text()[:40000]
    docs = text.split("\n\n")[:300]  # real document boundaries at the speeches
    d = make_docs_dataset(tmp_path / "ts", docs, CharTokenizer.from_text(text))
    SI.build_index(d, log=lambda m: None)
    index = SI.SpanIndex(d)
    rng = random.Random(1)
    for _ in range(4):
        i = rng.randrange(len(text) - 200)
        sample = text[i:i + 50] + " and the " + text[i + 300:i + 340]  # copied, joined, straddling speeches
        check_against_oracle(index, index.tokenizer.encode(sample))


def test_spans_bpe(tmp_path, mirror):
    tok = GPT2Tokenizer(mirror / "gpt2")
    shakespeare = (mirror / "tinyshakespeare" / "input.txt").read_text()[:12000].replace("citizens", "citoyens, café ☕")
    docs = ["The quick brown fox jumps over the lazy dog. It was a bright cold day in April.",
            "It was the best of times, it was the worst of times.\nCall me Ishmael.",
            "Some years ago, never mind how long precisely, the lazy dog slept.", shakespeare]
    d = make_docs_dataset(tmp_path / "bpe", docs, tok)
    SI.build_index(d, log=lambda m: None)
    index = SI.SpanIndex(d)
    assert index.meta["separator"] == 50257 and not index.is_char
    sample = ("It was a bright cold day in April. The quick brown fox slept. it was the worst of times."
              " Call me Ishmael. never mind how long")
    spans = check_against_oracle(index, tok.encode(sample))
    ids = tok.encode(sample)
    texts = [tok.decode(ids[a:e]).strip() for a, e in spans]
    # token-level matching: " It" (after a space in the data) is not "It" (text start), as in OLMoTrace
    assert "was a bright cold day in April." in texts and "it was the worst of times." in texts
    # locations from the stored prefix counts equal Corpus.locate, past several 1024-token strides and
    # multi-byte characters (a GPT-2 token may hold part of one)
    ids_all = np.asarray(index.corpus.tokens("train"))
    assert len(ids_all) > 3 * SA.COUNT_STRIDE
    for p in range(0, len(ids_all) - 5, 97):
        got = index.location(p, 5).to_dict()
        want = index.corpus.locate("train", p, p + 5).to_dict()
        assert got == want, (p, got, want)


# ---------------------------------------------------------------- selection, coverage, highlights


def test_trace_selection_and_coverage(random_index):
    index, docs, rng = random_index
    ids = index.tokenizer.encode(docs[0][:40] + " cc " + docs[1][10:60])
    text, offs = S.token_offsets(index.tokenizer, ids)
    all_spans, _ = S.find_spans(index, ids, text, offs)
    unigram = sum(sh.arrays.unigram for sh in index.shards)
    for min_len, density in ((1, 0.05), (3, 0.2), (5, 1.0)):
        tr = S.trace_text(index, ids, min_len=min_len, density=density)
        long = [s for s in all_spans if s.end - s.start >= min_len]
        want = sorted(long, key=lambda s: (s.logprob, s.start))[:int(np.ceil(density * len(ids)))]
        assert [(s.start, s.end) for s in tr.spans] == sorted((s.start, s.end) for s in want)
        covered = set()
        for s in long:
            covered |= set(range(s.start, s.end))
        assert abs(tr.coverage - len(covered) / len(ids)) < 1e-12
        for s in tr.spans:
            want_lp = sum(np.log((unigram[t] + 1) / (unigram.sum() + len(unigram)))
                          for t in ids[s.start:s.end])
            assert abs(s.logprob - want_lp) < 1e-9
            assert s.count == len(brute_count(index.corpus, ids[s.start:s.end]))
            assert all(src["text"] == tok_text for src in s.sources for tok_text in [index.tokenizer.decode(ids[s.start:s.end])])
        for (a, b), (c, d) in zip(tr.highlights, tr.highlights[1:]):
            assert b < c
    assert R.merge_ranges([(0, 3), (2, 5), (7, 9), (9, 10)]) == [(0, 5), (7, 10)]


# ---------------------------------------------------------------- canaries


def test_canaries_found_at_their_planted_location(tmp_path, mirror):
    sys.path.insert(0, str(REPO / "benchmarks"))
    from canaries import prepare_canary_dataset

    data_dir, canaries = prepare_canary_dataset(tmp_path / "can", n=8, seed=3, repeats=2)
    SI.build_index(data_dir, log=lambda m: None)
    index = SI.SpanIndex(data_dir)
    # a hand-made "generation": Shakespeare-ish glue with five of the canaries inside it
    gen = "ROMEO:\nWhat say you?\n" + "\nAnd so, my lord.\n".join(c["text"] for c in canaries[:5]) + "\nExeunt\n"
    tr = S.trace_text(index, index.tokenizer.encode(gen), min_len=12, density=1.0)
    for c in canaries[:5]:
        hits = [s for s in tr.spans if s.text == c["text"]]
        assert hits, f"canary {c['text']!r} not found as a span"
        assert hits[0].count == 2
        assert sorted(src["char_offset"] for src in hits[0].sources) == c["char_offsets"]
        assert sorted(src["line"] for src in hits[0].sources) == c["lines"]


# ---------------------------------------------------------------- on-disk index and bad input


def test_prepared_data_rewritten_in_place_is_noticed(tmp_path):
    """meta.json's fingerprint is trusted while the data files are as they were; a train.bin rewritten
    in place with the same size (so the recorded sizes still match) must make the index stale, while a
    file merely touched (same bytes, new mtime) keeps it fresh after one cached re-fingerprint."""
    import os

    from glassgpt.prepare import main as prepare

    text = tmp_path / "in.txt"
    text.write_text("First Citizen: Before we proceed any further, hear me speak.\n" * 40)
    data = tmp_path / "d"
    prepare(["shakespeare_char", f"--input={text}", f"--out_dir={data}"])
    assert json.loads((data / "meta.json").read_text())["fingerprint"].startswith("sha256:")
    SI.build_index(data, log=lambda m: None)
    SI.SpanIndex(data)
    train = data / "train.bin"
    st = train.stat()
    os.utime(train, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # touched: same bytes
    SI.SpanIndex(data)
    ids = np.fromfile(train, dtype=np.uint16)
    ids[[3, 4]] = ids[[4, 3]]  # same size, new contents, written in place
    with open(train, "r+b") as f:
        f.write(ids.tobytes())
    assert train.stat().st_size == st.st_size
    with pytest.raises(UserError, match="span index .* is stale: the training data changed.*trace-spans --build"):
        SI.SpanIndex(data)
    assert run_main(S.main, [f"--data_dir={data}", "--text=First Citizen"]) == 2
    SI.build_index(data, log=lambda m: None)  # the rebuild records the data as it is now
    SI.SpanIndex(data)


def test_index_refused_when_data_changes(tmp_path, char_dataset):
    with pytest.raises(UserError, match="--build --data_dir"):
        SI.SpanIndex(char_dataset)
    SI.build_index(char_dataset, log=lambda m: None)
    side = json.loads((char_dataset / "spans" / "train.index.json").read_text())
    assert side["built_from"]["data"].startswith("sha256:")
    SI.SpanIndex(char_dataset)
    ids = np.fromfile(char_dataset / "train.bin", dtype=np.uint16)
    ids[5], ids[6] = ids[6], ids[5]  # same size, new contents
    ids.tofile(char_dataset / "train.bin")
    with pytest.raises(UserError, match="changed since it was built.*rebuild it with"):
        SI.SpanIndex(char_dataset)
    assert run_main(S.main, [f"--data_dir={char_dataset}", "--build"]) == 0
    SI.SpanIndex(char_dataset)
    (char_dataset / "spans" / "train.shard-00000" / "buckets.npy").unlink()  # an interrupted copy...
    with pytest.raises(UserError, match="incomplete.*buckets.npy missing.*--build"):
        SI.SpanIndex(char_dataset)


def test_cli_text_and_json(tmp_path, char_dataset, capsys):
    args = [f"--data_dir={char_dataset}"]
    assert run_main(S.main, args + ["--text=Before we proceed"]) == 2
    assert "glassgpt trace-spans --build" in capsys.readouterr().err
    assert run_main(S.main, args + ["--build"]) == 0
    capsys.readouterr()
    assert run_main(S.main, args + ["--text=You are all resolved rather to die. Hmm, speak.", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [(s["text"], s["char_start"], s["char_end"]) for s in out["spans"]] == [
        ("You are all resolved rather to die", 0, 34)]
    src = out["spans"][0]["sources"][0]
    assert {"doc_id", "token_start", "token_end", "line", "context_before", "context_after"} <= set(src)
    assert run_main(S.main, args + ["--locate=Speak, speak.", "--json", "--max_sources=2"]) == 0
    out = json.loads(capsys.readouterr().out)
    corpus = Corpus(char_dataset)
    want = brute_count(corpus, corpus.tokenizer.encode("Speak, speak."))
    got = [s["token_start"] for s in out["sources"]]  # a seeded sample of 2, in split order
    assert out["count"] == len(want) > 2 and len(got) == 2 and got == sorted(got) and set(got) <= set(want)
    assert run_main(S.main, args + ["--locate=Speak, speak."]) == 0
    assert f"{len(want)} occurrence(s)" in capsys.readouterr().out
    (tmp_path / "t.txt").write_text("First Citizen:\nSpeak, speak.\n")
    assert run_main(S.main, args + [f"--text=FILE:{tmp_path / 't.txt'}"]) == 0
    assert "[First Citizen:]" in capsys.readouterr().out  # brackets: not a tty
    # bad input: one line, exit 2
    for bad, msg in (("--text=", "nothing to trace"), ("--text=   ", "nothing to trace"),
                     ("--text=Speak", "min_len=12 is longer"), ("--text=FILE:/nonexistent", "does not exist")):
        assert run_main(S.main, args + [bad]) == 2
        err = capsys.readouterr().err
        assert msg in err and err.count("\n") == 1, err


def test_cli_generates_from_checkpoint(tmp_path, char_dataset, char_checkpoint, capsys):
    assert run_main(S.main, [f"--out_dir={char_checkpoint}", "--build", "--start=First",
                             "--max_new_tokens=30", "--min_len=1", "--include_prompt", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["text"].startswith("First") and len(out["text"]) == 35 and out["generation_start"] == 5
    corpus = Corpus(char_dataset)
    for s in out["spans"]:  # a random model: whatever it found must be real and correctly counted
        assert out["text"][s["char_start"]:s["char_end"]] == s["text"]
        assert s["count"] == len(brute_count(corpus, corpus.tokenizer.encode(s["text"]))) >= 1, s
    for bad, msg in (("--max_new_tokens=0", "max_new_tokens >= 1"), ("--start=", "no <|endoftext|>"),
                     ("--density=0", "0 < density <= 1")):
        assert run_main(S.main, [f"--out_dir={char_checkpoint}", bad]) == 2
        err = capsys.readouterr().err
        assert msg in err and err.count("\n") == 1, err
    other = make_char_dataset(tmp_path / "other", text="a different vocabulary entirely\n" * 20)
    assert run_main(S.main, [f"--out_dir={char_checkpoint}", f"--data_dir={other}", "--build", "--start=a"]) == 2
    assert "different tokenizers" in capsys.readouterr().err


def test_sa_range_near_equals_full_search(random_index):
    index, docs, rng = random_index
    ids = index.tokenizer.encode("".join(docs))
    seqs = [ids[i:i + L] for i in range(0, len(ids) - 10, 3) for L in (1, 2, 3, 6)]
    widest = 0
    for shard in index.shards:
        lo, hi = SA.sa_range(shard.arrays, seqs)
        anchors = np.array([rng.randint(l, h) for l, h in zip(lo, hi)])  # anywhere in [lo, hi]
        lo2, hi2 = SA.sa_range_near(shard.arrays, seqs, anchors)
        assert lo2.tolist() == lo.tolist() and hi2.tolist() == hi.tolist()
        widest = max(widest, max(hi - lo))
    assert widest > 10  # some ranges are wide enough to gallop


def test_one_search_over_all_shards_equals_a_search_per_shard(random_index):
    """suffix_array.Stack (every shard in one vectorised search) against the plain one-shard search, shard by shard."""
    index, docs, rng = random_index
    ids = index.tokenizer.encode("".join(docs))
    text = ids[5:60] + ids[200:230] + ids[::7][:40]
    ms, lb = SA.matching_statistics(index.stack, text, first=3)
    seqs = [ids[i:i + L] for i in range(0, len(ids) - 10, 5) for L in (0, 1, 3, 7)]
    lo, hi = SA.sa_range(index.stack, seqs)
    for j, shard in enumerate(index.shards):
        ms_j, lb_j = SA.matching_statistics(shard.arrays, text, first=3)
        assert ms[j].tolist() == ms_j.tolist() and lb[j].tolist() == lb_j.tolist(), f"shard {j}"
        lo_j, hi_j = SA.sa_range(shard.arrays, seqs)
        assert lo[j].tolist() == lo_j.tolist() and hi[j].tolist() == hi_j.tolist(), f"shard {j}"
    assert ms.max() > 10 and (hi - lo).max() > 10  # long matches and wide ranges were searched
    # ranges from the anchors of every shard at once, as find_spans asks for them
    starts = list(range(3, len(text) - 4, 4))
    near = index.ranges([text[s:s + 4] for s in starts], starts, (ms, lb))
    for s, got in zip(starts, near):
        lo_s, hi_s = SA.sa_range(index.stack, [text[s:s + 4]])
        assert got == [(j, int(a), int(b)) for j, (a, b) in enumerate(zip(lo_s[:, 0], hi_s[:, 0])) if b > a]


def test_bucket_table_matches_the_suffix_array(random_index):
    index, _, _ = random_index
    for a in (shard.arrays for shard in index.shards):
        assert a.bucket_k == 6  # a 6-letter vocabulary: 8^6 keys fit the table (tiny-shakespeare: k = 3)
        text = np.asarray(a.text).tolist()
        for i, p in enumerate(np.asarray(a.sa).tolist()):
            digits = [text[p + j] + 1 if p + j < len(text) else 0 for j in range(a.bucket_k)]
            key = 0
            for d in digits:
                key = key * (a.separator + 2) + d
            assert a.buckets[key] <= i < a.buckets[key + 1], (i, p, digits)


def test_plant_canaries_offsets_and_lines():
    sys.path.insert(0, str(REPO / "benchmarks"))
    from canaries import plant_canaries
    from conftest import TINY_TEXT

    new, canaries = plant_canaries(TINY_TEXT, n=3, seed=1, repeats=2)
    assert len(canaries) == 3 and all(c["text"] not in TINY_TEXT for c in canaries)
    removed = new
    for c in canaries:
        assert len(c["char_offsets"]) == 2 and c["char_offset"] == c["char_offsets"][0]
        for off, line in zip(c["char_offsets"], c["lines"]):
            assert new[off:off + len(c["text"]) + 1] == c["text"] + "\n" and (off == 0 or new[off - 1] == "\n")
            assert new.count("\n", 0, off) + 1 == line
        removed = removed.replace(c["text"] + "\n", "")
    assert removed == TINY_TEXT  # nothing else changed


# ---------------------------------------------------------------- shards: equal to one index, resumable, checked


@pytest.fixture
def bpe_docs(tmp_path, mirror) -> Path:
    text = (mirror / "english" / "sotu_mobydick.jsonl").read_text().splitlines()[:3]
    body = " ".join(json.loads(line)["text"] for line in text)[:30000]
    # 40 documents, each text 5 times (and overlapping its neighbours): spans occur in several shards
    docs = [body[(i % 8) * 700:(i % 8) * 700 + 900] + f" (copy {i})" for i in range(40)]
    return make_docs_dataset(tmp_path / "bpe", docs, GPT2Tokenizer(mirror / "gpt2"))


def test_sharded_answer_equals_single_index(tmp_path, bpe_docs):
    one = SI.SpanIndex(bpe_docs, SI.build_index(bpe_docs, tmp_path / "one", log=lambda m: None))
    many = SI.SpanIndex(bpe_docs, SI.build_index(bpe_docs, tmp_path / "many", log=lambda m: None,
                                                     max_memory=2 * 24 * 1500, num_proc=2))
    assert len(one.shards) == 1 and len(many.shards) >= 5
    corpus = Corpus(bpe_docs)
    rng = random.Random(0)
    toks = np.asarray(corpus.tokens("train"))
    sampled = spread = 0
    for trial in range(6):
        pieces = [toks[p:p + rng.randint(5, 40)].tolist() for p in rng.sample(range(len(toks) - 50), 6)]
        text = corpus.tokenizer.decode(sum(pieces, [])) + " and so on"
        for seed in (0, 1):
            a = S.explain(one, text, max_sources=3, density=1.0, seed=seed)
            b = S.explain(many, text, max_sources=3, density=1.0, seed=seed)
            assert a == b  # spans, counts, the sampled sources, coverage: the same dict
        sampled += sum(s["count"] > 3 for s in a["spans"])
        ids = corpus.tokenizer.encode(text)
        _, ranges = S.find_spans(many, ids, *S.token_offsets(many.tokenizer, ids))
        spread += sum(len({j for j, _, _ in r}) > 1 for r in ranges)
    assert sampled > 5  # the sample of 3 sources was a real choice
    assert spread > 5  # and spans were found in several shards by the one search over all of them
    for seq in (toks[100:104].tolist(), toks[5000:5002].tolist()):
        assert one.locate(seq, 5, seed=7) == many.locate(seq, 5, seed=7)
        assert one.count(seq) == many.count(seq) == len(brute_count(corpus, seq))


def test_sources_are_a_uniform_sample_over_shards(tmp_path):
    docs = ["xyz abc"] * 30  # 30 occurrences, one per document, shards of a few documents each
    d = make_docs_dataset(tmp_path / "u", docs)
    index = SI.SpanIndex(d, SI.build_index(d, log=lambda m: None, max_memory=24 * 40))
    assert len(index.shards) >= 6
    seen = set()
    for seed in range(40):
        count, src = index.locate(index.tokenizer.encode("xyz"), k=3, seed=seed)
        assert count == 30 and len(src) == 3
        seen |= {s["doc"] for s in src}
    assert len(seen) > 25  # every shard contributes, not just the first ones


def test_build_resumes_keeping_fresh_shards(tmp_path, bpe_docs, monkeypatch):
    built: list[str] = []
    real = SI.build_shard

    def interrupted(*args):
        if len(built) == 3:
            raise KeyboardInterrupt  # the user's Ctrl-C (or a kill) during the 4th shard
        built.append(args[3])
        return real(*args)

    monkeypatch.setattr(SI, "build_shard", interrupted)
    with pytest.raises(KeyboardInterrupt):
        SI.build_index(bpe_docs, log=lambda m: None, max_memory=24 * 1500)
    with pytest.raises(UserError, match="no span index"):  # not usable half-built
        SI.SpanIndex(bpe_docs)
    kept = {p: (Path(p) / "sa.bin").stat().st_ino for p in built}
    built.clear()
    logs: list[str] = []
    monkeypatch.setattr(SI, "build_shard", lambda *a: (built.append(a[3]), real(*a))[1])
    SI.build_index(bpe_docs, log=logs.append, max_memory=24 * 1500)
    index = SI.SpanIndex(bpe_docs)
    assert "3 already built" in logs[0] and len(built) == len(index.shards) - 3
    assert not set(built) & set(kept)
    assert {p: (Path(p) / "sa.bin").stat().st_ino for p in kept} == kept  # untouched files
    fresh = SI.SpanIndex(bpe_docs, SI.build_index(bpe_docs, tmp_path / "fresh", log=lambda m: None,
                                                      max_memory=24 * 1500))
    text = Corpus(bpe_docs).decode("train", 200, 400)
    assert S.explain(index, text) == S.explain(fresh, text)
    # a rebuild with another plan replaces every shard and removes the ones it no longer needs
    SI.build_index(bpe_docs, log=lambda m: None, max_memory="1G")
    assert len(SI.SpanIndex(bpe_docs).shards) == 1 and len(list((bpe_docs / "spans").glob("train.shard-*"))) == 1


@pytest.mark.parametrize("name", ["tokens.bin", "sa.bin", "seps.npy", "buckets.npy", "unigram.npy", "checkpoints.npy"])
@pytest.mark.parametrize("cut", ["unaligned", "aligned"])
def test_truncated_index_is_one_clear_line(tmp_path, char_dataset, capsys, name, cut):
    SI.build_index(char_dataset, log=lambda m: None, max_memory=24 * 20000)
    path = sorted((char_dataset / "spans").glob("train.shard-*"))[-1] / name
    data = path.read_bytes()
    path.write_bytes(data[:-1] if cut == "unaligned" else data[:-16])  # 16: a whole number of every dtype
    with pytest.raises(UserError, match="span index is damaged.*rebuild it with `glassgpt trace-spans --build"):
        SI.SpanIndex(char_dataset)
    assert run_main(S.main, [f"--data_dir={char_dataset}", "--text=Speak, speak, you are all resolved"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "damaged" in err and "Traceback" not in err
    logs: list[str] = []  # a rebuild keeps the whole shards and rebuilds the damaged one
    SI.build_index(char_dataset, log=logs.append, max_memory=24 * 20000)
    n = len(SI.SpanIndex(char_dataset).shards)
    assert f"{n - 1} already built" in logs[0] and "1 built now" in logs[-1]


def test_shard_plan_keeps_documents_whole_and_memory_bounded():
    segs = np.array([[i, 0, 0, 0, 1] for i in range(7)], dtype=np.int64)
    lengths = [5, 50, 3, 3, 3, 200, 1]
    segs[:, 2] = np.cumsum(lengths)
    segs[:, 1] = segs[:, 2] - lengths
    plan = SI.plan_shards(segs, 60)
    assert plan == [(0, 2), (2, 5), (5, 6), (6, 7)]  # contiguous, whole documents; 200 > 60 alone
    assert SI.parse_bytes("8G") == 8 << 30 and SI.parse_bytes("500MiB") == 500 << 20 and SI.parse_bytes(1024) == 1024
    for bad in ("lots", "0", "-5G"):
        with pytest.raises(UserError, match="--max_memory"):
            SI.parse_bytes(bad)


def test_span_query_on_prepared_data_does_not_import_torch(char_dataset):
    import subprocess

    SI.build_index(char_dataset, log=lambda m: None)
    code = ("import sys; from glassgpt.trace import spans; "
            f"spans.main(['--data_dir={char_dataset}', '--text=Speak, speak, you are all resolved', '--json']); "
            "spans.main(['--help']); assert 'torch' not in sys.modules, 'torch imported'")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr


def test_an_index_of_the_previous_format_is_one_rebuild_line(char_dataset):
    """An index written before the artifact protocol (glassgpt-spans/3) is refused with the command
    that rebuilds it, and the rebuild replaces its shards (their sidecars are of the old layout too)."""
    SI.build_index(char_dataset, log=lambda m: None)
    side = char_dataset / "spans" / "train.index.json"
    meta = json.loads(side.read_text())
    side.write_text(json.dumps({**meta, "format": "glassgpt-spans/3"}))
    shard = char_dataset / "spans" / "train.shard-00000" / "shard.json"
    old = json.loads(shard.read_text())
    shard.write_text(json.dumps({"format": "glassgpt-spans/3", "data": old["built_from"]["data"], **old["params"],
                                 **{k: old[k] for k in ("n_text", "n_segments", "sa_dtype", "bucket_k")}}))
    with pytest.raises(UserError, match=r"not a glassgpt-spans/4 span index.*rebuild it with `glassgpt trace-spans "
                                        r"--build --data_dir="):
        SI.SpanIndex(char_dataset)
    logs: list[str] = []
    SI.build_index(char_dataset, log=logs.append)
    assert "0 already built" in logs[0]
    SI.SpanIndex(char_dataset)


def test_build_reports_progress_in_tokens(char_dataset):
    seen: list[tuple[int, int, str]] = []
    SI.build_index(char_dataset, log=lambda m: None, progress=lambda n, total, what: seen.append((n, total, what)))
    n_tokens = len(np.fromfile(char_dataset / "train.bin", dtype=np.uint16))
    assert seen[0][0] == 0 and seen[-1][0] == seen[-1][1] and len(seen) >= 2, seen
    assert n_tokens - 50 <= seen[-1][1] <= n_tokens and seen[-1][2] == "span shards"
