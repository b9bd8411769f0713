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
of interpretability papers recognise them; each is one module's output or input in glassgpt/model.py
(see HOOK_POINTS). A hook function gets `(activation, name)` and returns None (only look) or a
tensor that replaces the activation. Module paths that name an output hook point keep working as
aliases (`h.0.mlp.gelu` and `transformer.h.0.mlp.gelu` are `blocks.0.mlp.hook_post`).

There is one forward pass (GPT.forward), so hooks fire the same way in training, in full forward
and in glassgpt.generate's cached decoding, where a decode step calls every module on the new
position only. They need the uncompiled model: a torch.compile'd graph would not call them
reliably, so a compiled model is refused.
"""

from __future__ import annotations

import contextlib
import difflib
import re
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
import torch.nn as nn

from glassgpt.errors import UserError

HookFn = Callable[[torch.Tensor, str], "torch.Tensor | None"]

# TransformerLens name -> (module path in glassgpt's GPT ({i} = block index), what the hook sees:
# "out" = the module's output, "in" = its first input, "heads" = its input viewed (B, T, nh, hs)).
HOOK_POINTS: dict[str, tuple[str, str]] = {
    "hook_embed": ("transformer.wte", "out"),  # token embeddings (B, T, C)
    "hook_pos_embed": ("transformer.wpe", "out"),  # position embeddings (1, T, C); absent with rope or alibi
    "blocks.{i}.hook_resid_pre": ("transformer.h.{i}", "in"),  # residual stream into the block (B, T, C)
    "blocks.{i}.ln1.hook_normalized": ("transformer.h.{i}.ln_1", "out"),
    "blocks.{i}.attn.hook_z": ("transformer.h.{i}.attn.c_proj", "heads"),  # per-head attention output (B, T, nh, hs)
    "blocks.{i}.hook_attn_out": ("transformer.h.{i}.attn", "out"),  # attention output after c_proj (B, T, C)
    "blocks.{i}.hook_resid_mid": ("transformer.h.{i}.resid_mid", "out"),  # after attention's residual add
    "blocks.{i}.ln2.hook_normalized": ("transformer.h.{i}.ln_2", "out"),
    "blocks.{i}.mlp.hook_pre": ("transformer.h.{i}.mlp.c_fc", "out"),  # MLP pre-activation (B, T, 4C)
    "blocks.{i}.mlp.hook_post": ("transformer.h.{i}.mlp.gelu", "out"),  # MLP neurons after the activation (B, T, 4C)
    "blocks.{i}.hook_mlp_out": ("transformer.h.{i}.mlp", "out"),  # MLP output after c_proj (B, T, C)
    "blocks.{i}.hook_resid_post": ("transformer.h.{i}", "out"),  # residual stream after the block (B, T, C)
    "ln_final.hook_normalized": ("transformer.ln_f", "out"),  # what lm_head scores (B, T, C)
}
# Old names: the module path of an output hook point, with or without the "transformer." prefix.
ALIASES: dict[str, str] = {path.removeprefix("transformer."): name
                           for name, (path, kind) in HOOK_POINTS.items() if kind == "out"}


def mlp_post(layer: int) -> str:
    """The hook name of block `layer`'s MLP neurons (after the GELU)."""
    return f"blocks.{layer}.mlp.hook_post"


def hook_names(model: nn.Module) -> list[str]:
    """Every hook point name this model has, blocks expanded."""
    model = _uncompiled(model)
    n_layer = len(model.transformer.h)  # type: ignore[arg-type]
    names: list[str] = []
    for pattern, (path, _) in HOOK_POINTS.items():
        if "{i}" in pattern:
            names += [pattern.format(i=i) for i in range(n_layer)]
        elif path.removeprefix("transformer.") in model.transformer:  # no wpe in a rotary model
            names.append(pattern)
    return names


def _uncompiled(model: nn.Module) -> Any:
    if hasattr(model, "_orig_mod"):
        raise ValueError("hooks need the uncompiled model: pass model._orig_mod (torch.compile'd graphs "
                         "do not reliably call Python hooks)")
    return model


def canonical(name: str) -> str:
    """The TransformerLens name for a hook name or an old alias (a module path); unknown names as given."""
    bare = name.removeprefix("transformer.")
    m = re.fullmatch(r"(blocks|h)\.(\d+)(\..+)?", bare)
    pattern = f"{m.group(1)}.{{i}}{m.group(3) or ''}" if m else bare
    if pattern in ALIASES:
        pattern = ALIASES[pattern]
    elif pattern not in HOOK_POINTS:
        return name
    return pattern.format(i=m.group(2)) if m else pattern


def _point(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    """(module, kind) behind a hook name; UserError naming the closest valid one if it is not one."""
    model = _uncompiled(model)
    tl = canonical(name)
    m = re.fullmatch(r"blocks\.(\d+)\.(.+)", tl)
    pattern, layer = (f"blocks.{{i}}.{m.group(2)}", int(m.group(1))) if m else (tl, None)
    n_layer = len(model.transformer.h)  # type: ignore[arg-type]
    if pattern not in HOOK_POINTS or (layer is None and tl not in hook_names(model)):
        close = difflib.get_close_matches(name, hook_names(model), n=1)
        raise UserError(f"{name!r} is not a hook point of this model" + (
            f"; did you mean {close[0]!r}?" if close else f"; valid names look like {mlp_post(0)!r}"))
    if layer is not None and not 0 <= layer < n_layer:
        raise UserError(f"hook {name!r}: block {layer} is out of range; this model has blocks 0..{n_layer - 1}")
    path, kind = HOOK_POINTS[pattern]
    return model.get_submodule(path.format(i=layer)), kind


def resolve(model: nn.Module, name: str) -> nn.Module:
    """The module behind a hook name (its output or input is what the hook sees)."""
    return _point(model, name)[0]


def _attach(module: nn.Module, kind: str, name: str, fn: HookFn, n_head: int):
    """Register fn on module as a forward hook ("out") or a pre-hook on its first input ("in"/"heads")."""
    if kind == "out":
        return module.register_forward_hook(lambda _m, _inputs, output: fn(output, name))

    def pre(_m: nn.Module, args: tuple):
        x = args[0]
        act = x.view(*x.shape[:-1], n_head, x.size(-1) // n_head) if kind == "heads" else x
        new = fn(act, name)
        return None if new is None else (new.reshape(x.shape), *args[1:])

    return module.register_forward_pre_hook(pre)


@contextlib.contextmanager
def hooks(model: nn.Module, fwd_hooks: Iterable[tuple[str, HookFn]]) -> Iterator[None]:
    """Attach `(name, fn)` hooks for the duration of the block; removed even on exceptions."""
    handles = []
    try:
        n_head = _uncompiled(model).config.n_head
        for name, fn in fwd_hooks:
            module, kind = _point(model, name)
            handles.append(_attach(module, kind, name, fn, n_head))
        yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def record(model: nn.Module, names: Iterable[str]) -> Iterator[dict[str, list[torch.Tensor]]]:
    """Record the named activations: yields {name: [activation at each call, detached]}.

    One entry per module call, so a cached decoding loop yields its prefill (B, T_prompt, ...) and
    then one (B, 1, ...) entry per step."""
    cache: dict[str, list[torch.Tensor]] = {n: [] for n in names}

    def keep(act: torch.Tensor, name: str) -> None:
        cache[name].append(act.detach())

    with hooks(model, [(n, keep) for n in cache]):
        yield cache
