"""How fast is `glassgpt eval`, and what does the stride buy?

    python -m benchmarks.bench_eval [--out_dir=CKPT_DIR | --init_from=HF_DIR] [--tokens=4096] [--threads=1]

1. Perplexity on the first --tokens tokens of tiny-shakespeare's val split in GPT-2 BPE (tokenized here
   from $GLASSGPT_MIRROR): the sliding-window scorer at stride = block, block/2, block/8, against the
   token-by-token oracle (one forward per token, stride 1 semantics) on a prefix, as tokens/s, the
   ratio to the oracle, and the loss each stride measures (more context -> lower loss on a trained model).
2. Multiple choice: HellaSwag-shaped examples cut from the same text (a 60-token context, 4 endings of
   ~20 tokens, the true continuation among them), examples/s at batch 1 and batch 8.

Without --out_dir/--init_from a random 4-layer, 128-wide GPT-2 shape (vocab 50257, block 128) is timed:
speed does not depend on the weights. Prints a markdown block for benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
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

from glassgpt.evaluate import MCExample, multiple_choice, perplexity  # noqa: E402
from glassgpt.model import GPT, GPTConfig  # noqa: E402
from glassgpt.tokenizer import GPT2Tokenizer  # noqa: E402


def load(args) -> tuple[GPT, str]:
    if args.out_dir:
        from glassgpt.run import open_run

        run = open_run(args.out_dir, device=args.device, threads=torch.get_num_threads())
        return run.model, f"{args.out_dir} (iter {run.iter_num})"
    if args.init_from:
        from glassgpt.pretrained import from_pretrained

        return from_pretrained(args.init_from).eval().to(args.device), args.init_from
    torch.manual_seed(0)
    cfg = GPTConfig(block_size=128, vocab_size=50257, n_layer=4, n_head=4, n_embd=128, bias=True, activation="gelu_new")
    return GPT(cfg).eval().to(args.device), "random 4L/4H/128, block 128, vocab 50257"


@torch.no_grad()
def oracle_nll(model: GPT, seq: list[int], block: int) -> float:
    total = 0.0
    for j in range(len(seq) - 1):
        logits, _ = model(torch.tensor(seq[max(0, j + 1 - block) : j + 1])[None])
        total += F.cross_entropy(logits[0], torch.tensor([seq[j + 1]])).item()
    return total


def timed(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out_dir")
    ap.add_argument("--init_from")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--oracle_tokens", type=int, default=256)
    ap.add_argument("--mc_examples", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch intra-op threads; 1 on a shared, loaded CPU (2 threads contending with other "
                         "processes ran 10-20x slower than 1 on the 2-core dev machine)")
    ap.add_argument("--smoke", action="store_true", help="seconds: 256 tokens, 4 examples, one repeat")
    args = ap.parse_args(argv)
    if args.smoke:
        args.tokens, args.oracle_tokens, args.mc_examples, args.repeats, args.threads = 256, 32, 4, 1, 1
    if args.threads:
        torch.set_num_threads(args.threads)

    model, name = load(args)
    tok = GPT2Tokenizer()
    text = (Path(os.environ["GLASSGPT_MIRROR"]) / "tinyshakespeare" / "input.txt").read_text()
    ids = tok.encode(text[int(len(text) * 0.9):])  # the val split's text, as data/shakespeare cuts it
    block = model.config.block_size
    uptime = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()

    print(f"### bench_eval: {name}\n")
    print(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {platform.node()}, "
          f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, "
          f"device {args.device}; `uptime`: {uptime}\n")
    print(f"`python -m benchmarks.bench_eval {' '.join(argv if argv is not None else sys.argv[1:])}`\n")

    # 1. perplexity
    seq = [tok.eot_token] + ids[: args.oracle_tokens]
    t_oracle, _ = timed(lambda: oracle_nll(model, seq, block), 1)
    oracle_tps = (len(seq) - 1) / t_oracle
    print("| scorer | tokens | tokens/s | vs oracle | loss | bits/byte |\n|---|---|---|---|---|---|")
    print(f"| token-by-token oracle | {len(seq) - 1} | {oracle_tps:,.0f} | 1.0x | | |")
    for stride in (block, block // 2, block // 8):
        t, r = timed(lambda s=stride: perplexity(model, ids[: args.tokens], tok, block, s, batch_size=8), args.repeats)
        tps = r["tokens"] / t
        print(f"| windows, stride {stride} | {r['tokens']:,} | {tps:,.0f} | {tps / oracle_tps:.1f}x | "
              f"{r['loss']:.4f} | {r['bits_per_byte']:.4f} |")

    # 2. multiple choice: the true 20-token continuation vs 3 others from elsewhere in the text
    rng = np.random.default_rng(0)
    examples = []
    for i in range(args.mc_examples):
        s = int(rng.integers(0, len(ids) - 200))
        ctx, true = tok.decode(ids[s : s + 60]), tok.decode(ids[s + 60 : s + 80])
        others = [tok.decode(ids[o : o + 20]) for o in rng.integers(0, len(ids) - 20, 3)]
        label = int(rng.integers(0, 4))
        endings = others[:label] + [true] + others[label:]
        examples.append(MCExample(ctx, [e.strip() for e in endings], label, i + 1))
    print(f"\n| multiple choice ({len(examples)} examples x 4 endings) | examples/s | speed-up | acc | acc_norm |\n"
          "|---|---|---|---|---|")
    base = None
    for bs in (1, 8):
        t, r = timed(lambda b=bs: multiple_choice(model, tok, examples, batch_size=b), args.repeats)
        eps = len(examples) / t
        base = base or eps
        print(f"| batch {bs} | {eps:.1f} | {eps / base:.1f}x | {r['acc']:.3f} | {r['acc_norm']:.3f} |")


if __name__ == "__main__":
    main()
