"""`glassgpt neuron`: one neuron as Neuronpedia shows one.

    glassgpt neuron --out_dir=out --layer=2 --index=117 [--json]

Its top training windows (every neuron's top examples are scanned once and kept beside the run, the
"examples" artifact), examples at activation quantiles, a histogram over random windows, and the
tokens it promotes and suppresses through the unembedding. The viewer calls `neuron_card`.
"""

from __future__ import annotations

import bisect
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from glassgpt.artifacts import Unusable
from glassgpt.config import load_config, wants_help
from glassgpt.errors import UserError
from glassgpt.model import GPT
from glassgpt.progress import Progress, ProgressFn
from glassgpt.trace.neuron_record import DIRS, check_neuron, load_arrays, mlp_width, record_activations, save_arrays
from glassgpt.windows import sliding_windows

QUANTILES = (0.5, 0.9, 0.99, 0.999)
HIGHLIGHT = ("\u27e6", "\u27e7")  # ⟦max token⟧


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


@torch.no_grad()
def build_neuron_examples(model: GPT, tokens: np.ndarray, window: int, keep: int = 32, batch_size: int = 32,
                          max_windows: int | None = None, progress: bool = True,
                          on_progress: ProgressFn | None = None) -> tuple[np.ndarray, np.ndarray]:
    """For every neuron, the `keep` windows where it fires most: (values, positions), each
    (keep, n_layer, n_neurons), best first; positions index the split. At most one example per scan
    window per neuron, so one long burst does not fill the list."""
    windows = [(b, f) for b, _, f in sliding_windows(len(tokens), window, skip=1)][:max_windows]
    if not windows:
        raise UserError(f"the training split has {len(tokens)} tokens: too few to scan")
    window = min(window, len(tokens))
    L, N = model.config.n_layer, mlp_width(model)
    values, positions = torch.full((0, L * N), -float("inf")), torch.zeros((0, L * N), dtype=torch.long)
    bar = Progress(len(windows), "neuron examples", unit="win", callback=on_progress, disable=not progress)
    for b in range(0, len(windows), batch_size):
        chunk = windows[b:b + batch_size]
        x = torch.from_numpy(np.stack([tokens[s:s + window] for s, _ in chunk]).astype(np.int64))
        acts = record_activations(model, x.to(model.lm_head.weight.device)).float().cpu()
        acts = acts.reshape(len(chunk), window, -1)
        score_from = torch.tensor([f - s for s, f in chunk])  # first scored position in each window
        masked = acts.masked_fill((torch.arange(window)[None, :] < score_from[:, None])[:, :, None], -float("inf"))
        best, where = masked.max(dim=1)  # (B, L*N)
        v = torch.cat([values, best])  # merge with the running top, keep the best `keep` per neuron
        p = torch.cat([positions, torch.tensor([s for s, _ in chunk])[:, None] + where])
        values, idx = v.topk(min(keep, v.size(0)), dim=0)
        positions = p.gather(0, idx)
        bar.update(len(chunk))
    bar.close()
    return values.reshape(-1, L, N).numpy(), positions.reshape(-1, L, N).numpy()


def _window(window: int, model: GPT) -> int:
    return min(window or 128, model.config.block_size)


def open_examples(run: Any, window: int = 0, keep: int = 32, max_windows: int | None = None, build: bool = False,
                  batch_size: int = 32, log: Any = print, rebuild: bool = False,
                  progress: ProgressFn | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Every neuron's top training examples (values, positions); built if `build` (and always with
    `rebuild`), else an Unusable (UserError) naming the build command when missing or stale."""
    params: dict[str, Any] = {"window": _window(window, run.model), "keep": keep, "max_windows": max_windows,
                              "split": "train"}
    why = "rebuilding the neuron examples"
    if not rebuild:
        try:
            a = load_arrays(run, "examples", params)
            return a["values"], a["positions"]
        except Unusable as e:
            if not build:
                raise
            why = e.reason
    log(f"{why}: scanning the training split for every neuron's top windows (kept in "
        f"{Path(run.out_dir) / DIRS['examples']}; later neurons are instant)")
    values, positions = build_neuron_examples(run.model, run.corpus.tokens("train"), params["window"], keep,
                                              batch_size, max_windows, on_progress=progress)
    save_arrays(run, "examples", params, {"values": values, "positions": positions})
    return values, positions


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
    hits = [int(p) for v, p in zip(values[:top, layer, index], positions[:top, layer, index], strict=True)
            if np.isfinite(v)]
    owner = [windows[bisect.bisect_right(froms, p) - 1][0] for p in hits]  # the scan window that scored p
    acts: np.ndarray | list = _window_acts(model, tokens, owner, W, layer, index) if hits else []
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
    where = f"doc {loc['doc_id']} tokens [{loc['token_start']}, {loc['token_end']}) line {e['line']}"
    return f"act {e['activation']:.3f}  {where}: {text}"


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


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
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
