"""Which explanation engine finds what taught the model? Every engine scored on the same queries by the
causal tests: LDS over retrains on random halves of a finetune set, removal of each engine's top 1%
blamed windows and retraining, and planted canaries (verbatim and pattern). docs/attribution.md reads
the table.

    OMP_NUM_THREADS=1 nice -n 10 python -m benchmarks.bench_attribution            # full: ~20-30 min, 1 thread
    python -m benchmarks.bench_attribution --smoke                                  # seconds-scale check
    python -m benchmarks.bench_attribution --seed=7 --only=canaries                 # unseen canary sets
    python -m benchmarks.bench_attribution --results=benchmarks/RESULTS.md --out=/tmp/attr.json

The regime: a tiny char GPT (benchmarks/attribution/retrain.py's TrainSpec) trained once on
tiny-shakespeare, then finetuned for one epoch on ~2,000 fixed 65-character windows of English text
(with the canaries planted among them), by a minimal loop over glassgpt's GPT with glassgpt's AdamW
(`GPT.configure_optimizers`), one fixed data order for every subset. The from-scratch regime trains
the same model from its seeded initialisation on a smaller pool for a few epochs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.attribution import evaluate, metrics, scorers  # noqa: E402
from benchmarks.attribution.data import build_data  # noqa: E402
from benchmarks.attribution.retrain import TrainSpec, finetune, from_scratch, train_base  # noqa: E402

FULL = dict(n_windows=2000, n_queries=60, n_verbatim=10, n_styles=16, pattern_copies=4, n_docs=40, base_steps=400,
            subsets=100, removal_queries=30, scratch_windows=400, scratch_subsets=40, scratch_epochs=4,
            base_chars=None)
SMOKE = dict(n_windows=160, n_queries=6, n_verbatim=2, n_styles=3, pattern_copies=2, n_docs=8, base_steps=20,
             subsets=6, removal_queries=2, scratch_windows=48, scratch_subsets=4, scratch_epochs=1,
             base_chars=100_000)
TESTS = ("lds", "removal", "canaries", "scratch")
# Removal needs one retrain per (query, engine): the full run removes for these (trace-knn's default
# calibration stands for the embedding engines); --removal_engines=all takes every engine.
REMOVAL_ENGINES = ("random", "spans", "bm25", "emb-whiten", "hybrid", "tracin", "influence")


def machine() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        name = next((ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name")), "?")
    except OSError:
        name = "?"
    return f"{name}, {os.cpu_count()} cores"


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def ci(values: np.ndarray, seed: int = 0) -> list[float]:
    return [round(v, 4) for v in metrics.bootstrap_ci(values, seed=seed)]


def run(size: dict, tests: tuple[str, ...], seed: int, canary_seed: int, with_influence: bool | None,
        removal_engines: tuple[str, ...] | None = None, save: Callable[[dict], object] | None = None,
        damping: float | None = None) -> dict:
    """Every test asked for; `save(results)` is called after each one (a long run keeps what it has)."""
    save = save or (lambda r: None)
    t_start = time.perf_counter()
    spec = TrainSpec(batch_size=32, learning_rate=3e-3, seed=seed)
    data = build_data(block_size=spec.block_size, seed=seed, canary_seed=canary_seed,
                      **{k: size[k] for k in ("n_windows", "n_queries", "n_verbatim", "n_styles", "pattern_copies",
                                              "n_docs", "base_chars")})
    base = train_base(data.base_tokens, spec, size["base_steps"])
    W = torch.from_numpy(data.windows)
    evaluate.log(f"base model trained ({time.perf_counter() - t_start:.0f} s); {len(W)} windows, "
                 f"{len(data.queries)} held-out queries, {len(data.verbatim)} verbatim + "
                 f"{len(data.pattern)} pattern canaries")

    def train(keep):
        return finetune(base, W, keep, spec)

    t0 = time.perf_counter()
    full = train(None)
    finetune_s = time.perf_counter() - t0
    names = scorers.engines(with_influence)
    pool = scorers.Pool(full, data.windows, data.prompt_len, seed=seed, damping=damping)
    held_out = data.queries if {"lds", "removal"} & set(tests) else []  # canaries alone need none
    all_q = held_out + data.verbatim + data.pattern
    scores, seconds = scorers.score_all(pool, [q.ids for q in all_q], names)
    evaluate.log(f"scored {len(all_q)} queries with {len(names)} engines: "
                 + ", ".join(f"{k} {v:.1f} s" for k, v in seconds.items()))
    nq, nv = len(held_out), len(data.verbatim)
    held = {k: v[:nq] for k, v in scores.items()}
    out: dict = {"engines": list(names), "score_seconds": seconds, "finetune_seconds": finetune_s,
                 "n_windows": len(W), "n_queries": len(data.queries), "prompt_len": data.prompt_len,
                 "spec": spec.__dict__, "seed": seed, "canary_seed": canary_seed,
                 "styles": [s.name for s in data.styles]}
    if "canaries" in tests:
        out["verbatim"] = evaluate.canaries({k: v[nq:nq + nv] for k, v in scores.items()}, data.verbatim)
        out["pattern"] = evaluate.canaries({k: v[nq + nv:] for k, v in scores.items()}, data.pattern)
        save(out)
    if "lds" in tests:
        res = evaluate.lds(train, [q.ids for q in data.queries], data.prompt_len, held, size["subsets"], seed)
        out["lds"] = {k: {"ci": ci(v), "per_query": v.round(4).tolist()} for k, v in res.per_query.items()}
        out["lds_seconds"] = res.seconds
        out["lds_subsets"] = size["subsets"]
        if "influence" in res.per_query:
            out["lds_influence_minus"] = {k: ci(res.per_query["influence"] - v) for k, v in res.per_query.items()
                                          if k != "influence"}
        save(out)
    if "removal" in tests:
        k = size["removal_queries"]
        other = TrainSpec(**{**spec.__dict__, "seed": seed + 1})
        res_r = evaluate.removal(train, lambda keep: finetune(base, W, keep, other), [q.ids for q in data.queries[:k]],
                                 data.prompt_len, {n: v[:k] for n, v in held.items()
                                                   if removal_engines is None or n in removal_engines})
        out["removal"] = {n: {"ci": ci(d), "delta": d.round(5).tolist(), "predicted": res_r.predicted[n].tolist()}
                          for n, d in res_r.delta.items()}
        out["removal_full_loss"] = float(res_r.full_loss.mean())
        out["removal_order_noise"] = ci(res_r.order_noise)
        out["removal_ratio"] = {f"{a}/{b}": [round(x, 3) for x in metrics.ratio_ci(res_r.delta[a], res_r.delta[b])]
                                for a in res_r.delta for b in ("bm25", "random")
                                if a != b and b in res_r.delta and a != "random"}
        out["removal_prediction"] = {n: {"pearson": round(metrics.pearson(res_r.predicted[n], res_r.delta[n]), 3),
                                         "spearman": round(metrics.spearman(res_r.predicted[n], res_r.delta[n]), 3),
                                         "predicted_mean": float(res_r.predicted[n].mean())}
                                     for n in ("influence", "tracin") if n in res_r.delta}
        out["removal_retrains"], out["removal_seconds"], out["removal_queries"] = res_r.retrains, res_r.seconds, k
        save(out)
    if "scratch" in tests:
        out["scratch"] = scratch(data, size, spec, with_influence, seed, damping)
    out["total_seconds"] = time.perf_counter() - t_start
    return out


def scratch(data, size: dict, spec: TrainSpec, with_influence: bool | None, seed: int,
            damping: float | None = None) -> dict:
    """The from-scratch regime: LDS only, on a smaller pool trained for a few epochs from initialisation."""
    s_spec = TrainSpec(**{**spec.__dict__, "epochs": size["scratch_epochs"]})
    W = torch.from_numpy(data.windows[:size["scratch_windows"]])

    def train(keep):
        return from_scratch(W, keep, s_spec)

    full = train(None)
    queries = [q.ids for q in data.queries]
    pool = scorers.Pool(full, data.windows[:size["scratch_windows"]], data.prompt_len, seed=seed, damping=damping)
    scores, _ = scorers.score_all(pool, queries, scorers.engines(with_influence))
    res = evaluate.lds(train, queries, data.prompt_len, scores, size["scratch_subsets"], seed)
    return {"lds": {k: {"ci": ci(v)} for k, v in res.per_query.items()}, "subsets": size["scratch_subsets"],
            "windows": size["scratch_windows"], "epochs": size["scratch_epochs"], "seconds": res.seconds}


def fmt_ci(c: list[float] | None, digits: int = 3) -> str:
    if c is None:
        return "-"
    return f"{c[0]:.{digits}f} [{c[1]:.{digits}f}, {c[2]:.{digits}f}]"


def table(r: dict) -> str:
    """The markdown table plus the targets, as docs/attribution.md and RESULTS.md show them."""
    head = ["engine"]
    if "lds" in r:
        head.append(f"LDS finetune ({r['lds_subsets']} retrains, {r['n_queries']} queries)")
    if "scratch" in r:
        head.append(f"LDS from scratch ({r['scratch']['subsets']} retrains)")
    if "removal" in r:
        head.append(f"loss rise, top 1% removed ({r['removal_queries']} queries, nats)")
    if "verbatim" in r:
        head += [f"verbatim s@5 ({len(r['verbatim']['random']['hits'])})",
                 f"pattern s@5 ({len(r['pattern']['random']['hits'])})"]
    head.append("scoring s")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for e in r["engines"]:
        row = [e]
        if "lds" in r:
            row.append(fmt_ci(r["lds"][e]["ci"]))
        if "scratch" in r:
            row.append(fmt_ci(r["scratch"]["lds"][e]["ci"]))
        if "removal" in r:
            row.append(fmt_ci(r["removal"][e]["ci"], 4) if e in r["removal"] else "not run")
        if "verbatim" in r:
            row += [f"{r['verbatim'][e]['success']:.2f}", f"{r['pattern'][e]['success']:.2f}"]
        row.append(f"{r['score_seconds'][e]:.1f}")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n\n" + "\n".join(f"- {t}" for t in targets(r))


def pattern_detail(r: dict) -> str:
    """Pattern canaries per style: which engines put a planted window in their top 5."""
    if "pattern" not in r:
        return ""
    names = [e for e in r["engines"] if e != "random"]
    lines = ["| style | " + " | ".join(names) + " |", "|" + "---|" * (len(names) + 1)]
    for i, style in enumerate(r["styles"]):
        lines.append(f"| {style} | " + " | ".join("x" if r["pattern"][e]["hits"][i] else "." for e in names) + " |")
    return "\n".join(lines)


def targets(r: dict) -> list[str]:
    out = []
    if "removal" in r:
        out.append("order noise (same data, another order): mean |loss change| "
                   f"{fmt_ci(r['removal_order_noise'], 4)} nats "
                   f"(query loss {r['removal_full_loss']:.2f} nats); {r['removal_retrains']} removal retrains")
        for k, v in r["removal_ratio"].items():
            out.append(f"removal ratio {k}: " + (f"{v[0]:.2f} [{v[1]:.2f}, {v[2]:.2f}]" if v[0] == v[0] else
                                                  "n/a (the mean rise of the second is <= 0)"))
        for k, v in r["removal_prediction"].items():
            out.append(f"{k} predicted vs measured loss rise: Pearson {v['pearson']:.2f}, Spearman {v['spearman']:.2f}")
    if "influence" not in r["engines"]:
        out.append("influence: not measured (glassgpt.trace.influence is not in this checkout)")
        return out
    if "lds" in r:
        inf = r["lds"]["influence"]["ci"]
        emb_best = max((e for e in r["engines"] if e.startswith("emb-")), key=lambda e: r["lds"][e]["ci"][0])
        ok = inf[0] >= 0.45 and inf[1] > r["lds"]["bm25"]["ci"][2] and inf[1] > r["lds"][emb_best]["ci"][2]
        out.append(f"target LDS >= 0.45 with its interval above BM25's and {emb_best}'s: "
                   f"{'met' if ok else 'MISSED'} ({fmt_ci(inf)}; influence - bm25 "
                   f"{fmt_ci(r['lds_influence_minus']['bm25'])}, influence - tracin "
                   f"{fmt_ci(r['lds_influence_minus']['tracin'])})")
    if "removal" in r and "influence" in r["removal"]:
        rb = r["removal_ratio"]["influence/bm25"][0]
        inf_rise, rand = r["removal"]["influence"]["ci"][0], r["removal"]["random"]["ci"]
        # random removal barely moves the loss (its mean can be <= 0): compare with its interval's upper end
        ok = rb >= 1.5 and inf_rise >= 3 * max(rand[0], rand[2])
        out.append(f"target removal >= 1.5x BM25 and >= 3x random: {'met' if ok else 'MISSED'} ({rb:.2f}x BM25; "
                   f"influence {inf_rise:.3f} nats vs random {fmt_ci(rand)}, "
                   f"{inf_rise / max(rand[0], rand[2], 1e-9):.0f}x the upper end of random's interval)")
    if "pattern" in r:
        p = r["pattern"]["influence"]["success"]
        out.append(f"target pattern canaries s@5 >= 0.9: {'met' if p >= 0.9 else 'MISSED'} ({p:.2f})")
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="a seconds-scale run of every test")
    p.add_argument("--only", default=",".join(TESTS), help=f"comma list of tests: {', '.join(TESTS)}")
    p.add_argument("--seed", type=int, default=0, help="canary seed: a new seed plants unseen canary sets")
    p.add_argument("--data_seed", type=int, default=0, help="seed of the pool, queries, training order and init")
    p.add_argument("--influence", choices=("auto", "on", "off"), default="auto",
                   help="score the EK-FAC influence engine (auto: when glassgpt.trace.influence exists)")
    p.add_argument("--size", action="append", default=[], metavar="KEY=VALUE",
                   help=f"override one size of the run, e.g. --size=subsets=20 (keys: {', '.join(FULL)})")
    p.add_argument("--removal_engines", default=",".join(REMOVAL_ENGINES),
                   help="comma list of engines the removal test retrains for, or 'all'")
    p.add_argument("--damping", type=float, default=None,
                   help="influence's damping, x each layer's mean eigenvalue (default: the engine's own)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", help="write the full results (per-query figures) as JSON here")
    p.add_argument("--results", help="append the markdown to this file")
    a = p.parse_args(argv)
    tests = tuple(t for t in a.only.split(",") if t)
    if bad := [t for t in tests if t not in TESTS]:
        p.error(f"unknown test(s) {bad}; choose from {', '.join(TESTS)}")
    size = dict(SMOKE if a.smoke else FULL)
    for kv in a.size:
        key, _, value = kv.partition("=")
        if key not in size:
            p.error(f"--size {kv}: unknown key {key!r}; keys: {', '.join(size)}")
        size[key] = None if value == "None" else int(value)
    torch.set_num_threads(a.threads)
    warnings.filterwarnings("ignore", message="There is a performance drop")  # vmap falls back for SDPA: fine here
    load0, date = loadavg(), time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    r = run(size, tests, a.data_seed, a.seed,
            {"auto": None, "on": True, "off": False}[a.influence],
            None if a.removal_engines == "all" or a.smoke else tuple(a.removal_engines.split(",")),
            save=(lambda r: Path(a.out).write_text(json.dumps(r, default=float))) if a.out else None,
            damping=a.damping)
    r.update(date=date, machine=machine(), load=f"{load0} -> {loadavg()}", threads=a.threads, smoke=a.smoke, size=size,
             damping=a.damping)
    md = (f"### Attribution engines{' (smoke)' if a.smoke else ''} ({date}; {r['machine']}; {a.threads} thread(s); "
          f"loadavg {r['load']}; total {r['total_seconds'] / 60:.1f} min; data seed {a.data_seed}, "
          f"canary seed {a.seed})\n\n"
          f"{table(r)}\n\nPattern canaries by style (x: a planted window in the top 5):\n\n{pattern_detail(r)}\n")
    print(md)
    if a.out:
        Path(a.out).write_text(json.dumps(r, indent=1, default=float))
    if a.results:
        with open(a.results, "a") as f:
            f.write(md + "\n")
    return r


if __name__ == "__main__":
    main()
