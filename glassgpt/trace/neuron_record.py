"""Recording and ablating MLP neurons with a model, and the baseline a trace is judged against.

The neurons are every block's `blocks.{i}.mlp.hook_post` (glassgpt/hooks.py); hooks are removed when
the pass ends. `record_text` reads a text in half-overlapping windows, `ablation_hooks` set chosen
neurons to their baseline mean, zero or resampled values, and `build_baseline` takes each neuron's
statistics over text like a trace's. `load_arrays` / `save_arrays` keep the neuron artifacts beside
the run through the artifact protocol.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from glassgpt.artifacts import open_artifact, rebuild_command, save_artifact
from glassgpt.errors import UserError
from glassgpt.evaluate import token_nlls
from glassgpt.hooks import hooks, mlp_post, record
from glassgpt.model import GPT
from glassgpt.progress import Progress, ProgressFn
from glassgpt.windows import sliding_windows

DIRS = {"neurons": "neurons_baseline", "examples": "neurons_examples"}  # artifact kind -> directory in out_dir


def load_arrays(run: Any, kind: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
    """The arrays of the run's `kind` artifact ("neurons": the baseline, "examples"), plus its "params";
    an `Unusable` (a UserError naming the build command) when missing, stale or built otherwise."""
    art = open_artifact(Path(run.out_dir) / DIRS[kind], kind, rebuild=rebuild_command(kind, out_dir=run.out_dir),
                        source=run, params=params)
    with np.load(art.path / "arrays.npz") as z:
        return {**{k: z[k] for k in z.files}, "params": art.params}


def save_arrays(run: Any, kind: str, params: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
    with save_artifact(Path(run.out_dir) / DIRS[kind], kind, params=params, built_from=run.provenance(),
                       rebuild=rebuild_command(kind, out_dir=run.out_dir)) as w:
        np.savez(w.dir / "arrays.npz", **arrays)  # type: ignore[arg-type]


def mlp_width(model: GPT) -> int:
    """MLP neurons per layer (4 * n_embd in GPT-2)."""
    return model.transformer.h[0].mlp.c_fc.out_features


def check_neuron(model: GPT, layer: int, index: int) -> None:
    """UserError saying the valid range when (layer, index) is not a neuron of this model."""
    L, N = model.config.n_layer, mlp_width(model)
    if not 0 <= layer < L:
        raise UserError(f"--layer={layer} is out of range: this model has layers 0..{L - 1}")
    if not 0 <= index < N:
        raise UserError(f"--index={index} is out of range: each layer has MLP neurons 0..{N - 1} (4 * n_embd)")


@torch.no_grad()
def record_activations(model: GPT, idx: torch.Tensor, layers: list[int] | None = None) -> torch.Tensor:
    """(B, T, len(layers), n_neurons) MLP activations of one forward pass (all layers by default);
    the pass stops after the last layer asked for."""
    layers = list(range(model.config.n_layer)) if layers is None else layers
    names = [mlp_post(i) for i in layers]
    with record(model, names) as cache:
        model(idx, stop_at_layer=max(layers) + 1)
    return torch.stack([cache[n][0] for n in names], dim=2)


def record_text(model: GPT, ids: list[int], pos0: int, grad: bool = False):
    """Every position's MLP activations over `ids`, (T, n_layer, n_neurons) float32, read in
    half-overlapping windows (glassgpt.windows: each position once, >= block_size/2 context).

    With grad also (sum a*g, sum g), each (n_layer, n_neurons), where g = d/da of the log-prob of the
    traced tokens ids[pos0+1:], summed over every position of every window: sum (a - ref) * g is then
    the first-order change of that log-prob when the neuron is set to ref everywhere."""
    T, block = len(ids), model.config.block_size
    names = [mlp_post(i) for i in range(model.config.n_layer)]
    acts = np.zeros((T, len(names), mlp_width(model)), dtype=np.float32)
    ag, gs = np.zeros(acts.shape[1:]), np.zeros(acts.shape[1:])
    seq = torch.tensor(list(ids) + [0], device=model.lm_head.weight.device)  # a dummy target at the end
    for b, e, s in sliding_windows(T, block, max(1, block // 2)):
        seen: list[torch.Tensor] = []

        def keep(a: torch.Tensor, _name: str, seen: list[torch.Tensor] = seen) -> None:  # this window's list
            seen.append(a)

        with torch.set_grad_enabled(grad), hooks(model, [(n, keep) for n in names]):
            h = model.hidden_states(seq[None, b:e])
            lo, hi = max(s, pos0), min(e, T - 1)  # this window's traced positions
            if grad and hi > lo:
                logp = F.log_softmax(model.head(h[0, lo - b:hi - b]).float(), -1)
                target = logp.gather(1, seq[lo + 1:hi + 1, None]).sum()
                for ly, g in enumerate(torch.autograd.grad(target, seen)):
                    ag[ly] += (seen[ly][0].detach() * g[0]).sum(0).double().cpu().numpy()
                    gs[ly] += g[0].sum(0).double().cpu().numpy()
        acts[s:e] = torch.stack([a[0, s - b:] for a in seen], 1).detach().float().cpu().numpy()
    return (acts, ag, gs) if grad else acts


def traced_logprob(model: GPT, ids: list[int], pos0: int) -> float:
    """Teacher-forced sum of log p(ids[j+1] | ids[:j+1]) over traced positions j >= pos0, scored in
    half-overlapping windows past block_size (each token once, >= block_size/2 context)."""
    block = model.config.block_size
    return float(-token_nlls(model, torch.tensor(list(ids)), block, max(1, block // 2))[pos0:].sum())


@dataclass
class Baseline:
    """Per-neuron statistics of MLP activations on text like a trace's (see build_baseline)."""

    mean: np.ndarray  # (n_layer, n_neurons) float64
    std: np.ndarray  # population std
    prob: np.ndarray  # fraction of tokens with activation > 0
    sample: np.ndarray  # (S, n_layer, n_neurons) activations of S random baseline tokens (resampling)
    n_tokens: int
    params: dict = field(default_factory=dict)


def ablation_hooks(neurons: list[tuple[int, int]], mode: str = "mean", baseline: Baseline | None = None,
                   seed: int = 0) -> list[tuple[str, Any]]:
    """Forward hooks that set (layer, index) neurons to their baseline mean, 0, or (resample) at each
    position the values of a random baseline token (one draw per position and layer)."""
    by_layer: dict[int, list[int]] = {}
    for layer, i in neurons:
        by_layer.setdefault(layer, []).append(i)
    gen = torch.Generator().manual_seed(seed)
    out = []
    for layer, idx in sorted(by_layer.items()):
        fill = torch.zeros(len(idx)) if mode == "zero" else torch.from_numpy(
            baseline.mean[layer, idx] if mode == "mean" else baseline.sample[:, layer, idx].astype(np.float32)).float()

        def ablate(act: torch.Tensor, name: str, idx=idx, fill=fill) -> torch.Tensor:
            act = act.clone()
            if mode == "resample":
                rows = torch.randint(fill.size(0), act.shape[:-1], generator=gen)
                act[..., idx] = fill[rows].to(act.device, act.dtype)
            else:
                act[..., idx] = fill.to(act.device, act.dtype)
            return act

        out.append((mlp_post(layer), ablate))
    return out


def ablated_logprob(model: GPT, ids: list[int], pos0: int, neurons: list[tuple[int, int]], mode: str = "mean",
                    baseline: Baseline | None = None, seed: int = 0) -> float:
    with hooks(model, ablation_hooks(neurons, mode, baseline, seed)):
        return traced_logprob(model, ids, pos0)


@torch.no_grad()
def build_baseline(model: GPT, tokens: np.ndarray, source: str = "generated", n_seqs: int = 128,
                   prompt_len: int = 8, new_tokens: int = 64, temperature: float | None = 0.8, seed: int = 0,
                   batch_size: int = 16, n_sample: int = 256, progress: bool = True,
                   on_progress: ProgressFn | None = None, **_: Any) -> Baseline:
    """Statistics of every neuron over n_seqs sequences that start with `prompt_len` tokens of random
    training text and go on for `new_tokens` tokens: the model's own samples at `temperature`
    (source='generated', what a trace looks like) or the training text itself ('train'). Only the
    positions that compute the continuation count, as in a trace; sums are float64."""
    from glassgpt.generate import generate

    new_tokens = min(new_tokens, model.config.block_size + 1 - prompt_len)
    span = prompt_len + new_tokens
    if new_tokens < 1 or len(tokens) <= span:
        raise UserError(f"the training split ({len(tokens)} tokens) or block_size is too small for a baseline "
                        f"of {prompt_len}-token prompts; lower --baseline_prompt")
    rng = np.random.default_rng(seed)
    starts = np.sort(rng.integers(0, len(tokens) - span + 1, size=n_seqs))
    keep = np.sort(rng.choice(n_seqs * new_tokens, size=min(n_sample, n_seqs * new_tokens), replace=False))
    L, N = model.config.n_layer, mlp_width(model)
    s1, s2, n_on, sample = np.zeros((L, N)), np.zeros((L, N)), np.zeros((L, N)), []
    bar = Progress(n_seqs, "neuron baseline", unit="seq", callback=on_progress, disable=not progress)
    for b in range(0, n_seqs, batch_size):
        seqs = [tokens[s:s + span].astype(np.int64).tolist() for s in starts[b:b + batch_size]]
        if source == "generated":  # rows seeded seed+b+i: a batch size does not change the samples
            outs = generate(model, [s[:prompt_len] for s in seqs], new_tokens, temperature=temperature or 0.0,
                            seed=1_000_000 + seed + b)
            seqs = [s[:prompt_len] + o for s, o in zip(seqs, outs, strict=False)]
        x = torch.tensor(seqs, device=model.lm_head.weight.device)[:, :-1]
        acts = record_activations(model, x)[:, prompt_len - 1:].double().cpu().reshape(-1, L, N)
        s1, s2, n_on = s1 + acts.sum(0).numpy(), s2 + (acts**2).sum(0).numpy(), n_on + (acts > 0).sum(0).numpy()
        lo = b * new_tokens
        sample.append(acts[torch.from_numpy(keep[(keep >= lo) & (keep < lo + len(acts))] - lo)].half().numpy())
        bar.update(len(seqs))
    bar.close()
    n = n_seqs * new_tokens
    var = np.maximum(s2 / n - (s1 / n) ** 2, 0.0)  # float64 sums keep the cancellation error ~1e-12
    return Baseline(s1 / n, np.sqrt(var), n_on / n, np.concatenate(sample), n)
