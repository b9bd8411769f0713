"""Neuron trace statistics measured: overlap across prompts, layer spread, ablation vs fair controls,
specificity, for every ranking and baseline choice.

    python -m benchmarks.bench_neurons --out_dir=/work/scratch/neurons/m4x128 [--out_dir=...] [--k=10]

For each model and each of PROMPTS (six kinds of text) it samples 64 tokens at temperature 0.8,
records every MLP neuron over prompt + output (one teacher-forced pass, with gradients), and ranks
neurons raw, by z-score against a baseline of generated or of training text (old absolute spread
floor 1e-3 / floor relative to the neuron's scale / plus per-layer standardisation), by on-rate and
by attribution. Printed as markdown for docs/neurons.md and benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from glassgpt.config import field_choices
from glassgpt.generate import generate
from glassgpt.run import open_run
from glassgpt.trace import neuron_record
from glassgpt.trace import neurons as nz

PROMPTS = {
    "love verse": "ROMEO:\nO my love, my sweet Juliet, my heart",
    "citizens' prose": "First Citizen:\nWe are poor citizens; the corn, the bread",
    "stage direction": "Enter the DUKE, attended; a flourish of trumpets.\n",
    "speaker tags": "GLOUCESTER:\nBUCKINGHAM:\nCATESBY:\nRATCLIFF:\n",
    "questions": "what? why? how? when? who? where? what? why?",
    "exclamations": "O! O! O! Ha! ha! ha! Nay, nay, nay! Fie, fie! Alas!",
}


def rankings(acts, ag, gs, bases):
    """{name: (n_layer, n_neurons) scores} for one trace's traced activations."""
    out = {"raw": acts.mean(0)}
    for src, b in bases.items():
        old = (acts.mean(0) - b.mean) / np.maximum(b.std, 1e-3)  # the first version's z
        out[f"z {src}, abs floor"] = old
        out[f"z {src}, rel floor"] = nz.contrast(acts, b, "z", 0.1, layer_norm=False)
        out[f"z {src}, rel floor + layer norm"] = nz.contrast(acts, b, "z", 0.1, layer_norm=True)
        out[f"z {src}, rel floor 0.5 + layer norm"] = nz.contrast(acts, b, "z", 0.5, layer_norm=True)
    out["prob generated + layer norm"] = nz.contrast(acts, bases["generated"], "prob", layer_norm=True)
    out["attribution, nats"] = ag - bases["generated"].mean * gs
    out["attribution + layer norm"] = nz.per_layer(out["attribution, nats"])
    return out


def measure(out_dir: str, k: int, temperature: float, causal: list[str]) -> None:
    run = open_run(out_dir, device="cpu")
    model, tok, tokens = run.model, run.tokenizer, run.corpus.tokens("train")
    t = time.time()
    bases = {src: neuron_record.build_baseline(model, tokens, source=src, temperature=temperature, progress=False)
             for src in field_choices(nz.TraceNeuronsConfig, "baseline_source")}
    t_base = time.time() - t
    traces, t = [], time.time()
    for i, prompt in enumerate(PROMPTS.values()):
        ids = tok.encode(prompt)
        seq = ids + generate(model, [ids], 64, temperature=temperature, seed=i)[0]
        pos0 = len(ids) - 1
        acts, ag, gs = neuron_record.record_text(model, seq, pos0, grad=True)
        traces.append((seq, pos0, rankings(acts[pos0:-1], ag, gs, bases), acts[pos0:-1].mean(0, dtype=np.float64)))
    t_trace = (time.time() - t) / len(traces)
    L = model.config.n_layer
    print(f"\n#### {out_dir}: {L} layers x {neuron_record.mlp_width(model)} neurons, iter {run.iter_num}; "
          f"{len(traces)} prompts, 64 sampled tokens each at temperature {temperature}")
    print(f"baselines: 128 sequences, {bases['train'].n_tokens} continuation tokens in all, both sources, "
          f"{t_base:.1f} s; trace with gradients "
          f"{t_trace:.2f} s per prompt")
    print(f"\n| ranking | Jaccard top-10 | Jaccard top-50 | top-{k} by layer (all prompts) |\n|---|---|---|---|")
    for name in traces[0][2]:
        jac = [nz.mean_pairwise_jaccard([{(li, i) for li, i, _ in nz.top_neurons(tr[2][name], kk)} for tr in traces])
               for kk in (10, 50)]
        layers = np.bincount([li for tr in traces for li, _, _ in nz.top_neurons(tr[2][name], k)], minlength=L)
        print(f"| {name} | {jac[0]:.3f} | {jac[1]:.3f} | {' / '.join(map(str, layers))} |")
    for mode in ("mean", "zero", "resample"):
        print(f"\n{mode}-ablation of K={k}: drop in log p of the sampled tokens (nats per prompt, mean over "
              f"prompts); controls: the raw top-K and K activation-matched neurons (5 draws)")
        print("\n| ranking | top-K | raw top-K | matched | top-K / matched (of the means) | prompts with top-K >= 3x "
              "matched | specificity: pairs >= 2 | median pair ratio |\n|---|---|---|---|---|---|---|---|")
        base = bases["generated"]
        for name in causal:
            rows = [nz.causal_check(model, seq, p, [(li, i) for li, i, _ in nz.top_neurons(sc[name], k)], raw, mode,
                                    base, 5, seed=j) for j, (seq, p, sc, raw) in enumerate(traces)]
            n3 = sum(r["drop_top"] >= 3 * r["drop_matched_mean"] and r["drop_top"] > 0 for r in rows)
            spec = nz.specificity(model, [(seq, p) for seq, p, _, _ in traces],
                                  [[(li, i) for li, i, _ in nz.top_neurons(sc[name], k)] for _, _, sc, _ in traces],
                                  mode, base)
            finite = [x for row in spec["ratio"] for x in row if x is not None]
            avg = lambda key, rows=rows: np.mean([r[key] for r in rows])  # noqa: E731
            print(f"| {name} | {avg('drop_top'):.2f} | {avg('drop_raw_top'):.2f} | {avg('drop_matched_mean'):.2f} "
                  f"| {avg('drop_top') / avg('drop_matched_mean'):.1f}x | {n3}/{len(rows)} | "
                  f"{spec['n_pass']}/{spec['n_pairs']} | {np.median(finite) if finite else float('nan'):.2f} |")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out_dir", action="append")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--causal", default="raw;z generated, rel floor + layer norm;z train, rel floor + layer norm;"
                   "attribution, nats;attribution + layer norm",
                   help="rankings to ablate, ;-separated")
    p.add_argument("--smoke", action="store_true", help="seconds: a 1-layer 16-wide model trained for 1 iteration "
                   "on tiny-shakespeare, k=3")
    a = p.parse_args(argv)
    if not a.out_dir and not a.smoke:
        p.error("--out_dir is required (or --smoke)")
    print(f"### neuron traces ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}); load "
          f"{open('/proc/loadavg').read().split()[:3]}")
    if a.smoke:
        import tempfile
        from pathlib import Path

        from benchmarks.canaries import train_canary_model, write_char_dataset
        from glassgpt.download import TINYSHAKESPEARE, local_or_fetch

        with tempfile.TemporaryDirectory(prefix="bench-neurons-smoke-") as work:
            text = local_or_fetch(TINYSHAKESPEARE, Path(work) / "download").read_text()
            data = write_char_dataset(Path(work) / "data", text, "tinyshakespeare")
            train_canary_model(data, Path(work) / "model", 1, n_layer=1, n_embd=16, block_size=32, batch_size=2,
                               eval_iters=1)
            measure(str(Path(work) / "model"), 3, a.temperature, a.causal.split(";"))
        return
    for d in a.out_dir:
        measure(d, a.k, a.temperature, a.causal.split(";"))
    print(f"\nload after: {open('/proc/loadavg').read().split()[:3]}")


if __name__ == "__main__":
    main()
