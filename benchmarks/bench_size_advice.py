"""Which model size for how much text: val loss of three model sizes at one compute budget, on corpora of
100k, 1M and 10M characters. glassgpt.advice's table (docs/training.md, "How big a model for your text")
comes from this.

    GLASSGPT_MIRROR=../shared/data OMP_NUM_THREADS=1 nice python -m benchmarks.bench_size_advice [--sizes=S,M]
    python -m benchmarks.bench_size_advice --smoke     # one corpus, a tiny budget: checks it runs

Each run is the CPU record recipe (config/train_shakespeare_char_cpu.py: block 64, batch 24, Muon,
warmup-stable-decay) at one of three sizes, stepped until it has spent the same training FLOPs
(`GPT.flops_per_token` x tokens; a larger model gets fewer steps). The budget is counted in FLOPs, not
seconds, so the comparison does not depend on how loaded the machine is. Val loss is evaluated 4 times
on the same fixed batches (eval_iters=20); the table gives the last and the best with its iteration,
and the train loss beside it (train far below val = memorising). The corpora are char-level:
tiny-shakespeare's first 100k characters, all of it (1.1M), and the English corpus's first 10M
characters (State of the Union addresses + Moby-Dick), each split 90/10 into train/val.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from glassgpt.config import TrainConfig, load_config
from glassgpt.corpus import write_json, write_segments
from glassgpt.model import GPT, GPTConfig
from glassgpt.tokenizer import CharTokenizer
from glassgpt.train import train

REPO = Path(__file__).resolve().parents[1]
SIZES = {"S 2x128": (2, 4, 128), "M 4x192": (4, 4, 192), "L 6x256": (6, 8, 256)}


def mirror() -> Path:
    return Path(os.environ.get("GLASSGPT_MIRROR", REPO.parent / "shared" / "data"))


def corpora(smoke: bool) -> dict[str, str]:
    shakespeare = (mirror() / "tinyshakespeare" / "input.txt").read_text()
    if smoke:
        return {"100k": shakespeare[:100_000]}
    lines = (mirror() / "english" / "sotu_mobydick.jsonl").read_text().splitlines()
    english = "\n\n".join(json.loads(line)["text"] for line in lines if line.strip())
    return {"100k": shakespeare[:100_000], "1.1M": shakespeare, "10M": english[:10_000_000]}


def make_dataset(data_dir: Path, text: str) -> Path:
    """A char-level dataset in glassgpt's layout, one document, 90/10 split."""
    data_dir.mkdir(parents=True, exist_ok=True)
    tok = CharTokenizer.from_text(text)
    n = int(len(text) * 0.9)
    for split, part, start in (("train", text[:n], 0), ("val", text[n:], n)):
        np.array(tok.encode(part), dtype=np.uint16).tofile(data_dir / f"{split}.bin")
        write_segments(data_dir, split, [[0, 0, len(part), start, 1 + text[:start].count("\n")]])
    write_json(data_dir / "meta.json", {**tok.meta(), "format": "glassgpt-data/1"})
    write_json(data_dir / "documents.json", [{"id": "corpus", "source": "corpus.txt", "char_offset": 0, "line": 1}])
    return data_dir


def run_one(data_dir: Path, out_dir: Path, size: tuple[int, int, int], budget: float, vocab: int) -> dict:
    n_layer, n_head, n_embd = size
    base = load_config(TrainConfig, [str(REPO / "config" / "train_shakespeare_char_cpu.py")])
    probe = GPT(GPTConfig(n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=base.block_size,
                          vocab_size=vocab, bias=False))
    tokens_per_iter = base.batch_size * base.block_size
    iters = max(8, int(budget / (probe.flops_per_token() * tokens_per_iter)))
    cfg = load_config(TrainConfig, [
        str(REPO / "config" / "train_shakespeare_char_cpu.py"), f"--out_dir={out_dir}", f"--data_dir={data_dir}",
        f"--n_layer={n_layer}", f"--n_head={n_head}", f"--n_embd={n_embd}", f"--max_iters={iters}",
        f"--lr_decay_iters={iters}", f"--warmup_iters={min(100, iters // 10)}", f"--eval_interval={max(1, iters // 3)}",
        "--log_interval=100000", "--plot=False", "--threads=1"])
    t0 = time.time()
    res = train(cfg)
    wall = time.time() - t0
    evals = [r for r in res["log"] if "val_loss" in r]
    best = min(evals, key=lambda r: r["val_loss"])
    n_train = (data_dir / "train.bin").stat().st_size // 2
    return {"iters": iters, "epochs": iters * tokens_per_iter / n_train, "params": probe.get_num_params(),
            "val": evals[-1]["val_loss"], "train": evals[-1]["train_loss"], "best_val": best["val_loss"],
            "best_iter": best["iter"], "wall_s": wall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="one corpus, a tiny budget")
    ap.add_argument("--budget", type=float, default=3e12, help="training FLOPs per run")
    ap.add_argument("--sizes", default="S,M,L", help="which of S 2x128, M 4x192, L 6x256")
    args = ap.parse_args()
    budget = 2e10 if args.smoke else args.budget
    wanted = ["S", "M"] if args.smoke else args.sizes.split(",")
    sizes = {k: v for k, v in SIZES.items() if k.split()[0] in wanted}
    print(f"budget {budget:.2g} training FLOPs per run; loadavg {os.getloadavg()[0]:.1f}")
    print("| corpus (chars) | model | params | iters (epochs) | val last | val best (iter) | train last | wall s |")
    print("|---|---|---|---|---|---|---|---|")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, text in corpora(args.smoke).items():
            data_dir = make_dataset(Path(tmp) / f"c{name}", text)
            vocab = len(set(text))
            for label, size in sizes.items():
                r = run_one(data_dir, Path(tmp) / f"o{name}{size}", size, budget, vocab)
                rows.append({"corpus": name, "model": label, **r})
                print(f"| {name} | {label} | {r['params'] / 1e6:.2f}M | {r['iters']} ({r['epochs']:.1f}) | "
                      f"{r['val']:.4f} | {r['best_val']:.4f} ({r['best_iter']}) | {r['train']:.4f} | "
                      f"{r['wall_s']:.0f} |", flush=True)
    print(f"loadavg at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
