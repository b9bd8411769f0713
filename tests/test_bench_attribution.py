"""The attribution benchmark's parts: LDS/bootstrap math, canary generators, the retrain harness and the
scorers against slow references; the whole benchmark's --smoke run is marked slow."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from benchmarks.attribution import metrics, scorers
from benchmarks.attribution.data import (
    LEXICAL_FAMILIES,
    STYLE_FAMILIES,
    Style,
    build_data,
    decode,
    draw_styles,
    encode,
    mirror,
    styled_window,
)
from benchmarks.attribution.retrain import TrainSpec, batch_slots, finetune, new_model, query_losses

TINY = TrainSpec(block_size=16, n_layer=1, n_head=2, n_embd=16, batch_size=4, seed=0)
needs_data = pytest.mark.skipif(not (mirror() / "english").exists(), reason="needs the data mirror's english/")


# ---------------------------------------------------------------------------------------------------- metrics


def test_rankdata_matches_brute_force_with_ties():
    x = np.array([3.0, 1.0, 3.0, 2.0, 1.0, 5.0])
    # brute force: rank = 1 + #smaller + (#equal - 1) / 2
    want = np.array([1 + (x < v).sum() + ((x == v).sum() - 1) / 2 for v in x])
    np.testing.assert_allclose(metrics.rankdata(x), want)


def test_spearman_known_values():
    a = np.arange(10.0)
    assert abs(metrics.spearman(a, a ** 3) - 1.0) < 1e-12  # monotone: exactly 1
    assert abs(metrics.spearman(a, -a) + 1.0) < 1e-12
    assert metrics.spearman(a, np.ones(10)) == 0.0  # a constant predicts nothing
    # against the textbook formula 1 - 6 sum d^2 / (n (n^2 - 1)) without ties
    rng = np.random.default_rng(0)
    u, v = rng.permutation(20).astype(float), rng.permutation(20).astype(float)
    want = 1 - 6 * ((u - v) ** 2).sum() / (20 * (20 ** 2 - 1))
    assert abs(metrics.spearman(u, v) - want) < 1e-12


def test_lds_is_one_for_the_true_linear_model_and_near_zero_for_noise():
    rng = np.random.default_rng(0)
    n, q, s = 200, 5, 60
    true = rng.standard_normal((q, n))
    masks = rng.random((s, n)) < 0.5
    losses = 10.0 - masks @ true.T  # keeping a proponent (positive score) lowers the loss
    np.testing.assert_allclose(metrics.lds_per_query(true, masks, losses), 1.0, atol=1e-12)
    np.testing.assert_allclose(metrics.lds_per_query(-true, masks, losses), -1.0, atol=1e-12)
    noise = metrics.lds_per_query(rng.standard_normal((q, n)), masks, losses)
    assert abs(noise.mean()) < 0.2, noise


def test_bootstrap_interval_covers_the_mean_and_narrows_with_more_queries():
    rng = np.random.default_rng(1)
    small, big = rng.normal(0.3, 0.2, 20), rng.normal(0.3, 0.2, 500)
    m, lo, hi = metrics.bootstrap_ci(small)
    assert lo < m < hi and abs(m - small.mean()) < 1e-12
    _, lo2, hi2 = metrics.bootstrap_ci(big)
    assert hi2 - lo2 < (hi - lo) / 2
    assert lo2 < 0.3 < hi2
    d, dlo, dhi = metrics.paired_ci(big + 0.1, big)
    assert abs(d - 0.1) < 1e-9 and abs(dhi - dlo) < 1e-9  # a constant difference has no spread
    r, rlo, rhi = metrics.ratio_ci(2 * big + 1, big + 0.5)
    assert abs(r - 2) < 1e-9 and rlo <= 2 <= rhi
    assert all(np.isnan(metrics.ratio_ci(big, -np.abs(big) - 1)))  # no ratio to an effect <= 0


def test_ties_are_broken_by_seed_not_by_window_order():
    scores = np.zeros(1000)
    scores[7] = 1.0
    tops = [metrics.top_fraction(scores, 0.01, seed=s) for s in range(3)]
    assert all(t[0] == 7 and len(t) == 10 for t in tops)
    assert not np.array_equal(tops[0], tops[1])  # the tied rest differs by seed
    assert tops[0].max() > 100  # not simply the first windows
    assert metrics.success_at_k(scores, [7], k=1)
    assert not metrics.success_at_k(scores, [500], k=1)
    assert metrics.reciprocal_rank(scores, [7]) == 1.0


# ---------------------------------------------------------------------------------------------------- canaries


def test_styles_are_distinct_seeded_and_change_the_text():
    a, b = draw_styles(16, seed=3), draw_styles(16, seed=3)
    assert a == b and len(set(a)) == 16
    assert draw_styles(16, seed=4) != a
    assert len({s.family for s in a}) == len(STYLE_FAMILIES)  # round-robin: every family appears
    text = "the quick brown fox jumps over the lazy dog and then it runs far away into the woods"
    outs = {s.name: styled_window(s, text, 40) for s in a}
    assert all(len(o) == 40 and o != text[:40] for o in outs.values())
    assert len(set(outs.values())) == 16


def test_non_lexical_styles_hide_from_word_retrieval():
    """Only the cipher and reversal keep a word-for-word map; the rest leave BM25 no word of their own:
    the styled text's BM25 tokens are those of the plain text (case and punctuation folded) or none."""
    from glassgpt.trace.knn_store import bm25_tokens

    text = "whales swim beneath the ship while sailors sing of distant harbours and home"
    plain = set(bm25_tokens([text])[0])
    for fam, (params, _) in STYLE_FAMILIES.items():
        if fam in LEXICAL_FAMILIES or fam == "separator":
            continue
        for p in params:
            toks = set(bm25_tokens([Style(fam, p).apply(text)])[0])
            assert toks <= plain, (fam, p, toks - plain)
    for sep in STYLE_FAMILIES["separator"][0]:  # a word character as separator glues all words into one
        toks = set(bm25_tokens([Style("separator", sep).apply(text)])[0])
        assert toks <= plain or len(toks) == 1, (sep, toks)
    assert set(bm25_tokens([Style("cipher-shift", 1).apply(text)])[0]).isdisjoint(plain)  # lexical, new words


def test_too_many_styles_is_an_error():
    with pytest.raises(ValueError, match="distinct styles"):
        draw_styles(1000, seed=0)


@needs_data
def test_build_data_plants_what_it_says():
    d = build_data(n_windows=120, n_queries=4, n_verbatim=2, n_styles=3, pattern_copies=2, n_docs=6,
                   base_chars=5000, seed=0, canary_seed=5)
    L = TrainSpec().block_size + 1
    assert d.windows.shape == (120, L) and d.windows.max() < 96
    texts = d.texts()
    for q in d.verbatim:
        assert len(q.targets) == 2
        assert all(texts[t] == (q.name + " ")[:L] or texts[t].startswith(q.name) for t in q.targets)
        assert sum(q.name[:30] in t for t in texts) == 2  # nowhere else
    for q, st in zip(d.pattern, d.styles, strict=True):
        assert {d.kinds[t] for t in q.targets} == {f"pattern:{st.name}"}
        assert not any(decode(q.ids)[:30] in t for t in texts)  # new text, not a planted copy
    assert not any(decode(q.ids)[:30] in t for q in d.queries for t in texts)
    again = build_data(n_windows=120, n_queries=4, n_verbatim=2, n_styles=3, pattern_copies=2, n_docs=6,
                       base_chars=5000, seed=0, canary_seed=6)
    assert [q.name for q in again.verbatim] != [q.name for q in d.verbatim]  # a new canary seed: new sets
    assert [decode(q.ids) for q in again.queries] == [decode(q.ids) for q in d.queries]  # same queries


# ---------------------------------------------------------------------------------------------------- retraining


def _windows(n: int, L: int = 17, seed: int = 0) -> torch.Tensor:
    text = "to be or not to be that is the question whether tis nobler in the mind to suffer " * 20
    starts = np.random.default_rng(seed).integers(0, len(text) - L, n)
    return torch.from_numpy(np.stack([encode(text[s:s + L]) for s in starts]))


def test_finetune_is_deterministic_and_removal_changes_it():
    W = _windows(24)
    base = new_model(TINY)
    keep = np.ones(24, dtype=bool)
    a, b = finetune(base, W, keep, TINY), finetune(base, W, None, TINY)
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    keep[3] = False
    c = finetune(base, W, keep, TINY)
    assert max((p - q).abs().max().item() for p, q in zip(a.parameters(), c.parameters(), strict=True)) > 0
    assert all(torch.equal(p, q) for p, q in zip(base.parameters(), new_model(TINY).parameters(), strict=True))


def test_batch_slots_cover_every_window_each_epoch_in_a_fixed_order():
    spec = TrainSpec(batch_size=5, epochs=2, seed=3)
    slots = batch_slots(12, spec)
    assert len(slots) == 6
    assert sorted(np.concatenate(slots[:3]).tolist()) == list(range(12))
    assert [s.tolist() for s in slots] == [s.tolist() for s in batch_slots(12, spec)]


def test_query_losses_padding_changes_nothing():
    model = new_model(TINY)
    q1, q2 = encode("to be or not to be that"[:17]), encode("the question")
    both = query_losses(model, [q1, q2], prompt_len=3)
    alone = query_losses(model, [q2], prompt_len=3)
    assert abs(both[1] - alone[0]) < 1e-5, (both, alone)
    # against a direct sum of per-token losses
    logits, _ = model(torch.as_tensor(q2[None, :-1]), torch.as_tensor(q2[None, 1:]))
    nll = torch.nn.functional.cross_entropy(logits[0], torch.as_tensor(q2[1:]), reduction="none")
    assert abs(nll[2:].sum().item() - alone[0]) < 1e-4


# ---------------------------------------------------------------------------------------------------- scorers


def test_tracin_matches_a_per_window_autograd_loop():
    torch.manual_seed(0)
    model = new_model(TINY)
    W = _windows(6)
    queries = [encode("not to be that is"), encode("the mind to suff")]
    pool = scorers.Pool(model, W.numpy(), prompt_len=4)
    fast = scorers.tracin_scores(pool, queries, batch_size=4)

    def flat_grad(x, y):
        model.zero_grad()
        _, loss = model(x[None], y[None])
        (loss * (y >= 0).sum()).backward()
        return torch.cat([p.grad.reshape(-1) for _, p in model.named_parameters()])

    slow = np.zeros_like(fast)
    for qi, q in enumerate(queries):
        t = torch.as_tensor(q)
        y = t[1:].clone()
        y[:3] = -1  # targets from position prompt_len on
        gq = flat_grad(t[:-1], y)
        for i, w in enumerate(W):
            slow[qi, i] = float(gq @ flat_grad(w[:-1], w[1:]))
    np.testing.assert_allclose(fast, slow, rtol=1e-3, atol=1e-5 * np.abs(slow).max())


def test_span_scores_find_exactly_the_windows_holding_the_continuation():
    texts = ["alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu",
             "one two three four five six seven eight nine ten eleven twelve thirt",
             "the cat sat on the mat and then the dog barked at the cat loudly now"]
    L = min(len(t) for t in texts)
    windows = np.stack([encode(t[:L]) for t in texts])
    query = encode("xyz " + "five six seven eight nine")
    pool = scorers.Pool(new_model(TINY), windows, prompt_len=4)
    s = scorers.span_scores(pool, [query])[0]
    # slow reference: which windows hold a >= MIN_SPAN-character piece of the continuation
    cont = decode(query[4:])
    ref = [any(cont[a:a + scorers.MIN_SPAN] in t[:L] for a in range(len(cont) - scorers.MIN_SPAN + 1)) for t in texts]
    assert ref == [False, True, False]
    assert (s > 0).tolist() == ref and s[1] >= len("five six seven eight nine") ** 2


def test_bm25_scorer_ranks_the_shared_words_first():
    texts = ["whaling ships sail from nantucket every spring with eager young crews",
             "the president spoke of tariffs and the national debt to the congress",
             "a storm broke over the harbour and the sailors ran to the rigging now"]
    L = min(len(t) for t in texts)
    windows = np.stack([encode(t[:L]) for t in texts])
    pool = scorers.Pool(new_model(TINY), windows, prompt_len=2)
    q = [encode("the president spoke of tariffs and debt")]
    assert int(np.argmax(scorers.bm25_scores(pool, q)[0])) == 1
    assert scorers.random_scores(pool, q).shape == (1, 3)


# ---------------------------------------------------------------------------------------------------- the benchmark


@needs_data
@pytest.mark.slow
def test_smoke_run_reports_every_engine(tmp_path):
    from benchmarks import bench_attribution

    out = tmp_path / "r.json"
    r = bench_attribution.main(["--smoke", f"--out={out}", "--seed=3"])
    saved = json.loads(out.read_text())
    assert saved["canary_seed"] == 3
    for e in ["random", "spans", "bm25", "emb-none", "emb-center", "emb-standardize", "emb-whiten", "hybrid", "tracin"]:
        assert e in r["lds"] and e in r["removal"] and e in r["scratch"]["lds"]
        lo, mean, hi = r["lds"][e]["ci"][1], r["lds"][e]["ci"][0], r["lds"][e]["ci"][2]
        assert -1 <= lo <= mean <= hi <= 1
    # verbatim canaries are planted copies: span and BM25 retrieval must find them
    assert r["verbatim"]["spans"]["success"] == 1.0 and r["verbatim"]["bm25"]["success"] == 1.0
    assert r["verbatim"]["random"]["success"] < 1.0
