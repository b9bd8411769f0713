"""Neuron traces: which MLP neurons fire for a generation, contrasted with a baseline, and ablated.

    glassgpt trace-neurons --out_dir=out --start="ROMEO:" [--top_k=10] [--contrastive] [--ablate] [--json]
    glassgpt trace-neurons --out_dir=out --prompts=FILE --contrastive      # overlap across prompts
    glassgpt neuron --out_dir=out --layer=2 --index=117 [--top=10] [--json]

Every block's MLP activations after the GELU (`blocks.{i}.mlp.hook_post`, 4*n_embd neurons) are
recorded through named forward hooks (glassgpt/hooks.py) while glassgpt.generate decodes with its KV
cache: each decoding pass computes one new token, and its last position is the activation "for" that
token, so no second forward pass is needed (the tests check this against a full recompute).

- raw trace: neurons ranked by their mean activation over the generated tokens. The seed's lesson:
  this picks the same always-busy neurons whatever the topic.
- contrastive trace: each neuron's activations are compared with a baseline distribution over random
  training windows (position 0 dropped: the first position of a window is an outlier for every
  neuron). `score=z` ranks by the mean z-score (a - mu_baseline) / sd_baseline over the generated
  tokens; `score=prob` by how much more often the neuron is on (a > 0) than in the baseline. The
  baseline is built once with a progress bar and cached as out_dir/neurons.baseline.npz with a JSON
  sidecar fingerprinting the checkpoint and data; it is rebuilt when either changes.
- causal check (--ablate): the top-K neurons are set to 0 (or to their baseline mean) and the
  teacher-forced log-probability of the generated tokens (given the prompt) is compared with the
  clean one; the same for K random neurons, several draws, mean +- std.
- `neuron`: a neuron's top-activating training windows, max token highlighted, with their place in
  the data (document, token range, line). One pass over the training split keeps the top examples of
  every neuron at once (out_dir/neurons.examples.npz + sidecar), so any later neuron is instant.

The ranking, contrast and overlap functions are pure functions over numpy arrays; the recording and
ablation functions take a model. See docs/neurons.md.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from glassgpt.checkpoint import ckpt_path
from glassgpt.config import load_config, read_text_arg, wants_help
from glassgpt.errors import UserError
from glassgpt.hooks import hooks, mlp_post, record
from glassgpt.model import GPT

BASELINE_NAME = "neurons.baseline"
EXAMPLES_NAME = "neurons.examples"
BASELINE_FORMAT = "glassgpt-neurons-baseline/1"
EXAMPLES_FORMAT = "glassgpt-neurons-examples/1"
SCORES = ("z", "prob")
STD_FLOOR = 1e-3  # GELU activations are O(0.1..1): a neuron with a smaller baseline std is constant
HIGHLIGHT = ("\u27e6", "\u27e7")  # ⟦max token⟧


@dataclass
class TraceNeuronsConfig:
    out_dir: str = "out"
    start: str = "\n"
    """Prompt text, or FILE:path to read it from a file."""
    prompts: str | None = None
    """A file with one prompt per line: trace each and report the top-K overlap between them."""
    max_new_tokens: int = 64
    temperature: float = 0.8
    """As sample.py (greedy decoding of a small model tends to loop); sampling is seeded, so a trace is
    reproducible; 0 = greedy."""
    seed: int = 1337
    top_k: int = 10
    """How many neurons to report (overall, and per layer) and to ablate."""
    contrastive: bool = False
    """Rank against the baseline over random training windows instead of by raw mean activation."""
    score: str = "z"
    """Contrastive score: 'z' (mean z-score) or 'prob' (on-rate minus the baseline's on-rate)."""
    ablate: bool = False
    """Causal check: ablate the top-K neurons and K random ones, report the log-prob drop."""
    ablation: str = "zero"
    """'zero' or 'mean' (each neuron's baseline mean)."""
    n_random: int = 5
    """Random K-neuron draws to compare the top-K ablation with."""
    json: bool = False
    baseline_windows: int = 256
    """Random training windows in the baseline."""
    window: int = 0
    """Window length for the baseline; 0 = min(block_size, 128)."""
    batch_size: int = 16
    device: str = "auto"
    data_dir: str | None = None
    """The training data; default: the one named in the checkpoint's config."""
    vocab_dir: str | None = None


@dataclass
class NeuronConfig:
    out_dir: str = "out"
    layer: int = -1
    """Block index of the neuron (required)."""
    index: int = -1
    """Neuron index within the block's MLP, 0..4*n_embd-1 (required)."""
    top: int = 10
    """How many top-activating training windows to show."""
    context: int = 40
    """Tokens of context shown before the max token (and a quarter of that after)."""
    window: int = 0
    """Scan window length; 0 = min(block_size, 128). Windows overlap by half so every token is scored
    once with at least window/2 tokens of context."""
    keep: int = 32
    """Examples kept per neuron in the cache (>= top)."""
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
    """The k highest (layer, index, score) of an (n_layer, n_neurons) score array, best first; ties
    go to the lower flat index, so the ranking is deterministic."""
    flat = np.asarray(scores, dtype=np.float64).ravel()
    order = np.argsort(-flat, kind="stable")[: max(k, 0)]
    n = scores.shape[1]
    return [(int(i // n), int(i % n), float(flat[i])) for i in order]


def top_per_layer(scores: np.ndarray, k: int) -> list[list[tuple[int, float]]]:
    """For each layer, its k highest (index, score), best first."""
    out = []
    for row in np.asarray(scores, dtype=np.float64):
        order = np.argsort(-row, kind="stable")[: max(k, 0)]
        out.append([(int(i), float(row[i])) for i in order])
    return out


@dataclass
class Baseline:
    """Per-neuron statistics of MLP activations over random training windows (position 0 dropped)."""

    mean: np.ndarray  # (n_layer, n_neurons) float64
    std: np.ndarray  # (n_layer, n_neurons) population std
    prob: np.ndarray  # (n_layer, n_neurons) fraction of tokens with activation > 0
    n_tokens: int


def baseline_from_sums(s1: np.ndarray, s2: np.ndarray, n_on: np.ndarray, n: int) -> Baseline:
    """Statistics from streaming sums (sum, sum of squares, count of a > 0) over n tokens."""
    mean = s1 / n
    var = np.maximum(s2 / n - mean**2, 0.0)  # float64 sums keep the cancellation error ~1e-12
    return Baseline(mean=mean, std=np.sqrt(var), prob=n_on / n, n_tokens=int(n))


def contrast(acts: np.ndarray, baseline: Baseline, score: str = "z") -> np.ndarray:
    """(n_layer, n_neurons) contrastive scores of a trace's activations (T, n_layer, n_neurons).

    z: the mean over tokens of (a - mu) / sd, sd floored at STD_FLOOR (a constant neuron scores ~0
    rather than infinity). prob: the trace's on-rate P(a > 0) minus the baseline's."""
    acts = np.asarray(acts, dtype=np.float64)
    if score == "z":
        return (acts.mean(axis=0) - baseline.mean) / np.maximum(baseline.std, STD_FLOOR)
    if score == "prob":
        return (acts > 0).mean(axis=0) - baseline.prob
    raise UserError(f"score={score!r} is not one of {', '.join(SCORES)}")


def raw_scores(acts: np.ndarray) -> np.ndarray:
    """(n_layer, n_neurons) mean activation over a trace's tokens (T, n_layer, n_neurons)."""
    return np.asarray(acts, dtype=np.float64).mean(axis=0)


def jaccard(a: set, b: set) -> float:
    """|a & b| / |a | b| (1.0 for two empty sets)."""
    return len(a & b) / len(a | b) if a | b else 1.0


def mean_pairwise_jaccard(sets: list[set]) -> float:
    """Mean Jaccard overlap over all pairs: how much traces of different prompts share."""
    pairs = [jaccard(sets[i], sets[j]) for i in range(len(sets)) for j in range(i + 1, len(sets))]
    return float(np.mean(pairs)) if pairs else float("nan")


def scan_windows(n_tokens: int, window: int) -> list[tuple[int, int]]:
    """(start, score_from) of windows of `window` tokens over a stream, overlapping by half, such that
    scoring positions [score_from, start + window) of each window scores every token but the very
    first exactly once, always with at least window // 2 tokens (or all before it) of context."""
    if n_tokens < 2:
        return []
    window = min(window, n_tokens)
    stride = max(window // 2, 1)
    out, covered, start = [], 1, 0  # token 0 has no context at all: never scored
    while covered < n_tokens:
        start = min(start, n_tokens - window)
        out.append((start, covered))
        covered = start + window
        start += stride
    return out


def merge_top(values: torch.Tensor, positions: torch.Tensor, new_values: torch.Tensor,
              new_positions: torch.Tensor, keep: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge (M, F) running top values/positions with (B, F) candidates, keeping the `keep` best per
    column (feature), best first."""
    v = torch.cat([values, new_values], 0)
    p = torch.cat([positions, new_positions], 0)
    top, idx = v.topk(min(keep, v.size(0)), dim=0)
    return top, p.gather(0, idx)


# ----------------------------------------------------------------------------------------------
# Recording, scoring and ablating with a model


def mlp_names(model: GPT) -> list[str]:
    return [mlp_post(i) for i in range(model.config.n_layer)]


def n_neurons(model: GPT) -> int:
    """MLP neurons per layer (4 * n_embd in GPT-2)."""
    return model.transformer.h[0].mlp.c_fc.out_features


@torch.no_grad()
def record_activations(model: GPT, idx: torch.Tensor) -> torch.Tensor:
    """(B, T, n_layer, n_neurons) MLP activations of one plain forward pass (the slow reference)."""
    with record(model, mlp_names(model)) as cache:
        model(idx)
    return torch.stack([cache[n][0] for n in mlp_names(model)], dim=2)


@dataclass
class Generation:
    prompt_ids: list[int]
    output_ids: list[int]
    acts: np.ndarray
    """(n_output, n_layer, n_neurons): activations at the position that computed each output token."""


@torch.no_grad()
def generate_and_record(model: GPT, prompt_ids: list[int], max_new_tokens: int, temperature: float = 0.0,
                        seed: int | None = 1337) -> Generation:
    """Generate with glassgpt.generate's KV cache and keep, for each generated token, every layer's
    MLP activations at the position that produced it (the last position of each decoding pass)."""
    try:
        from glassgpt.generate import generate
    except ImportError:  # before the engine: nanoGPT's sampler, then one recording forward pass
        return _generate_then_record(model, prompt_ids, max_new_tokens, temperature, seed)
    steps: dict[str, list[torch.Tensor]] = {n: [] for n in mlp_names(model)}

    def keep_last(act: torch.Tensor, name: str) -> None:
        steps[name].append(act[:, -1].detach().float().cpu())  # (1, n_neurons)

    with hooks(model, [(n, keep_last) for n in steps]):
        out = generate(model, [list(prompt_ids)], max_new_tokens, temperature=temperature, seed=seed)[0]
    per_layer = [torch.cat(steps[n], 0) for n in mlp_names(model)]  # each (n_out, n_neurons)
    if any(t.size(0) != len(out) for t in per_layer):  # one pass per token is the engine's contract
        raise RuntimeError(f"expected one MLP call per generated token ({len(out)}), got {[t.size(0) for t in per_layer]}")
    acts = torch.stack(per_layer, 1).numpy() if out else np.zeros((0, model.config.n_layer, n_neurons(model)), np.float32)
    return Generation(list(prompt_ids), out, acts)


@torch.no_grad()
def _generate_then_record(model: GPT, prompt_ids: list[int], max_new_tokens: int, temperature: float,
                          seed: int | None) -> Generation:
    """Fallback without glassgpt.generate: model.generate, then a forward over prompt + output[:-1]
    (so prompt + output must fit in block_size + 1)."""
    if len(prompt_ids) + max_new_tokens - 1 > model.config.block_size:
        raise UserError(f"prompt + --max_new_tokens exceeds block_size={model.config.block_size}; lower --max_new_tokens")
    if seed is not None:
        torch.manual_seed(seed)
    device = model.lm_head.weight.device
    seq = model.generate(torch.tensor([prompt_ids], device=device), max_new_tokens, temperature=temperature)[0]
    acts = record_activations(model, seq[None, :-1])[0, len(prompt_ids) - 1:]
    return Generation(list(prompt_ids), seq[len(prompt_ids):].tolist(), acts.float().cpu().numpy())


@torch.no_grad()
def output_logprobs(model: GPT, prompt_ids: list[int], output_ids: list[int]) -> np.ndarray:
    """Teacher-forced log p(output token | prompt, earlier output) for each output token, scoring only
    the output positions. Up to block_size + 1 tokens this is one forward pass; longer texts are scored
    in half-overlapping windows (glassgpt.evaluate.token_nlls), each token once, with at least
    block_size/2 tokens of context, so ablations of long generations compare like with like."""
    from glassgpt.evaluate import token_nlls

    seq = torch.tensor(list(prompt_ids) + list(output_ids))
    block = model.config.block_size
    nll = token_nlls(model, seq, block, max(1, block // 2))
    return (-nll[len(prompt_ids) - 1:]).numpy()


def ablation_hooks(neurons: list[tuple[int, int]], values: np.ndarray | None = None) -> list[tuple[str, Any]]:
    """Forward hooks that set the given (layer, index) neurons to 0, or to values[layer, index]."""
    by_layer: dict[int, list[int]] = {}
    for layer, i in neurons:
        by_layer.setdefault(layer, []).append(i)
    out = []
    for layer, idx in sorted(by_layer.items()):
        fill = None if values is None else torch.tensor(values[layer, idx], dtype=torch.float32)

        def ablate(act: torch.Tensor, name: str, idx=idx, fill=fill) -> torch.Tensor:
            act = act.clone()
            act[..., idx] = 0.0 if fill is None else fill.to(act.device, act.dtype)
            return act

        out.append((mlp_post(layer), ablate))
    return out


@torch.no_grad()
def ablated_logprob(model: GPT, gen: Generation, neurons: list[tuple[int, int]],
                    values: np.ndarray | None = None) -> float:
    """Total teacher-forced log-prob of the generation's output with `neurons` ablated."""
    with hooks(model, ablation_hooks(neurons, values)):
        return float(output_logprobs(model, gen.prompt_ids, gen.output_ids).sum())


def causal_check(model: GPT, gen: Generation, top: list[tuple[int, int]], n_random: int = 5,
                 values: np.ndarray | None = None, seed: int = 0) -> dict[str, Any]:
    """Log-prob drop (nats, summed over output tokens) from ablating `top` vs K random other neurons."""
    clean = float(output_logprobs(model, gen.prompt_ids, gen.output_ids).sum())
    drop_top = clean - ablated_logprob(model, gen, top, values)
    L, N = model.config.n_layer, n_neurons(model)
    top_flat = {layer * N + i for layer, i in top}
    pool = np.array([f for f in range(L * N) if f not in top_flat])
    rng = np.random.default_rng(seed)
    drops = []
    for _ in range(n_random):
        pick = rng.choice(pool, size=min(len(top), len(pool)), replace=False)
        drops.append(clean - ablated_logprob(model, gen, [(int(f // N), int(f % N)) for f in pick], values))
    return {"k": len(top), "n_output_tokens": len(gen.output_ids), "clean_logprob": clean, "drop_top": drop_top,
            "drop_random": drops, "drop_random_mean": float(np.mean(drops)) if drops else float("nan"),
            "drop_random_std": float(np.std(drops)) if drops else float("nan")}


# ----------------------------------------------------------------------------------------------
# Cached artifacts beside the checkpoint


def file_fingerprint(path: Path, known: dict | None = None) -> dict:
    """{size, mtime_ns, sha256} of a file; the sha256 is reused from `known` when size and mtime match
    (hashing a multi-GB checkpoint on every call would cost seconds)."""
    st = path.stat()
    fp = {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    if known and known.get("size") == fp["size"] and known.get("mtime_ns") == fp["mtime_ns"] and known.get("sha256"):
        return {**fp, "sha256": known["sha256"]}
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return {**fp, "sha256": h.hexdigest()}


def _same_source(old: dict, new: dict) -> bool:
    return old.get("sha256") == new.get("sha256") and old.get("size") == new.get("size")


def load_cached(out_dir: Path, name: str, fmt: str, params: dict, ckpt_file: Path,
                data_file: Path) -> tuple[dict | None, str]:
    """(arrays, '') if out_dir/name.npz was built from this checkpoint and data with these params;
    else (None, why it is missing or stale)."""
    npz, side = out_dir / f"{name}.npz", out_dir / f"{name}.json"
    if not npz.exists() or not side.exists():
        return None, f"no cached {npz.name}"
    meta = json.loads(side.read_text())
    if meta.get("format") != fmt or meta.get("params") != params:
        return None, f"{npz.name} was built with other settings ({meta.get('params')})"
    if not _same_source(meta.get("checkpoint", {}), file_fingerprint(ckpt_file, meta.get("checkpoint"))):
        return None, f"{npz.name} is stale: the checkpoint changed since it was built"
    if not _same_source(meta.get("data", {}), file_fingerprint(data_file, meta.get("data"))):
        return None, f"{npz.name} is stale: the training data changed since it was built"
    with np.load(npz) as z:
        return {k: z[k] for k in z.files}, ""


def save_cached(out_dir: Path, name: str, fmt: str, params: dict, ckpt_file: Path, data_file: Path,
                arrays: dict[str, np.ndarray]) -> Path:
    """Write out_dir/name.npz and its JSON sidecar atomically (a crash leaves the old pair or none)."""
    npz, side = out_dir / f"{name}.npz", out_dir / f"{name}.json"
    tmp = npz.with_name(f".{npz.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
    os.replace(tmp, npz)
    meta = {"format": fmt, "params": params, "checkpoint": file_fingerprint(ckpt_file),
            "data": file_fingerprint(data_file), "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    tmp = side.with_name(f".{side.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(meta, indent=1))
    os.replace(tmp, side)
    return npz


@torch.no_grad()
def build_baseline(model: GPT, tokens: np.ndarray, n_windows: int, window: int, batch_size: int = 16,
                   seed: int = 0, progress: bool = True) -> Baseline:
    """Baseline statistics of every MLP neuron over `n_windows` random windows of `tokens` (position 0
    of each window dropped), accumulated in float64 sums."""
    window = min(window, len(tokens))
    if window < 2:
        raise UserError(f"the training split has {len(tokens)} tokens: too few for a baseline")
    rng = np.random.default_rng(seed)
    starts = np.sort(rng.integers(0, len(tokens) - window + 1, size=n_windows))
    device = model.lm_head.weight.device
    L, N = model.config.n_layer, n_neurons(model)
    s1, s2, n_on = np.zeros((L, N)), np.zeros((L, N)), np.zeros((L, N))
    n = 0
    for b in tqdm(range(0, len(starts), batch_size), desc="neuron baseline", unit="batch", disable=not progress):
        x = torch.from_numpy(np.stack([tokens[s:s + window] for s in starts[b:b + batch_size]]).astype(np.int64))
        acts = record_activations(model, x.to(device))[:, 1:].double().cpu()  # drop position 0
        acts = acts.reshape(-1, L, N)
        s1 += acts.sum(0).numpy()
        s2 += (acts**2).sum(0).numpy()
        n_on += (acts > 0).sum(0).numpy()
        n += acts.shape[0]
    return baseline_from_sums(s1, s2, n_on, n)


@torch.no_grad()
def build_neuron_examples(model: GPT, tokens: np.ndarray, window: int, keep: int = 32, batch_size: int = 32,
                          max_windows: int | None = None, progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """For every neuron, the `keep` windows where it fires most: (values, positions), each
    (keep, n_layer, n_neurons), best first; positions are token indices of the max in the split.

    At most one example per scan window per neuron, so one long burst does not fill the list."""
    windows = scan_windows(len(tokens), window)[:max_windows]
    if not windows:
        raise UserError(f"the training split has {len(tokens)} tokens: too few to scan")
    window = min(window, len(tokens))
    device = model.lm_head.weight.device
    L, N = model.config.n_layer, n_neurons(model)
    values = torch.full((0, L * N), -float("inf"))
    positions = torch.zeros((0, L * N), dtype=torch.long)
    for b in tqdm(range(0, len(windows), batch_size), desc="neuron examples", unit="batch", disable=not progress):
        chunk = windows[b:b + batch_size]
        x = torch.from_numpy(np.stack([tokens[s:s + window] for s, _ in chunk]).astype(np.int64)).to(device)
        acts = record_activations(model, x).float().cpu().reshape(len(chunk), window, L * N)
        starts = torch.tensor([s for s, _ in chunk])
        score_from = torch.tensor([f - s for s, f in chunk])  # first scored position in each window
        masked = acts.masked_fill((torch.arange(window)[None, :] < score_from[:, None])[:, :, None], -float("inf"))
        best, where = masked.max(dim=1)  # (B, L*N)
        values, positions = merge_top(values, positions, best, starts[:, None] + where, keep)
    return values.reshape(-1, L, N).numpy(), positions.reshape(-1, L, N).numpy()


# ----------------------------------------------------------------------------------------------
# The commands


def _load(out_dir: str, device: str, data_dir: str | None, vocab_dir: str | None):
    from glassgpt.corpus import Corpus
    from glassgpt.runtime import load_for_inference, resolve_device

    model, tok, ckpt = load_for_inference(out_dir, resolve_device(device), data_dir=data_dir, vocab_dir=vocab_dir)
    cfg = ckpt.get("config") or {}
    d = data_dir or cfg.get("data_dir") or (str(Path("data") / cfg["dataset"]) if cfg.get("dataset") else None)
    if not d:
        raise UserError("the checkpoint does not say which data it was trained on; pass --data_dir=DIR")
    return model, tok, ckpt, Corpus(d)


def _window(cfg_window: int, model: GPT) -> int:
    return min(cfg_window or 128, model.config.block_size)


def get_baseline(model: GPT, corpus, out_dir: str, cfg: TraceNeuronsConfig, log=print) -> Baseline:
    """The cached baseline for this checkpoint and data, built (with a progress bar) if missing/stale."""
    params = {"n_windows": cfg.baseline_windows, "window": _window(cfg.window, model), "seed": 0, "split": "train"}
    ckpt_file, data_file = ckpt_path(out_dir), corpus.data_dir / "train.bin"
    arrays, why = load_cached(Path(out_dir), BASELINE_NAME, BASELINE_FORMAT, params, ckpt_file, data_file)
    if arrays is not None:
        return Baseline(arrays["mean"], arrays["std"], arrays["prob"], int(arrays["n_tokens"]))
    log(f"{why}: computing the neuron baseline over {params['n_windows']} random training windows of "
        f"{params['window']} tokens (cached in {Path(out_dir) / (BASELINE_NAME + '.npz')} for next time)")
    base = build_baseline(model, corpus.tokens("train"), params["n_windows"], params["window"], cfg.batch_size)
    save_cached(Path(out_dir), BASELINE_NAME, BASELINE_FORMAT, params, ckpt_file, data_file,
                {"mean": base.mean, "std": base.std, "prob": base.prob, "n_tokens": np.array(base.n_tokens)})
    return base


def trace_prompt(model: GPT, tok, prompt: str, cfg: TraceNeuronsConfig, baseline: Baseline | None) -> dict[str, Any]:
    """Generate from `prompt`, rank neurons (contrastive when cfg.contrastive, else raw), and with
    cfg.ablate run the causal check. `baseline` is needed for contrastive ranking and mean ablation.
    Returns a JSON-able dict."""
    if (cfg.contrastive or (cfg.ablate and cfg.ablation == "mean")) and baseline is None:
        raise ValueError("contrastive ranking and mean ablation need the baseline")
    ids = tok.encode(prompt)
    if not ids:
        eot = getattr(tok, "eot_token", None)
        if eot is None:
            raise UserError("the prompt is empty and this tokenizer has no <|endoftext|> to start from; give --start")
        ids = [eot]
    gen = generate_and_record(model, ids, cfg.max_new_tokens, cfg.temperature, cfg.seed)
    acts = gen.acts
    if len(ids) == 1:
        acts = acts[1:]  # the first token was computed at position 0, which the baseline leaves out too
    if len(acts) == 0:
        raise UserError("no generated token to trace (a one-token prompt's first token sits at position 0, "
                        "which is left out); raise --max_new_tokens or lengthen the prompt")
    raw = raw_scores(acts)
    scores = contrast(acts, baseline, cfg.score) if cfg.contrastive else raw
    top = top_neurons(scores, cfg.top_k)
    result: dict[str, Any] = {
        "prompt": prompt, "output": tok.decode(gen.output_ids), "n_traced_tokens": int(len(acts)),
        "ranking": f"contrastive ({cfg.score})" if cfg.contrastive else "raw mean activation",
        "top": [{"layer": l, "index": i, "score": s, "mean_activation": float(raw[l, i]),
                 **({"baseline_mean": float(baseline.mean[l, i]), "baseline_std": float(baseline.std[l, i])}
                    if cfg.contrastive else {})} for l, i, s in top],
        "per_layer": [[{"index": i, "score": s} for i, s in row] for row in top_per_layer(scores, cfg.top_k)],
        "top_raw": [[l, i] for l, i, _ in top_neurons(raw, cfg.top_k)],
    }
    if cfg.ablate:
        values = baseline.mean if cfg.ablation == "mean" else None
        result["ablation"] = {"mode": cfg.ablation, **causal_check(model, gen, [(l, i) for l, i, _ in top],
                                                                   cfg.n_random, values, seed=cfg.seed)}
    return result


def format_trace(r: dict[str, Any], per_layer: int = 5) -> str:
    lines = [f"prompt {r['prompt']!r} -> output {r['output']!r}",
             f"top {len(r['top'])} neurons by {r['ranking']} over {r['n_traced_tokens']} generated tokens:",
             "  rank  layer  neuron      score   mean act"]
    for k, t in enumerate(r["top"], 1):
        lines.append(f"  {k:>4}  {t['layer']:>5}  {t['index']:>6}  {t['score']:>9.3f}  {t['mean_activation']:>9.3f}")
    lines.append(f"per layer (top {per_layer}):")
    for layer, row in enumerate(r["per_layer"]):
        lines.append(f"  layer {layer}: " + ", ".join(f"{x['index']} ({x['score']:.2f})" for x in row[:per_layer]))
    if "ablation" in r:
        a = r["ablation"]
        lines.append(f"ablation ({a['mode']}) of K={a['k']}: log p(output | prompt) = {a['clean_logprob']:.2f} nats "
                     f"over {a['n_output_tokens']} tokens; top-K drop {a['drop_top']:.2f} nats, K random drop "
                     f"{a['drop_random_mean']:.2f} +- {a['drop_random_std']:.2f} ({len(a['drop_random'])} draws)")
    return "\n".join(lines)


def overlap_report(results: list[dict[str, Any]]) -> dict[str, float]:
    """Mean pairwise Jaccard overlap of the prompts' top-K sets, raw and as ranked."""
    raw = [{tuple(x) for x in r["top_raw"]} for r in results]
    ranked = [{(t["layer"], t["index"]) for t in r["top"]} for r in results]
    return {"raw": mean_pairwise_jaccard(raw), "ranked": mean_pairwise_jaccard(ranked)}


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    if wants_help(TraceNeuronsConfig, argv, "glassgpt trace-neurons"):
        return None
    cfg = load_config(TraceNeuronsConfig, argv)
    if cfg.top_k < 0 or cfg.max_new_tokens < 1 or cfg.n_random < 0:
        raise UserError("--top_k and --n_random must be >= 0 and --max_new_tokens >= 1")
    if cfg.score not in SCORES:
        raise UserError(f"score={cfg.score!r} is not one of {', '.join(SCORES)}")
    if cfg.ablation not in ("zero", "mean"):
        raise UserError(f"ablation={cfg.ablation!r} is not one of zero, mean")
    if cfg.prompts:
        p = Path(cfg.prompts)
        if not p.is_file():
            raise UserError(f"--prompts={cfg.prompts} does not exist; give a file with one prompt per line")
        prompts = [line for line in p.read_text().splitlines() if line.strip()]
    else:
        prompts = [read_text_arg(cfg.start, "start")]
    model, tok, _, corpus = _load(cfg.out_dir, cfg.device, cfg.data_dir, cfg.vocab_dir)
    need_baseline = cfg.contrastive or (cfg.ablate and cfg.ablation == "mean")
    log = (lambda m: print(m, file=sys.stderr)) if cfg.json else print
    baseline = get_baseline(model, corpus, cfg.out_dir, cfg, log) if need_baseline else None
    results = [trace_prompt(model, tok, p, cfg, baseline) for p in prompts]
    out: dict[str, Any] = {"traces": results}
    if len(results) > 1:
        out["overlap"] = overlap_report(results)
    if cfg.json:
        print(json.dumps(out, indent=1))
    else:
        print("\n\n".join(format_trace(r) for r in results))
        if "overlap" in out:
            o = out["overlap"]
            msg = f"mean pairwise Jaccard overlap of the top-{cfg.top_k} sets over {len(results)} prompts: raw {o['raw']:.2f}"
            print("\n" + msg + (f", contrastive {o['ranked']:.2f}" if cfg.contrastive else ""))
    return out


def check_neuron(model: GPT, layer: int, index: int) -> None:
    """UserError saying the valid range when (layer, index) is not a neuron of this model."""
    L, N = model.config.n_layer, n_neurons(model)
    if not 0 <= layer < L:
        raise UserError(f"--layer={layer} is out of range: this model has layers 0..{L - 1}")
    if not 0 <= index < N:
        raise UserError(f"--index={index} is out of range: each layer has MLP neurons 0..{N - 1} (4 * n_embd)")


def neuron_examples(model: GPT, corpus, out_dir: str, cfg: NeuronConfig, log=print) -> tuple[np.ndarray, np.ndarray]:
    """The cached examples of every neuron (values, positions), built if missing or stale."""
    params = {"window": _window(cfg.window, model), "keep": cfg.keep, "max_windows": cfg.max_windows, "split": "train"}
    ckpt_file, data_file = ckpt_path(out_dir), corpus.data_dir / "train.bin"
    arrays, why = load_cached(Path(out_dir), EXAMPLES_NAME, EXAMPLES_FORMAT, params, ckpt_file, data_file)
    if arrays is not None:
        return arrays["values"], arrays["positions"]
    log(f"{why}: scanning the training split for every neuron's top windows (cached in "
        f"{Path(out_dir) / (EXAMPLES_NAME + '.npz')}; later neurons are instant)")
    values, positions = build_neuron_examples(model, corpus.tokens("train"), params["window"], cfg.keep,
                                              cfg.batch_size, cfg.max_windows)
    save_cached(Path(out_dir), EXAMPLES_NAME, EXAMPLES_FORMAT, params, ckpt_file, data_file,
                {"values": values, "positions": positions})
    return values, positions


def describe_example(corpus, pos: int, value: float, context: int) -> dict[str, Any]:
    """A top-activating example: the window around token `pos` (kept inside its document segment),
    split into before / max token / after, with its Location."""
    seg = corpus.segment_of("train", pos)
    start, end = max(int(seg[1]), pos - context), min(int(seg[2]), pos + 1 + max(context // 4, 1))
    loc = corpus.locate("train", start, end)
    return {"activation": float(value), "token_position": int(pos), "line": corpus.locate("train", pos, pos + 1).line,
            "before": corpus.decode("train", start, pos), "token": corpus.decode("train", pos, pos + 1),
            "after": corpus.decode("train", pos + 1, end), "location": loc.to_dict()}


def neuron_main(argv: list[str] | None = None) -> dict[str, Any] | None:
    if wants_help(NeuronConfig, argv, "glassgpt neuron"):
        return None
    cfg = load_config(NeuronConfig, argv)
    if cfg.layer == -1 or cfg.index == -1:
        raise UserError("give the neuron: --layer=L --index=I (see `glassgpt trace-neurons` for interesting ones)")
    if cfg.top < 1 or cfg.keep < cfg.top:
        raise UserError(f"--top must be >= 1 and --keep (now {cfg.keep}) >= --top (now {cfg.top})")
    model, _, _, corpus = _load(cfg.out_dir, cfg.device, cfg.data_dir, cfg.vocab_dir)
    check_neuron(model, cfg.layer, cfg.index)
    log = (lambda m: print(m, file=sys.stderr)) if cfg.json else print
    values, positions = neuron_examples(model, corpus, cfg.out_dir, cfg, log)
    v, p = values[:, cfg.layer, cfg.index], positions[:, cfg.layer, cfg.index]
    examples = [describe_example(corpus, int(pos), float(val), cfg.context)
                for val, pos in zip(v[: cfg.top], p[: cfg.top]) if np.isfinite(val)]
    out = {"layer": cfg.layer, "index": cfg.index, "examples": examples}
    if cfg.json:
        print(json.dumps(out, indent=1, ensure_ascii=False))
        return out
    print(f"neuron {cfg.index} of layer {cfg.layer}: top {len(examples)} training windows (max token in "
          f"{HIGHLIGHT[0]}{HIGHLIGHT[1]})")
    for k, e in enumerate(examples, 1):
        loc = e["location"]
        text = (e["before"] + HIGHLIGHT[0] + e["token"] + HIGHLIGHT[1] + e["after"]).replace("\n", "\u23ce")
        print(f"{k:>3}. act {e['activation']:.3f}  doc {loc['doc_id']} tokens [{loc['token_start']}, "
              f"{loc['token_end']}) line {e['line']}: {text}")
    return out


__all__ = ["TraceNeuronsConfig", "NeuronConfig", "Baseline", "top_neurons", "top_per_layer", "contrast",
           "raw_scores", "jaccard", "mean_pairwise_jaccard", "scan_windows", "merge_top", "build_baseline",
           "build_neuron_examples", "generate_and_record", "output_logprobs", "ablation_hooks", "causal_check",
           "trace_prompt", "main", "neuron_main"]
