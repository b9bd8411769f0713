"""Tokens/s of the KV-cache engine against full recomputation that gives the SAME tokens, same run.

    python -m benchmarks.bench_generate                      # baby GPT, random weights, 1000 tokens
    python -m benchmarks.bench_generate --out_dir=out-shakespeare-char   # a trained checkpoint
    python -m benchmarks.bench_generate --max_new_tokens=300 --ref_batch=False   # quicker
    python -m benchmarks.bench_generate --rope=True          # the baby GPT with rotary + QK-norm

The model is config/train_shakespeare_char.py's baby GPT (6 layers, 6 heads, 384 wide, context 256,
vocab 65) unless --out_dir names a checkpoint. Each row generates max_new_tokens greedily from a
one-token prompt ("\\n", nanoGPT's default start), so past token 256 the context window matters.
Two same-output pairs (each checked token for token), and one cross figure:

  nanoGPT sliding    nanoGPT's model.generate: a forward over the last 256 tokens for every token
  engine sliding     the same tokens: cache within block_size, re-prefill every step beyond
  chunked recompute  the chunked window rule by full recomputation (a forward over the window per token)
  engine chunked     the same tokens: re-prefill the last 128 tokens whenever the 256-token window fills
  (engine chunked vs nanoGPT sliding compares different outputs; printed, labelled as such)

Batch 8 generates 8 sequences at once (tokens/s counts all of them). --append=True adds the figures,
the date, the machine and /proc/loadavg before and after to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from glassgpt.config import load_config
from glassgpt.generate import generate, window_length
from glassgpt.model import GPT, GPTConfig

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


@dataclass
class BenchGenerateConfig:
    out_dir: str | None = None
    """A checkpoint to time; None = the baby GPT with random weights."""
    max_new_tokens: int = 1000
    batch: int = 8
    """The batched run's number of sequences."""
    batch_new_tokens: int | None = None
    """New tokens per sequence in the batched runs; None = max_new_tokens. Full recomputation of 8
    sequences is slow on 2 cores: fewer tokens keep it to minutes (both sides use the same number)."""
    ref_batch: bool = True
    """Also time full recomputation at the batched size (the slowest part)."""
    threads: int | None = None
    """torch.set_num_threads; None = torch's default."""
    seed: int = 1337
    append: bool = True
    """Append the results to benchmarks/RESULTS.md."""
    rope: bool = False
    """Time the baby GPT with rotary positions and QK-norm instead of learned positions."""
    rounds: int = 1
    """Time each batch-1 run this many times, interleaved with the others, and keep the fastest: on a
    shared machine the load moves between runs minutes apart."""
    smoke: bool = False
    """Seconds, to check the benchmark runs: a 2-layer 64-wide model with context 32, 48 new tokens
    (past the window), batch 2, nothing appended."""


def baby_gpt(rope: bool = False, smoke: bool = False) -> GPT:
    # config/train_shakespeare_char.py: n_layer=6, n_head=6, n_embd=384, block_size=256, dropout=0.2
    torch.manual_seed(1337)
    size = dict(block_size=32, n_layer=2, n_head=2, n_embd=64) if smoke else \
        dict(block_size=256, n_layer=6, n_head=6, n_embd=384)
    return GPT(GPTConfig(vocab_size=65, dropout=0.0, bias=False, rope=rope, qk_norm=rope, **size))


@torch.no_grad()
def recompute(model: GPT, prompts: list[list[int]], n: int, window: str) -> list[list[int]]:
    """Greedy full recomputation of equal-length prompts, batched: a forward over each step's window
    (window_length's rule; 'sliding' is nanoGPT's model.generate). The engine's same-output oracle."""
    idx = torch.tensor(prompts)
    for _ in range(n):
        w = window_length(idx.size(1), model.config.block_size, window)
        logits, _ = model(idx[:, -w:])
        idx = torch.cat([idx, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return idx[:, len(prompts[0]):].tolist()


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"


def timed(fn) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def main(argv: list[str] | None = None) -> list[tuple[str, int, int, float]]:
    cfg = load_config(BenchGenerateConfig, sys.argv[1:] if argv is None else argv)
    if cfg.smoke:
        cfg.max_new_tokens, cfg.batch, cfg.batch_new_tokens, cfg.append, cfg.rounds = 48, 2, None, False, 1
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.out_dir:
        from glassgpt.run import open_run

        model = open_run(cfg.out_dir, threads=cfg.threads or torch.get_num_threads()).model
        what = f"checkpoint {cfg.out_dir}"
    else:
        arch = ", rotary + QK-norm" if cfg.rope else ""
        model = baby_gpt(cfg.rope, cfg.smoke).eval()
        c = model.config
        what = (f"baby GPT ({c.n_layer}x{c.n_embd}, {c.n_head} heads, ctx {c.block_size}, vocab 65{arch}), "
                "random weights")
    n = cfg.max_new_tokens
    prompt = [0]
    rows: list[tuple[str, int, int, float]] = []  # (run, batch, new tokens, tokens/s)
    same: dict[str, bool] = {}
    load_before = loadavg()

    def record(name: str, batch: int, seconds: float, tokens: int = n) -> float:
        rate = batch * tokens / seconds
        rows.append((name, batch, tokens, rate))
        print(f"{name:<18} batch {batch}, {tokens} tokens: {seconds:8.2f} s {rate:9.1f} tokens/s", flush=True)
        return rate

    print(f"{what}; {n} new tokens from a 1-token prompt; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; loadavg {load_before}", flush=True)
    generate(model, [prompt], 8, temperature=0)  # warm-up
    runs = {"nanoGPT sliding": lambda: recompute(model, [prompt], n, "sliding"),
            "engine sliding": lambda: generate(model, [prompt], n, temperature=0, window="sliding"),
            "chunked recompute": lambda: recompute(model, [prompt], n, "chunked"),
            "engine chunked": lambda: generate(model, [prompt], n, temperature=0)}
    best: dict[str, float] = {}
    for r in range(max(1, cfg.rounds)):
        for name, fn in runs.items():
            t, out = timed(fn)
            best[name] = min(best.get(name, t), t)
            print(f"  round {r + 1}: {name} {t:.2f} s", flush=True)
            if r == 0:
                best[name + " output"] = out
    ref_s, sliding = best["nanoGPT sliding output"], best["engine sliding output"]
    ref_c, chunked = best["chunked recompute output"], best["engine chunked output"]
    nano = record("nanoGPT sliding", 1, best["nanoGPT sliding"])
    eng_s = record("engine sliding", 1, best["engine sliding"])
    full_c = record("chunked recompute", 1, best["chunked recompute"])
    eng = record("engine chunked", 1, best["engine chunked"])
    same["sliding, batch 1"], same["chunked, batch 1"] = sliding == ref_s, chunked == ref_c
    print(f"same output: engine sliding vs nanoGPT sliding {eng_s / nano:.1f}x (identical: {sliding == ref_s}); "
          f"engine chunked vs chunked recompute {eng / full_c:.1f}x (identical: {chunked == ref_c})")
    print(f"different outputs: engine chunked vs nanoGPT sliding {eng / nano:.1f}x", flush=True)

    b, nb = cfg.batch, cfg.batch_new_tokens or n
    g = torch.Generator().manual_seed(cfg.seed)
    prompts = [[int(torch.randint(0, model.config.vocab_size, (), generator=g))] for _ in range(b)]
    t, got_b = timed(lambda: generate(model, prompts, nb, temperature=0))
    eng_b = record("engine chunked", b, t, nb)
    print(f"engine chunked batch {b} vs batch 1: {eng_b / eng:.1f}x tokens/s", flush=True)
    if cfg.ref_batch:
        t, ref_b = timed(lambda: recompute(model, prompts, nb, "chunked"))
        full_b = record("chunked recompute", b, t, nb)
        same[f"chunked, batch {b}"] = got_b == ref_b
        print(f"same output: engine chunked vs chunked recompute at batch {b}: {eng_b / full_b:.1f}x "
              f"(identical: {got_b == ref_b})", flush=True)
    if cfg.append:
        append_results(rows, what, same, (load_before, loadavg()), cfg.rounds)
    return rows


# each engine run's same-output reference
REFERENCE = {"engine sliding": "nanoGPT sliding", "engine chunked": "chunked recompute"}


def append_results(rows: list[tuple[str, int, int, float]], what: str, same: dict[str, bool],
                   load: tuple[str, str], rounds: int = 1) -> None:
    cpu = platform.processor() or platform.machine()
    rate = {(name, b, k): r for name, b, k, r in rows}
    lines = [
        "",
        f"## bench_generate.py — KV-cache engine vs same-output full recomputation "
        f"({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})",
        "",
        f"{what}; greedy, 1-token prompt. Machine: {cpu}, {os.cpu_count()} cores, "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), CPU, no GPU. "
        f"/proc/loadavg before {load[0]}, after {load[1]}. Batch 1: best of {rounds} interleaved round(s).",
        "",
        "| run | batch | new tokens each | tokens/s | vs its same-output reference |",
        "|---|---|---|---|---|",
    ]
    for name, b, k, r in rows:
        ref = rate.get((REFERENCE.get(name), b, k))
        ratio = f"{r / ref:.1f}x vs {REFERENCE[name]}" if ref else "reference"
        lines.append(f"| {name} | {b} | {k} | {r:.1f} | {ratio} |")
    cross = [(b, k) for name, b, k, _ in rows if name == "engine chunked" and ("nanoGPT sliding", b, k) in rate]
    for b, k in cross:
        lines.append("\nDifferent outputs (not a like-for-like speed-up): engine chunked vs nanoGPT sliding, "
                     f"batch {b}: {rate['engine chunked', b, k] / rate['nanoGPT sliding', b, k]:.1f}x.")
    lines += ["", "Identical tokens: " + ", ".join(f"{k} {v}" for k, v in same.items()) + ".", ""]
    with open(RESULTS, "a") as f:
        f.write("\n".join(lines))
    print(f"appended to {RESULTS}")


if __name__ == "__main__":
    from glassgpt.errors import run_main

    sys.exit(run_main(main))
