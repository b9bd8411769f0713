"""Neuron traces: which MLP neurons matter for a text, judged against a baseline and fair controls.

    glassgpt trace-neurons --out_dir=out --start="ROMEO:" [--rank=raw|z|prob|attribution] [--ablate] [--json]
    glassgpt trace-neurons --out_dir=out --prompts=FILE --rank=z --ablate   # + overlap and specificity
    glassgpt trace-neurons --out_dir=out --build_baseline

The viewer calls `explain(run, text, **opts)` (what `trace-neurons --json` prints for one prompt) and
`open_baseline(run)`. Recording, ablating and the baseline's statistics are in neuron_record.py; one
neuron's card (`glassgpt neuron`) is neuron_card.py. The neurons are every block's
`blocks.{i}.mlp.hook_post`; docs/neurons.md defines each statistic and shows the measurements that
chose the defaults.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from glassgpt.artifacts import Unusable
from glassgpt.config import load_config, read_text_arg, wants_help
from glassgpt.errors import UserError
from glassgpt.model import GPT
from glassgpt.progress import ProgressFn
from glassgpt.sampling import SamplingSettings, generate_from, prompt_ids, sampling_settings
from glassgpt.trace.neuron_record import (
    DIRS,
    Baseline,
    ablated_logprob,
    build_baseline,
    load_arrays,
    record_text,
    save_arrays,
    traced_logprob,
)


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
    order = {(ly, i): np.argsort(np.abs(raw[ly] - raw[ly, i]), kind="stable") for ly, i in top}
    for _ in range(n_draws):
        used, pick = set(top_set), []
        for ly, i in top:
            cands = [int(j) for j in order[ly, i] if (ly, int(j)) not in used][:pool]
            j = cands[int(rng.integers(len(cands)))]
            used.add((ly, j))
            pick.append((ly, j))
        draws.append(pick)
    return draws


def causal_check(model: GPT, ids: list[int], pos0: int, top: list[tuple[int, int]], raw: np.ndarray,
                 mode: str = "mean", baseline: Baseline | None = None, n_controls: int = 5,
                 seed: int = 0) -> dict[str, Any]:
    """Log-prob drop (nats over the traced tokens) from ablating `top`, against the raw top-K (the
    most active neurons) and K activation-matched neurons of the same layers (n_controls draws)."""
    clean = traced_logprob(model, ids, pos0)
    drop = lambda ns: clean - ablated_logprob(model, ids, pos0, ns, mode, baseline, seed)  # noqa: E731
    raw_top = [(ly, i) for ly, i, _ in top_neurons(raw, len(top))]
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


def open_baseline(run: Any, params: dict | None = None) -> Baseline:
    """The run's baseline (built with `params`, if given); an Unusable (UserError) naming the build
    command if it is missing, stale or built otherwise."""
    a = load_arrays(run, "neurons", params)
    return Baseline(a["mean"], a["std"], a["prob"], a["sample"], int(a["n_tokens"]), a["params"])


def get_baseline(run: Any, cfg: TraceNeuronsConfig, log: Any = print, rebuild: bool = False,
                 progress: ProgressFn | None = None) -> Baseline:
    """The run's baseline for cfg's settings, built (with a progress bar, and `progress(done, total,
    what)` called) if missing, stale or otherwise built, or when `rebuild`."""
    params = {"source": cfg.baseline_source, "n_seqs": cfg.baseline_windows, "prompt_len": cfg.baseline_prompt,
              "new_tokens": min(64, run.model.config.block_size + 1 - cfg.baseline_prompt), "seed": 0,
              "temperature": cfg.temperature if cfg.baseline_source == "generated" else None, "split": "train"}
    why = "--build_baseline"
    if not rebuild:
        try:
            return open_baseline(run, params)
        except Unusable as e:
            why = e.reason
    log(f"{why}: building the neuron baseline ({params['n_seqs']} {params['source']} sequences; kept in "
        f"{Path(run.out_dir) / DIRS['neurons']})")
    base = build_baseline(run.model, run.corpus.tokens("train"), batch_size=cfg.batch_size, on_progress=progress,
                          **params)
    save_arrays(run, "neurons", params, {"mean": base.mean, "std": base.std, "prob": base.prob,
                                         "sample": base.sample, "n_tokens": np.array(base.n_tokens)})
    base.params = params
    return base


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
        scores = raw if rank == "raw" or baseline is None else contrast(traced, baseline, rank, floor, layer_norm)
    top = top_neurons(scores, n_neurons)
    r: dict[str, Any] = {
        "prompt": text, "output": tok.decode(out_ids), "generated": output is None, "token_ids": seq,
        "tokens": [tok.decode([t]) for t in seq], "first_traced_position": pos0, "n_traced_tokens": len(traced),
        "ranking": rank, "baseline": baseline.params if baseline is not None else None,
        "top": [{"layer": ly, "index": i, "score": s, "mean_activation": float(raw[ly, i]),
                 "token_activations": [round(float(a), 4) for a in acts[:, ly, i]]} for ly, i, s in top],
        "layer_counts": np.bincount([ly for ly, _, _ in top], minlength=model.config.n_layer).tolist(),
        "per_layer": [[{"index": i, "score": s} for i, s in row] for row in top_per_layer(scores, n_neurons)],
        "top_raw": [[ly, i] for ly, i, _ in top_neurons(raw, n_neurons)],
    }
    if ablate:
        r["ablation"] = causal_check(model, seq, pos0, [(ly, i) for ly, i, _ in top], raw, ablation, baseline,
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
