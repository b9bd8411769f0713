"""The CPU record: config/train_shakespeare_char_cpu.py against nanoGPT's README CPU recipe, same run.

    GLASSGPT_MIRROR=../shared/data python benchmarks/bench_record.py [--back_to_back] [--eval_batches=200]

Each recipe is trained by `train.py` in its own process with one thread (OMP_NUM_THREADS=1, nice 10).
By default the two run concurrently, so both see the same machine load (this box is shared); with
--back_to_back they run one after the other. Reported per recipe: the process wall-clock, train.py's
own final val loss (eval_iters=20, noisy), and a fixed val loss over --eval_batches batches of 12 x 64
drawn with one seed (the same windows for both models), computed after training and not timed.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NANOGPT_CPU = ["config/train_shakespeare_char.py", "--device=cpu", "--compile=False", "--eval_iters=20",
               "--log_interval=1", "--block_size=64", "--batch_size=12", "--n_layer=4", "--n_head=4",
               "--n_embd=128", "--max_iters=2000", "--lr_decay_iters=2000", "--dropout=0.0"]
RECORD = ["config/train_shakespeare_char_cpu.py"]


def fixed_val(out_dir: str, data_dir: Path, batches: int) -> float:
    """Mean val loss over `batches` seeded windows of 12 x 64 (the same for every model)."""
    import numpy as np
    import torch

    from glassgpt.checkpoint import load_checkpoint, model_from_checkpoint

    model = model_from_checkpoint(load_checkpoint(out_dir)).eval()
    data = torch.from_numpy(np.fromfile(data_dir / "val.bin", dtype=np.uint16).astype(np.int64))
    gen = torch.Generator().manual_seed(42)
    total = 0.0
    with torch.no_grad():
        for _ in range(batches):
            ix = torch.randint(len(data) - 65, (12,), generator=gen)
            w = data[ix[:, None] + torch.arange(65)]
            total += model(w[:, :-1], w[:, 1:].contiguous())[1].item()
    return total / batches


def start(args: list[str], out_dir: str) -> tuple[subprocess.Popen, float]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = ["nice", "-n", "10", sys.executable, "train.py", *args, f"--out_dir={out_dir}"]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True), time.time()


def finish(proc: subprocess.Popen, t0: float, name: str) -> tuple[float, float]:
    out, _ = proc.communicate()
    wall = time.time() - t0
    if proc.returncode:
        sys.exit(f"{name} failed ({proc.returncode}):\n{out[-2000:]}")
    return wall, [float(v) for v in re.findall(r"val loss ([0-9.]+)", out)][-1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--back_to_back", action="store_true")
    ap.add_argument("--eval_batches", type=int, default=200)
    ap.add_argument("--work", default="/tmp/glassgpt-bench-record")
    a = ap.parse_args()
    data_dir = REPO / "data" / "shakespeare_char"
    if not (data_dir / "train.bin").exists():
        subprocess.run([sys.executable, "data/shakespeare_char/prepare.py"], cwd=REPO, check=True)
    runs = {"nanoGPT README CPU recipe": (NANOGPT_CPU, f"{a.work}/nanogpt"),
            "glassgpt CPU record recipe": (RECORD, f"{a.work}/record")}
    load0 = open("/proc/loadavg").read().split()[:3]
    results = {}
    if a.back_to_back:
        for name, (args, out) in runs.items():
            results[name] = finish(*start(args, out), name)
    else:
        started = {name: start(args, out) for name, (args, out) in runs.items()}
        results = {name: finish(*p, name) for name, p in started.items()}
    load1 = open("/proc/loadavg").read().split()[:3]
    print(f"load average before {' '.join(load0)}, after {' '.join(load1)}; "
          f"{'back to back' if a.back_to_back else 'concurrently'}, 1 thread each")
    print("| recipe | wall-clock | train.py val (20 batches) | fixed val (%d batches) |" % a.eval_batches)
    print("|---|---|---|---|")
    for name, (wall, val) in results.items():
        fixed = fixed_val(runs[name][1], data_dir, a.eval_batches)
        print(f"| {name} | {wall:.1f} s | {val:.4f} | {fixed:.4f} |")
    (ref_wall, _), (rec_wall, _) = results.values()
    print(f"wall-clock ratio record / nanoGPT recipe: {rec_wall / ref_wall:.2f}x")


if __name__ == "__main__":
    main()
