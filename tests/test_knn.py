"""trace-knn: windows, embeddings, calibration, BM25 and fusion, search (fast paths vs slow oracles), the
store's life cycle (one process and torchrun), explain/open_store, bad input."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import typing
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_checkpoint

from glassgpt import cli
from glassgpt.corpus import Corpus, write_dataset
from glassgpt.errors import UserError
from glassgpt.model import GPT, GPTConfig
from glassgpt.tokenizer import CharTokenizer
from glassgpt.trace import knn, knn_rank, knn_search, knn_store
from glassgpt.windows import window_starts

REPO = Path(__file__).resolve().parents[1]
DOCS = [
    "Alpha doc.\nIt has two lines and then some more words to make it long enough.\n",
    "Bee.\n",  # shorter than a window
    "Cee document, a third one,\nwith\nseveral\nshort lines\nand a longer tail of text here.\n" * 2,
]


def make_multidoc_dataset(data_dir: Path) -> Path:
    """Three documents; the third is cut into two segments (as a train/val split cuts a document)."""
    tok = CharTokenizer.from_text("".join(DOCS))
    ids, segs = [], []
    for d, text in enumerate(DOCS):
        cuts = [0, len(text) // 2 + 3, len(text)] if d == 2 else [0, len(text)]
        for a, b in zip(cuts, cuts[1:]):
            segs.append([d, len(ids), len(ids) + (b - a), a, 1 + text[:a].count("\n")])
            ids += tok.encode(text[a:b])
    return write_dataset(data_dir, tok.meta(), {"train": ids},
                         [{"id": f"doc{d}", "source": f"doc{d}.txt", "char_offset": 0, "line": 1}
                          for d in range(len(DOCS))], segments={"train": segs}, fingerprint=False)


def tiny_model(vocab: int = 40, block_size: int = 16, n_layer: int = 2) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(block_size=block_size, vocab_size=vocab, n_layer=n_layer, n_head=2, n_embd=24,
                         bias=False)).eval()


def reference_states(model: GPT, idx: torch.Tensor, layer: int) -> torch.Tensor:
    """The slow oracle: the blocks run one by one, as nanoGPT writes them."""
    t = model.transformer
    x = t.wte(idx) + t.wpe(torch.arange(idx.size(1)))
    for block in t.h[:layer]:
        x = block(x)
    return t.ln_f(x) if layer == len(t.h) else x


# ------------------------------------------------------------------------------------------ windows


@pytest.mark.parametrize("context,stride", [(16, 8), (16, 16), (10, 3), (64, 32)])
def test_windows_never_cross_segments_and_cover_every_token(tmp_path, context, stride):
    corpus = Corpus(make_multidoc_dataset(tmp_path / "d"))
    segs = corpus.segments("train")
    spans = knn_store.window_spans(segs, context, stride)
    covered = np.zeros(len(corpus.tokens("train")), dtype=bool)
    for doc, s, e in spans:
        inside = [seg for seg in segs if seg[1] <= s and e <= seg[2]]
        assert len(inside) == 1 and inside[0][0] == doc, f"window {s}:{e} crosses a segment boundary"
        assert 0 < e - s <= context
        covered[s:e] = True
    assert covered.all(), f"{(~covered).sum()} tokens in no window"
    for seg in segs:
        mine = spans[(spans[:, 1] >= seg[1]) & (spans[:, 2] <= seg[2])]
        assert list(mine[:, 1]) == list(range(int(seg[1]), int(seg[1]) + stride * len(mine), stride))
        assert mine[-1, 2] == seg[2] and (len(mine) == 1 or mine[-2, 2] < seg[2])


def test_stride_larger_than_context_is_refused(tmp_path):
    with pytest.raises(UserError, match=r"stride=20 must be between 1 and window=16: .*4 of every 20 tokens in no window"):
        knn_store.window_spans(np.array([[0, 0, 100, 0, 1]]), 16, 20)


def test_window_locations_match_corpus_locate(tmp_path):
    corpus = Corpus(make_multidoc_dataset(tmp_path / "d"))
    spans = knn_store.window_spans(corpus.segments("train"), 12, 5)
    for doc, s, e, char, line in knn_store.locate_windows(corpus, "train", spans):
        loc = corpus.locate("train", int(s), int(e))
        assert (loc.doc, loc.char_offset, loc.line) == (doc, char, line), f"window {s}:{e}"
        assert DOCS[doc][char:char + (e - s)] == loc.text


# ------------------------------------------------------------------------------------------ embedding


@pytest.mark.parametrize("layer,pooling", [(2, "mean"), (2, "last"), (1, "mean"), (0, "mean")])
def test_embed_windows_equal_per_window_reference_forward(tmp_path, layer, pooling):
    corpus = Corpus(make_multidoc_dataset(tmp_path / "d"))
    model = tiny_model(vocab=corpus.tokenizer.vocab_size)
    spans = knn_store.window_spans(corpus.segments("train"), 16, 8)
    tokens = corpus.tokens("train")
    raw = knn_store.embed_windows(model, tokens, spans, layer, pooling, batch_size=3)
    assert raw.shape == (len(spans), 24)
    with torch.no_grad():
        for r, (_, s, e) in enumerate(spans):
            h = reference_states(model, torch.tensor(tokens[s:e].astype(np.int64))[None], layer)[0]
            torch.testing.assert_close(torch.from_numpy(raw[r]), h.mean(0) if pooling == "mean" else h[-1])


def test_query_windows_equal_manual_computation():
    model = tiny_model(block_size=16)
    ids = torch.randint(0, 40, (45,)).tolist()
    starts = window_starts(len(ids), 16, 7)
    assert starts == [0, 7, 14, 21, 28, 29]  # the last window ends exactly at the end of the text
    with torch.no_grad():
        manual = torch.stack([reference_states(model, torch.tensor([ids[s:s + 16]]), 2)[0].mean(0) for s in starts])
    torch.testing.assert_close(torch.from_numpy(knn_store.embed_query(model, ids, 16, 7, 2, "mean")), manual)
    assert knn_store.embed_query(model, ids[:9], 16, 7, 2, "mean").shape == (1, 24)  # fits: one window
    assert knn_store.embed_query(model, ids * 20, 16, 16, 2, "mean").shape[0] == 57  # 900 tokens, block size 16


@pytest.mark.parametrize("kind,dim", [("none", None), ("center", None), ("standardize", None),
                                      ("whiten", None), ("whiten", 5)])
def test_calibration_matches_numpy_formulas(kind, dim):
    rng = np.random.default_rng(0)
    raw = (rng.standard_normal((3000, 8)) * [50, 1, 1, 2, 1, 1, 3, 1] + 7).astype(np.float32)  # a rogue dim
    calib = knn_store.fit_calibration(raw, kind, dim)
    got = knn_store.calibrate(raw, calib)
    x = raw.astype(np.float64)
    if kind == "center":
        x = x - x.mean(0)
    elif kind == "standardize":
        x = (x - x.mean(0)) / x.std(0)
    elif kind == "whiten":
        vals, vecs = np.linalg.eigh(np.cov(x, rowvar=False))
        top = np.argsort(vals)[::-1][:dim or 8]
        x = (x - x.mean(0)) @ vecs[:, top] / np.sqrt(vals[top])
        white = (x - x.mean(0)).T @ (x - x.mean(0)) / (len(x) - 1)
        np.testing.assert_allclose(white, np.eye(len(top)), atol=1e-6)  # whitened: identity covariance
    want = x / np.linalg.norm(x, axis=1, keepdims=True)
    # eigenvectors are defined up to sign: compare |cosines| between rows of got and want
    assert np.abs(np.abs((got * want).sum(1)) - 1).max() < 1e-4 if kind == "whiten" else np.abs(got - want).max() < 1e-5


# ------------------------------------------------------------------------------------------ search


def random_unit_rows(n: int, d: int, seed: int = 0, clusters: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)).astype(np.float32)
    if clusters:  # embeddings are clustered, not uniform: the harder, realistic case for IVF
        x += 3 * rng.standard_normal((clusters, d)).astype(np.float32)[rng.integers(0, clusters, n)]
    return knn_store.normalize(x).astype(np.float16)


@pytest.mark.parametrize("chunk_rows", [777, 65536])
def test_exact_search_equals_numpy_brute_force(tmp_path, chunk_rows):
    emb = random_unit_rows(5000, 32)
    np.save(tmp_path / "e.npy", emb)
    mm = np.load(tmp_path / "e.npy", mmap_mode="r")  # searched as a memory map, chunk by chunk
    q = knn_store.normalize(np.random.default_rng(1).standard_normal((7, 32)))
    scores = knn_search.exact_scores(mm, q, chunk_rows=chunk_rows)
    want = q.astype(np.float64) @ emb.astype(np.float64).T
    print(f"max |score diff| {np.abs(scores - want).max():.2e}")
    assert np.abs(scores - want).max() < 1e-5
    for s, w in zip(scores, want):
        np.testing.assert_array_equal(knn_search.top_ids(s, 10), np.argsort(-s, kind="stable")[:10])
        assert len(set(knn_search.top_ids(s, 10)) & set(np.argsort(-w)[:10])) >= 9


def test_faiss_recall_against_exact():
    emb = random_unit_rows(20000, 32, clusters=50)
    q = knn_store.normalize(emb[:200].astype(np.float32) + 0.3 * np.random.default_rng(3).standard_normal((200, 32)))
    exact = np.stack([knn_search.top_ids(s, 10) for s in knn_search.exact_scores(emb, q)])
    _, approx = knn_search.query_faiss(knn_search.build_faiss_index(emb), emb, q, 10)
    recall = np.mean([len(set(e) & set(a)) / 10 for e, a in zip(exact, approx)])
    print(f"faiss IVF-PQ + re-rank recall@10 vs exact: {recall:.3f}")
    assert recall >= 0.95, f"recall@10 {recall:.3f} < 0.95"


def test_reciprocal_rank_fusion_equals_hand_computation():
    emb = knn_rank.Signal(np.array([3, 1, 2, 0]), np.array([0.1, 0.8, 0.5, 0.9], np.float32))
    bm = knn_rank.Signal(np.array([2, 3, 0, 1]), np.array([1.0, 0.0, 5.0, 2.0], np.float32))
    got = knn_rank.fuse({"embedding": emb, "bm25": bm}, 4, "rrf")
    ranks = {"embedding": {3: 1, 1: 2, 2: 3, 0: 4}, "bm25": {2: 1, 3: 2, 0: 3, 1: 4}}  # from the full scores
    want = sorted(((sum(1 / (knn_rank.RRF_K + r[i]) for r in ranks.values()), i) for i in range(4)),
                  key=lambda t: (-t[0], t[1]))
    assert [i for i, _, _ in got] == [i for _, i in want]
    assert all(abs(s - w) < 1e-12 for (_, s, _), (w, _) in zip(got, want))
    assert [i for i, _, _ in got] == [3, 2, 1, 0]
    assert got[0][2] == {"embedding": {"rank": 1, "score": pytest.approx(0.9)}, "bm25": {"rank": 2, "score": 2.0}}
    assert [i for i, _, _ in knn_rank.fuse({"bm25": bm}, 2)] == [2, 3]  # one signal: its own order
    assert [i for i, _, _ in knn_rank.fuse({"embedding": emb, "bm25": bm}, 4, by="embedding")] == [3, 1, 2, 0]


def test_z_score_fusion_equals_hand_computation():
    e_full, b_full = np.array([0.1, 0.8, 0.5, 0.9], np.float32), np.array([1.0, 0.0, 9.0, 2.0], np.float32)
    got = knn_rank.fuse({"embedding": knn_rank.Signal.of(e_full), "bm25": knn_rank.Signal.of(b_full)}, 4, "z")
    z = (e_full - e_full.mean()) / e_full.std() + (b_full - b_full.mean()) / b_full.std()
    assert [i for i, _, _ in got] == list(np.argsort(-z)) == [2, 3, 1, 0]  # the confident BM25 top wins
    assert all(abs(s - z[i]) < 1e-5 for i, s, _ in got)


# ------------------------------------------------------------------------------------------ the command


def build(out: Path, *extra: str) -> None:
    knn.main([f"--out_dir={out}", "--build", "--progress=False", *extra])


def test_build_then_trace_finds_an_exact_window(char_checkpoint, capsys):
    build(char_checkpoint)
    store = knn_store.load_store(char_checkpoint / "knn_train")
    assert isinstance(store.embeddings, np.memmap) and store.embeddings.dtype == np.float16
    assert (store.meta["context"], store.meta["stride"], store.meta["calibration"]) == (32, 16, "whiten")
    corpus = Corpus(store.meta["built_from"].get("data_dir") or char_checkpoint.parent / "data" / "tiny_char")
    _, s, e, _, _ = store.windows[7]
    text = corpus.decode("train", int(s), int(e))
    for rank in typing.get_args(typing.get_type_hints(knn.TraceKnnConfig)["rank"]):
        capsys.readouterr()
        r = knn.main([f"--out_dir={char_checkpoint}", f"--text={text}", "--k=3", "--json", f"--rank={rank}"])
        out = json.loads(capsys.readouterr().out)
        assert out == json.loads(json.dumps(r)) and out["generated"] is None and out["rank"] == rank
        top = out["neighbours"][0]
        assert top["text"] == text, (rank, top)  # the window itself (or an identical copy: the text repeats)
        assert top["embedding"]["rank"] >= 1 and top["bm25"]["rank"] >= 1  # both signals, whatever the order
        assert top["score"] == (top[rank]["score"] if rank != "hybrid" else top["score"])
    assert abs(out["neighbours"][0]["embedding"]["score"] - 1.0) < 2e-3
    loc = corpus.locate("train", top["token_start"], top["token_end"])
    assert (loc.char_offset, loc.line, loc.doc_id) == (top["char_offset"], top["line"], top["doc_id"])


def test_explain_is_what_json_prints_and_per_window_covers_the_text(char_checkpoint, capsys):
    from glassgpt.run import open_run

    build(char_checkpoint)
    text = "First Citizen:\nBefore we proceed any further, hear me speak.\nAll:\nSpeak, speak.\n"
    capsys.readouterr()
    knn.main([f"--out_dir={char_checkpoint}", f"--text={text}", "--json", "--per_window"])
    printed = json.loads(capsys.readouterr().out)
    run = open_run(str(char_checkpoint))
    got = knn_rank.explain(run, knn_store.open_store(run), text, per_window=True)
    assert {**printed, "query_ms": 0} == json.loads(json.dumps({**got, "query_ms": 0}))
    w = got["per_window"]
    assert len(w) == got["n_query_windows"] == len(window_starts(len(text), 32, 16)) > 2
    assert w[0]["char_start"] == 0 and w[-1]["char_end"] == len(text)
    for part in w:
        assert part["neighbours"] and text[part["char_start"]:part["char_end"]]
    assert "query chars 0:32 ->" in knn.format_result(got)


def test_signals_disagree_is_reported():
    store = knn_store.KnnStore(Path("."), np.zeros((4, 2), np.float16), np.array([[0, 0, 10, 0, 1], [0, 5, 15, 5, 1],
                         [0, 20, 30, 20, 1], [1, 0, 10, 0, 1]]), {}, {})
    agree = {"embedding": knn_rank.Signal(np.array([0])), "bm25": knn_rank.Signal(np.array([1]))}  # windows overlap
    disagree = {"embedding": knn_rank.Signal(np.array([0, 1])), "bm25": knn_rank.Signal(np.array([2, 3]))}
    assert not knn_rank.signals_disagree(store, agree, 1) and knn_rank.signals_disagree(store, disagree, 2)


def test_start_generates_then_traces_prompt_plus_output(char_checkpoint, capsys):
    build(char_checkpoint)
    r = knn.main([f"--out_dir={char_checkpoint}", "--start=All:", "--max_new_tokens=40", "--k=2", "--temperature=0"])
    assert r["prompt"] == "All:" and len(r["generated"]) == 40 and r["text"] == "All:" + r["generated"]
    assert r["n_tokens"] == 44 and r["n_query_windows"] == 2  # 44 tokens > block_size 32: slid and pooled
    assert "#1  tiny line" in capsys.readouterr().out
    fine = knn.main([f"--out_dir={char_checkpoint}", f"--text={r['text']}", "--query_stride=4"])
    assert fine["n_query_windows"] == len(window_starts(44, 32, 4)) == 4


def test_faiss_search_through_the_command(char_checkpoint):
    build(char_checkpoint)
    args = [f"--out_dir={char_checkpoint}", "--text=Speak, speak.", "--k=3", "--rank=embedding"]  # by the model
    exact, approx = knn.main([*args, "--search=exact"]), knn.main([*args, "--search=faiss"])
    assert approx["search"] == "faiss" and (char_checkpoint / "knn_train" / "faiss.ivfpq.index").exists()
    assert exact["neighbours"][0]["score"] == pytest.approx(approx["neighbours"][0]["score"], abs=1e-3)


def test_stale_store_is_refused_then_used_only_when_asked(char_checkpoint, char_dataset, capsys):
    build(char_checkpoint)
    make_checkpoint(char_checkpoint, char_dataset, seed=1)  # "training moved on": other weights
    with pytest.raises(UserError, match="stale: .*--build.*--allow_stale"):
        knn.main([f"--out_dir={char_checkpoint}", "--text=Speak"])
    capsys.readouterr()
    r = knn.main([f"--out_dir={char_checkpoint}", "--text=Speak", "--allow_stale"])
    assert r["stale"] is True
    err = capsys.readouterr().err
    assert "warning: using a STALE kNN store" in err and len(err.strip().splitlines()) == 1
    build(char_checkpoint)  # rebuilding makes it fresh again
    assert knn.main([f"--out_dir={char_checkpoint}", "--text=Speak"])["stale"] is False


def test_store_built_with_other_settings_is_not_mixed(char_checkpoint):
    build(char_checkpoint, "--pooling=last", "--layer=1", "--window=16", "--stride=4", "--calibration=center")
    m = knn_store.load_store(char_checkpoint / "knn_train").meta
    assert (m["pooling"], m["layer"], m["context"], m["stride"], m["calibration"]) == ("last", 1, 16, 4, "center")
    with pytest.raises(UserError, match="built with window=16, not 32"):
        knn.main([f"--out_dir={char_checkpoint}", "--text=Speak", "--window=32"])
    assert knn.main([f"--out_dir={char_checkpoint}", "--text=Speak"])["neighbours"]  # uses the store's own


def test_torchrun_build_equals_one_process(char_checkpoint, tmp_path):
    """2 gloo ranks shard the windows; rank 0 writes the same store as one process would."""
    build(char_checkpoint, f"--store_dir={tmp_path / 'one'}")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])))
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        str(REPO / "glassgpt/trace/knn.py"), f"--out_dir={char_checkpoint}", "--build", "--progress=False",
                        f"--store_dir={tmp_path / 'two'}"], cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    one, two = knn_store.load_store(tmp_path / "one"), knn_store.load_store(tmp_path / "two")
    np.testing.assert_array_equal(one.windows, two.windows)
    diff = np.abs(np.asarray(one.embeddings, np.float32) - np.asarray(two.embeddings, np.float32)).max()
    print(f"2 ranks vs 1 process: max |embedding diff| {diff:.2e}")
    assert diff < 2e-3
    for key in ("n_windows", "dim", "context", "stride", "layer", "calibration", "built_from"):
        assert one.meta[key] == two.meta[key], key


def test_bfloat16_store_agrees_with_float32(char_checkpoint):
    build(char_checkpoint, "--calibration=none")
    f32 = np.asarray(knn_store.load_store(char_checkpoint / "knn_train").embeddings, dtype=np.float32)
    build(char_checkpoint, "--embed_dtype=bfloat16", "--calibration=none")
    store = knn_store.load_store(char_checkpoint / "knn_train")
    assert store.meta["embed_dtype"] == "bfloat16"
    cos = (f32 * np.asarray(store.embeddings, dtype=np.float32)).sum(1)
    print(f"bfloat16 vs float32 window embeddings: min cosine {cos.min():.5f}")
    assert cos.min() > 0.99


# ------------------------------------------------------------------------------------------ bad input


def one_line_error(capsys, argv: list[str], match: str) -> None:
    """Through the real CLI: exit status 2 and exactly one line on stderr."""
    capsys.readouterr()
    assert cli.main(["trace-knn", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and match in err[0], err


def test_open_store_without_a_store_names_the_build_command(char_checkpoint, capsys):
    from glassgpt.run import open_run

    with pytest.raises(UserError, match=f"build it with `glassgpt trace-knn --out_dir={char_checkpoint} --build`"):
        knn_store.open_store(open_run(str(char_checkpoint)))
    one_line_error(capsys, [f"--out_dir={char_checkpoint}", "--text=Speak"], f"no kNN store in {char_checkpoint}/knn_train")


def test_stale_store_is_one_line(char_checkpoint, char_dataset, capsys):
    build(char_checkpoint)
    make_checkpoint(char_checkpoint, char_dataset, seed=1)
    one_line_error(capsys, [f"--out_dir={char_checkpoint}", "--text=Speak"], "is stale")


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
        (d / "store.json").write_text('{"format": "glassgpt-knn/2", "n_wi')
        match = "store.json is not valid JSON"
    one_line_error(capsys, [f"--out_dir={char_checkpoint}", "--text=Speak"], match)


def test_other_mistakes_are_one_line(char_checkpoint, capsys):
    build(char_checkpoint)
    n = knn_store.load_store(char_checkpoint / "knn_train").meta["n_windows"]
    o = f"--out_dir={char_checkpoint}"
    one_line_error(capsys, [o], "nothing to trace")
    one_line_error(capsys, [o, "--text=a", "--start=b"], "not both")
    one_line_error(capsys, [o, "--start="], "the prompt is empty")
    one_line_error(capsys, [o, "--text=Speak §µ"], "never saw")
    one_line_error(capsys, [o, "--text=Speak", f"--k={n + 1}"], f"k={n + 1} but the store has {n} windows")
    one_line_error(capsys, [o, "--text=FILE:/nonexistent.txt"], "does not exist")
    one_line_error(capsys, [o, "--text=Speak", "--search=fast"], "search='fast'")
    one_line_error(capsys, [o, "--text=Speak", "--rank=words"], "rank='words'")
    one_line_error(capsys, [o, "--build", "--pooling=max"], "pooling='max'")
    one_line_error(capsys, [o, "--build", "--calibration=pca"], "calibration='pca'")
    one_line_error(capsys, [o, "--build", "--layer=7"], "layer=7 is out of range")
    one_line_error(capsys, [o, "--build", "--stride=40"], "stride=40 must be between 1 and window=32")
    one_line_error(capsys, [o, "--build", "--whiten_dim=33"], "whiten_dim=33 must be between 1 and the model's width 32")


@pytest.mark.parametrize("text", ["and it is the", "a c d e", "?.. ,:"])
def test_text_without_a_bm25_word(char_checkpoint, capsys, text):
    """bm25s fails (IndexError) on a query with no token it indexes. Ranked by BM25 that is one line
    naming --rank=embedding; ranked by the embedding or hybrid it answers, the BM25 signal left out."""
    build(char_checkpoint)
    o = f"--out_dir={char_checkpoint}"
    one_line_error(capsys, [o, f"--text={text}"], "--rank=embedding")
    for rank in ("embedding", "hybrid"):
        r = knn.main([o, f"--text={text}", f"--rank={rank}", "--per_window", "--k=3", "--json"])
        assert r is not None and len(r["neighbours"]) == 3
        assert all("bm25" not in nb and nb["embedding"]["rank"] for nb in r["neighbours"])
    # per-window: a window without a BM25 word is ranked by the embedding, the others by BM25
    r = knn.main([o, "--text=" + "the and a " * 6 + "Before we proceed any further", "--per_window", "--json",
                  "--query_stride=8", "--k=2"])
    assert r is not None and r["per_window"] and all(w["neighbours"] for w in r["per_window"])


def test_store_cache_is_bounded(char_checkpoint, tmp_path, monkeypatch):
    """A long-running viewer opens many stores: only the loaded parts of the STORE_CACHE_SIZE most
    recently used stay in memory; a reused store is still served from the cache."""
    from glassgpt.run import open_run

    build(char_checkpoint)
    run = open_run(str(char_checkpoint))
    monkeypatch.setattr(knn_store, "_CACHE", type(knn_store._CACHE)())
    loads = []
    stores = []
    for i in range(knn_store.STORE_CACHE_SIZE + 3):
        d = tmp_path / f"store{i}"
        shutil.copytree(char_checkpoint / "knn_train", d)
        meta = json.loads((d / "store.json").read_text())
        (d / "store.json").write_text(json.dumps({**meta, "build_id": f"b{i}"}))
        stores.append(knn_store.open_store(run, store_dir=d))
    for s in stores:
        s.cached("bm25", lambda s=s: loads.append(s.path) or object())
        assert len(knn_store._CACHE) <= knn_store.STORE_CACHE_SIZE
    last = stores[-1]
    last.cached("bm25", lambda: loads.append("again") or object())  # the most recent one: still cached
    assert "again" not in loads and len(loads) == len(stores)
    stores[0].cached("bm25", lambda: loads.append("evicted") or object())  # the oldest one: loaded anew
    assert "evicted" in loads
