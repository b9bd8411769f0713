"""Tokens/s of the KV-cache engine against nanoGPT's full recomputation, in the same run.

    python benchmarks/bench_generate.py                      # baby GPT, random weights, 1000 tokens
    python benchmarks/bench_generate.py --out_dir=out-shakespeare-char   # a trained checkpoint
    python benchmarks/bench_generate.py --max_new_tokens=300 --ref_batch=False   # quicker

The model is config/train_shakespeare_char.py's baby GPT (6 layers, 6 heads, 384 wide, context 256,
vocab 65) unless --out_dir names a checkpoint. Each row generates max_new_tokens greedily from a
one-token prompt ("\\n", nanoGPT's default start), so past token 256 the context window matters:

  full recompute   nanoGPT's model.generate: a forward over the whole window for every token
  engine sliding   the same tokens (checked), cache within block_size, re-prefill every step beyond
  engine chunked   the default: re-prefill the last 128 tokens whenever the 256-token window fills

Batch 8 generates 8 sequences at once (tokens/s counts all of them). --append=True adds the figures,
the date, the machine and `uptime` to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from glassgpt.config import load_config
from glassgpt.generate import generate
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


def baby_gpt() -> GPT:
    # config/train_shakespeare_char.py: n_layer=6, n_head=6, n_embd=384, block_size=256, dropout=0.2
    torch.manual_seed(1337)
    return GPT(GPTConfig(block_size=256, vocab_size=65, n_layer=6, n_head=6, n_embd=384, dropout=0.0, bias=False))


def timed(fn) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def main(argv: list[str] | None = None) -> list[tuple[str, int, int, float]]:
    cfg = load_config(BenchGenerateConfig, sys.argv[1:] if argv is None else argv)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.out_dir:
        from glassgpt.runtime import load_for_inference

        model, _, _ = load_for_inference(cfg.out_dir, "cpu")
        what = f"checkpoint {cfg.out_dir}"
    else:
        model, what = baby_gpt().eval(), "baby GPT (6x384, 6 heads, ctx 256, vocab 65), random weights"
    n = cfg.max_new_tokens
    prompt = [0]
    rows: list[tuple[str, int, int, float]] = []  # (run, batch, new tokens, tokens/s)

    def record(name: str, batch: int, seconds: float, tokens: int = n) -> float:
        rate = batch * tokens / seconds
        rows.append((name, batch, tokens, rate))
        print(f"{name:<16} batch {batch}, {tokens} tokens: {seconds:8.2f} s {rate:9.1f} tokens/s", flush=True)
        return rate

    print(f"{what}; {n} new tokens from a 1-token prompt; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads", flush=True)
    generate(model, [prompt], 8, temperature=0)  # warm-up
    with torch.no_grad():
        t, ref = timed(lambda: model.generate(torch.tensor([prompt]), n, temperature=0)[0, 1:].tolist())
    full = record("full recompute", 1, t)
    t, sliding = timed(lambda: generate(model, [prompt], n, temperature=0, window="sliding")[0])
    record("engine sliding", 1, t)
    t, chunked = timed(lambda: generate(model, [prompt], n, temperature=0)[0])
    eng = record("engine chunked", 1, t)
    print(f"engine sliding == full recompute, token for token: {sliding == ref}")
    print(f"engine chunked vs full recompute: {eng / full:.1f}x", flush=True)

    b, nb = cfg.batch, cfg.batch_new_tokens or n
    g = torch.Generator().manual_seed(cfg.seed)
    prompts = [[int(torch.randint(0, model.config.vocab_size, (), generator=g))] for _ in range(b)]
    t, _ = timed(lambda: generate(model, prompts, nb, temperature=0))
    eng_b = record("engine chunked", b, t, nb)
    print(f"engine chunked batch {b} vs batch 1: {eng_b / eng:.1f}x tokens/s", flush=True)
    if cfg.ref_batch:
        with torch.no_grad():
            t, _ = timed(lambda: model.generate(torch.tensor(prompts), nb, temperature=0))
        full_b = record("full recompute", b, t, nb)
        print(f"engine chunked vs full recompute at batch {b}: {eng_b / full_b:.1f}x", flush=True)
    if cfg.append:
        append_results(rows, what, n, sliding == ref)
    return rows


def append_results(rows: list[tuple[str, int, int, float]], what: str, n: int, sliding_exact: bool) -> None:
    load = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    cpu = platform.processor() or platform.machine()
    full = {(b, k): r for name, b, k, r in rows if name == "full recompute"}
    lines = [
        "",
        f"## bench_generate.py — KV-cache engine vs full recomputation ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})",
        "",
        f"{what}; greedy, 1-token prompt. Machine: {cpu}, {os.cpu_count()} cores, "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), CPU. `uptime`: {load}",
        "",
        "| run | batch | new tokens each | tokens/s | vs full recompute (same batch, same tokens) |",
        "|---|---|---|---|---|",
    ]
    for name, b, k, rate in rows:
        ratio = f"{rate / full[b, k]:.1f}x" if (b, k) in full else "not timed"
        lines.append(f"| {name} | {b} | {k} | {rate:.1f} | {ratio} |")
    lines += ["", f"engine sliding == full recompute token for token: {sliding_exact}.", ""]
    with open(RESULTS, "a") as f:
        f.write("\n".join(lines))
    print(f"appended to {RESULTS}")


if __name__ == "__main__":
    from glassgpt.errors import run_main

    sys.exit(run_main(main))
