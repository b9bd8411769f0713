"""Named hook points: the right modules, edits that take effect, and removal even on exceptions."""

import pytest
import torch

from glassgpt.errors import UserError
from glassgpt.hooks import hook_names, hooks, mlp_post, record, resolve
from glassgpt.model import GPT, GPTConfig


def tiny() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(block_size=16, vocab_size=40, n_layer=2, n_head=2, n_embd=16)).eval()


def n_hooks(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) for m in model.modules())


def test_every_name_resolves_to_its_module():
    m = tiny()
    names = hook_names(m)
    assert len(names) == 3 + 7 * 2
    assert resolve(m, "blocks.1.mlp.hook_post") is m.transformer.h[1].mlp.gelu
    assert resolve(m, "blocks.0.hook_resid_post") is m.transformer.h[0]
    assert resolve(m, "hook_embed") is m.transformer.wte
    for n in names:
        resolve(m, n)


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
