"""Model shapes, loss at init, and the fast attention path against a slow reference."""

import math

import pytest
import torch
from torch.nn import functional as F

from glassgpt.model import GPT, GPTConfig


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


def test_sdpa_matches_manual_attention():
    m = tiny().eval()
    attn = m.transformer.h[0].attn
    x = torch.randn(2, 16, 32)
    q, k, v = attn.split_heads(x)
    T = x.size(1)
    att = (q @ k.transpose(-2, -1)) / math.sqrt(k.size(-1))
    att = att.masked_fill(torch.triu(torch.ones(T, T, dtype=torch.bool), 1), float("-inf"))
    ref = attn.merge_heads(F.softmax(att, dim=-1) @ v)
    torch.testing.assert_close(attn(x), ref, rtol=1e-5, atol=1e-6)


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


def test_mfu_needs_known_peak():
    m = tiny()
    assert m.estimate_mfu(1000.0, None) is None
    assert m.estimate_mfu(1000.0, 1e12) == pytest.approx(m.flops_per_token() * 1000 / 1e12)
