"""Raw vs contrastive neuron traces across topics, and the ablation check, on a small char model.

    python benchmarks/bench_neurons.py [--work=/tmp/glassgpt-bench-extend] [--base_iters=300] [--top_k=10]

Uses (or trains) bench_extend.py's 256-context char tiny-shakespeare model. For each of six topic
prompts it generates text while recording every MLP neuron through hooks, then reports:

- the mean pairwise Jaccard overlap of the top-K sets across prompts, for the raw ranking (mean
  activation), the contrastive z-score ranking and the contrastive on-rate ranking (the seed: raw
  0.52 vs contrastive 0.05 across five topics on its toy model);
- the causal check: the drop in log p(output | prompt) (nats per output token) when the top-K
  neurons are zeroed / set to their baseline mean, against K random neurons (5 draws, mean +- std);
- the time of the baseline build and of one `glassgpt neuron` scan.

Printed as a markdown block for benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_extend import REPO, base_model, machine  # noqa: E402

sys.path.insert(0, str(REPO))
from glassgpt.corpus import Corpus  # noqa: E402
from glassgpt.runtime import load_for_inference  # noqa: E402
from glassgpt.trace import neurons as nz  # noqa: E402

TOPICS = {
    "royalty": "KING HENRY VI:\nMy lords, the crown, the throne and the realm",
    "love": "ROMEO:\nO my love, my sweet Juliet, my heart",
    "hunger": "First Citizen:\nWe are poor citizens; the corn, the bread",
    "war": "MARCIUS:\nThe war, the sword, the blood of the enemy",
    "death": "DUCHESS OF YORK:\nHe is dead, my son is slain; the grave",
    "mirth": "CLOWN:\nHa, ha! a merry jest, a song and a dance",
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", default="/tmp/glassgpt-bench-extend")
    p.add_argument("--base_iters", type=int, default=300)
    p.add_argument("--top_k", type=int, default=10)
    p.add_argument("--max_new_tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--scan_windows", type=int, default=2000, help="windows for the `neuron` timing run")
    a = p.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    data_dir, out_dir = base_model(Path(a.work), a.base_iters)
    model, tok, _ = load_for_inference(out_dir, "cpu")
    corpus = Corpus(data_dir)
    cfg = nz.TraceNeuronsConfig(out_dir=str(out_dir), top_k=a.top_k, max_new_tokens=a.max_new_tokens,
                                temperature=a.temperature)
    for f in out_dir.glob(nz.BASELINE_NAME + ".*"):
        f.unlink()  # time a fresh build
    t = time.time()
    base = nz.get_baseline(model, corpus, str(out_dir), cfg)
    t_base = time.time() - t

    tops: dict[str, list[set]] = {"raw": [], "z": [], "prob": []}
    abl_rows = []
    t = time.time()
    for i, (topic, prompt) in enumerate(TOPICS.items()):
        gen = nz.generate_and_record(model, tok.encode(prompt), a.max_new_tokens, a.temperature, seed=i)
        ranked = {"raw": nz.raw_scores(gen.acts), "z": nz.contrast(gen.acts, base, "z"),
                  "prob": nz.contrast(gen.acts, base, "prob")}
        for k, s in ranked.items():
            tops[k].append({(l, j) for l, j, _ in nz.top_neurons(s, a.top_k)})
        n_out = len(gen.output_ids)
        row = {"topic": topic, "output": tok.decode(gen.output_ids)}
        for which in ("raw", "z"):
            top = [(l, j) for l, j, _ in nz.top_neurons(ranked[which], a.top_k)]
            for mode, values in (("zero", None), ("mean", base.mean)):
                c = nz.causal_check(model, gen, top, n_random=5, values=values, seed=i)
                row[(which, mode)] = (c["drop_top"] / n_out, c["drop_random_mean"] / n_out, c["drop_random_std"] / n_out)
        abl_rows.append(row)
    t_trace = (time.time() - t) / len(TOPICS)

    t = time.time()
    best_l, best_i, _ = nz.top_neurons(nz.contrast(nz.generate_and_record(
        model, tok.encode(TOPICS["love"]), a.max_new_tokens, a.temperature, seed=1).acts, base, "z"), 1)[0]
    ncfg = nz.NeuronConfig(out_dir=str(out_dir), layer=best_l, index=best_i, max_windows=a.scan_windows, top=5)
    for f in out_dir.glob(nz.EXAMPLES_NAME + ".*"):
        f.unlink()
    values, positions = nz.neuron_examples(model, corpus, str(out_dir), ncfg)
    t_scan = time.time() - t
    examples = [nz.describe_example(corpus, int(pos), float(v), 30)
                for v, pos in zip(values[:3, best_l, best_i], positions[:3, best_l, best_i])]

    K = a.top_k
    print(f"\n### neuron traces: raw vs contrastive, ablation ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})")
    print(f"machine: {machine()}")
    print(f"model: bench_extend.py's base (4x128 char GPT, block 256, {a.base_iters} iters, "
          f"{model.config.n_layer} x {nz.n_neurons(model)} MLP neurons); {len(TOPICS)} topic prompts, "
          f"{a.max_new_tokens} tokens each at temperature {a.temperature}; baseline {cfg.baseline_windows} random "
          f"train windows of {min(128, model.config.block_size)} tokens ({base.n_tokens} tokens, position 0 dropped)")
    print(f"\nmean pairwise Jaccard overlap of top-{K} sets across the {len(TOPICS)} topics:")
    print("\n| ranking | overlap |\n|---|---|")
    for k, name in (("raw", "raw mean activation"), ("z", "contrastive z-score"), ("prob", "contrastive on-rate")):
        print(f"| {name} | {nz.mean_pairwise_jaccard(tops[k]):.3f} |")
    print(f"\nablation: drop in log p(output | prompt), nats per output token, top-{K} vs {K} random (5 draws, mean ± std)")
    print("\n| topic | raw top-K, zero | random, zero | contrastive top-K, zero | random, zero | "
          "raw top-K, mean | contrastive top-K, mean | random, mean |")
    print("|---|---|---|---|---|---|---|---|")
    for r in abl_rows:
        rz, cz, rm, cm = r[("raw", "zero")], r[("z", "zero")], r[("raw", "mean")], r[("z", "mean")]
        print(f"| {r['topic']} | {rz[0]:.3f} | {rz[1]:.3f} ± {rz[2]:.3f} | {cz[0]:.3f} | {cz[1]:.3f} ± {cz[2]:.3f} "
              f"| {rm[0]:.3f} | {cm[0]:.3f} | {cm[1]:.3f} ± {cm[2]:.3f} |")
    avg = lambda key, j: float(np.mean([r[key][j] for r in abl_rows]))  # noqa: E731
    print(f"| **mean** | {avg(('raw', 'zero'), 0):.3f} | {avg(('raw', 'zero'), 1):.3f} | {avg(('z', 'zero'), 0):.3f} "
          f"| {avg(('z', 'zero'), 1):.3f} | {avg(('raw', 'mean'), 0):.3f} | {avg(('z', 'mean'), 0):.3f} "
          f"| {avg(('z', 'mean'), 1):.3f} |")
    print(f"\ntimes: baseline build {t_base:.1f} s (cached afterwards); trace + 2x2 ablation checks "
          f"{t_trace:.1f} s per prompt; `neuron` scan of {a.scan_windows} windows x 128 tokens "
          f"({a.scan_windows * 64:,} tokens scored, all neurons at once) {t_scan:.1f} s")
    print(f"top contrastive neuron for 'love': layer {best_l} #{best_i}; its top training windows:")
    for e in examples:
        text = (e["before"] + "⟦" + e["token"] + "⟧" + e["after"]).replace("\n", "⏎")
        print(f"- act {e['activation']:.2f}, line {e['line']}: `{text}`")
    print("\nsample outputs: " + "; ".join(f"{r['topic']}: {r['output'][:40]!r}" for r in abl_rows[:3]))


if __name__ == "__main__":
    main()
