"""Neuron traces: which MLP neurons matter for a text, judged against a baseline and fair controls.

    glassgpt trace-neurons --out_dir=out --start="ROMEO:" [--rank=raw|z|prob|attribution] [--ablate] [--json]
    glassgpt trace-neurons --out_dir=out --prompts=FILE --rank=z --ablate   # + overlap and specificity
    glassgpt trace-neurons --out_dir=out --build_baseline
    glassgpt neuron --out_dir=out --layer=2 --index=117 [--json]

The viewer calls `explain(run, text, **opts)` (what `trace-neurons --json` prints for one prompt),
`neuron_card(run, layer, index, **opts)` (what `neuron --json` prints) and `open_baseline(run)`.
The neurons are every block's `blocks.{i}.mlp.hook_post`; docs/neurons.md defines each statistic
and shows the measurements that chose the defaults.
"""

from __future__ import annotations

import bisect
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from glassgpt.artifacts import read_json, write_artifact
from glassgpt.config import load_config, read_text_arg, wants_help
from glassgpt.errors import UserError
from glassgpt.evaluate import token_nlls
from glassgpt.hooks import hooks, mlp_post, record
from glassgpt.model import GPT
from glassgpt.sampling import SamplingSettings, generate_from, prompt_ids, sampling_settings
from glassgpt.windows import sliding_windows

FORMAT = "glassgpt-neurons/2"
BASELINE_DIR, EXAMPLES_DIR = "neurons_baseline", "neurons_examples"
QUANTILES = (0.5, 0.9, 0.99, 0.999)
HIGHLIGHT = ("\u27e6", "\u27e7")  # ⟦max token⟧


@dataclass
class TraceNeuronsConfig(SamplingSettings):
    """`glassgpt trace-neurons`: the MLP neurons behind a generation (sampled with glassgpt.sampling's
    settings, as sample.py samples)."""

    out_dir: str = "out"
    ckpt_iter: str | None = None
    """Open out_dir/ckpt-<iter>.pt kept by train.py --keep_every (or 'best': ckpt-best.pt) instead of ckpt.pt."""
    start: str = "\n"
    """Prompt text, or FILE:path to read it from a file."""
    output: str | None = None
    """Trace this continuation of the prompt (text or FILE:path) instead of generating one."""
    prompts: str | None = None
    """A file with one prompt per line: trace each, report top-K overlap (and specificity with --ablate)."""
    max_new_tokens: int = 64
    """Tokens to generate (and trace)."""
    n_neurons: int = 10
    """How many neurons to report (overall, and per layer) and to ablate."""
    rank: Literal["attribution", "z", "prob", "raw"] = "attribution"
    """'attribution' ((activation - baseline mean) x gradient of the output's log-prob), 'z' or 'prob'
    (contrast with the baseline), 'raw' (mean activation). docs/neurons.md compares them."""
    contrastive: bool = False
    """Shorthand for --rank=z (the contrastive trace)."""
    floor: float = 0.1
    """z-score spread floor, as a fraction of each neuron's baseline RMS activation."""
    layer_norm: bool = True
    """Standardise the scores within each layer, so no layer wins by its scale alone (False: attribution in nats)."""
    ablate: bool = False
    """Causal check: ablate the top-K, K activation-matched neurons and the raw top-K; log-prob drops."""
    ablation: Literal["mean", "zero", "resample"] = "mean"
    """'mean' (the baseline mean), 'zero', or 'resample' (values of random baseline tokens)."""
    n_controls: int = 5
    """Draws of the activation-matched control."""
    json: bool = False
    build_baseline: bool = False
    """Build (or rebuild) the baseline and exit."""
    baseline_source: Literal["generated", "train"] = "generated"
    """'generated': the model's own samples at --temperature; 'train': teacher-forced training text."""
    baseline_windows: int = 128
    """Baseline sequences: a training-text prompt of --baseline_prompt tokens and up to 64 after it."""
    baseline_prompt: int = 8
    batch_size: int = 16
    device: str = "auto"
    data_dir: str | None = None
    """The training data; default: the one named in the checkpoint's config."""
    vocab_dir: str | None = None


@dataclass
class NeuronConfig:
    out_dir: str = "out"
    ckpt_iter: str | None = None
    """Open out_dir/ckpt-<iter>.pt kept by train.py --keep_every (or 'best': ckpt-best.pt) instead of ckpt.pt."""
    layer: int = -1
    """Block index of the neuron (required)."""
    index: int = -1
    """Neuron index within the block's MLP, 0..4*n_embd-1 (required)."""
    top: int = 10
    """Top-activating training windows to show."""
    context: int = 40
    """Tokens of context shown before the example token (and a quarter of that after)."""
    per_quantile: int = 2
    """Examples shown at each activation quantile (0.5, 0.9, 0.99, 0.999)."""
    sample_windows: int = 64
    """Random training windows read for the histogram and the quantile examples."""
    bins: int = 20
    n_tokens: int = 10
    """Tokens shown as promoted / suppressed through the unembedding."""
    window: int = 0
    """Scan window length; 0 = min(block_size, 128). Windows overlap by half."""
    keep: int = 32
    """Top examples kept per neuron in the cache (>= top)."""
    max_windows: int | None = None
    """Scan only the first N windows of the training split (None = all of it)."""
    batch_size: int = 32
    json: bool = False
    device: str = "auto"
    data_dir: str | None = None
    vocab_dir: str | None = None


# ----------------------------------------------------------------------------------------------
# Pure functions over arrays


def top_neurons(scores: np.ndarray, k: int) -> list[tuple[int, int, float]]:
    """The k highest (layer, index, score) of an (n_layer, n_neurons) array, best first; ties go to
    the lower flat index, so the ranking is deterministic."""
    flat = np.asarray(scores, dtype=np.float64).ravel()
    order = np.argsort(-flat, kind="stable")[: max(k, 0)]
    n = scores.shape[1]
    return [(int(i // n), int(i % n), float(flat[i])) for i in order]


def top_per_layer(scores: np.ndarray, k: int) -> list[list[tuple[int, float]]]:
    """For each layer, its k highest (index, score), best first."""
    return [[(int(i), float(row[i])) for i in np.argsort(-row, kind="stable")[:k]]
            for row in np.asarray(scores, dtype=np.float64)]


@dataclass
class Baseline:
    """Per-neuron statistics of MLP activations on text like a trace's (see build_baseline)."""

    mean: np.ndarray  # (n_layer, n_neurons) float64
    std: np.ndarray  # population std
    prob: np.ndarray  # fraction of tokens with activation > 0
    sample: np.ndarray  # (S, n_layer, n_neurons) activations of S random baseline tokens (resampling)
    n_tokens: int
    params: dict = field(default_factory=dict)


def contrast(acts: np.ndarray, baseline: Baseline, score: str = "z", floor: float = 0.1,
             layer_norm: bool = True) -> np.ndarray:
    """(n_layer, n_neurons) contrastive scores of a trace's activations (T, n_layer, n_neurons).

    z: (mean over tokens of a - mu) / max(sd, floor * rms), rms = sqrt(mu^2 + sd^2) the neuron's own
    scale, so a near-constant neuron cannot win by a tiny sd whatever its units (a neuron silent in
    the baseline, rms 0, scores 0). prob: the trace's on-rate P(a > 0) minus the baseline's.
    layer_norm then standardises each layer's scores across its neurons."""
    acts = np.asarray(acts, dtype=np.float64)
    if score == "z":
        spread = np.maximum(baseline.std, floor * np.sqrt(baseline.mean**2 + baseline.std**2))
        s = np.where(spread > 0, (acts.mean(axis=0) - baseline.mean) / np.where(spread > 0, spread, 1.0), 0.0)
    elif score == "prob":
        s = (acts > 0).mean(axis=0) - baseline.prob
    else:
        raise ValueError(f"contrast scores are 'z' or 'prob', got {score!r}")
    return per_layer(s) if layer_norm else s


def per_layer(scores: np.ndarray) -> np.ndarray:
    """Each layer's scores minus the layer's mean, over its std across neurons."""
    sd = scores.std(axis=1, keepdims=True)
    return (scores - scores.mean(axis=1, keepdims=True)) / np.where(sd > 0, sd, 1.0)


def jaccard(a: set, b: set) -> float:
    """|a & b| / |a | b| (1.0 for two empty sets)."""
    return len(a & b) / len(a | b) if a | b else 1.0


def mean_pairwise_jaccard(sets: list[set]) -> float:
    """Mean Jaccard overlap over all pairs: how much traces of different prompts share."""
    pairs = [jaccard(sets[i], sets[j]) for i in range(len(sets)) for j in range(i + 1, len(sets))]
    return float(np.mean(pairs)) if pairs else float("nan")


def matched_controls(raw: np.ndarray, top: list[tuple[int, int]], n_draws: int, seed: int = 0,
                     pool: int = 5) -> list[list[tuple[int, int]]]:
    """n_draws control sets for `top`: for each top neuron, a random one of the `pool` neurons of the
    same layer whose mean activation on the traced text (raw) is closest to its own, never a top
    neuron nor one already picked in the draw. A control that can win: equally busy neurons."""
    rng, top_set, draws = np.random.default_rng(seed), set(top), []
    order = {(l, i): np.argsort(np.abs(raw[l] - raw[l, i]), kind="stable") for l, i in top}
    for _ in range(n_draws):
        used, pick = set(top_set), []
        for l, i in top:
            cands = [int(j) for j in order[l, i] if (l, int(j)) not in used][:pool]
            j = cands[int(rng.integers(len(cands)))]
            used.add((l, j))
            pick.append((l, j))
        draws.append(pick)
    return draws


def quantile_examples(values: np.ndarray, quantiles=QUANTILES, per: int = 2) -> list[tuple[float, float, list[int]]]:
    """(q, the q-quantile of values, indices of the `per` values ranked nearest it) for each q;
    ranks are those of a stable sort, the quantile is np.quantile's (linear)."""
    order = np.argsort(values, kind="stable")
    out = []
    for q in quantiles:
        r = int(round(q * (len(values) - 1)))
        lo = min(max(r - per // 2, 0), max(len(values) - per, 0))
        out.append((float(q), float(np.quantile(values, q)), [int(i) for i in order[lo:lo + per]]))
    return out


# ----------------------------------------------------------------------------------------------
# Recording and ablating with a model


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
        with torch.set_grad_enabled(grad), hooks(model, [(n, lambda a, _n: seen.append(a)) for n in names]):
            h = model.hidden_states(seq[None, b:e])
            lo, hi = max(s, pos0), min(e, T - 1)  # this window's traced positions
            if grad and hi > lo:
                logp = F.log_softmax(model.head(h[0, lo - b:hi - b]).float(), -1)
                target = logp.gather(1, seq[lo + 1:hi + 1, None]).sum()
                for l, g in enumerate(torch.autograd.grad(target, seen)):
                    ag[l] += (seen[l][0].detach() * g[0]).sum(0).double().cpu().numpy()
                    gs[l] += g[0].sum(0).double().cpu().numpy()
        acts[s:e] = torch.stack([a[0, s - b:] for a in seen], 1).detach().float().cpu().numpy()
    return (acts, ag, gs) if grad else acts


def traced_logprob(model: GPT, ids: list[int], pos0: int) -> float:
    """Teacher-forced sum of log p(ids[j+1] | ids[:j+1]) over traced positions j >= pos0, scored in
    half-overlapping windows past block_size (each token once, >= block_size/2 context)."""
    block = model.config.block_size
    return float(-token_nlls(model, torch.tensor(list(ids)), block, max(1, block // 2))[pos0:].sum())


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


def causal_check(model: GPT, ids: list[int], pos0: int, top: list[tuple[int, int]], raw: np.ndarray,
                 mode: str = "mean", baseline: Baseline | None = None, n_controls: int = 5,
                 seed: int = 0) -> dict[str, Any]:
    """Log-prob drop (nats over the traced tokens) from ablating `top`, against the raw top-K (the
    most active neurons) and K activation-matched neurons of the same layers (n_controls draws)."""
    clean = traced_logprob(model, ids, pos0)
    drop = lambda ns: clean - ablated_logprob(model, ids, pos0, ns, mode, baseline, seed)  # noqa: E731
    raw_top = [(l, i) for l, i, _ in top_neurons(raw, len(top))]
    matched = [drop(c) for c in matched_controls(raw, top, n_controls, seed)]
    d_top, m = drop(top), float(np.mean(matched)) if matched else float("nan")
    return {"mode": mode, "k": len(top), "n_tokens": len(ids) - 1 - pos0, "clean_logprob": clean,
            "drop_top": d_top, "drop_raw_top": drop(raw_top), "drop_matched": matched, "drop_matched_mean": m,
            "drop_matched_std": float(np.std(matched)) if matched else float("nan"),
            "top_over_matched": d_top / m if m > 0 else None}


def specificity(model: GPT, items: list[tuple[list[int], int]], tops: list[list[tuple[int, int]]],
                mode: str = "mean", baseline: Baseline | None = None, seed: int = 0) -> dict[str, Any]:
    """drop[a][b]: nats per traced token of text b lost when text a's top neurons are ablated. The
    ratio drop[a][a] / drop[a][b] says how specific a's neurons are to a; a pair passes at >= 2 (or
    when b does not suffer at all while a does)."""
    clean = [traced_logprob(model, ids, p) for ids, p in items]
    n = len(items)
    drop = np.array([[(clean[b] - ablated_logprob(model, *items[b], tops[a], mode, baseline, seed))
                      / (len(items[b][0]) - 1 - items[b][1]) for b in range(n)] for a in range(n)])
    ratio = [[float(drop[a, a] / drop[a, b]) if a != b and drop[a, b] > 0 else None for b in range(n)]
             for a in range(n)]
    passed = [drop[a, a] >= 2 * drop[a, b] and drop[a, a] > 0 for a in range(n) for b in range(n) if a != b]
    return {"drop_per_token": drop.tolist(), "ratio": ratio, "n_pass": int(sum(passed)), "n_pairs": len(passed)}


# ----------------------------------------------------------------------------------------------
# Artifacts beside the run: a directory with arrays.npz + meta.json, appearing by one rename


def _load_artifact(run, name: str, params: dict | None) -> tuple[dict | None, str]:
    """(arrays + "params", "") when run.out_dir/name fits the run (and `params`, if given), else (None, why)."""
    d = Path(run.out_dir) / name
    meta = read_json(d / "meta.json", default=None, strict=False)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        return None, f"no {name} in {run.out_dir}"
    if params is not None and meta.get("params") != params:
        return None, f"{d} was built with other settings ({meta.get('params')})"
    stale = run.stale_reasons(meta.get("built_from"))
    if stale:
        return None, f"{d} is stale: {stale[0]}"
    with np.load(d / "arrays.npz") as z:
        return {**{k: z[k] for k in z.files}, "params": meta["params"]}, ""


def _save_artifact(run, name: str, params: dict, arrays: dict[str, np.ndarray]) -> None:
    with write_artifact(Path(run.out_dir) / name) as tmp:
        np.savez(tmp / "arrays.npz", **arrays)
        (tmp / "meta.json").write_text(json.dumps({"format": FORMAT, "params": params,
                                                   "built_from": run.provenance()}, indent=1))


def open_baseline(run, params: dict | None = None) -> Baseline:
    """The run's baseline (built with `params`, if given); UserError with the build command if it is
    missing, stale or built otherwise."""
    a, why = _load_artifact(run, BASELINE_DIR, params)
    if a is None:
        raise UserError(f"{why}; build it with `glassgpt trace-neurons --out_dir={run.out_dir} --build_baseline`")
    return Baseline(a["mean"], a["std"], a["prob"], a["sample"], int(a["n_tokens"]), a["params"])


@torch.no_grad()
def build_baseline(model: GPT, tokens: np.ndarray, source: str = "generated", n_seqs: int = 128,
                   prompt_len: int = 8, new_tokens: int = 64, temperature: float | None = 0.8, seed: int = 0,
                   batch_size: int = 16, n_sample: int = 256, progress: bool = True, **_: Any) -> Baseline:
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
    for b in tqdm(range(0, n_seqs, batch_size), desc="neuron baseline", unit="batch", disable=not progress):
        seqs = [tokens[s:s + span].astype(np.int64).tolist() for s in starts[b:b + batch_size]]
        if source == "generated":  # rows seeded seed+b+i: a batch size does not change the samples
            outs = generate(model, [s[:prompt_len] for s in seqs], new_tokens, temperature=temperature,
                            seed=1_000_000 + seed + b)
            seqs = [s[:prompt_len] + o for s, o in zip(seqs, outs, strict=False)]
        x = torch.tensor(seqs, device=model.lm_head.weight.device)[:, :-1]
        acts = record_activations(model, x)[:, prompt_len - 1:].double().cpu().reshape(-1, L, N)
        s1, s2, n_on = s1 + acts.sum(0).numpy(), s2 + (acts**2).sum(0).numpy(), n_on + (acts > 0).sum(0).numpy()
        lo = b * new_tokens
        sample.append(acts[torch.from_numpy(keep[(keep >= lo) & (keep < lo + len(acts))] - lo)].half().numpy())
    n = n_seqs * new_tokens
    var = np.maximum(s2 / n - (s1 / n) ** 2, 0.0)  # float64 sums keep the cancellation error ~1e-12
    return Baseline(s1 / n, np.sqrt(var), n_on / n, np.concatenate(sample), n)


def get_baseline(run, cfg: TraceNeuronsConfig, log=print, rebuild: bool = False) -> Baseline:
    """The run's baseline for cfg's settings, built (with a progress bar) if missing, stale or otherwise built."""
    params = {"source": cfg.baseline_source, "n_seqs": cfg.baseline_windows, "prompt_len": cfg.baseline_prompt,
              "new_tokens": min(64, run.model.config.block_size + 1 - cfg.baseline_prompt), "seed": 0,
              "temperature": cfg.temperature if cfg.baseline_source == "generated" else None, "split": "train"}
    a, why = (None, "--build_baseline") if rebuild else _load_artifact(run, BASELINE_DIR, params)
    if a is not None:
        return Baseline(a["mean"], a["std"], a["prob"], a["sample"], int(a["n_tokens"]), a["params"])
    log(f"{why}: building the neuron baseline ({params['n_seqs']} {params['source']} sequences; kept in "
        f"{Path(run.out_dir) / BASELINE_DIR})")
    base = build_baseline(run.model, run.corpus.tokens("train"), batch_size=cfg.batch_size, **params)
    _save_artifact(run, BASELINE_DIR, params, {"mean": base.mean, "std": base.std, "prob": base.prob,
                                               "sample": base.sample, "n_tokens": np.array(base.n_tokens)})
    base.params = params
    return base


@torch.no_grad()
def build_neuron_examples(model: GPT, tokens: np.ndarray, window: int, keep: int = 32, batch_size: int = 32,
                          max_windows: int | None = None, progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """For every neuron, the `keep` windows where it fires most: (values, positions), each
    (keep, n_layer, n_neurons), best first; positions index the split. At most one example per scan
    window per neuron, so one long burst does not fill the list."""
    windows = [(b, f) for b, _, f in sliding_windows(len(tokens), window, skip=1)][:max_windows]
    if not windows:
        raise UserError(f"the training split has {len(tokens)} tokens: too few to scan")
    window = min(window, len(tokens))
    L, N = model.config.n_layer, mlp_width(model)
    values, positions = torch.full((0, L * N), -float("inf")), torch.zeros((0, L * N), dtype=torch.long)
    for b in tqdm(range(0, len(windows), batch_size), desc="neuron examples", unit="batch", disable=not progress):
        chunk = windows[b:b + batch_size]
        x = torch.from_numpy(np.stack([tokens[s:s + window] for s, _ in chunk]).astype(np.int64))
        acts = record_activations(model, x.to(model.lm_head.weight.device)).float().cpu().reshape(len(chunk), window, -1)
        score_from = torch.tensor([f - s for s, f in chunk])  # first scored position in each window
        masked = acts.masked_fill((torch.arange(window)[None, :] < score_from[:, None])[:, :, None], -float("inf"))
        best, where = masked.max(dim=1)  # (B, L*N)
        v = torch.cat([values, best])  # merge with the running top, keep the best `keep` per neuron
        p = torch.cat([positions, torch.tensor([s for s, _ in chunk])[:, None] + where])
        values, idx = v.topk(min(keep, v.size(0)), dim=0)
        positions = p.gather(0, idx)
    return values.reshape(-1, L, N).numpy(), positions.reshape(-1, L, N).numpy()


def _window(window: int, model: GPT) -> int:
    return min(window or 128, model.config.block_size)


def open_examples(run, window: int = 0, keep: int = 32, max_windows: int | None = None, build: bool = False,
                  batch_size: int = 32, log=print) -> tuple[np.ndarray, np.ndarray]:
    """Every neuron's top training examples (values, positions); built if `build`, else UserError
    with the build command when missing or stale."""
    params = {"window": _window(window, run.model), "keep": keep, "max_windows": max_windows, "split": "train"}
    a, why = _load_artifact(run, EXAMPLES_DIR, params)
    if a is not None:
        return a["values"], a["positions"]
    if not build:
        raise UserError(f"{why}; build it with `glassgpt neuron --out_dir={run.out_dir} --layer=0 --index=0`")
    log(f"{why}: scanning the training split for every neuron's top windows (kept in "
        f"{Path(run.out_dir) / EXAMPLES_DIR}; later neurons are instant)")
    values, positions = build_neuron_examples(run.model, run.corpus.tokens("train"), params["window"], keep,
                                              batch_size, max_windows)
    _save_artifact(run, EXAMPLES_DIR, params, {"values": values, "positions": positions})
    return values, positions


# ----------------------------------------------------------------------------------------------
# What the commands and the viewer return


def explain(run, text: str, *, output: str | None = None, sampling: SamplingSettings | None = None,
            n_neurons: int = 10, rank: str = "attribution", floor: float = 0.1, layer_norm: bool = True,
            ablate: bool = False, ablation: str = "mean", n_controls: int = 5,
            baseline: Baseline | None = None) -> dict[str, Any]:
    """Trace the neurons of `text` + a continuation: `output` if given, else one generated with
    `sampling` (default: the command's, 64 tokens), exactly as sample.py generates. Ranked by `rank`;
    with `ablate` the causal check (its controls drawn with sampling.seed). Every rank but raw, and
    mean / resample ablation, use `baseline` (default: open_baseline(run)). JSON-able; what
    trace-neurons --json prints."""
    model, tok = run.model, run.tokenizer
    sampling = sampling if sampling is not None else SamplingSettings(max_new_tokens=64)
    seed = sampling.seed
    if output is None:
        g = generate_from(model, tok, text, sampling)
        ids, out_ids = g.prompt_ids, g.outputs[0]
    else:
        ids, out_ids = prompt_ids(tok, text, model.config.block_size), tok.encode(output)
    seq, pos0 = ids + out_ids, max(len(ids) - 1, 1)  # position 0 (nothing to attend to) is never traced
    if len(seq) - 1 <= pos0:
        raise UserError("no token to trace (a one-token prompt's first token is computed at position 0, "
                        "which is left out); raise --max_new_tokens or lengthen the prompt")
    if baseline is None and (rank != "raw" or ablate and ablation != "zero"):
        baseline = open_baseline(run)
    rec = record_text(model, seq, pos0, grad=rank == "attribution")
    acts = rec[0] if rank == "attribution" else rec
    traced = acts[pos0:-1]  # the positions that computed each traced token
    raw = traced.mean(axis=0, dtype=np.float64)
    if rank == "attribution":  # (a - mu) * g: the first-order log-prob loss of mean-ablating the neuron
        scores = per_layer(rec[1] - baseline.mean * rec[2]) if layer_norm else rec[1] - baseline.mean * rec[2]
    else:
        scores = raw if rank == "raw" else contrast(traced, baseline, rank, floor, layer_norm)
    top = top_neurons(scores, n_neurons)
    r: dict[str, Any] = {
        "prompt": text, "output": tok.decode(out_ids), "generated": output is None, "token_ids": seq,
        "tokens": [tok.decode([t]) for t in seq], "first_traced_position": pos0, "n_traced_tokens": len(traced),
        "ranking": rank, "baseline": baseline.params if baseline is not None else None,
        "top": [{"layer": l, "index": i, "score": s, "mean_activation": float(raw[l, i]),
                 "token_activations": [round(float(a), 4) for a in acts[:, l, i]]} for l, i, s in top],
        "layer_counts": np.bincount([l for l, _, _ in top], minlength=model.config.n_layer).tolist(),
        "per_layer": [[{"index": i, "score": s} for i, s in row] for row in top_per_layer(scores, n_neurons)],
        "top_raw": [[l, i] for l, i, _ in top_neurons(raw, n_neurons)],
    }
    if ablate:
        r["ablation"] = causal_check(model, seq, pos0, [(l, i) for l, i, _ in top], raw, ablation, baseline,
                                     n_controls, seed)
    return r


def format_trace(r: dict[str, Any], per_layer: int = 5) -> str:
    lines = [f"prompt {r['prompt']!r} -> {'output' if r['generated'] else 'given'} {r['output']!r}",
             f"top {len(r['top'])} neurons by {r['ranking']} over {r['n_traced_tokens']} tokens "
             f"(baseline: {(r['baseline'] or {}).get('source', 'none')}); by layer {r['layer_counts']}",
             "  rank  layer  neuron      score   mean act"]
    lines += [f"  {k:>4}  {t['layer']:>5}  {t['index']:>6}  {t['score']:>9.3f}  {t['mean_activation']:>9.3f}"
              for k, t in enumerate(r["top"], 1)]
    lines.append(f"per layer (top {per_layer}):")
    lines += [f"  layer {layer}: " + ", ".join(f"{x['index']} ({x['score']:.2f})" for x in row[:per_layer])
              for layer, row in enumerate(r["per_layer"])]
    if "ablation" in r:
        a = r["ablation"]
        ratio = f"{a['top_over_matched']:.1f}x" if a["top_over_matched"] is not None else "n/a"
        lines.append(f"ablation ({a['mode']}) of K={a['k']}: log p = {a['clean_logprob']:.2f} nats over "
                     f"{a['n_tokens']} tokens; drop: top-K {a['drop_top']:.2f}, raw top-K {a['drop_raw_top']:.2f}, "
                     f"activation-matched {a['drop_matched_mean']:.2f} +- {a['drop_matched_std']:.2f} "
                     f"({len(a['drop_matched'])} draws); top-K / matched {ratio}")
    return "\n".join(lines)


def _prompts(cfg: TraceNeuronsConfig) -> list[str]:
    if not cfg.prompts:
        return [read_text_arg(cfg.start, "start")]
    p = Path(cfg.prompts)
    if not p.is_file():
        raise UserError(f"--prompts={cfg.prompts} does not exist; give a file with one prompt per line")
    return [line for line in p.read_text().splitlines() if line.strip()]


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    if wants_help(TraceNeuronsConfig, argv, "glassgpt trace-neurons"):
        return None
    cfg = load_config(TraceNeuronsConfig, argv)
    rank = "z" if cfg.contrastive else cfg.rank
    from glassgpt.run import open_run

    run = open_run(cfg.out_dir, ckpt_iter=cfg.ckpt_iter, device=cfg.device,
                   data_dir=cfg.data_dir, vocab_dir=cfg.vocab_dir)
    log = (lambda m: print(m, file=sys.stderr)) if cfg.json else print
    prompts, output = _prompts(cfg), read_text_arg(cfg.output, "output") if cfg.output is not None else None
    for text in [*prompts, output or ""]:  # text the model cannot read fails before a baseline is built
        run.tokenizer.encode(text)
    baseline = None
    if cfg.build_baseline or rank != "raw" or cfg.ablate and cfg.ablation != "zero":
        baseline = get_baseline(run, cfg, log, rebuild=cfg.build_baseline)
        if cfg.build_baseline:
            return {"baseline": baseline.params, "n_tokens": baseline.n_tokens}
    opts: dict[str, Any] = dict(output=output, sampling=sampling_settings(cfg), n_neurons=cfg.n_neurons, rank=rank,
                                floor=cfg.floor, layer_norm=cfg.layer_norm, ablate=cfg.ablate, ablation=cfg.ablation,
                                n_controls=cfg.n_controls, baseline=baseline)
    results = [explain(run, p, **opts) for p in prompts]
    out: dict[str, Any] = results[0] if len(results) == 1 else {"traces": results, "overlap": {
        "raw": mean_pairwise_jaccard([{tuple(x) for x in r["top_raw"]} for r in results]),
        "ranked": mean_pairwise_jaccard([{(t["layer"], t["index"]) for t in r["top"]} for r in results])}}
    if len(results) > 1 and cfg.ablate:
        out["specificity"] = specificity(run.model, [(r["token_ids"], r["first_traced_position"]) for r in results],
                                         [[(t["layer"], t["index"]) for t in r["top"]] for r in results],
                                         cfg.ablation, baseline, cfg.seed)
    if cfg.json:
        print(json.dumps(out, indent=1, ensure_ascii=False))
        return out
    print("\n\n".join(format_trace(r) for r in results))
    if len(results) > 1:
        o = out["overlap"]
        print(f"\nmean pairwise Jaccard overlap of the top-{cfg.n_neurons} sets over {len(results)} prompts: "
              f"raw {o['raw']:.2f}, {rank} {o['ranked']:.2f}")
    if "specificity" in out:
        s = out["specificity"]
        print(f"specificity (drop on own text / drop on the other's, per token): {s['n_pass']} of {s['n_pairs']} "
              "pairs >= 2; " + ", ".join(f"{a}/{b} {x:.1f}" for a, row in enumerate(s["ratio"])
                                         for b, x in enumerate(row) if x is not None))
    return out


def logit_effect(model: GPT, layer: int, index: int) -> torch.Tensor:
    """(vocab,) direct effect of the neuron on the logits: W_U (ln_f.weight * W_out[:, index]), its
    c_proj column through the final LayerNorm's gain and the unembedding (ln_f's centring and scale
    are left out: the logit lens approximation)."""
    w_out = model.transformer.h[layer].mlp.c_proj.weight[:, index]
    return (model.lm_head.weight @ (model.transformer.ln_f.weight * w_out)).detach().float().cpu()


def _example(run, start: int, acts: np.ndarray, pos: int, context: int) -> dict[str, Any]:
    """The text around token `pos` of a window starting at `start` with this neuron's activations
    `acts`, kept inside the window and the document segment, each token with its activation."""
    corpus = run.corpus
    seg = corpus.segment_of("train", pos)
    lo = max(int(seg[1]), pos - context, start)
    hi = min(int(seg[2]), pos + 1 + max(context // 4, 1), start + len(acts))
    ids = corpus.tokens("train")[lo:hi].tolist()
    return {"activation": float(acts[pos - start]), "token_position": int(pos),
            "line": corpus.locate("train", pos, pos + 1).line, "before": corpus.decode("train", lo, pos),
            "token": corpus.decode("train", pos, pos + 1), "after": corpus.decode("train", pos + 1, hi),
            "location": corpus.locate("train", lo, hi).to_dict(),
            "tokens": [[run.tokenizer.decode([t]), round(float(a), 4)]
                       for t, a in zip(ids, acts[lo - start:hi - start], strict=False)]}


def _window_acts(model: GPT, tokens: np.ndarray, starts: list[int], window: int, layer: int,
                 index: int) -> np.ndarray:
    x = torch.from_numpy(np.stack([tokens[s:s + window] for s in starts]).astype(np.int64))
    acts = record_activations(model, x.to(model.lm_head.weight.device), [layer])
    return acts[:, :, 0, index].float().cpu().numpy()


def neuron_card(run, layer: int, index: int, *, top: int = 10, context: int = 40, per_quantile: int = 2,
                sample_windows: int = 64, bins: int = 20, n_tokens: int = 10, window: int = 0, keep: int = 32,
                max_windows: int | None = None, build: bool = False, batch_size: int = 32, log=print) -> dict[str, Any]:
    """A neuron as Neuronpedia shows one: its top training windows (from the examples artifact),
    examples at activation quantiles and a histogram (over `sample_windows` random scan windows), and
    the tokens it promotes / suppresses through the unembedding. What `glassgpt neuron --json` prints."""
    model, tokens = run.model, run.corpus.tokens("train")
    check_neuron(model, layer, index)
    values, positions = open_examples(run, window, keep, max_windows, build, batch_size, log)
    W = _window(window, model)
    windows = [(b, f) for b, _, f in sliding_windows(len(tokens), W, skip=1)]
    W = min(W, len(tokens))
    froms = [f for _, f in windows]
    hits = [int(p) for v, p in zip(values[:top, layer, index], positions[:top, layer, index], strict=False) if np.isfinite(v)]
    owner = [windows[bisect.bisect_right(froms, p) - 1][0] for p in hits]  # the scan window that scored p
    acts = _window_acts(model, tokens, owner, W, layer, index) if hits else []
    examples = [_example(run, s, a, p, context) for s, a, p in zip(owner, acts, hits, strict=False)]
    pick = np.random.default_rng(0).choice(len(windows), min(sample_windows, len(windows)), replace=False)
    starts = [windows[k][0] for k in np.sort(pick)]
    sacts = np.concatenate([_window_acts(model, tokens, starts[b:b + batch_size], W, layer, index)
                            for b in range(0, len(starts), batch_size)])
    where = [(k, j) for k, w in enumerate(np.sort(pick)) for j in range(windows[w][1] - windows[w][0], W)]
    vals = np.array([sacts[k, j] for k, j in where])  # the scored positions of the sampled windows

    def sampled(i: int) -> dict[str, Any]:
        k, j = where[i]
        return _example(run, starts[k], sacts[k], starts[k] + j, context)

    quants = [{"quantile": q, "value": v, "examples": [sampled(i) for i in idx]}
              for q, v, idx in quantile_examples(vals, QUANTILES, per_quantile)]
    counts, edges = np.histogram(vals, bins=bins)
    effect = logit_effect(model, layer, index)[:run.tokenizer.vocab_size]  # GPT-2 pads its vocab
    order = torch.argsort(effect, descending=True, stable=True).tolist()
    as_tokens = lambda ids: [{"token": run.tokenizer.decode([t]), "logit": float(effect[t])} for t in ids]  # noqa: E731
    return {"layer": layer, "index": index, "examples": examples, "quantile_examples": quants,
            "histogram": {"counts": counts.tolist(), "edges": edges.tolist(), "n_tokens": len(vals),
                          "n_windows": len(starts), "frac_positive": float((vals > 0).mean())},
            "promotes": as_tokens(order[:n_tokens]), "suppresses": as_tokens(order[::-1][:n_tokens])}


def _show(e: dict[str, Any]) -> str:
    loc = e["location"]
    text = (e["before"] + HIGHLIGHT[0] + e["token"] + HIGHLIGHT[1] + e["after"]).replace("\n", "\u23ce")
    return f"act {e['activation']:.3f}  doc {loc['doc_id']} tokens [{loc['token_start']}, {loc['token_end']}) line {e['line']}: {text}"


def format_card(c: dict[str, Any]) -> str:
    h = c["histogram"]
    lines = [f"neuron {c['index']} of layer {c['layer']}: top {len(c['examples'])} training windows "
             f"(example token in {HIGHLIGHT[0]}{HIGHLIGHT[1]})"]
    lines += [f"{k:>3}. {_show(e)}" for k, e in enumerate(c["examples"], 1)]
    for q in c["quantile_examples"]:
        lines.append(f"at quantile {q['quantile']} (activation {q['value']:.3f}):")
        lines += [f"     {_show(e)}" for e in q["examples"]]
    lines.append(f"activations over {h['n_tokens']} tokens of {h['n_windows']} random windows "
                 f"({100 * h['frac_positive']:.0f}% > 0):")
    peak = max(h["counts"]) or 1
    lines += [f"  [{lo:>8.3f}, {hi:>8.3f}) {n:>7} {'#' * round(40 * n / peak)}"
              for lo, hi, n in zip(h["edges"], h["edges"][1:], h["counts"], strict=False)]
    for key in ("promotes", "suppresses"):
        lines.append(f"{key}: " + ", ".join(f"{t['token']!r} {t['logit']:+.2f}" for t in c[key]))
    return "\n".join(lines)


def neuron_main(argv: list[str] | None = None) -> dict[str, Any] | None:
    if wants_help(NeuronConfig, argv, "glassgpt neuron"):
        return None
    cfg = load_config(NeuronConfig, argv)
    if cfg.layer == -1 or cfg.index == -1:
        raise UserError("give the neuron: --layer=L --index=I (see `glassgpt trace-neurons` for interesting ones)")
    if cfg.keep < cfg.top:
        raise UserError(f"--keep (now {cfg.keep}) must be >= --top (now {cfg.top})")
    from glassgpt.run import open_run

    run = open_run(cfg.out_dir, ckpt_iter=cfg.ckpt_iter, device=cfg.device,
                   data_dir=cfg.data_dir, vocab_dir=cfg.vocab_dir)
    check_neuron(run.model, cfg.layer, cfg.index)
    log = (lambda m: print(m, file=sys.stderr)) if cfg.json else print
    card = neuron_card(run, cfg.layer, cfg.index, top=cfg.top, context=cfg.context, per_quantile=cfg.per_quantile,
                       sample_windows=cfg.sample_windows, bins=cfg.bins, n_tokens=cfg.n_tokens, window=cfg.window,
                       keep=cfg.keep, max_windows=cfg.max_windows, build=True, batch_size=cfg.batch_size, log=log)
    print(json.dumps(card, indent=1, ensure_ascii=False) if cfg.json else format_card(card))
    return card
