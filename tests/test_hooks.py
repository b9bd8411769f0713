"""Named hook points: the right modules, edits that take effect, and removal even on exceptions."""

import pytest
import torch

from glassgpt.errors import UserError
from glassgpt.generate import KVCache
from glassgpt.hooks import hook_names, hooks, mlp_post, record, resolve
from glassgpt.model import GPT, GPTConfig

MODERN = dict(rope=True, qk_norm=True, activation="relu2", tie_embeddings=False)


def tiny(**kw) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(block_size=16, vocab_size=40, n_layer=2, n_head=2, n_embd=16, **kw)).eval()


def n_hooks(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_every_name_resolves_to_its_module():
    m = tiny()
    names = hook_names(m)
    assert len(names) == 3 + 10 * 2
    assert resolve(m, "blocks.1.mlp.hook_post") is m.transformer.h[1].mlp.gelu
    assert resolve(m, "blocks.0.hook_resid_post") is m.transformer.h[0]
    assert resolve(m, "hook_embed") is m.transformer.wte
    for n in names:
        resolve(m, n)
    assert "hook_pos_embed" not in hook_names(tiny(rope=True))  # a rotary model has no wpe
    with pytest.raises(UserError, match="not a hook point"):
        resolve(tiny(rope=True), "hook_pos_embed")


def test_old_names_are_aliases():
    m = tiny()
    for old, new in (("h.0.mlp.gelu", mlp_post(0)), ("transformer.h.1.mlp.gelu", mlp_post(1)),
                     ("h.1", "blocks.1.hook_resid_post"), ("transformer.ln_f", "ln_final.hook_normalized")):
        assert resolve(m, old) is resolve(m, new), old
    x = torch.randint(0, 40, (1, 6))
    with record(m, ["h.0.mlp.gelu", mlp_post(0)]) as cache:
        m(x)
    torch.testing.assert_close(cache["h.0.mlp.gelu"][0], cache[mlp_post(0)][0], rtol=0, atol=0)


@pytest.mark.parametrize("arch", [{}, MODERN])
def test_residual_hooks_add_up(arch):
    """resid_mid = resid_pre + attn_out, resid_post = resid_mid + mlp_out, z @ c_proj = attn_out."""
    m = tiny(**arch)
    x = torch.randint(0, 40, (2, 9))
    with torch.no_grad(), record(m, hook_names(m)) as c:
        m(x)
    assert n_hooks(m) == 0
    get = lambda n: c[n][0]
    for i, block in enumerate(m.transformer.h):
        pre, mid, post = (get(f"blocks.{i}.hook_resid_{k}") for k in ("pre", "mid", "post"))
        torch.testing.assert_close(mid, pre + get(f"blocks.{i}.hook_attn_out"))
        torch.testing.assert_close(post, mid + get(f"blocks.{i}.hook_mlp_out"))
        z = get(f"blocks.{i}.attn.hook_z")
        assert z.shape == (2, 9, 2, 8)
        torch.testing.assert_close(block.attn.c_proj(z.reshape(2, 9, 16)), get(f"blocks.{i}.hook_attn_out"))
    torch.testing.assert_close(get("blocks.0.hook_resid_post"), m(x, stop_at_layer=1))
    torch.testing.assert_close(get("ln_final.hook_normalized"), m(x, stop_at_layer=2))


@pytest.mark.parametrize("arch", [{}, MODERN])
def test_every_hook_fires_with_the_same_values_in_cached_decoding(arch):
    """Prefill 5 tokens, then decode 6 one at a time through the KV cache: every hook point's
    activations, joined along time, equal those of one full forward over the 11 tokens."""
    m = tiny(**arch)
    x = torch.randint(0, 40, (2, 11))
    names = hook_names(m)
    with torch.no_grad():
        with record(m, names) as full:
            m(x)
        cache = KVCache(m.config.n_layer, 11)
        with record(m, names) as cached:
            m(x[:, :5], kv_cache=cache)
            for t in range(5, 11):
                m(x[:, t:t + 1], kv_cache=cache)
    assert n_hooks(m) == 0
    worst = 0.0
    for n in names:
        assert len(full[n]) == 1 and len(cached[n]) == 7, n
        assert [a.size(1) for a in cached[n]] == [5] + [1] * 6, n
        joined = torch.cat(cached[n], dim=1)
        worst = max(worst, (joined - full[n][0]).abs().max().item())
        torch.testing.assert_close(joined, full[n][0], rtol=1e-5, atol=1e-5, msg=n)
    print(f"{len(names)} hook points, max |cached - full| {worst:.2e}")


def test_editing_residual_and_z_hooks_takes_effect():
    m = tiny()
    x = torch.randint(0, 40, (1, 8))
    with torch.no_grad():
        ref, _ = m(x, x)
        for name in ("blocks.0.hook_resid_mid", "blocks.1.hook_resid_pre", "blocks.0.attn.hook_z"):
            with hooks(m, [(name, lambda a, n: a.clone())]):
                same, _ = m(x, x)
            torch.testing.assert_close(same, ref, msg=name)
            with hooks(m, [(name, lambda a, n: torch.zeros_like(a))]):
                edited, _ = m(x, x)
            assert (edited - ref).abs().max().item() > 1e-4, name
    assert n_hooks(m) == 0


def test_record_matches_manual_mlp_computation():
    m = tiny()
    x = torch.randint(0, 40, (2, 10))
    with record(m, [mlp_post(0), "blocks.0.ln2.hook_normalized"]) as cache:
        m(x)
    assert n_hooks(m) == 0
    post, ln2 = cache[mlp_post(0)][0], cache["blocks.0.ln2.hook_normalized"][0]
    assert post.shape == (2, 10, 64)
    mlp = m.transformer.h[0].mlp
    torch.testing.assert_close(post, torch.nn.functional.gelu(mlp.c_fc(ln2)))


def test_replacing_an_activation_changes_the_output_and_identity_does_not():
    m = tiny()
    x = torch.randint(0, 40, (1, 12))
    with torch.no_grad():
        ref, _ = m(x, x)
        with hooks(m, [(mlp_post(1), lambda a, name: a.clone())]):
            same, _ = m(x, x)
        with hooks(m, [(mlp_post(1), lambda a, name: torch.zeros_like(a))]):
            zeroed, _ = m(x, x)
    torch.testing.assert_close(same, ref)
    diff = (zeroed - ref).abs().max().item()
    assert diff > 1e-4, f"zeroing a layer's neurons changed the logits by only {diff}"


def test_hooks_removed_even_when_the_forward_raises():
    m = tiny()

    def boom(a, name):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        with hooks(m, [(mlp_post(0), boom), (mlp_post(1), lambda a, n: None)]):
            m(torch.randint(0, 40, (1, 4)))
    assert n_hooks(m) == 0
    with pytest.raises(ValueError):
        with record(m, [mlp_post(0)]):
            m(torch.randint(0, 40, (1, 40)))  # longer than block_size: the model raises
    assert n_hooks(m) == 0


def test_bad_name_is_a_user_error_and_leaves_no_hooks():
    m = tiny()
    with pytest.raises(UserError, match="blocks 0..1"):
        with hooks(m, [(mlp_post(0), lambda a, n: None), (mlp_post(5), lambda a, n: None)]):
            pass
    assert n_hooks(m) == 0
    with pytest.raises(UserError, match="did you mean"):
        resolve(m, "blocks.0.mlp.hook_pots")


def test_compiled_model_is_refused():
    m = tiny()
    m._orig_mod = torch.nn.Linear(1, 1)  # what torch.compile's wrapper carries
    with pytest.raises(ValueError, match="uncompiled"):
        resolve(m, mlp_post(0))
