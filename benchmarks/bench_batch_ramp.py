"""A linear batch-size ramp against a constant batch, at the same number of training tokens.

    GLASSGPT_MIRROR=../shared/data OMP_NUM_THREADS=1 nice python -m benchmarks.bench_batch_ramp [--seeds=2] [--scale=1]
    python -m benchmarks.bench_batch_ramp --smoke        # 30 iterations: checks it runs

Two recipes on char tiny-shakespeare: the CPU record (config/train_shakespeare_char_cpu.py, batch 24 x 64,
1650 iterations) and nanoGPT's README CPU recipe (batch 12 x 64, 4x4x128, 2000 iterations). The
constant run is the recipe as it is. The ramped run accumulates micro-batches of a third (record: 8
rows) or a half (nanoGPT: 6 rows) of the batch, starting from one micro-batch and reaching the
recipe's batch after `--ramp_frac` of the constant run's iterations (glassgpt/schedule.py); it gets
as many iterations as it needs to train on the same number of tokens (`iters_for_tokens`), with the
learning-rate schedule stretched over those iterations (lr_decay_iters = max_iters). Val loss is
train.py's final eval (eval_iters=20, the same fixed batches for every run), per seed; the wall-clock
ratio is measured in the same run and depends on the machine's load (printed).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

from glassgpt.config import TrainConfig, load_config
from glassgpt.schedule import build_ramp, iters_for_tokens
from glassgpt.train import train

REPO = Path(__file__).resolve().parents[1]
NANOGPT_CPU = ["config/train_shakespeare_char.py", "--device=cpu", "--compile=False", "--eval_iters=20",
               "--log_interval=1", "--block_size=64", "--batch_size=12", "--n_layer=4", "--n_head=4",
               "--n_embd=128", "--max_iters=2000", "--lr_decay_iters=2000", "--dropout=0.0"]
RECIPES = {"CPU record": (["config/train_shakespeare_char_cpu.py"], 3),
           "nanoGPT CPU": (NANOGPT_CPU, 2)}


def mirror() -> Path:
    return Path(os.environ.get("GLASSGPT_MIRROR", REPO.parent / "shared" / "data"))


def data_dir(tmp: Path) -> Path:
    from glassgpt.prepare import ShakespeareConfig, prepare_shakespeare

    out = tmp / "shakespeare_char"
    prepare_shakespeare(ShakespeareConfig(out_dir=str(out), input=str(mirror() / "tinyshakespeare" / "input.txt")))
    return out


def run(args: list[str], extra: list[str]) -> tuple[float, float, int]:
    """(final val loss, wall seconds, iterations)."""
    cfg = load_config(TrainConfig, [str(REPO / args[0]), *args[1:], *extra, "--log_interval=100000", "--plot=False",
                                    "--threads=1", "--eval_interval=100000", "--eval_iters=20", "--health=False"])
    t0 = time.time()
    res = train(cfg)
    return res["last_eval"]["val"], time.time() - t0, res["iter_num"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--ramp_frac", type=float, default=0.3, help="ramp length, as a share of the constant run")
    ap.add_argument("--recipes", default="CPU record,nanoGPT CPU")
    ap.add_argument("--scale", type=float, default=1.0,
                    help="train this share of each recipe's iterations (both arms alike; 0.25 on a busy machine)")
    args = ap.parse_args()
    print(f"loadavg {os.getloadavg()[0]:.1f}; {args.scale:g} x each recipe's iterations, {args.seeds} seeds")
    print("| recipe | seed | batch | iterations | tokens | val | wall s |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        ddir = data_dir(Path(tmp))
        for name in args.recipes.split(","):
            recipe, parts = RECIPES[name]
            base = load_config(TrainConfig, [str(REPO / recipe[0]), *recipe[1:]])
            iters = 30 if args.smoke else int(base.max_iters * args.scale)
            micro = base.batch_size // parts
            ramp = build_ramp(micro * base.block_size, int(iters * args.ramp_frac), parts, micro, base.block_size, 1)
            assert ramp is not None
            tokens = iters * base.batch_size * base.block_size
            ramp_iters = iters_for_tokens(ramp, tokens)
            common = [f"--data_dir={ddir}", "--dataset=shakespeare_char"]
            vals: dict[str, list[float]] = {"constant": [], "ramp": []}
            walls: dict[str, list[float]] = {"constant": [], "ramp": []}
            for seed in range(1337, 1337 + args.seeds):
                for kind, extra in (
                    ("constant", [f"--max_iters={iters}", f"--lr_decay_iters={iters}"]),
                    ("ramp", [f"--max_iters={ramp_iters}", f"--lr_decay_iters={ramp_iters}", f"--batch_size={micro}",
                              f"--gradient_accumulation_steps={parts}", f"--batch_ramp_start={ramp.tokens(0)}",
                              f"--batch_ramp_iters={ramp.ramp_iters}"]),
                ):
                    out = Path(tmp) / f"{name}-{kind}-{seed}"
                    val, wall, n = run(recipe, [*common, *extra, f"--seed={seed}", f"--out_dir={out}"])
                    vals[kind].append(val)
                    walls[kind].append(wall)
                    seen = ramp.tokens_seen(n) if kind == "ramp" else n * base.batch_size * base.block_size
                    batch = (f"{ramp.tokens(0)} -> {ramp.tokens(ramp.ramp_iters)} over {ramp.ramp_iters} it"
                             if kind == "ramp" else f"{base.batch_size * base.block_size}")
                    print(f"| {name} | {seed} | {batch} | {n} | {seen:,} | {val:.4f} | {wall:.0f} |", flush=True)
            print(f"{name}: median val constant {statistics.median(vals['constant']):.4f}, ramp "
                  f"{statistics.median(vals['ramp']):.4f}; wall ramp/constant "
                  f"{sum(walls['ramp']) / sum(walls['constant']):.2f}x (loadavg {os.getloadavg()[0]:.1f})", flush=True)


if __name__ == "__main__":
    main()
