"""Tokens/s of one training job run plainly, under DDP and under FSDP, with 1 and N processes.

    python -m benchmarks.bench_distributed --device=cpu                    # 2-core CPU: 1 vs 2 processes
    python -m benchmarks.bench_distributed --device=cuda --preset=gpt2     # GPU box: DDP/FSDP overhead
    python -m benchmarks.bench_distributed --device=cuda --nproc=8 --preset=gpt2

Every run is `python train.py ...` (plain) or `python -m torch.distributed.run --standalone
--nproc_per_node=N train.py ... --parallel=ddp|fsdp` on the same random-token dataset, the same model
and the same tokens per iteration (gradient_accumulation_steps is the job's total, split over the
ranks), so the tokens/s train.py logs (the whole job's) compare directly. The figure is the median
over the iterations after --warmup. On a CPU each of N processes gets cores/N threads, so 1 vs N
processes splits the same cores; on GPUs each process gets one GPU. Prints a markdown table with the
ratio of every row to the plain run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from glassgpt.corpus import write_dataset

REPO = Path(__file__).resolve().parents[1]
PRESETS = {
    # a model a 2-core CPU trains at a few iterations per second
    "cpu": dict(n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=8, vocab_size=256, grad_accum=4),
    # GPT-2 small (124M) with nanoGPT's per-GPU batch
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, batch_size=12, vocab_size=50304, grad_accum=8),
    # --smoke: seconds, to check the benchmark still runs
    "smoke": dict(n_layer=1, n_head=2, n_embd=32, block_size=16, batch_size=2, vocab_size=64, grad_accum=2),
}


def make_dataset(root: Path, vocab_size: int, n_tokens: int = 1_000_000) -> Path:
    """Random tokens: throughput does not depend on what the text says."""
    rng = np.random.default_rng(0)
    ids = {split: rng.integers(0, vocab_size, n, dtype=np.uint16) for split, n in (("train", n_tokens),
                                                                                ("val", n_tokens // 10))}
    return write_dataset(root / "random_tokens", {"vocab_size": vocab_size, "tokenizer": "random"}, ids,
                         [{"id": "random", "source": "numpy.random", "char_offset": 0, "line": 1}])


def run_job(mode: str, nproc: int, args: argparse.Namespace, data: Path, out: Path) -> dict:
    p = PRESETS[args.preset]
    opts = dict(data_dir=data, dataset=data.name, out_dir=out, device=args.device, dtype=args.dtype,
                compile=args.compile, n_layer=p["n_layer"], n_head=p["n_head"], n_embd=p["n_embd"],
                block_size=p["block_size"], batch_size=p["batch_size"], gradient_accumulation_steps=p["grad_accum"],
                max_iters=args.iters, eval_interval=10 ** 9, eval_iters=1, log_interval=1, plot=False,
                always_save_checkpoint=False, dropout=0.0, warmup_iters=0, lr_decay_iters=args.iters)
    cli = [f"--{k}={v}" for k, v in opts.items()]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    if args.device == "cpu":
        env["OMP_NUM_THREADS"] = str(args.threads or max(1, (os.cpu_count() or 1) // nproc))
    if mode == "plain":
        cmd = [sys.executable, "train.py", *cli]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "train.py", *cli, f"--parallel={mode}"]
    t0 = time.time()
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=args.timeout)
    if r.returncode:
        raise SystemExit(f"{mode} x{nproc} failed ({r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
    recs = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    steps = [rec for rec in recs if "tok_s" in rec][args.warmup:]
    mfu = [rec["mfu"] for rec in steps if "mfu" in rec]
    return {"mode": mode, "nproc": nproc, "tok_s": statistics.median(rec["tok_s"] for rec in steps),
            "ms": statistics.median(rec["ms"] for rec in steps), "mfu": statistics.median(mfu) if mfu else None,
            "final_loss": steps[-1]["loss"], "wall_s": time.time() - t0}


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--nproc", type=int, default=None, help="processes for the multi-process rows "
                    "(default: 2 on CPU, every GPU on CUDA)")
    ap.add_argument("--preset", default=None, choices=sorted(PRESETS), help="model size (default: cpu / gpt2)")
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=2, help="runs of every configuration, interleaved")
    ap.add_argument("--warmup", type=int, default=5, help="iterations left out of the median")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--compile", default="False")
    ap.add_argument("--modes", default="plain,ddp,fsdp")
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument("--threads", type=int, default=None, help="CPU threads per process (default: cores / "
                    "processes, so 1 and N processes share the same cores; 1 measures scaling over N cores)")
    ap.add_argument("--smoke", action="store_true", help="seconds: a tiny model, 3 iterations, plain and DDP only")
    args = ap.parse_args(argv)
    if args.smoke:
        args.preset, args.iters, args.warmup, args.repeats, args.modes = "smoke", 3, 1, 1, "plain,ddp"
        args.device, args.nproc, args.threads = "cpu", 2, 1
    args.preset = args.preset or ("cpu" if args.device == "cpu" else "gpt2")
    if args.nproc is None:
        if args.device == "cuda":
            import torch

            args.nproc = torch.cuda.device_count()
        else:
            args.nproc = 2
    p = PRESETS[args.preset]
    if p["grad_accum"] % args.nproc:
        raise SystemExit(f"--nproc={args.nproc} must divide the preset's gradient_accumulation_steps={p['grad_accum']}")
    modes = args.modes.split(",")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = make_dataset(Path(tmp), p["vocab_size"])
        plan = [("plain", 1)] if "plain" in modes else []
        for n in sorted({1, args.nproc}):
            plan += [(m, n) for m in modes if m != "plain"]
        # repeats interleave the configurations, so a change in the machine's load hits all of them
        runs: dict[tuple[str, int], list[dict]] = {}
        for rep in range(args.repeats):
            for mode, n in plan:
                row = run_job(mode, n, args, data, Path(tmp) / f"{mode}{n}-{rep}")
                runs.setdefault((mode, n), []).append(row)
                print(f"{mode} x{n} (run {rep + 1}): {row['tok_s']:,.0f} tok/s ({row['ms']:.1f} ms/iter)",
                      file=sys.stderr)
    for (mode, n), reps in runs.items():
        tok = sorted(r["tok_s"] for r in reps)
        mfus = [r["mfu"] for r in reps if r["mfu"] is not None]
        rows.append({"mode": mode, "nproc": n, "tok_s": statistics.median(tok), "range": (tok[0], tok[-1]),
                     "ms": statistics.median(r["ms"] for r in reps), "mfu": statistics.median(mfus) if mfus else None})
    base = rows[0]["tok_s"]
    tokens = p["grad_accum"] * p["batch_size"] * p["block_size"]
    threads = f", OMP threads per process {args.threads or 'cores/N'}" if args.device == "cpu" else ""
    print(f"\npreset {args.preset} ({p}), {tokens:,} tokens/iteration, device {args.device}, {args.iters} iters "
          f"(median after {args.warmup}){threads}\n")
    print(f"| run | processes | tokens/s (job), median of {args.repeats} | min-max | ms/iter | MFU | vs first row |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        mfu = f"{row['mfu'] * 100:.1f}%" if row["mfu"] is not None else "n/a"
        lo, hi = row["range"]
        print(f"| {row['mode']} | {row['nproc']} | {row['tok_s']:,.0f} | {lo:,.0f}-{hi:,.0f} | {row['ms']:.1f} | "
              f"{mfu} | {row['tok_s'] / base:.2f}x |")
    return rows


if __name__ == "__main__":
    main()
