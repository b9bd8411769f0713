"""Model shapes, loss at init, and the fast attention path against a slow reference."""

import math

import pytest
import torch
from torch.nn import functional as F

from glassgpt.model import GPT, GPTConfig, alibi_slopes


def tiny(**kw) -> GPT:
    cfg = dict(block_size=16, vocab_size=50, n_layer=2, n_head=2, n_embd=32, dropout=0.0)
    cfg.update(kw)
    return GPT(GPTConfig(**cfg))


def test_forward_backward_shapes():
    m = tiny()
    x = torch.randint(0, 50, (3, 16))
    logits, loss = m(x, x)
    assert logits.shape == (3, 16, 50)
    loss.backward()
    assert all(p.grad is not None and p.grad.shape == p.shape for p in m.parameters())
    logits, loss = m(x)
    assert logits.shape == (3, 1, 50) and loss is None


def test_loss_at_init_is_uniform_guess():
    m = tiny(vocab_size=65)
    x = torch.randint(0, 65, (8, 16))
    y = torch.randint(0, 65, (8, 16))
    _, loss = m(x, y)
    # random init => near-uniform predictions => loss ~ ln(vocab)
    assert abs(loss.item() - math.log(65)) < 0.1, loss.item()


def rotation_matrices(T: int, hs: int, base: float, scale: float = 1.0) -> torch.Tensor:
    """(T, hs, hs): position p turns the pair (i, i + hs/2) by p/scale * base**(-2i/hs), as a matrix."""
    R = torch.zeros(T, hs, hs)
    h = hs // 2
    for p in range(T):
        for i in range(h):
            a = torch.tensor(p / scale * base ** (-2 * i / hs))
            R[p, i, i], R[p, i, i + h], R[p, i + h, i], R[p, i + h, i + h] = a.cos(), -a.sin(), a.sin(), a.cos()
    return R


def slow_ngram(m: GPT, idx: torch.Tensor) -> torch.Tensor:
    """(B, T, C) sum of the n-gram table rows, one position at a time: the token j back is
    idx[t - j], or vocab_size before the sequence; bigram row prev * V + token when the table has
    (V + 1) * V rows, else the XOR hash (token*36313 ^ prev*27191 ^ prev2*51497 ^ prev3*70001) % rows."""
    cfg, (B, T) = m.config, idx.shape
    V, out = cfg.vocab_size, torch.zeros(B, T, cfg.n_embd)
    for b in range(B):
        for t in range(T):
            back = [int(idx[b, t - j]) if t - j >= 0 else V for j in range(cfg.ngram)]
            for n, table in zip(range(2, cfg.ngram + 1), m.transformer.ngram, strict=True):
                h = back[0] * 36313
                for j, c in zip(range(1, n), (27191, 51497, 70001), strict=False):
                    h ^= back[j] * c
                rows = table.weight.size(0)
                out[b, t] += table.weight[back[1] * V + back[0] if n == 2 and rows == (V + 1) * V else h % rows]
    return out


def slow_forward(m: GPT, idx: torch.Tensor, stop_at_layer: int | None = None) -> torch.Tensor:
    """The network written out with einsums and formulas, one option at a time: the oracle for
    GPT.forward. Returns the residual after stop_at_layer blocks (ln_f'd at n_layer), else all logits."""
    cfg, tr = m.config, m.transformer
    B, T = idx.shape
    nh, hs = cfg.n_head, cfg.n_embd // cfg.n_head
    ln = lambda mod, x: F.layer_norm(x, (x.size(-1),), mod.weight, mod.bias, 1e-5)
    lin = lambda mod, x: x @ mod.weight.T + (0 if mod.bias is None else mod.bias)
    rms = lambda x: x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    act = {"gelu": lambda x: 0.5 * x * (1 + torch.erf(x / math.sqrt(2))),
           "gelu_new": lambda x: 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3))),
           "relu2": lambda x: torch.where(x > 0, x * x, torch.zeros_like(x))}[cfg.activation]
    x = tr.wte.weight[idx]
    if not cfg.rope and not cfg.alibi:
        x = x + tr.wpe.weight[:T]
    if cfg.smear:  # x[t] += sigmoid(w . x[t, :12]) * x[t-1], from t = 1 on
        gate = torch.sigmoid(x[..., :12] @ tr.smear_gate.weight.T)  # (B, T, 1)
        x = x + torch.cat([torch.zeros_like(x[:, :1]), gate[:, 1:] * x[:, :-1]], dim=1)
    R = rotation_matrices(T, hs, cfg.rope_base, cfg.rope_scale) if cfg.rope else None
    causal = torch.tril(torch.ones(T, T, dtype=torch.bool))
    distance = torch.arange(T)[:, None] - torch.arange(T)[None]  # (t, s): t - s
    ngram = slow_ngram(m, idx) if cfg.ngram else None
    n = cfg.n_layer if stop_at_layer is None else stop_at_layer
    for i, block in enumerate(tr.h[:n]):
        if ngram is not None:
            x = x + m.ngram_lambdas[i] * ngram
        h = ln(block.ln_1, x)
        q, k, v = lin(block.attn.c_attn, h).view(B, T, 3, nh, hs).unbind(2)  # (B, T, nh, hs)
        if cfg.value_embed:
            v = v + tr.ve[i].weight[idx].view(B, T, nh, hs)
        if cfg.qk_norm:
            q, k = rms(q), rms(k)
        if cfg.rope:
            q, k = torch.einsum("tij,btnj->btni", R, q), torch.einsum("tij,btnj->btni", R, k)
        att = torch.einsum("btnd,bsnd->bnts", q, k) / math.sqrt(hs)
        if cfg.alibi:  # head n: score(t, s) - slope_n * (t - s)
            att = att - alibi_slopes(nh)[:, None, None] * distance
        att = att.masked_fill(~causal, float("-inf")).softmax(-1)
        y = torch.einsum("bnts,bsnd->btnd", att, v)  # (B, T, nh, hs)
        if cfg.attn_gate:  # head n at time t scaled by sigmoid(W[n] . h[t, :12])
            y = y * torch.sigmoid(torch.einsum("btc,nc->btn", h[..., :12], block.attn.gate.weight))[..., None]
        y = y.reshape(B, T, cfg.n_embd)
        x = x + lin(block.attn.c_proj, y)
        x = x + lin(block.mlp.c_proj, act(lin(block.mlp.c_fc, ln(block.ln_2, x))))
    if n < cfg.n_layer:
        return x
    x = ln(tr.ln_f, x)
    if stop_at_layer is not None:
        return x
    logits = x @ m.lm_head.weight.T
    return logits if cfg.logit_softcap is None else cfg.logit_softcap * torch.tanh(logits / cfg.logit_softcap)


OPTIONS = {
    "gpt2": {},
    "gelu_new": dict(activation="gelu_new"),
    "relu2": dict(activation="relu2"),
    "rope": dict(rope=True),
    "rope_base_scale": dict(rope=True, rope_base=50.0, rope_scale=2.5),
    "qk_norm": dict(qk_norm=True),
    "untied_softcap": dict(tie_embeddings=False, logit_softcap=3.0, bias=False),
    "value_embed": dict(value_embed=True),
    "smear": dict(smear=True),
    "attn_gate": dict(attn_gate=True),
    "alibi": dict(alibi=True),
    "alibi_6_heads": dict(alibi=True, n_head=6, n_embd=48),
    "bigram_exact": dict(ngram=2),
    "ngram4_hashed": dict(ngram=4, ngram_rows=97),
    "all": dict(rope=True, qk_norm=True, activation="relu2", tie_embeddings=False, zero_init_proj=True,
                value_embed=True, logit_softcap=4.0, smear=True, attn_gate=True, ngram=3, ngram_rows=61,
                init="fan_in"),
    "alibi_all": dict(alibi=True, qk_norm=True, smear=True, value_embed=True, attn_gate=True, ngram=3),
}


@pytest.mark.parametrize("option", OPTIONS)
def test_forward_and_stop_at_layer_match_the_slow_reference(option):
    torch.manual_seed(0)
    m = tiny(**OPTIONS[option]).eval()
    with torch.no_grad():
        for p in m.parameters():  # wider than init (zero c_proj would hide the attention entirely)
            p.add_(torch.randn_like(p) * 0.3)
    x = torch.randint(0, 50, (2, 16))
    y = torch.randint(0, 50, (2, 16))
    with torch.no_grad():
        logits, _ = m(x, y)
        ref = slow_forward(m, x)
        print(f"{option}: max |logit diff| {(logits - ref).abs().max().item():.2e}")
        torch.testing.assert_close(logits, ref, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(m(x)[0], ref[:, [-1]], rtol=1e-4, atol=1e-4)
        for L in range(m.config.n_layer + 1):
            torch.testing.assert_close(m(x, stop_at_layer=L), slow_forward(m, x, L), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(m.hidden_states(x), slow_forward(m, x, m.config.n_layer))
    with pytest.raises(ValueError, match="stop_at_layer"):
        m(x, stop_at_layer=3)


def test_slow_reference_can_fail():
    """The oracle tells the options apart: a model with one option flipped (same weights) is off."""
    base = dict(rope=True, qk_norm=True, activation="relu2")
    torch.manual_seed(0)
    m = tiny(**base).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    x = torch.randint(0, 50, (1, 16))
    with torch.no_grad():
        ref = slow_forward(m, x)
        for change in (dict(rope_base=20.0), dict(qk_norm=False), dict(activation="gelu"), dict(rope_scale=2.0),
                       dict(logit_softcap=2.0)):
            other = tiny(**{**base, **change}).eval()
            other.load_state_dict(m.state_dict())
            diff = (other(x, x)[0] - ref).abs().max().item()
            assert diff > 1e-3, (change, diff)
        alibi = tiny(alibi=True, ngram=3).eval()
        for p in alibi.parameters():
            p.add_(torch.randn_like(p) * 0.3)
        torch.testing.assert_close(alibi(x, x)[0], slow_forward(alibi, x), rtol=1e-4, atol=1e-4)
        for blk in alibi.transformer.h:  # twice the slopes: the oracle must notice
            blk.attn.alibi.mul_(2)
        assert (alibi(x, x)[0] - slow_forward(alibi, x)).abs().max().item() > 1e-3


def test_alibi_slopes_are_the_papers():
    """Press et al. 2022, section 3: 2^-8/n ... 2^-8; 6 heads: the 4-head slopes, then 2^-1, 2^-3."""
    torch.testing.assert_close(alibi_slopes(4), torch.tensor([2**-2, 2**-4, 2**-6, 2**-8]))
    torch.testing.assert_close(alibi_slopes(8), torch.tensor([2.0**-i for i in range(1, 9)]))
    torch.testing.assert_close(alibi_slopes(6), torch.tensor([2**-2, 2**-4, 2**-6, 2**-8, 2**-1, 2**-3]))


def test_ngram_tables_exact_bigrams_hashed_rest():
    """Every (previous, current) pair of a char vocabulary has a row of its own; the model's n-gram
    embedding at t depends on tokens t-n+1..t only; tables start at zero (the model starts without them)."""
    torch.manual_seed(0)
    m = tiny(ngram=3, ngram_rows=3000, vocab_size=50)
    assert [t.weight.shape[0] for t in m.transformer.ngram] == [51 * 50, 3000]
    assert all(t.weight.abs().max().item() == 0 for t in m.transformer.ngram)
    assert m.get_num_params() == m.get_num_params(False) - (51 * 50 + 3000 + 16) * 32  # no FLOPs: not counted
    with torch.no_grad():
        for t in m.transformer.ngram:
            t.weight.normal_()
        x = torch.randint(0, 50, (1, 16))
        e = m.ngram_embed(x, torch.arange(16)[None])
        y = x.clone()
        y[0, 5] = (x[0, 5] + 1) % 50  # changes the n-grams ending at 5, 6, 7 only
        changed = (m.ngram_embed(y, torch.arange(16)[None]) - e).abs().amax(-1)[0] > 0
    assert changed.nonzero().flatten().tolist() == [5, 6, 7]


@pytest.mark.parametrize("tied", [True, False])
def test_fan_in_init(tied):
    """init='fan_in': matrices std fan_in^-0.5 * min(1, sqrt(fan_out/fan_in)), embeddings std 1, an
    untied head zero (a tied one 0.02), c_proj that rule / sqrt(2 n_layer) or zero; 'gpt2' is 0.02."""
    torch.manual_seed(0)
    m = tiny(init="fan_in", tie_embeddings=tied, n_embd=64, vocab_size=500, ngram=2)
    h = m.transformer.h[0]
    assert h.attn.c_attn.weight.std().item() == pytest.approx(64**-0.5, rel=0.05)
    assert h.mlp.c_fc.weight.std().item() == pytest.approx(64**-0.5, rel=0.05)
    assert h.mlp.c_proj.weight.std().item() == pytest.approx(256**-0.5 * 0.5 / 2, rel=0.05)  # narrows 4x, /sqrt(4)
    assert m.lm_head.weight.std().item() == pytest.approx(0.02 if tied else 0.0, rel=0.05, abs=1e-9)
    if not tied:
        assert m.transformer.wte.weight.std().item() == pytest.approx(1.0, rel=0.05)
    assert m.transformer.ngram[0].weight.abs().max().item() == 0.0
    assert tiny(init="fan_in", zero_init_proj=True).transformer.h[1].attn.c_proj.weight.abs().max().item() == 0.0
    assert tiny(n_embd=64).transformer.h[0].attn.c_attn.weight.std().item() == pytest.approx(0.02, rel=0.05)
    with pytest.raises(ValueError, match="init"):
        tiny(init="xavier")


def test_rotary_model_depends_on_relative_positions_only():
    """Causal rotary attention is shift-invariant: the same tokens at positions 5.. (via a KV cache
    whose first 5 slots are padding) give the same hidden states as at positions 0.."""
    from glassgpt.generate import KVCache

    torch.manual_seed(0)
    m = tiny(rope=True).eval()
    x = torch.randint(0, 50, (1, 10))
    with torch.no_grad():
        ref = m(x, stop_at_layer=2)
        cache = KVCache(2, 15)
        cache.prepare = (lambda T, device, _p=cache.prepare: _p(T, device) + 5)  # shift every position
        got = m(x, kv_cache=cache, stop_at_layer=2)
        w = tiny().eval()  # learned positions are not shift-invariant: the same check must fail
        w_cache = KVCache(2, 15)
        w_cache.prepare = (lambda T, device, _p=w_cache.prepare: _p(T, device) + 5)
        shifted = (w(x, kv_cache=w_cache, stop_at_layer=2) - w(x, stop_at_layer=2)).abs().max().item()
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    assert shifted > 1e-3, shifted


def test_options_shapes_and_names():
    m = tiny(rope=True, tie_embeddings=False)
    names = set(m.state_dict())
    assert "transformer.wpe.weight" not in names and "lm_head.weight" in names
    assert "transformer.ve.1.weight" in set(tiny(value_embed=True).state_dict())
    assert not any(".ve." in n for n in names)
    assert m.lm_head.weight is not m.transformer.wte.weight
    z = tiny(zero_init_proj=True)
    assert all(p.abs().max() == 0 for n, p in z.named_parameters() if n.endswith("c_proj.weight"))
    assert GPTConfig().non_gpt2_options() == []
    assert GPTConfig(activation="gelu_new", rope_base=5.0, bias=False).non_gpt2_options() == []
    assert GPTConfig(rope=True, rope_base=5.0, qk_norm=True, activation="relu2").non_gpt2_options() == [
        "activation", "rope", "rope_base", "qk_norm"]
    c = GPTConfig(rope=True, logit_softcap=15.0)
    assert GPTConfig.from_dict({**c.to_dict(), "unknown_future_key": 1}) == c
    for bad in (dict(activation="swish"), dict(rope=True, n_embd=30, n_head=6), dict(logit_softcap=0.0)):
        with pytest.raises(ValueError):
            GPTConfig(**bad)


def test_weight_tying_and_param_names():
    m = tiny()
    assert m.lm_head.weight is m.transformer.wte.weight
    names = set(m.state_dict())
    for n in ("transformer.wte.weight", "transformer.wpe.weight", "transformer.h.0.attn.c_attn.weight",
              "transformer.h.1.mlp.c_fc.weight", "transformer.h.1.mlp.c_proj.weight", "transformer.ln_f.weight"):
        assert n in names


def test_crop_block_size():
    m = tiny()
    m.crop_block_size(8)
    assert m.transformer.wpe.weight.shape[0] == 8
    m(torch.randint(0, 50, (1, 8)))
    with pytest.raises(ValueError, match="block size is only 8"):
        m(torch.randint(0, 50, (1, 9)))
    with pytest.raises(ValueError):
        m.crop_block_size(32)


def test_optimizer_groups_decay_only_matrices():
    m = tiny(bias=True)
    opt = m.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu")
    decay, no_decay = opt.param_groups
    assert all(p.dim() >= 2 for p in decay["params"]) and decay["weight_decay"] == 0.1
    assert all(p.dim() < 2 for p in no_decay["params"]) and no_decay["weight_decay"] == 0.0


def test_gelu_variants_differ():
    x = torch.randint(0, 50, (1, 16))
    torch.manual_seed(1)
    a = tiny(activation="gelu")
    torch.manual_seed(1)
    b = tiny(activation="gelu_new")
    b.load_state_dict(a.state_dict())
    la, lb = a(x)[0], b(x)[0]
    diff = (la - lb).abs().max().item()
    assert 0 < diff < 1e-2, diff


@pytest.mark.parametrize("T", [16, 300])
def test_cpu_bf16_attention_matches_float32_sdpa(T, monkeypatch):
    """The attention under CPU bf16 autocast against float32 SDPA: the explicit bf16 path (T <= 256)
    within bf16 rounding, longer contexts through SDPA with float32 inputs."""
    from glassgpt.model import CausalSelfAttention
    from glassgpt.runtime import autocast

    torch.manual_seed(0)
    attn = CausalSelfAttention(GPTConfig(n_embd=32, n_head=2, block_size=T))
    q, k, v = (torch.randn(3, 2, T, 16) for _ in range(3))
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    seen = []
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda q, k, v, **kw: seen.append(q.dtype) or sdpa(q, k, v, **kw))
    with autocast("cpu", "bfloat16"):
        got = attn._attend(q, k, v, None, torch.bfloat16)
    print(f"T={T}: max |diff| {(got.float() - ref).abs().max().item():.2e}")
    torch.testing.assert_close(got.float(), ref, rtol=0, atol=3e-2 if T <= 256 else 1e-5)
    assert seen == ([] if T <= 256 else [torch.float32])


def test_mfu_needs_known_peak():
    m = tiny()
    assert m.estimate_mfu(1000.0, None) is None
    assert m.estimate_mfu(1000.0, 1e12) == pytest.approx(m.flops_per_token() * 1000 / 1e12)


@pytest.mark.parametrize("option", [{}, {"rope": True, "qk_norm": True, "activation": "relu2"}])
def test_cpu_bf16_autocast_matches_fp32_with_float32_attention(option, monkeypatch):
    """CPU bf16 autocast (the record recipe's dtype): loss and gradients agree with float32, and a
    short causal context takes the explicit bf16 attention, not SDPA (whose bf16 backward is ~10x
    slower on a CPU)."""
    from glassgpt.runtime import autocast

    torch.manual_seed(0)
    m = tiny(**option)
    x = torch.randint(0, 50, (4, 16))
    _, ref = m(x, x)
    ref.backward()
    ref_grads = [p.grad.clone() for p in m.parameters()]
    m.zero_grad()
    seen = []
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda q, k, v, **kw: seen.append(q.dtype) or sdpa(q, k, v, **kw))
    with autocast("cpu", "bfloat16"):
        logits, loss = m(x, x)
    assert logits.dtype == torch.bfloat16 and seen == []
    loss.backward()
    assert abs(loss.item() - ref.item()) < 0.02 * ref.item()
    for g, r in zip((p.grad for p in m.parameters()), ref_grads):
        assert F.cosine_similarity(g.flatten().float(), r.flatten(), dim=0) > 0.98
