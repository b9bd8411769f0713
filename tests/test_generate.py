"""The KV-cache engine against its slow oracles: nanoGPT's model.generate (full recomputation) and a
full forward pass over each step's window."""

from __future__ import annotations

import pytest
import torch

from glassgpt.generate import (
    KVCache,
    Step,
    TextStream,
    full_recompute_generate,
    generate,
    sample_next,
    window_length,
)
from glassgpt.model import GPT, GPTConfig
from glassgpt.sampling import complete
from glassgpt.tokenizer import CharTokenizer, GPT2Tokenizer

CHAR_VOCAB, BPE_VOCAB = 65, 50257


# GPT-2's architecture, and every architecture option at once (rotary positions must stay exact when a
# decode step's position is past the cache start, and when a chunked window restarts at position 0).
ARCHS = {"gpt2": {}, "modern": dict(rope=True, rope_base=100.0, qk_norm=True, activation="relu2",
                                    tie_embeddings=False, logit_softcap=5.0, value_embed=True,
                                    smear=True, attn_gate=True),
         "alibi_ngram": dict(alibi=True, qk_norm=True, ngram=3, ngram_rows=97, smear=True, value_embed=True)}


def tiny(vocab_size: int = CHAR_VOCAB, block_size: int = 16, std: float = 0.5, seed: int = 0, arch: str = "gpt2") -> GPT:
    """A 2-layer random GPT. Matrices drawn wider than the usual 0.02 so greedy output is not one token
    repeated (that would make token-for-token comparisons weak)."""
    torch.manual_seed(seed)
    m = GPT(GPTConfig(block_size=block_size, vocab_size=vocab_size, n_layer=2, n_head=2, n_embd=32, bias=True,
                      **ARCHS[arch]))
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() >= 2:
                p.normal_(0, std)
    return m.eval()


def nanogpt_greedy(model: GPT, prompt: list[int], n: int) -> list[int]:
    return model.generate(torch.tensor([prompt]), n, temperature=0)[0, len(prompt):].tolist()


PROMPTS = [[1, 2, 3], [5, 6, 7, 8, 9, 10, 11, 12, 13], [4], [30, 31, 32, 33, 34, 35]]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("vocab_size", [CHAR_VOCAB, BPE_VOCAB])
@pytest.mark.parametrize("n_new", [8, 45])  # within block_size=16, and far beyond it
def test_greedy_sliding_equals_nanogpt_generate(vocab_size, n_new, arch):
    m = tiny(vocab_size, arch=arch)
    got = generate(m, PROMPTS, n_new, temperature=0, window="sliding")
    ref = [nanogpt_greedy(m, p, n_new) for p in PROMPTS]
    assert got == ref


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("vocab_size", [CHAR_VOCAB, BPE_VOCAB])
@pytest.mark.parametrize("n_new", [8, 45])
def test_greedy_chunked_equals_full_recompute(vocab_size, n_new, arch):
    m = tiny(vocab_size, arch=arch)
    got = generate(m, PROMPTS, n_new, temperature=0)
    assert got == full_recompute_generate(m, PROMPTS, n_new, temperature=0, window="chunked")
    if n_new + max(map(len, PROMPTS)) <= 16:  # within block_size both rules are nanoGPT's
        assert got == [nanogpt_greedy(m, p, n_new) for p in PROMPTS]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("window", ["chunked", "sliding"])
def test_seeded_samples_equal_full_recompute(window, arch):
    """Sampling explores many tokens, so this checks the cache over varied sequences too."""
    m = tiny(std=0.1, arch=arch)
    kw = dict(temperature=1.0, top_k=20, top_p=0.95, seed=7, window=window)
    got = generate(m, PROMPTS, 40, **kw)
    assert got == full_recompute_generate(m, PROMPTS, 40, **kw)
    assert len({t for row in got for t in row}) > 20  # the samples really vary


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("window", ["chunked", "sliding"])
def test_step_logits_equal_full_forward_over_window(window, arch):
    """Each step's logits, for every row of a padded batch, against model(window) directly."""
    m = tiny(arch=arch)
    seqs = [list(p) for p in PROMPTS]
    worst = 0.0

    def check(step: Step) -> None:
        nonlocal worst
        for b, r in enumerate(step.rows):
            w = window_length(len(seqs[r]), m.config.block_size, window)
            ref, _ = m(torch.tensor([seqs[r][-w:]]))
            torch.testing.assert_close(step.logits[b], ref[0, -1], rtol=1e-4, atol=1e-4)
            worst = max(worst, (step.logits[b] - ref[0, -1]).abs().max().item())
            seqs[r].append(int(step.tokens[b]))

    generate(m, PROMPTS, 40, temperature=1.0, seed=3, on_step=check, window=window)
    print(f"max |logit difference| vs full forward: {worst:.2e}")


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_does_not_depend_on_batch_composition(arch):
    m = tiny(BPE_VOCAB, arch=arch)
    target = [7, 8, 9, 10]
    alone = generate(m, [target], 30, temperature=0)[0]
    for others in ([[1]], [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]], [[3, 3], list(range(40, 55))]):
        batch = others[:1] + [target] + others[1:]
        assert generate(m, batch, 30, temperature=0)[1] == alone, others


def test_same_seed_same_samples_and_rows_independent_of_batch():
    m = tiny(std=0.1)
    a = generate(m, [[1, 2]] * 3, 25, temperature=0.9, seed=11)
    assert a == generate(m, [[1, 2]] * 3, 25, temperature=0.9, seed=11)
    assert a != generate(m, [[1, 2]] * 3, 25, temperature=0.9, seed=12)
    assert len({tuple(x) for x in a}) == 3  # three different samples
    # sample i is drawn with seed + i, so it does not depend on how many samples are drawn with it
    assert generate(m, [[1, 2]], 25, temperature=0.9, seed=12)[0] == a[1]


def test_one_row_sampling_matches_nanogpt_rng():
    """With one prompt, the draws are nanoGPT's: torch.manual_seed(seed) then model.generate."""
    m = tiny(std=0.1)
    torch.manual_seed(5)
    ref = m.generate(torch.tensor([[1, 2, 3]]), 30, temperature=0.8, top_k=10)[0, 3:].tolist()
    assert generate(m, [[1, 2, 3]], 30, temperature=0.8, top_k=10, seed=5, window="sliding")[0] == ref


def test_top_k_and_top_p_filter_the_distribution():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log()
    gen = [torch.Generator().manual_seed(0)]
    draw = lambda **kw: torch.cat([sample_next(logits.clone(), 1.0, generators=gen, **kw) for _ in range(3000)])
    counts = torch.bincount(draw(top_k=None, top_p=0.6), minlength=4)  # {0, 1} reach 0.8 >= 0.6
    assert counts[2:].sum() == 0 and abs(counts[0] / 3000 - 0.625) < 0.04, counts
    counts = torch.bincount(draw(top_k=3, top_p=None), minlength=4)
    assert counts[3] == 0 and counts[2] > 0, counts
    counts = torch.bincount(draw(top_k=None, top_p=0.5), minlength=4)  # token 0 alone reaches 0.5
    assert counts[0] == 3000, counts
    counts = torch.bincount(draw(top_k=None, top_p=None), minlength=4)
    assert (counts > 0).all(), counts
    assert sample_next(logits, 0.0, None, None, gen).item() == 0  # temperature 0 is argmax
    m = tiny(std=0.1)
    greedy = generate(m, [[1, 2]], 20, temperature=0)
    assert generate(m, [[1, 2]], 20, temperature=1.0, top_k=1, seed=4) == greedy


def test_stop_strings_and_stop_ids():
    text = "abcdefghij klmnopqrstuvwxyz\n"
    tok = CharTokenizer.from_text(text)
    m = tiny(tok.vocab_size)
    full = generate(m, [tok.encode("ab")], 40, temperature=0)[0]
    full_text = tok.decode(full)
    stop = full_text[5:7]
    i = full_text.index(stop)
    got = generate(m, [tok.encode("ab")], 40, temperature=0, stop=stop, tokenizer=tok)[0]
    assert tok.decode(got) == full_text[: i + len(stop)]
    c = complete(m, tok, "ab", 40, stop=stop)
    assert c.text == full_text[: i + len(stop)] and c.output_ids == got and c.prompt_ids == tok.encode("ab")
    got = generate(m, [tok.encode("ab")], 40, temperature=0, stop_ids=[full[3]])[0]
    assert got == full[: full.index(full[3]) + 1]
    # a stopped row leaves the batch; the others go on unchanged
    both = generate(m, [tok.encode("ab"), tok.encode("xyz")], 40, temperature=0, stop=stop, tokenizer=tok)
    assert both[1] == generate(m, [tok.encode("xyz")], 40, temperature=0)[0]


def test_mlp_hooks_fire_once_per_step_with_the_full_forward_activations():
    m = tiny()
    prompt, n = [1, 2, 3, 4], 10  # stays within block_size: one prefill, then decode steps
    seen: list[torch.Tensor] = []
    handle = m.transformer.h[1].mlp.gelu.register_forward_hook(lambda mod, inp, out: seen.append(out.clone()))
    try:
        steps: list[Step] = []
        new = generate(m, [prompt], n, temperature=0, on_step=steps.append)[0]
    finally:
        handle.remove()
    assert len(seen) == n and [s.size(1) for s in seen] == [len(prompt)] + [1] * (n - 1)
    assert [s.prefill for s in steps] == [True] + [False] * (n - 1)
    assert steps[0].token_index.tolist() == [[0, 1, 2, 3]] and steps[1].token_index.tolist() == [[4]]
    # the reference: one full forward over prompt + all but the last new token
    ref: list[torch.Tensor] = []
    handle = m.transformer.h[1].mlp.gelu.register_forward_hook(lambda mod, inp, out: ref.append(out))
    try:
        m(torch.tensor([prompt + new[:-1]]))
    finally:
        handle.remove()
    torch.testing.assert_close(torch.cat(seen, dim=1), ref[0])


def test_step_token_index_marks_padding_and_window():
    m = tiny()
    steps: list[Step] = []
    generate(m, [[1, 2, 3], [4]], 20, temperature=0, on_step=steps.append)
    assert steps[0].token_index.tolist() == [[0, 1, 2], [-1, -1, 0]]
    assert steps[1].token_index.tolist() == [[3], [1]]
    assert steps[0].hidden.shape == (2, 3, 32) and steps[0].logits.shape == (2, CHAR_VOCAB)
    # row 0 reaches 17 tokens at step 14: its chunked window restarts from its last 8 tokens, left-
    # padded to row 1's window of 15 tokens (which is re-prefilled unchanged)
    refill = [s for s in steps if s.prefill and s.index > 0][0]
    assert refill.index == 14
    assert refill.token_index.tolist() == [[-1] * 7 + list(range(9, 17)), list(range(15))]


@pytest.mark.parametrize("arch", ARCHS)
def test_kv_cache_chunks_and_ragged_rows_equal_full_forward(arch):
    """GPT.forward with a KVCache, fed in uneven chunks (a multi-token chunk after the cache start
    needs an explicit causal mask) with left-padded rows, against each row's own full forward."""
    m = tiny(arch=arch)
    rows = [[3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5], [2, 7, 1, 8, 2, 8, 1]]
    pad = torch.tensor([0, 4])
    idx = torch.tensor([rows[0], [0] * 4 + rows[1]])
    cache = KVCache(m.config.n_layer, idx.size(1), pad=pad)
    with torch.no_grad():
        hidden = torch.cat([m(idx[:, a:b], kv_cache=cache, stop_at_layer=2) for a, b in ((0, 5), (5, 6), (6, 11))], 1)
        for r, row in enumerate(rows):
            ref = m(torch.tensor([row]), stop_at_layer=2)[0]
            got = hidden[r, int(pad[r]):]
            print(f"row {r}: max |diff| {(got - ref).abs().max().item():.2e}")
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    assert cache.filled == 11
    with pytest.raises(ValueError, match="overflow"):
        m(idx[:, :1], kv_cache=cache)


def test_window_length_rules():
    assert [window_length(n, 8) for n in range(1, 20)] == [1, 2, 3, 4, 5, 6, 7, 8] + [4, 5, 6, 7, 8] * 2 + [4]
    assert [window_length(n, 8, "sliding") for n in (1, 8, 9, 100)] == [1, 8, 8, 8]


def test_eval_mode_restored_and_bad_arguments():
    m = tiny().train()
    generate(m, [[1]], 2, temperature=0)
    assert m.training
    for kw in (dict(top_k=0), dict(top_p=0.0), dict(window="rolling"), dict(temperature=-1.0)):
        with pytest.raises(ValueError):
            generate(m, [[1]], 2, **kw)
    with pytest.raises(ValueError, match="empty"):
        generate(m, [[]], 2)
    with pytest.raises(ValueError, match="vocabulary"):
        generate(m, [[CHAR_VOCAB]], 2)


def test_text_stream_keeps_multibyte_characters_whole(mirror):
    tok = GPT2Tokenizer(mirror / "gpt2")
    text = "naïve café — 世界 🎉🦜 done"
    ids = tok.encode(text)
    stream = TextStream(tok)
    pieces = [stream.push(i) for i in ids] + [stream.flush()]
    assert "".join(pieces) == text == tok.decode(ids)
    assert not any("\ufffd" in p for p in pieces)
    assert len(ids) > len([p for p in pieces if p])  # some tokens were held back mid-character


def test_complete_empty_prompt():
    from glassgpt.errors import UserError

    tok = CharTokenizer.from_text("abc")
    with pytest.raises(UserError, match="empty"):
        complete(tiny(tok.vocab_size), tok, "", 5)

    class EotTokenizer(CharTokenizer):
        eot_token = 2

    c = complete(tiny(3), EotTokenizer(tok.stoi, tok.itos), "", 5)
    assert c.prompt_ids == [2] and len(c.output_ids) == 5 and c.text == tok.decode(c.output_ids)


@pytest.mark.parametrize("arch", ARCHS)
def test_cache_keeps_one_dtype_under_autocast(arch):
    """Under bf16 autocast q, k, v and the cache share one dtype (bf16 on CUDA; float32 on a CPU, where
    attention runs in float32), whatever QK-norm and value embeddings compute in."""
    m = tiny(arch=arch)
    cache = KVCache(m.config.n_layer, 8)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        m(torch.tensor([[1, 2, 3]]), kv_cache=cache)
        m(torch.tensor([[4]]), kv_cache=cache)
        out = generate(m, [[1, 2, 3], [4]], 20, temperature=0)
    assert cache.k.dtype == cache.v.dtype == torch.float32  # a CPU attends in float32 (model.py)
    assert [len(o) for o in out] == [20, 20]


def test_generate_builds_no_autograd_graph():
    """No tensor generate() computes, returns or hands to a callback requires grad, on every path
    (prefill, decode, a window refill past block_size), even when the caller has grad enabled."""
    model = tiny(block_size=8)
    seen: list[torch.Tensor] = []
    grad_inside: list[bool] = []

    def on_step(step: Step) -> None:
        seen.extend(t for t in (step.logits, step.hidden, step.tokens) if isinstance(t, torch.Tensor))
        grad_inside.append(torch.is_grad_enabled())

    assert torch.is_grad_enabled()
    generate(model, [[1, 2, 3], [4]], 12, temperature=1.0, seed=0, on_step=on_step)
    assert seen and grad_inside
    assert not any(grad_inside), "callbacks ran with autograd on"
    assert [t.shape for t in seen if t.requires_grad] == []
    assert torch.is_grad_enabled(), "generate() must not leave grad disabled for its caller"
