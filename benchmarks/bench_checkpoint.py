"""What keeping the optimizer state in its own file saves when a checkpoint is opened to sample,
evaluate or trace: time and peak memory of loading a GPT-2-small-shaped checkpoint (124M parameters,
one AdamW step of state) in the old single-file layout vs the split layout.

    python -m benchmarks.bench_checkpoint [--dir=/tmp/glassgpt-ckpt] [--repeat=3] [--smoke]

Each load runs in a fresh process (load_checkpoint + model_from_checkpoint, what open_run does), so its
peak resident memory (VmHWM, Linux) is its own; the two layouts alternate and the medians are printed with
their ratio. --smoke uses a tiny model and one repeat. The files are deleted at the end.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import torch

from glassgpt.checkpoint import load_checkpoint, save_checkpoint
from glassgpt.model import GPT, GPTConfig

REPO = Path(__file__).resolve().parents[1]
# Peak memory from /proc/self/status VmHWM: ru_maxrss survives exec on Linux, so a child forked from this
# (large) process would report the parent's peak.
CHILD = """
import json, sys, time
def hwm():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")) / 1024
t0 = time.perf_counter()
from glassgpt.checkpoint import load_checkpoint, model_from_checkpoint
t1 = time.perf_counter()
ckpt = load_checkpoint(sys.argv[1])
t2 = time.perf_counter()
rss = hwm()
model = model_from_checkpoint(ckpt)
t3 = time.perf_counter()
print(json.dumps({"read_s": t2 - t1, "read_rss_mb": rss, "open_s": t3 - t1,
                  "open_rss_mb": hwm()}))
"""


def write_both(d: Path, cfg: GPTConfig) -> tuple[Path, Path]:
    """The same weights and AdamW state as a split checkpoint and as one file (the old layout)."""
    torch.manual_seed(0)
    model = GPT(cfg)
    opt = model.configure_optimizers(0.1, 6e-4, (0.9, 0.95), "cpu")
    x = torch.randint(0, cfg.vocab_size, (1, 16))
    model(x, x)[1].backward()
    opt.step()
    ckpt = {"model": model.state_dict(), "optimizer": opt.state_dict(), "model_args": cfg.to_dict(),
            "iter_num": 1, "best_val_loss": 9.0, "config": {}}
    split = save_checkpoint(d / "split" / "ckpt.pt", ckpt)
    single = d / "single" / "ckpt.pt"
    single.parent.mkdir(parents=True, exist_ok=True)
    torch.save({**load_checkpoint(split, with_optimizer=True), "optimizer_file": None}, single)
    return single, split


def measure(path: Path) -> dict[str, float]:
    out = subprocess.run([sys.executable, "-c", CHILD, str(path)], capture_output=True, text=True, check=True,
                         cwd=REPO, env={"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict[str, float]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", default="/tmp/glassgpt-ckpt")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--smoke", action="store_true", help="a tiny model, one repeat: checks the script runs")
    args = ap.parse_args(argv)
    cfg = GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=100) if args.smoke else GPTConfig()
    d = Path(args.dir)
    try:
        single, split = write_both(d, cfg)
        mb = {name: sum(f.stat().st_size for f in p.parent.iterdir()) / 2**20 for name, p in
              (("single", single), ("split", split))}
        weights_mb = split.stat().st_size / 2**20
        runs: dict[str, list[dict[str, float]]] = {"single": [], "split": []}
        for _ in range(1 if args.smoke else args.repeat):
            for name, path in (("single", single), ("split", split)):
                runs[name].append(measure(path))
    finally:
        shutil.rmtree(d, ignore_errors=True)
    med = {f"{name}_{k}": statistics.median(r[k] for r in rs) for name, rs in runs.items()
           for k in ("read_s", "read_rss_mb", "open_s", "open_rss_mb")}
    print(f"GPT config: {cfg.n_layer} layers x {cfg.n_embd}, vocab {cfg.vocab_size}; files on disk: "
          f"single {mb['single']:.0f} MiB; split {mb['split']:.0f} MiB, of which ckpt.pt {weights_mb:.0f}")
    print(f"open to sample (median of {len(runs['split'])}, fresh process each):")
    for what, label in (("read", "load_checkpoint"), ("open", "+ build the model")):
        s, p = (med[f"{n}_{what}_s"] for n in ("single", "split"))
        rs, rp = (med[f"{n}_{what}_rss_mb"] for n in ("single", "split"))
        print(f"  {label:<18} single {s:.2f} s / {rs:.0f} MiB peak RSS; split {p:.2f} s / {rp:.0f} MiB; "
              f"split/single: time {p / s:.2f}x, memory {rp / rs:.2f}x")
    return med


if __name__ == "__main__":
    main()
