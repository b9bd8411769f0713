"""Does growing the context from 256 to 512 (extend-context, then more training) lower val loss?

    python -m benchmarks.bench_extend [--work=/tmp/glassgpt-bench-extend] [--base_iters=300] [--more_iters=100]

1. Prepare tiny-shakespeare (char) from $GLASSGPT_MIRROR and train a small 256-context GPT (the base;
   reused when work/base already holds it).
2. Continue it three ways, with the same tokens per iteration and the same learning-rate schedule:
   ctl256 (plain resume at 256, batch 2x), copy512 and interp512 (`glassgpt extend-context
   --block_size=512 --method=copy|interpolate`, then `train --init_from=resume --block_size=512`).
3. Score every model on the same fixed val windows of 512 tokens:
   - "val@own": mean loss over windows of the model's own block size (what train.py reports),
   - "late tokens": loss on the tokens at positions 256..511 of each window; the 512 models see
     256..511 tokens of context there, the 256 models score the same tokens sliding with stride 128
     (129..256 tokens of context). If longer context helped, the 512 models would win here.

With --rope=True the models are rotary (GPTConfig.rope; no wpe) and the arms are copy512 (angles
unchanged), interp512 (rope_scale x2) and base512 (NTK base scaling); this needs train.py to build
rotary models from TrainConfig.rope.

The seed observed no val-loss gain from 512 context on char Shakespeare. Printed as a markdown block
for benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
os.environ.setdefault("GLASSGPT_MIRROR", str(REPO.parent / "shared" / "data"))

from glassgpt.checkpoint import load_checkpoint, model_from_checkpoint  # noqa: E402
from glassgpt.config import TrainConfig  # noqa: E402

MODEL = dict(n_layer=4, n_head=4, n_embd=128, dropout=0.0, bias=False)
TOKENS_PER_ITER = 2048  # batch 8 x 256 or 4 x 512


def train_cfg(data_dir: Path, out_dir: Path, block_size: int, max_iters: int, **kw) -> TrainConfig:
    cfg = TrainConfig(out_dir=str(out_dir), data_dir=str(data_dir), dataset=data_dir.name, block_size=block_size,
                      batch_size=TOKENS_PER_ITER // block_size, gradient_accumulation_steps=1, max_iters=max_iters,
                      learning_rate=3e-3, warmup_iters=30, lr_decay_iters=max_iters, min_lr=3e-4, beta2=0.99,
                      eval_interval=max_iters, eval_iters=10, log_interval=50, device="cpu", dtype="float32",
                      compile=False, plot=False, always_save_checkpoint=True, **MODEL)
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


def prepare_data(work: Path) -> Path:
    data_dir = work / "data" / "shakespeare_char"
    if not (data_dir / "train.bin").exists():
        from glassgpt.prepare import main as prepare

        prepare(["shakespeare_char", f"--out_dir={data_dir}"])
    return data_dir


def base_model(work: Path, iters: int) -> tuple[Path, Path]:
    """(data_dir, out_dir) of the 256-context base model, trained unless already there."""
    from glassgpt.train import train

    data_dir = prepare_data(work)
    out = work / "base"
    if not (out / "ckpt.pt").exists() or load_checkpoint(out)["iter_num"] != iters:
        t = time.time()
        train(train_cfg(data_dir, out, 256, iters))
        print(f"base model: {iters} iterations in {time.time() - t:.0f} s")
    return data_dir, out


@torch.no_grad()
def token_losses(model, windows: torch.Tensor) -> torch.Tensor:
    """(N, T-1) next-token losses of each window, the model seeing the window from its start."""
    logits = model.head(model(windows[:, :-1], stop_at_layer=model.config.n_layer))
    return F.cross_entropy(logits.transpose(1, 2), windows[:, 1:], reduction="none")


@torch.no_grad()
def evaluate(out_dir: Path, val: np.ndarray, starts: np.ndarray) -> dict[str, float]:
    model = model_from_checkpoint(load_checkpoint(out_dir)).eval()
    B = model.config.block_size
    win = torch.from_numpy(np.stack([val[s:s + 513] for s in starts]).astype(np.int64))  # 512 targets each
    if B >= 512:
        loss = token_losses(model, win)  # (N, 512): target j has j+1 tokens of context... from position 0
        own, late = loss.mean().item(), loss[:, 256:].mean().item()
    else:  # 256: own = two independent halves; late = sliding, stride 128, scoring positions 128..255
        halves = torch.cat([win[:, :257], win[:, 256:]], 0)
        own = token_losses(model, halves).mean().item()
        late_parts = []
        for off in range(128, 512 - 256 + 1, 128):  # windows [off, off+256] scoring their last 128 targets
            late_parts.append(token_losses(model, win[:, off:off + 257])[:, 128:])
        late = torch.cat(late_parts, 1).mean().item()
    return {"block_size": B, "val_own": own, "late": late}


def continue_training(data_dir: Path, base: Path, work: Path, name: str, block: int, method: str | None,
                      base_iters: int, more: int) -> Path:
    from glassgpt.extend import main as extend
    from glassgpt.train import train

    out = work / name
    if out.exists():
        shutil.rmtree(out)
    if method is None:
        out.mkdir(parents=True)
        for f in ("ckpt.pt", "ckpt.json"):
            shutil.copy(base / f, out / f)
    else:
        extend([f"--out_dir={base}", f"--block_size={block}", f"--method={method}", f"--new_out_dir={out}"])
    # same schedule for every arm: a fresh cosine over the extra iterations from lr 1e-3
    t = time.time()
    train(train_cfg(data_dir, out, block, base_iters + more, init_from="resume", learning_rate=1e-3,
                    warmup_iters=0, lr_decay_iters=base_iters + more, min_lr=1e-4, eval_interval=more))
    print(f"{name}: {more} more iterations in {time.time() - t:.0f} s")
    return out


def machine() -> str:
    load = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    return f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}; uptime: {load}"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", default="/tmp/glassgpt-bench-extend")
    p.add_argument("--base_iters", type=int, default=300)
    p.add_argument("--more_iters", type=int, default=100)
    p.add_argument("--eval_windows", type=int, default=64)
    p.add_argument("--rope", type=lambda v: v.lower() in ("1", "true", "yes"), default=False,
                   help="rotary models: arms copy / interpolate / base")
    p.add_argument("--smoke", action="store_true", help="seconds: 2 + 2 iterations, 4 windows, in a temporary --work")
    a = p.parse_args(argv)
    if a.smoke:
        import tempfile

        a.base_iters, a.more_iters, a.eval_windows = 2, 2, 4
        if a.work == p.get_default("work"):
            a.work = tempfile.mkdtemp(prefix="glassgpt-bench-extend-smoke-")
    if a.rope:  # its own work dir: the base model there is reused
        MODEL.update(rope=True)
        a.work = a.work.rstrip("/") + "-rope" if a.work == p.get_default("work") else a.work
    torch.set_num_threads(os.cpu_count() or 1)
    work = Path(a.work)
    t0 = time.time()
    data_dir, base = base_model(work, a.base_iters)
    val = np.memmap(data_dir / "val.bin", dtype=np.uint16, mode="r")
    starts = np.random.default_rng(0).integers(0, len(val) - 513, size=a.eval_windows)
    rows = {"base256 (before)": evaluate(base, val, starts)}
    arms = [("ctl256", 256, None), ("copy512", 512, "copy"), ("interp512", 512, "interpolate")]
    for name, block, method in arms + ([("base512", 512, "base")] if a.rope else []):
        if method:  # the extended model before any further training
            from glassgpt.checkpoint import save_checkpoint
            from glassgpt.extend import extend_checkpoint

            tmp = work / f"{name}-untrained"
            save_checkpoint(tmp / "ckpt.pt", extend_checkpoint(load_checkpoint(base), block, method))
            rows[f"{name} (before training)"] = evaluate(tmp, val, starts)
        out = continue_training(data_dir, base, work, name, block, method, a.base_iters, a.more_iters)
        rows[f"{name} (+{a.more_iters} iters)"] = evaluate(out, val, starts)
    when = time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())
    print(f"\n### extend-context: 256 -> 512 on char tiny-shakespeare ({when})")
    print(f"machine: {machine()}")
    print(f"model {MODEL}, base {a.base_iters} iters at 256 (2048 tokens/iter), then +{a.more_iters} iters "
          f"each arm at 2048 tokens/iter; {a.eval_windows} fixed val windows of 512 tokens; "
          f"{time.time() - t0:.0f} s total")
    print("\n| model | block | val loss @own block | loss on tokens 256..511 |")
    print("|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['block_size']} | {r['val_own']:.4f} | {r['late']:.4f} |")


if __name__ == "__main__":
    main()
