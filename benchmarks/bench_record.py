"""The CPU record: config/train_shakespeare_char_cpu.py against nanoGPT's README CPU recipe, same run.

    GLASSGPT_MIRROR=../shared/data python -m benchmarks.bench_record --nanogpt=/path/to/nanoGPT [--pairs=3]
    GLASSGPT_MIRROR=../shared/data python -m benchmarks.bench_record --nanogpt=/path/to/nanoGPT --per_iter

Default: `--pairs` back-to-back pairs (nanoGPT's recipe, then the record recipe, each `train.py` in a
process of its own with its own default threads), reporting per recipe the median process wall-clock,
train.py's final val (eval_iters=20, noisy) and a fixed val over --eval_batches batches of 12 x 64
windows drawn with one seed (the same windows for every model) and a full val (every val token
scored from up to block_size earlier ones, sliding windows), both computed after training, not timed.
With --nanogpt the reference is nanoGPT's own train.py in that checkout (its data/shakespeare_char is
prepared from the mirror's tiny-shakespeare if missing); without, nanoGPT's recipe run by glassgpt.

--lever='--ngram=3': per-iteration cost of a change to the record recipe: the recipe with and
without those keys, alternating --pairs times, --iters iterations each; median ms/iter and the ratio.

--per_iter: the same architecture and batch (nanoGPT's CPU recipe, --iters iterations) stepped by
nanoGPT, by glassgpt in float32 and by glassgpt with dtype=bfloat16, alternating --pairs times; median
ms/iter from each log (iterations after the first 10, eval iterations excluded) and the ratios.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NANOGPT_CPU = ["config/train_shakespeare_char.py", "--device=cpu", "--compile=False", "--eval_iters=20",
               "--log_interval=1", "--block_size=64", "--batch_size=12", "--n_layer=4", "--n_head=4",
               "--n_embd=128", "--max_iters=2000", "--lr_decay_iters=2000", "--dropout=0.0"]
RECORD = ["config/train_shakespeare_char_cpu.py"]


def final_vals(out_dir: str, data_dir: Path, batches: int) -> tuple[float, float]:
    """(fixed val, full val) of a run's checkpoint, loaded once with val.bin.

    fixed: mean val loss over `batches` seeded windows of 12 x 64 (the same for every model).
    full: mean loss over every token of val.bin, each predicted from up to block_size earlier tokens
    (sliding windows with stride block_size // 2, glassgpt.evaluate.token_nlls: what `glassgpt eval`
    reports); not random windows, so it has no sampling noise."""
    import numpy as np
    import torch

    from glassgpt.checkpoint import load_checkpoint, model_from_checkpoint
    from glassgpt.evaluate import token_nlls

    model = model_from_checkpoint(load_checkpoint(out_dir)).eval()
    data = torch.from_numpy(np.fromfile(data_dir / "val.bin", dtype=np.uint16).astype(np.int64))
    gen = torch.Generator().manual_seed(42)
    total = 0.0
    with torch.no_grad():
        for _ in range(batches):
            ix = torch.randint(len(data) - 65, (12,), generator=gen)
            w = data[ix[:, None] + torch.arange(65)]
            total += model(w[:, :-1], w[:, 1:].contiguous())[1].item()
    block = model.config.block_size
    return total / batches, float(token_nlls(model, data, block, block // 2, batch_size=32).mean())


def start(args: list[str], out_dir: str, cwd: Path = REPO, threads: int | None = None):
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    cmd = [sys.executable, "train.py", *args, f"--out_dir={out_dir}"]
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return proc, time.time()


def finish(proc: subprocess.Popen, t0: float, name: str) -> tuple[float, float, list[float]]:
    """(wall seconds, last val loss, per-iteration ms of the training steps) of a finished run."""
    out, _ = proc.communicate()
    wall = time.time() - t0
    if proc.returncode:
        sys.exit(f"{name} failed ({proc.returncode}):\n{out[-2000:]}")
    steps = [float(ms) for it, ms in re.findall(r"iter (\d+): loss [0-9.]+,.*?(?:time )?([0-9.]+) ?ms", out)
             if int(it) > 10 and int(it) % 250 != 0]  # skip warm-up and the steps that follow an eval
    return wall, [float(v) for v in re.findall(r"val loss ([0-9.]+)", out)][-1], steps


def nanogpt_dir(path: str) -> Path:
    """A nanoGPT checkout with data/shakespeare_char prepared (from the mirror's input.txt if needed)."""
    root = Path(path).resolve()
    d = root / "data" / "shakespeare_char"
    if not (root / "train.py").exists():
        sys.exit(f"{root} is not a nanoGPT checkout (no train.py)")
    if not (d / "train.bin").exists():
        mirror = Path(os.environ.get("GLASSGPT_MIRROR", REPO.parent / "shared" / "data"))
        if not (d / "input.txt").exists():
            shutil.copy(mirror / "tinyshakespeare" / "input.txt", d / "input.txt")
        subprocess.run([sys.executable, "prepare.py"], cwd=d, check=True)
    return root


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def record_table(a, data_dir: Path, ref: tuple[str, list[str], Path]) -> None:
    runs = {ref[0]: (ref[1], ref[2]), "glassgpt CPU record recipe": (RECORD, REPO)}
    results: dict[str, list] = {name: [] for name in runs}
    for pair in range(a.pairs):
        for name, (args, cwd) in runs.items():
            out = f"{a.work}/{name.split()[0]}-{pair}"
            results[name].append((*finish(*start(args + a.extra, out, cwd, a.threads), name), out))
    print("| recipe | wall-clock, median of %d (each) | ms/iter | train.py val | fixed val (%d batches) | full val |"
          % (a.pairs, a.eval_batches))
    print("|---|---|---|---|---|---|")
    walls = {}
    for name, rs in results.items():
        fixed, full = zip(*(final_vals(out, data_dir, a.eval_batches) for _, _, _, out in rs), strict=True)
        walls[name] = median([w for w, _, _, _ in rs])
        print(f"| {name} | {walls[name]:.1f} s ({', '.join(f'{w:.1f}' for w, _, _, _ in rs)}) | "
              f"{median([m for _, _, st, _ in rs for m in st]):.1f} | {median([v for _, v, _, _ in rs]):.4f} "
              f"({', '.join(f'{v:.4f}' for _, v, _, _ in rs)}) | "
              f"{median(fixed):.4f} ({', '.join(f'{v:.4f}' for v in fixed)}) | {median(full):.4f} |")
    ref_wall, rec_wall = walls.values()
    print(f"wall-clock ratio record / reference: {rec_wall / ref_wall:.2f}x")


def per_iter_table(a, ref: tuple[str, list[str], Path]) -> None:
    n = [f"--max_iters={a.iters}", f"--lr_decay_iters={a.iters}", f"--eval_interval={a.iters}"]
    runs = {ref[0]: (ref[1] + n, ref[2]),
            "glassgpt, float32": (NANOGPT_CPU + n, REPO),
            "glassgpt, dtype=bfloat16": (NANOGPT_CPU + n + ["--dtype=bfloat16"], REPO)}
    steps: dict[str, list[float]] = {name: [] for name in runs}
    for pair in range(a.pairs):
        for i, (name, (args, cwd)) in enumerate(runs.items()):
            steps[name] += finish(*start(args + a.extra, f"{a.work}/iter-{i}-{pair}", cwd, a.threads), name)[2]
    ref_ms = median(steps[ref[0]])
    print(f"| run ({a.iters} iterations x {a.pairs}) | median ms/iter | vs {ref[0]} |")
    print("|---|---|---|")
    for name, st in steps.items():
        print(f"| {name} | {median(st):.1f} | {median(st) / ref_ms:.2f}x |")


def lever_table(a) -> None:
    """ms/iter of the record recipe with and without --lever's keys, alternating --pairs times."""
    n = [f"--max_iters={a.iters}", f"--lr_decay_iters={a.iters}", "--log_interval=1"]
    runs = {"record recipe": RECORD + n, f"record recipe {a.lever}": RECORD + n + a.lever.split()}
    steps: dict[str, list[float]] = {name: [] for name in runs}
    for pair in range(a.pairs):
        for i, (name, args) in enumerate(runs.items()):
            steps[name] += finish(*start(args + a.extra, f"{a.work}/lever-{i}-{pair}", REPO, a.threads), name)[2]
    ref_ms = median(steps["record recipe"])
    print(f"| run ({a.iters} iterations x {a.pairs}) | median ms/iter | vs record recipe |")
    print("|---|---|---|")
    for name, st in steps.items():
        print(f"| {name} | {median(st):.1f} | {median(st) / ref_ms:.3f}x |")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nanogpt", help="a nanoGPT checkout: the reference runs its own train.py")
    ap.add_argument("--pairs", type=int, default=1)
    ap.add_argument("--threads", type=int, help="OMP_NUM_THREADS for every run (default: each program's own)")
    ap.add_argument("--per_iter", action="store_true")
    ap.add_argument("--lever", help="train.py keys, e.g. '--ngram=2': per-iteration cost of the recipe with them")
    ap.add_argument("--iters", type=int, default=300)
    ap.add_argument("--eval_batches", type=int, default=200)
    ap.add_argument("--work", default="/tmp/glassgpt-bench-record")
    ap.add_argument("--smoke", action="store_true", help="seconds: each recipe for 3 iterations on 50,000 "
                    "characters of tiny-shakespeare, one pair, in a temporary --work")
    a = ap.parse_args(argv)
    a.extra = []
    data_dir = REPO / "data" / "shakespeare_char"
    if a.smoke:
        import tempfile

        from glassgpt.download import TINYSHAKESPEARE, local_or_fetch
        from glassgpt.prepare import main as prepare

        a.work, a.pairs, a.iters, a.eval_batches = tempfile.mkdtemp(prefix="bench-record-smoke-"), 1, 3, 2
        a.threads = a.threads or 1
        text = Path(a.work) / "input.txt"
        text.write_text(local_or_fetch(TINYSHAKESPEARE, Path(a.work) / "download").read_text()[:50_000])
        data_dir = Path(a.work) / "data"
        prepare(["shakespeare_char", f"--input={text}", f"--out_dir={data_dir}"])
        a.extra = [f"--data_dir={data_dir}", "--max_iters=3", "--lr_decay_iters=3", "--eval_interval=3",
                   "--eval_iters=1", "--warmup_iters=0"]
    elif not (data_dir / "train.bin").exists():
        subprocess.run([sys.executable, "data/shakespeare_char/prepare.py"], cwd=REPO, check=True)
    if a.nanogpt:
        ref = ("nanoGPT's train.py", NANOGPT_CPU, nanogpt_dir(a.nanogpt))
    else:
        ref = ("nanoGPT's recipe, run by glassgpt", NANOGPT_CPU, REPO)
    load0 = open("/proc/loadavg").read().split()[:3]
    if a.lever:
        lever_table(a)
    else:
        (per_iter_table if a.per_iter else lambda a, ref: record_table(a, data_dir, ref))(a, ref)
    load1 = open("/proc/loadavg").read().split()[:3]
    print(f"load average before {' '.join(load0)}, after {' '.join(load1)}; back to back, "
          f"{a.threads or 'default'} threads; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")


if __name__ == "__main__":
    main()
