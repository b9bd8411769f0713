"""nanoGPT's README CPU recipe, end to end, against a nanoGPT-style loop measured in the same run.

    GLASSGPT_MIRROR=../shared/data python -m benchmarks.bench_train_cpu [--iters=2000] [--skip_reference]

Runs `python train.py config/train_shakespeare_char.py --device=cpu --compile=False --eval_iters=20
--log_interval=1 --block_size=64 --batch_size=12 --n_layer=4 --n_head=4 --n_embd=128 --max_iters=2000
--lr_decay_iters=2000 --dropout=0.0` (verbatim) in a subprocess and reports final val loss, wall time,
ms/iter and peak RSS. The reference is nanoGPT's own loop reproduced here (a fresh np.memmap per batch,
torch.optim.AdamW without the fused kernel on CPU, nanoGPT's RNG use, loss.item() at log intervals)
over the same glassgpt model class, run in a subprocess of its own so RSS is comparable. nanoGPT
itself measured 51.8 s, ~22 ms/iter, 365 MB peak RSS, val 1.886 on this machine type.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RECIPE = ["config/train_shakespeare_char.py", "--device=cpu", "--compile=False", "--eval_iters=20", "--log_interval=1",
          "--block_size=64", "--batch_size=12", "--n_layer=4", "--n_head=4", "--n_embd=128", "--max_iters=2000",
          "--lr_decay_iters=2000", "--dropout=0.0"]
NANOGPT_PUBLISHED = {"wall_s": 51.8, "ms_iter": 22.0, "rss_mb": 365.0, "val_loss": 1.886}


def nanogpt_reference(data_dir: str, iters: int) -> None:
    """nanoGPT train.py's loop for the recipe above, as nanoGPT runs it on a CPU."""
    import numpy as np
    import torch

    sys.path.insert(0, str(REPO))
    from glassgpt.model import GPT, GPTConfig

    torch.manual_seed(1337)
    block_size, batch_size, eval_iters, eval_interval = 64, 12, 20, 250
    lr, min_lr, warmup, decay_iters = 1e-3, 1e-4, 100, 2000

    def get_batch(split):
        data = np.memmap(os.path.join(data_dir, f"{split}.bin"), dtype=np.uint16, mode="r")
        ix = torch.randint(len(data) - block_size, (batch_size,))
        x = torch.stack([torch.from_numpy(data[i:i + block_size].astype(np.int64)) for i in ix])
        y = torch.stack([torch.from_numpy(data[i + 1:i + 1 + block_size].astype(np.int64)) for i in ix])
        return x, y

    vocab = int(json.loads((Path(data_dir) / "meta.json").read_text())["vocab_size"])
    model = GPT(GPTConfig(n_layer=4, n_head=4, n_embd=128, block_size=block_size, bias=False, vocab_size=vocab,
                          dropout=0.0))
    params = list(model.parameters())
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.99))  # nanoGPT: fused only on CUDA

    def get_lr(it):
        if it < warmup:
            return lr * (it + 1) / (warmup + 1)
        if it > decay_iters:
            return min_lr
        r = (it - warmup) / (decay_iters - warmup)
        return min_lr + 0.5 * (1 + math.cos(math.pi * r)) * (lr - min_lr)

    @torch.no_grad()
    def estimate_loss():
        out = {}
        model.eval()
        for split in ("train", "val"):
            losses = torch.zeros(eval_iters)
            for k in range(eval_iters):
                x, y = get_batch(split)
                losses[k] = model(x, y)[1].item()
            out[split] = losses.mean().item()
        model.train()
        return out

    x, y = get_batch("train")
    t_start = time.time()
    it, val = 0, float("nan")
    while True:
        for g in opt.param_groups:
            g["lr"] = get_lr(it)
        if it % eval_interval == 0:
            val = estimate_loss()["val"]
        _, loss = model(x, y)
        x, y = get_batch("train")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if it % 1 == 0:
            loss.item()
        it += 1
        if it > iters:
            break
    wall = time.time() - t_start
    print(json.dumps({"val_loss": val, "wall_s": wall, "ms_iter": wall / iters * 1000}))


def run(cmd: list[str], env: dict) -> tuple[str, float, float]:
    t0 = time.time()
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.time() - t0
    if r.returncode:
        sys.exit(f"command failed ({r.returncode}): {' '.join(cmd)}\n{r.stderr[-2000:]}")
    rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # KB, max over children so far
    return r.stdout, wall, (rss if rss > before else float("nan")) / 1024


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=2000)
    ap.add_argument("--skip_reference", action="store_true")
    ap.add_argument("--_reference", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--smoke", action="store_true", help="seconds: 3 iterations on 50,000 characters of "
                    "tiny-shakespeare prepared in a temporary directory")
    args = ap.parse_args(argv)
    if args._reference:
        return nanogpt_reference(args._reference, args.iters)
    env = dict(os.environ)
    env.setdefault("GLASSGPT_MIRROR", str(REPO.parent / "shared" / "data"))
    data_dir = REPO / "data" / "shakespeare_char"
    out_dir = "/tmp/glassgpt-bench-train-cpu"
    extra: list[str] = []
    if args.smoke:
        import tempfile

        tmp = Path(tempfile.mkdtemp(prefix="bench-train-cpu-smoke-"))
        text = tmp / "input.txt"
        mirror = Path(env["GLASSGPT_MIRROR"]) / "tinyshakespeare" / "input.txt"
        text.write_text(mirror.read_text()[:50_000])
        data_dir, out_dir, args.iters = tmp / "data", str(tmp / "out"), 3
        extra = [f"--data_dir={data_dir}", "--eval_iters=1"]
        subprocess.run([sys.executable, "data/shakespeare_char/prepare.py", f"--input={text}",
                        f"--out_dir={data_dir}"], cwd=REPO, env=env, check=True, capture_output=True)
    if not (data_dir / "train.bin").exists():
        subprocess.run([sys.executable, "data/shakespeare_char/prepare.py"], cwd=REPO, env=env, check=True)
    recipe = [a if not a.startswith("--max_iters") else f"--max_iters={args.iters}" for a in RECIPE] + extra
    # the reference runs first so that glassgpt's peak RSS is read after (ru_maxrss is a running max)
    ref = None
    if not args.skip_reference:
        cmd = [sys.executable, __file__, f"--_reference={data_dir}", f"--iters={args.iters}"]
        out, ref_wall, ref_rss = run(cmd, env)
        ref = json.loads(out.strip().splitlines()[-1])
        ref["rss_mb"], ref["proc_wall_s"] = ref_rss, ref_wall
    cmd = [sys.executable, "train.py", *recipe, f"--out_dir={out_dir}", "--always_save_checkpoint=False"]
    out, wall, rss = run(cmd, env)
    vals = [float(m) for m in re.findall(r"val loss ([0-9.]+)", out)]
    ms = float(re.search(r"\(([0-9.]+) ms/iter\)", out).group(1))
    loop_s = float(re.search(r"iterations in ([0-9.]+) s", out).group(1))
    print(f"glassgpt : val loss {vals[-1]:.4f} | process wall {wall:.1f} s | training loop {loop_s:.1f} s | "
          f"{ms:.1f} ms/iter | peak RSS {rss:.0f} MB")
    if ref:
        print(f"reference: val loss {ref['val_loss']:.4f} | process wall {ref['proc_wall_s']:.1f} s | training loop "
              f"{ref['wall_s']:.1f} s | {ref['ms_iter']:.1f} ms/iter | peak RSS {ref['rss_mb']:.0f} MB  "
              "(nanoGPT's loop)")
        print(f"ratio glassgpt/reference: wall {wall / ref['proc_wall_s']:.2f}x, ms/iter {ms / ref['ms_iter']:.2f}x")
    p = NANOGPT_PUBLISHED
    print(f"published nanoGPT on this machine type: {p['wall_s']} s, {p['ms_iter']} ms/iter, {p['rss_mb']:.0f} MB, val "
          f"{p['val_loss']} -> glassgpt wall ratio {wall / p['wall_s']:.2f}x")


if __name__ == "__main__":
    main()
