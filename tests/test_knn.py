"""trace-knn: windows, embeddings, search (fast paths vs slow oracles), the store's life cycle, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import make_checkpoint
from glassgpt import cli
from glassgpt.corpus import Corpus, write_json, write_segments
from glassgpt.errors import UserError
from glassgpt.hooks import record
from glassgpt.model import GPT, GPTConfig
from glassgpt.tokenizer import CharTokenizer
from glassgpt.trace import knn

DOCS = [
    "Alpha doc.\nIt has two lines and then some more words to make it long enough.\n",
    "Bee.\n",  # shorter than a window
    "Cee document, a third one,\nwith\nseveral\nshort lines\nand a longer tail of text here.\n" * 2,
]


def make_multidoc_dataset(data_dir: Path) -> Path:
    """Three documents; the third is cut into two segments (as a train/val split cuts a document)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    tok = CharTokenizer.from_text("".join(DOCS))
    ids, segs = [], []
    for d, text in enumerate(DOCS):
        cuts = [0, len(text) // 2 + 3, len(text)] if d == 2 else [0, len(text)]
        for a, b in zip(cuts, cuts[1:]):
            segs.append([d, len(ids), len(ids) + (b - a), a, 1 + text[:a].count("\n")])
            ids += tok.encode(text[a:b])
    np.array(ids, dtype=np.uint16).tofile(data_dir / "train.bin")
    write_segments(data_dir, "train", segs)
    write_json(data_dir / "meta.json", {**tok.meta(), "format": "glassgpt-data/1"})
    write_json(data_dir / "documents.json",
               [{"id": f"doc{d}", "source": f"doc{d}.txt", "char_offset": 0, "line": 1} for d in range(len(DOCS))])
    return data_dir


def tiny_model(vocab: int = 40, block_size: int = 16, n_layer: int = 2) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(block_size=block_size, vocab_size=vocab, n_layer=n_layer, n_head=2, n_embd=24,
                         bias=False)).eval()


# ------------------------------------------------------------------------------------------ windows


@pytest.mark.parametrize("context,stride", [(16, 8), (16, 16), (10, 3), (64, 32)])
def test_windows_never_cross_segments_and_cover_every_token(tmp_path, context, stride):
    corpus = Corpus(make_multidoc_dataset(tmp_path / "d"))
    segs = corpus.segments("train")
    spans = knn.window_spans(segs, context, stride)
    covered = np.zeros(len(corpus.tokens("train")), dtype=bool)
    for doc, s, e in spans:
        inside = [seg for seg in segs if seg[1] <= s and e <= seg[2]]
        assert len(inside) == 1 and inside[0][0] == doc, f"window {s}:{e} crosses a segment boundary"
        assert 0 < e - s <= context
        covered[s:e] = True
    assert covered.all(), f"{(~covered).sum()} tokens in no window"
    # each segment contributes windows every `stride` from its start, the last one reaching its end
    for seg in segs:
        mine = spans[(spans[:, 1] >= seg[1]) & (spans[:, 2] <= seg[2])]
        assert list(mine[:, 1]) == list(range(int(seg[1]), int(seg[1]) + stride * len(mine), stride))
        assert mine[-1, 2] == seg[2] and (len(mine) == 1 or mine[-2, 2] < seg[2])


def test_window_locations_match_corpus_locate(tmp_path):
    corpus = Corpus(make_multidoc_dataset(tmp_path / "d"))
    spans = knn.window_spans(corpus.segments("train"), 12, 5)
    rows = knn.locate_windows(corpus, "train", spans)
    for doc, s, e, char, line in rows:
        loc = corpus.locate("train", int(s), int(e))
        assert (loc.doc, loc.char_offset, loc.line) == (doc, char, line), f"window {s}:{e}"
        # the location really points at the window's text inside its document
        assert DOCS[doc][char:char + (e - s)] == loc.text


# ------------------------------------------------------------------------------------------ embedding


def test_layer_states_match_hook_points_and_hidden_states():
    model = tiny_model(n_layer=3)
    x = torch.randint(0, 40, (2, 11))
    with torch.no_grad():
        torch.testing.assert_close(knn.layer_states(model, x, -1), model.hidden_states(x), rtol=0, atol=0)
        for i in range(3):
            with record(model, [f"blocks.{i}.hook_resid_post"]) as cache:
                model.hidden_states(x)
            torch.testing.assert_close(knn.layer_states(model, x, i), cache[f"blocks.{i}.hook_resid_post"][0])
    assert not any(m._forward_hooks for m in model.modules()), "a hook was left behind"
    with pytest.raises(UserError, match="layer=3 is out of range"):
        knn.layer_states(model, x, 3)


@pytest.mark.parametrize("layer,pooling", [(-1, "mean"), (-1, "last"), (0, "mean")])
def test_embed_windows_equal_per_window_forward(tmp_path, layer, pooling):
    corpus = Corpus(make_multidoc_dataset(tmp_path / "d"))
    model = tiny_model(vocab=corpus.tokenizer.vocab_size)
    spans = knn.window_spans(corpus.segments("train"), 16, 8)
    tokens = corpus.tokens("train")
    emb = knn.embed_windows(model, tokens, spans, layer, pooling, batch_size=3)
    assert emb.dtype == np.float16 and emb.shape == (len(spans), 24)
    with torch.no_grad():
        for r, (_, s, e) in enumerate(spans):
            h = knn.layer_states(model, torch.tensor(tokens[s:e].astype(np.int64))[None], layer)[0]
            v = h.mean(0) if pooling == "mean" else h[-1]
            want = (v / v.norm()).numpy()
            diff = np.abs(emb[r].astype(np.float32) - want).max()
            assert diff < 2e-3, f"window {r} ({s}:{e}): max |diff| {diff:.2e} (float16 storage)"


def test_sliding_window_pooling_equals_manual_computation():
    model = tiny_model(block_size=16)
    ids = torch.randint(0, 40, (45,)).tolist()
    starts = knn.query_window_starts(len(ids), 16, 7)
    assert starts == [0, 7, 14, 21, 28, 29]  # the last window ends exactly at the end of the text
    with torch.no_grad():
        manual = torch.stack([model.hidden_states(torch.tensor([ids[s:s + 16]]))[0].mean(0) for s in starts]).mean(0)
    got = knn.embed_text_ids(model, ids, 16, 7)
    torch.testing.assert_close(torch.from_numpy(got), manual)
    # a text that fits the context is one window; the model's "length > block size" error never comes up
    torch.testing.assert_close(torch.from_numpy(knn.embed_text_ids(model, ids[:9], 16, 7)),
                               model.hidden_states(torch.tensor([ids[:9]]))[0].mean(0).detach())
    knn.embed_text_ids(model, ids * 20, 16, 16)  # 900 tokens, block size 16


# ------------------------------------------------------------------------------------------ search


def random_unit_rows(n: int, d: int, seed: int = 0, clusters: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)).astype(np.float32)
    if clusters:  # embeddings are clustered, not uniform: the harder, realistic case for IVF
        x += 3 * rng.standard_normal((clusters, d)).astype(np.float32)[rng.integers(0, clusters, n)]
    return knn.normalize(x).astype(np.float16)


def brute_force_cosine(emb: np.ndarray, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The slow oracle: every score in float64, a full sort. Stored rows are unit up to float16 rounding,
    and the score is the dot product with them as stored."""
    e = emb.astype(np.float64)
    scores = (q.astype(np.float64) / np.linalg.norm(q, axis=1, keepdims=True)) @ e.T
    ids = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, ids, 1), ids


@pytest.mark.parametrize("chunk_rows", [777, 65536])
def test_exact_search_equals_numpy_brute_force(tmp_path, chunk_rows):
    emb = random_unit_rows(5000, 32)
    np.save(tmp_path / "e.npy", emb)
    mm = np.load(tmp_path / "e.npy", mmap_mode="r")  # searched as a memory map, chunk by chunk
    q = knn.normalize(np.random.default_rng(1).standard_normal((7, 32)))
    s, i = knn.query_exact(mm, q, 10, chunk_rows=chunk_rows)
    want_s, want_i = brute_force_cosine(emb, q, 10)
    np.testing.assert_array_equal(i, want_i)
    torch.testing.assert_close(torch.from_numpy(s).double(), torch.from_numpy(want_s), rtol=0, atol=1e-5)


def test_exact_search_with_duplicate_rows_returns_the_best_scores():
    emb = np.repeat(random_unit_rows(50, 16), 4, axis=0)  # every row 4 times: ties everywhere
    q = knn.normalize(np.random.default_rng(2).standard_normal((3, 16)))
    s, i = knn.query_exact(emb, q, 6, chunk_rows=37)
    want_s, _ = brute_force_cosine(emb, q, 6)
    torch.testing.assert_close(torch.from_numpy(s).double(), torch.from_numpy(want_s), rtol=0, atol=1e-5)
    true = brute_force_cosine(emb, q, len(emb))[0]  # the true scores of the returned ids equal the best ones
    for row, ids in enumerate(i):
        got = np.sort((q[row] @ emb[ids].astype(np.float64).T))[::-1]
        assert np.abs(got - true[row, :6]).max() < 1e-3
        assert len(set(ids)) == 6


@pytest.mark.parametrize("kind,floor", [("hnsw", 0.9), ("ivf", 0.9)])
def test_faiss_recall_against_exact(kind, floor):
    emb = random_unit_rows(20000, 32, clusters=50)
    q = knn.normalize(emb[:200].astype(np.float32) + 0.3 * np.random.default_rng(3).standard_normal((200, 32)))
    _, exact = knn.query_exact(emb, q, 10)
    index = knn.build_faiss_index(emb, kind)
    _, approx = knn.query_faiss(index, q, 10, nprobe=16, ef_search=128)
    recall = knn.recall_at_k(exact, approx)
    print(f"faiss {kind} recall@10 vs exact: {recall:.3f}")
    assert recall >= floor, f"faiss {kind} recall@10 {recall:.3f} < {floor}"


# ------------------------------------------------------------------------------------------ the command


def build(out: Path, *extra: str) -> None:
    knn.main([f"--out_dir={out}", "--build", "--progress=False", *extra])


def test_build_then_trace_finds_an_exact_window(char_checkpoint, capsys):
    build(char_checkpoint)
    store = knn.load_store(char_checkpoint / "knn_train")
    assert isinstance(store.embeddings, np.memmap) and store.embeddings.dtype == np.float16
    assert store.meta["context"] == 32 and store.meta["stride"] == 16 and len(store) == store.meta["n_windows"]
    corpus = Corpus(store.meta["data_dir"])
    _, s, e, _, _ = store.windows[7]
    text = corpus.decode("train", int(s), int(e))
    r = knn.main([f"--out_dir={char_checkpoint}", f"--text={text}", "--k=3", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert out["neighbours"] == r["neighbours"] and out["generated"] is None
    top = out["neighbours"][0]
    # the window itself (or an identical copy: the tiny text repeats) comes first, at cosine ~1
    assert top["text"] == text and abs(top["score"] - 1.0) < 2e-3, top
    for key in ("rank", "score", "doc", "doc_id", "token_start", "token_end", "text", "char_offset", "line"):
        assert key in top
    loc = corpus.locate("train", top["token_start"], top["token_end"])
    assert (loc.char_offset, loc.line, loc.doc_id) == (top["char_offset"], top["line"], top["doc_id"])


def test_start_generates_then_traces_prompt_plus_output(char_checkpoint, capsys):
    build(char_checkpoint)
    r = knn.main([f"--out_dir={char_checkpoint}", "--start=All:", "--max_new_tokens=40", "--k=2",
                  "--temperature=0"])
    assert r["prompt"] == "All:" and len(r["generated"]) == 40 and r["text"] == "All:" + r["generated"]
    assert r["n_tokens"] == 44 and r["n_query_windows"] == 2  # 44 tokens > block_size 32: slid and pooled
    assert "#1  cos" in capsys.readouterr().out


def test_faiss_search_through_the_command(char_checkpoint):
    build(char_checkpoint)
    exact = knn.main([f"--out_dir={char_checkpoint}", "--text=Speak, speak.", "--k=5", "--search=exact"])
    approx = knn.main([f"--out_dir={char_checkpoint}", "--text=Speak, speak.", "--k=5", "--search=faiss"])
    assert approx["search"] == "faiss-hnsw" and (char_checkpoint / "knn_train" / "faiss.hnsw.index").exists()
    assert exact["neighbours"][0]["score"] == pytest.approx(approx["neighbours"][0]["score"], abs=1e-3)


def test_stale_store_is_refused_then_used_only_when_asked(char_checkpoint, char_dataset, capsys):
    build(char_checkpoint)
    make_checkpoint(char_checkpoint, char_dataset, seed=1)  # "training moved on": other weights
    with pytest.raises(UserError, match="stale: built from other weights.*--build.*--allow_stale"):
        knn.main([f"--out_dir={char_checkpoint}", "--text=Speak"])
    capsys.readouterr()
    r = knn.main([f"--out_dir={char_checkpoint}", "--text=Speak", "--allow_stale"])
    assert r["stale"] is True
    err = capsys.readouterr().err
    assert "warning: using a STALE kNN store" in err and len(err.strip().splitlines()) == 1
    build(char_checkpoint)  # rebuilding makes it fresh again
    assert knn.main([f"--out_dir={char_checkpoint}", "--text=Speak"])["stale"] is False


def test_changed_data_makes_the_store_stale(char_checkpoint, char_dataset):
    build(char_checkpoint)
    docs = json.loads((char_dataset / "documents.json").read_text())
    docs[0]["id"] = "renamed"
    write_json(char_dataset / "documents.json", docs)
    with pytest.raises(UserError, match=r"stale: data files changed \(documents.json\)"):
        knn.main([f"--out_dir={char_checkpoint}", "--text=Speak"])


def test_store_built_with_other_settings_is_not_mixed(char_checkpoint):
    build(char_checkpoint, "--pooling=last", "--layer=0", "--context=16", "--stride=4")
    m = knn.load_store(char_checkpoint / "knn_train").meta
    assert (m["pooling"], m["layer"], m["context"], m["stride"]) == ("last", 0, 16, 4)
    with pytest.raises(UserError, match="built with pooling=last, not mean"):
        knn.main([f"--out_dir={char_checkpoint}", "--text=Speak", "--pooling=mean"])
    assert knn.main([f"--out_dir={char_checkpoint}", "--text=Speak"])["neighbours"]  # uses the store's own


def test_bfloat16_store_agrees_with_float32(char_checkpoint):
    build(char_checkpoint)
    f32 = np.asarray(knn.load_store(char_checkpoint / "knn_train").embeddings, dtype=np.float32)
    build(char_checkpoint, "--embed_dtype=bfloat16")
    store = knn.load_store(char_checkpoint / "knn_train")
    assert store.meta["embed_dtype"] == "bfloat16"
    cos = (f32 * np.asarray(store.embeddings, dtype=np.float32)).sum(1)
    print(f"bfloat16 vs float32 window embeddings: min cosine {cos.min():.5f}")
    assert cos.min() > 0.99
    assert knn.main([f"--out_dir={char_checkpoint}", "--text=Speak, speak."])["neighbours"]


# ------------------------------------------------------------------------------------------ bad input


def one_line_error(capsys, argv: list[str], match: str) -> None:
    """Through the real CLI: exit status 2 and exactly one line on stderr."""
    capsys.readouterr()
    assert cli.main(["trace-knn", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and match in err[0], err


def test_query_without_a_store_says_how_to_build_it(char_checkpoint, capsys):
    one_line_error(capsys, [f"--out_dir={char_checkpoint}", "--text=Speak"],
                   f"no kNN store in {char_checkpoint}/knn_train; build it with "
                   f"`glassgpt trace-knn --out_dir={char_checkpoint} --build`")


def test_stale_store_is_one_line(char_checkpoint, char_dataset, capsys):
    build(char_checkpoint)
    make_checkpoint(char_checkpoint, char_dataset, seed=1)
    one_line_error(capsys, [f"--out_dir={char_checkpoint}", "--text=Speak"], "is stale")


def test_unseen_characters(char_checkpoint, capsys):
    build(char_checkpoint)
    one_line_error(capsys, [f"--out_dir={char_checkpoint}", "--text=Speak §µ"], "never saw")


def test_k_larger_than_the_store(char_checkpoint, capsys):
    build(char_checkpoint)
    n = knn.load_store(char_checkpoint / "knn_train").meta["n_windows"]
    one_line_error(capsys, [f"--out_dir={char_checkpoint}", "--text=Speak", f"--k={n + 1}"],
                   f"k={n + 1} but the store has {n} windows")


@pytest.mark.parametrize("damage", ["missing", "truncated", "wrong_shape", "sidecar"])
def test_missing_or_truncated_store_files(char_checkpoint, capsys, damage):
    build(char_checkpoint)
    d = char_checkpoint / "knn_train"
    if damage == "missing":
        (d / "embeddings.npy").unlink()
        match = "embeddings.npy is missing"
    elif damage == "truncated":
        data = (d / "embeddings.npy").read_bytes()
        (d / "embeddings.npy").write_bytes(data[: len(data) // 2])
        match = "embeddings.npy is truncated or corrupt"
    elif damage == "wrong_shape":
        np.save(d / "windows.npy", np.zeros((3, 5), dtype=np.int64))
        match = "the sidecar says"
    else:
        (d / "store.json").write_text('{"format": "glassgpt-knn/1", "n_wi')
        match = "store.json is not valid JSON"
    one_line_error(capsys, [f"--out_dir={char_checkpoint}", "--text=Speak"], match)


def test_other_mistakes_are_one_line(char_checkpoint, capsys):
    build(char_checkpoint)
    one_line_error(capsys, [f"--out_dir={char_checkpoint}"], "nothing to trace")
    one_line_error(capsys, [f"--out_dir={char_checkpoint}", "--text=a", "--start=b"], "not both")
    one_line_error(capsys, [f"--out_dir={char_checkpoint}", "--start="], "the prompt is empty")
    one_line_error(capsys, [f"--out_dir={char_checkpoint}", "--text=FILE:/nonexistent.txt"], "does not exist")
    one_line_error(capsys, [f"--out_dir={char_checkpoint}", "--text=Speak", "--search=fast"], "search='fast'")
    one_line_error(capsys, [f"--out_dir={char_checkpoint}", "--build", "--pooling=max"], "pooling='max'")
    one_line_error(capsys, [f"--out_dir={char_checkpoint}", "--build", "--layer=7"], "layer=7 is out of range")


def test_query_stride_and_threads_are_honoured(char_checkpoint):
    build(char_checkpoint)
    text = "First Citizen:\nBefore we proceed any further, hear me speak.\n"  # 61 tokens, context 32
    default = knn.main([f"--out_dir={char_checkpoint}", f"--text={text}"])
    before = torch.get_num_threads()  # global state: put it back for the other tests
    try:
        fine = knn.main([f"--out_dir={char_checkpoint}", f"--text={text}", "--query_stride=4", "--threads=1"])
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    assert default["n_query_windows"] == len(knn.query_window_starts(61, 32, 16)) == 3
    assert fine["n_query_windows"] == len(knn.query_window_starts(61, 32, 4)) == 9
