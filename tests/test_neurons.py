"""Neuron traces: every statistic against a slow reference (recording, gradients, baselines, z-scores,
matched controls, ablations, specificity, quantile examples, unembedding effects), artifacts, CLI."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from glassgpt.checkpoint import load_checkpoint, save_checkpoint
from glassgpt.config import field_choices
from glassgpt.errors import UserError, run_main
from glassgpt.generate import generate
from glassgpt.hooks import hooks, record
from glassgpt.run import open_run
from glassgpt.sampling import SamplingSettings
from glassgpt.trace import neuron_card, neuron_record
from glassgpt.trace import neurons as nz
from glassgpt.windows import sliding_windows


def n_hooks(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.fixture
def run(char_checkpoint):
    return open_run(char_checkpoint, device="cpu")


def full_acts(model, ids):
    return neuron_record.record_activations(model, torch.tensor([ids]))[0].double().numpy()


def test_rankings_match_sorting():
    s = np.random.default_rng(0).normal(size=(3, 20))
    flat = sorted(((s[l, i], l, i) for l in range(3) for i in range(20)), reverse=True)[:5]
    assert [(l, i) for l, i, _ in nz.top_neurons(s, 5)] == [(l, i) for _, l, i in flat]
    assert [[i for i, _ in row] for row in nz.top_per_layer(s, 4)] == [list(np.argsort(-s[l])[:4]) for l in range(3)]
    assert nz.jaccard({1, 2}, {2, 3}) == pytest.approx(1 / 3)
    assert nz.mean_pairwise_jaccard([{1, 2}, {1, 2}, {3, 4}]) == pytest.approx(1 / 3)


def test_record_text_matches_full_forward_and_windowed_reference(run):
    model = run.model
    B = model.config.block_size
    ids = torch.randint(0, model.config.vocab_size, (int(2.5 * B),), generator=torch.Generator().manual_seed(1)).tolist()
    short = neuron_record.record_text(model, ids[:B], 3)
    np.testing.assert_allclose(short, full_acts(model, ids[:B]), rtol=1e-5, atol=1e-6)
    long = neuron_record.record_text(model, ids, 3)

    for b, e, s in sliding_windows(len(ids), B, B // 2):  # each position from the window that scores it
        np.testing.assert_allclose(long[s:e], full_acts(model, ids[b:e])[s - b:], rtol=1e-5, atol=1e-6)
    assert n_hooks(model) == 0


def test_attribution_sums_match_finite_differences(run):
    model = run.model.double()
    ids, pos0 = [3, 7, 1, 9, 4, 4, 2, 8, 5, 6, 0, 3], 4
    _, ag, gs = neuron_record.record_text(model, ids, pos0, grad=True)

    def logp(layer, i, scale, shift):
        def edit(a, _):
            a = a.clone()
            a[..., i] = a[..., i] * scale + shift
            return a
        with torch.no_grad(), hooks(model, [(f"blocks.{layer}.mlp.hook_post", edit)]):
            lp = F.log_softmax(model(torch.tensor([ids[:-1]]), torch.tensor([ids[1:]]))[0][0], -1)
        return sum(lp[j, ids[j + 1]].item() for j in range(pos0, len(ids) - 1))

    eps = 1e-5
    for layer, i in ((0, 3), (1, 100)):  # d/d shift = sum g; d/d scale = sum a*g
        d_shift = (logp(layer, i, 1, eps) - logp(layer, i, 1, -eps)) / (2 * eps)
        d_scale = (logp(layer, i, 1 + eps, 0) - logp(layer, i, 1 - eps, 0)) / (2 * eps)
        assert abs(gs[layer, i] - d_shift) < 1e-6 * max(1, abs(d_shift)), (gs[layer, i], d_shift)
        assert abs(ag[layer, i] - d_scale) < 1e-6 * max(1, abs(d_scale)), (ag[layer, i], d_scale)


@pytest.mark.parametrize("source", field_choices(nz.TraceNeuronsConfig, "baseline_source"))
def test_baseline_matches_a_one_sequence_at_a_time_reference(run, source):
    model, tokens = run.model, run.corpus.tokens("train")
    base = neuron_record.build_baseline(model, tokens, source=source, n_seqs=5, prompt_len=4, new_tokens=12, seed=3,
                             batch_size=2, n_sample=7, progress=False)
    rng = np.random.default_rng(3)
    starts = np.sort(rng.integers(0, len(tokens) - 16 + 1, size=5))
    rows = []
    for k, s in enumerate(starts):  # row k of the batched build was seeded 1_000_000 + seed + k
        seq = tokens[s:s + 16].astype(np.int64).tolist()
        if source == "generated":
            seq = seq[:4] + generate(model, [seq[:4]], 12, temperature=0.8, seed=1_000_000 + 3 + k)[0]
        rows.append(full_acts(model, seq[:-1])[3:])
    allacts = np.concatenate(rows)
    assert base.n_tokens == len(allacts) == 60
    np.testing.assert_allclose(base.mean, allacts.mean(0), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(base.std, allacts.std(0), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(base.prob, (allacts > 0).mean(0))
    keep = np.sort(rng.choice(60, size=7, replace=False))
    np.testing.assert_allclose(base.sample.astype(np.float64), allacts[keep], rtol=1e-3, atol=1e-3)  # float16


def fake_baseline(rng, L=3, N=6):
    mean, std = rng.normal(size=(L, N)), np.abs(rng.normal(size=(L, N)))
    std[0, 0], mean[0, 1], std[0, 1] = 1e-9, 0.0, 0.0  # a near-constant and a silent neuron
    return neuron_record.Baseline(mean, std, rng.uniform(size=(L, N)), rng.normal(size=(4, L, N)), 100)


def test_contrast_matches_an_explicit_loop():
    rng = np.random.default_rng(0)
    base, acts = fake_baseline(rng), rng.normal(size=(7, 3, 6))
    for floor in (0.0, 0.1, 0.5):
        ref = np.zeros((3, 6))
        for l in range(3):
            for i in range(6):
                mu, sd = base.mean[l, i], base.std[l, i]
                spread = max(sd, floor * (mu * mu + sd * sd) ** 0.5)
                ref[l, i] = 0.0 if spread == 0 else (sum(acts[:, l, i]) / 7 - mu) / spread
        np.testing.assert_allclose(nz.contrast(acts, base, "z", floor, layer_norm=False), ref, rtol=1e-12)
        normed = nz.contrast(acts, base, "z", floor, layer_norm=True)
        for l in range(3):
            m = sum(ref[l]) / 6
            sd = (sum((x - m) ** 2 for x in ref[l]) / 6) ** 0.5
            np.testing.assert_allclose(normed[l], [(x - m) / sd for x in ref[l]], rtol=1e-9, atol=1e-12)
    assert abs(nz.contrast(acts, base, "z", 0.1, False)[0, 1]) == 0.0  # silent neuron: 0, not inf
    np.testing.assert_allclose(nz.contrast(acts, base, "prob", layer_norm=False), (acts > 0).mean(0) - base.prob)
    with pytest.raises(ValueError):
        nz.contrast(acts, base, "rank")


def test_matched_controls_match_a_brute_force_selection():
    rng = np.random.default_rng(1)
    raw = rng.gamma(1.0, size=(3, 40))
    top = [(0, 5), (2, 7), (0, 9), (1, 1)]
    got = nz.matched_controls(raw, top, n_draws=4, seed=11, pool=3)
    rng = np.random.default_rng(11)
    for draw in got:
        used = set(top)
        for (l, i), (cl, cj) in zip(top, draw):
            cands = sorted((abs(raw[l, j] - raw[l, i]), j) for j in range(40) if (l, j) not in used)[:3]
            want = cands[int(rng.integers(3))][1]
            assert (cl, cj) == (l, want)
            used.add((l, want))
        assert not set(draw) & set(top) and len(set(draw)) == len(draw)


def test_ablation_modes_write_the_right_values(run):
    model = run.model
    rng = np.random.default_rng(0)
    base = fake_baseline(rng, L=2, N=neuron_record.mlp_width(model))
    x = torch.randint(0, 30, (2, 8))
    for mode in field_choices(nz.TraceNeuronsConfig, "ablation"):
        with hooks(model, neuron_record.ablation_hooks([(1, 3), (1, 7)], mode, base, seed=5)):
            with record(model, ["blocks.1.mlp.hook_post"]) as cache:
                model(x)
        got = cache["blocks.1.mlp.hook_post"][0][..., [3, 7]].double().numpy()  # (2, 8, 2)
        if mode == "zero":
            assert (got == 0).all()
        elif mode == "mean":
            np.testing.assert_allclose(got, np.broadcast_to(base.mean[1, [3, 7]], got.shape), rtol=1e-6)
        else:  # each position: both neurons from the same random baseline token
            sample = base.sample[:, 1, [3, 7]]
            for row in got.reshape(-1, 2):
                assert np.abs(sample - row).max(axis=1).min() < 1e-6
            assert len({tuple(np.round(r, 5)) for r in got.reshape(-1, 2)}) > 1
    assert n_hooks(model) == 0


def test_causal_check_and_specificity_match_explicit_ablations(run):
    model = run.model
    base = neuron_record.build_baseline(model, run.corpus.tokens("train"), n_seqs=4, prompt_len=4, new_tokens=12,
                                        progress=False)
    items = []
    for k, prompt in enumerate(([1, 2, 3], [9, 8, 7, 6])):
        items.append((prompt + generate(model, [prompt], 14, temperature=0.8, seed=k)[0], len(prompt) - 1))
    raw = full_acts(model, items[0][0])[items[0][1]:-1].mean(0)
    top = [(0, 1), (1, 2), (1, 50)]

    def slow_logp(ids, pos0, neurons, mode):
        values = {"mean": base.mean, "zero": np.zeros_like(base.mean)}[mode]

        def edit(a, name):
            layer = int(name.split(".")[1])
            a = a.clone()
            for l, i in neurons:
                if l == layer:
                    a[..., i] = float(values[l, i])
            return a
        with torch.no_grad(), hooks(model, [(f"blocks.{l}.mlp.hook_post", edit) for l in range(2)]):
            lp = F.log_softmax(model(torch.tensor([ids[:-1]]), torch.tensor([ids[1:]]))[0][0].double(), -1)
        return sum(lp[j, ids[j + 1]].item() for j in range(pos0, len(ids) - 1))

    for mode in ("mean", "zero"):
        c = nz.causal_check(model, *items[0], top, raw, mode, base, n_controls=2, seed=4)
        clean = slow_logp(*items[0], [], mode)
        assert abs(c["clean_logprob"] - clean) < 1e-3
        assert abs(c["drop_top"] - (clean - slow_logp(*items[0], top, mode))) < 1e-3
        raw_top = [(l, i) for l, i, _ in nz.top_neurons(raw, 3)]
        assert abs(c["drop_raw_top"] - (clean - slow_logp(*items[0], raw_top, mode))) < 1e-3
        for d, ctrl in zip(c["drop_matched"], nz.matched_controls(raw, top, 2, seed=4)):
            assert abs(d - (clean - slow_logp(*items[0], ctrl, mode))) < 1e-3
        tops = [top, [(0, 7), (1, 9)]]
        s = nz.specificity(model, items, tops, mode, base)
        for a in range(2):
            for b in range(2):
                ids, p = items[b]
                ref = (slow_logp(ids, p, [], mode) - slow_logp(ids, p, tops[a], mode)) / (len(ids) - 1 - p)
                assert abs(s["drop_per_token"][a][b] - ref) < 1e-4
        d = s["drop_per_token"]
        assert s["ratio"][0][1] == (d[0][0] / d[0][1] if d[0][1] > 0 else None) and s["n_pairs"] == 2
    none = nz.causal_check(model, *items[0], [], raw, "mean", base, n_controls=2)
    assert none["drop_top"] == 0.0 and none["drop_matched"] == [0.0, 0.0]


def test_quantile_examples_and_logit_effect_match_references(run):
    vals = np.random.default_rng(2).normal(size=1000)
    for q, v, idx in neuron_card.quantile_examples(vals, (0.0, 0.5, 0.9, 0.99, 0.999, 1.0), per=3):
        ranked = sorted(range(len(vals)), key=lambda i: vals[i])
        assert abs(v - np.quantile(vals, q)) < 1e-12
        r = round(q * 999)  # the rank nearest the quantile
        lo = min(max(r - 1, 0), 1000 - 3)
        assert idx == ranked[lo:lo + 3] and any(abs(vals[i] - v) < 0.05 for i in idx)
    model = run.model
    got = neuron_card.logit_effect(model, 1, 17)
    W_U, g = model.lm_head.weight.detach(), model.transformer.ln_f.weight.detach()
    w = model.transformer.h[1].mlp.c_proj.weight.detach()[:, 17]
    for t in range(model.config.vocab_size):
        ref = sum(W_U[t, c].item() * g[c].item() * w[c].item() for c in range(model.config.n_embd))
        assert abs(got[t].item() - ref) < 1e-5


@pytest.mark.parametrize("n,window", [(100, 16), (17, 16), (16, 16), (10, 16), (101, 7), (2, 4)])
def test_scan_windows_score_every_token_but_the_first_once(n, window):
    seen = np.zeros(n, dtype=int)
    for start, score_from in [(b, f) for b, _, f in sliding_windows(n, window, skip=1)]:
        w = min(window, n)
        assert 0 <= start <= score_from and start + w <= n
        assert score_from == 1 or score_from - start >= w // 2
        seen[score_from:start + w] += 1
    assert seen[0] == 0 and (seen[1:] == 1).all(), seen


def test_neuron_examples_match_brute_force(run):
    model, tokens = run.model, run.corpus.tokens("train")[:300]
    values, positions = neuron_card.build_neuron_examples(model, tokens, window=16, keep=5, batch_size=7,
                                                          progress=False)
    for layer, idx in ((0, 0), (1, 77)):
        cands = []
        for start, score_from in [(b, f) for b, _, f in sliding_windows(len(tokens), 16, skip=1)]:
            col = full_acts(model, tokens[start:start + 16].astype(np.int64).tolist())[score_from - start:, layer, idx]
            cands.append((col.max(), score_from + int(col.argmax())))
        cands.sort(key=lambda c: -c[0])
        np.testing.assert_allclose(values[:, layer, idx], [c[0] for c in cands[:5]], rtol=1e-5, atol=1e-6)
        assert positions[0, layer, idx] == cands[0][1]


def test_trace_cli_json_is_explain_and_the_baseline_artifact(char_checkpoint, capsys):
    argv = [f"--out_dir={char_checkpoint}", "--start=First", "--max_new_tokens=12", "--n_neurons=4", "--rank=z",
            "--ablate", "--n_controls=2", "--baseline_windows=4", "--device=cpu", "--json"]
    out = nz.main(argv)
    cap = capsys.readouterr()
    assert "building the neuron baseline" in cap.err and json.loads(cap.out) == json.loads(json.dumps(out))
    run = open_run(char_checkpoint)
    base = nz.open_baseline(run)
    again = nz.explain(run, "First", sampling=SamplingSettings(max_new_tokens=12), n_neurons=4, rank="z", ablate=True,
                       n_controls=2, baseline=base)
    assert json.loads(json.dumps(again)) == json.loads(cap.out)
    assert len(out["top"]) == 4 and out["ranking"] == "z" and out["baseline"]["source"] == "generated"
    assert [x["score"] for x in out["top"]] == sorted((x["score"] for x in out["top"]), reverse=True)
    assert all(len(t["token_activations"]) == len(out["tokens"]) == 17 for t in out["top"])
    assert sum(out["layer_counts"]) == 4 and {"drop_top", "drop_raw_top", "drop_matched"} <= set(out["ablation"])
    meta = json.loads((char_checkpoint / neuron_record.DIRS["neurons"] / "meta.json").read_text())
    assert meta["built_from"] == run.provenance() and meta["params"]["n_seqs"] == 4
    nz.main(argv)
    assert "building" not in capsys.readouterr().err  # kept
    ckpt = load_checkpoint(char_checkpoint)  # changed weights make it stale
    ckpt["model"]["transformer.h.0.mlp.c_fc.weight"] += 0.01
    save_checkpoint(char_checkpoint / "ckpt.pt", ckpt)
    with pytest.raises(UserError, match="stale.*--build_baseline"):
        nz.open_baseline(open_run(char_checkpoint))
    nz.main(argv)
    assert "stale" in capsys.readouterr().err


def test_open_baseline_missing_names_the_build_command(run):
    with pytest.raises(UserError, match=r"no neuron baseline.*glassgpt trace-neurons --out_dir=.* --build_baseline"):
        nz.open_baseline(run)


def test_explain_a_given_output_and_attribution(run):
    with pytest.raises(UserError, match="--build_baseline"):
        nz.explain(run, "All:\n", output="Speak, speak.")  # attribution is relative to the baseline mean
    base = neuron_record.build_baseline(run.model, run.corpus.tokens("train"), n_seqs=4, progress=False)
    r = nz.explain(run, "All:\n", output="Speak, speak.", n_neurons=3, baseline=base)
    assert not r["generated"] and r["output"] == "Speak, speak." and r["n_traced_tokens"] == 13
    acts, ag, gs = neuron_record.record_text(run.model, r["token_ids"], r["first_traced_position"], grad=True)
    a = ag - base.mean * gs
    ref = [(l, i) for l, i, _ in nz.top_neurons((a - a.mean(1, keepdims=True)) / a.std(1, keepdims=True), 3)]
    assert r["ranking"] == "attribution" and [(t["layer"], t["index"]) for t in r["top"]] == ref
    nats = nz.explain(run, "All:\n", output="Speak, speak.", n_neurons=3, baseline=base, layer_norm=False)
    assert [(t["layer"], t["index"], t["score"]) for t in nats["top"]] == nz.top_neurons(a, 3)
    t = r["top"][0]
    assert t["token_activations"] == [round(float(a), 4) for a in acts[:, t["layer"], t["index"]]]


def test_trace_cli_overlap_and_specificity_over_prompts(char_checkpoint, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("First Citizen:\nAll:\nYou are\n")
    out = nz.main([f"--out_dir={char_checkpoint}", f"--prompts={prompts}", "--max_new_tokens=8", "--n_neurons=5",
                   "--device=cpu", "--baseline_windows=4", "--contrastive", "--ablate", "--n_controls=1"])
    text = capsys.readouterr().out
    assert len(out["traces"]) == 3 and "mean pairwise Jaccard overlap" in text and "specificity" in text
    assert 0.0 <= out["overlap"]["raw"] <= 1.0 and out["specificity"]["n_pairs"] == 6


def test_neuron_card_cli_text_and_json(char_checkpoint, capsys):
    out = neuron_card.main([f"--out_dir={char_checkpoint}", "--layer=1", "--index=5", "--top=3", "--device=cpu",
                          "--window=16", "--sample_windows=8", "--bins=5"])
    text = capsys.readouterr().out
    assert len(out["examples"]) == 3 and "\u27e6" in text and "quantile 0.99" in text and "promotes" in text
    acts = [e["activation"] for e in out["examples"]]
    assert acts == sorted(acts, reverse=True)
    run = open_run(char_checkpoint)
    values, _ = neuron_card.open_examples(run, window=16)
    np.testing.assert_allclose(acts, values[:3, 1, 5], rtol=1e-5)  # re-read from the window that scored it
    for e in out["examples"] + [x for q in out["quantile_examples"] for x in q["examples"]]:
        loc = e["location"]
        assert loc["token_start"] <= e["token_position"] < loc["token_end"] and e["line"] >= 1
        k = e["token_position"] - loc["token_start"]
        assert e["tokens"][k][0] == e["token"] and abs(e["tokens"][k][1] - e["activation"]) < 1e-4
    h = out["histogram"]
    assert sum(h["counts"]) == h["n_tokens"] and len(h["edges"]) == 6 and len(out["promotes"]) == 10
    assert [q["quantile"] for q in out["quantile_examples"]] == list(neuron_card.QUANTILES)
    neuron_card.main([f"--out_dir={char_checkpoint}", "--layer=0", "--index=9", "--device=cpu", "--window=16", "--json",
                    "--sample_windows=4"])
    cap = capsys.readouterr()
    assert "scanning" not in cap.err and json.loads(cap.out)["index"] == 9


@pytest.mark.parametrize("argv,needle", [
    (["--layer=2", "--index=0"], "layers 0..1"),
    (["--layer=0", "--index=128"], "neurons 0..127"),
    (["--layer=-3", "--index=0"], "layers 0..1"),
    (["--index=4"], "--layer=L --index=I"),
])
def test_neuron_out_of_range_is_one_line(char_checkpoint, capsys, argv, needle):
    assert run_main(neuron_card.main, [f"--out_dir={char_checkpoint}", "--device=cpu", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and needle in err and "\n" not in err, err


@pytest.mark.parametrize("argv,needle", [
    (["--ablation=half"], "mean, zero, resample"),
    (["--rank=rank"], "attribution, z, prob, raw"),
    (["--baseline_source=web"], "generated, train"),
    (["--floor=-1"], "--floor"),
    (["--start=A", "--max_new_tokens=1"], "position 0"),
    (["--prompts=/nonexistent/p.txt"], "one prompt per line"),
])
def test_trace_bad_input_is_one_line(char_checkpoint, capsys, argv, needle):
    assert run_main(nz.main, [f"--out_dir={char_checkpoint}", "--start=All", "--device=cpu", "--rank=raw", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and needle in err and "\n" not in err, err


def test_traced_logprob_beyond_block_size_matches_windowed_reference(run):
    model = run.model
    B = model.config.block_size
    seq = torch.randint(0, model.config.vocab_size, (3 * B,), generator=torch.Generator().manual_seed(0)).tolist()

    ref = np.empty(len(seq) - 1)
    with torch.no_grad():
        for b, e, first in sliding_windows(len(seq) - 1, B, B // 2):
            logp = F.log_softmax(model(torch.tensor([seq[b:e]]), torch.tensor([seq[b + 1:e + 1]]))[0][0], -1)
            for j in range(first, e):
                ref[j] = logp[j - b, seq[j + 1]].item()
    assert abs(neuron_record.traced_logprob(model, seq, 4) - ref[4:].sum()) < 1e-3
