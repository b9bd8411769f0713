"""Learned, rotary and ALiBi positions on longer contexts than they were trained on, no extension.

    python -m benchmarks.bench_positions [--seeds=1,2] [--iters=2000] [--work=DIR]
    python -m benchmarks.bench_positions --smoke        # 5 iterations, 2 windows: checks it runs

Trains one char model per position scheme and seed with nanoGPT's README CPU recipe (4 layers x 128,
block 64, batch 12; --iters iterations; a run whose checkpoint exists is reused), then scores the
same --windows random val windows of 1x, 2x and 4x the trained context (each window's first token is
the same at every length): mean loss over all positions of the window. Rotary and ALiBi models read
the whole window (block_size is raised; neither has a position table). A learned `wpe` table has no
rows past block_size: there each token is scored from at most block_size earlier ones (a sliding
window, stride 1), the best that model can do without an extension: the control. Columns hold
different text (longer windows), so compare within a column: the table, then each scheme's loss
minus the learned model's on the same windows.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from glassgpt.checkpoint import load_checkpoint, model_from_checkpoint
from glassgpt.evaluate import token_nlls

REPO = Path(__file__).resolve().parents[1]
NANOGPT_CPU = ["config/train_shakespeare_char.py", "--device=cpu", "--compile=False", "--eval_iters=20",
               "--log_interval=100", "--block_size=64", "--batch_size=12", "--n_layer=4", "--n_head=4",
               "--n_embd=128", "--dropout=0.0", "--always_save_checkpoint=True", "--plot=False"]
SCHEMES = {"learned": [], "rope": ["--rope=True"], "alibi": ["--alibi=True"]}


def train_run(out: Path, scheme: str, seed: int, iters: int) -> None:
    if (out / "ckpt.pt").exists():
        return
    n = [f"--max_iters={iters}", f"--lr_decay_iters={iters}", f"--eval_interval={iters}", f"--seed={seed}"]
    cmd = [sys.executable, "train.py", *NANOGPT_CPU, *n, *SCHEMES[scheme], f"--out_dir={out}"]
    subprocess.run(cmd, cwd=REPO, check=True, stdout=subprocess.DEVNULL)


@torch.no_grad()
def window_loss(model, windows: torch.Tensor) -> float:
    """Mean next-token loss over every position of windows (N, L+1)."""
    B = model.config.block_size
    L = windows.size(1) - 1
    if L <= B or "wpe" not in model.transformer:
        model.config.block_size = max(B, L)  # no table: only the length check stands in the way
        try:
            return float(model(windows[:, :-1], windows[:, 1:].contiguous())[1])
        finally:
            model.config.block_size = B
    return float(torch.cat([token_nlls(model, w, B, 1, batch_size=64) for w in windows]).mean())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", default="1,2")
    ap.add_argument("--iters", type=int, default=2000)
    ap.add_argument("--windows", type=int, default=64)
    ap.add_argument("--work", default="/tmp/glassgpt-bench-positions")
    ap.add_argument("--smoke", action="store_true")
    a = ap.parse_args()
    if a.smoke:
        import tempfile

        a.seeds, a.iters, a.windows, a.work = "1", 5, 2, tempfile.mkdtemp(prefix="bench-positions-smoke-")
    data_dir = REPO / "data" / "shakespeare_char"
    if not (data_dir / "train.bin").exists():
        subprocess.run([sys.executable, "data/shakespeare_char/prepare.py"], cwd=REPO, check=True)
    val = torch.from_numpy(np.fromfile(data_dir / "val.bin", dtype=np.uint16).astype(np.int64))
    ctx, seeds = 64, [int(s) for s in a.seeds.split(",")]
    starts = torch.randint(len(val) - 4 * ctx - 1, (a.windows,), generator=torch.Generator().manual_seed(42))
    load0 = open("/proc/loadavg").read().split()[:3]
    loss: dict[str, dict[int, list[float]]] = {s: {m: [] for m in (1, 2, 4)} for s in SCHEMES}
    for scheme in SCHEMES:
        for seed in seeds:
            out = Path(a.work) / f"pos-{scheme}-s{seed}"
            train_run(out, scheme, seed, a.iters)
            model = model_from_checkpoint(load_checkpoint(out)).eval()
            for m in (1, 2, 4):
                windows = val[starts[:, None] + torch.arange(m * ctx + 1)]
                loss[scheme][m].append(window_loss(model, windows))
    print(f"| positions ({len(seeds)} seeds, {a.iters} iters, {a.windows} windows) | 1x = 64 | 2x = 128 | 4x = 256 |")
    print("|---|---|---|---|")
    for scheme, by in loss.items():
        cells = [f"{statistics.mean(v):.4f} ({', '.join(f'{x:.4f}' for x in v)})" for v in by.values()]
        print(f"| {scheme} | " + " | ".join(cells) + " |")
    ref = {m: statistics.mean(v) for m, v in loss["learned"].items()}
    for scheme, by in loss.items():
        print(f"{scheme} minus learned (same windows): " +
              ", ".join(f"{m}x {statistics.mean(v) - ref[m]:+.4f}" for m, v in by.items()))
    print(f"load average before {' '.join(load0)}, after {' '.join(open('/proc/loadavg').read().split()[:3])}; "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")


if __name__ == "__main__":
    main()
