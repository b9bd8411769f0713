"""Neuron traces: recording during cached decoding vs a full forward, baseline/contrast vs a numpy
reference, ablation sanity, top-example scan vs brute force, caches, CLI and bad input."""

import json

import numpy as np
import pytest
import torch

from glassgpt.checkpoint import load_checkpoint, save_checkpoint
from glassgpt.corpus import Corpus
from glassgpt.errors import run_main
from glassgpt.runtime import load_for_inference
from glassgpt.trace import neurons as nz


def n_hooks(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) for m in model.modules())


@pytest.fixture
def loaded(char_checkpoint):
    model, tok, _ = load_for_inference(char_checkpoint, "cpu")
    return model, tok


def test_rankings_match_sorting():
    rng = np.random.default_rng(0)
    s = rng.normal(size=(3, 20))
    top = nz.top_neurons(s, 5)
    flat = sorted(((s[l, i], l, i) for l in range(3) for i in range(20)), reverse=True)[:5]
    assert [(l, i) for l, i, _ in top] == [(l, i) for _, l, i in flat]
    per = nz.top_per_layer(s, 4)
    for l in range(3):
        assert [i for i, _ in per[l]] == list(np.argsort(-s[l])[:4])
    assert nz.top_neurons(s, 0) == []
    assert nz.jaccard({1, 2}, {2, 3}) == pytest.approx(1 / 3)
    assert nz.mean_pairwise_jaccard([{1, 2}, {1, 2}, {3, 4}]) == pytest.approx(1 / 3)


def test_recording_during_cached_decoding_matches_a_full_forward(loaded):
    model, tok = loaded
    prompt = tok.encode("First Cit")
    gen = nz.generate_and_record(model, prompt, 12, temperature=0.0)
    assert n_hooks(model) == 0
    assert gen.acts.shape == (12, 2, 128)
    seq = torch.tensor([prompt + gen.output_ids])
    ref_ids = model.generate(torch.tensor([prompt]), 12, temperature=0)[0, len(prompt):].tolist()
    assert gen.output_ids == ref_ids
    full = nz.record_activations(model, seq[:, :-1])[0, len(prompt) - 1:]  # positions that made each token
    torch.testing.assert_close(torch.from_numpy(gen.acts), full, rtol=1e-4, atol=1e-5)


def test_baseline_and_contrast_match_a_slow_numpy_reference(loaded, char_dataset):
    model, _ = loaded
    tokens = Corpus(char_dataset).tokens("train")
    base = nz.build_baseline(model, tokens, n_windows=6, window=16, batch_size=4, seed=3, progress=False)
    # reference: the same windows, one at a time, every activation kept, statistics by numpy
    starts = np.sort(np.random.default_rng(3).integers(0, len(tokens) - 16 + 1, size=6))
    rows = []
    for s in starts:
        a = nz.record_activations(model, torch.from_numpy(tokens[s:s + 16].astype(np.int64))[None])[0, 1:]
        rows.append(a.double().numpy())
    allacts = np.concatenate(rows)  # (6*15, L, N)
    assert base.n_tokens == allacts.shape[0] == 90
    np.testing.assert_allclose(base.mean, allacts.mean(0), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(base.std, allacts.std(0), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(base.prob, (allacts > 0).mean(0))
    trace = allacts[:7] * 1.5 + 0.1
    z = nz.contrast(trace, base, "z")
    L, N = base.mean.shape
    for l in range(L):
        for i in range(N):
            mu, sd = allacts[:, l, i].mean(), max(allacts[:, l, i].std(), nz.STD_FLOOR)
            ref = sum((trace[t, l, i] - mu) / sd for t in range(7)) / 7
            assert abs(z[l, i] - ref) <= 1e-9 * max(1.0, abs(ref)), (l, i, z[l, i], ref)
    p = nz.contrast(trace, base, "prob")
    np.testing.assert_allclose(p, (trace > 0).mean(0) - (allacts > 0).mean(0))


def test_ablating_nothing_changes_nothing_and_a_whole_layer_changes_logprobs(loaded):
    model, tok = loaded
    gen = nz.generate_and_record(model, tok.encode("All:\nSpe"), 10)
    clean = nz.output_logprobs(model, gen.prompt_ids, gen.output_ids)
    assert clean.shape == (10,) and (clean <= 0).all()
    assert nz.ablated_logprob(model, gen, []) == clean.sum()
    layer0 = [(0, i) for i in range(nz.n_neurons(model))]
    moved = abs(nz.ablated_logprob(model, gen, layer0) - clean.sum())
    assert moved > 1e-3, f"ablating all of layer 0 moved the log-prob by only {moved}"
    assert n_hooks(model) == 0
    out = nz.causal_check(model, gen, [(0, 1), (1, 2)], n_random=3, seed=0)
    assert out["k"] == 2 and len(out["drop_random"]) == 3
    assert out["drop_random_std"] == pytest.approx(np.std(out["drop_random"]))
    empty = nz.causal_check(model, gen, [], n_random=2)
    assert empty["drop_top"] == 0.0 and empty["drop_random"] == [0.0, 0.0]


def test_mean_ablation_writes_the_given_values(loaded):
    model, _ = loaded
    values = np.full((2, nz.n_neurons(model)), 0.25)
    from glassgpt.hooks import hooks, record

    with hooks(model, nz.ablation_hooks([(1, 3), (1, 7)], values)):
        with record(model, ["blocks.1.mlp.hook_post"]) as cache:
            model(torch.randint(0, 30, (1, 8)))
    got = cache["blocks.1.mlp.hook_post"][0]
    # record's hook was attached after the ablation's, so it sees the edited activation
    assert (got[..., [3, 7]] == 0.25).all() and not (got[..., 4] == 0.25).all()


@pytest.mark.parametrize("n,window", [(100, 16), (17, 16), (16, 16), (10, 16), (101, 7), (2, 4)])
def test_scan_windows_score_every_token_but_the_first_once(n, window):
    seen = np.zeros(n, dtype=int)
    for start, score_from in nz.scan_windows(n, window):
        w = min(window, n)
        assert 0 <= start <= score_from and start + w <= n
        assert score_from == 1 or score_from - start >= w // 2  # enough context
        seen[score_from:start + w] += 1
    assert seen[0] == 0 and (seen[1:] == 1).all(), seen


def test_neuron_examples_match_brute_force(loaded, char_dataset):
    model, _ = loaded
    tokens = Corpus(char_dataset).tokens("train")[:300]
    values, positions = nz.build_neuron_examples(model, tokens, window=16, keep=5, batch_size=7, progress=False)
    assert values.shape == positions.shape == (5, 2, 128)
    for layer, idx in ((0, 0), (1, 77)):
        cands = []
        for start, score_from in nz.scan_windows(len(tokens), 16):
            a = nz.record_activations(model, torch.from_numpy(tokens[start:start + 16].astype(np.int64))[None])
            col = a[0, score_from - start:, layer, idx]
            cands.append((col.max().item(), start + score_from - start + int(col.argmax())))
        cands.sort(key=lambda c: -c[0])
        np.testing.assert_allclose(values[:, layer, idx], [c[0] for c in cands[:5]], rtol=1e-5, atol=1e-6)
        assert positions[0, layer, idx] == cands[0][1]


def test_trace_cli_contrastive_ablate_json_and_cache(char_checkpoint, capsys):
    argv = [f"--out_dir={char_checkpoint}", "--start=First", "--max_new_tokens=12", "--top_k=4", "--contrastive",
            "--ablate", "--n_random=2", "--baseline_windows=8", "--device=cpu", "--json"]
    out = nz.main(argv)
    cap = capsys.readouterr()
    assert "computing the neuron baseline" in cap.err  # said so, on stderr under --json
    parsed = json.loads(cap.out)
    t = parsed["traces"][0]
    assert len(t["top"]) == 4 and t["ranking"] == "contrastive (z)" and len(t["output"]) == 12
    assert [x["score"] for x in t["top"]] == sorted((x["score"] for x in t["top"]), reverse=True)
    assert "drop_top" in t["ablation"] and out["traces"][0]["top"] == t["top"]
    side = json.loads((char_checkpoint / "neurons.baseline.json").read_text())
    assert side["params"]["n_windows"] == 8 and len(side["checkpoint"]["sha256"]) == 64
    nz.main(argv)  # cached now
    assert "computing" not in capsys.readouterr().err
    ckpt = load_checkpoint(char_checkpoint)  # a changed checkpoint makes the cache stale
    ckpt["model"]["transformer.h.0.mlp.c_fc.weight"] += 0.01
    save_checkpoint(char_checkpoint / "ckpt.pt", ckpt)
    nz.main(argv)
    assert "stale: the checkpoint changed" in capsys.readouterr().err


def test_trace_cli_text_and_overlap_over_prompts(char_checkpoint, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("First Citizen:\nAll:\nYou are\n")
    out = nz.main([f"--out_dir={char_checkpoint}", f"--prompts={prompts}", "--max_new_tokens=8", "--top_k=5",
                   "--device=cpu", "--baseline_windows=4", "--contrastive"])
    text = capsys.readouterr().out
    assert len(out["traces"]) == 3 and "mean pairwise Jaccard overlap" in text and "contrastive" in text
    assert 0.0 <= out["overlap"]["raw"] <= 1.0 and 0.0 <= out["overlap"]["ranked"] <= 1.0


def test_neuron_cli_examples_with_locations(char_checkpoint, capsys):
    out = nz.neuron_main([f"--out_dir={char_checkpoint}", "--layer=1", "--index=5", "--top=3", "--device=cpu",
                          "--window=16"])
    text = capsys.readouterr().out
    assert len(out["examples"]) == 3 and "\u27e6" in text and "line" in text
    acts = [e["activation"] for e in out["examples"]]
    assert acts == sorted(acts, reverse=True)
    e = out["examples"][0]
    assert e["location"]["doc_id"] == "tiny" and e["line"] >= 1
    assert e["location"]["token_start"] <= e["token_position"] < e["location"]["token_end"]
    nz.neuron_main([f"--out_dir={char_checkpoint}", "--layer=0", "--index=9", "--device=cpu", "--window=16", "--json"])
    cap = capsys.readouterr()
    assert "scanning" not in cap.err and json.loads(cap.out)["index"] == 9  # the cache serves every neuron


@pytest.mark.parametrize("argv,needle", [
    (["--layer=2", "--index=0"], "layers 0..1"),
    (["--layer=0", "--index=128"], "neurons 0..127"),
    (["--layer=-3", "--index=0"], "layers 0..1"),
    (["--index=4"], "--layer=L --index=I"),
])
def test_neuron_out_of_range_is_one_line(char_checkpoint, capsys, argv, needle):
    assert run_main(nz.neuron_main, [f"--out_dir={char_checkpoint}", "--device=cpu", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and needle in err and "\n" not in err, err


@pytest.mark.parametrize("argv,needle", [
    (["--ablation=half"], "zero, mean"),
    (["--score=rank"], "z, prob"),
    (["--start=A", "--max_new_tokens=1"], "position 0"),
    (["--prompts=/nonexistent/p.txt"], "one prompt per line"),
])
def test_trace_bad_input_is_one_line(char_checkpoint, capsys, argv, needle):
    assert run_main(nz.main, [f"--out_dir={char_checkpoint}", "--start=All", "--device=cpu", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and needle in err and "\n" not in err, err


def test_fallback_without_the_engine_records_the_same(loaded, monkeypatch):
    import sys

    model, tok = loaded
    prompt = tok.encode("Resolved")
    fast = nz.generate_and_record(model, prompt, 10)
    monkeypatch.setitem(sys.modules, "glassgpt.generate", None)  # import now raises ImportError
    slow = nz.generate_and_record(model, prompt, 10)
    assert slow.output_ids == fast.output_ids
    np.testing.assert_allclose(slow.acts, fast.acts, rtol=1e-4, atol=1e-5)


def test_output_logprobs_beyond_block_size_match_windowed_reference(char_checkpoint):
    """Texts longer than the context are scored window by window; within it, one pass."""
    import torch.nn.functional as F

    from glassgpt.runtime import load_for_inference
    from glassgpt.trace.neurons import output_logprobs

    model, _, _ = load_for_inference(char_checkpoint)
    B = model.config.block_size
    g = torch.Generator().manual_seed(0)
    seq = torch.randint(0, model.config.vocab_size, (3 * B,), generator=g).tolist()
    prompt, out = seq[:5], seq[5:]
    got = output_logprobs(model, prompt, out)
    assert got.shape == (len(out),)
    # slow reference: each target scored from the window the tiling gives it (>= B/2 context)
    from glassgpt.evaluate import sliding_windows

    ref = np.empty(len(seq) - 1)
    with torch.no_grad():
        for b, e, first in sliding_windows(len(seq) - 1, B, B // 2):
            logp = F.log_softmax(model(torch.tensor([seq[b:e]]), torch.tensor([seq[b + 1:e + 1]]))[0][0], -1)
            for j in range(first, e):
                ref[j] = logp[j - b, seq[j + 1]].item()
    diff = np.abs(got - ref[len(prompt) - 1:]).max()
    assert diff < 1e-4, diff
    short = output_logprobs(model, prompt, out[: B - 10])
    with torch.no_grad():
        full = F.log_softmax(model(torch.tensor([seq[: B - 6]]), torch.tensor([seq[1: B - 5]]))[0][0], -1)
    one_pass = np.array([full[j, seq[j + 1]].item() for j in range(len(prompt) - 1, B - 6)])
    assert np.abs(short - one_pass).max() < 1e-4


def test_ablate_generation_longer_than_block_size(char_checkpoint, capsys):
    argv = [f"--out_dir={char_checkpoint}", "--device=cpu", "--start=A", "--max_new_tokens=60", "--ablate", "--json"]
    assert run_main(nz.main, argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert "drop_top" in json.dumps(out)
