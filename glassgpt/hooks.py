"""Named hook points on glassgpt's GPT, TransformerLens-style, that are always removed afterwards.

PyTorch forward hooks are global state on a module: one left behind by an exception keeps recording
(or ablating!) in every later forward pass. So hooks are only ever attached inside a context manager
that removes them in `finally`:

    from glassgpt.hooks import hooks, record

    with record(model, ["blocks.0.mlp.hook_post"]) as cache:   # read activations
        model(idx)
    acts = cache["blocks.0.mlp.hook_post"][0]                  # (B, T, 4*n_embd), one entry per call

    def zero_neuron_7(act, name):                              # edit activations
        act = act.clone(); act[..., 7] = 0; return act
    with hooks(model, [("blocks.0.mlp.hook_post", zero_neuron_7)]):
        logits, _ = model(idx)

Names follow TransformerLens (https://github.com/TransformerLensOrg/TransformerLens) so that readers
of interpretability papers recognise them; each maps to one module of glassgpt/model.py and sees that
module's output (see HOOK_POINTS). A hook function gets `(activation, name)` and returns None (only
look) or a tensor that replaces the module's output.

Hooks fire wherever the module is called, so they also fire in glassgpt.generate's cached decoding,
where each step calls the blocks on the new position only. They need the uncompiled model: a
torch.compile'd graph would not call them reliably, so a compiled model is refused.
"""

from __future__ import annotations

import contextlib
import difflib
import re
from collections.abc import Callable, Iterable, Iterator

import torch
import torch.nn as nn

from glassgpt.errors import UserError

HookFn = Callable[[torch.Tensor, str], "torch.Tensor | None"]

# TransformerLens name -> module path in glassgpt's GPT ({i} = block index). The hook sees the output.
HOOK_POINTS: dict[str, str] = {
    "hook_embed": "transformer.wte",  # token embeddings (B, T, C)
    "hook_pos_embed": "transformer.wpe",  # position embeddings (T, C)
    "blocks.{i}.ln1.hook_normalized": "transformer.h.{i}.ln_1",
    "blocks.{i}.hook_attn_out": "transformer.h.{i}.attn",  # attention output after c_proj (B, T, C)
    "blocks.{i}.ln2.hook_normalized": "transformer.h.{i}.ln_2",
    "blocks.{i}.mlp.hook_pre": "transformer.h.{i}.mlp.c_fc",  # MLP pre-activation (B, T, 4C)
    "blocks.{i}.mlp.hook_post": "transformer.h.{i}.mlp.gelu",  # MLP neurons after GELU (B, T, 4C)
    "blocks.{i}.hook_mlp_out": "transformer.h.{i}.mlp",  # MLP output after c_proj (B, T, C)
    "blocks.{i}.hook_resid_post": "transformer.h.{i}",  # residual stream after the block (B, T, C)
    "ln_final.hook_normalized": "transformer.ln_f",  # what lm_head scores (B, T, C)
}


def mlp_post(layer: int) -> str:
    """The hook name of block `layer`'s MLP neurons (after the GELU)."""
    return f"blocks.{layer}.mlp.hook_post"


def hook_names(model: nn.Module) -> list[str]:
    """Every hook point name this model has, blocks expanded."""
    n_layer = len(_uncompiled(model).transformer.h)
    names: list[str] = []
    for pattern in HOOK_POINTS:
        if "{i}" in pattern:
            names += [pattern.format(i=i) for i in range(n_layer)]
        else:
            names.append(pattern)
    return names


def _uncompiled(model: nn.Module) -> nn.Module:
    if hasattr(model, "_orig_mod"):
        raise ValueError("hooks need the uncompiled model: pass model._orig_mod (torch.compile'd graphs "
                         "do not reliably call Python hooks)")
    return model


def resolve(model: nn.Module, name: str) -> nn.Module:
    """The module behind a hook name; UserError naming the closest valid one if it is not a hook point."""
    model = _uncompiled(model)
    m = re.fullmatch(r"blocks\.(\d+)\.(.+)", name)
    pattern, layer = (f"blocks.{{i}}.{m.group(2)}", int(m.group(1))) if m else (name, None)
    n_layer = len(model.transformer.h)
    if pattern not in HOOK_POINTS:
        close = difflib.get_close_matches(name, hook_names(model), n=1)
        raise UserError(f"{name!r} is not a hook point" + (f"; did you mean {close[0]!r}?" if close else
                        f"; valid names look like {mlp_post(0)!r}"))
    if layer is not None and not 0 <= layer < n_layer:
        raise UserError(f"hook {name!r}: block {layer} is out of range; this model has blocks 0..{n_layer - 1}")
    return model.get_submodule(HOOK_POINTS[pattern].format(i=layer))


@contextlib.contextmanager
def hooks(model: nn.Module, fwd_hooks: Iterable[tuple[str, HookFn]]) -> Iterator[None]:
    """Attach `(name, fn)` forward hooks for the duration of the block; removed even on exceptions."""
    handles = []
    try:
        for name, fn in fwd_hooks:
            module = resolve(model, name)

            # bind name/fn now: a closure over the loop variables would see only the last pair
            def call(_module: nn.Module, _inputs: tuple, output: torch.Tensor, name=name, fn=fn):
                return fn(output, name)

            handles.append(module.register_forward_hook(call))
        yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def record(model: nn.Module, names: Iterable[str]) -> Iterator[dict[str, list[torch.Tensor]]]:
    """Record the named activations: yields {name: [output of each call, detached]}.

    One entry per module call, so a cached decoding loop yields its prefill (B, T_prompt, ...) and
    then one (B, 1, ...) entry per step."""
    cache: dict[str, list[torch.Tensor]] = {n: [] for n in names}

    def keep(act: torch.Tensor, name: str) -> None:
        cache[name].append(act.detach())

    with hooks(model, [(n, keep) for n in cache]):
        yield cache
